"""``Dispatcher``: group commit, durability before visibility, timers, subscribe replay."""

from __future__ import annotations

import json
import uuid
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import pytest

from dispatcher.core import JobSpec, ResumeInfo, Scheduler, SchedulerConfig
from dispatcher.errors import (
    NotAllowed,
    NotAssigned,
    TooLarge,
    TooManyJobs,
    Unavailable,
    UnknownJob,
)
from dispatcher.fanout import Subscriber
from dispatcher.runtime import GATHER_TURNS, Dispatcher
from storage.errors import StorageError
from tests.fakes import FailingStore, FakeClock, FakeMinerSink, RecordingOutbox, RecordingStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from dispatcher.jobs import Job
    from protocol.messages import JobAssign
    from protocol.records import JobRecord
    from storage.base import JobAge

pytestmark = pytest.mark.anyio

ACCEPT_TIMEOUT = 10.0
Log = list[tuple[str, Any]]


class Harness:
    """A running ``Dispatcher`` on a ``RecordingStore`` and a ``FakeClock``, plus a shared log."""

    def __init__(self, dispatcher: Dispatcher, store: RecordingStore, clock: FakeClock) -> None:
        self.dispatcher = dispatcher
        self.store = store
        self.clock = clock
        self.log: Log = []

    def spec(self, client_id: str = "c1", **kw: Any) -> JobSpec:
        fields: dict[str, Any] = {"payload": {"prompt": "hi"}, "constraints": {}}
        fields.update(kw)
        return JobSpec(job_id=uuid.uuid4().hex, client_id=client_id, **fields)

    async def submit(self, spec: JobSpec) -> None:
        def then(job: Job, existed: bool) -> None:
            self.log.append(("then", (job.job_id, existed)))

        with anyio.fail_after(5):
            await self.dispatcher.submit(spec, then)

    def miner(
        self, miner_id: str = "gpu-1", *, concurrency: int = 1, key_hash: str = "k" * 64
    ) -> FakeMinerSink:
        sink = FakeMinerSink(miner_id, self.log)

        def welcome(info: ResumeInfo) -> None:
            self.log.append(("welcome", miner_id))

        self.dispatcher.miner_hello(
            miner_id=miner_id,
            key_hash=key_hash,
            session_id=f"{miner_id}-session",
            sink=sink,
            capabilities={},
            concurrency=concurrency,
            region=None,
            resume_session=None,
            then=welcome,
        )
        return sink

    async def miner_later(self, miner_id: str) -> None:
        """``miner`` from a task of its own: the hello happens when that task runs."""
        self.miner(miner_id)

    def subscriber(self, client_id: str = "c1") -> Subscriber:
        return Subscriber(client_id, RecordingOutbox(self.log))

    async def settle(self) -> None:
        with anyio.fail_after(5):
            await anyio.wait_all_tasks_blocked()

    async def flushed(self) -> None:
        with anyio.fail_after(5):
            await self.dispatcher.wait_flushed()
        await self.settle()

    def entries(self, name: str) -> list[Any]:
        return [what for who, what in self.log if who == name]


@asynccontextmanager
async def running(
    store: RecordingStore | None = None, *, retention: float | None = None, **config: Any
) -> AsyncIterator[Harness]:
    store = RecordingStore() if store is None else store
    clock = FakeClock()
    scheduler = Scheduler(SchedulerConfig(accept_timeout=ACCEPT_TIMEOUT, **config))
    dispatcher = Dispatcher(store, scheduler, clock)
    dispatcher.retention = retention
    dispatcher.retention_pause, dispatcher.retention_rest = 0.0, 0.02  # real seconds
    with anyio.fail_after(10):
        await store.open()
        await dispatcher.restore()
        async with anyio.create_task_group() as tg:
            await tg.start(dispatcher.serve)
            h = Harness(dispatcher, store, clock)
            try:
                yield h
            finally:
                store.release_commits()
                store.release_reads()
                dispatcher.stop()


def events(outbox: Any) -> list[tuple[str, int, str]]:
    assert isinstance(outbox, RecordingOutbox)
    return outbox.events()


def stored(h: Harness, job_id: str) -> list[tuple[int, str]]:
    return [(e.seq, e.event) for e in h.store.events.get(job_id, [])]


# ---- durability before visibility ---------------------------------------------------------


async def test_nothing_is_visible_while_the_commit_is_in_flight() -> None:
    """No callback, event or assignment escapes before its batch is durable; then all, in order."""
    async with running() as h:
        sink = h.miner()
        sub = h.subscriber()
        h.dispatcher.fanout.subscribe_all(sub)
        await h.flushed()
        h.log.clear()

        h.store.block_commits()
        spec = h.spec()
        await h.submit(spec)
        await h.settle()
        assert h.store.waiting == 1
        assert h.log == []
        assert sink.frames == []
        assert len(sub.outbox) == 0
        assert spec.job_id not in h.store.jobs

        h.store.release_commits()
        await h.settle()
        assert spec.job_id in h.store.jobs
        assert [
            (who, what.get("event", what.get("type")) if isinstance(what, dict) else what)
            for who, what in h.log
        ] == [
            ("gpu-1", "job.assign"),  # the miner first: it need not wait for the client's frames
            ("then", (spec.job_id, False)),
            ("outbox", "queued"),
            ("outbox", "assigned"),
        ]
        assert events(sub.outbox) == [(spec.job_id, 1, "queued"), (spec.job_id, 2, "assigned")]


async def test_a_job_too_large_to_push_to_a_miner_is_refused_before_anything_is_queued() -> None:
    """With ``max_assign_bytes`` set, a new job whose job.assign frame would be larger raises
    TooLarge and nothing is queued or written; a repeat of a job already taken is answered."""
    async with running() as h:
        h.dispatcher.max_assign_bytes = 1024
        spec = h.spec(payload={"prompt": "x" * 1000}, idempotency_key="k")
        with pytest.raises(TooLarge, match="over 1024 bytes"):
            await h.submit(spec)
        await h.flushed()
        assert (h.dispatcher.scheduler.jobs, h.store.jobs, h.log) == ({}, {}, [])
        h.dispatcher.max_assign_bytes = None
        await h.submit(spec)
        h.dispatcher.max_assign_bytes = 1024
        await h.submit(spec._replace(job_id="another"))
        await h.flushed()
        assert h.entries("then") == [(spec.job_id, False), (spec.job_id, True)]


async def test_a_client_past_its_live_job_bounds_is_refused_until_one_ends() -> None:
    """With ``max_active_jobs`` (or ``max_active_bytes``) set, a client's new job that would
    pass it raises TooManyJobs naming the setting, and nothing is queued; another client is
    not held back, and once one of the client's jobs ends it may submit again."""
    async with running() as h:
        h.dispatcher.max_active_jobs = 2
        first, second = h.spec(), h.spec()
        await h.submit(first)
        await h.submit(second)
        with pytest.raises(TooManyJobs, match=r"pass 2 jobs \(MAX_ACTIVE_JOBS_PER_CLIENT\)"):
            await h.submit(h.spec())
        await h.submit(h.spec(client_id="c2"))
        h.dispatcher.cancel("c1", first.job_id, lambda job: None)
        await h.flushed()
        await h.submit(h.spec())
        h.dispatcher.max_active_jobs = None
        h.dispatcher.max_active_bytes = 1000  # the live ones hold 0 bytes each (size unset)
        with pytest.raises(TooManyJobs, match=r"1000 bytes \(MAX_ACTIVE_BYTES_PER_CLIENT\)"):
            await h.submit(h.spec(size=1001))
        await h.flushed()
        assert len(h.dispatcher.scheduler.jobs) == 4


async def test_a_batch_that_opens_with_assigns_flushes_them_before_the_rest() -> None:
    """Unloaded, a submit's assign is written out before the client's reply and events are
    built; a batch that opens with anything else leaves every write to the end of the tick."""
    async with running() as h:
        busy, idle = h.miner("gpu-1"), h.miner("gpu-2")
        await h.flushed()
        flushed_when_replied: list[tuple[int, int]] = []

        def then(job: Job, existed: bool) -> None:
            flushed_when_replied.append((busy.flushed, idle.flushed))

        await h.dispatcher.submit(h.spec(), then)  # the batch opens with its assign
        await h.flushed()
        assert flushed_when_replied == [(1, 0)]
        assert [f["type"] for f in busy.frames] == ["job.assign"]

        h.store.block_commits()
        h.dispatcher.after_commit(lambda: h.log.append(("first", None)))
        await h.dispatcher.submit(h.spec(), then)  # same batch, after an action: not flushed
        h.store.release_commits()
        await h.flushed()
        assert flushed_when_replied[1] == (1, 0)
        assert [f["type"] for f in idle.frames] == ["job.assign"]


