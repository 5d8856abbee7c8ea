"""The pure scheduler: jobs, miners, leases and timers, with time passed in.

Rule 1: no I/O, no clock, no randomness. Every public method takes ``now`` (Unix seconds) and
returns the list of :mod:`dispatcher.effects` the runtime must carry out, in order.
Rule 2: invariants (checked by the state-machine test): a job is leased by at most one miner;
a miner never holds more jobs than its ``concurrency``; terminal states are absorbing; every
active job is either in the queue or leased; ``next_deadline()`` is never in the past after
``tick(now)``.
Rule 3: ``attempt`` is the fencing token. It grows at every assignment; a result, progress or
failure naming another attempt, or coming from a miner that no longer holds the job, is refused
with ``NotAssigned`` and changes nothing.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from dispatcher.effects import Assign, CloseSession, Effect, Persist, Revoke
from dispatcher.errors import NotAssigned, ProgressLimit, UnknownJob, UnknownMiner
from dispatcher.jobs import ACTIVE, TERMINAL, Action, Job, JobState, transition
from dispatcher.policy import Capabilities, IdleIndex, JobNeeds, JobQueue, MatchCache
from dispatcher.stats import SchedulerStatistics
from protocol.records import EventRecord, JobRecord
from protocol.types import CloseCode, EventKind, JSONObject

__all__ = ["JobSpec", "Miner", "ReceiptFactory", "ResumeInfo", "Scheduler", "SchedulerConfig"]

# What a progress event counts against ``max_progress_bytes`` besides its text: about its
# stored row without data, so a stream of empty events is bounded too.
PROGRESS_EVENT_COST = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerConfig:
    default_ttl: float = 900.0
    max_ttl: float = 7 * 86400.0
    max_attempts: int = 3
    accept_timeout: float = 10.0
    resume_grace: float = 15.0
    # A socket may be dead this long before its close is noticed (the heartbeat's interval plus
    # its timeout; web/app.py sets it so): a ``job.cancel`` pushed to a session within this
    # long before it ended may have been lost with it, so its resume names the job again in
    # ``revoked`` (docs/protocol.md, welcome).
    revoke_window: float = 40.0
    rest_lease: float = 600.0
    terminal_retention: int = 10_000
    # Ended jobs are also kept only while the bytes of their payloads and results (as received,
    # ``JobSpec.size`` and ``complete(size=...)``) add up to at most this (docs/architecture.md).
    terminal_retention_bytes: int = 256 << 20
    # A miner that refused a job (reject, accept timeout) is offered it again only after this
    # pause, doubled for each further refusal of that job and capped: other miners first.
    reject_pause: float = 5.0
    reject_pause_max: float = 300.0
    # Bytes of progress a job may store (all attempts; docs/protocol.md): each event counts its
    # ``output`` and ``message`` characters plus PROGRESS_EVENT_COST, so tiny events count too.
    max_progress_bytes: int = 64 << 20


class JobSpec(NamedTuple):
    """A submission as the scheduler takes it (a NamedTuple: one per submit)."""

    job_id: str
    client_id: str
    payload: JSONObject
    constraints: JSONObject
    ttl_seconds: float | None = None
    priority: int = 0
    idempotency_key: str | None = None
    payment: JSONObject | None = None  # a reservation made by the runtime (docs/wallet.md)
    # The submission's size as received (its frame or body, in bytes): what the job's payload
    # counts against ``terminal_retention_bytes`` once it ends. Never encoded again to find it.
    size: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ResumeInfo:
    resumed: tuple[str, ...]
    revoked: tuple[str, ...]


# receipt_factory(job, unit_price, now) -> signed receipt. Injected so the core stays pure.
ReceiptFactory = Callable[[Job, "float | None", float], JSONObject]


# The action that takes a job to each terminal state (``_finish``).
_FINISH = {
    JobState.COMPLETED: Action.COMPLETE,
    JobState.FAILED: Action.FAIL,
    JobState.CANCELED: Action.CANCEL,
    JobState.EXPIRED: Action.EXPIRE,
}
# The data of an event that carries none: shared, as event data is never mutated once emitted.
_NO_DATA: JSONObject = {}


class Miner:
    """Scheduler-side state of one miner identity."""

    __slots__ = (
        "capabilities",
        "caps",
        "concurrency",
        "connected",
        "counted",
        "draining",
        "grace_timer",
        "jobs",
        "miner_id",
        "polls",
        "pushed",
        "region",
        "rest",
        "revoked",
        "session_id",
    )

    def __init__(self, miner_id: str, session_id: str) -> None:
        self.miner_id = miner_id
        self.session_id = session_id
        self.capabilities: JSONObject = {}
        self.region: str | None = None
        self.caps = Capabilities.parse({}, None)  # a shared instance: nothing is parsed
        self.concurrency = 1
        self.draining = False
        self.connected = False
        self.counted = False  # contributes to the scheduler's known capability classes
        self.jobs: dict[str, None] = {}
        # Jobs revoked while away (no socket to tell): the resume's ``revoked`` names them.
        self.revoked: list[str] = []
        # (when, job id) of each ``job.cancel`` pushed to the live session, oldest first, within
        # ``revoke_window``: lost if the socket was dead already (``_session_ended``).
        self.pushed: list[tuple[float, str]] = []
        self.grace_timer: _Timer | None = None
        # A REST miner (rest-api.md §2.3) has no socket to push to: only a waiting poll can
        # take a job, so its free slots are capped by the number of polls waiting right now.
        self.rest = False
        self.polls = 0

    @property
    def free(self) -> int:
        free = self.concurrency - len(self.jobs)
        return min(free, self.polls) if self.rest else free


_NOT_PAUSED = (0.0, 0)  # (offered again from, refusals) of a miner that never refused
_NOBODY: set[str] = set()  # never changed: ``IdleIndex.pick`` only reads it


class _Timer:
    __slots__ = ("dead", "key", "kind", "n", "token", "when")

    def __init__(self, when: float, n: int, kind: str, key: str, token: object) -> None:
        self.when, self.n, self.kind, self.key, self.token = when, n, kind, key, token
        self.dead = False


class Scheduler:
    """Owns every active job and every connected miner. See the module rules."""

    def __init__(
        self, config: SchedulerConfig | None = None, receipt_factory: ReceiptFactory | None = None
    ) -> None:
        self.config = config or SchedulerConfig()
        self._receipt_factory = receipt_factory
        self.jobs: dict[str, Job] = {}
        self.miners: dict[str, Miner] = {}
        # Ended jobs still in ``jobs``, oldest first, with their sizes (``_retain``).
        self._terminal: OrderedDict[str, int] = OrderedDict()
        self._terminal_bytes = 0
        self._idem: dict[tuple[str, str], str] = {}
        self._match = MatchCache()
        self._idle = IdleIndex(self._match)
        self._queue = JobQueue(self._match, self._needs_servable)
        self._queued = 0
        self._stale_entries = 0  # queue entries gone stale without a pick (``_entry_gone``)
        self._known_caps: dict[Capabilities, int] = {}
        self._servable: dict[JobNeeds, bool] = {}  # is_servable verdicts for _known_caps
        self.caps_version = 0  # grows whenever the classes in ``_known_caps`` change
        # A heap of (when, n, timer): tuples compare in C, and ``n`` is unique (never a tie).
        self._timers: list[tuple[float, int, _Timer]] = []
        self._dead_timers = 0
        self._n = 0
        # This call's effects so far; ``_emit`` queues its events bare, ``_take`` wraps them.
        self._effects: list[Effect | EventRecord] = []
        self._touched: dict[str, Job] = {}
        # Miners whose resume grace ended: (last session, jobs taken from it), so a late resume
        # still learns what was revoked (docs/protocol.md, welcome.revoked).
        self._lost: OrderedDict[str, tuple[str, list[str]]] = OrderedDict()
        self.counters: dict[str, int] = {k.value: 0 for k in EventKind}
        # Ids of the miners added, dropped, or whose session, connection, drain state,
        # concurrency or held jobs changed since ``take_changed_miners`` (the ops feed's deltas
        # look at these instead of every miner).
        self._changed_miners: set[str] = set()

    # ---- queries ----------------------------------------------------------------------------

    def job(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def find_idempotent(self, client_id: str, key: str) -> Job | None:
        job_id = self._idem.get((client_id, key))
        return None if job_id is None else self.jobs.get(job_id)

    def is_servable(self, constraints: JSONObject) -> bool:
        """True when some known miner (connected or within its resume grace) could run it."""
        return self._needs_servable(JobNeeds.parse(constraints))

    def known_classes(self) -> tuple[Capabilities, ...]:
        """The capability classes of the known miners, as ``is_servable`` looks at them."""
        return tuple(self._known_caps)

    def servable_among(self, needs: JobNeeds, classes: tuple[Capabilities, ...]) -> bool:
        """``is_servable`` against ``classes`` (``known_classes`` as it was at some point)."""
        return any(self._match(needs, caps) for caps in classes)

    def _needs_servable(self, needs: JobNeeds) -> bool:
        verdict = self._servable.get(needs)
        if verdict is None:
            if len(self._servable) >= 4096:
                self._servable.clear()
            verdict = self._servable[needs] = any(
                self._match(needs, caps) for caps in self._known_caps
            )
        return verdict

    def take_changed_miners(self) -> set[str]:
        """The miners changed since the last call (see ``_changed_miners``), and forget them."""
        changed, self._changed_miners = self._changed_miners, set()
        return changed

    def next_deadline(self) -> float | None:
        timers = self._timers
        while timers and timers[0][2].dead:
            heapq.heappop(timers)
            self._dead_timers -= 1
        return timers[0][0] if timers else None

    def statistics(self) -> SchedulerStatistics:
        connected = [m for m in self.miners.values() if m.connected]
        return SchedulerStatistics(
            jobs_queued=self._queued,
            jobs_running=sum(len(m.jobs) for m in self.miners.values()),
            jobs_in_memory=len(self.jobs),
            miners_connected=len(connected),
            miners_in_grace=len(self.miners) - len(connected),
            miners_idle=len(self._idle),
            slots_total=sum(m.concurrency for m in connected),
            slots_used=sum(len(m.jobs) for m in connected),
            timers=len(self._timers) - self._dead_timers,
            events=dict(self.counters),
        )

    # ---- clients ----------------------------------------------------------------------------

    def submit(self, spec: JobSpec, now: float) -> tuple[Job, list[Effect]]:
        """Queue a new job (or return the existing one for a repeated idempotency key)."""
        if spec.idempotency_key is not None:
            existing = self.find_idempotent(spec.client_id, spec.idempotency_key)
            if existing is not None:
                return existing, []
        ttl = self.config.default_ttl if spec.ttl_seconds is None else spec.ttl_seconds
        ttl = min(max(ttl, 1.0), self.config.max_ttl)
        job = Job(
            job_id=spec.job_id,
            client_id=spec.client_id,
            payload=spec.payload,
            constraints=spec.constraints,
            priority=spec.priority,
            requested_at=now,
            expires_at=now + ttl,
            max_attempts=self.config.max_attempts,
            idempotency_key=spec.idempotency_key,
            payment=spec.payment,
        )
        job.size = spec.size
        self._admit(job)
        self._emit(job, EventKind.QUEUED, now)
        self._dispatch(job, now)
        return job, self._take()

    def cancel(self, client_id: str, job_id: str, now: float) -> tuple[Job, list[Effect]]:
        """Client cancel; raises UnknownJob (not found / not the owner) or InvalidTransition."""
        job = self.jobs.get(job_id)
        if job is None or job.client_id != client_id:
            raise UnknownJob(job_id)
        return self._cancel(job, now, "canceled by client", "canceled")

    def _cancel(
        self, job: Job, now: float, error: str, revoke_reason: str
    ) -> tuple[Job, list[Effect]]:
        transition(job.job_id, job.state, Action.CANCEL)
        self._finish(
            job,
            JobState.CANCELED,
            EventKind.CANCELED,
            now,
            error=error,
            revoke_reason=revoke_reason,
            clear_miner=True,
        )
        return job, self._take()

    # ---- operators (docs/ops.md, "Actions") -------------------------------------------------

    def admin_cancel(self, job_id: str, now: float) -> tuple[Job, list[Effect]]:
        """Cancel any client's job; raises UnknownJob or InvalidTransition (terminal job)."""
        job = self.jobs.get(job_id)
        if job is None:
            raise UnknownJob(job_id)
        return self._cancel(job, now, "canceled by admin", "canceled by admin")

    def requeue(self, job_id: str, now: float) -> tuple[Job, list[Effect]]:
        """Take a RUNNING job back from its miner and queue it again, not charged.

        The miner is told to stop (``Revoke``) and is not offered this job again, so the job
        moves to another miner. Raises UnknownJob, or InvalidTransition unless RUNNING.
        """
        job = self.jobs.get(job_id)
        if job is None:
            raise UnknownJob(job_id)
        transition(job_id, job.state, Action.REQUEUE)
        assert job.miner_id is not None  # every RUNNING job is leased (Rule 2)
        job.rejected_by[job.miner_id] = (math.inf, 0)  # moved elsewhere for good
        self._revoke(job, "requeued by admin", now)
        self._requeue(job, now, "requeued by admin", charged=False)
        return job, self._take()

    def disconnect_miner(self, miner_id: str, now: float) -> list[Effect]:
        """Close a connected miner's session; its jobs then go as on any disconnect.

        Raises UnknownMiner unless the miner is connected. Started jobs wait ``resume_grace``
        (the miner may come back and resume them); a new session may connect at any time.
        """
        miner = self._miner(miner_id)
        self._effects.append(
            CloseSession(
                miner_id=miner_id,
                session_id=miner.session_id,
                code=CloseCode.NORMAL,
                reason="disconnected by an operator",
            )
        )
        return self.disconnect(miner_id, miner.session_id, now)

    # ---- miners -----------------------------------------------------------------------------

    def connect(
        self,
        miner_id: str,
        session_id: str,
        *,
        capabilities: JSONObject,
        concurrency: int,
        region: str | None,
        resume_session: str | None,
        now: float,
        rest: bool = False,
    ) -> tuple[ResumeInfo, list[Effect]]:
        """A miner finished its hello. Handles replacement (4409), resume and restart.

        ``rest=True`` registers a REST (polling) miner: it is offered jobs only while one of
        its polls waits (:meth:`poll`), a job it takes starts at once, and the job's run limit
        is ``rest_lease`` instead of socket liveness (the production miner is silent while it
        works, rest-api.md §3.2).
        """
        miner = self.miners.get(miner_id)
        resumed: list[str] = []
        revoked: list[str] = []
        lost = self._lost.pop(miner_id, None)
        if miner is None:
            miner = self.miners[miner_id] = Miner(miner_id, session_id)
            if lost is not None and resume_session == lost[0]:
                # Back after its grace ended: say which of its jobs were taken away.
                revoked = lost[1]
        else:
            self._forget_caps(miner)
            self._idle.discard(miner_id)
            self._session_ended(miner, now)  # nothing unless that session is live
            if miner.connected and miner.session_id != session_id:
                self._effects.append(
                    CloseSession(
                        miner_id=miner_id,
                        session_id=miner.session_id,
                        code=CloseCode.REPLACED,
                        reason="replaced",
                    )
                )
            miner.connected = False
            self._kill_timer(miner.grace_timer)
            miner.grace_timer = None
            if resume_session is not None and resume_session == miner.session_id:
                resumed, revoked = self._resume(miner, now)
            else:
                # A new session that did not resume: whatever the old one held is lost.
                for job_id in list(miner.jobs):
                    revoked.append(job_id)
                    job = self.jobs[job_id]
                    # Like a disconnect: only a started attempt counts against the job.
                    self._requeue(job, now, "miner restarted", charged=job.accepted)
                revoked = miner.revoked + revoked
            miner.revoked = []
            miner.session_id = session_id
        miner.capabilities = capabilities
        miner.region = region
        miner.caps = Capabilities.parse(capabilities, region)
        miner.concurrency = concurrency
        miner.draining = False
        if rest and resumed:
            for job_id in resumed:  # e.g. after a restart: the run limit starts again
                self._arm_lease(self.jobs[job_id], now)
        elif resumed and miner.rest:  # a REST session resumed over a socket: no run limit
            for job_id in resumed:
                self._drop_leases(self.jobs[job_id])
        if not rest:
            miner.polls = 0
        miner.rest = rest
        miner.connected = True
        miner.counted = True
        n = self._known_caps.get(miner.caps, 0)
        if not n:
            self._servable.clear()  # a new class of miner: verdicts may change
            self.caps_version += 1
            self._queue.wake()
        self._known_caps[miner.caps] = n + 1
        self._refresh_idle(miner, now)
        self._changed_miners.add(miner_id)
        return ResumeInfo(resumed=tuple(resumed), revoked=tuple(revoked)), self._take()

    def _resume(self, miner: Miner, now: float) -> tuple[list[str], list[str]]:
        """(resumed, revoked) of a hello resuming ``miner``'s session. A session still connected
        is replaced: its socket closes (4409) and, as when a socket closes (``disconnect``), a
        job it had not accepted goes back to the queue, named in ``revoked`` (a push lost with
        a dead socket was never seen)."""
        for job_id in list(miner.jobs):
            job = self.jobs[job_id]
            if not job.accepted:
                self._revoke(job, "miner reconnected before accepting", now)
                self._requeue(job, now, "miner reconnected before accepting", charged=False)
        return list(miner.jobs), miner.revoked

    def leave(self, miner_id: str, now: float) -> list[Effect]:
        """A connected miner deregistered: it is forgotten, and the jobs it held go back to the
        queue at once, not charged: the miner handed them back, and a REST miner's job counts
        as started from its assignment, before any poll may have delivered it.

        Raises UnknownMiner unless the miner is connected.
        """
        miner = self._miner(miner_id)
        miner.connected = False  # first, so that no job it gives back returns to it
        miner.polls = 0
        self._idle.discard(miner_id)
        for job_id in list(miner.jobs):
            job = self.jobs[job_id]
            self._requeue(job, now, "miner deregistered", charged=False)
        self._drop_miner(miner)
        return self._take()

    def disconnect(self, miner_id: str, session_id: str, now: float) -> list[Effect]:
        """The socket of ``session_id`` closed. Started jobs wait ``resume_grace``."""
        miner = self.miners.get(miner_id)
        if miner is None or miner.session_id != session_id or not miner.connected:
            return []  # an older, replaced session
        self._session_ended(miner, now)
        miner.connected = False
        miner.polls = 0  # a REST miner's waiting polls end with its session
        self._changed_miners.add(miner_id)
        self._idle.discard(miner_id)
        for job_id in list(miner.jobs):
            job = self.jobs[job_id]
            if not job.accepted:
                # Its accept may have been on the way: a resume names the job in ``revoked``.
                self._revoke(job, "miner disconnected before accepting", now)
                self._requeue(job, now, "miner disconnected before accepting", charged=False)
        if miner.jobs:
            miner.grace_timer = self._arm(
                now + self.config.resume_grace, "grace", miner_id, session_id
            )
        else:
            self._drop_miner(miner)
            if miner.revoked:
                self._remember_lost(miner, miner.revoked)
        return self._take()

    def set_status(
        self, miner_id: str, *, concurrency: int | None, draining: bool | None, now: float
    ) -> list[Effect]:
        miner = self._miner(miner_id)
        if concurrency is not None:
            miner.concurrency = concurrency
        if draining is not None:
            miner.draining = draining
        self._changed_miners.add(miner_id)
        self._refresh_idle(miner, now)
        return self._take()

    def poll(self, miner_id: str, now: float) -> list[Effect]:
        """A REST miner waits for a job: assign a queued match now, or hold one waiting slot.

        Raises UnknownMiner unless ``miner_id`` is a registered REST miner. An ``Assign`` in
        the returned effects (now or from a later call) consumes one waiting poll.
        """
        miner = self.miners.get(miner_id)
        if miner is None or not miner.rest or not miner.connected:
            raise UnknownMiner(miner_id)
        miner.polls += 1
        self._refresh_idle(miner, now)
        return self._take()

    def poll_cancel(self, miner_id: str) -> bool:
        """Withdraw one waiting poll (its wait ended with no job).

        Returns False when there is nothing to withdraw because an ``Assign`` was already
        produced for it: the caller must then wait for that assignment instead.
        """
        miner = self.miners.get(miner_id)
        if miner is None or not miner.rest:
            return True
        if miner.polls <= 0:
            return False
        miner.polls -= 1
        if miner.free <= 0:
            self._idle.discard(miner_id)
        return True

    def hand_back(self, miner_id: str, job_id: str, now: float, attempt: int) -> list[Effect]:
        """A REST assignment found no waiting poll to deliver to: requeue it, not charged."""
        job = self._held(miner_id, job_id, attempt)
        self._requeue(job, now, "poll gone", charged=False)
        return self._take()

    def accept(
        self, miner_id: str, job_id: str, now: float, attempt: int | None = None
    ) -> list[Effect]:
        job = self._held(miner_id, job_id, attempt)
        if not job.accepted:
            self._start(job, now)
        return self._take()

    def reject(
        self, miner_id: str, job_id: str, reason: str, now: float, attempt: int | None = None
    ) -> list[Effect]:
        """Back to the queue; this miner is offered the job again only after a pause
        (``_refused``), so other matching miners get it first.

        A reject before accepting is free. After accepting, the attempt has started and is
        charged like a retryable failure (otherwise a reject would dodge ``max_attempts``).
        """
        job = self._held(miner_id, job_id, attempt)
        self._refused(job, miner_id, now)
        self._requeue(
            job, now, f"rejected: {reason}" if reason else "rejected", charged=job.accepted
        )
        return self._take()

    def progress(
        self,
        miner_id: str,
        job_id: str,
        now: float,
        *,
        attempt: int | None = None,
        progress: float | None = None,
        message: str | None = None,
        output: str | None = None,
    ) -> list[Effect]:
        job = self._held(miner_id, job_id, attempt)
        used = job.progress_bytes + PROGRESS_EVENT_COST
        if message is not None:
            used += len(message)
        if output is not None:
            used += len(output)
        if used > self.config.max_progress_bytes:
            raise ProgressLimit(job_id, self.config.max_progress_bytes)
        job.progress_bytes = used
        if not job.accepted:
            self._start(job, now)
        data: JSONObject = {}
        if progress is not None:
            data["progress"] = progress
        if message is not None:
            data["message"] = message
        if output is not None:
            data["output"] = output
        self._emit(job, EventKind.PROGRESS, now, data)
        return self._take()

    def complete(
        self,
        miner_id: str,
        job_id: str,
        result: JSONObject,
        metrics: JSONObject,
        now: float,
        attempt: int | None = None,
        attestation: JSONObject | None = None,
        size: int = 0,
    ) -> tuple[Job, list[Effect]]:
        """The holder's result. A repeat of the accepted result returns the same job.

        ``attestation`` is the miner's (already checked) signature of its result; the receipt
        carries it. ``size``: the result's message as received, in bytes (``_retain``).
        """
        job = self.jobs.get(job_id)
        if (
            job is not None
            and job.state is JobState.COMPLETED
            and job.miner_id == miner_id
            and attempt in (None, job.attempt)
        ):
            return job, []  # idempotent retry: same receipt, nothing changes
        job = self._held(miner_id, job_id, attempt)
        if not job.accepted:
            self._start(job, now)
        job.result, job.metrics = result, metrics
        job.attestation = attestation
        job.size += size
        job.finished_at = now
        miner = self.miners[miner_id]
        if self._receipt_factory is not None:
            job.receipt = self._receipt_factory(job, miner.caps.price, now)
        data: JSONObject = {"result": result}
        if job.receipt is not None:
            data["receipt"] = job.receipt
        self._finish(job, JobState.COMPLETED, EventKind.COMPLETED, now, data=data)
        return job, self._take()

    def fail(
        self,
        miner_id: str,
        job_id: str,
        *,
        error_code: str,
        error_message: str,
        retryable: bool,
        now: float,
        attempt: int | None = None,
    ) -> list[Effect]:
        job = self._held(miner_id, job_id, attempt)
        if retryable:
            # Other matching miners get the retry first, as after a reject: with this one
            # straight back, a broken miner that was the only idle one used up every attempt.
            self._refused(job, miner_id, now)
            self._requeue(
                job, now, f"{error_code}: {error_message}", charged=True, error_code=error_code
            )
        else:
            job.finished_at = now
            self._finish(
                job,
                JobState.FAILED,
                EventKind.FAILED,
                now,
                error=error_message,
                data={"error_code": error_code},
            )
        return self._take()

    # ---- time -------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Effect]:
        """Fire every timer due at ``now``: expiry, accept timeouts, resume grace."""
        self._fire_due(now)
        return self._take()

    def _fire_due(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            timer = heapq.heappop(self._timers)[2]
            if timer.dead:
                self._dead_timers -= 1
                continue
            timer.dead = True
            self._fire(timer, now)

    def _fire(self, timer: _Timer, now: float) -> None:
        if timer.kind == "expire":
            job = self.jobs.get(timer.key)
            if job is not None and job.state in ACTIVE:
                self._finish(
                    job,
                    JobState.EXPIRED,
                    EventKind.EXPIRED,
                    now,
                    error="job expired",
                    revoke_reason="expired",
                )
        elif timer.kind == "lease":
            job = self.jobs.get(timer.key)
            if job is not None and job.state is JobState.RUNNING and job.attempt == timer.token:
                self._revoke(job, "lease expired", now)
                self._requeue(job, now, "lease expired", charged=True)
        elif timer.kind == "accept":
            job = self.jobs.get(timer.key)
            if (
                job is not None
                and job.state is JobState.RUNNING
                and job.attempt == timer.token
                and not job.accepted
            ):
                assert job.miner_id is not None
                self._refused(job, job.miner_id, now)
                self._revoke(job, "accept timeout", now)
                self._requeue(job, now, "accept timeout", charged=False)
        elif timer.kind == "reoffer":
            job = self.jobs.get(timer.key)
            if job is not None and job.state is JobState.QUEUED and job.queue_token == timer.token:
                job.queue_token += 1  # its queue entry goes stale: it is dispatched anew
                self._queued -= 1
                self._entry_gone()
                self._dispatch(job, now)
        else:  # grace
            miner = self.miners.get(timer.key)
            if miner is not None and not miner.connected and miner.session_id == timer.token:
                taken = [*miner.revoked, *miner.jobs]
                for job_id in list(miner.jobs):
                    self._requeue(self.jobs[job_id], now, "miner lost", charged=True)
                self._drop_miner(miner)
                self._remember_lost(miner, taken)

    # ---- recovery ---------------------------------------------------------------------------

    def restore(
        self, records: list[JobRecord], sessions: dict[str, str], now: float
    ) -> list[Effect]:
        """Rebuild from the store after a restart.

        Queued jobs are re-queued; started jobs wait ``resume_grace`` for their miner to come
        back with the session it had (``sessions``: miner id -> last session id); jobs that
        were assigned but not started go straight back to the queue.
        """
        for rec in sorted(records, key=lambda r: r.requested_at):
            job = Job.from_record(rec)
            self._admit(job)
            if job.state is JobState.QUEUED:
                self._push(job)
            elif job.state is JobState.RUNNING and job.miner_id is not None:
                miner = self.miners.get(job.miner_id)
                if miner is None:
                    session = sessions.get(job.miner_id, "")
                    miner = self.miners[job.miner_id] = Miner(job.miner_id, session)
                    miner.concurrency = 0
                    miner.grace_timer = self._arm(
                        now + self.config.resume_grace, "grace", job.miner_id, session
                    )
                miner.jobs[job.job_id] = None
                miner.concurrency = len(miner.jobs)
                self._changed_miners.add(job.miner_id)
                if not job.accepted:
                    # Its accept may have been on the way: a resume names it in ``revoked``.
                    self._revoke(job, "coordinator restarted", now)
                    self._requeue(job, now, "coordinator restarted", charged=False)
        for miner in list(self.miners.values()):
            if not miner.jobs:  # every job it held was requeued above: nothing to resume
                self._drop_miner(miner)
                self._remember_lost(miner, miner.revoked)
        self._fire_due(now)
        return self._take()

    # ---- internals --------------------------------------------------------------------------

    def _take(self) -> list[Effect]:
        """Hand over this call's effects, with one job snapshot per job touched.

        ``_emit`` queues bare events; each becomes a ``Persist`` here, and every event of a
        job in one call shares the snapshot taken at the end of the call (one record per job
        per call, not per event: building records is the scheduler's largest cost).
        """
        effects, self._effects = self._effects, []
        snaps = {job_id: job.record() for job_id, job in self._touched.items()}
        self._touched = {}
        return [Persist(snaps[e.job_id], e) if isinstance(e, EventRecord) else e for e in effects]

    def _miner(self, miner_id: str) -> Miner:
        miner = self.miners.get(miner_id)
        if miner is None or not miner.connected:
            raise UnknownMiner(miner_id)
        return miner

    def _held(self, miner_id: str, job_id: str, attempt: int | None) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise UnknownJob(job_id)
        if (
            job.state is not JobState.RUNNING
            or job.miner_id != miner_id
            or (attempt is not None and attempt != job.attempt)
        ):
            raise NotAssigned(job_id, miner_id)
        return job

    def _admit(self, job: Job) -> None:
        self._n += 1
        job.order = self._n
        job.needs = JobNeeds.parse(job.constraints)
        self.jobs[job.job_id] = job
        if job.idempotency_key is not None:
            self._idem[job.client_id, job.idempotency_key] = job.job_id
        if job.state in ACTIVE:
            job.timers.append(self._arm(job.expires_at, "expire", job.job_id, None))

    def _emit(self, job: Job, kind: EventKind, now: float, data: JSONObject = _NO_DATA) -> None:
        job.seq += 1
        self.counters[kind] += 1
        # Positional (hot path): EventRecord(job_id, seq, event, state, at, attempt, miner_id,
        # data). ``_take`` makes it a ``Persist`` with the job's snapshot.
        self._effects.append(
            EventRecord(job.job_id, job.seq, kind, job.state, now, job.attempt, job.miner_id, data)
        )
        self._touched[job.job_id] = job

    def _arm(self, when: float, kind: str, key: str, token: object) -> _Timer:
        self._n += 1
        timer = _Timer(when, self._n, kind, key, token)
        heapq.heappush(self._timers, (when, self._n, timer))
        return timer

    def _kill_timer(self, timer: _Timer | None) -> None:
        if timer is not None and not timer.dead:
            timer.dead = True
            self._dead_timers += 1
            self._compact_timers()

    def _compact_timers(self) -> None:
        """Drop dead timers once they are most of the heap.

        A dead timer otherwise stays until it reaches the top: a finished job's expiry, a TTL
        (15 minutes by default) ahead, so the heap would hold every job finished within a TTL.
        """
        if self._dead_timers > 1024 and self._dead_timers * 2 > len(self._timers):
            self._timers = [t for t in self._timers if not t[2].dead]
            heapq.heapify(self._timers)
            self._dead_timers = 0

    def _push(self, job: Job) -> None:
        job.queue_token += 1
        self._queued += 1
        assert isinstance(job.needs, JobNeeds)
        self._queue.push(job.needs, job.priority, job.order, job.queue_token, job.job_id)

    def _entry_gone(self) -> None:
        """A queued job left the queue without a pick (it ended, or is offered anew): its entry
        stays in its class until a pick reaches it, and none reaches a class no miner matches
        (jobs no miner can run, canceled or expired, stayed for good). Once the stale entries
        are over 1024 and outnumber the live ones, the queue drops them all."""
        self._stale_entries += 1
        if self._stale_entries > 1024 and self._stale_entries > self._queued:
            self._queue.compact(self._valid_entry)
            self._stale_entries = 0

    def _valid_entry(self, job_id: str, token: int) -> bool:
        job = self.jobs.get(job_id)
        return job is not None and job.state is JobState.QUEUED and job.queue_token == token

    def _refused(self, job: Job, miner_id: str, now: float) -> None:
        """``miner_id`` refused ``job``: pause before offering it to that miner again, the pause
        doubling with each refusal of this job by this miner (protocol.md: repeated rejects
        lower the miner's priority for the job)."""
        _, count = job.rejected_by.get(miner_id, _NOT_PAUSED)
        # The exponent is capped: a float power past 2**1023 raises OverflowError.
        pause = min(self.config.reject_pause * 2.0 ** min(count, 32), self.config.reject_pause_max)
        job.rejected_by[miner_id] = (now + pause, count + 1)

    @staticmethod
    def _paused(job: Job, now: float) -> set[str]:
        """The miners ``job`` is not offered to at ``now`` (some miner refused it)."""
        return {m for m, (until, _) in job.rejected_by.items() if until > now}

    def _arm_reoffer(self, job: Job, now: float) -> None:
        """A job some miner refused went into the queue: dispatch it again when the first
        pause ends (that miner may be idle by then, with nothing else to wake it)."""
        ends = [until for until, _ in job.rejected_by.values() if now < until < math.inf]
        if ends:
            job.timers.append(self._arm(min(ends), "reoffer", job.job_id, job.queue_token))

    def _dispatch(self, job: Job, now: float) -> None:
        """A job became queued: hand it to the idle matching miner that waited longest."""
        assert isinstance(job.needs, JobNeeds)
        refused = job.rejected_by  # empty for nearly every job: no set to build
        miner_id = self._idle.pick(job.needs, self._paused(job, now) if refused else _NOBODY)
        if miner_id is None:
            self._push(job)
            if refused:
                self._arm_reoffer(job, now)
        else:
            self._assign(job, self.miners[miner_id], now)

    def _refresh_idle(self, miner: Miner, now: float) -> None:
        """Re-index a miner after its slots or draining flag changed, then fill its slots."""
        if not miner.connected or miner.draining or miner.free <= 0:
            self._idle.discard(miner.miner_id)
            return
        while miner.free > 0:
            found = self._queue.pick(
                miner.caps,
                self._valid_entry,
                lambda j: self.jobs[j].rejected_by.get(miner.miner_id, _NOT_PAUSED)[0] > now,
            )
            if found is None:
                break
            needs, entry = found
            self._queue.remove(needs, entry)
            self._queued -= 1
            self._assign(self.jobs[entry[3]], miner, now)
        if miner.free > 0:
            self._idle.add(miner.miner_id, miner.caps)
        else:
            self._idle.discard(miner.miner_id)

    def _assign(self, job: Job, miner: Miner, now: float) -> None:
        job.state = transition(job.job_id, job.state, Action.ASSIGN)
        job.attempt += 1
        job.miner_id = miner.miner_id
        job.accepted = False
        job.assigned_at = now
        miner.jobs[job.job_id] = None
        self._changed_miners.add(miner.miner_id)
        if miner.rest:
            miner.polls -= 1
        if miner.free > 0:
            self._idle.add(miner.miner_id, miner.caps)
        else:
            self._idle.discard(miner.miner_id)
        if not miner.rest:
            job.timers.append(
                self._arm(now + self.config.accept_timeout, "accept", job.job_id, job.attempt)
            )
        self._emit(job, EventKind.ASSIGNED, now)
        self._effects.append(
            Assign(
                miner_id=miner.miner_id,
                session_id=miner.session_id,
                job_id=job.job_id,
                attempt=job.attempt,
                payload=job.payload,
                constraints=job.constraints,
                expires_at=job.expires_at,
                accept_timeout=self.config.accept_timeout,
            )
        )
        if miner.rest:  # the poll's answer is the job itself: it runs from now on
            self._start(job, now)
            self._arm_lease(job, now)

    def _arm_lease(self, job: Job, now: float) -> None:
        start = job.started_at if job.started_at is not None else now
        when = min(start + self.config.rest_lease, job.expires_at)
        self._drop_leases(job)  # a resumed miner re-arms its leases: one timer each
        job.timers.append(self._arm(when, "lease", job.job_id, job.attempt))

    def _drop_leases(self, job: Job) -> None:
        kept = []
        for timer in job.timers:
            if isinstance(timer, _Timer) and timer.kind == "lease":
                self._kill_timer(timer)
            else:
                kept.append(timer)
        job.timers = kept

    def _start(self, job: Job, now: float) -> None:
        job.state = transition(job.job_id, job.state, Action.ACCEPT)
        job.accepted = True
        job.started_at = now
        self._emit(job, EventKind.STARTED, now)

    def _release(self, job: Job, now: float) -> None:
        """Free the slot the job held on its miner, and let that miner take new work."""
        miner = self.miners.get(job.miner_id or "")
        if miner is None or job.job_id not in miner.jobs:
            return
        del miner.jobs[job.job_id]
        self._changed_miners.add(miner.miner_id)
        if miner.connected:
            self._refresh_idle(miner, now)
        elif not miner.jobs and not miner.revoked and miner.grace_timer is not None:
            # Keep a miner with pending revocations until its grace ends: a resume must
            # still learn which jobs were canceled or expired meanwhile.
            self._drop_miner(miner)

    def _revoke(self, job: Job, reason: str, now: float) -> None:
        miner = self.miners.get(job.miner_id or "")
        if miner is None or job.job_id not in miner.jobs:
            return
        if miner.connected:
            self._effects.append(
                Revoke(
                    miner_id=miner.miner_id,
                    session_id=miner.session_id,
                    job_id=job.job_id,
                    reason=reason,
                )
            )
            if not miner.rest:  # a REST miner has no socket: it learns from a 409
                pushed = miner.pushed
                pushed.append((now, job.job_id))
                if pushed[0][0] < now - self.config.revoke_window:
                    self._prune_pushed(miner, now)
        else:
            miner.revoked.append(job.job_id)

    def _prune_pushed(self, miner: Miner, now: float) -> None:
        """Forget the pushes older than ``revoke_window``: they reached a live socket."""
        del miner.pushed[: bisect.bisect_left(miner.pushed, (now - self.config.revoke_window,))]

    def _session_ended(self, miner: Miner, now: float) -> None:
        """The live session of ``miner`` ended (its socket closed, or a new session replaced
        it). A ``job.cancel`` pushed to it within ``revoke_window`` may have gone to a socket
        already dead, unnoticed: such jobs join ``revoked``, as if revoked while away, so the
        miner's resume names them (one it holds again is resumed instead). The ones pushed
        earlier reached a live socket: a dead one would have been noticed by then."""
        pushed = miner.pushed
        if not pushed:
            return
        miner.pushed = []
        since = now - self.config.revoke_window
        lost = [job_id for when, job_id in pushed if when >= since and job_id not in miner.jobs]
        if lost:
            miner.revoked = list(dict.fromkeys([*lost, *miner.revoked]))

    def _requeue(
        self, job: Job, now: float, reason: str, *, charged: bool, error_code: str | None = None
    ) -> None:
        """Queue ``job`` again (or fail it, once out of attempts). ``error_code``: a miner's
        retryable failure, named in the event (``requeue_label`` tells it by that, never by
        the reason's text, which is the miner's)."""
        if charged:
            job.failures += 1
        if job.failures >= job.max_attempts:
            job.finished_at = now
            self._finish(
                job,
                JobState.FAILED,
                EventKind.FAILED,
                now,
                error=f"max attempts reached ({job.max_attempts}): {reason}",
            )
            return
        job.state = transition(job.job_id, job.state, Action.REQUEUE)
        self._release(job, now)
        job.miner_id = None
        job.accepted = False
        job.started_at = None  # per attempt: Job.from_record() derives ``accepted`` from it
        data: JSONObject = {"reason": reason}
        if error_code is not None:
            data["error_code"] = error_code
        self._emit(job, EventKind.REQUEUED, now, data)
        self._dispatch(job, now)

    def _finish(
        self,
        job: Job,
        state: JobState,
        kind: EventKind,
        now: float,
        *,
        error: str | None = None,
        data: JSONObject | None = None,
        revoke_reason: str | None = None,
        clear_miner: bool = False,
    ) -> None:
        queued = job.state is JobState.QUEUED
        if queued:
            self._queued -= 1
        job.state = transition(job.job_id, job.state, _FINISH[state])
        assert job.state in TERMINAL
        if queued:
            self._entry_gone()
        if revoke_reason is not None:
            self._revoke(job, revoke_reason, now)
        job.error = error
        job.finished_at = job.finished_at or now
        for timer in job.timers:
            self._kill_timer(timer)  # type: ignore[arg-type]
        job.timers = []
        self._release(job, now)
        if clear_miner:
            job.miner_id = None
        if error is not None:
            data = {**data, "error": error} if data else {"error": error}
        self._emit(job, kind, now, data or _NO_DATA)
        self._retain(job)

    def _retain(self, job: Job) -> None:
        """Keep recent ended jobs for idempotent retries and late results; the store has the
        rest. At most ``terminal_retention`` of them, and while their sizes (payload and result
        as received) add up to ``terminal_retention_bytes``; the newest stays in any case."""
        self._terminal[job.job_id] = job.size
        self._terminal_bytes += job.size
        terminal, config = self._terminal, self.config
        while len(terminal) > config.terminal_retention or (
            self._terminal_bytes > config.terminal_retention_bytes and len(terminal) > 1
        ):
            old_id, size = terminal.popitem(last=False)
            self._terminal_bytes -= size
            old = self.jobs.pop(old_id, None)
            if old is not None and old.idempotency_key is not None:
                self._idem.pop((old.client_id, old.idempotency_key), None)

    def _forget_caps(self, miner: Miner) -> None:
        if miner.counted:
            miner.counted = False
            n = self._known_caps.get(miner.caps, 0) - 1
            if n <= 0:
                self._known_caps.pop(miner.caps, None)
                self._servable.clear()
                self.caps_version += 1
            else:
                self._known_caps[miner.caps] = n

    def _remember_lost(self, miner: Miner, taken: list[str]) -> None:
        """A dropped miner's session and the jobs taken from it, for a late resume."""
        self._lost[miner.miner_id] = (miner.session_id, taken)
        while len(self._lost) > self.config.terminal_retention:
            self._lost.popitem(last=False)

    def _drop_miner(self, miner: Miner) -> None:
        self._kill_timer(miner.grace_timer)
        miner.grace_timer = None
        self._forget_caps(miner)
        self._idle.discard(miner.miner_id)
        if self.miners.get(miner.miner_id) is miner:
            del self.miners[miner.miner_id]
            self._changed_miners.add(miner.miner_id)
