"""Job states, the transition table, and the mutable in-memory ``Job``.

Rule 1: ``TRANSITIONS`` is the whole state machine, as data; ``transition()`` is the only way a
job's state changes, so the table can be tested pair by pair.
Rule 2: terminal states are absorbing: no entry leaves them.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

from dispatcher.errors import InvalidTransition
from protocol.records import JobRecord

if TYPE_CHECKING:
    from protocol.types import JSONObject

__all__ = ["ACTIVE", "TERMINAL", "TRANSITIONS", "Action", "Job", "JobState", "transition"]


class JobState(StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"
    EXPIRED = "EXPIRED"


class Action(StrEnum):
    ASSIGN = "assign"
    ACCEPT = "accept"
    PROGRESS = "progress"
    REQUEUE = "requeue"
    COMPLETE = "complete"
    FAIL = "fail"
    CANCEL = "cancel"
    EXPIRE = "expire"


Q, R = JobState.QUEUED, JobState.RUNNING
TRANSITIONS: dict[tuple[JobState, Action], JobState] = {
    (Q, Action.ASSIGN): R,
    (Q, Action.CANCEL): JobState.CANCELED,
    (Q, Action.EXPIRE): JobState.EXPIRED,
    (R, Action.ACCEPT): R,
    (R, Action.PROGRESS): R,
    (R, Action.REQUEUE): Q,
    (R, Action.COMPLETE): JobState.COMPLETED,
    (R, Action.FAIL): JobState.FAILED,
    (R, Action.CANCEL): JobState.CANCELED,
    (R, Action.EXPIRE): JobState.EXPIRED,
}
ACTIVE = frozenset({Q, R})
TERMINAL = frozenset(JobState) - ACTIVE


def transition(job_id: str, state: JobState, action: Action) -> JobState:
    """Next state for ``action``; raises InvalidTransition when the table has no entry."""
    try:
        return TRANSITIONS[state, action]
    except KeyError:
        raise InvalidTransition(job_id, state.value, action.value) from None


class Job:
    """Mutable scheduler-side state of one job. ``record()`` snapshots it for the store."""

    __slots__ = (
        "accepted",
        "assigned_at",
        "attempt",
        "attestation",
        "client_id",
        "constraints",
        "error",
        "expires_at",
        "failures",
        "finished_at",
        "idempotency_key",
        "job_id",
        "max_attempts",
        "metrics",
        "miner_id",
        "needs",
        "order",
        "payload",
        "payment",
        "priority",
        "progress_bytes",
        "queue_token",
        "receipt",
        "rejected_by",
        "requested_at",
        "result",
        "seq",
        "size",
        "started_at",
        "state",
        "timers",
    )

    def __init__(
        self,
        *,
        job_id: str,
        client_id: str,
        payload: JSONObject,
        constraints: JSONObject,
        priority: int,
        requested_at: float,
        expires_at: float,
        max_attempts: int,
        idempotency_key: str | None = None,
        payment: JSONObject | None = None,
    ) -> None:
        self.job_id = job_id
        self.client_id = client_id
        self.payload = payload
        self.constraints = constraints
        self.priority = priority
        self.requested_at = requested_at
        self.expires_at = expires_at
        self.max_attempts = max_attempts
        self.idempotency_key = idempotency_key
        self.payment = payment
        self.state = JobState.QUEUED
        self.attempt = 0  # fencing token: +1 at every assignment
        self.failures = 0  # attempts charged against max_attempts
        self.seq = 0
        self.miner_id: str | None = None
        self.accepted = False
        self.assigned_at: float | None = None
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.result: JSONObject | None = None
        self.metrics: JSONObject | None = None
        self.receipt: JSONObject | None = None
        self.attestation: JSONObject | None = None  # the miner's signature of its result
        self.error: str | None = None
        # miner id -> (offered to it again from, refusals so far): see Scheduler._refused
        self.rejected_by: dict[str, tuple[float, int]] = {}
        self.order = 0
        self.queue_token = 0
        self.needs: object = None
        self.timers: list[object] = []
        self.size = 0  # bytes of its payload and result as received (Scheduler._retain)
        # Progress stored since it was loaded into memory (SchedulerConfig.max_progress_bytes).
        self.progress_bytes = 0

    def record(self) -> JobRecord:
        # Positional on purpose (hot path); the order is JobRecord's field order.
        return JobRecord(
            self.job_id,
            self.client_id,
            self.state,
            self.payload,
            self.constraints,
            self.priority,
            self.requested_at,
            self.expires_at,
            self.attempt,
            self.failures,
            self.max_attempts,
            self.seq,
            self.miner_id,
            self.assigned_at,
            self.started_at,
            self.finished_at,
            self.result,
            self.receipt,
            self.error,
            self.idempotency_key,
            self.payment,
        )

    @classmethod
    def from_record(cls, rec: JobRecord) -> Job:
        job = cls(
            job_id=rec.job_id,
            client_id=rec.client_id,
            payload=rec.payload,
            constraints=rec.constraints,
            priority=rec.priority,
            requested_at=rec.requested_at,
            expires_at=rec.expires_at,
            max_attempts=rec.max_attempts,
            idempotency_key=rec.idempotency_key,
            payment=rec.payment,
        )
        job.state = JobState(rec.state)
        job.attempt, job.failures, job.seq = rec.attempt, rec.failures, rec.seq
        job.miner_id, job.assigned_at = rec.miner_id, rec.assigned_at
        job.started_at, job.finished_at = rec.started_at, rec.finished_at
        job.accepted = rec.started_at is not None and rec.state == JobState.RUNNING
        job.result, job.receipt, job.error = rec.result, rec.receipt, rec.error
        return job