async def test_flush_writes_runs_once_a_batch_is_performed() -> None:
    async with running() as h:
        h.miner()
        h.dispatcher.fanout.subscribe_all(h.subscriber())
        await h.flushed()
        h.log.clear()
        h.dispatcher.flush_writes = lambda: h.log.append(("flush_writes", None))
        await h.submit(h.spec())
        await h.flushed()
        assert [who for who, _ in h.log] == ["gpu-1", "then", "outbox", "outbox", "flush_writes"]


async def test_miner_welcome_waits_for_its_batch() -> None:
    """The welcome callback of a hello runs only once the miner record is stored."""
    async with running() as h:
        h.store.block_commits()
        h.miner("gpu-9")
        await h.settle()
        assert h.log == []
        assert "gpu-9" not in h.store.miners
        h.store.release_commits()
        await h.settle()
        assert h.log == [("welcome", "gpu-9")]
        assert h.store.miners["gpu-9"].key_hash == "k" * 64


async def test_after_commit_runs_after_the_batch_in_flight() -> None:
    """``after_commit`` waits for everything queued before it, even with nothing to write."""
    async with running() as h:
        h.store.block_commits()
        spec = h.spec()
        await h.submit(spec)
        await h.settle()
        h.dispatcher.after_commit(lambda: h.log.append(("after", None)))
        await h.settle()
        assert h.log == []
        h.store.release_commits()
        await h.settle()
        assert h.log == [("then", (spec.job_id, False)), ("after", None)]


async def test_servable_counts_a_miner_once_its_hello_is_committed() -> None:
    """``is_servable`` (the JobView's ``servable``) counted a miner whose hello was still being
    committed; it looks at the miner classes as last committed, and a batch's acks see those
    of the batch itself."""
    async with running() as h:
        assert not h.dispatcher.is_servable({})
        h.store.block_commits()
        h.miner()
        await h.settle()
        assert h.dispatcher.scheduler.is_servable({})  # the scheduler is ahead of the store
        assert not h.dispatcher.is_servable({})
        seen: list[bool] = []
        h.dispatcher.after_commit(lambda: seen.append(h.dispatcher.is_servable({})))
        h.store.release_commits()
        await h.flushed()
        assert seen == [True]
        assert h.dispatcher.is_servable({})


async def test_a_failed_commit_never_performs_its_actions() -> None:
    """A batch whose commit raises is never made visible (the writer stops with the error)."""
    store = RecordingStore()  # never opened: its commit raises StorageError
    dispatcher = Dispatcher(store, Scheduler(SchedulerConfig()), FakeClock())
    seen: list[str] = []

    async def serve_one_submit() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(dispatcher.serve)
            await dispatcher.submit(
                JobSpec(job_id="j1", client_id="c1", payload={}, constraints={}),
                lambda job, existed: seen.append(job.job_id),
            )

    with anyio.fail_after(5), pytest.raises(ExceptionGroup) as info:
        await serve_one_submit()
    assert info.group_contains(StorageError, match="closed")
    assert seen == []


async def test_a_failed_commit_answers_every_waiting_caller_at_once() -> None:
    """Callers waiting for their commit (a REST submit, a miner's result) get ``Unavailable``
    when the writer stops on a failed commit, instead of waiting for the process to shut down;
    later calls are refused the same way."""
    store = RecordingStore()  # never opened: its commit raises StorageError
    dispatcher = Dispatcher(store, Scheduler(SchedulerConfig()), FakeClock())
    answers: list[str] = []

    async def submit_and_wait(job_id: str) -> None:
        try:
            await dispatcher.submit_wait(
                JobSpec(job_id=job_id, client_id="c1", payload={}, constraints={})
            )
        except Unavailable as exc:
            answers.append(f"{job_id}: {exc}")

    async def two_waiting_then_serve() -> None:
        async with anyio.create_task_group() as outer:
            outer.start_soon(submit_and_wait, "j1")
            outer.start_soon(submit_and_wait, "j2")
            await anyio.wait_all_tasks_blocked()
            await dispatcher.serve()

    with anyio.fail_after(5), pytest.raises(ExceptionGroup):
        await two_waiting_then_serve()
    assert sorted(answers) == [
        "j1: the coordinator is stopping: a commit failed",
        "j2: the coordinator is stopping: a commit failed",
    ]
    with pytest.raises(Unavailable):
        await dispatcher.submit_wait(
            JobSpec(job_id="j3", client_id="c1", payload={}, constraints={})
        )


# ---- group commit -------------------------------------------------------------------------


async def test_submits_during_a_commit_share_the_next_batch() -> None:
    """Everything queued while a commit is in flight lands in ONE next batch."""
    async with running() as h:
        await h.flushed()
        before = len(h.store.batches)
        h.store.block_commits()
        first = h.spec()
        await h.submit(first)
        await h.settle()
        assert len(h.store.batches) == before + 1

        rest = [h.spec() for _ in range(5)]
        for spec in rest:
            await h.submit(spec)
        await h.settle()
        assert len(h.store.batches) == before + 1  # nothing else was handed to the store
        assert h.entries("then") == []

        h.store.release_commits()
        await h.flushed()
        assert len(h.store.batches) == before + 2
        assert list(h.store.batches[-2].jobs) == [first.job_id]
        assert list(h.store.batches[-1].jobs) == [s.job_id for s in rest]
        assert len(h.store.batches[-1].events) == 5
        assert h.entries("then") == [(s.job_id, False) for s in [first, *rest]]
        stats = h.dispatcher.statistics()
        assert stats.last_batch_size == 10
        assert stats.pending_writes == 0


async def test_work_runnable_when_the_writer_wakes_joins_its_batch() -> None:
    """The woken writer gives runnable work a loop turn to join the batch before it commits.

    A burst of hellos otherwise committed one by one (docs/performance.md, handshakes)."""
    async with running() as h:
        await h.flushed()
        before = len(h.store.batches)

        h.miner("gpu-1")  # wakes the writer; the task below is only runnable so far
        async with anyio.create_task_group() as tg:
            tg.start_soon(h.miner_later, "gpu-2")
        await h.flushed()
        assert [list(b.miners) for b in h.store.batches[before:]] == [["gpu-1", "gpu-2"]]
        assert h.entries("welcome") == ["gpu-1", "gpu-2"]


async def test_a_batch_that_assigns_a_job_is_committed_without_gathering() -> None:
    """New work for a miner is not held back for other runnable work (unloaded latency)."""
    async with running() as h:
        h.miner("gpu-1")
        await h.flushed()
        before = len(h.store.batches)

        spec = h.spec()
        h.dispatcher.submit_now(spec, lambda job, existed: None)  # assigned to gpu-1 at once
        async with anyio.create_task_group() as tg:
            tg.start_soon(h.miner_later, "gpu-2")  # runnable only after the writer woke
        await h.flushed()
        batches = h.store.batches[before:]
        assert [list(b.jobs) for b in batches] == [[spec.job_id], []]
        assert [list(b.miners) for b in batches] == [[], ["gpu-2"]]
        assert [f["type"] for f in h.entries("gpu-1")] == ["job.assign"]


async def test_the_writer_gathers_for_at_most_gather_turns() -> None:
    """Work that keeps coming does not hold the commit back longer than GATHER_TURNS turns."""
    async with running() as h:
        await h.flushed()
        before = len(h.store.batches)

        async def a_hello_each_turn() -> None:
            for i in range(2, 12):
                h.miner(f"gpu-{i}")
                await anyio.lowlevel.checkpoint()

        h.miner("gpu-1")
        async with anyio.create_task_group() as tg:
            tg.start_soon(a_hello_each_turn)
        await h.flushed()
        batches = [list(b.miners) for b in h.store.batches[before:]]
        assert batches[0] == [f"gpu-{i}" for i in range(1, GATHER_TURNS + 2)]
        assert [m for batch in batches for m in batch] == [f"gpu-{i}" for i in range(1, 12)]


async def test_idempotent_submit_returns_the_same_job() -> None:
    """A repeated idempotency key answers with the first job and writes nothing new."""
    async with running() as h:
        first = h.spec(idempotency_key="k1")
        await h.submit(first)
        await h.flushed()
        batches = len(h.store.batches)
        await h.submit(h.spec(idempotency_key="k1"))
        await h.flushed()
        assert h.entries("then") == [(first.job_id, False), (first.job_id, True)]
        assert len(h.store.batches) == batches
        assert list(h.store.jobs) == [first.job_id]


