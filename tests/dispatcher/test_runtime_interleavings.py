"""``Dispatcher`` under random interleavings: miner and client calls, the miner leaving and
coming back, time passing (accept timeouts, expiry, the resume grace), subscribes with any
``after``, one socket subscribing again and again, duplicate submits, and commits and store
reads held open at random points.

Whatever the order, every subscriber sees each event of a job it follows once, in order, with
no gap, each only once the store holds it; and a duplicate submit's answer is followed by the
job's next events and nothing else.
"""

from __future__ import annotations

import contextlib
import json
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dispatcher.errors import DispatchError
from dispatcher.fanout import Subscriber
from dispatcher.jobs import TERMINAL
from tests.dispatcher.test_runtime import Harness, running
from tests.fakes import RecordingOutbox

if TYPE_CHECKING:
    from collections.abc import Callable

    from dispatcher.runtime import Dispatcher
    from protocol.records import JobRecord

pytestmark = pytest.mark.anyio

JOBS = 2


class CheckedOutbox(RecordingOutbox):
    """Records each job event it is given, and checks the store held it by then."""

    def __init__(self, h: Harness) -> None:
        super().__init__(soft_limit=10_000, hard_limit=20_000)
        self.h = h
        self.seen: dict[str, list[int]] = {}

    def put(
        self, frame: str, *, job_id: str | None = None, progress: bool = False, seq: int = 0
    ) -> None:
        msg = json.loads(frame)
        if msg.get("type") == "job.event":
            stored = [e.seq for e in self.h.store.events.get(msg["job_id"], [])]
            assert msg["seq"] in stored, f"{msg['job_id']} seq {msg['seq']} sent before stored"
            self.seen.setdefault(msg["job_id"], []).append(msg["seq"])
        super().put(frame, job_id=job_id, progress=progress, seq=seq)


step = st.one_of(
    st.tuples(
        st.sampled_from(["accept", "progress", "result", "fail", "cancel"]),
        st.integers(0, JOBS - 1),
    ),
    st.tuples(st.just("block"), st.sampled_from([True, True, False])),  # True: stored first
    st.tuples(st.just("release"), st.just(0)),
    st.tuples(st.just("reads"), st.sampled_from([True, False, False])),
    st.tuples(st.just("settle"), st.just(0)),
    st.tuples(st.just("settle"), st.just(0)),
    st.tuples(st.just("subscribe"), st.integers(0, 3)),
    st.tuples(st.just("follow_all"), st.integers(0, 3)),
    st.tuples(st.just("duplicate"), st.integers(0, JOBS - 1)),
    st.tuples(st.just("resubscribe"), st.integers(0, 3)),
    st.tuples(st.sampled_from(["advance", "gone", "back"]), st.just(0)),
)


def _ignore(_: object) -> None:
    """An answer nobody reads."""


JOB_CALLS: dict[str, Callable[[Dispatcher, str], Any]] = {
    "accept": lambda d, job_id: d.miner_call("accept", "gpu-1", job_id),
    "progress": lambda d, job_id: d.miner_call("progress", "gpu-1", job_id, output="tok"),
    "result": lambda d, job_id: d.miner_result("gpu-1", job_id, {"ok": 1}, {}, None, _ignore),
    "fail": lambda d, job_id: d.miner_call(
        "fail", "gpu-1", job_id, error_code="E", error_message="m", retryable=True
    ),
    "cancel": lambda d, job_id: d.cancel("c1", job_id, _ignore),
}


