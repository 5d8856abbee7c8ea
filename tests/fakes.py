"""Test doubles: small pairs and subclasses of the real thing, never ``Mock`` (style.md 4.7)."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from dispatcher.fanout import Outbox
from protocol.client import MinerClient
from protocol.session import DEFAULT_MAX_FRAME, MinerSession
from storage.errors import StorageError
from storage.memory import InMemoryJobStore

if TYPE_CHECKING:
    from collections.abc import Collection

    from protocol.messages import MinerToServer, ServerToMiner
    from protocol.records import EventRecord, JobRecord
    from protocol.types import CloseCode, JSONObject
    from storage.base import WriteBatch


class SessionPair:
    """A ``MinerClient`` wired to a server-side ``MinerSession`` by a synchronous fake link.

    The test plays the server: it reads what the miner sent with :meth:`to_server` and answers
    with :meth:`server_send`. Every frame crosses the link as encoded bytes, so the codec is
    exercised in both directions (h11's ``ConnectionPair``).
    """

    def __init__(
        self,
        *,
        capabilities: JSONObject | None = None,
        miner_id: str | None = "gpu-box-7",
        concurrency: int = 1,
        region: str | None = None,
        authenticated: bool = True,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        self.client = MinerClient(
            capabilities={} if capabilities is None else capabilities,
            miner_id=miner_id,
            concurrency=concurrency,
            region=region,
        )
        self.max_frame = max_frame
        self.session = MinerSession(authenticated=authenticated, max_frame=max_frame)
        self.wire_to_server: list[bytes] = []
        self.wire_to_client: list[bytes] = []

    def to_server(self) -> list[MinerToServer]:
        """Deliver everything the miner queued; return what the session admitted."""
        for frame in self.client.data_to_send():
            self.wire_to_server.append(frame)
            self.session.receive_data(frame)
        return self.session.events_received()

    def server_send(self, *msgs: object) -> list[ServerToMiner]:
        """Queue ``msgs`` on the session, deliver them, return what the miner decoded."""
        for msg in msgs:
            self.session.send(msg)
        return self.to_client()

    def to_client(self) -> list[ServerToMiner]:
        """Deliver everything the session queued; return the miner's events."""
        for frame in self.session.data_to_send():
            self.wire_to_client.append(frame)
            self.client.receive_data(frame)
        return self.client.events_received()

    def reconnect(self, *, authenticated: bool = True) -> None:
        """Drop the link and give the same miner a fresh server session (a new socket)."""
        self.client.data_to_send()
        self.session = MinerSession(authenticated=authenticated, max_frame=self.max_frame)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class FakeClock:
    """The ``Clock`` protocol on a hand-driven time line: only :meth:`advance` moves it."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        # (loop, event): advance() may run in another thread than the app's loop (Starlette's
        # TestClient runs the app in a portal thread), where Event.set() would wake nothing.
        self._sleepers: list[tuple[asyncio.AbstractEventLoop, anyio.Event]] = []

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every ``wait_until`` so it re-checks its deadline."""
        if seconds < 0:
            raise ValueError("time never goes backwards")
        self._now += seconds
        sleepers, self._sleepers = self._sleepers, []
        for loop, event in sleepers:
            if _running_loop() is loop:
                event.set()
            else:
                loop.call_soon_threadsafe(event.set)

    async def wait_until(self, deadline: float | None, wake: anyio.Event) -> None:
        await anyio.lowlevel.checkpoint()
        while not wake.is_set() and (deadline is None or self._now < deadline):
            moved = anyio.Event()
            self._sleepers.append((asyncio.get_running_loop(), moved))
            async with anyio.create_task_group() as tg:

                async def first(event: anyio.Event) -> None:
                    await event.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(first, wake)
                tg.start_soon(first, moved)


class RecordingStore(InMemoryJobStore):
    """``InMemoryJobStore`` that records every batch and can hold commits and reads at a gate.

    While commits are blocked, a batch handed to :meth:`commit` waits at the gate and nothing
    of it is stored yet; :meth:`release_commits` lets it (and every later one) through.
    """

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[WriteBatch] = []
        self.waiting = 0
        self._commit_gate: anyio.Event | None = None
        self._read_gate: anyio.Event | None = None
        self._lookup_gate: anyio.Event | None = None
        self.lookups: list[set[tuple[str, str]]] = []  # the keys of each idempotency lookup
        self._snapshot_first = True
        self._store_first = False

    def block_commits(self, *, stored: bool = False) -> None:
        """``stored``: store each batch (readable at once) before it waits at the gate, as a
        commit that a read on another connection sees before the writer is resumed."""
        self._commit_gate = anyio.Event()
        self._store_first = stored

    def release_commits(self) -> None:
        gate, self._commit_gate = self._commit_gate, None
        if gate is not None:
            gate.set()

    def block_reads(self, *, snapshot_first: bool = True) -> None:
        """Hold ``events_after``; ``snapshot_first``: read the log before waiting, not after."""
        self._read_gate = anyio.Event()
        self._snapshot_first = snapshot_first

    def release_reads(self) -> None:
        gate, self._read_gate = self._read_gate, None
        if gate is not None:
            gate.set()

    def block_lookups(self) -> None:
        """Hold idempotency-key lookups (``find_job``, ``find_jobs``) until released."""
        self._lookup_gate = anyio.Event()

    def release_lookups(self) -> None:
        gate, self._lookup_gate = self._lookup_gate, None
        if gate is not None:
            gate.set()

    async def find_job(self, client_id: str, idempotency_key: str) -> JobRecord | None:
        found = await self.find_jobs([(client_id, idempotency_key)])
        return found.get((client_id, idempotency_key))

    async def find_jobs(
        self, keys: Collection[tuple[str, str]]
    ) -> dict[tuple[str, str], JobRecord]:
        self.lookups.append(set(keys))
        gate = self._lookup_gate
        if gate is not None:
            await gate.wait()
        return await super().find_jobs(keys)

    async def commit(self, batch: WriteBatch) -> None:
        self.batches.append(batch)
        gate = self._commit_gate
        stored = gate is not None and self._store_first
        if stored:
            await super().commit(batch)
        if gate is not None:
            self.waiting += 1
            try:
                await gate.wait()
            finally:
                self.waiting -= 1
        if not stored:
            await super().commit(batch)

    async def events_after(self, job_id: str, after: int, limit: int = 10_000) -> list[EventRecord]:
        gate = self._read_gate
        if gate is None:
            return await super().events_after(job_id, after, limit)
        if self._snapshot_first:
            events = await super().events_after(job_id, after, limit)
            await gate.wait()
            return events
        await gate.wait()
        return await super().events_after(job_id, after, limit)


class FailingStore(RecordingStore):
    """Once ``fail`` is set, every commit stores its batch and then raises (a lost connection)."""

    fail = False

    async def commit(self, batch: WriteBatch) -> None:
        await super().commit(batch)
        if self.fail:
            raise StorageError("connection lost")


class FakeMinerSink:
    """A miner connection as the runtime sees it (``MinerSink``): it records what it is sent."""

    def __init__(self, name: str = "miner", log: list[tuple[str, Any]] | None = None) -> None:
        self.name = name
        self.log: list[tuple[str, Any]] = [] if log is None else log
        self.frames: list[JSONObject] = []
        self.closed: tuple[int, str] | None = None
        self.flushed = 0  # how many of ``frames`` a ``flush`` had written out

    def send_frame(self, frame: str) -> None:
        msg = json.loads(frame)
        self.frames.append(msg)
        self.log.append((self.name, msg))

    def flush(self) -> None:
        self.flushed = len(self.frames)

    def close(self, code: CloseCode, reason: str) -> None:
        self.closed = (int(code), reason)
        self.log.append((self.name, {"closed": int(code)}))

    def of_type(self, msg_type: str) -> list[JSONObject]:
        return [f for f in self.frames if f["type"] == msg_type]


class RecordingOutbox(Outbox):
    """An ``Outbox`` that also logs every frame put into it (decoded) to a shared log."""

    def __init__(
        self, log: list[tuple[str, Any]] | None = None, *, name: str = "outbox", **limits: int
    ) -> None:
        self.overflows: list[tuple[int, str]] = []
        super().__init__(lambda code, reason: self.overflows.append((int(code), reason)), **limits)
        self.name = name
        self.log: list[tuple[str, Any]] = [] if log is None else log

    def put(
        self, frame: str, *, job_id: str | None = None, progress: bool = False, seq: int = 0
    ) -> None:
        self.log.append((self.name, json.loads(frame)))
        super().put(frame, job_id=job_id, progress=progress, seq=seq)

    def events(self) -> list[tuple[str, int, str]]:
        """(job_id, seq, event) of every queued frame, taking them out of the outbox."""
        return [
            (f["job_id"], f["seq"], f["event"])
            for f in map(json.loads, self.take_nowait())
            if f["type"] == "job.event"
        ]
