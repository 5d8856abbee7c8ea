"""JOB_RETENTION_DAYS: which ended jobs a page of the walk deletes, and where the walk goes."""

from __future__ import annotations

from dispatcher.retention import Pass, Selection, select
from dispatcher.stats import JobCounts
from storage.base import JobAge

CUTOFF = 1000.0


def age(
    rowid: int, state: str = "COMPLETED", *, at: float = 10.0, ended: float | None = 20.0
) -> JobAge:
    return JobAge(rowid=rowid, job_id=f"j{rowid}", state=state, requested_at=at, finished_at=ended)


def never(_: str) -> bool:
    return False


def test_a_page_deletes_the_jobs_that_ended_before_the_cutoff() -> None:
    page = [
        age(1),
        age(2, "FAILED"),
        age(3, "CANCELED", ended=None),  # no end time: it ended after its submission
        age(4, "EXPIRED"),
    ]
    assert select(page, 10, CUTOFF, never) == Selection(
        ended={"j1": "COMPLETED", "j2": "FAILED", "j3": "CANCELED", "j4": "EXPIRED"},
        last=4,
        kept=None,
        done=True,  # fewer than asked for: the last page
    )


def test_live_recent_and_held_jobs_are_kept() -> None:
    page = [
        age(1),
        age(2, "RUNNING", ended=None),
        age(3, ended=CUTOFF),  # ended at the cutoff: not before it
        age(4),
        age(5),
    ]
    assert select(page, 5, CUTOFF, lambda job_id: job_id == "j4") == Selection(
        ended={"j1": "COMPLETED", "j5": "COMPLETED"}, last=5, kept=2, done=False
    )


def test_a_job_stored_after_the_cutoff_ends_the_pass() -> None:
    """A job submitted after the cutoff cannot have ended before it, nor can the jobs stored
    after it: the pass stops there, without looking at it."""
    page = [age(1), age(2, at=CUTOFF, ended=None), age(3)]
    assert select(page, 3, CUTOFF, never) == Selection(
        ended={"j1": "COMPLETED"}, last=1, kept=None, done=True
    )
    assert select([age(7, at=CUTOFF + 1)], 1, CUTOFF, never) == Selection(done=True)
    assert select([], 5, CUTOFF, never) == Selection(done=True)


def test_a_pass_starts_again_from_the_first_job_it_kept() -> None:
    walk = Pass()
    walk.advance(Selection(ended={"j1": "COMPLETED"}, last=3, kept=2))
    assert (walk.after, walk.kept) == (3, 2)
    walk.advance(Selection(last=6, kept=5))  # the first kept stays the pass's
    assert (walk.after, walk.kept) == (6, 2)
    walk.advance(Selection(done=True))
    assert (walk.after, walk.kept) == (1, None)  # the next pass looks at job 2 again


def test_a_pass_that_kept_nothing_goes_on_from_where_it_stopped() -> None:
    walk = Pass()
    walk.advance(Selection(ended={"j1": "COMPLETED"}, last=1))
    walk.advance(Selection(ended={"j2": "COMPLETED"}, last=2, done=True))
    assert (walk.after, walk.kept) == (2, None)
    walk.advance(Selection(done=True))  # nothing new: stays
    assert (walk.after, walk.kept) == (2, None)
    walk.advance(Selection(last=4, kept=4, done=True))  # kept in the pass's last page
    assert (walk.after, walk.kept) == (3, None)


def test_job_counts_forget_a_deleted_job() -> None:
    counts = JobCounts()
    counts.seed({"COMPLETED": 2}, [])
    counts.forget("COMPLETED")
    counts.forget("FAILED")  # never counted: no count goes below 0
    assert counts.by_state == {"COMPLETED": 1, "FAILED": 0}