async def test_a_repeated_submit_answers_the_state_its_answer_follows() -> None:
    """A repeat of a job whose end is being committed answers with the ended job, as it is
    once the answer goes out: it answered with the job as last published (RUNNING), after that
    end was published, so the client's socket followed a job that would send nothing more and
    never learnt that it had ended."""
    async with running() as h:
        h.miner()
        first = h.spec(idempotency_key="k1")
        await h.submit(first)
        await h.flushed()
        h.store.block_commits()
        h.dispatcher.miner_call("accept", "gpu-1", first.job_id)
        h.dispatcher.miner_result("gpu-1", first.job_id, {"text": "ok"}, {}, None, lambda j: None)
        await h.settle()
        assert h.store.waiting == 1  # the end is being committed
        answers: list[tuple[str, str, bool]] = []
        with anyio.fail_after(5):
            await h.dispatcher.submit(
                h.spec(idempotency_key="k1"),
                lambda rec, existed: answers.append((rec.job_id, rec.state, existed)),
            )
        h.store.release_commits()
        await h.flushed()
        assert answers == [(first.job_id, "COMPLETED", True)]


async def test_idempotent_submit_finds_a_job_only_the_store_remembers() -> None:
    """After a restart a finished job's key is found in the store and answered as a duplicate."""
    async with running() as h:
        first = h.spec(idempotency_key="k1")
        await h.submit(first)
        await h.flushed()
        h.dispatcher.cancel("c1", first.job_id, lambda job: None)
        await h.flushed()
    store = h.store
    async with running(store) as h2:  # a fresh scheduler: terminal jobs are not restored
        assert h2.dispatcher.scheduler.job(first.job_id) is None
        batches = len(store.batches)
        await h2.submit(h2.spec(idempotency_key="k1"))
        await h2.flushed()
        assert h2.entries("then") == [(first.job_id, True)]
        assert len(store.batches) == batches
        assert list(store.jobs) == [first.job_id]


async def test_ended_jobs_past_the_byte_budget_are_read_from_the_store() -> None:
    """Ended jobs the scheduler lets go for its byte budget leave the published records with
    them (one retention bounds both), and each read falls back to the store: a duplicate
    submit is answered with the job, a late result finds no job in memory (the adapters then
    answer from ``stored_receipt``), a read gets the job as stored, result included."""
    async with running(terminal_retention_bytes=1000) as h:
        h.miner(concurrency=3)
        d = h.dispatcher

        async def run(n: int, *, held: bool = False) -> list[str]:
            """``n`` jobs ended with 800 bytes each; ``held``: their ends in one batch."""
            specs = [h.spec(idempotency_key=uuid.uuid4().hex, size=100) for _ in range(n)]
            for spec in specs:
                await h.submit(spec)
                await h.flushed()
                d.miner_call("accept", "gpu-1", spec.job_id)
                await h.flushed()
            if held:  # the scheduler lets jobs go before their ends are published
                h.store.block_commits()
            for spec in specs:
                result = {"image": "x" * 600}
                d.miner_result("gpu-1", spec.job_id, result, {}, None, lambda r: None, size=700)
            h.store.release_commits()
            await h.flushed()
            return [spec.job_id for spec in specs]

        first, _, last = await run(3)
        assert set(d._visible) == set(d.scheduler.jobs) == {last}
        rec = await d.get_job(first)
        assert rec is not None
        assert (rec.state, rec.result) == ("COMPLETED", {"image": "x" * 600})
        key = h.store.jobs[first].idempotency_key
        await h.submit(h.spec(idempotency_key=key))
        await h.flushed()
        assert h.entries("then")[-1] == (first, True)
        with pytest.raises(UnknownJob):
            d.miner_result("gpu-1", first, {"image": "late"}, {}, None, lambda r: None)
        assert await d.stored_receipt("gpu-1", first) is None  # no signer here: no receipt
        *_, newest = await run(2, held=True)
        assert set(d._visible) == set(d.scheduler.jobs) == {newest}


# ---- timers -------------------------------------------------------------------------------


async def test_accept_timeout_fires_when_the_clock_passes_it() -> None:
    """An unaccepted assignment is revoked and requeued once time reaches the accept deadline."""
    async with running() as h:
        sink = h.miner()
        spec = h.spec()
        await h.submit(spec)
        await h.flushed()
        assert [f["job_id"] for f in sink.of_type("job.assign")] == [spec.job_id]

        h.clock.advance(ACCEPT_TIMEOUT - 0.5)
        await h.flushed()
        assert sink.of_type("job.cancel") == []
        assert stored(h, spec.job_id) == [(1, "queued"), (2, "assigned")]

        h.clock.advance(0.5)
        await h.flushed()
        assert [(f["job_id"], f["reason"]) for f in sink.of_type("job.cancel")] == [
            (spec.job_id, "accept timeout")
        ]
        assert stored(h, spec.job_id) == [(1, "queued"), (2, "assigned"), (3, "requeued")]
        assert h.store.jobs[spec.job_id].state == "QUEUED"


async def test_accepted_job_is_not_revoked_by_the_accept_timer() -> None:
    """An accept before the deadline disarms the accept timeout."""
    async with running() as h:
        sink = h.miner()
        spec = h.spec()
        await h.submit(spec)
        await h.flushed()
        h.dispatcher.miner_call("accept", "gpu-1", spec.job_id)
        await h.flushed()
        h.clock.advance(ACCEPT_TIMEOUT * 3)
        await h.flushed()
        assert sink.of_type("job.cancel") == []
        assert stored(h, spec.job_id) == [(1, "queued"), (2, "assigned"), (3, "started")]


async def test_expiry_fires_through_the_clock() -> None:
    """A queued job expires when the clock reaches its TTL, not before."""
    async with running() as h:
        spec = h.spec(ttl_seconds=5)
        await h.submit(spec)
        await h.flushed()
        h.clock.advance(4.9)
        await h.flushed()
        assert stored(h, spec.job_id) == [(1, "queued")]
        h.clock.advance(0.1)
        await h.flushed()
        assert stored(h, spec.job_id) == [(1, "queued"), (2, "expired")]
        assert h.store.jobs[spec.job_id].state == "EXPIRED"


async def test_an_earlier_deadline_rearms_a_sleeping_timer() -> None:
    """A new deadline before the one the timer sleeps on wakes the timer loop."""
    async with running() as h:
        late, early = h.spec(ttl_seconds=100), h.spec(ttl_seconds=5)
        await h.submit(late)
        await h.flushed()
        await h.submit(early)
        await h.flushed()
        h.clock.advance(5)
        await h.flushed()
        assert stored(h, early.job_id)[-1] == (2, "expired")
        assert stored(h, late.job_id) == [(1, "queued")]
        h.clock.advance(95)
        await h.flushed()
        assert stored(h, late.job_id)[-1] == (2, "expired")


async def test_a_result_after_the_ttl_is_refused_before_the_timer_loop_runs() -> None:
    """A result that arrives once the job's TTL has passed, before the timer loop woke, is
    refused ``not_assigned`` and the job ends EXPIRED: the result was taken (COMPLETED, a
    receipt) when the call came before the timer loop's turn."""
    async with running() as h:
        sink = h.miner()
        spec = h.spec(ttl_seconds=5)
        await h.submit(spec)
        await h.flushed()
        h.dispatcher.miner_call("accept", "gpu-1", spec.job_id)
        await h.flushed()

        h.clock.advance(5)  # no await from here on: the timer loop has not run
        with pytest.raises(NotAssigned):
            h.dispatcher.miner_result("gpu-1", spec.job_id, {"ok": 1}, {}, None, lambda r: None)
        await h.flushed()
        assert stored(h, spec.job_id) == [
            (1, "queued"),
            (2, "assigned"),
            (3, "started"),
            (4, "expired"),
        ]
        assert h.store.jobs[spec.job_id].state == "EXPIRED"
        assert [(f["job_id"], f["reason"]) for f in sink.of_type("job.cancel")] == [
            (spec.job_id, "expired")
        ]


async def test_an_expired_job_is_not_pushed_to_a_miner_freed_before_the_timer_loop_runs() -> None:
    """A queued job whose TTL has passed is not pushed to a miner whose slot frees before the
    timer loop woke (its result taken at that moment): the job ends EXPIRED, never assigned."""
    async with running() as h:
        sink = h.miner()
        busy, waiting = h.spec(), h.spec(ttl_seconds=5)
        await h.submit(busy)
        await h.submit(waiting)
        await h.flushed()
        h.dispatcher.miner_call("accept", "gpu-1", busy.job_id)
        await h.flushed()

        h.clock.advance(5)  # no await from here on: the timer loop has not run
        h.dispatcher.miner_result("gpu-1", busy.job_id, {"ok": 1}, {}, None, lambda r: None)
        await h.flushed()
        assert [f["job_id"] for f in sink.of_type("job.assign")] == [busy.job_id]
        assert stored(h, waiting.job_id) == [(1, "queued"), (2, "expired")]
        assert h.store.jobs[busy.job_id].state == "COMPLETED"


