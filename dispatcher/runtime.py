"""``Dispatcher``: the async shell around the pure scheduler.

Rule 1 (durability before visibility): every scheduler call appends its store writes to the
*open batch* and its visible effects (pushes, fan-out, replies) to the same batch's action list.
One writer task commits a batch in one transaction and only then performs its actions, in order.
While a commit is in flight the next batch fills up: that is the group commit. A woken writer
first lets runnable work join the open batch (``_gather``).
Rule 2: the methods adapters call are sync (they never block); only reads that may hit the
store (``get_job``, ``subscribe``) and ``serve`` are async.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio
import anyio.lowlevel

from dispatcher.effects import Assign, CloseSession, Effect, Persist, Revoke
from dispatcher.errors import (
    DispatchError,
    NotAllowed,
    TooLarge,
    TooManyJobs,
    Unavailable,
    UnknownJob,
    UnknownMiner,
)
from dispatcher.fanout import Fanout, Subscriber
from dispatcher.jobs import TERMINAL, JobState
from dispatcher.ledger import (
    Ledger,
    Movement,
    job_reservation,
    job_settlement,
    payee_account,
)
from dispatcher.policy import Capabilities, JobNeeds
from dispatcher.retention import Pass, select
from dispatcher.stats import (
    BATCH_BOUNDS,
    COMMIT_BOUNDS,
    DispatcherStatistics,
    EventTally,
    Histogram,
    JobCounts,
)
from protocol.amounts import price_units
from protocol.codec import assign_fits, encode, encode_assign, encode_event
from protocol.messages import JobAssign, JobCancel
from protocol.records import EventRecord, JobRecord, MinerRecord
from protocol.types import CloseCode, JSONObject, iso_time
from storage.base import JobStore, LedgerEntry, ReceiptRow, WriteBatch
from storage.errors import StorageError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from anyio.abc import TaskStatus

    from dispatcher.clock import Clock
    from dispatcher.core import JobSpec, Miner, ResumeInfo, Scheduler
    from dispatcher.jobs import Job

__all__ = [
    "REST_SESSION_PREFIX",
    "Dispatcher",
    "EventWatcher",
    "MinerSink",
    "RestMinerInfo",
    "event_frame",
]

log = logging.getLogger("aitbc.coordinator")

REST_SESSION_PREFIX = "rest:"
# At most this many event-loop turns a woken writer waits for more work to join its batch.
GATHER_TURNS = 4
# Events a replay reads from the store at a time (``Dispatcher.subscribe``).
REPLAY_PAGE = 1000
# JOB_RETENTION_DAYS: jobs looked at per page (each page's deletions ride in one batch), the
# pause after a page, and after a pass (dispatcher/retention.py).
RETENTION_PAGE = 256
RETENTION_PAUSE = 0.1
RETENTION_REST = 60.0


class MinerSink(Protocol):
    """What the runtime needs from a miner connection."""

    def send_frame(self, frame: str) -> None: ...

    def flush(self) -> None:
        """Write the frames sent so far now (a socket otherwise writes at the end of the tick)."""

    def close(self, code: CloseCode, reason: str) -> None: ...


_Action = Persist | Assign | Revoke | Callable[[], None]  # a CloseSession: see _closer
# Called with every committed job event, its job and its encoded ``job.event`` frame.
EventWatcher = Callable[[JobRecord, EventRecord, str], None]
T = TypeVar("T")


def event_frame(e: EventRecord) -> str:
    """The ``job.event`` text frame of a stored event (encoded once per event)."""
    # Unpacked: a NamedTuple's fields read by name each take the interpreter's slow path.
    job_id, seq, event, state, at, attempt, miner_id, data = e
    return encode_event(job_id, seq, event, state, iso_time(at), attempt, miner_id, data).decode()


def _snapshot(job: Job, effects: list[Effect]) -> JobRecord:
    """``job.record()`` after the scheduler call that returned ``effects``: the snapshot that
    call already took of the job when it emitted an event for it (the job as the call left it).
    """
    for effect in reversed(effects):
        if isinstance(effect, Persist) and effect.job.job_id == job.job_id:
            return effect.job
    return job.record()


# The refusal of a call whose commit a shutdown stopped waiting for (``Dispatcher.end_waits``).
_UNDECIDED = "the coordinator is shutting down before this change was committed; retry"


class Dispatcher:
    def __init__(self, store: JobStore, scheduler: Scheduler, clock: Clock) -> None:
        self.store = store
        self.scheduler = scheduler
        self.clock = clock
        self.fanout = Fanout()
        self.running = False
        self._closing = False
        self._polls_ended = False  # a shutdown began: REST polls no longer wait (end_polls)
        self._waiting: set[anyio.Event] = set()  # ``_until_committed`` callers (see there)
        self._gone: str | None = None  # why, once the writer has stopped: nothing more commits
        self._waits_ended = False  # a shutdown stopped waiting for the writer (``end_waits``)
        self._writes = WriteBatch()
        self._actions: list[_Action] = []
        # Makes the Events of the hot paths (two per batch, one per waiting request). Plain
        # ``anyio.Event()`` looks the running backend up at every call (sniffio, the current
        # task, a getpid() syscall): ~3 µs, 3% of a socket handshake's CPU in a profile.
        # ``serve`` swaps in the backend's own class, which makes the same objects directly.
        self.new_event: Callable[[], anyio.Event] = anyio.Event
        self._wake = anyio.Event()
        self._timer_wake = anyio.Event()
        self._sleeping_until = math.inf
        # The scheduler's next deadline as of its last call (``_apply``): ``_now`` compares the
        # time with it, one float compare per call, to fire the timers due first.
        deadline = scheduler.next_deadline()
        self._due = math.inf if deadline is None else deadline
        self._rearm = False  # wake the timer task once the open batch has been performed
        self._urgent = False  # the open batch pushes a job to a miner: commit it without gathering
        self._sinks: dict[str, MinerSink] = {}
        self._bindings: dict[str, str] = {}
        # Miner ids bound to each key, and how many one key may bind (MAX_MINER_IDS_PER_KEY,
        # set by the web layer): every binding is kept, in memory and in the store, for good.
        self._ids_of_key: dict[str, int] = {}
        self.max_ids_per_key: int | None = None
        self._batches = 0
        self._written = 0
        # Batches performed so far: a socket counts the frames it added since this last
        # changed (web/connection.py, ``BATCH_SHARE``).
        self.performed = 0
        self._last_batch = 0
        self._idle = anyio.Event()
        # The latest COMMITTED record of every job the scheduler holds: what reads may show
        # (never the scheduler's uncommitted in-memory state). An ended job's record goes when
        # the scheduler lets the job go (``_remember``): its payload and result are the same
        # objects as the scheduler's, so its retention bounds (count and bytes) bound both.
        self._visible: dict[str, JobRecord] = {}
        self._visible_terminal: OrderedDict[str, None] = OrderedDict()
        # REST miners: last call per miner (liveness for ops/admin) and how long it counts.
        self.rest_online_window = 30.0
        self._rest_seen: dict[str, float] = {}
        # REST miners an operator disconnected: their next call reconnects them (resuming
        # what they still hold), as a socket miner's reconnect does, not a 404 for ever.
        self._rest_away: dict[str, MinerRecord] = {}
        # Observation (docs/ops.md): tallies updated once per committed event or commit.
        self.tally = EventTally()
        self.job_counts = JobCounts()
        # JOB_RETENTION_DAYS in seconds (None: keep every job), set by the web layer; the
        # pause between two pages of deletions, and between two passes (dispatcher/retention.py).
        self.retention: float | None = None
        self.retention_pause = RETENTION_PAUSE
        self.retention_rest = RETENTION_REST
        self.jobs_deleted = 0  # by the retention walk, since start
        self.commit_seconds = Histogram(COMMIT_BOUNDS)
        self.commit_started: float | None = None  # perf_counter() of the commit under way
        self.batch_sizes = Histogram(BATCH_BOUNDS)
        self.watchers: list[EventWatcher] = []
        # Set by the web layer: write out the frames a batch produced before the event loop
        # reads more input (otherwise they leave at the end of the tick).
        self.flush_writes: Callable[[], None] | None = None
        # Billing (docs/wallet.md): the ledger's in-memory view, loaded by the app before
        # ``restore``. ``settle_payments`` turns on the per-batch settlement hook: with billing
        # off and no paid job left, jobs cost nothing extra.
        self.ledger = Ledger()
        self.settle_payments = False
        # The largest frame a socket miner is sent (WS_MAX_FRAME_BYTES, set by the web layer):
        # its library refuses larger ones, so a job whose job.assign would be larger is refused.
        self.max_assign_bytes: int | None = None
        # The known miner classes as last committed (``is_servable``): the scheduler's own may
        # count a miner whose hello is still being committed. Taken when a batch is closed,
        # in force once it is committed; only when they changed (``Scheduler.caps_version``).
        self._caps_version = -1
        self._committed_caps: tuple[Capabilities, ...] = ()
        self._servable: dict[JobNeeds, bool] = {}
        # Submits waiting for the store to tell whether their idempotency key is taken
        # (``submit_soon``), oldest first, and how many of them each client has.
        self._lookups: deque[_Lookup] = deque()
        self._lookups_of: dict[str, int] = {}
        self._lookup_wake = anyio.Event()
        # Ended jobs with an idempotency key, by key, whose end is in the open batch or the one
        # being committed: the scheduler may let such a job go before then (its retention), and
        # the store does not have it yet; a repeat of its key must not make a second job.
        self._ending: dict[tuple[str, str], JobRecord] = {}
        self._ending_committing: dict[tuple[str, str], JobRecord] = {}
        # Each client's live (queued or running) jobs and their submissions' bytes, and each
        # live job's bytes: live jobs are held in memory until they end, so a client may have
        # at most ``max_active_jobs`` of them, of ``max_active_bytes`` (set by the web layer).
        self._active: dict[str, tuple[int, int]] = {}
        self._active_size: dict[str, int] = {}
        self.max_active_jobs: int | None = None
        self.max_active_bytes: int | None = None

    # ---- lifecycle --------------------------------------------------------------------------

    async def restore(self) -> None:
        """Rebuild the scheduler from the store (call once, before ``serve``)."""
        jobs, miners = await self.store.load_active()
        self.job_counts.seed(await self.store.count_jobs(), jobs)
        if any(j.payment is not None for j in jobs):
            self.settle_payments = True  # reservations made while billing was on still settle
        self._bindings = {m.miner_id: m.key_hash for m in miners}
        for key_hash in self._bindings.values():
            self._ids_of_key[key_hash] = self._ids_of_key.get(key_hash, 0) + 1
        sessions = {m.miner_id: m.session_id or "" for m in miners}
        for rec in jobs:  # their payloads' sizes as received are not stored: counted as 0
            self._count_active(rec.job_id, rec.client_id, 0)
        self._apply(self.scheduler.restore(jobs, sessions, self.clock.now()))
        for m in miners:  # REST miners register once, then only poll: bring them back
            if (m.session_id or "").startswith(REST_SESSION_PREFIX):
                self._rest_connect(m, resume=True)
                self._rest_seen[m.miner_id] = m.last_seen
        self._caps_version = self.scheduler.caps_version  # all from the store: committed
        self._committed_caps = self.scheduler.known_classes()

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the writer and the timer loop until ``stop()``; the batch in hand is flushed."""
        self.new_event = type(anyio.Event())  # the backend is fixed from here on
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._timer_loop)
            tg.start_soon(self.store.maintain)
            tg.start_soon(self._lookup_loop)
            if self.retention is not None:
                tg.start_soon(self._retention_loop, self.retention)
            self.running = True
            task_status.started()
            try:
                await self._write_loop()
            except BaseException:
                self._closing = True  # a failed commit: nothing more is taken, and nobody waits
                self._gone = "the coordinator is stopping: a commit failed"
                for done in list(self._waiting):
                    done.set()
                raise
            finally:
                self.running = False
                self._gone = self._gone or "the coordinator is shutting down"
                tg.cancel_scope.cancel()

    def end_polls(self) -> None:
        """A shutdown began: every waiting REST poll ends now, as on a hang-up (with the job
        already committed for it, else none), and a later poll is refused as after ``stop``.
        A long-poll (up to 25 s) otherwise held the server's graceful shutdown until it was
        cancelled (a 500). Results, fails and everything else are still taken."""
        self._polls_ended = True
        for sink in list(self._sinks.values()):
            if isinstance(sink, _RestSink):
                for waiter in sink.waiters:
                    waiter.done.set()

    def stop(self) -> None:
        """Refuse new work, flush what is pending, then let ``serve`` return."""
        self._closing = True
        self.running = False
        self._wake.set()

    async def _write_loop(self) -> None:
        while True:
            while not self._actions and not len(self._writes):
                if self._closing:
                    return
                self._idle.set()
                self._wake = self.new_event()
                await self._wake.wait()
            await self._gather()
            if self._idle.is_set():  # keep the event wait_flushed() may already be waiting on
                self._idle = self.new_event()
            writes, actions = self._writes, self._actions
            self._writes, self._actions, self._urgent = WriteBatch(), [], False
            version = self.scheduler.caps_version
            classes = None if version == self._caps_version else self.scheduler.known_classes()
            ending = self._ending
            if ending:
                self._ending, self._ending_committing = {}, ending
            if len(writes):
                self.commit_started = started = time.perf_counter()
                await self.store.commit(writes)
                self.commit_started = None
                self.commit_seconds.observe(time.perf_counter() - started)
                self.batch_sizes.observe(len(writes))
                self._batches += 1
                self._written += len(writes)
                self._last_batch = len(writes)
            if ending:
                self._ending_committing = {}
            if classes is not None:  # the miner classes this batch leaves are durable now
                self._caps_version, self._committed_caps = version, classes
                self._servable.clear()
            self._perform(actions)
            self.performed += 1
            if self._rearm:
                self._rearm = False
                self._timer_wake.set()

    def commit_running_for(self) -> float:
        """Seconds the writer's commit under way has taken so far (0.0: none is under way)."""
        started = self.commit_started
        return 0.0 if started is None else time.perf_counter() - started

    async def _gather(self) -> None:
        """Group commit: let work that is already runnable join the open batch first.

        One turn of the event loop handles what it has read but not yet dispatched (another
        miner's hello, another client's submit); another turn follows only while the batch
        keeps growing, up to ``GATHER_TURNS``. In a burst of miner handshakes the writer
        otherwise committed each hello on its own (docs/performance.md: 1.15 commits per
        handshake, 0.4 with this). A batch that pushes a job to a miner is never held back:
        an empty turn costs about 20 µs of submit→assign when unloaded.
        """
        for _ in range(GATHER_TURNS):
            if self._urgent:
                return
            size = len(self._writes) + len(self._actions)
            await anyio.lowlevel.checkpoint()
            if len(self._writes) + len(self._actions) == size:
                return

    async def wait_flushed(self) -> None:
        """Wait until everything submitted so far is committed and delivered (tests, shutdown)."""
        while self._actions or len(self._writes) or not self._idle.is_set():
            await self._idle.wait()
            if self._actions or len(self._writes):
                self._idle = self.new_event()
                self._wake.set()

    async def _timer_loop(self) -> None:
        while True:
            self._timer_wake = self.new_event()
            deadline = self.scheduler.next_deadline()
            self._sleeping_until = math.inf if deadline is None else deadline
            await self.clock.wait_until(deadline, self._timer_wake)
            now = self.clock.now()
            if deadline is not None and now >= deadline:
                self._apply(self.scheduler.tick(now))

    async def _retention_loop(self, retention: float) -> None:
        """Delete the jobs that ended over ``retention`` seconds ago, a page per batch, until
        the writer stops (dispatcher/retention.py)."""
        walk = Pass()
        while True:
            try:
                jobs = await self.store.jobs_after(walk.after, RETENTION_PAGE)
            except StorageError as exc:  # a read failed: the next pass tries again
                log.warning("retention: reading the jobs to delete failed: %s", exc)
                await anyio.sleep(self.retention_rest)
                continue
            page = select(jobs, RETENTION_PAGE, self.clock.now() - retention, self.holds)
            if page.ended:
                try:
                    await self.forget_ended(page.ended)
                except Unavailable:  # the writer stopped: nothing more is deleted
                    return
            walk.advance(page)
            await anyio.sleep(self.retention_rest if page.done else self.retention_pause)

    def holds(self, job_id: str) -> bool:
        """Whether memory has ``job_id``: reads would show it from there."""
        return job_id in self.scheduler.jobs or job_id in self._visible

    async def forget_ended(self, ended: dict[str, str]) -> None:
        """Delete ended jobs (id -> final state) with their events in the open batch; returns
        once that is committed. Their receipts stay."""
        self._check_open()
        self._writes.pruned.extend(ended)
        counts = self.job_counts

        def forgotten(then: Callable[[None], None]) -> None:
            def forget() -> None:
                for state in ended.values():
                    counts.forget(state)
                self.jobs_deleted += len(ended)
                then(None)

            self.after_commit(forget)

        await self._until_committed(forgotten)

    # ---- plumbing ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closing:
            raise Unavailable("the coordinator is shutting down")

    def _now(self) -> float:
        """The time for a scheduler call, once every timer due by then has fired.

        The timer loop fires a deadline only when its task next runs: a call before that (a
        result after the job's TTL, a freed slot taking a job whose TTL passed) acted on a
        state the scheduler no longer has at ``now``. Every scheduler call takes its time from
        here, so its effects follow the timers' in the batch. Cheap when nothing is due (the
        usual case): a float compare with the deadline cached by ``_apply``.
        """
        now = self.clock.now()
        if now >= self._due:
            self._apply(self.scheduler.tick(now))
        return now

    def _apply(self, effects: list[Effect], reply: _Action | None = None) -> None:
        """Stage ``effects`` for the open batch. Once it commits, the miner-bound ones (assign,
        revoke, close) are performed first, then ``reply``, then the events: new work reaches
        a miner without waiting for the client-bound frames of the same step (order on each
        socket is unchanged: events never go to miners)."""
        writes = self._writes
        actions = self._actions
        if self.settle_payments:
            self._settle(effects)
        persists: list[Persist] = []
        for effect in effects:
            if isinstance(effect, Persist):
                job, event = effect
                writes.jobs[job.job_id] = job
                writes.events.append(event)
                if event.state in TERMINAL:
                    if job.idempotency_key is not None:
                        self._ending[job.client_id, job.idempotency_key] = job
                    self._uncount_active(job.job_id, job.client_id)
                if event.event == "completed" and job.receipt is not None:
                    writes.receipts.append(
                        ReceiptRow(
                            receipt_id=job.receipt["receipt_id"],
                            job_id=job.job_id,
                            miner_id=job.miner_id,
                            issued_at=event.at,
                            receipt=job.receipt,
                            chain_seq=job.receipt["chain_seq"],
                        )
                    )
                persists.append(effect)
            elif isinstance(effect, Assign):
                actions.append(effect)
                self._urgent = True
            elif isinstance(effect, CloseSession):
                actions.append(self._closer(effect))
            else:
                actions.append(effect)
        if reply is not None:
            actions.append(reply)
        actions += persists
        self._wake.set()
        deadline = self.scheduler.next_deadline()
        self._due = math.inf if deadline is None else deadline
        if deadline is not None and deadline < self._sleeping_until:
            if actions:
                # The writer performs these next: it wakes the timer task after them, so the
                # task's re-arming does not run ahead of this batch's frames.
                self._rearm = True
            else:
                self._timer_wake.set()

    def _settle(self, effects: list[Effect]) -> None:
        """Empty the escrow of every paid job that ends in ``effects``, in the same batch."""
        moves: list[Movement] = []
        for effect in effects:
            # One terminal event per job (terminal states are absorbing): settled once.
            if isinstance(effect, Persist) and effect.event.state in TERMINAL:
                job, payment = effect.job, effect.job.payment
                if payment is not None:
                    payee = None
                    if job.miner_id is not None:
                        miner = self.scheduler.miners.get(job.miner_id)
                        payee = payee_account(job.miner_id, miner.capabilities if miner else {})
                    moves += job_settlement(
                        job.job_id, payment, effect.event.state, price_units(job.receipt), payee
                    )
        if moves:
            self.ledger.stage(moves)
            self._post(moves)

    def _post(self, moves: list[Movement]) -> None:
        """Write staged movements with the open batch; they count once it commits."""
        at = self.clock.now()
        for m in moves:
            self._writes.entries += (
                LedgerEntry(
                    movement_key=m.key,
                    leg=0,
                    account=m.src,
                    amount=-m.amount,
                    kind=m.kind,
                    ref=m.ref,
                    at=at,
                ),
                LedgerEntry(
                    movement_key=m.key,
                    leg=1,
                    account=m.dst,
                    amount=m.amount,
                    kind=m.kind,
                    ref=m.ref,
                    at=at,
                ),
            )
        self._actions.append(lambda: self.ledger.commit(moves))
        self._wake.set()

    async def write(self, fill: Callable[[WriteBatch], None], moves: list[Movement]) -> None:
        """Add rows (users, sessions, payments …) and ledger movements to the open batch and
        return once they are committed. Raises PaymentRequired (nothing written) when a
        movement would overdraw its source, Unavailable when shutting down."""
        self._check_open()
        if moves:
            self.ledger.stage(moves)
        fill(self._writes)
        if moves:
            self._post(moves)
        await self._until_committed(self._commit_then)

    def after_commit(self, action: Callable[[], None]) -> None:
        """Run ``action`` once everything queued so far is durable."""
        self._actions.append(action)
        self._wake.set()

    def _perform(self, actions: list[_Action]) -> None:
        now = self.clock.now()  # when this batch became durable
        lead: list[Assign] = []
        for action in actions:
            if type(action) is not Assign:
                break
            lead.append(action)
        if lead:
            # The batch opens with assigns (a submit that found an idle miner, see ``_apply``):
            # write them out before the rest of the batch is performed.
            self._perform_actions(lead, now)
            for assign in lead:
                sink = self._sinks.get(assign.session_id)
                if sink is not None:
                    sink.flush()
            actions = actions[len(lead) :]
        self._perform_actions(actions, now)
        if self.flush_writes is not None:
            self.flush_writes()

    def _perform_actions(self, actions: Sequence[_Action], now: float) -> None:
        for action in actions:
            if isinstance(action, Persist):
                job, e = action
                self._remember(job)
                frame = event_frame(e)
                self.fanout.publish(job.client_id, job.job_id, e.seq, frame, e.event == "progress")
                self.tally.observe(job, e, now)
                self.job_counts.observe(e)
                for watch in self.watchers:
                    watch(job, e, frame)
                if e.state in TERMINAL:
                    self.fanout.forget_job(job.job_id, job.client_id)
            elif isinstance(action, Assign):
                _, session_id, job_id, attempt, payload, constraints, expires, timeout = action
                sink = self._sinks.get(session_id)
                if sink is None:
                    continue
                expires_at = iso_time(expires)
                if isinstance(sink, _RestSink):  # a poll takes the message: no frame to parse
                    sink.assign(
                        JobAssign(
                            job_id=job_id,
                            attempt=attempt,
                            payload=payload,
                            constraints=constraints,
                            expires_at=expires_at,
                            accept_timeout=timeout,
                        )
                    )
                else:
                    assign = encode_assign(
                        job_id, attempt, payload, constraints, expires_at, timeout
                    )
                    sink.send_frame(assign.decode())
            elif isinstance(action, Revoke):
                sink = self._sinks.get(action.session_id)
                if sink is not None:
                    sink.send_frame(
                        encode(JobCancel(job_id=action.job_id, reason=action.reason)).decode()
                    )
            else:
                action()

    def _closer(self, close: CloseSession) -> Callable[[], None]:
        """Close the session's sink as it is now, once the batch is durable. A REST miner's
        session id is reused: when it is back by then (its next call after an operator's
        disconnect), it has a sink of its own (``_rest_connect``), which stays."""
        session_id, sink = close.session_id, self._sinks.get(close.session_id)

        def perform() -> None:
            if sink is not None:
                if self._sinks.get(session_id) is sink:
                    del self._sinks[session_id]
                sink.close(close.code, close.reason)

        return perform

    def _remember(self, rec: JobRecord) -> None:
        self._visible[rec.job_id] = rec
        if rec.state in TERMINAL:
            # Ended jobs are published in the order they ended, and the scheduler lets them go
            # oldest first: the ones it let go are the oldest published ones.
            ended, jobs = self._visible_terminal, self.scheduler.jobs
            ended[rec.job_id] = None
            while ended:
                old = next(iter(ended))
                if old in jobs:
                    break
                del ended[old]
                self._visible.pop(old, None)

    async def _until_committed(self, start: Callable[[Callable[[T], None]], None]) -> T:
        """Run ``start(then)`` and wait until ``then`` is called after the commit.

        Raises ``Unavailable`` at once when the writer stops on a failed commit (the process
        then shuts down): the caller gets an answer instead of waiting for the shutdown.
        """
        done = self.new_event()
        box: list[T] = []

        def then(value: T) -> None:
            box.append(value)
            done.set()

        start(then)
        return await self._wait_committed(done, box)

    async def _wait_committed(self, done: anyio.Event, box: list[T]) -> T:
        """Wait for ``done``; ``box`` then holds the answer, unless the writer stopped first
        (a failed commit; or shutdown, for work queued after its last batch): then nothing
        more is committed, and the caller is refused at once."""
        if self._gone is None and not self._waits_ended:
            self._waiting.add(done)
            try:
                await done.wait()
            finally:
                self._waiting.discard(done)
        if not box:
            if self._gone is None and self._waits_ended:
                raise Unavailable(_UNDECIDED)
            raise Unavailable(self._gone or "the coordinator is stopping: a commit failed")
        return box[0]

    def end_waits(self) -> None:
        """A shutdown stopped waiting for the writer (a commit slower than its grace): every
        call still waiting for its commit is refused now (``Unavailable``, a 503), before
        uvicorn's graceful timeout cancelled it (a 500, a traceback in the log). Its commit
        goes on, whole or not at all: a retry with its idempotency key finds the outcome."""
        self._waits_ended = True
        for done in list(self._waiting):
            done.set()

    # ---- clients ----------------------------------------------------------------------------

    async def submit(self, spec: JobSpec, then: Callable[[JobRecord, bool], None]) -> None:
        """Queue a job; ``then(record, existed)`` runs once it is durable. Returns once the job
        is queued (after the store lookup of ``submit_soon``, if it needs one); raises as
        ``submit_now``, or StorageError when that lookup failed."""
        done = self.new_event()
        refusal: list[Exception] = []

        def refused(exc: Exception) -> None:
            refusal.append(exc)
            done.set()

        if not self.submit_soon(spec, then, refused, done.set):
            await done.wait()
        if refusal:
            raise refusal[0]

    def submit_soon(
        self,
        spec: JobSpec,
        then: Callable[[JobRecord, bool], None],
        refused: Callable[[Exception], None],
        queued: Callable[[], None] | None = None,
    ) -> bool:
        """``submit_now`` that never waits: True when the job was queued now (raises as
        ``submit_now``). False when it waits for the store: an idempotency key not in memory
        may be the key of a job only the store still has (ended long ago, or before a
        restart). The lookup runs in the background, one read for every key queued meanwhile
        (``_lookup_loop``); then the submit proceeds, answered as a duplicate when the key was
        found, and ``queued()`` is called, or ``refused(exc)`` with the exception
        ``submit_now`` raised or the read's StorageError. A client's submits are queued in the
        order they came: while one waits for a lookup, the client's next ones wait behind it.
        """
        self._check_open()
        client_id, key = spec.client_id, spec.idempotency_key
        if client_id not in self._lookups_of and (
            key is None or self.scheduler.find_idempotent(client_id, key) is not None
        ):
            self.submit_now(spec, then)
            return True
        self._lookups.append(_Lookup(spec, then, refused, queued))
        self._lookups_of[client_id] = self._lookups_of.get(client_id, 0) + 1
        self._lookup_wake.set()
        return False

    async def _lookup_loop(self) -> None:
        """Look up the keys of the submits ``submit_soon`` queued, all those queued while the
        previous read ran in one read, and let each submit proceed in order."""
        batch: deque[_Lookup] = deque()
        try:
            while True:
                while not self._lookups:
                    self._lookup_wake = self.new_event()
                    await self._lookup_wake.wait()
                batch, self._lookups = self._lookups, deque()
                find = self.scheduler.find_idempotent
                wanted: set[tuple[str, str]] = set()
                for item in batch:
                    client_id, key = item.spec.client_id, item.spec.idempotency_key
                    if (
                        key is not None
                        and find(client_id, key) is None
                        and self._ended(client_id, key) is None
                    ):
                        wanted.add((client_id, key))
                failed: StorageError | None = None
                found: dict[tuple[str, str], JobRecord] = {}
                if wanted:
                    try:
                        found = await self.store.find_jobs(wanted)
                    except StorageError as exc:
                        failed = exc
                while batch:
                    if not self._looked_up(batch[0], wanted, found, failed):
                        # Its key's job left memory during the read, which was not asked
                        # about it: look again, this submit and those after it.
                        batch.extend(self._lookups)
                        batch, self._lookups = deque(), batch
                        break
                    batch.popleft()
        finally:
            # Cancelled: the coordinator is stopping (or a commit failed), nothing more is
            # queued or answered. Each waiting submit is refused rather than left unanswered.
            gone = Unavailable(self._gone or "the coordinator is shutting down")
            for item in (*batch, *self._lookups):
                self._lookup_ended(item.spec.client_id)
                item.refused(gone)
            self._lookups.clear()

    def _looked_up(
        self,
        item: _Lookup,
        wanted: set[tuple[str, str]],
        found: dict[tuple[str, str], JobRecord],
        failed: StorageError | None,
    ) -> bool:
        """Let ``item`` proceed after the read of ``wanted``; False: it needs another read."""
        spec, then = item.spec, item.then
        key = spec.idempotency_key
        try:
            self._check_open()
            # Memory first: an earlier submit (of this batch, say) may have queued the key
            # since the read, and memory has the job as it is now.
            if key is not None and self.scheduler.find_idempotent(spec.client_id, key) is None:
                ended = self._ended(spec.client_id, key)
                if ended is None and (spec.client_id, key) not in wanted:
                    return False
                if ended is None and failed is not None:
                    raise failed
                stored = ended or found.get((spec.client_id, key))
                if stored is not None:
                    self.after_commit(lambda: then(stored, True))
                else:
                    self.submit_now(spec, then)
            else:
                self.submit_now(spec, then)
        except (DispatchError, StorageError) as exc:
            self._lookup_ended(spec.client_id)
            item.refused(exc)
            return True
        self._lookup_ended(spec.client_id)
        if item.queued is not None:
            item.queued()
        return True

    def _ended(self, client_id: str, key: str) -> JobRecord | None:
        """The ended job with this key whose end is not committed yet (see ``_ending``)."""
        if not self._ending and not self._ending_committing:
            return None
        return self._ending.get((client_id, key)) or self._ending_committing.get((client_id, key))

    def _lookup_ended(self, client_id: str) -> None:
        n = self._lookups_of[client_id] - 1
        if n:
            self._lookups_of[client_id] = n
        else:
            del self._lookups_of[client_id]

    def submit_now(self, spec: JobSpec, then: Callable[[JobRecord, bool], None]) -> None:
        """``submit`` without the store lookup: for a spec without an idempotency key (or one
        already checked). Synchronous, so the socket endpoints call it from the read path.
        Raises Unavailable, PaymentRequired or TooLarge (nothing queued)."""
        self._check_open()
        key = spec.idempotency_key
        existing = None if key is None else self.scheduler.find_idempotent(spec.client_id, key)
        # Looked up first: the timers due now may end jobs and so let that one go from memory
        # (``terminal_retention``), and its key would then make a second job.
        now = self._now()
        if existing is not None:
            # A repeat answers with the job as it is now, not as last published: the answer
            # goes out with the open batch, after everything the scheduler did so far is
            # committed and published (the job's end in flight included, which the asker
            # would otherwise miss).
            rec = existing.record()
            self._apply([], reply=lambda: then(rec, True))
            return
        limit = self.max_assign_bytes
        if limit is not None and not assign_fits(
            spec.payload, spec.constraints, limit, read=spec.size
        ):
            # Pushed anyway, it closed each miner (1009) and went back to the queue uncharged,
            # to be pushed again at the miner's reconnect: for its whole TTL.
            raise TooLarge(limit)
        self._check_active(spec)
        reserve = None
        if spec.payment is not None:
            reserve = [job_reservation(spec.job_id, spec.payment)]
            self.ledger.stage(reserve)  # PaymentRequired: nothing is queued
            self.settle_payments = True
        job, effects = self.scheduler.submit(spec, now)
        self._count_active(job.job_id, job.client_id, spec.size)
        if reserve is not None:
            self._post(reserve)
        rec = _snapshot(job, effects)
        self._apply(effects, reply=lambda: then(rec, False))

    def _check_active(self, spec: JobSpec) -> None:
        """Raise TooManyJobs when a new job would pass its client's live-job bounds."""
        jobs, size = self._active.get(spec.client_id, (0, 0))
        if self.max_active_jobs is not None and jobs >= self.max_active_jobs:
            raise TooManyJobs("jobs", self.max_active_jobs, "MAX_ACTIVE_JOBS_PER_CLIENT")
        if self.max_active_bytes is not None and size + spec.size > self.max_active_bytes:
            raise TooManyJobs("bytes", self.max_active_bytes, "MAX_ACTIVE_BYTES_PER_CLIENT")

    def _count_active(self, job_id: str, client_id: str, size: int) -> None:
        jobs, total = self._active.get(client_id, (0, 0))
        self._active[client_id] = (jobs + 1, total + size)
        self._active_size[job_id] = size

    def _uncount_active(self, job_id: str, client_id: str) -> None:
        size = self._active_size.pop(job_id, None)
        if size is None:
            return  # ended once already (or never counted)
        jobs, total = self._active[client_id]
        if jobs > 1:
            self._active[client_id] = (jobs - 1, total - size)
        else:
            del self._active[client_id]

    async def submit_wait(self, spec: JobSpec) -> tuple[JobRecord, bool]:
        """``submit`` for request/response callers: returns once the job is durable."""
        done = self.new_event()
        box: list[tuple[JobRecord, bool]] = []

        def then(rec: JobRecord, existed: bool) -> None:
            box.append((rec, existed))
            done.set()

        await self.submit(spec, then)
        return await self._wait_committed(done, box)

    def cancel(self, client_id: str, job_id: str, then: Callable[[JobRecord], None]) -> None:
        """Cancel a live job; raises UnknownJob / InvalidTransition (nothing changes)."""
        self._check_open()
        job, effects = self.scheduler.cancel(client_id, job_id, self._now())
        rec = _snapshot(job, effects)
        self._actions.append(lambda: then(rec))
        self._apply(effects)

    async def cancel_wait(self, client_id: str, job_id: str) -> JobRecord:
        return await self._until_committed(lambda then: self.cancel(client_id, job_id, then))

    # ---- operators (docs/ops.md, "Actions"); each returns once its change is durable ---------

    async def admin_cancel(self, job_id: str) -> JobRecord:
        """Cancel any job; raises UnknownJob / InvalidTransition (nothing changes)."""
        self._check_open()
        job, effects = self.scheduler.admin_cancel(job_id, self._now())
        return await self._admin_done(_snapshot(job, effects), effects)

    async def requeue(self, job_id: str) -> JobRecord:
        """Take a RUNNING job back from its miner; raises UnknownJob / InvalidTransition."""
        self._check_open()
        job, effects = self.scheduler.requeue(job_id, self._now())
        return await self._admin_done(_snapshot(job, effects), effects)

    async def _admin_done(self, rec: JobRecord, effects: list[Effect]) -> JobRecord:
        self._apply(effects)
        await self._until_committed(self._commit_then)
        return rec

    async def drain_miner(self, miner_id: str, draining: bool) -> None:
        """Stop (or resume) offering jobs to a connected miner; raises UnknownMiner."""
        self.miner_call("set_status", miner_id, concurrency=None, draining=draining)
        await self._until_committed(self._commit_then)

    async def disconnect_miner(self, miner_id: str) -> None:
        """Close a connected miner's session (its jobs go as on any disconnect). A REST miner
        is reconnected by its next call (``_rest_miner``), as a socket miner reconnects."""
        miner = self.scheduler.miners.get(miner_id)
        if miner is not None and miner.rest and miner_id in self._bindings:
            self._rest_away[miner_id] = self._rest_record(miner_id, REST_SESSION_PREFIX + miner_id)
        self._apply(self.scheduler.disconnect_miner(miner_id, self._now()))
        await self._until_committed(self._commit_then)

    async def get_job(self, job_id: str) -> JobRecord | None:
        """The job as last committed (from memory when recent, else from the store)."""
        rec = self._visible.get(job_id)
        if rec is not None:
            return rec
        return await self.store.get_job(job_id)

    async def subscribe(
        self,
        sub: Subscriber,
        job_ids: list[str],
        after: dict[str, int],
        *,
        follow_all: bool = False,
        answer: Callable[[list[str], dict[str, int]], None] | None = None,
    ) -> list[str]:
        """Read each named job once, then ``answer(missing, behind)`` (the ids unknown or not
        this client's, each once; the jobs whose ``after`` is past their last event, with that
        event's seq), then replay the stored events with ``seq > after[job]`` of the others and
        go live; returns ``missing``. ``follow_all``: the socket follows every job of its client
        from the answer on ("all").

        An ``after`` past the job's last event names events the store no longer has (lost with
        the last commits in a power cut under SQLITE_SYNCHRONOUS=NORMAL, or in a failover to a
        replica behind): it is taken as that event, so that the events that follow (numbered
        from there again) are all delivered, and ``behind`` tells the client.

        Live events that arrive during the replay are held back and only those newer than the
        replay are delivered, so the client sees every event exactly once, in order. They are
        held from the start for every job to replay, not from its turn: a job followed through
        "all" would otherwise reach the socket live while an earlier job replays, then again.
        A job to replay that the socket already follows may have events still queued unsent in
        its outbox: those the replay will carry are taken out first (``Outbox.withdraw``), so
        the socket is sent each once, after the answer (docs/protocol.md, subscribe).
        """
        pending: dict[str, list[tuple[int, str, bool]]] = {}
        for job_id in job_ids:
            if job_id not in pending and (job_id not in sub.job_ids or job_id in after):
                pending[job_id] = sub.buffers[job_id] = []
        try:
            owned, missing = await self._owned(sub.client_id, job_ids)
            behind = {j: rec.seq for j, rec in owned.items() if after.get(j, 0) > rec.seq}
            first = {j: min(after.get(j, 0), rec.seq) for j, rec in owned.items() if j in pending}
            sub.outbox.withdraw(first)  # nothing of these jobs is queued from here: held
            if answer is not None:
                answer(missing, behind)
            if follow_all:
                self.fanout.subscribe_all(sub)
            for job_id, rec in owned.items():
                held = pending.get(job_id)
                if held is None:  # followed already, and not named in ``after``
                    continue
                self.fanout.subscribe(sub, [job_id])
                last, ended = await self._replay(sub, job_id, first[job_id])
                if self.running and self._unpublished(job_id, last):
                    # The replay read events of a batch committed but not yet performed: hold
                    # on until it is, or they would reach the socket again when published.
                    await self._until_committed(self._commit_then)
                del pending[job_id], sub.buffers[job_id]
                for seq, frame, progress in held:
                    if seq > last:
                        sub.outbox.put(frame, job_id=job_id, progress=progress, seq=seq)
                # ``rec`` was read before the replays: the job may have ended since.
                if ended or (rec.state in TERMINAL and last >= rec.seq):
                    # Nothing can follow a terminal event: nothing to mute under "all" either.
                    self.fanout.unsubscribe(sub, [job_id], live=lambda _: False)
        finally:
            for job_id in pending:  # unknown or foreign, or a read failed
                del sub.buffers[job_id]
        return missing

    def _unpublished(self, job_id: str, seq: int) -> bool:
        """Whether event ``seq`` of ``job_id`` may be stored but not yet published: later than
        the job as last published, or the job is active but nothing of it was published since
        the start (a replay reads the store, which has a batch before its events go out)."""
        rec = self._visible.get(job_id)
        if rec is None:
            return job_id in self.scheduler.jobs
        return rec.seq < seq

    async def _owned(
        self, client_id: str, job_ids: list[str]
    ) -> tuple[dict[str, JobRecord], list[str]]:
        """The named jobs of ``client_id`` by id, and the other ids (unknown or another
        client's): each id read once, in order."""
        owned: dict[str, JobRecord] = {}
        missing: list[str] = []
        for job_id in dict.fromkeys(job_ids):
            rec = await self.get_job(job_id)
            if rec is None or rec.client_id != client_id:
                missing.append(job_id)
            else:
                owned[job_id] = rec
        return owned, missing

    def unsubscribe(self, sub: Subscriber, job_ids: Sequence[str] | None = None) -> None:
        """Stop following the given jobs, or everything (``None``). While the socket follows
        "all", only this client's jobs that can still have events are muted: any other id
        names nothing that could arrive (a client muting made-up ids grew memory for good).
        """
        if job_ids is None:
            self.fanout.unsubscribe(sub)
            return

        def live(job_id: str) -> bool:
            job = self.scheduler.jobs.get(job_id)
            if job is None or job.client_id != sub.client_id:
                return False
            if job.state not in TERMINAL:
                return True
            # Its terminal event may not be published yet: then the job as last published is
            # not terminal, or there is none (a job restored at start-up that had no event
            # since). A published end stays in ``_visible`` while the scheduler keeps the job.
            rec = self._visible.get(job_id)
            return rec is None or rec.state not in TERMINAL

        self.fanout.unsubscribe(sub, job_ids, live=live)

    async def _replay(self, sub: Subscriber, job_id: str, last: int) -> tuple[int, bool]:
        """Queue the stored events of ``job_id`` after ``last``, page by page; returns the last
        seq queued and whether that event ended the job. Replayed frames are never dropped:
        past half the outbox's soft limit, or half its characters, the replay waits for the
        socket to take them (a long log, or many large results, would overflow it, 4429)."""
        outbox = sub.outbox
        room = max(1, outbox.soft_limit // 2)
        ended = False
        while True:
            page = await self.store.events_after(job_id, last, REPLAY_PAGE)
            for event in page:
                frame = event_frame(event)
                if not outbox.has_room(room, len(frame)):
                    await outbox.drained(room, len(frame))
                outbox.put(frame, job_id=job_id, seq=event.seq)
                last = event.seq
                ended = event.state in TERMINAL
            if len(page) < REPLAY_PAGE or outbox.closed:
                return last, ended

    # ---- miners -----------------------------------------------------------------------------

    def miner_hello(
        self,
        *,
        miner_id: str,
        key_hash: str,
        session_id: str,
        sink: MinerSink,
        capabilities: JSONObject,
        concurrency: int,
        region: str | None,
        resume_session: str | None,
        then: Callable[[ResumeInfo], None],
    ) -> None:
        """Bind the id to the key on first use, then connect; ``then`` sends the welcome."""
        self._check_open()
        self._bind(miner_id, key_hash)
        now = self._now()
        info, effects = self.scheduler.connect(
            miner_id,
            session_id,
            capabilities=capabilities,
            concurrency=concurrency,
            region=region,
            resume_session=resume_session,
            now=now,
        )
        self._sinks[session_id] = sink
        self._writes.miners[miner_id] = MinerRecord(
            miner_id=miner_id,
            key_hash=key_hash,
            session_id=session_id,
            capabilities=capabilities,
            concurrency=concurrency,
            region=region,
            last_seen=now,
        )
        self._actions.append(lambda: then(info))
        self._apply(effects)

    def _bind(self, miner_id: str, key_hash: str) -> None:
        """A miner id belongs to the key that first used it (NotAllowed for any other). A key
        binds at most ``max_ids_per_key`` ids (NotAllowed for one more): a key that named a new
        id at each hello grew the bindings, and the miners table, without bound."""
        self.check_key(miner_id, key_hash)
        if miner_id not in self._bindings:
            n = self._ids_of_key.get(key_hash, 0)
            if self.max_ids_per_key is not None and n >= self.max_ids_per_key:
                raise NotAllowed(
                    f"this key has {n} miner ids, the most one key may have "
                    "(MAX_MINER_IDS_PER_KEY): reuse one of them"
                )
            self._ids_of_key[key_hash] = n + 1
        self._bindings[miner_id] = key_hash

    def bound_key(self, miner_id: str) -> str | None:
        """The key hash ``miner_id`` is bound to (None: no key has used it yet)."""
        return self._bindings.get(miner_id)

    def check_key(self, miner_id: str, key_hash: str) -> None:
        """Raise NotAllowed when ``miner_id`` is bound to a key other than ``key_hash``.

        Every REST miner call names its miner (``X-Miner-ID``): without this check another
        miner key could poll that miner's jobs or report results for them.
        """
        bound = self.bound_key(miner_id)
        if bound is not None and bound != key_hash:
            raise NotAllowed(f"miner id {miner_id!r} is bound to another key")

    def miner_gone(self, miner_id: str, session_id: str) -> None:
        if self._sinks.get(session_id) is not None:
            del self._sinks[session_id]
        self._apply(self.scheduler.disconnect(miner_id, session_id, self._now()))

    def miner_call(self, method: str, miner_id: str, *args: Any, **kwargs: Any) -> None:
        """Forward accept/reject/progress/fail/set_status to the scheduler (errors propagate)."""
        self._apply(getattr(self.scheduler, method)(miner_id, *args, now=self._now(), **kwargs))

    def miner_result(
        self,
        miner_id: str,
        job_id: str,
        result: JSONObject,
        metrics: JSONObject,
        attempt: int | None,
        then: Callable[[JobRecord], None],
        attestation: JSONObject | None = None,
        size: int = 0,
    ) -> None:
        """Complete a job; ``then(record)`` (with the receipt) runs once it is durable.
        ``size``: the result's message as received, in bytes (``Scheduler.complete``)."""
        job, effects = self.scheduler.complete(
            miner_id, job_id, result, metrics, self._now(), attempt, attestation, size
        )
        rec = _snapshot(job, effects)
        self._actions.append(lambda: then(rec))
        self._apply(effects)

    async def stored_receipt(
        self, miner_id: str, job_id: str, attempt: int | None = None
    ) -> JSONObject | None:
        """For a retried result of a job no longer in memory: its receipt, if this miner
        completed it (in ``attempt``, when given: a stale attempt's retry is refused, as it is
        while the job is in memory); None otherwise."""
        rec = await self.store.get_job(job_id)
        if rec is None:
            raise UnknownJob(job_id)
        if (
            rec.state == JobState.COMPLETED
            and rec.miner_id == miner_id
            and (attempt is None or attempt == rec.attempt)
        ):
            return rec.receipt
        return None

    # ---- REST miners (rest-api.md §2.3) -------------------------------------------------------

    def _rest_connect(self, m: MinerRecord, *, resume: bool) -> None:
        assert m.session_id is not None
        miner = self.scheduler.miners.get(m.miner_id)
        live = miner is not None and miner.connected and miner.session_id == m.session_id
        if not (live and isinstance(self._sinks.get(m.session_id), _RestSink)):
            # Not a live REST session (new, or back after an operator's disconnect whose close
            # may still wait for its commit): a sink of its own, which that close leaves alone.
            self._sinks[m.session_id] = _RestSink(self, m.miner_id)
        _, effects = self.scheduler.connect(
            m.miner_id,
            m.session_id,
            capabilities=m.capabilities,
            concurrency=m.concurrency,
            region=m.region,
            resume_session=m.session_id if resume else None,
            now=self._now(),
            rest=True,
        )
        self._apply(effects)

    async def rest_register(
        self,
        *,
        miner_id: str,
        key_hash: str,
        capabilities: JSONObject,
        concurrency: int,
        region: str | None,
        update: bool = False,
    ) -> None:
        """Register (or re-register) a polling miner; returns once it is durable.

        The id is bound to the key that first used it (NotAllowed otherwise). Re-registering
        is a restart: jobs the miner held go back to the queue. ``update=True`` (``PUT
        …/capabilities``) changes a registered miner in place instead: it keeps its jobs
        (UnknownMiner when it is not registered).
        """
        self._check_open()
        if update:
            self._rest_miner(miner_id)
        self._bind(miner_id, key_hash)
        now = self.clock.now()
        record = MinerRecord(
            miner_id=miner_id,
            key_hash=key_hash,
            session_id=REST_SESSION_PREFIX + miner_id,
            capabilities=capabilities,
            concurrency=concurrency,
            region=region,
            last_seen=now,
        )
        self._rest_seen[miner_id] = now
        self._rest_away.pop(miner_id, None)
        self._writes.miners[miner_id] = record
        self._rest_connect(record, resume=update)
        await self._until_committed(self._commit_then)

    async def rest_deregister(self, miner_id: str) -> None:
        """Remove a polling miner (``DELETE /v1/miners/{id}``); returns once it is durable.

        The jobs it held go back to the queue, not charged (``Scheduler.leave``), its waiting
        polls end empty, and later calls get UnknownMiner until it registers again. The id
        stays bound to its key. Raises UnknownMiner unless ``miner_id`` is a registered REST
        miner.
        """
        self._check_open()
        sink = self._rest_miner(miner_id)
        # No session: not restored at start-up.
        self._writes.miners[miner_id] = self._rest_record(miner_id, None)
        del self._sinks[REST_SESSION_PREFIX + miner_id]
        self._rest_seen.pop(miner_id, None)
        self._apply(self.scheduler.leave(miner_id, self._now()))
        self.after_commit(lambda: sink.close(CloseCode.NORMAL, "deregistered"))  # polls end
        await self._until_committed(self._commit_then)

    def _rest_record(self, miner_id: str, session_id: str | None) -> MinerRecord:
        """The stored row of the REST miner ``miner_id`` as the scheduler has it now."""
        miner = self.scheduler.miners[miner_id]
        return MinerRecord(
            miner_id=miner_id,
            key_hash=self._bindings[miner_id],
            session_id=session_id,
            capabilities=miner.capabilities,
            concurrency=miner.concurrency,
            region=miner.region,
            last_seen=self.clock.now(),
        )

    async def barrier(self) -> None:
        """Return once everything queued so far is committed (e.g. before a refusal that
        reveals state, such as a balance that counts uncommitted reservations)."""
        await self._until_committed(self._commit_then)

    async def committed(self, value: T) -> T:
        """``value``, read from in-memory state just now (the scheduler's miners, its figures),
        once everything that state may reflect is committed: the scheduler runs ahead of the
        store by the batches in flight, and a read must not show what a failed commit would
        undo (a miner whose hello or registration is being committed). Raises Unavailable when
        the writer stopped on a failed commit."""
        await self.barrier()
        return value

    async def before_refusal(self) -> None:
        """Wait until the state a refusal was decided on is durable, as ``barrier`` (a refusal
        must not reveal uncommitted state: a job whose end is being committed is not
        cancelable yet). Raises Unavailable once the writer has stopped (a failed commit, or
        shut down): that state may never be durable, so the refusal must not be sent.
        """
        if self._gone is not None:
            raise Unavailable(self._gone)
        if self.running or self._closing:  # ``stop()``: the writer still flushes the batch
            await self.barrier()

    def _commit_then(self, then: Callable[[None], None]) -> None:
        """``after_commit`` for ``_until_committed``: ``then(None)`` once all is durable."""
        self.after_commit(lambda: then(None))

    def _rest_back(self, miner_id: str) -> None:
        """Any call of a REST miner an operator disconnected brings it back: it resumes what
        it still holds, as at start-up (a result it posts is then that of a connected miner,
        paid to the payout wallet its capabilities name)."""
        away = self._rest_away.pop(miner_id, None)
        if away is not None:
            self._rest_connect(away, resume=True)

    def _rest_miner(self, miner_id: str) -> _RestSink:
        self._rest_back(miner_id)
        miner = self.scheduler.miners.get(miner_id)
        sink = self._sinks.get(REST_SESSION_PREFIX + miner_id)
        if miner is None or not miner.rest or not isinstance(sink, _RestSink):
            raise UnknownMiner(miner_id)
        return sink

    def rest_heartbeat(self, miner_id: str) -> None:
        """Record that a REST miner is alive; raises UnknownMiner when it never registered."""
        self._rest_miner(miner_id)
        self._rest_seen[miner_id] = self.clock.now()

    async def rest_poll(
        self,
        miner_id: str,
        max_wait: float,
        answer: Callable[[JobAssign], bool] | None = None,
        hangup: Callable[[Callable[[], None]], None] | None = None,
    ) -> JobAssign | None:
        """Wait up to ``max_wait`` seconds (on ``self.clock``) for a job for this miner.

        Returns the assignment only after it is committed. When the wait ends just as an
        assignment was produced for it (``poll_cancel`` says so), the poll waits for that
        commit and returns the job instead of losing it.

        ``answer``, when given, is called with the assignment as soon as it is committed,
        from the batch that committed it and before this coroutine resumes: the web layer
        writes the poll's response there and then instead of waiting for its task to run.
        It returns False when the poll's client is gone: the job is then handed back to the
        queue (not charged) and this poll returns None. It must not raise (an exception is
        logged and the poll answers as if none were given).

        ``hangup``, when given, is called once with a function the web layer calls when the
        poll's client goes away while it waits: the poll then ends at once and withdraws its
        slot, so no job is offered to a miner that is gone. That function may be called at any
        time, also after the poll ended (it then does nothing).
        """
        self._check_open()
        if self._polls_ended:
            raise Unavailable("the coordinator is shutting down")
        sink = self._rest_miner(miner_id)
        waiter = _PollWaiter(answer, self.new_event())
        sink.make_room(self.scheduler.miners[miner_id].concurrency)
        sink.waiters.append(waiter)
        self._rest_seen[miner_id] = self.clock.now()
        try:
            self._apply(self.scheduler.poll(miner_id, self._now()))
        except DispatchError:
            sink.waiters.remove(waiter)
            raise
        if hangup is not None:
            hangup(waiter.done.set)
        withdrawn = False
        try:
            await self.clock.wait_until(self.clock.now() + max_wait, waiter.done)
            if waiter.job is None and not waiter.void:
                withdrawn = self._withdraw(miner_id, sink)
                if not withdrawn:  # an assignment was made for us: wait for its commit
                    with anyio.move_on_after(30):
                        await waiter.done.wait()
            return waiter.job
        finally:
            self._rest_alive(miner_id)  # not when it deregistered meanwhile
            if waiter.job is None:
                # Unanswered or cancelled (client gone): withdraw. An assignment already in
                # flight then finds no waiter and is handed back to the queue.
                waiter.done.set()
                if waiter in sink.waiters:
                    sink.waiters.remove(waiter)
                    if not withdrawn:
                        self._withdraw(miner_id, sink)

    def _withdraw(self, miner_id: str, sink: _RestSink) -> bool:
        """``poll_cancel`` for a poll of ``sink``; nothing once that miner deregistered (its
        polls went with it, and the slots now counted belong to a new registration)."""
        if self._sinks.get(REST_SESSION_PREFIX + miner_id) is not sink:
            return True
        return self.scheduler.poll_cancel(miner_id)

    def _still_assigned(self, miner_id: str, msg: JobAssign) -> bool:
        """Whether the job of ``msg`` is still this attempt of ``miner_id``'s (not canceled,
        expired or requeued since it was assigned)."""
        job = self.scheduler.jobs.get(msg.job_id)
        return (
            job is not None
            and job.state is JobState.RUNNING
            and job.miner_id == miner_id
            and job.attempt == msg.attempt
        )

    def _rest_orphan(self, miner_id: str, msg: JobAssign) -> None:
        try:
            self._apply(self.scheduler.hand_back(miner_id, msg.job_id, self._now(), msg.attempt))
        except DispatchError:
            pass  # the job moved on meanwhile (canceled, expired): nothing to hand back

    async def rest_result(
        self,
        miner_id: str,
        job_id: str,
        result: JSONObject,
        metrics: JSONObject,
        size: int = 0,
        attempt: int | None = None,
    ) -> JobRecord:
        """Complete a job held by a REST miner; returns the committed record (with receipt).
        ``attempt``: when the miner names it, a result of another attempt is refused."""
        self._rest_back(miner_id)
        self._rest_alive(miner_id)
        return await self._until_committed(
            lambda then: self.miner_result(
                miner_id, job_id, result, metrics, attempt, then, size=size
            )
        )

    async def rest_fail(
        self,
        miner_id: str,
        job_id: str,
        error_code: str,
        message: str,
        *,
        retryable: bool = False,
        attempt: int | None = None,
    ) -> None:
        """A REST miner's failure of a job it holds: FAILED, or with ``retryable`` queued again
        (charged an attempt; FAILED once they are used up). Returns once durable."""
        self._rest_back(miner_id)
        self._rest_alive(miner_id)
        self.miner_call(
            "fail",
            miner_id,
            job_id,
            error_code=error_code,
            error_message=message,
            retryable=retryable,
            attempt=attempt,
        )
        await self._until_committed(self._commit_then)

    def _rest_alive(self, miner_id: str) -> None:
        """Record a call of ``miner_id`` when it is a registered REST miner: an id no REST
        miner holds (made up, or deregistered) stayed in ``_rest_seen`` for good."""
        miner = self.scheduler.miners.get(miner_id)
        if miner is not None and miner.rest:
            self._rest_seen[miner_id] = self.clock.now()

    def rest_online(self, miner: Miner, now: float) -> bool:
        """Whether the REST miner ``miner`` is online: a poll of it waits, or it made a call
        within ``rest_online_window`` (a REST miner stays registered until it deregisters)."""
        seen = self._rest_seen.get(miner.miner_id)
        return miner.polls > 0 or (seen is not None and now - seen <= self.rest_online_window)

    def rest_last_calls(self) -> Iterable[tuple[str, float]]:
        """Each registered REST miner with the time of its last call."""
        return self._rest_seen.items()

    def rest_last_call(self, miner_id: str) -> float | None:
        """The time of the last call of the REST miner ``miner_id``, if any."""
        return self._rest_seen.get(miner_id)

    def rest_miners(self) -> list[RestMinerInfo]:
        """Every miner the scheduler knows, with liveness: connected (not waiting for a resume)
        and, for a REST miner, holding a job (its lease keeps it: it need not call until its
        result) or ``rest_online``, as the ops page's rows show it."""
        now = self.clock.now()
        out = []
        for m in self.scheduler.miners.values():
            seen = self._rest_seen.get(m.miner_id) if m.rest else None
            online = m.connected and (not m.rest or bool(m.jobs) or self.rest_online(m, now))
            out.append(
                RestMinerInfo(
                    miner_id=m.miner_id,
                    transport="rest" if m.rest else "websocket",
                    online=online,
                    inflight=len(m.jobs),
                    concurrency=m.concurrency,
                    region=m.region,
                    last_seen=seen,
                )
            )
        return out

    def is_servable(self, constraints: JSONObject) -> bool:
        """Whether some known miner could run a job with ``constraints``, among the miners as
        last committed (the scheduler's ``is_servable`` may count a miner whose hello or
        registration is still being committed, which a reader must not see)."""
        needs = JobNeeds.parse(constraints)
        verdict = self._servable.get(needs)
        if verdict is None:
            if len(self._servable) >= 4096:
                self._servable.clear()
            verdict = self._servable[needs] = self.scheduler.servable_among(
                needs, self._committed_caps
            )
        return verdict

    # ---- observation ------------------------------------------------------------------------

    def statistics(self) -> DispatcherStatistics:
        """Everything, the scheduler's figures included (those walk every miner)."""
        return DispatcherStatistics(
            scheduler=self.scheduler.statistics(),
            writes=self._written,
            **self.writer_statistics(),
        )

    def writer_statistics(self) -> dict[str, int]:
        """The writer's and the fan-out's figures: cheap, no walk over miners or jobs."""
        return {
            "batches": self._batches,
            "last_batch_size": self._last_batch,
            "pending_writes": len(self._writes),
            "subscribers": self.fanout.subscriber_count,
            "progress_dropped": self.fanout.progress_dropped,
        }


class _Lookup:
    """A submit waiting for its idempotency key's store lookup (``Dispatcher.submit_soon``)."""

    __slots__ = ("queued", "refused", "spec", "then")

    def __init__(
        self,
        spec: JobSpec,
        then: Callable[[JobRecord, bool], None],
        refused: Callable[[Exception], None],
        queued: Callable[[], None] | None,
    ) -> None:
        self.spec, self.then, self.refused, self.queued = spec, then, refused, queued


class _PollWaiter:
    __slots__ = ("answer", "done", "job", "void")

    def __init__(self, answer: Callable[[JobAssign], bool] | None, done: anyio.Event) -> None:
        self.answer = answer
        self.done = done
        self.job: JobAssign | None = None
        # Its assignment was taken back before it was delivered: it ends with no job, and the
        # scheduler's count of waiting polls already left it out (nothing to withdraw).
        self.void = False


class _RestSink:
    """The "socket" of a REST miner: hands committed assignments to its polls, oldest first."""

    def __init__(self, dispatcher: Dispatcher, miner_id: str) -> None:
        self.dispatcher = dispatcher
        self.miner_id = miner_id
        self.waiters: deque[_PollWaiter] = deque()

    def send_frame(self, frame: str) -> None:
        """Any other frame (a cancel or lease revoke): the miner learns it from a 409 on its
        result. Assignments come through ``assign``."""

    def make_room(self, concurrency: int) -> None:
        """Before a new poll waits: end the oldest waiting ones (as if their wait ran out) so
        that at most ``concurrency`` wait, the new one included. No more can ever be given a
        job at once; each held a request (and its socket) for up to MAX_POLL_WAIT_SECONDS,
        as many as the miner sent. The newest wins: a poll whose connection was lost on the
        way is replaced by the miner's next one."""
        waiting = [w for w in self.waiters if not w.done.is_set()]
        for waiter in waiting[: max(0, len(waiting) - concurrency + 1)]:
            waiter.done.set()  # as a hang-up: ``rest_poll`` withdraws it, answers no job

    def flush(self) -> None:
        """A poll's answer is written by ``assign`` or by its own task: nothing to do here."""

    def assign(self, msg: JobAssign) -> None:
        """Hand a committed assignment to the oldest waiting poll; with none, or when that
        poll's client hung up, the job goes back to the queue (``hand_back``, not charged).

        A job taken back meanwhile (canceled, expired or requeued in the same batch, or in the
        one now filling) is not handed out: that poll ends with no job (a 204) and the miner
        polls again. A REST miner hears of a cancel only from a 409 on its result: it got the
        job, ran it, and was refused (rest-api.md, "Long-poll").
        """
        taken_back = not self.dispatcher._still_assigned(self.miner_id, msg)
        while self.waiters:
            waiter = self.waiters.popleft()
            if waiter.done.is_set():
                continue
            if taken_back:
                waiter.void = True
                waiter.done.set()
                return
            if not self._answer(waiter, msg):
                waiter.done.set()  # its client hung up: nobody would read the job
                break
            waiter.job = msg
            waiter.done.set()
            return
        if not taken_back:
            self.dispatcher._rest_orphan(self.miner_id, msg)

    def _answer(self, waiter: _PollWaiter, msg: JobAssign) -> bool:
        """Let the poll write its answer now (``rest_poll``); False: its client is gone."""
        if waiter.answer is None:
            return True
        try:
            return waiter.answer(msg)
        except Exception:
            log.exception("answering the long-poll of %s failed", self.miner_id)
            return True  # its task answers as usual

    def close(self, code: CloseCode, reason: str) -> None:
        """The session ended (an operator's disconnect, or a socket session of the same miner
        replaced it): its waiting polls end now, empty (the scheduler no longer counts them)."""
        for waiter in self.waiters:
            waiter.done.set()


@dataclass(frozen=True, slots=True, kw_only=True)
class RestMinerInfo:
    miner_id: str
    transport: str
    online: bool
    inflight: int
    concurrency: int
    region: str | None
    last_seen: float | None
