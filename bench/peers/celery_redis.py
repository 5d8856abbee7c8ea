"""Peer: Celery with a Redis broker and result backend, doing the same job round trip.

submit (``apply_async``) → the worker runs a no-op task → the client sees the result. The
script starts Debian's ``redis-server`` on a free 127.0.0.1 port with no persistence (no RDB
snapshots, no AOF) and a Celery worker, both pinned to core 0 (the coordinator's core: the
peer's broker, storage and worker share what our server gets alone); the client runs here on
core 1. Both are stopped at the end.

Configuration (a fast, still reliable one): worker ``--pool=solo`` (the task runs in the
worker's own process, no IPC to a child), ``--without-gossip --without-mingle
--without-heartbeat``, ``task_acks_late=True`` (a task is acknowledged after it ran, the
durable choice, like our accept-then-result), ``worker_prefetch_multiplier=100`` (so 100 in
flight are all prefetched), JSON serialization, Redis result backend (the client waits on its
pub/sub channel).

- throughput: the client keeps ``--inflight`` tasks outstanding, submitting a new one as each
  result arrives (``AsyncResult.then`` callbacks, drained with the backend's result consumer);
- unloaded round trip: one task at a time, ``apply_async`` → ``AsyncResult.get()``.

    python -m bench.peers.celery_redis --runs 3 --write-docs
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from celery import Celery

from bench.harness import (
    Plan,
    arg_parser,
    cell,
    cpu_seconds,
    free_port,
    job_count,
    measured_on,
    pct,
    process,
    results_for,
    run_count,
    write_section,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from celery.result import AsyncResult

__all__ = ["Peer", "app", "main", "peer", "round_trips", "throughput"]

URL_ENV = "BENCH_REDIS_URL"  # how the worker subprocess finds the script's redis-server
PREFETCH = 100


def make_app(redis_url: str) -> Celery:
    app = Celery("bench_peer", broker=f"{redis_url}/0", backend=f"{redis_url}/1")
    app.conf.update(
        task_acks_late=True,
        worker_prefetch_multiplier=PREFETCH,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        worker_send_task_events=False,
        task_send_sent_event=False,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app


# The worker's app (``celery -A bench.peers.celery_redis:app``); clients make their own.
app = make_app(os.environ.get(URL_ENV, "redis://127.0.0.1:6379"))


TASK = "bench.noop"
RESULT = {"ok": True}


@app.task(name=TASK)
def noop() -> dict[str, bool]:
    return RESULT


def redis_ready(port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(port=port, socket_timeout=1).ping())
    except redis.RedisError:
        return False


@dataclass
class Peer:
    client: Celery  # this process's app, on the run's redis-server
    pids: tuple[int, int]  # redis-server, worker

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)


@contextmanager
def peer(core: int | None = 0) -> Iterator[Peer]:
    """Run redis-server and a Celery worker pinned to ``core``, both stopped on exit."""
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server not found: apt-get install -y redis-server")
    port = free_port()
    url = f"redis://127.0.0.1:{port}"
    client = make_app(url)
    redis_cmd = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    redis_cmd += ["--appendonly", "no", "--loglevel", "warning", "--dir", "/tmp"]
    worker_cmd = [sys.executable, "-m", "celery", "-A", "bench.peers.celery_redis:app"]
    worker_cmd += ["worker", "--pool=solo", "--concurrency=1", "--without-gossip"]
    worker_cmd += ["--without-mingle", "--without-heartbeat", "--loglevel=WARNING"]
    try:
        with (
            process(redis_cmd, name="redis", ready=lambda: redis_ready(port), core=core) as rd,
            process(
                worker_cmd,
                name="celery",
                ready=lambda: bool(client.control.ping(timeout=0.2)),
                core=core,
                env={URL_ENV: url},
            ) as worker,
        ):
            yield Peer(client, (rd.pid, worker.pid))
    finally:
        client.close()


def throughput(peer: Peer, jobs: int, inflight: int) -> dict[str, float]:
    sent: dict[str, float] = {}
    finished: deque[tuple[AsyncResult, float]] = deque()
    consumer = peer.client.backend.result_consumer

    def submit() -> None:
        t = time.perf_counter()
        r = peer.client.send_task(TASK)
        sent[r.id] = t
        r.then(lambda res: finished.append((res, time.perf_counter())))

    t0, own0, cpu0 = time.perf_counter(), time.process_time(), peer.cpu_seconds()
    submitted = min(jobs, inflight)
    for _ in range(submitted):
        submit()
    round_ms: list[float] = []
    deadline = time.monotonic() + 60 + jobs / 50
    while len(round_ms) < jobs:
        if time.monotonic() > deadline:
            raise RuntimeError(f"celery: {len(round_ms)} of {jobs} results after the deadline")
        consumer.drain_events(timeout=1)
        while finished:
            res, t = finished.popleft()
            if res.result != RESULT:
                raise RuntimeError(f"celery task {res.id}: {res.state} {res.result!r}")
            round_ms.append((t - sent.pop(res.id)) * 1000)
            if submitted < jobs:
                submitted += 1
                submit()
    return figures(peer, round_ms, t0, own0, cpu0)


def round_trips(peer: Peer, jobs: int) -> dict[str, float]:
    round_ms = []
    t0, own0, cpu0 = time.perf_counter(), time.process_time(), peer.cpu_seconds()
    for _ in range(jobs):
        t = time.perf_counter()
        result = peer.client.send_task(TASK).get(timeout=10)
        round_ms.append((time.perf_counter() - t) * 1000)
        if result != RESULT:
            raise RuntimeError(f"celery task returned {result!r}")
    return figures(peer, round_ms, t0, own0, cpu0)


def figures(
    peer: Peer, round_ms: list[float], t0: float, own0: float, cpu0: float
) -> dict[str, float]:
    elapsed = time.perf_counter() - t0
    return {
        "jobs": len(round_ms),
        "jobs_per_s": len(round_ms) / elapsed,
        "server_cpu_us_per_job": (peer.cpu_seconds() - cpu0) / len(round_ms) * 1e6,
        "client_cpu_pct": (time.process_time() - own0) / elapsed * 100,
        "round_trip_p50_ms": pct(round_ms, 50),
        "round_trip_p99_ms": pct(round_ms, 99),
    }


def measured(step: Callable[[Peer], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """A plan step: ``step`` on a fresh redis-server + worker."""

    def run() -> dict[str, Any]:
        with peer() as p:
            return step(p)

    return run


SCENARIOS = [
    # name, inflight, jobs; bench/summary.py reads these two names
    ("100 in flight", 100, 10_000),
    ("1 in flight (unloaded round trip)", 1, 1_000),
]


def render(results: dict[str, list[dict[str, Any]]]) -> str:
    ms = "{:.2f}"
    lines = [
        "| Celery + Redis, 1 worker | jobs/s | redis + worker CPU µs/job | client CPU % "
        "| submit→result seen p50 / p99 ms |",
        "|---|---|---|---|---|",
    ]
    for name, rs in results.items():
        lines.append(
            f"| {name} | {cell(rs, 'jobs_per_s')} | {cell(rs, 'server_cpu_us_per_job')} "
            f"| {cell(rs, 'client_cpu_pct')} "
            f"| {cell(rs, 'round_trip_p50_ms', ms)} / {cell(rs, 'round_trip_p99_ms', ms)} |"
        )
    return "\n".join(lines)


def write_docs(table: str, runs: int, out: Path) -> None:
    from importlib.metadata import version

    write_section(
        "## Peer: Celery + Redis (`bench/peers/celery_redis.py`)\n\n"
        f"{measured_on(out)}. Celery {version('celery')} with Debian's redis-server (no "
        "persistence) as broker and result backend, started by the script; redis-server and "
        "the worker pinned to core 0, the client on core 1. Worker: `--pool=solo "
        "--without-gossip --without-mingle --without-heartbeat`, `task_acks_late=True`, "
        f"`worker_prefetch_multiplier={PREFETCH}`, JSON. The round trip is `apply_async` of a "
        "no-op task → the client has its result (`AsyncResult.then` callbacks at 100 in "
        "flight, `AsyncResult.get()` one at a time). "
        f"Median (min-max) over {runs} runs.\n\n"
        f"{table}\n"
    )


def main() -> None:
    a = arg_parser(__doc__).parse_args()

    def plan() -> Plan:
        steps: Plan = []
        for name, inflight, jobs in SCENARIOS:
            n = job_count(a, jobs)
            if inflight == 1:
                steps.append((name, measured(partial(round_trips, jobs=n))))
            else:
                steps.append((name, measured(partial(throughput, jobs=n, inflight=inflight))))
        return steps

    results = results_for(a, "celery", plan)
    table = render(results)
    print(table)
    if a.write_docs:
        write_docs(table, run_count(results), a.results)


if __name__ == "__main__":
    main()
