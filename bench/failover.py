"""How long a standby takes to serve after the coordinator it stands in for stops.

    python -m bench.failover --jobs 20000

starts a coordinator and a standby (``serve --standby``) on one database (a SQLite file, or a
fresh PostgreSQL database with ``BENCH_POSTGRES_URL``), fills the queue with ``--jobs``
acknowledged jobs (no miner takes them), then stops the coordinator, by ``kill -9`` or by
SIGTERM (``--signal term``), and prints the milliseconds from the signal to the standby's
first 200 from ``/health/ready``: the lock seen free (the standby tries it every 0.5 s),
migrations checked, and memory rebuilt from the store. The run then checks that the standby
holds every acknowledged job.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from contextlib import nullcontext
from functools import partial
from typing import TYPE_CHECKING

import anyio
import httpx
import orjson
from websockets.asyncio.client import connect

from bench.harness import (
    ADMIN_KEY,
    CLIENT_KEY,
    MINER_KEY,
    free_port,
    fresh_postgres,
    http_ok,
    process,
    scratch,
)

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["main"]


async def fill(port: int, jobs: int) -> list[str]:
    """Submit ``jobs`` jobs over one client socket, 200 in flight; their acknowledged ids."""
    acked: list[str] = []
    async with connect(
        f"ws://127.0.0.1:{port}/v1/jobs/ws", additional_headers={"X-Api-Key": CLIENT_KEY}
    ) as ws:
        await ws.send(orjson.dumps({"type": "hello", "protocol": 1}).decode())
        await ws.recv()
        sent = 0
        while len(acked) < jobs:
            while sent < jobs and sent - len(acked) < 200:
                frame = {"type": "job.submit", "id": f"s{sent}", "payload": {"n": sent}}
                await ws.send(orjson.dumps(frame).decode())
                sent += 1
            msg = orjson.loads(await ws.recv())
            if msg.get("type") == "ack":
                acked.append(msg["job"]["job_id"])
    return acked


def run_once(jobs: int, how: signal.Signals, database_url: str | None, tmp: Path) -> float:
    env = {
        "CLIENT_API_KEYS": CLIENT_KEY,
        "MINER_API_KEYS": MINER_KEY,
        "ADMIN_API_KEYS": ADMIN_KEY,
        "RECEIPT_SIGNING_KEY_HEX": "42" * 32,
        "DATABASE_URL": database_url or f"sqlite:///{tmp / 'failover.db'}",
    }
    base = [sys.executable, "-m", "web.cli", "serve", "--log-level", "warning", "--port"]
    port, standby_port = free_port(), free_port()
    ready = partial(http_ok, port, "/health/ready")
    alive = partial(http_ok, standby_port, "/health")
    with process([*base, str(port)], name="primary", ready=ready, core=0, env=env) as primary:
        acked = anyio.run(fill, port, jobs)
        with process(
            [*base, str(standby_port), "--standby"], name="standby", ready=alive, core=0, env=env
        ):
            assert not http_ok(standby_port, "/health/ready")
            started = time.perf_counter()
            os.kill(primary.pid, how)
            with httpx.Client(timeout=1) as http:
                while True:
                    try:
                        ready_now = http.get(f"http://127.0.0.1:{standby_port}/health/ready")
                    except httpx.HTTPError:
                        ready_now = None
                    if ready_now is not None and ready_now.status_code == 200:
                        break
                    if time.perf_counter() - started > 120:
                        raise RuntimeError("the standby did not take over within 120 s")
                    time.sleep(0.002)
                took = time.perf_counter() - started
                listed = http.get(
                    f"http://127.0.0.1:{standby_port}/v1/admin/stats",
                    headers={"X-Api-Key": ADMIN_KEY},
                ).json()
            queued = listed["jobs_by_state"].get("QUEUED", 0)
            if queued != len(acked):
                raise RuntimeError(f"the standby holds {queued} queued jobs; {len(acked)} acked")
    return took * 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--jobs", type=int, default=10000, help="queued jobs at the stop")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--signal", choices=["kill", "term"], default="kill")
    args = p.parse_args(argv)
    how = signal.SIGKILL if args.signal == "kill" else signal.SIGTERM
    postgres = os.environ.get("BENCH_POSTGRES_URL")
    took = []
    for _ in range(args.runs):
        with (
            scratch("failover") as tmp,
            fresh_postgres(postgres) if postgres else nullcontext(None) as url,
        ):
            took.append(run_once(args.jobs, how, url, tmp))
    backend = "PostgreSQL" if postgres else "SQLite"
    print(
        f"{backend}, {args.jobs} queued jobs, SIG{args.signal.upper()} → standby ready: "
        f"median {statistics.median(took):.0f} ms (min {min(took):.0f}, max {max(took):.0f}) "
        f"over {args.runs} runs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
