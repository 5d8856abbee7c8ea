"""Durable socket dispatch: jobs/s at N in flight, submit->assign / submit->completed latency.

The coordinator runs as a subprocess pinned to core 0 (fresh SQLite database, every transition
durable); this load generator runs on core 1 with lean protocol clients (no sleeps, no progress
frames): clients keep ``--inflight`` jobs outstanding over ``/v1/jobs/ws``; miners accept and
return a result as soon as a job is pushed.

    python -m bench.dispatch --runs 3 --write-docs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from functools import partial
from itertools import count
from typing import Any

import anyio
import orjson

from bench.harness import (
    CLIENT_KEY,
    MINER_KEY,
    ROOT,
    coordinator,
    cpu_seconds,
    machine_info,
    measured_on,
    pct,
    pin_self,
    summary,
    write_section,
)
from bench.wsload import WSClient, connect

__all__ = ["main", "run_once"]


@dataclass
class Trace:
    sent: dict[str, float] = field(default_factory=dict)  # submit id -> t
    job_of: dict[str, str] = field(default_factory=dict)  # job id -> submit id
    assigned: dict[str, float] = field(default_factory=dict)  # job id -> t (miner got it)
    completed: dict[str, float] = field(default_factory=dict)  # job id -> t (client saw it)


class BenchMiner:
    """Accepts and returns a result the moment a job is pushed (sync, in the read callback)."""

    def __init__(self, n: int, concurrency: int, trace: Trace) -> None:
        self.hello = orjson.dumps(
            {
                "type": "hello",
                "protocol": 1,
                "miner_id": f"bench-{n}",
                "capabilities": {"gpus": [{"name": "A100"}]},
                "concurrency": concurrency,
            }
        )
        self.trace = trace
        self.ready = asyncio.get_running_loop().create_future()

    def on_message(self, ws: WSClient, raw: bytes) -> None:
        msg = orjson.loads(raw)
        kind = msg["type"]
        if kind == "job.assign":
            job_id, attempt = msg["job_id"], msg["attempt"]
            self.trace.assigned[job_id] = time.perf_counter()
            ws.send(orjson.dumps({"type": "job.accept", "job_id": job_id, "attempt": attempt}))
            ws.send(
                orjson.dumps(
                    {
                        "type": "job.result",
                        "job_id": job_id,
                        "attempt": attempt,
                        "result": {"ok": True},
                        "metrics": {},
                    }
                )
            )
        elif kind == "welcome" and not self.ready.done():
            self.ready.set_result(None)


class BenchClient:
    """Keeps ``inflight`` jobs outstanding until ``total`` have completed."""

    def __init__(self, total: int, inflight: int, trace: Trace, ids: Any) -> None:
        self.remaining = total
        self.inflight = inflight
        self.outstanding = 0
        self.trace = trace
        self.ids = ids
        self.done = asyncio.get_running_loop().create_future()

    def submit(self, ws: WSClient) -> None:
        self.remaining -= 1
        self.outstanding += 1
        sid = f"s{next(self.ids)}"
        self.trace.sent[sid] = time.perf_counter()
        ws.send(
            orjson.dumps(
                {
                    "type": "job.submit",
                    "id": sid,
                    "payload": {"type": "bench"},
                    "constraints": {"gpu": "A100"},
                }
            )
        )

    def on_message(self, ws: WSClient, raw: bytes) -> None:
        msg = orjson.loads(raw)
        kind = msg["type"]
        if kind == "job.event":
            if msg["event"] == "completed":
                self.trace.completed[msg["job_id"]] = time.perf_counter()
                self.outstanding -= 1
                if self.remaining > 0:
                    self.submit(ws)
                elif self.outstanding == 0 and not self.done.done():
                    self.done.set_result(None)
        elif kind == "ack":
            self.trace.job_of[msg["job"]["job_id"]] = msg["id"]
        elif kind == "welcome":
            for _ in range(min(self.inflight, self.remaining)):
                self.submit(ws)
            if self.remaining == 0 and self.outstanding == 0:
                self.done.set_result(None)


async def run_once(
    *, jobs: int, inflight: int, miners: int, clients: int, core: int | None
) -> dict[str, Any]:
    trace = Trace()
    with coordinator(core=0 if core is not None else None) as server:
        conns: list[WSClient] = []
        try:
            per_miner = max(1, -(-inflight // miners))
            for n in range(miners):
                m = BenchMiner(n, per_miner, trace)
                ws = await connect(
                    server.port, "/v1/miners/ws", {"X-Api-Key": MINER_KEY}, m.on_message
                )
                conns.append(ws)
                ws.send(m.hello)
                await asyncio.wait_for(m.ready, 20)
            cpu0 = cpu_seconds(server.proc.pid)
            lg0 = time.process_time()
            t0 = time.perf_counter()
            ids = count()
            bench_clients = []
            for c in range(clients):
                share = jobs // clients + (1 if c < jobs % clients else 0)
                bc = BenchClient(share, max(1, inflight // clients), trace, ids)
                bench_clients.append(bc)
                ws = await connect(
                    server.port, "/v1/jobs/ws", {"X-Api-Key": CLIENT_KEY}, bc.on_message
                )
                conns.append(ws)
                ws.send(b'{"type":"hello","protocol":1}')
            await asyncio.wait_for(asyncio.gather(*(bc.done for bc in bench_clients)), 300)
            elapsed = time.perf_counter() - t0
            cpu = cpu_seconds(server.proc.pid) - cpu0
            loadgen_cpu = time.process_time() - lg0
        finally:
            for ws in conns:
                ws.close()
    assign_ms, complete_ms = [], []
    for job_id, sid in trace.job_of.items():
        t_sent = trace.sent[sid]
        if job_id in trace.assigned:
            assign_ms.append((trace.assigned[job_id] - t_sent) * 1000)
        if job_id in trace.completed:
            complete_ms.append((trace.completed[job_id] - t_sent) * 1000)
    done = max(1, len(trace.completed))
    return {
        "jobs": len(trace.completed),
        "jobs_per_s": len(trace.completed) / elapsed,
        "server_cpu_us_per_job": cpu / done * 1e6,
        "loadgen_cpu_us_per_job": loadgen_cpu / done * 1e6,
        "assign_p50_ms": pct(assign_ms, 50),
        "assign_p99_ms": pct(assign_ms, 99),
        "complete_p50_ms": pct(complete_ms, 50),
        "complete_p99_ms": pct(complete_ms, 99),
    }


SCENARIOS = [
    # name, inflight, miners, clients, jobs
    ("100 in flight, 1 miner", 100, 1, 4, 20_000),
    ("100 in flight, 50 miners", 100, 50, 4, 20_000),
    ("1 in flight, 1 miner (unloaded)", 1, 1, 1, 1_000),
    ("1 in flight, 50 miners (unloaded)", 1, 50, 1, 1_000),
]


def render(results: dict[str, list[dict[str, Any]]], runs: int) -> str:
    lines = [
        "| scenario | jobs/s | server CPU µs/job | submit→assign p50 / p99 ms "
        "| submit→completed p50 / p99 ms |",
        "|---|---|---|---|---|",
    ]
    for name, rs in results.items():

        def cell(key: str, fmt: str = "{:.0f}", rs: list[dict[str, Any]] = rs) -> str:
            s = summary([r[key] for r in rs])
            return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})"

        lines.append(
            f"| {name} | {cell('jobs_per_s')} | {cell('server_cpu_us_per_job')} "
            f"| {cell('assign_p50_ms', '{:.2f}')} / {cell('assign_p99_ms', '{:.2f}')} "
            f"| {cell('complete_p50_ms', '{:.2f}')} / {cell('complete_p99_ms', '{:.2f}')} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--scale", type=float, default=1.0, help="multiply job counts")
    p.add_argument("--write-docs", action="store_true", help="rewrite docs/performance.md")
    p.add_argument(
        "--from-results",
        action="store_true",
        help="do not measure: render bench/results/dispatch.json",
    )
    a = p.parse_args()
    out = ROOT / "bench" / "results"
    if a.from_results:
        results = json.loads((out / "dispatch.json").read_text())
        runs = len(next(iter(results.values())))
        print(render(results, runs))
        if a.write_docs:
            write_docs(render(results, runs), runs)
        return
    machine = machine_info()  # before pinning: the affinity mask shrinks to one core
    pin_self(1)
    results = {}
    for name, inflight, miners, clients, jobs in SCENARIOS:
        for run in range(a.runs):
            job = partial(
                run_once,
                jobs=max(50, int(jobs * a.scale)),
                inflight=inflight,
                miners=miners,
                clients=clients,
                core=0,
            )
            r = anyio.run(job, backend_options={"use_uvloop": True})
            results.setdefault(name, []).append(r)
            print(
                f"{name} run {run + 1}: {json.dumps({k: round(v, 3) for k, v in r.items()})}",
                flush=True,
            )
    table = render(results, a.runs)
    print(table)
    out.mkdir(exist_ok=True)
    (out / "dispatch.json").write_text(json.dumps(results, indent=2))
    (out / "machine.json").write_text(json.dumps(machine, indent=2))
    if a.write_docs:
        write_docs(table, a.runs)


def write_docs(table: str, runs: int) -> None:
    write_section(
        "## Durable socket dispatch (`bench/dispatch.py`)\n\n"
        f"{measured_on()}; "
        "coordinator pinned to core 0 as a subprocess (SQLite WAL, synchronous=NORMAL, every "
        "transition committed before it is visible), load generator pinned to core 1. "
        f"Median (min-max) over {runs} runs. Latencies are measured in the load generator: "
        "submit→assign from sending `job.submit` to the miner receiving `job.assign`; "
        "submit→completed to the client receiving the `completed` event.\n\n"
        f"{table}\n"
    )


if __name__ == "__main__":
    main()