async def test_a_repeated_key_is_answered_with_its_job_when_due_timers_let_it_go() -> None:
    """A submit repeating a key is answered with that job even when the timers it fires first
    end another job and so let the key's job go from memory (``terminal_retention``): it made
    a second job with the same key."""
    async with running(terminal_retention=1) as h:
        first = h.spec(idempotency_key="k1")
        await h.submit(first)
        await h.flushed()
        h.dispatcher.cancel("c1", first.job_id, lambda r: None)
        expiring = h.spec(ttl_seconds=5)
        await h.submit(expiring)
        await h.flushed()

        h.clock.advance(5)  # no await until the submit is queued: the timer loop has not run
        queued = h.dispatcher.submit_soon(
            h.spec(idempotency_key="k1"),
            lambda rec, existed: h.log.append(("answer", (rec.job_id, rec.state, existed))),
            lambda exc: h.log.append(("refused", exc)),
        )
        assert queued
        await h.flushed()
        assert h.entries("answer") == [(first.job_id, "CANCELED", True)]
        assert stored(h, expiring.job_id)[-1] == (2, "expired")
        assert sorted(h.store.jobs) == sorted([first.job_id, expiring.job_id])


# ---- subscribe ----------------------------------------------------------------------------


async def _job_with_two_events(h: Harness) -> JobSpec:
    h.miner()
    spec = h.spec()
    await h.submit(spec)
    await h.flushed()
    assert stored(h, spec.job_id) == [(1, "queued"), (2, "assigned")]
    return spec


