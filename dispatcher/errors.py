"""Errors of the dispatcher layer.

Tree::

    DispatchError
    ├── UnknownJob           no such job, or not visible to this caller
    ├── InvalidTransition    the job's state does not allow this (e.g. cancel a COMPLETED job)
    ├── NotAssigned          a miner acted on a job it does not hold (stale attempt included)
    ├── UnknownMiner         no such miner session
    ├── Unavailable          the dispatcher is not running (starting up or shutting down)
    ├── NotAllowed           the credential may not act as this identity
    ├── PaymentRequired      the payer's available balance is short (billing)
    ├── TooLarge             a job no socket miner could be sent (its job.assign frame)
    ├── ProgressLimit        a job's progress events would pass MAX_PROGRESS_BYTES
    └── TooManyJobs          a client's live jobs would pass MAX_ACTIVE_JOBS_PER_CLIENT or …_BYTES
"""

from __future__ import annotations

__all__ = [
    "DispatchError",
    "InvalidTransition",
    "NotAssigned",
    "Unavailable",
    "UnknownJob",
    "UnknownMiner",
]


class DispatchError(Exception):
    """Base class of dispatcher errors."""


class UnknownJob(DispatchError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} not found")
        self.job_id = job_id


class InvalidTransition(DispatchError):
    def __init__(self, job_id: str, state: str, action: str) -> None:
        super().__init__(f"job {job_id} is {state}: cannot {action}")
        self.job_id = job_id
        self.state = state
        self.action = action


class NotAssigned(DispatchError):
    def __init__(self, job_id: str, miner_id: str) -> None:
        super().__init__(f"job {job_id} is not assigned to miner {miner_id}")
        self.job_id = job_id
        self.miner_id = miner_id


class UnknownMiner(DispatchError):
    def __init__(self, miner_id: str) -> None:
        super().__init__(f"miner {miner_id} is not connected")
        self.miner_id = miner_id


class Unavailable(DispatchError):
    """The dispatcher is not accepting work right now."""


class NotAllowed(DispatchError):
    """The credential may not act as this identity (a miner id bound to another key)."""


__all__ += ["NotAllowed"]


class PaymentRequired(DispatchError):
    """The paying account's available balance does not cover the amount (nothing changed)."""


__all__ += ["PaymentRequired"]


class TooLarge(DispatchError):
    """A job whose ``job.assign`` frame would be over the frame limit, which a miner's library
    refuses (nothing changed)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"job too large: its job.assign frame would be over {limit} bytes (WS_MAX_FRAME_BYTES)"
        )
        self.limit = limit


__all__ += ["TooLarge"]


class ProgressLimit(DispatchError):
    """A job's stored progress would pass its budget (``SchedulerConfig.max_progress_bytes``);
    the progress event is refused, the job goes on (nothing changed)."""

    def __init__(self, job_id: str, limit: int) -> None:
        super().__init__(
            f"job {job_id} has used its {limit} bytes of progress (MAX_PROGRESS_BYTES): "
            "progress refused, the result is still taken"
        )
        self.job_id = job_id
        self.limit = limit


__all__ += ["ProgressLimit"]


class TooManyJobs(DispatchError):
    """A client's queued and running jobs would pass their count or bytes bound (a submit is
    refused, nothing changed): its live jobs are held in memory until they end."""

    def __init__(self, what: str, limit: int, setting: str) -> None:
        super().__init__(
            f"too many live jobs: this client's queued and running jobs would pass {limit} "
            f"{what} ({setting}); wait for some to end"
        )
        self.limit = limit


__all__ += ["TooManyJobs"]
