"""Durable socket dispatch: jobs/s at N in flight, submit->assign / submit->completed latency.

The coordinator runs as a subprocess pinned to core 0 (fresh SQLite database, every transition
durable); this load generator runs on core 1 with lean protocol clients (no sleeps, no progress
frames): clients keep ``--inflight`` jobs outstanding over ``/v1/jobs/ws``; miners accept and
return a result as soon as a job is pushed.

    python -m bench.dispatch --runs 3 --write-docs
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from itertools import count
from typing import TYPE_CHECKING, Any

import anyio
import orjson
from websockets.asyncio.client import ClientConnection, connect

from bench.harness import (
    CLIENT_KEY,
    MINER_KEY,
    arg_parser,
    cell,
    coordinator,
    cpu_seconds,
    in_uvloop,
    job_count,
    load_results,
    machine_info,
    measured_on,
    need_results,
    pct,
    pin_self,
    ratio,
    run_plan,
    save_results,
    write_section,
)

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["Trace", "client", "drive", "latencies", "main", "miner", "run_once", "table"]


@dataclass
class Trace:
    sent: dict[str, float] = field(default_factory=dict)  # submit id -> t
    job_of: dict[str, str] = field(default_factory=dict)  # job id -> submit id
    assigned: dict[str, float] = field(default_factory=dict)  # job id -> t (miner got it)
    completed: dict[str, float] = field(default_factory=dict)  # job id -> t (client saw it)


async def miner(
    url: str,
    n: int,
    concurrency: int,
    ready: anyio.Event,
    stop: anyio.Event,
    trace: Trace,
    *,
    accept: bool = True,
) -> None:
    """Accept (unless ``accept`` is false: the ceiling's 4-frame exchange has no accept) and
    return a result for every pushed job at once."""
    async with connect(
        url, additional_headers={"X-Api-Key": MINER_KEY}, compression=None, max_queue=None
    ) as ws:
        await ws.send(
            orjson.dumps(
                {
                    "type": "hello",
                    "protocol": 1,
                    "miner_id": f"bench-{n}",
                    "capabilities": {"gpus": [{"name": "A100"}]},
                    "concurrency": concurrency,
                }
            ).decode()
        )
        await ws.recv()
        ready.set()
        async for raw in ws:
            msg = orjson.loads(raw)
            if msg["type"] == "job.assign":
                job_id, attempt = msg["job_id"], msg["attempt"]
                trace.assigned[job_id] = time.perf_counter()
                if accept:
                    await ws.send(
                        orjson.dumps(
                            {"type": "job.accept", "job_id": job_id, "attempt": attempt}
                        ).decode()
                    )
                await ws.send(
                    orjson.dumps(
                        {
                            "type": "job.result",
                            "job_id": job_id,
                            "attempt": attempt,
                            "result": {"ok": True},
                            "metrics": {},
                        }
                    ).decode()
                )
            if stop.is_set():
                return


async def client(
    url: str, total: int, inflight: int, trace: Trace, ids: Any, done: anyio.Event
) -> None:
    async with connect(url, additional_headers={"X-Api-Key": CLIENT_KEY}, max_queue=None) as ws:
        await ws.send('{"type":"hello","protocol":1}')
        await ws.recv()
        remaining = total

        async def submit(ws: ClientConnection) -> None:
            nonlocal remaining
            remaining -= 1
            sid = f"s{next(ids)}"
            trace.sent[sid] = time.perf_counter()
            await ws.send(
                orjson.dumps(
                    {
                        "type": "job.submit",
                        "id": sid,
                        "payload": {"type": "bench"},
                        "constraints": {"gpu": "A100"},
                    }
                ).decode()
            )

        for _ in range(min(inflight, remaining)):
            await submit(ws)
        outstanding = min(inflight, total)
        async for raw in ws:
            msg = orjson.loads(raw)
            if msg["type"] == "ack":
                trace.job_of[msg["job"]["job_id"]] = msg["id"]
            elif msg["type"] == "job.event" and msg["event"] == "completed":
                trace.completed[msg["job_id"]] = time.perf_counter()
                outstanding -= 1
                if remaining > 0:
                    outstanding += 1
                    await submit(ws)
                elif outstanding == 0:
                    done.set()
                    return


async def drive(
    *,
    pid: int,
    miner_url: str,
    client_url: str,
    jobs: int,
    inflight: int,
    miners: int,
    clients: int,
    accept: bool = True,
) -> dict[str, Any]:
    """Run ``jobs`` jobs through a server: ``miners`` lean miners, ``clients`` clients keeping
    ``inflight`` jobs outstanding in all; jobs/s, latencies and the CPU that ``pid`` spent."""
    trace = Trace()
    stop = anyio.Event()
    ids = count()
    async with anyio.create_task_group() as tg:
        per_miner = max(1, -(-inflight // miners))
        for n in range(miners):
            ready = anyio.Event()
            tg.start_soon(
                partial(miner, miner_url, n, per_miner, ready, stop, trace, accept=accept)
            )
            await ready.wait()
        cpu0, own0 = cpu_seconds(pid), time.process_time()
        t0 = time.perf_counter()
        dones = []
        for c in range(clients):
            done = anyio.Event()
            dones.append(done)
            share = jobs // clients + (1 if c < jobs % clients else 0)
            tg.start_soon(client, client_url, share, max(1, inflight // clients), trace, ids, done)
        with anyio.fail_after(300):
            for done in dones:
                await done.wait()
        elapsed = time.perf_counter() - t0
        cpu = cpu_seconds(pid) - cpu0
        own = time.process_time() - own0
        stop.set()
        tg.cancel_scope.cancel()
    assign_ms, complete_ms = latencies(trace)
    return {
        "jobs": len(trace.completed),
        "jobs_per_s": len(trace.completed) / elapsed,
        "server_cpu_us_per_job": cpu / max(1, len(trace.completed)) * 1e6,
        # near 100: the load generator, not the server, bounds jobs/s
        "loadgen_cpu_pct": own / elapsed * 100,
        "assign_p50_ms": pct(assign_ms, 50),
        "assign_p99_ms": pct(assign_ms, 99),
        "complete_p50_ms": pct(complete_ms, 50),
        "complete_p99_ms": pct(complete_ms, 99),
    }


def latencies(trace: Trace) -> tuple[list[float], list[float]]:
    """submit->assign and submit->completed in ms; a job id with no ack is its submit id."""
    assign_ms, complete_ms = [], []
    for job_id, t in trace.assigned.items():
        assign_ms.append((t - trace.sent[trace.job_of.get(job_id, job_id)]) * 1000)
    for job_id, t in trace.completed.items():
        complete_ms.append((t - trace.sent[trace.job_of.get(job_id, job_id)]) * 1000)
    return assign_ms, complete_ms


async def run_once(*, jobs: int, inflight: int, miners: int, clients: int) -> dict[str, Any]:
    with coordinator(core=0) as server:
        return await drive(
            pid=server.proc.pid,
            miner_url=server.url("/v1/miners/ws"),
            client_url=server.url("/v1/jobs/ws"),
            jobs=jobs,
            inflight=inflight,
            miners=miners,
            clients=clients,
        )


SCENARIOS = [
    # name, inflight, miners, clients, jobs
    ("100 in flight, 1 miner", 100, 1, 4, 20_000),
    ("100 in flight, 50 miners", 100, 50, 4, 20_000),
    ("1 in flight, 1 miner (unloaded)", 1, 1, 1, 1_000),
    ("1 in flight, 50 miners (unloaded)", 1, 50, 1, 1_000),
]


CEILING_ROW = "100 in flight, 1 miner"  # compared with the ceiling's "100 in flight" rows


def table(results: dict[str, list[dict[str, Any]]], first: str = "scenario") -> list[str]:
    """The rows of a ``drive`` results table (bench/ceiling.py renders its own with it)."""
    ms = "{:.2f}"
    lines = [
        f"| {first} | jobs/s | server CPU µs/job | load generator CPU % "
        "| submit→assign p50 / p99 ms | submit→completed p50 / p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, rs in results.items():
        lines.append(
            f"| {name} | {cell(rs, 'jobs_per_s')} | {cell(rs, 'server_cpu_us_per_job')} "
            f"| {cell(rs, 'loadgen_cpu_pct')} "
            f"| {cell(rs, 'assign_p50_ms', ms)} / {cell(rs, 'assign_p99_ms', ms)} "
            f"| {cell(rs, 'complete_p50_ms', ms)} / {cell(rs, 'complete_p99_ms', ms)} |"
        )
    return lines


def render(
    results: dict[str, list[dict[str, Any]]], ceiling: dict[str, list[dict[str, Any]]] | None
) -> str:
    lines = table(results)
    if ceiling:
        lines += ["", "| scenario | jobs/s as a fraction of the ceiling's (medians) |", "|---|---|"]
        for name, rs in results.items():
            if name.startswith(CEILING_ROW):
                parts = [
                    f"{ratio(rs, crs, 'jobs_per_s'):.2f} x “{cname}”"
                    for cname, crs in ceiling.items()
                    if cname.startswith("100 in flight")
                ]
                lines.append(f"| {name} | {'; '.join(parts)} |")
    return "\n".join(lines)


def main() -> None:
    a = arg_parser(__doc__).parse_args()
    if a.from_results:
        results = need_results(a.results, "dispatch")
    else:
        machine = machine_info()  # before pinning: the affinity mask shrinks to one core
        pin_self(1)
        plan = [
            (
                name,
                in_uvloop(
                    partial(
                        run_once,
                        jobs=job_count(a, jobs),
                        inflight=inflight,
                        miners=miners,
                        clients=clients,
                    )
                ),
            )
            for name, inflight, miners, clients, jobs in SCENARIOS
        ]
        results = run_plan(plan, a.runs, a.only)
        save_results(a.results, "dispatch", results, machine)
    table = render(results, load_results(a.results, "ceiling"))
    print(table)
    if a.write_docs:
        write_docs(table, len(next(iter(results.values()))), a.results)


def write_docs(table: str, runs: int, out: Path) -> None:
    write_section(
        "## Durable socket dispatch (`bench/dispatch.py`)\n\n"
        f"{measured_on(out)}; "
        "coordinator pinned to core 0 as a subprocess (SQLite WAL, synchronous=NORMAL, every "
        "transition committed before it is visible), load generator pinned to core 1. "
        f"Median (min-max) over {runs} runs. Latencies are measured in the load generator: "
        "submit→assign from sending `job.submit` to the miner receiving `job.assign`; "
        "submit→completed to the client receiving the `completed` event; load generator CPU % "
        "near 100 means the load generator, not the server, bounded jobs/s. The fractions compare "
        "the medians with the ceiling's (`bench/ceiling.py`) of the same results folder.\n\n"
        f"{table}\n"
    )


if __name__ == "__main__":
    main()