class World:
    def __init__(self, h: Harness, job_ids: list[str], tg: Any) -> None:
        self.h = h
        self.job_ids = job_ids
        self.tg = tg
        # (outbox, {job: after}: the jobs it must see whole from ``after`` on)
        self.subs: list[tuple[CheckedOutbox, dict[str, int]]] = []
        self.answers: list[tuple[CheckedOutbox, JobRecord]] = []
        self.blocked = False
        self.reads_blocked = False
        # The one socket that subscribes again and again (``resubscribe``), its subscribes one
        # after the other as a socket's reader handles them, and the first seq of each job
        # its outbox must hold from then on.
        self.again = Subscriber("c1", CheckedOutbox(h))
        self.again_lock = anyio.Lock()
        self.again_from: dict[str, int] = {}

    async def step(self, kind: str, arg: Any) -> None:
        if kind in JOB_CALLS:
            with contextlib.suppress(DispatchError):  # refused: the job moved on
                JOB_CALLS[kind](self.h.dispatcher, self.job_ids[arg])
        elif kind == "settle":
            await anyio.lowlevel.checkpoint()
            await anyio.wait_all_tasks_blocked()
        else:
            getattr(self, kind)(arg)

    def advance(self, _: object) -> None:
        """Time passes: accept timeouts, expiry and the resume grace fire."""
        self.h.clock.advance(5.0)

    def gone(self, _: object) -> None:
        self.h.dispatcher.miner_gone("gpu-1", "gpu-1-session")

    def back(self, _: object) -> None:
        """The miner says hello again (a restart: what it held goes back to the queue)."""
        self.h.miner(concurrency=JOBS)

    def block(self, stored_first: bool) -> None:
        if not self.blocked:
            self.h.store.block_commits(stored=stored_first)
            self.blocked = True

    def release(self, _: object) -> None:
        self.h.store.release_commits()
        self.blocked = False

    def reads(self, block: bool) -> None:
        if block and not self.reads_blocked:
            self.h.store.block_reads(snapshot_first=len(self.subs) % 2 == 0)
        elif not block:
            self.h.store.release_reads()
        self.reads_blocked = block

    def subscribe(self, arg: int) -> None:
        outbox = CheckedOutbox(self.h)
        sub = Subscriber("c1", outbox)
        after = dict.fromkeys(self.job_ids, arg) if arg < 3 else {}
        self.subs.append((outbox, dict.fromkeys(self.job_ids, 0) | after))
        self.tg.start_soon(self.h.dispatcher.subscribe, sub, list(self.job_ids), after)

    def follow_all(self, arg: int) -> None:
        """Only the jobs named in ``after`` are replayed; the others are seen live from now."""
        outbox = CheckedOutbox(self.h)
        sub = Subscriber("c1", outbox)
        after = dict.fromkeys(self.job_ids, arg) if arg < 3 else {}
        self.subs.append((outbox, after))
        self.tg.start_soon(
            partial(self.h.dispatcher.subscribe, follow_all=True), sub, list(after), after
        )

    def resubscribe(self, arg: int) -> None:
        """The same socket subscribes to every job again, with an ``after`` or none: nothing
        is taken from its outbox, so it must hold each job's log from the lowest seq asked for
        (a job it follows, named without ``after``, is not replayed), each event once."""

        async def subscribe() -> None:
            async with self.again_lock:
                sub = self.again
                after = dict.fromkeys(self.job_ids, arg) if arg < 3 else {}
                for job_id in self.job_ids:
                    if job_id in after or job_id not in sub.job_ids:
                        first = min(after.get(job_id, 0), self.again_from.get(job_id, 1 << 30))
                        self.again_from[job_id] = first
                await self.h.dispatcher.subscribe(sub, list(self.job_ids), after)

        self.tg.start_soon(subscribe)

    def duplicate(self, arg: int) -> None:
        """A submit repeating a job's key: answered with the job, then followed from there."""
        d = self.h.dispatcher
        outbox = CheckedOutbox(self.h)
        sub = Subscriber("c1", outbox)

        def answered(rec: JobRecord, existed: bool) -> None:  # what the client socket does
            assert existed
            self.answers.append((outbox, rec))
            if rec.state not in TERMINAL:
                d.fanout.subscribe(sub, [rec.job_id])

        d.submit_now(self.h.spec(idempotency_key=f"k{arg}"), answered)

    def check(self) -> None:
        final = {j: [e.seq for e in self.h.store.events[j]] for j in self.job_ids}
        for outbox, after in self.subs:
            for job_id, seqs in outbox.seen.items():
                assert seqs == sorted(set(seqs)), (job_id, seqs)  # once each, in order
                assert seqs == list(range(seqs[0], seqs[-1] + 1)), (job_id, seqs)  # no gap
                if job_id in after:
                    assert seqs == final[job_id][after[job_id] :], (job_id, seqs, after)
            for job_id, first in after.items():
                if job_id not in outbox.seen:
                    assert final[job_id][first:] == [], (job_id, first)
        queued: dict[str, list[int]] = {}
        for f in map(json.loads, self.again.outbox.take_nowait()):
            queued.setdefault(f["job_id"], []).append(f["seq"])
        for job_id, first in self.again_from.items():
            assert queued.get(job_id, []) == final[job_id][first:], (job_id, first, queued)
        for outbox, rec in self.answers:
            seqs = outbox.seen.get(rec.job_id, [])
            assert [rec.seq, *seqs] == final[rec.job_id][rec.seq - 1 :], (rec.seq, seqs)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(steps=st.lists(step, max_size=25))
async def test_every_subscriber_sees_each_event_once_in_order_and_only_once_stored(
    steps: list[tuple[str, Any]],
) -> None:
    async with running(max_attempts=5) as h:
        h.miner(concurrency=JOBS)
        specs = [h.spec(idempotency_key=f"k{i}", ttl_seconds=20 + 10 * i) for i in range(JOBS)]
        for spec in specs:
            await h.submit(spec)
        await h.flushed()
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                world = World(h, [s.job_id for s in specs], tg)
                for kind, arg in steps:
                    await world.step(kind, arg)
                h.store.release_commits()
                h.store.release_reads()
            await h.flushed()
        world.check()
