"""The stack's ceiling: the bare 4-frame job exchange on our uvicorn settings.

What any job server on this stack (Starlette, uvicorn with uvloop + httptools, our WebSocket
protocol class, ``web.cli.uvicorn_config``) cannot beat: a relay that does the four frames a
job needs and nothing else — client ``job.submit`` → server pushes ``job.assign`` to a miner
→ miner ``job.result`` → server sends ``job.event completed`` to the client. No scheduler (jobs
go round-robin to whoever is connected, no concurrency limit), no validation, no auth, no
receipts; the hello/welcome handshake happens once per connection.

- ``no persistence``: nothing is stored.
- ``group-committed SQLite``: a bare writer task (stdlib ``sqlite3``, WAL, synchronous=NORMAL)
  inserts each submitted job and updates it on completion; all the writes that arrived while the
  previous group was committing are committed together, and a frame that reveals a write (the
  assign for an insert, the completion for an update) is sent only after its commit.

The relay runs as a subprocess pinned to core 0, the load generator is ``bench/dispatch.py``'s
(same clients, same miner minus the ``job.accept`` frame, the job id is the submit id) on core
1. ``bench/dispatch.py`` reports its jobs/s as a fraction of these.

    python -m bench.ceiling --runs 3 --write-docs
    python -m bench.ceiling serve --port PORT [--db FILE]   # the relay alone
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sqlite3
import sys
from collections import deque
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from bench.dispatch import drive, table
from bench.harness import (
    arg_parser,
    free_port,
    http_ok,
    in_uvloop,
    job_count,
    measured_on,
    process,
    results_for,
    run_count,
    scratch,
    write_section,
)
from web.transport import SEND_NOW

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from starlette.requests import Request

__all__ = ["GroupCommitter", "Relay", "build_app", "main", "run_once"]

SCHEMA = "CREATE TABLE jobs (id TEXT PRIMARY KEY, payload TEXT NOT NULL, result TEXT)"


class GroupCommitter:
    """One writer task; each group is one transaction, run in a worker thread (as aiosqlite
    does) while the next group gathers. ``then`` frames are sent once their group is durable."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(SCHEMA)
        self.inserts: list[tuple[str, str]] = []
        self.updates: list[tuple[str, str]] = []
        self.then: list[tuple[WebSocket | None, str]] = []  # None: push to a miner
        self.wake = asyncio.Event()
        self.groups = 0

    def insert(self, job_id: str, payload: str, assign: str) -> None:
        self.inserts.append((job_id, payload))
        self.then.append((None, assign))
        self.wake.set()

    def complete(self, job_id: str, result: str, ws: WebSocket, frame: str) -> None:
        self.updates.append((result, job_id))
        self.then.append((ws, frame))
        self.wake.set()

    def _commit(self, inserts: list[tuple[str, str]], updates: list[tuple[str, str]]) -> None:
        self.db.execute("BEGIN")
        if inserts:
            self.db.executemany("INSERT INTO jobs (id, payload) VALUES (?, ?)", inserts)
        if updates:
            self.db.executemany("UPDATE jobs SET result = ? WHERE id = ?", updates)
        self.db.execute("COMMIT")

    async def run(self, push: Callable[[str], Awaitable[None]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            self.wake.clear()
            inserts, self.inserts = self.inserts, []
            updates, self.updates = self.updates, []
            then, self.then = self.then, []
            await loop.run_in_executor(None, self._commit, inserts, updates)
            self.groups += 1
            for ws, frame in then:
                await (push(frame) if ws is None else send(ws, frame))


async def send(ws: WebSocket, frame: str) -> None:
    # The same synchronous send our server's socket writer uses (web/transport.py), so the
    # ceiling is not lowered by ASGI layers the coordinator itself skips.
    send_now = ws.scope.get("extensions", {}).get(SEND_NOW)
    if send_now is not None and send_now(frame.encode()):
        return
    with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
        await ws.send_text(frame)


class Relay:
    """The two socket endpoints: clients submit, miners get jobs round-robin."""

    def __init__(self, store: GroupCommitter | None) -> None:
        self.store = store
        self.miners: list[WebSocket] = []
        self.turn = 0
        self.waiting: deque[str] = deque()  # assign frames while no miner is connected
        self.owner: dict[str, WebSocket] = {}  # job id -> the client socket that submitted it

    async def push(self, frame: str) -> None:
        if not self.miners:
            self.waiting.append(frame)
            return
        self.turn = (self.turn + 1) % len(self.miners)
        await send(self.miners[self.turn], frame)

    async def client(self, ws: WebSocket) -> None:
        await ws.accept()
        await ws.receive_text()  # hello
        await ws.send_text('{"type":"welcome","protocol":1}')
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                msg = orjson.loads(await ws.receive_text())
                if msg.get("type") != "job.submit":
                    continue
                job_id = str(msg["id"])
                self.owner[job_id] = ws
                payload = msg.get("payload")
                assign = {"type": "job.assign", "job_id": job_id, "attempt": 1, "payload": payload}
                frame = orjson.dumps(assign).decode()
                if self.store is None:
                    await self.push(frame)
                else:
                    self.store.insert(job_id, orjson.dumps(payload).decode(), frame)

    async def miner(self, ws: WebSocket) -> None:
        await ws.accept()
        await ws.receive_text()  # hello
        await ws.send_text('{"type":"welcome","protocol":1}')
        self.miners.append(ws)
        while self.waiting:
            await self.push(self.waiting.popleft())
        try:
            while True:
                msg = orjson.loads(await ws.receive_text())
                if msg.get("type") != "job.result":
                    continue
                job_id = str(msg["job_id"])
                owner = self.owner.pop(job_id, None)
                if owner is None:
                    continue
                done = {"type": "job.event", "job_id": job_id, "event": "completed"}
                frame = orjson.dumps(done).decode()
                if self.store is None:
                    await send(owner, frame)
                else:
                    result = orjson.dumps(msg.get("result")).decode()
                    self.store.complete(job_id, result, owner, frame)
        except WebSocketDisconnect:
            pass
        finally:
            self.miners.remove(ws)


def build_app(db: Path | None) -> Starlette:
    store = GroupCommitter(db) if db is not None else None
    relay = Relay(store)

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        writer = asyncio.create_task(store.run(relay.push)) if store is not None else None
        yield
        if writer is not None:
            writer.cancel()

    return Starlette(
        routes=[
            Route("/health", health),
            WebSocketRoute("/v1/jobs/ws", relay.client),
            WebSocketRoute("/v1/miners/ws", relay.miner),
        ],
        lifespan=lifespan,
    )


def serve(argv: list[str]) -> None:
    import uvicorn

    from web.cli import uvicorn_config
    from web.settings import Settings

    p = argparse.ArgumentParser(prog="python -m bench.ceiling serve")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--db", type=Path, help="SQLite file: the group-committed variant")
    a = p.parse_args(argv)
    settings = Settings(api_port=a.port)  # api_host defaults to 127.0.0.1
    uvicorn.Server(uvicorn_config(build_app(a.db), settings, log_level="warning")).run()


async def run_once(*, persist: bool, jobs: int, inflight: int, clients: int) -> dict[str, Any]:
    port = free_port()
    cmd = [sys.executable, "-m", "bench.ceiling", "serve", "--port", str(port)]
    ready = partial(http_ok, port, "/health")
    with scratch("db") as tmp:
        if persist:
            cmd += ["--db", str(tmp / "ceiling.db")]
        with process(cmd, name="ceiling", ready=ready, core=0) as proc:
            return await drive(
                pid=proc.pid,
                miner_url=f"ws://127.0.0.1:{port}/v1/miners/ws",
                client_url=f"ws://127.0.0.1:{port}/v1/jobs/ws",
                jobs=jobs,
                inflight=inflight,
                miners=1,
                clients=clients,
                accept=False,
            )


SCENARIOS = [
    # name, persist, inflight, clients, jobs; bench/dispatch.py compares with "100 in flight" rows
    ("100 in flight, no persistence", False, 100, 4, 20_000),
    ("100 in flight, group-committed SQLite", True, 100, 4, 20_000),
    ("1 in flight, no persistence (unloaded)", False, 1, 1, 1_000),
]


def render(results: dict[str, list[dict[str, Any]]]) -> str:
    return "\n".join(table(results, "relay, 1 miner"))


def write_docs(table: str, runs: int, out: Path) -> None:
    write_section(
        "## Ceiling: the bare 4-frame exchange (`bench/ceiling.py`)\n\n"
        f"{measured_on(out)}. A Starlette relay on our uvicorn settings "
        "(`web.cli.uvicorn_config`: uvloop, httptools, our coalescing WebSocket protocol) that "
        "moves the four frames a job needs (submit → assign → result → completed) with no "
        "scheduler, no validation and no auth; the SQLite row adds a bare writer task (WAL, "
        "synchronous=NORMAL, one INSERT per job and one UPDATE on completion, committed in "
        "groups in a worker thread, the assign and the completion sent after their commit). "
        "Pinned to core 0; the load generator is `bench/dispatch.py`'s on core 1 (4 clients, "
        f"1 miner). Median (min-max) over {runs} runs.\n\n"
        f"{table}\n"
    )


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2:])
        return
    a = arg_parser(__doc__).parse_args()
    results = results_for(
        a,
        "ceiling",
        lambda: [
            (
                name,
                in_uvloop(
                    partial(
                        run_once,
                        persist=persist,
                        jobs=job_count(a, jobs),
                        inflight=inflight,
                        clients=clients,
                    )
                ),
            )
            for name, persist, inflight, clients, jobs in SCENARIOS
        ],
    )
    table = render(results)
    print(table)
    if a.write_docs:
        write_docs(table, run_count(results), a.results)


if __name__ == "__main__":
    main()
