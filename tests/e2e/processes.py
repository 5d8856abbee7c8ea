"""A real coordinator process for crash tests, and a socket client that follows its load.

``CoordinatorProcess`` runs ``aitbc-coordinator serve`` on one database and can kill -9 it and
start it again; ``LoadClient`` submits jobs with idempotency keys and follows every
acknowledged one across reconnects (``after``), recording what it saw; ``stored`` reads back
what the store holds with the project's own store.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import anyio
import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from protocol.codec import decode_server_to_client, encode
from protocol.messages import (
    Ack,
    ClientHello,
    ClientWelcome,
    Error,
    JobCancelRequest,
    JobEvent,
    JobSubmit,
    Subscribe,
)
from storage.backends import store_for
from tests.conftest import ADMIN_KEY, CLIENT_KEY, CLIENT_KEY_2, MINER_KEY, MINER_KEY_2, SIGNING_SEED
from tests.postgres import fetch_rows

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from anyio.abc import Process

    from examples.ws_miner import SimulatedMiner
    from protocol.records import EventRecord, JobRecord

EXE = Path(sys.executable).with_name("aitbc-coordinator")
TERMINAL = frozenset({"completed", "failed", "canceled", "expired"})
TERMINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELED", "EXPIRED"})


def free_port() -> int:
    """A port that was free a moment ago (the subprocess must bind it itself)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CoordinatorProcess:
    """``aitbc-coordinator serve`` as a subprocess on one database (``DATABASE_URL``)."""

    def __init__(self, database_url: str, log: IO[str], *args: str) -> None:
        self.log = log
        self.args = args  # more ``serve`` arguments
        self.port = 0
        self.proc: Process | None = None
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.endswith("_API_KEYS")},
            "CLIENT_API_KEYS": f"{CLIENT_KEY},{CLIENT_KEY_2}",
            "MINER_API_KEYS": f"{MINER_KEY},{MINER_KEY_2}",
            "ADMIN_API_KEYS": ADMIN_KEY,
            "RECEIPT_SIGNING_KEY_HEX": SIGNING_SEED,
            "RESUME_GRACE_SECONDS": "3",
            "ACCEPT_TIMEOUT_SECONDS": "1",
            "DATABASE_URL": database_url,
        }

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    async def start(self, port: int | None = None) -> None:
        """Start and wait for /health; on a bind failure retry on another free port."""
        for _ in range(5):
            self.port = port or free_port()
            port = None
            self.log.write(f"--- starting on port {self.port}\n")
            self.log.flush()
            self.proc = await anyio.open_process(
                [
                    str(EXE),
                    "serve",
                    "--port",
                    str(self.port),
                    "--log-level",
                    "warning",
                    *self.args,
                ],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=self.log,
                stderr=subprocess.STDOUT,
            )
            if await self._healthy(self.proc):
                return
            await self.stop_now()
        raise RuntimeError("the coordinator did not start")

    async def _healthy(self, proc: Process) -> bool:
        async with httpx.AsyncClient(trust_env=False, timeout=1.0) as http:
            with anyio.fail_after(15):
                while proc.returncode is None:
                    try:
                        resp = await http.get(f"http://127.0.0.1:{self.port}/health")
                    except httpx.TransportError:
                        await anyio.sleep(0.02)
                        continue
                    return resp.status_code == 200
        return False  # exited: most likely the port was taken meanwhile

    async def restart(self, miners: Sequence[SimulatedMiner] = ()) -> None:
        """Start again on the same port; ``miners`` follow when it was taken meanwhile
        (other clients read ``url`` at each connect)."""
        port = self.port
        await self.start(port)
        if self.port != port:
            for m in miners:
                m.opts.url = self.url("/v1/miners/ws")

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)

    async def wait_exit(self, within: float = 15.0) -> int:
        assert self.proc is not None
        with anyio.fail_after(within):
            return await self.proc.wait()

    async def terminate(self) -> None:
        """SIGTERM: the coordinator stops cleanly, exit 0."""
        assert self.proc is not None
        self.proc.terminate()
        assert await self.wait_exit() == 0

    async def stop_now(self) -> None:
        """Kill (if still running) and reap; used in ``finally``."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with anyio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            await proc.aclose()


@dataclass(repr=False)
class LoadClient:
    """Submits ``jobs`` jobs (idempotency key per submission) and follows every acknowledged
    one; a submission for which ``cancel(n)`` is true is canceled as soon as it is acknowledged
    (``cancels_sent``: the job ids; a cancel sent just before a crash may be lost)."""

    server: CoordinatorProcess
    jobs: int = 300
    pace: float = 0.003  # seconds between submissions
    cancel: Callable[[int], bool] = field(default=lambda n: False)
    cancels_sent: set[str] = field(default_factory=set)
    cancel_answers: dict[str, str] = field(default_factory=dict)  # job id -> "ok" or error code
    job_of: dict[int, str] = field(default_factory=dict)  # submission -> acknowledged job id
    seen: dict[str, set[int]] = field(default_factory=dict)  # job id -> seqs delivered
    terminal: dict[str, list[str]] = field(default_factory=dict)  # job id -> terminal events
    started: set[str] = field(default_factory=set)  # jobs whose ``started`` event was seen
    redelivered: list[tuple[str, int]] = field(default_factory=list)
    deduplicated: set[str] = field(default_factory=set)  # jobs acked as duplicates
    sessions: int = 0
    done: anyio.Event = field(default_factory=anyio.Event)

    def describe_pending(self) -> str:
        unacked = [n for n in range(self.jobs) if n not in self.job_of]
        pending = {j: sorted(self.seen.get(j, ())) for j in self.job_of.values()}
        pending = {j: s for j, s in pending.items() if j not in self.terminal}
        stuck = list(pending.items())[:10]
        return f"not acknowledged: {unacked[:10]}; not terminal (seqs seen): {stuck}"

    def finished(self) -> bool:
        return len(self.job_of) == self.jobs and all(
            j in self.terminal for j in self.job_of.values()
        )

    async def run(self) -> None:
        while not self.done.is_set():
            try:
                await self._session()
            except* (WebSocketException, OSError, TimeoutError):
                pass  # the coordinator is down: try again shortly
            if not self.done.is_set():
                await anyio.sleep(0.02)

    async def _session(self) -> None:
        async with connect(
            self.server.url("/v1/jobs/ws"),
            additional_headers={"X-Api-Key": CLIENT_KEY},
            open_timeout=2,
        ) as ws:
            await ws.send(encode(ClientHello(protocol=1)).decode())
            welcome = decode_server_to_client(await ws.recv())
            assert isinstance(welcome, ClientWelcome)
            self.sessions += 1
            pending = [j for j in self.job_of.values() if j not in self.terminal]
            if pending:  # a reconnect: fetch exactly what was missed
                after = {j: max(self.seen.get(j, {0})) for j in pending}
                await ws.send(
                    encode(Subscribe(id="resub", job_ids=tuple(pending), after=after)).decode()
                )
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._submit_all, ws)
                async for raw in ws:
                    await self._on_frame(ws, raw)
                    if self.finished():
                        self.done.set()
                        tg.cancel_scope.cancel()
                        return

    async def _submit_all(self, ws: Any) -> None:
        for n in range(self.jobs):
            if n in self.job_of:
                continue
            submit = JobSubmit(
                id=f"s{n}", payload={"prompt": f"job {n} of the load"}, idempotency_key=f"k{n}"
            )
            await ws.send(encode(submit).decode())
            await anyio.sleep(self.pace)

    async def _on_frame(self, ws: Any, raw: Any) -> None:
        msg = decode_server_to_client(raw)
        if isinstance(msg, Ack) and msg.id.startswith("s"):
            n = int(msg.id[1:])
            job_id = str(msg.fields["job"]["job_id"])
            assert self.job_of.setdefault(n, job_id) == job_id
            if self.cancel(n) and job_id not in self.cancels_sent:
                self.cancels_sent.add(job_id)
                await ws.send(encode(JobCancelRequest(job_id=job_id, id=f"c{n}")).decode())
            if msg.fields.get("duplicate"):
                # Stored before the crash but never acknowledged: its events so far were lost
                # with the socket, so replay them (a live copy may overlap: dedupe by seq).
                self.deduplicated.add(job_id)
                await ws.send(
                    encode(Subscribe(id=f"d{n}", job_ids=(job_id,), after={job_id: 0})).decode()
                )
        elif isinstance(msg, Ack | Error) and (msg.id or "").startswith("c"):
            job_id = self.job_of[int(str(msg.id)[1:])]
            self.cancel_answers[job_id] = msg.code if isinstance(msg, Error) else "ok"
        elif isinstance(msg, JobEvent):
            seqs = self.seen.setdefault(msg.job_id, set())
            if msg.seq in seqs:
                if msg.job_id not in self.deduplicated:
                    self.redelivered.append((msg.job_id, msg.seq))
                return
            seqs.add(msg.seq)
            if msg.event == "started":
                self.started.add(msg.job_id)
            if msg.event in TERMINAL:
                self.terminal.setdefault(msg.job_id, []).append(msg.event)


async def wait_for(condition: Any, within: float) -> None:
    with anyio.fail_after(within):
        while not condition():  # noqa: ASYNC110 - a tiny poll loop under fail_after (style §4.7)
            await anyio.sleep(0.005)


async def stored(url: str) -> tuple[dict[str, Any], dict[str, list[Any]], dict[str, int]]:
    """Jobs, event logs and receipt counts, read with the project's own store."""
    ids = [r[0] for r in await fetch_rows(url, "SELECT job_id FROM jobs")]
    receipts = dict(await fetch_rows(url, "SELECT job_id, COUNT(*) FROM receipts GROUP BY job_id"))
    store = store_for(url)
    await store.open()
    try:
        jobs = {j: await store.get_job(j) for j in ids}
        events = {j: await store.events_after(j, 0) for j in ids}
    finally:
        await store.close()
    return jobs, events, receipts


