"""Durable socket dispatch: jobs/s at N in flight, submit->assign / submit->completed latency.

The coordinator runs as a subprocess pinned to core 0 (fresh SQLite database, every transition
durable); this load generator runs on core 1 with lean protocol clients on bare asyncio sockets
(``bench/rawws.py``; no sleeps, no progress frames): clients keep ``--inflight`` jobs
outstanding over ``/v1/jobs/ws``; miners accept and return a result as soon as a job is pushed.

    python -m bench.dispatch --runs 3 --write-docs
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from functools import partial
from itertools import count
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio
import orjson

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
    measured_on,
    pct,
    ratio,
    results_for,
    run_count,
    write_section,
)
from bench.rawws import RawWebSocket, encode_frame, upgrade_request

if TYPE_CHECKING:
    from asyncio import Future
    from pathlib import Path

__all__ = ["LeanClient", "LeanMiner", "Trace", "drive", "latencies", "main", "run_once", "table"]


@dataclass
class Trace:
    sent: dict[str, float] = field(default_factory=dict)  # submit id -> t
    job_of: dict[str, str] = field(default_factory=dict)  # job id -> submit id
    assigned: dict[str, float] = field(default_factory=dict)  # job id -> t (miner got it)
    completed: dict[str, float] = field(default_factory=dict)  # job id -> t (client saw it)


class LeanMiner(RawWebSocket):
    """``hello``, then for every ``job.assign``: ``job.accept`` (unless ``accept`` is false: the
    ceiling's 4-frame exchange has none) and ``job.result`` at once, in one write."""

    def __init__(
        self, url: str, n: int, concurrency: int, trace: Trace, ready: Future[None], accept: bool
    ) -> None:
        super().__init__(request_for(url, MINER_KEY))
        self.n, self.concurrency, self.trace = n, concurrency, trace
        self.ready, self.accept = ready, accept

    def on_open(self) -> None:
        hello = {
            "type": "hello",
            "protocol": 1,
            "miner_id": f"bench-{self.n}",
            "capabilities": {"gpus": [{"name": "A100"}]},
            "concurrency": self.concurrency,
        }
        self.send(orjson.dumps(hello))

    def on_text(self, payload: bytes) -> None:
        msg = orjson.loads(payload)
        kind = msg["type"]
        if kind == "job.assign":
            job_id, attempt = msg["job_id"], msg["attempt"]
            self.trace.assigned[job_id] = time.perf_counter()
            out = b""
            if self.accept:
                accept = {"type": "job.accept", "job_id": job_id, "attempt": attempt}
                out = encode_frame(orjson.dumps(accept))
            result = {
                "type": "job.result",
                "job_id": job_id,
                "attempt": attempt,
                "result": {"ok": True},
                "metrics": {},
            }
            assert self.transport is not None
            self.transport.write(out + encode_frame(orjson.dumps(result)))
        elif kind == "welcome" and not self.opened:
            self.opened = True
            self.ready.set_result(None)
        elif kind == "error":
            fail(self.ready, f"miner got {msg}")

    def on_failed(self) -> None:
        fail(self.ready, "miner socket closed before its welcome")


class LeanClient(RawWebSocket):
    """``hello``, then keep ``inflight`` of ``total`` jobs outstanding; ``done`` when all
    completed."""

    def __init__(
        self, url: str, total: int, inflight: int, trace: Trace, ids: Any, done: Future[None]
    ) -> None:
        super().__init__(request_for(url, CLIENT_KEY))
        self.remaining, self.inflight, self.outstanding = total, inflight, 0
        self.trace, self.ids, self.done = trace, ids, done

    def on_open(self) -> None:
        self.send(b'{"type":"hello","protocol":1}')

    def submit(self) -> bytes:
        self.remaining -= 1
        self.outstanding += 1
        sid = f"s{next(self.ids)}"
        self.trace.sent[sid] = time.perf_counter()
        return encode_frame(orjson.dumps({"type": "job.submit", "id": sid, **JOB}))

    def on_text(self, payload: bytes) -> None:
        assert self.transport is not None
        msg = orjson.loads(payload)
        kind = msg["type"]
        if kind == "ack" and "job" in msg:
            self.trace.job_of[msg["job"]["job_id"]] = msg["id"]
        elif kind == "job.event" and msg["event"] == "completed":
            self.trace.completed[msg["job_id"]] = time.perf_counter()
            self.outstanding -= 1
            if self.remaining > 0:
                self.transport.write(self.submit())
            elif self.outstanding == 0 and not self.done.done():
                self.done.set_result(None)
        elif kind == "welcome" and not self.opened:
            self.opened = True
            first = min(self.inflight, self.remaining)
            self.transport.write(b"".join(self.submit() for _ in range(first)))
            if first == 0:
                self.done.set_result(None)
        elif kind == "error":
            fail(self.done, f"client got {msg}")

    def on_failed(self) -> None:
        fail(self.done, "client socket closed before its welcome")

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        fail(self.done, "client socket closed before its jobs completed")


JOB = {"payload": {"type": "bench"}, "constraints": {"gpu": "A100"}}


def fail(future: Future[None], why: str) -> None:
    if not future.done():
        future.set_exception(RuntimeError(why))


def request_for(url: str, key: str) -> bytes:
    parts = urlsplit(url)
    assert parts.hostname == "127.0.0.1", url  # loopback only
    return upgrade_request(parts.hostname, parts.port or 80, parts.path, {"X-Api-Key": key})


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
    trace: Trace | None = None,
) -> dict[str, Any]:
    """Run ``jobs`` jobs through a server: ``miners`` lean miners, ``clients`` clients keeping
    ``inflight`` jobs outstanding in all; jobs/s, latencies and the CPU that ``pid`` spent.
    ``trace``: record into this one (to read every job's times afterwards)."""
    loop = asyncio.get_running_loop()
    trace = Trace() if trace is None else trace
    ids = count()
    sockets: list[RawWebSocket] = []

    async def open_socket(proto: RawWebSocket, url: str) -> None:
        sockets.append(proto)
        parts = urlsplit(url)
        assert parts.hostname is not None, url  # the callers' URLs name both host and port
        assert parts.port is not None, url
        await loop.create_connection(lambda: proto, parts.hostname, parts.port)

    try:
        per_miner = max(1, -(-inflight // miners))
        for n in range(miners):
            ready: Future[None] = loop.create_future()
            await open_socket(LeanMiner(miner_url, n, per_miner, trace, ready, accept), miner_url)
            with anyio.fail_after(10):
                await ready
        cpu0, own0 = cpu_seconds(pid), time.process_time()
        t0 = time.perf_counter()
        dones = []
        for c in range(clients):
            done: Future[None] = loop.create_future()
            dones.append(done)
            share = jobs // clients + (1 if c < jobs % clients else 0)
            per_client = max(1, inflight // clients)
            lean = LeanClient(client_url, share, per_client, trace, ids, done)
            await open_socket(lean, client_url)
        with anyio.fail_after(60 + jobs / 100):
            await asyncio.gather(*dones)
        elapsed = time.perf_counter() - t0
        cpu = cpu_seconds(pid) - cpu0
        own = time.process_time() - own0
    finally:
        for s in sockets:
            if s.transport is not None:
                s.transport.abort()
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


async def run_once(
    *, jobs: int, inflight: int, miners: int, clients: int, trace: Trace | None = None
) -> dict[str, Any]:
    with coordinator(core=0) as server:
        return await drive(
            pid=server.proc.pid,
            miner_url=server.url("/v1/miners/ws"),
            client_url=server.url("/v1/jobs/ws"),
            jobs=jobs,
            inflight=inflight,
            miners=miners,
            clients=clients,
            trace=trace,
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
    results = results_for(
        a,
        "dispatch",
        lambda: [
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
        ],
    )
    table = render(results, load_results(a.results, "ceiling"))
    print(table)
    if a.write_docs:
        write_docs(table, run_count(results), a.results)


def write_docs(table: str, runs: int, out: Path) -> None:
    write_section(
        "## Durable socket dispatch (`bench/dispatch.py`)\n\n"
        f"{measured_on(out)}; "
        "coordinator pinned to core 0 as a subprocess (SQLite WAL, synchronous=NORMAL, every "
        "transition committed before it is visible; `--log-level warning`, so no access log: "
        "see `ACCESS_LOG` in configuration.md), load generator pinned to core 1. "
        f"Median (min-max) over {runs} runs. Latencies are measured in the load generator: "
        "submit→assign from sending `job.submit` to the miner receiving `job.assign`; "
        "submit→completed to the client receiving the `completed` event; load generator CPU % "
        "near 100 means the load generator, not the server, bounded jobs/s. The fractions compare "
        "the medians with the ceiling's (`bench/ceiling.py`) of the same results folder.\n\n"
        f"{table}\n"
    )


if __name__ == "__main__":
    main()
