"""Frozen statistics snapshots; the ops page renders these and nothing else."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DispatcherStatistics", "SchedulerStatistics"]


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