def assert_ended_once(
    job: JobRecord, trail: list[EventRecord], receipts: int, client: LoadClient
) -> list[str]:
    """What every acknowledged job keeps through crashes (its event kinds are returned): one
    terminal state, last, its event log without gaps; one receipt exactly when completed,
    for the attempt and miner that completed it; the client saw its end once, and every
    event but dropped progress."""
    job_id, kinds = job.job_id, [e.event for e in trail]
    assert job.state in TERMINAL_STATES, (job_id, job.state, kinds)
    assert [e.seq for e in trail] == list(range(1, job.seq + 1)), (job_id, kinds)
    assert sum(k in TERMINAL for k in kinds) == 1, (job_id, kinds)
    assert kinds[-1] in TERMINAL, (job_id, kinds)
    assert trail[-1].state == job.state, (job_id, kinds)
    assert receipts == (job.state == "COMPLETED"), (job_id, receipts, kinds)
    if job.state == "COMPLETED":
        assert job.receipt is not None
        assert (job.receipt["attempt"], job.receipt["provider"]) == (job.attempt, job.miner_id)
    assert client.terminal[job_id] == [kinds[-1]], (job_id, kinds)
    assert {e.seq for e in trail if e.event != "progress"} <= client.seen[job_id], job_id
    return kinds
