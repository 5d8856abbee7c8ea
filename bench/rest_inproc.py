"""In-process CPU cost of a REST job through the HTTP stack: no sockets, no load generator.

Builds the real app (``create_app`` on a fresh SQLite database, behind the layers
``aitbc-coordinator serve`` puts in front of it) and drives one uvicorn HTTP protocol per
peer over in-memory transports with the request shapes of ``bench.rest``: a client
``POST /v1/jobs``, a miner's ``POST /v1/miners/poll`` that returns it, and its
``POST /v1/miners/{id}/result``. Prints the process CPU time per job for each protocol,
alternating ``--rounds`` times, so that both sides of an A/B share the machine's state
(uvloop, as the server):

- ``layered``: ``CoalescingHttpProtocol`` (web/http_protocol.py), every request through
  uvicorn's cycle and every ASGI layer;
- ``lean``: ``LeanHttpProtocol`` (web/lean_http.py), what ``aitbc-coordinator serve`` runs.

    python -m bench.rest_inproc --jobs 3000 --rounds 3

``--store memory`` swaps SQLite for ``InMemoryJobStore`` (never a product mode) for
instruction counts under ``valgrind --tool=callgrind``: with SQLite, how many jobs each commit
takes depends on the database thread's timing, and the count per job moved by a few percent
between runs of the same code. Without the thread it still moves by some tens of millions of
instructions a run (timers such as the ops feed's tick run with wall time, which valgrind
stretches), so compare runs of the same ``--jobs``, not differences of differences:

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        python -m bench.rest_inproc --only lean --store memory --rounds 1 --jobs 1500
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import orjson
from uvicorn.server import ServerState

from bench.harness import CLIENT_KEY, MINER_KEY
from storage.memory import InMemoryJobStore
from web.app import create_app
from web.asgi import SocketFastPath
from web.cli import uvicorn_config
from web.gctune import tune_gc
from web.http_protocol import CoalescingHttpProtocol
from web.lean_http import LeanHttpProtocol
from web.settings import Settings

__all__ = ["PROTOCOLS", "main", "run"]

PROTOCOLS: dict[str, type[CoalescingHttpProtocol]] = {
    "layered": CoalescingHttpProtocol,
    "lean": LeanHttpProtocol,
}
UVLOOP = {"use_uvloop": True}  # what the server runs on
JOB = orjson.dumps({"payload": {"type": "bench"}, "constraints": {"gpu": "A100"}})
REGISTER = orjson.dumps({"capabilities": {"gpus": [{"name": "A100"}]}, "concurrency": 1})
POLL = orjson.dumps({"max_wait_seconds": 5})
RESULT = orjson.dumps({"result": {"ok": True}, "metrics": {}})


class _Transport:
    """A connection's server side: what the protocol writes, and who waits for it."""

    def __init__(self) -> None:
        self.data = b""
        self.written: asyncio.Event | None = None
        self.closing = False

    def write(self, data: bytes) -> None:
        self.data += data
        if self.written is not None:
            self.written.set()

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        addresses = {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8000)}
        return addresses.get(name, default)

    def set_write_buffer_limits(self, *args: Any, **kwargs: Any) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class _Peer:
    """One keep-alive connection: send a request, wait for the whole response."""

    def __init__(self, protocol: Any, headers: dict[str, str]) -> None:
        self.transport = _Transport()
        self.protocol = protocol
        protocol.connection_made(self.transport)
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in headers.items())

    async def post(self, path: str, body: bytes, status: int) -> bytes:
        t = self.transport
        t.data, t.written = b"", asyncio.Event()
        self.protocol.data_received(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{self.headers}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await t.written.wait()
        head, _, payload = t.data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 %d " % status):
            raise RuntimeError(f"POST {path}: {t.data[:300]!r}")
        return payload


async def run(
    db: Path, protocol: str, jobs: int, warmup: int = 500, store: str = "sqlite"
) -> float:
    """CPU µs per job through ``protocol`` (after ``warmup`` jobs): 4 clients keep 100 jobs
    outstanding, 50 miners poll and post results, as in ``bench.rest``."""
    settings = Settings(
        database_url=f"sqlite:///{db}",
        client_api_keys=(CLIENT_KEY,),
        miner_api_keys=(MINER_KEY,),
        receipt_signing_key_hex="42" * 32,
    )
    app = create_app(settings, store=InMemoryJobStore() if store == "memory" else None)
    config = uvicorn_config(SocketFastPath(app), settings, log_level="warning")
    config.load()
    state = ServerState()
    state.default_headers = [(b"date", b"Thu, 01 Jan 2026 00:00:00 GMT"), *config.encoded_headers]
    cls = PROTOCOLS[protocol]

    def peer(headers: dict[str, str]) -> _Peer:
        return _Peer(cls(config=config, server_state=state, app_state={}), headers)

    async with app.router.lifespan_context(app):
        slots = asyncio.Semaphore(100)
        completed = [0]
        started = [0.0]
        finished = asyncio.Event()
        registered = asyncio.Semaphore(0)

        async def miner(n: int) -> None:
            m = peer({"X-Api-Key": MINER_KEY, "X-Miner-ID": f"bench-inproc-{n}"})
            await m.post("/v1/miners/register", REGISTER, 200)
            registered.release()
            while True:
                job_id = orjson.loads(await m.post("/v1/miners/poll", POLL, 200))["job_id"]
                await m.post(f"/v1/miners/{job_id}/result", RESULT, 200)
                completed[0] += 1
                if completed[0] == warmup:
                    started[0] = time.process_time()
                elif completed[0] == warmup + jobs:
                    finished.set()
                slots.release()

        async def client(count: int) -> None:
            c = peer({"X-Api-Key": CLIENT_KEY})
            for _ in range(count):
                await slots.acquire()
                await c.post("/v1/jobs", JOB, 201)

        tasks = [asyncio.create_task(miner(n)) for n in range(50)]
        for _ in tasks:
            await registered.acquire()
        total = warmup + jobs
        tasks += [asyncio.create_task(client(total // 4 + (i < total % 4))) for i in range(4)]
        await asyncio.wait_for(finished.wait(), 600)
        cost = (time.process_time() - started[0]) / jobs * 1e6
        # Stop the peers and the polls still parked on the server (uvicorn would log each
        # cancelled request as an error: quiet, this is the end of the run).
        logging.getLogger("uvicorn.error").disabled = True
        tasks += state.tasks
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        logging.getLogger("uvicorn.error").disabled = False
        return cost


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=3, help="runs of each protocol, alternating")
    p.add_argument("--only", choices=sorted(PROTOCOLS), help="run one protocol")
    p.add_argument("--store", choices=("sqlite", "memory"), default="sqlite")
    a = p.parse_args()
    tune_gc()
    names = [a.only] if a.only else list(PROTOCOLS)
    costs: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for name in names:
                db = Path(tmp) / f"{name}-{r}.db"
                cost = anyio.run(
                    partial(run, db, name, a.jobs, store=a.store), backend_options=UVLOOP
                )
                costs[name].append(cost)
                print(f"{name} round {r + 1}: {costs[name][-1]:.0f} µs CPU per job", flush=True)
    for name, values in costs.items():
        print(f"{name}: median {statistics.median(values):.0f} µs CPU per job ({a.jobs} jobs)")


if __name__ == "__main__":
    main()