@pytest.mark.parametrize("snapshot_first", [True, False], ids=["read-early", "read-late"])
async def test_subscribe_replays_then_merges_live_events_exactly_once(snapshot_first: bool) -> None:
    """Events committed during the replay are held back; each seq arrives once, in order."""
    async with running() as h:
        spec = await _job_with_two_events(h)
        job_id = spec.job_id
        sub = h.subscriber()
        h.store.block_reads(snapshot_first=snapshot_first)
        missing: list[list[str]] = []

        async def subscribe() -> None:
            missing.append(await h.dispatcher.subscribe(sub, [job_id], {}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(subscribe)
            await h.settle()
            h.dispatcher.miner_call("accept", "gpu-1", job_id)
            h.dispatcher.miner_call("progress", "gpu-1", job_id, progress=0.5)
            await h.flushed()
            assert stored(h, job_id)[-2:] == [(3, "started"), (4, "progress")]
            assert len(sub.outbox) == 0  # held back while the replay is in flight
            h.store.release_reads()
        assert missing == [[]]
        assert events(sub.outbox) == [
            (job_id, 1, "queued"),
            (job_id, 2, "assigned"),
            (job_id, 3, "started"),
            (job_id, 4, "progress"),
        ]

        h.dispatcher.miner_result("gpu-1", job_id, {"text": "ok"}, {}, None, lambda job: None)
        await h.flushed()
        assert events(sub.outbox) == [(job_id, 5, "completed")]
        assert job_id not in sub.job_ids  # a terminal event ends the live subscription


@pytest.mark.parametrize(
    ("ends", "follow_all"),
    [(False, False), (True, False), (True, True)],
    ids=["started", "completed", "completed-under-all"],
)
async def test_an_event_replayed_before_it_is_published_is_delivered_once(
    ends: bool, follow_all: bool
) -> None:
    """A replay can read events whose commit is done but not yet performed (a read on another
    connection sees them before the writer is resumed); published after the replay, they
    reached the socket a second time."""
    async with running() as h:
        spec = await _job_with_two_events(h)
        job_id = spec.job_id
        h.store.block_commits(stored=True)
        h.dispatcher.miner_call("accept", "gpu-1", job_id)
        if ends:
            h.dispatcher.miner_result("gpu-1", job_id, {"text": "ok"}, {}, None, lambda job: None)
        await h.settle()
        assert h.store.waiting == 1  # stored, not yet published
        sub = h.subscriber()
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(h.dispatcher.subscribe, sub, [job_id], {}, follow_all=follow_all))
            await h.settle()
            h.store.release_commits()
        await h.flushed()
        tail = [(3, "started"), (4, "completed")] if ends else [(3, "started")]
        assert events(sub.outbox) == [(job_id, 1, "queued"), (job_id, 2, "assigned")] + [
            (job_id, seq, kind) for seq, kind in tail
        ]
        assert sub.job_ids == (set() if ends else {job_id})


async def test_a_replay_waiting_for_a_batch_whose_commit_fails_ends() -> None:
    """The replay that waits for the batch in flight to be published is let go, refused
    ``Unavailable``, when that commit fails (the writer stops and never publishes it)."""
    store = FailingStore()
    await store.open()
    dispatcher = Dispatcher(store, Scheduler(SchedulerConfig()), FakeClock())
    spec = JobSpec(job_id="j1", client_id="c1", payload={}, constraints={})
    sub = Subscriber("c1", RecordingOutbox())
    refused: list[str] = []

    async def serve() -> None:
        with pytest.raises(ExceptionGroup):
            await dispatcher.serve()

    async def subscribe() -> None:
        with pytest.raises(Unavailable) as caught:
            await dispatcher.subscribe(sub, ["j1"], {})
        refused.append(str(caught.value))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            await anyio.wait_all_tasks_blocked()
            dispatcher.submit_now(spec, lambda rec, existed: None)
            await dispatcher.wait_flushed()
            store.block_commits(stored=True)
            store.fail = True
            dispatcher.cancel("c1", "j1", lambda rec: None)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(subscribe)
            await anyio.wait_all_tasks_blocked()
            store.release_commits()
    assert refused == ["the coordinator is stopping: a commit failed"]
    assert events(sub.outbox) == [("j1", 1, "queued"), ("j1", 2, "canceled")]


async def test_a_call_after_a_failed_commit_is_refused_at_once() -> None:
    """A REST miner's result that arrives once the writer has stopped on a failed commit is
    answered ``Unavailable`` at once (it waited for a commit that never came, until the
    process went down)."""
    store = FailingStore()
    await store.open()
    dispatcher = Dispatcher(store, Scheduler(SchedulerConfig()), FakeClock())

    def spec(job_id: str) -> JobSpec:
        return JobSpec(job_id=job_id, client_id="c1", payload={}, constraints={})

    async def serve() -> None:
        with pytest.raises(ExceptionGroup):
            await dispatcher.serve()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            await dispatcher.rest_register(
                miner_id="m1", key_hash="k" * 64, capabilities={}, concurrency=1, region=None
            )
            await dispatcher.submit_wait(spec("j1"))
            polled = await dispatcher.rest_poll("m1", 0)
            assert polled is not None
            store.fail = True
            with pytest.raises(Unavailable):
                await dispatcher.submit_wait(spec("j2"))
        with pytest.raises(Unavailable):
            await dispatcher.rest_result("m1", "j1", {}, {})


async def test_subscribe_after_skips_what_the_client_has() -> None:
    """``after`` replays only newer events, then live events follow."""
    async with running() as h:
        spec = await _job_with_two_events(h)
        sub = h.subscriber()
        with anyio.fail_after(5):
            assert await h.dispatcher.subscribe(sub, [spec.job_id], {spec.job_id: 1}) == []
        assert events(sub.outbox) == [(spec.job_id, 2, "assigned")]
        h.dispatcher.miner_call("accept", "gpu-1", spec.job_id)
        await h.flushed()
        assert events(sub.outbox) == [(spec.job_id, 3, "started")]


async def test_an_after_past_the_jobs_log_is_reported_and_taken_as_its_last_event() -> None:
    """A client reconnecting with an ``after`` past the job's stored log (it saw events this
    store no longer has: a power cut with SQLITE_SYNCHRONOUS=NORMAL, a failover to a replica
    behind) got a plain ack, and the live events whose seq it named were delivered or dropped
    by timing (dropped while held during the replay, sent once it was done). The answer names
    the job with its last stored seq, and every event after that seq follows."""
    async with running() as h:
        spec = await _job_with_two_events(h)
        job_id = spec.job_id
        sub = h.subscriber()
        answers: list[tuple[list[str], dict[str, int]]] = []

        def answer(missing: list[str], behind: dict[str, int]) -> None:
            answers.append((missing, behind))

        h.store.block_reads(snapshot_first=True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                partial(h.dispatcher.subscribe, sub, [job_id], {job_id: 5}, answer=answer)
            )
            await h.settle()
            h.dispatcher.miner_call("accept", "gpu-1", job_id)  # seq 3, held during the replay
            await h.flushed()
            h.store.release_reads()
        h.dispatcher.miner_call("progress", "gpu-1", job_id, progress=0.5)  # seq 4, live
        await h.flushed()
        assert answers == [([], {job_id: 2})]
        assert events(sub.outbox) == [(job_id, 3, "started"), (job_id, 4, "progress")]


async def _canceled_job(h: Harness) -> JobSpec:
    """A job submitted and canceled (its log: queued, canceled), committed."""
    spec = h.spec()
    await h.submit(spec)
    await h.flushed()
    h.dispatcher.cancel("c1", spec.job_id, lambda job: None)
    await h.flushed()
    return spec


async def test_subscribe_to_a_terminal_job_replays_and_ends() -> None:
    """A finished job replays its whole log and leaves no live subscription behind."""
    async with running() as h:
        spec = await _canceled_job(h)
        sub = h.subscriber()
        with anyio.fail_after(5):
            assert await h.dispatcher.subscribe(sub, [spec.job_id], {}) == []
        assert events(sub.outbox) == [(spec.job_id, 1, "queued"), (spec.job_id, 2, "canceled")]
        assert sub.job_ids == set()
        assert h.dispatcher.fanout.subscriber_count == 0


async def test_a_terminal_job_replayed_while_following_all_is_not_kept_muted() -> None:
    """Ending the subscription of a replayed terminal job mutes nothing while following "all":
    no event can follow (each such job was kept in the socket's muted set for its life)."""
    async with running() as h:
        spec = await _canceled_job(h)
        sub = h.subscriber()
        h.dispatcher.fanout.subscribe_all(sub)
        with anyio.fail_after(5):
            await h.dispatcher.subscribe(sub, [spec.job_id], {spec.job_id: 0})
        assert events(sub.outbox) == [(spec.job_id, 1, "queued"), (spec.job_id, 2, "canceled")]
        assert (sub.job_ids, sub.muted) == (set(), set())


async def test_subscribe_reports_unknown_and_foreign_jobs() -> None:
    """Jobs that do not exist or belong to another client are returned as missing."""
    async with running() as h:
        spec = h.spec(client_id="c2")
        await h.submit(spec)
        await h.flushed()
        sub = h.subscriber("c1")
        with anyio.fail_after(5):
            missing = await h.dispatcher.subscribe(sub, ["nope", spec.job_id], {})
        assert missing == ["nope", spec.job_id]
        assert len(sub.outbox) == 0


@pytest.mark.parametrize("follow_all", [True, False], ids=["all", "named-under-all"])
async def test_a_job_waiting_its_turn_to_replay_holds_its_live_events(follow_all: bool) -> None:
    """While the first job replays, the second one's live events (reaching the socket through
    its "all" subscription) are held until its own replay: each seq once, in order (they went
    out at once and again in the replay)."""
    async with running() as h:
        h.miner(concurrency=2)
        first, second = h.spec(), h.spec()
        await h.submit(first)
        await h.submit(second)
        await h.flushed()
        sub = h.subscriber()
        if not follow_all:
            h.dispatcher.fanout.subscribe_all(sub)
        h.store.block_reads()
        ids = [first.job_id, second.job_id]

        async def subscribe() -> None:
            after = dict.fromkeys(ids, 0)
            if follow_all:
                await h.dispatcher.subscribe(sub, ids, after, follow_all=True)
            else:
                await h.dispatcher.subscribe(sub, ids, after)

        async with anyio.create_task_group() as tg:
            tg.start_soon(subscribe)
            await h.settle()  # the first job's replay waits for its store read
            h.dispatcher.miner_call("accept", "gpu-1", second.job_id)
            await h.flushed()
            h.store.release_reads()
        assert events(sub.outbox) == [
            (first.job_id, 1, "queued"),
            (first.job_id, 2, "assigned"),
            (second.job_id, 1, "queued"),
            (second.job_id, 2, "assigned"),
            (second.job_id, 3, "started"),
        ]


async def test_a_job_that_ends_while_waiting_its_turn_leaves_no_subscription() -> None:
    """The jobs of a subscribe are read before the first replay; one that ends while an earlier
    job replays still leaves no live subscription once its terminal event is replayed."""
    async with running() as h:
        first, second = h.spec(), h.spec()
        await h.submit(first)
        await h.submit(second)
        await h.flushed()
        sub = h.subscriber()
        h.store.block_reads()

        async def subscribe() -> None:
            await h.dispatcher.subscribe(sub, [first.job_id, second.job_id], {})

        async with anyio.create_task_group() as tg:
            tg.start_soon(subscribe)
            await h.settle()  # both jobs read; the first job's replay waits for its store read
            h.dispatcher.cancel("c1", second.job_id, lambda job: None)
            await h.flushed()
            h.store.release_reads()
        assert events(sub.outbox) == [
            (first.job_id, 1, "queued"),
            (second.job_id, 1, "queued"),
            (second.job_id, 2, "canceled"),
        ]
        assert sub.job_ids == {first.job_id}


async def test_a_job_whose_end_is_not_yet_published_is_muted_until_it_is() -> None:
    """Unsubscribing (while following "all") a job whose terminal event waits for its commit
    mutes it: that event is not delivered, and the job is then forgotten."""
    async with running() as h:
        spec = h.spec()
        await h.submit(spec)
        await h.flushed()
        sub = h.subscriber()
        h.dispatcher.fanout.subscribe_all(sub)
        h.store.block_commits()
        h.dispatcher.cancel("c1", spec.job_id, lambda job: None)
        await h.settle()
        h.dispatcher.unsubscribe(sub, [spec.job_id, "unknown"])
        assert sub.muted == {spec.job_id}
        h.store.release_commits()
        await h.flushed()
        assert events(sub.outbox) == []
        assert sub.muted == set()


async def test_a_restored_job_whose_end_is_not_yet_published_is_muted_until_it_is() -> None:
    """As above for a job restored at start-up that had no event since (nothing of it
    published yet): it was not muted, and its end reached the socket after the unsubscribe."""
    async with running() as h:
        spec = h.spec()
        await h.submit(spec)
        await h.flushed()
    async with running(h.store) as h2:
        sub = h2.subscriber()
        h2.dispatcher.fanout.subscribe_all(sub)
        h2.store.block_commits()
        h2.dispatcher.cancel("c1", spec.job_id, lambda job: None)
        await h2.settle()
        h2.dispatcher.unsubscribe(sub, [spec.job_id])
        assert sub.muted == {spec.job_id}
        h2.store.release_commits()
        await h2.flushed()
        assert events(sub.outbox) == []
        assert sub.muted == set()


async def test_resubscribing_without_after_does_not_replay_twice() -> None:
    """A second subscribe to a job already followed is a no-op."""
    async with running() as h:
        spec = h.spec()
        await h.submit(spec)
        await h.flushed()
        sub = h.subscriber()
        with anyio.fail_after(5):
            await h.dispatcher.subscribe(sub, [spec.job_id], {})
            await h.dispatcher.subscribe(sub, [spec.job_id], {})
        assert events(sub.outbox) == [(spec.job_id, 1, "queued")]


async def _followed_with_events_queued(h: Harness, *, follow_all: bool) -> tuple[Subscriber, str]:
    """A socket following a job (by name, or through "all") whose events 1-3 are queued in its
    outbox, unsent (the socket's writer has not taken them)."""
    h.miner()
    spec = h.spec()
    sub = h.subscriber()
    if follow_all:
        h.dispatcher.fanout.subscribe_all(sub)
    else:
        h.dispatcher.fanout.subscribe(sub, [spec.job_id])
    await h.submit(spec)
    h.dispatcher.miner_call("accept", "gpu-1", spec.job_id)
    await h.flushed()
    assert len(sub.outbox) == 3
    return sub, spec.job_id


@pytest.mark.parametrize(
    ("follow_all", "after", "frames"),
    [
        (False, 0, ["ack", 1, 2, 3]),
        (False, 1, [1, "ack", 2, 3]),
        (False, 3, [1, 2, 3, "ack"]),
        (True, None, ["ack", 1, 2, 3]),
        (True, 2, [1, 2, "ack", 3]),
    ],
    ids=["named-0", "named-1", "named-3", "all-no-after", "all-2"],
)
async def test_resubscribing_never_queues_an_unsent_event_twice(
    follow_all: bool, after: int | None, frames: list[int | str]
) -> None:
    """A subscribe that replays a job the socket already follows takes that job's events still
    queued unsent past ``after`` out of the outbox first: the replay carries them, in order,
    after the answer. They were queued a second time, so the client got them twice although it
    had been sent them once."""
    async with running() as h:
        sub, job_id = await _followed_with_events_queued(h, follow_all=follow_all)
        named = {} if after is None else {job_id: after}

        def answer(missing: list[str], behind: dict[str, int]) -> None:
            sub.outbox.put('{"type":"ack"}')

        with anyio.fail_after(5):
            await h.dispatcher.subscribe(sub, [job_id], named, answer=answer)
        queued = [json.loads(frame) for frame in sub.outbox.take_nowait()]
        assert [f.get("seq", f["type"]) for f in queued] == frames
        h.dispatcher.miner_call("progress", "gpu-1", job_id, progress=0.5)
        await h.flushed()
        assert events(sub.outbox) == [(job_id, 4, "progress")]


async def test_resubscribing_resends_only_what_was_sent_and_asked_for() -> None:
    """Events the socket's writer already took were sent: an ``after`` before them asks for them
    again, and they are replayed; those still queued are not queued twice."""
    async with running() as h:
        sub, job_id = await _followed_with_events_queued(h, follow_all=False)
        assert len(sub.outbox.take_nowait()) == 3  # sent: 1-3
        h.dispatcher.miner_call("progress", "gpu-1", job_id, progress=0.5)
        await h.flushed()  # 4 queued, unsent
        with anyio.fail_after(5):
            await h.dispatcher.subscribe(sub, [job_id], {job_id: 2})
        assert events(sub.outbox) == [(job_id, 3, "started"), (job_id, 4, "progress")]


async def _streamed_job(h: Harness, chunks: int) -> str:
    """A completed job with ``chunks`` progress events: ``chunks + 4`` events in all."""
    h.miner()
    spec = h.spec()
    await h.submit(spec)
    await h.flushed()
    for _ in range(chunks):
        h.dispatcher.miner_call("progress", "gpu-1", spec.job_id, output="tok ")
    h.dispatcher.miner_result("gpu-1", spec.job_id, {"text": "ok"}, {}, None, lambda job: None)
    await h.flushed()
    return spec.job_id


async def test_subscribe_replays_a_log_longer_than_one_store_read() -> None:
    """A job with more events than one ``events_after`` returns (10,000) replays them all, its
    terminal event included (the replay stopped at the 10,000th: a streamed job never ended)."""
    async with running() as h:
        job_id = await _streamed_job(h, 10_010)
        sub = Subscriber("c1", RecordingOutbox(soft_limit=100_000, hard_limit=200_000))
        with anyio.fail_after(10):
            await h.dispatcher.subscribe(sub, [job_id], {})
        seqs = [seq for _, seq, _ in events(sub.outbox)]
        assert seqs == list(range(1, 10_015))
        assert sub.job_ids == set()  # the terminal event was replayed: nothing follows it


async def test_a_long_replay_waits_for_the_socket_instead_of_overflowing() -> None:
    """Replayed frames are never dropped, so the replay waits while the outbox is full; it
    closed the socket 4429 (a full outbox) whatever the client's speed."""
    async with running() as h:
        job_id = await _streamed_job(h, 5_000)
        sub = h.subscriber()
        seqs: list[int] = []

        async def socket_writer() -> None:
            while not sub.outbox.closed:
                for frame in await sub.outbox.take():
                    seqs.append(json.loads(frame)["seq"])
                await anyio.lowlevel.checkpoint()  # a slow peer: one batch per turn

        async with anyio.create_task_group() as tg:
            tg.start_soon(socket_writer)
            with anyio.fail_after(10):
                await h.dispatcher.subscribe(sub, [job_id], {})
                while len(seqs) < 5_004 and not sub.outbox.closed:
                    await anyio.lowlevel.checkpoint()
            tg.cancel_scope.cancel()
        assert sub.outbox.overflows == []
        assert seqs == list(range(1, 5_005))


async def test_live_progress_held_while_replaying_to_a_stalled_socket_stays_bounded() -> None:
    """While a replay waits for a socket that stopped reading, the job's live progress is held
    back coalesced past the outbox's soft limit, as the outbox itself would: every frame was
    kept, so a client that stalled its replay grew the coordinator's memory by each token its
    job streamed, for as long as it kept the socket open (never 4429: the outbox stayed full
    but not over)."""
    async with running() as h:
        h.miner()
        spec = h.spec()
        await h.submit(spec)
        await h.flushed()
        job_id = spec.job_id
        h.dispatcher.miner_call("accept", "gpu-1", job_id)
        for _ in range(40):
            h.dispatcher.miner_call("progress", "gpu-1", job_id, output="tok ")
        await h.flushed()
        sub = h.subscriber()
        sub.outbox.soft_limit, sub.outbox.hard_limit = 8, 64
        async with anyio.create_task_group() as tg:
            tg.start_soon(h.dispatcher.subscribe, sub, [job_id], {})
            await h.settle()
            assert len(sub.outbox) == 4  # half the soft limit: the replay waits for the socket
            for _ in range(1000):
                h.dispatcher.miner_call("progress", "gpu-1", job_id, output="tok ")
            await h.flushed()
            held = sub.buffers[job_id]
            assert len(held) <= sub.outbox.soft_limit
            assert held[-1][0] == 1043  # the newest progress is kept
            assert sub.outbox.dropped == 1000 - len(held)
            sub.outbox.close()  # the client leaves: the replay ends
        assert sub.buffers == {}


async def test_a_replay_of_many_large_results_waits_for_the_socket_instead_of_overflowing() -> None:
    """A subscribe to many jobs that completed with large results: the replay waited for the
    socket only by the count of frames queued, so their characters passed the outbox's bound
    (4429) long before that count, however fast the client read (3 MiB completed events, with
    a 1 MiB frame limit, against 64 Mi characters: the 22nd frame queued)."""
    async with running() as h:
        h.miner(concurrency=20)
        specs = [h.spec() for _ in range(20)]
        for spec in specs:
            await h.submit(spec)
        await h.flushed()
        for spec in specs:
            result = {"text": "x" * 10_000}
            h.dispatcher.miner_result("gpu-1", spec.job_id, result, {}, None, lambda job: None)
        await h.flushed()
        sub = Subscriber("c1", RecordingOutbox(hard_chars=100_000))
        seqs: list[tuple[str, int]] = []

        async def socket_writer() -> None:
            while not sub.outbox.closed:
                for frame in await sub.outbox.take():
                    seqs.append((json.loads(frame)["job_id"], json.loads(frame)["seq"]))
                await anyio.lowlevel.checkpoint()  # a slow peer: one batch per turn

        ids = [spec.job_id for spec in specs]
        async with anyio.create_task_group() as tg:
            tg.start_soon(socket_writer)
            with anyio.fail_after(10):
                await h.dispatcher.subscribe(sub, ids, {})
                while len(seqs) < 80 and not sub.outbox.closed:
                    await anyio.lowlevel.checkpoint()
            tg.cancel_scope.cancel()
        assert sub.outbox.overflows == []
        assert seqs == [(job_id, seq) for job_id in ids for seq in (1, 2, 3, 4)]


# ---- flushing and shutdown ----------------------------------------------------------------


async def test_wait_flushed_returns_once_the_batch_is_delivered() -> None:
    """wait_flushed blocks while a commit is held and returns after its actions ran."""
    async with running() as h:
        h.store.block_commits()
        spec = h.spec()
        await h.submit(spec)
        done = anyio.Event()

        async def flush() -> None:
            await h.dispatcher.wait_flushed()
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(flush)
            await h.settle()
            assert not done.is_set()
            h.store.release_commits()
            with anyio.fail_after(5):
                await done.wait()
        assert h.entries("then") == [(spec.job_id, False)]


async def test_wait_flushed_covers_work_queued_while_it_waits() -> None:
    """Work submitted during a commit is also flushed before wait_flushed returns."""
    async with running() as h:
        h.store.block_commits()
        first, second = h.spec(), h.spec()
        await h.submit(first)
        done = anyio.Event()

        async def flush() -> None:
            await h.dispatcher.wait_flushed()
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(flush)
            await h.settle()
            await h.submit(second)
            await h.settle()
            h.store.release_commits()
            with anyio.fail_after(5):
                await done.wait()
            assert h.entries("then") == [(first.job_id, False), (second.job_id, False)]


async def test_wait_flushed_when_idle_returns_at_once() -> None:
    """With nothing pending, wait_flushed does not wait."""
    async with running() as h:
        await h.flushed()
        await h.flushed()


async def test_stop_flushes_pending_work_then_serve_returns() -> None:
    """stop() refuses new work, commits and delivers what is pending, then serve ends."""
    store = RecordingStore()
    dispatcher = Dispatcher(store, Scheduler(SchedulerConfig()), FakeClock())
    seen: list[str] = []

    def then(job: Job, existed: bool) -> None:
        seen.append(job.job_id)

    def spec(job_id: str) -> JobSpec:
        return JobSpec(job_id=job_id, client_id="c1", payload={}, constraints={})

    with anyio.fail_after(5):
        await store.open()
        async with anyio.create_task_group() as tg:
            await tg.start(dispatcher.serve)
            assert dispatcher.running
            store.block_commits()
            await dispatcher.submit(spec("a"), then)
            await anyio.wait_all_tasks_blocked()
            await dispatcher.submit(spec("b"), then)
            dispatcher.stop()
            assert not dispatcher.running
            with pytest.raises(Unavailable):
                await dispatcher.submit(spec("c"), then)
            with pytest.raises(Unavailable):
                dispatcher.cancel("c1", "a", lambda job: None)
            await anyio.wait_all_tasks_blocked()
            assert seen == []
            store.release_commits()
        # the task group only ends because serve returned
    assert seen == ["a", "b"]
    assert set(store.jobs) == {"a", "b"}


async def test_end_polls_ends_the_waiting_polls_and_refuses_new_ones_but_takes_results() -> None:
    """A shutdown (``end_polls``) ends each waiting REST long-poll at once with no job, so none
    holds the server's graceful shutdown; a poll after it is refused as after ``stop``; the
    results of jobs already handed out are still taken and committed."""
    async with running() as h:
        d = h.dispatcher
        await d.rest_register(
            miner_id="m1", key_hash="k" * 64, capabilities={}, concurrency=2, region=None
        )
        spec = h.spec()
        await d.submit_wait(spec)
        held = await d.rest_poll("m1", 0)
        assert held is not None
        answers: list[object] = []

        async def poll() -> None:
            answers.append(await d.rest_poll("m1", 60))  # the fake clock never gets there

        async with anyio.create_task_group() as tg:
            tg.start_soon(poll)
            await anyio.wait_all_tasks_blocked()
            assert answers == []
            d.end_polls()
        assert answers == [None]
        with pytest.raises(Unavailable, match="shutting down"):
            await d.rest_poll("m1", 60)
        await d.rest_result("m1", spec.job_id, {"ok": True}, {})
        assert stored(h, spec.job_id)[-1][1] == "completed"


@pytest.mark.parametrize("lean", [False, True])
async def test_a_job_taken_back_in_the_batch_that_assigned_it_to_a_poll_is_not_handed_out(
    lean: bool,
) -> None:
    """A job assigned to a waiting REST poll and canceled in the same batch is not handed to
    that poll: it answers with no job (204) at once, and the miner's next poll gets the next
    job. The poll got the canceled job, and the miner's result a 409. ``lean``: the poll's
    answer is written from the batch (``answer``), which must not be called either."""
    async with running() as h:
        d = h.dispatcher
        await d.rest_register(
            miner_id="m1", key_hash="k" * 64, capabilities={}, concurrency=1, region=None
        )
        answers: list[object] = []
        written: list[str] = []

        def answer(msg: JobAssign) -> bool:
            written.append(msg.job_id)
            return True

        async def poll() -> None:
            answers.append(await d.rest_poll("m1", 60, answer if lean else None))

        spec = h.spec()
        async with anyio.create_task_group() as tg:
            tg.start_soon(poll)
            await h.settle()
            d.submit_now(spec, lambda rec, existed: None)  # pushed to the waiting poll
            d.cancel("c1", spec.job_id, lambda rec: None)  # in the same batch
            await h.flushed()
        assert (answers, written) == ([None], [])  # the fake clock never reached 60 s
        assert [e for _, e in stored(h, spec.job_id)] == [
            "queued",
            "assigned",
            "started",
            "canceled",
        ]
        assert d.scheduler.miners["m1"].polls == 0
        following = h.spec()
        await d.submit_wait(following)
        polled = await d.rest_poll("m1", 0)
        assert polled is not None
        assert polled.job_id == following.job_id


async def test_stop_when_idle_returns_at_once() -> None:
    """An idle dispatcher stops without writing anything."""
    store = RecordingStore()
    dispatcher = Dispatcher(store, Scheduler(SchedulerConfig()), FakeClock())
    with anyio.fail_after(5):
        await store.open()
        async with anyio.create_task_group() as tg:
            await tg.start(dispatcher.serve)
            await anyio.wait_all_tasks_blocked()
            dispatcher.stop()
    assert store.batches == []


# ---- miners -------------------------------------------------------------------------------


async def test_miner_id_is_bound_to_its_first_key() -> None:
    """Another key may not act as a miner id that is already bound."""
    async with running() as h:
        h.miner("gpu-1", key_hash="a" * 64)
        await h.flushed()
        with pytest.raises(NotAllowed):
            h.miner("gpu-1", key_hash="b" * 64)


async def test_replaced_session_is_closed_after_commit() -> None:
    """A second hello for the same miner id closes the older sink with 4409."""
    async with running() as h:
        old = h.miner("gpu-1")
        await h.flushed()
        h.dispatcher.miner_hello(
            miner_id="gpu-1",
            key_hash="k" * 64,
            session_id="second",
            sink=FakeMinerSink("new", h.log),
            capabilities={},
            concurrency=1,
            region=None,
            resume_session=None,
            then=lambda info: None,
        )
        assert old.closed is None
        await h.flushed()
        assert old.closed == (4409, "replaced")


async def test_a_cancel_whose_socket_closed_before_it_went_out_is_revoked_on_resume() -> None:
    """A cancel committed while the miner's socket closed finds no socket to go to; the
    miner's resume lists the job in ``revoked`` (it was in neither list: the miner ran it on
    until its result was refused)."""
    async with running() as h:
        sink = h.miner("gpu-1", concurrency=2)
        canceled, kept = h.spec(), h.spec()
        await h.submit(canceled)
        await h.submit(kept)
        await h.flushed()
        h.dispatcher.miner_call("accept", "gpu-1", canceled.job_id)
        h.dispatcher.miner_call("accept", "gpu-1", kept.job_id)
        await h.flushed()

        h.store.block_commits()
        h.dispatcher.cancel("c1", canceled.job_id, lambda r: None)
        await h.settle()
        h.dispatcher.miner_gone("gpu-1", "gpu-1-session")  # the socket closed meanwhile
        h.store.release_commits()
        await h.flushed()
        assert sink.of_type("job.cancel") == []  # nowhere to go

        welcomes: list[ResumeInfo] = []
        h.dispatcher.miner_hello(
            miner_id="gpu-1",
            key_hash="k" * 64,
            session_id="gpu-1-again",
            sink=FakeMinerSink("again", h.log),
            capabilities={},
            concurrency=2,
            region=None,
            resume_session="gpu-1-session",
            then=welcomes.append,
        )
        await h.flushed()
        assert welcomes == [ResumeInfo(resumed=(kept.job_id,), revoked=(canceled.job_id,))]


async def test_disconnect_before_accept_requeues_to_another_miner() -> None:
    """A miner leaving before it accepted gives the job to the next idle miner."""
    async with running() as h:
        first = h.miner("gpu-1")
        spec = h.spec()
        await h.submit(spec)
        await h.flushed()
        assert first.of_type("job.assign")
        second = h.miner("gpu-2")
        await h.flushed()
        h.dispatcher.miner_gone("gpu-1", "gpu-1-session")
        await h.flushed()
        assert [f["job_id"] for f in second.of_type("job.assign")] == [spec.job_id]
        assert [e for _, e in stored(h, spec.job_id)] == [
            "queued",
            "assigned",
            "requeued",
            "assigned",
        ]


async def test_a_stored_receipt_answers_only_the_attempt_that_completed() -> None:
    """A result retried after its job left memory is answered from the store: the receipt
    for the miner and attempt that completed it, nothing for another attempt or miner."""
    async with running() as h:
        receipt = {"receipt_id": "r1", "chain_seq": 1}
        h.dispatcher.scheduler._receipt_factory = lambda job, price, now: receipt
        spec = h.spec()
        await h.submit(spec)
        h.miner("gpu-1")
        await h.flushed()
        h.dispatcher.miner_call("accept", "gpu-1", spec.job_id)
        h.dispatcher.miner_result("gpu-1", spec.job_id, {"ok": 1}, {}, None, lambda job: None)
        await h.flushed()
        with anyio.fail_after(5):
            assert await h.dispatcher.stored_receipt("gpu-1", spec.job_id) == receipt
            assert await h.dispatcher.stored_receipt("gpu-1", spec.job_id, 1) == receipt
            assert await h.dispatcher.stored_receipt("gpu-1", spec.job_id, 2) is None
            assert await h.dispatcher.stored_receipt("gpu-2", spec.job_id, 1) is None


async def test_a_refusal_during_a_shutdown_waits_for_the_last_commit() -> None:
    """``stop()`` flushes the batch in hand; a refusal decided meanwhile (a REST result for a
    job whose cancel is in that batch) went out at once, before the state it revealed was
    durable. It waits for that commit, as while running."""
    async with running() as h:
        h.store.block_commits()
        await h.dispatcher.submit(h.spec(), lambda rec, existed: None)
        await anyio.wait_all_tasks_blocked()
        h.dispatcher.stop()
        answered: list[str] = []

        async def refuse() -> None:
            await h.dispatcher.before_refusal()
            answered.append("refusal")

        async with anyio.create_task_group() as tg:
            tg.start_soon(refuse)
            await anyio.wait_all_tasks_blocked()
            assert answered == []
            assert h.store.jobs == {}
            h.store.release_commits()
        assert answered == ["refusal"]
        assert len(h.store.jobs) == 1


# ---- idempotency-key lookups (``submit_soon``) --------------------------------------------


async def test_key_lookups_are_batched_and_a_clients_submits_stay_in_order() -> None:
    """Keys not in memory are looked up in the background, all those queued meanwhile in one
    read; nothing waits for it but the submits of the clients that have one waiting, which
    are queued after it, in order; the same key twice (socket and REST alike) is one job."""
    async with running() as h:
        d = h.dispatcher
        answers: list[tuple[str, str, bool]] = []

        def then(name: str) -> Callable[[JobRecord, bool], None]:
            return lambda rec, existed: answers.append((name, rec.job_id, existed))

        def refused(exc: Exception) -> None:
            raise AssertionError(exc)

        h.store.block_lookups()
        a, again, plain = h.spec(idempotency_key="a"), h.spec(idempotency_key="a"), h.spec()
        other = h.spec("c3")
        assert not d.submit_soon(a, then("a"), refused)
        assert not d.submit_soon(h.spec("c2", idempotency_key="b"), then("b"), refused)
        assert not d.submit_soon(plain, then("plain"), refused)  # behind c1's lookup
        assert d.submit_soon(other, then("other"), refused)  # c3 waits for nothing
        async with anyio.create_task_group() as tg:
            tg.start_soon(d.submit_wait, again)  # REST, same key
            await h.flushed()
            assert answers == [("other", other.job_id, False)]
            assert h.store.lookups == [{("c1", "a"), ("c2", "b")}]
            h.store.release_lookups()
        await h.flushed()
        assert [(name, existed) for name, _, existed in answers] == [
            ("other", False),
            ("a", False),
            ("b", False),
            ("plain", False),
        ]
        assert d.scheduler.find_idempotent("c1", "a") is d.scheduler.job(a.job_id)
        assert len(h.store.jobs) == 4  # ``again`` is ``a``
        assert len(h.store.lookups) == 1  # ``again`` came during the read: then in memory


async def test_a_failed_key_lookup_refuses_only_its_submit() -> None:
    """A read that fails refuses the submits whose key it was to tell (StorageError: the
    socket answers ``unavailable``, REST 503); the client's other submits go on."""
    async with running() as h:
        d = h.dispatcher
        refusals: list[Exception] = []
        answers: list[bool] = []

        async def lost(keys: object) -> dict[tuple[str, str], JobRecord]:
            raise StorageError("connection was closed in the middle of operation")

        h.store.find_jobs = lost  # type: ignore[method-assign]
        keyed, plain = h.spec(idempotency_key="k"), h.spec()
        d.submit_soon(keyed, lambda rec, existed: answers.append(existed), refusals.append)
        d.submit_soon(plain, lambda rec, existed: answers.append(existed), refusals.append)
        await h.flushed()
        assert [str(e) for e in refusals] == ["connection was closed in the middle of operation"]
        assert answers == [False]
        assert list(h.store.jobs) == [plain.job_id]


async def test_submits_waiting_for_a_lookup_are_refused_at_shutdown() -> None:
    """Stopping while a lookup is held: each waiting submit is refused (Unavailable), none is
    left unanswered and none is queued after the last batch."""
    refusals: list[Exception] = []
    async with running() as h:
        h.store.block_lookups()
        h.dispatcher.submit_soon(
            h.spec(idempotency_key="k"), lambda rec, existed: None, refusals.append
        )
        await h.settle()
    assert [type(e) for e in refusals] == [Unavailable]
    assert h.store.jobs == {}


@pytest.mark.parametrize("during_the_read", [False, True])
async def test_a_key_whose_job_was_let_go_before_its_commit_is_still_one_job(
    during_the_read: bool,
) -> None:
    """The scheduler lets ended jobs go (``terminal_retention``) before their end is committed;
    a repeat of such a job's key then found it neither in memory nor in the store, made a
    second job with the key, and that commit failed on the store's unique key: the whole
    coordinator stopped, at a client's request. The repeat is now answered with the job, also
    when the job leaves memory while the store is being read for other keys."""
    async with running(terminal_retention=1) as h:
        d = h.dispatcher
        answers: list[tuple[str, bool]] = []

        def answer(rec: JobRecord, existed: bool) -> None:
            answers.append((rec.job_id, existed))

        def refused(exc: Exception) -> None:
            raise AssertionError(exc)

        def end_and_let_go(job_id: str) -> None:
            d.cancel("c1", job_id, lambda rec: None)
            for _ in range(2):  # its end, then two more: it is let go
                spec = h.spec()
                d.submit_now(spec, lambda rec, existed: None)
                d.cancel("c1", spec.job_id, lambda rec: None)
            assert d.scheduler.job(job_id) is None

        first = h.spec(idempotency_key="k")
        d.submit_now(first, answer)
        if during_the_read:  # in memory as the read for another key begins; committed after
            await h.flushed()
            h.store.block_lookups()
            d.submit_soon(h.spec(idempotency_key="other"), lambda rec, existed: None, refused)
            d.submit_soon(h.spec(idempotency_key="k"), answer, refused)
            await h.settle()
            end_and_let_go(first.job_id)
            await h.flushed()
        else:  # let go before its end (or its submit) is committed
            h.store.block_commits()
            d.submit_soon(h.spec(idempotency_key="k"), answer, refused)
            end_and_let_go(first.job_id)
        d.submit_soon(h.spec(idempotency_key="k"), answer, refused)
        h.store.release_lookups()
        await h.settle()
        h.store.release_commits()
        await h.flushed()
        assert answers == [(first.job_id, False), (first.job_id, True), (first.job_id, True)]
        assert [j.idempotency_key for j in h.store.jobs.values()].count("k") == 1


# ---- retention (JOB_RETENTION_DAYS) -------------------------------------------------------


async def completed_job(h: Harness) -> str:
    spec = h.spec()
    await h.submit(spec)
    await h.flushed()
    h.dispatcher.miner_call("accept", "gpu-1", spec.job_id)
    h.dispatcher.miner_result("gpu-1", spec.job_id, {"text": "ok"}, {}, None, lambda r: None)
    await h.flushed()
    return spec.job_id


async def until_gone(h: Harness, job_id: str) -> None:
    with anyio.fail_after(5):
        while job_id in h.store.jobs:
            await anyio.lowlevel.checkpoint()


async def test_a_job_ended_longer_ago_than_the_retention_is_deleted_with_its_events() -> None:
    """Past the retention an ended job goes from the store with its events, once memory let
    it go (receipts stay: the store contract's test); a live job and a job ended since stay,
    and the count of completed jobs drops."""
    async with running(retention=3600, terminal_retention=0) as h:
        h.miner()
        old = await completed_job(h)
        waiting = h.spec(ttl_seconds=7200)  # queued behind nothing: no free miner after this
        h.clock.advance(1800)
        recent = await completed_job(h)
        h.miner("gpu-2", concurrency=0)
        await h.submit(waiting)
        await h.flushed()
        assert h.dispatcher.job_counts.by_state["COMPLETED"] == 2
        h.clock.advance(1801)  # ``old`` ended 3601 s ago, ``recent`` 1801 s ago
        await until_gone(h, old)
        await h.flushed()
        assert old not in h.store.events
        assert recent in h.store.jobs
        assert waiting.job_id in h.store.jobs
        assert h.dispatcher.job_counts.by_state["COMPLETED"] == 1
        assert h.dispatcher.jobs_deleted == 1
        assert await h.dispatcher.get_job(old) is None
        h.clock.advance(1800)
        await until_gone(h, recent)


async def test_a_job_memory_still_holds_is_kept_until_it_lets_it_go() -> None:
    """An ended job still in memory (the newest ended jobs stay there) would still be read
    from there: it is deleted from the store only once memory let it go."""
    async with running(retention=60, terminal_retention=1) as h:
        h.miner()
        first = await completed_job(h)
        walks: list[int] = []
        jobs_after = h.store.jobs_after

        async def counted(rowid: int, limit: int) -> list[JobAge]:
            walks.append(rowid)
            return await jobs_after(rowid, limit)

        h.store.jobs_after = counted  # type: ignore[method-assign]
        h.clock.advance(61)
        with anyio.fail_after(5):
            while len(walks) < 3:  # passes of the walk, each over the held job
                await anyio.lowlevel.checkpoint()
        assert first in h.store.jobs
        assert walks[1:] == [0, 0]  # each pass starts again at the job it kept
        second = await completed_job(h)  # memory keeps one ended job: this one
        await until_gone(h, first)
        assert second in h.store.jobs


async def test_a_failed_read_of_the_retention_walk_is_logged_and_tried_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running(retention=60, terminal_retention=0) as h:
        h.miner()
        job_id = await completed_job(h)
        jobs_after = h.store.jobs_after
        failures = [StorageError("database is locked")]

        async def flaky(rowid: int, limit: int) -> list[JobAge]:
            if failures:
                raise failures.pop()
            return await jobs_after(rowid, limit)

        h.store.jobs_after = flaky  # type: ignore[method-assign]
        h.clock.advance(61)
        await until_gone(h, job_id)
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "retention: reading the jobs to delete failed: database is locked"
    ]
