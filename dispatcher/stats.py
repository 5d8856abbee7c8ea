"""Statistics: frozen snapshots, and the lock-free tallies behind ``/metrics`` and the ops page.

Rule 1: the frozen ``*Statistics`` snapshots are what the ops page renders.
Rule 2: ``Histogram`` and ``EventTally`` are updated on the dispatch path, once per committed
job event or per commit, so an update is a few integer additions: no locks, no label lookups,
no allocation. Exporters read them when scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dispatcher.jobs import ACTIVE

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from typing import Any

    from protocol.records import EventRecord, JobRecord

__all__ = [
    "BATCH_BOUNDS",
    "COMMIT_BOUNDS",
    "LATENCY_BOUNDS",
    "REQUEUE_REASONS",
    "DispatcherStatistics",
    "EventTally",
    "Histogram",
    "JobCounts",
    "SchedulerStatistics",
    "requeue_label",
    "requeue_reason",
]

# Upper bounds (seconds or writes) of the histogram buckets; +Inf is implicit.
LATENCY_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                  30.0, 60.0, 300.0)  # fmt: skip
COMMIT_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_BOUNDS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)

# The requeue reason labels: a small closed set (event texts are free-form; see requeue_reason).
REQUEUE_REASONS = (
    "admin",
    "accept_timeout",
    "disconnected",
    "miner_lost",
    "miner_restarted",
    "lease_expired",
    "rejected",
    "coordinator_restarted",
    "poll_gone",
    "deregistered",
    "retryable_failure",
)
_REASON_PREFIXES = (
    ("requeued by admin", "admin"),
    ("accept timeout", "accept_timeout"),
    ("miner disconnected", "disconnected"),
    ("miner reconnected", "disconnected"),  # its socket replaced before it accepted
    ("miner lost", "miner_lost"),
    ("miner restarted", "miner_restarted"),
    ("lease expired", "lease_expired"),
    ("rejected", "rejected"),
    ("coordinator restarted", "coordinator_restarted"),
    ("poll gone", "poll_gone"),
    ("miner deregistered", "deregistered"),
)


def requeue_reason(text: str) -> str:
    """The label of a ``requeued`` event's reason text (anything else is a miner's failure)."""
    for prefix, label in _REASON_PREFIXES:
        if text.startswith(prefix):
            return label
    return "retryable_failure"


def requeue_label(data: Mapping[str, Any]) -> str:
    """The label of a ``requeued`` event from its data: a miner's retryable failure names its
    ``error_code`` (its reason is the miner's own ``code: message``, which may begin like any
    of the coordinator's reasons); any other is told by its reason."""
    if "error_code" in data:
        return "retryable_failure"
    reason = data.get("reason")
    return requeue_reason(reason if isinstance(reason, str) else "")


class Histogram:
    """Counts per bucket (``value <= bound``), Prometheus style; ``observe`` is one bisect."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= bound)`` pairs, ending with ``(inf, count)``."""
        out: list[tuple[float, int]] = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


class EventTally:
    """What committed job events say about the flow of work, since the process started."""

    __slots__ = ("assign_latency", "complete_latency", "events", "requeues")

    def __init__(self) -> None:
        self.events: dict[str, int] = {}
        self.requeues: dict[str, int] = {}
        self.assign_latency = Histogram(LATENCY_BOUNDS)  # submit -> first assignment
        self.complete_latency = Histogram(LATENCY_BOUNDS)  # submit -> completed

    def observe(self, job: JobRecord, event: EventRecord, now: float) -> None:
        """Count one event of ``job`` committed at ``now``.

        Latencies end at ``now``, when the change became visible (the assignment can be pushed,
        the result acknowledged), not at ``event.at``: a job dispatched at once has the same
        ``at`` as its submit, but it still waited for the group commit.
        """
        _, _, kind, _, _, attempt, _, data = event  # unpacked: fields by name are slower
        self.events[kind] = self.events.get(kind, 0) + 1
        if kind == "assigned":
            if attempt == 1:
                self.assign_latency.observe(max(0.0, now - job.requested_at))
        elif kind == "completed":
            self.complete_latency.observe(max(0.0, now - job.requested_at))
        elif kind == "requeued":
            label = requeue_label(data)
            self.requeues[label] = self.requeues.get(label, 0) + 1


class JobCounts:
    """Jobs in the store by state, kept in memory: ``/metrics`` and ``/v1/admin/stats`` read
    them instead of counting the jobs table (a scan of its state index, about 0.1 s per
    million jobs, on the one reader connection every REST read waits for).

    ``seed`` takes the store's counts once at start-up, with the live jobs the scheduler is
    rebuilt from; from then on every committed event moves its job to the event's state.
    A state is final once reached, so only live jobs are remembered.
    """

    __slots__ = ("_live", "by_state")

    def __init__(self) -> None:
        self.by_state: dict[str, int] = {}
        self._live: dict[str, str] = {}  # job id -> state, for jobs not yet in a final state

    def seed(self, counts: Mapping[str, int], live: Iterable[JobRecord]) -> None:
        self.by_state = {str(state): n for state, n in counts.items()}
        self._live = {job.job_id: str(job.state) for job in live}

    def observe(self, event: EventRecord) -> None:
        """Count one committed event (called once per event, in commit order)."""
        state = event.state
        job_id = event.job_id
        old = self._live.get(job_id)
        if old == state:
            return
        by_state = self.by_state
        if old is not None:
            by_state[old] -= 1
        key = str(state)
        by_state[key] = by_state.get(key, 0) + 1
        if key in ACTIVE:  # every other state is final
            self._live[job_id] = key
        elif old is not None:
            del self._live[job_id]

    def forget(self, state: str) -> None:
        """A job that ended in ``state`` was deleted from the store (JOB_RETENTION_DAYS)."""
        self.by_state[state] = max(0, self.by_state.get(state, 0) - 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerStatistics:
    jobs_queued: int
    jobs_running: int
    jobs_in_memory: int
    miners_connected: int
    miners_in_grace: int
    miners_idle: int
    slots_total: int
    slots_used: int
    timers: int
    events: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class DispatcherStatistics:
    scheduler: SchedulerStatistics
    batches: int
    writes: int
    last_batch_size: int
    pending_writes: int
    subscribers: int
    progress_dropped: int
