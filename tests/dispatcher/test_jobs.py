"""Ring 2: the job state machine as data (dispatcher/jobs.py)."""

from __future__ import annotations

import itertools

import pytest

from dispatcher.errors import DispatchError, InvalidTransition
from dispatcher.jobs import ACTIVE, TERMINAL, TRANSITIONS, Action, Job, JobState, transition

Q, R = JobState.QUEUED, JobState.RUNNING
C, F, X, E = JobState.COMPLETED, JobState.FAILED, JobState.CANCELED, JobState.EXPIRED

# The expected table, written out independently of the code under test.
EXPECTED: dict[tuple[JobState, Action], JobState] = {
    (Q, Action.ASSIGN): R,
    (Q, Action.CANCEL): X,
    (Q, Action.EXPIRE): E,
    (R, Action.ACCEPT): R,
    (R, Action.PROGRESS): R,
    (R, Action.REQUEUE): Q,
    (R, Action.COMPLETE): C,
    (R, Action.FAIL): F,
    (R, Action.CANCEL): X,
    (R, Action.EXPIRE): E,
}

ALL_PAIRS = list(itertools.product(JobState, Action))


@pytest.mark.parametrize(
    ("state", "action"), ALL_PAIRS, ids=[f"{s.value}-{a.value}" for s, a in ALL_PAIRS]
)
def test_transition_table(state: JobState, action: Action) -> None:
    """Every (state, action) pair: legal ones give the table's state, the rest raise."""
    expected = EXPECTED.get((state, action))
    if expected is None:
        with pytest.raises(InvalidTransition) as info:
            transition("j1", state, action)
        assert info.value.job_id == "j1"
        assert info.value.state == state.value
        assert info.value.action == action.value
        assert isinstance(info.value, DispatchError)
        assert f"job j1 is {state.value}: cannot {action.value}" == str(info.value)
    else:
        assert transition("j1", state, action) is expected


def test_table_has_exactly_the_expected_entries() -> None:
    """TRANSITIONS holds the expected entries and nothing else."""
    assert TRANSITIONS == EXPECTED


def test_active_and_terminal_partition_the_states() -> None:
    """ACTIVE is QUEUED/RUNNING, TERMINAL the other four, and together they cover JobState."""
    assert frozenset({Q, R}) == ACTIVE
    assert frozenset({C, F, X, E}) == TERMINAL
    assert ACTIVE | TERMINAL == frozenset(JobState)
    assert not ACTIVE & TERMINAL


@pytest.mark.parametrize("state", sorted(TERMINAL))
def test_terminal_states_are_absorbing(state: JobState) -> None:
    """No action leaves a terminal state (no table entry starts there)."""
    assert not [key for key in TRANSITIONS if key[0] is state]
    for action in Action:
        with pytest.raises(InvalidTransition):
            transition("j", state, action)


def test_every_table_target_is_a_state_and_active_sources_only() -> None:
    """Every entry starts in an active state; the six wire strings are unchanged."""
    assert {s for s, _ in TRANSITIONS} == set(ACTIVE)
    assert [s.value for s in JobState] == [
        "QUEUED",
        "RUNNING",
        "COMPLETED",
        "FAILED",
        "CANCELED",
        "EXPIRED",
    ]


def _job() -> Job:
    return Job(
        job_id="j1",
        client_id="c1",
        payload={"prompt": "hi"},
        constraints={"gpu": "A100"},
        priority=2,
        requested_at=10.0,
        expires_at=910.0,
        max_attempts=3,
        idempotency_key="k",
    )


def test_new_job_defaults() -> None:
    """A new Job is QUEUED at attempt 0 with no miner, no failures and seq 0."""
    job = _job()
    assert job.state is Q
    assert (job.attempt, job.failures, job.seq) == (0, 0, 0)
    assert job.miner_id is None
    assert not job.accepted
    assert job.rejected_by == {}


def test_record_round_trip() -> None:
    """record() then from_record() rebuilds an equal job, accepted from started_at."""
    job = _job()
    job.state = R
    job.attempt, job.failures, job.seq = 2, 1, 5
    job.miner_id, job.assigned_at, job.started_at = "m1", 11.0, 12.0
    rec = job.record()
    assert rec.state == "RUNNING"
    assert rec.miner_id == "m1"
    assert rec.idempotency_key == "k"
    back = Job.from_record(rec)
    assert back.record() == rec
    assert back.state is R
    assert back.accepted


def test_from_record_not_accepted_without_start_or_when_not_running() -> None:
    """accepted is False when started_at is None, or when the job is not RUNNING."""
    job = _job()
    job.state = R
    job.miner_id = "m1"
    assert not Job.from_record(job.record()).accepted
    job.state, job.started_at = C, 5.0
    job.result, job.receipt, job.error = {"ok": 1}, {"receipt_id": "r"}, None
    back = Job.from_record(job.record())
    assert not back.accepted
    assert back.state is C
    assert back.result == {"ok": 1}
    assert back.receipt == {"receipt_id": "r"}


def test_ids_are_32_hex_time_ordered_and_distinct_across_pool_refills() -> None:
    """Ids: 32 lowercase hex, the first 12 the creation time in ms; the random tail never
    repeats, also across refills of the random pool and after a fork resets it."""
    from dispatcher import ids

    made = [ids.new_id() for _ in range(2000)]  # several 4 KiB refills
    ids._forget_pool()  # what a forked child does
    made += [ids.new_id() for _ in range(10)]
    assert len(set(made)) == len(made)
    assert all(len(i) == 32 and int(i, 16) >= 0 and i == i.lower() for i in made)
    assert made == sorted(made, key=lambda i: i[:12])  # time-ordered prefix
