"""Which ended jobs ``JOB_RETENTION_DAYS`` deletes, and when (docs/ops.md, "Disk").

The store keeps every job, its events and its receipt: about 1.8 KB a job in the benchmarks,
more with streamed progress. With a retention set, a job that ended longer ago than that is
deleted with its events; its receipt stays (the receipt chain, the explorer and
``receipts audit`` need every link).

Jobs are walked in the order they were stored, a page at a time. A job stored after the
cutoff cannot have ended before it (it ends after it is submitted), so a pass stops at the
first such job. A job the walk must keep for now (still live, ended too recently, or still
held in memory, where reads would show it) is kept and looked at again by the next pass,
which starts from the earliest job kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from dispatcher.jobs import TERMINAL

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    class Aged(Protocol):
        """A stored job's place (insertion order) and times: ``JobStore.jobs_after``'s rows
        (the store's ``JobAge``: this pure module does not import storage)."""

        @property
        def rowid(self) -> int: ...
        @property
        def job_id(self) -> str: ...
        @property
        def state(self) -> str: ...
        @property
        def requested_at(self) -> float: ...
        @property
        def finished_at(self) -> float | None: ...


__all__ = ["Pass", "Selection", "select"]


@dataclass(slots=True)
class Selection:
    """What one page of a pass found."""

    ended: dict[str, str] = field(default_factory=dict)  # job id -> final state: delete
    last: int | None = None  # the place of the last job looked at (deleted or kept)
    kept: int | None = None  # the place of the first job kept
    done: bool = False  # the pass is over: a job stored after the cutoff, or no more jobs


def select(
    page: Sequence[Aged], limit: int, cutoff: float, held: Callable[[str], bool]
) -> Selection:
    """The jobs of ``page`` (``jobs_after``'s, asked for ``limit``) to delete: ended before
    ``cutoff`` and not ``held`` in memory."""
    out = Selection()
    for job in page:
        if job.requested_at >= cutoff:
            out.done = True
            return out
        ended_at = job.finished_at if job.finished_at is not None else job.requested_at
        if job.state in TERMINAL and ended_at < cutoff and not held(job.job_id):
            out.ended[job.job_id] = job.state
        elif out.kept is None:
            out.kept = job.rowid
        out.last = job.rowid
    out.done = len(page) < limit
    return out


@dataclass(slots=True)
class Pass:
    """Where the walk is: ``after`` is the place the next page starts after."""

    after: int = 0
    kept: int | None = None  # the first job kept in this pass

    def advance(self, page: Selection) -> None:
        """Move on past ``page``; at the end of a pass, back to the first job it kept."""
        if self.kept is None:
            self.kept = page.kept
        if page.last is not None:
            self.after = page.last
        if page.done and self.kept is not None:
            self.after, self.kept = self.kept - 1, None
        elif page.done:
            self.kept = None
