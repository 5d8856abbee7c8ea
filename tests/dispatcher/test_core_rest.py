"""The pure scheduler's REST miners: offered work only while a poll waits, leases, restore."""

from __future__ import annotations

from typing import Any

import pytest

from dispatcher.core import JobSpec, ResumeInfo, Scheduler, SchedulerConfig
from dispatcher.effects import Assign, Effect, Persist
from dispatcher.errors import UnknownMiner

LEASE = 600.0


def make(**config: Any) -> Scheduler:
    return Scheduler(SchedulerConfig(rest_lease=LEASE, **config))


def spec(job_id: str, ttl: float | None = None, **constraints: Any) -> JobSpec:
    return JobSpec(
        job_id=job_id,
        client_id="c1",
        payload={"n": job_id},
        constraints=constraints,
        ttl_seconds=ttl,
    )


def register(
    s: Scheduler,
    miner_id: str = "m1",
    concurrency: int = 1,
    *,
    now: float = 0.0,
    resume: bool = False,
    **caps: Any,
) -> ResumeInfo:
    """A REST miner registers (``resume``: its session comes back, as after a restart)."""
    session = f"rest:{miner_id}"
    info, _ = s.connect(
        miner_id,
        session,
        capabilities=caps,
        concurrency=concurrency,
        region=None,
        resume_session=session if resume else None,
        now=now,
        rest=True,
    )
    return info


def assigns(effects: list[Effect]) -> list[str]:
    return [e.job_id for e in effects if isinstance(e, Assign)]


def events(effects: list[Effect]) -> list[str]:
    return [e.event.event for e in effects if isinstance(e, Persist)]


def test_rest_miner_gets_nothing_without_a_waiting_poll() -> None:
    """A registered REST miner with free slots is not pushed work while no poll waits."""
    s = make()
    register(s)
    job, effects = s.submit(spec("a"), 1.0)
    assert assigns(effects) == []
    assert job.state == "QUEUED"


def test_poll_takes_a_queued_job_and_starts_it_at_once() -> None:
    """A poll is answered from the queue: assigned and started in one call, no accept timer."""
    s = make()
    register(s)
    s.submit(spec("a"), 1.0)
    effects = s.poll("m1", 2.0)
    assert assigns(effects) == ["a"]
    assert events(effects) == ["assigned", "started"]
    job = s.jobs["a"]
    assert job.state == "RUNNING"
    assert job.accepted
    assert s.miners["m1"].polls == 0
    assert s.next_deadline() == 2.0 + LEASE  # lease, not the 10 s accept timeout


def test_waiting_poll_receives_a_later_submit() -> None:
    """A waiting poll makes the miner idle: the next matching submit is assigned to it."""
    s = make()
    register(s)
    assert s.poll("m1", 1.0) == []
    assert s.miners["m1"].polls == 1
    _, effects = s.submit(spec("a"), 2.0)
    assert assigns(effects) == ["a"]
    assert s.miners["m1"].polls == 0


def test_poll_cancel_withdraws_the_slot() -> None:
    """After the poll gave up, a new job stays queued."""
    s = make()
    register(s)
    s.poll("m1", 1.0)
    assert s.poll_cancel("m1") is True
    job, effects = s.submit(spec("a"), 2.0)
    assert assigns(effects) == []
    assert job.state == "QUEUED"


def test_poll_cancel_after_an_assignment_says_so() -> None:
    """When the waiting slot was already consumed by an assignment, poll_cancel returns False."""
    s = make()
    register(s)
    s.poll("m1", 1.0)
    s.submit(spec("a"), 2.0)
    assert s.poll_cancel("m1") is False


def test_poll_never_exceeds_concurrency() -> None:
    """A miner holding its one slot gets nothing even with a poll waiting."""
    s = make()
    register(s)
    s.submit(spec("a"), 1.0)
    s.submit(spec("b"), 1.0)
    assert assigns(s.poll("m1", 2.0)) == ["a"]
    assert assigns(s.poll("m1", 3.0)) == []
    assert s.jobs["b"].state == "QUEUED"


def test_two_polls_with_concurrency_two_take_jobs_fifo() -> None:
    """FIFO across polls of one miner with two slots."""
    s = make()
    register(s, concurrency=2)
    s.submit(spec("a"), 1.0)
    s.submit(spec("b"), 1.5)
    assert assigns(s.poll("m1", 2.0)) == ["a"]
    assert assigns(s.poll("m1", 2.0)) == ["b"]


def test_poll_from_unknown_miner_raises() -> None:
    """Only registered REST miners may poll."""
    s = make()
    try:
        s.poll("ghost", 1.0)
    except UnknownMiner:
        pass
    else:
        raise AssertionError("expected UnknownMiner")


def test_lease_expiry_requeues_charged_then_fails() -> None:
    """A REST job past its lease is requeued (charged); at max attempts it fails."""
    s = make(max_attempts=2)
    register(s)
    s.submit(spec("a", ttl=10_000), 0.0)
    s.poll("m1", 1.0)
    effects = s.tick(1.0 + LEASE)
    assert "requeued" in events(effects)
    job = s.jobs["a"]
    assert job.state == "QUEUED"
    assert job.failures == 1
    s.poll("m1", 700.0)
    assert job.attempt == 2
    s.tick(700.0 + LEASE)
    assert job.state == "FAILED"
    assert "max attempts" in (job.error or "")


def test_lease_is_capped_by_expiry() -> None:
    """The run limit never outlives the job's TTL: the job expires, not requeues."""
    s = make()
    register(s)
    s.submit(spec("a", ttl=30), 0.0)
    s.poll("m1", 1.0)
    assert s.next_deadline() == 30.0
    s.tick(30.0)
    assert s.jobs["a"].state == "EXPIRED"


def test_hand_back_requeues_uncharged() -> None:
    """An assignment no poll could receive goes back to the queue at no cost."""
    s = make()
    register(s)
    s.submit(spec("a"), 0.0)
    s.poll("m1", 1.0)
    s.hand_back("m1", "a", 2.0, 1)
    job = s.jobs["a"]
    assert job.state == "QUEUED"
    assert job.failures == 0


def test_complete_frees_the_slot_for_the_next_poll() -> None:
    """After a result, the next poll gets the next job."""
    s = make()
    register(s)
    s.submit(spec("a"), 0.0)
    s.submit(spec("b"), 0.0)
    s.poll("m1", 1.0)
    s.complete("m1", "a", {"ok": True}, {}, 2.0)
    assert assigns(s.poll("m1", 3.0)) == ["b"]


def test_restored_rest_miner_keeps_its_running_job() -> None:
    """After a restart the REST miner is re-registered with resume: its job stays RUNNING."""
    s = make()
    register(s)
    s.submit(spec("a", ttl=10_000), 0.0)
    s.poll("m1", 1.0)
    rec = s.jobs["a"].record()
    fresh = make()
    fresh.restore([rec], {"m1": "rest:m1"}, 50.0)
    info = register(fresh, now=50.0, resume=True)
    assert info.resumed == ("a",)
    assert fresh.jobs["a"].state == "RUNNING"
    fresh.tick(60.0)  # past the resume grace: nothing is lost
    assert fresh.jobs["a"].state == "RUNNING"
    fresh.tick(1.0 + LEASE)  # the lease still counts from the original start
    assert fresh.jobs["a"].state == "QUEUED"


def test_socket_connect_of_the_same_id_ends_rest_mode() -> None:
    """A socket session replacing a REST miner drops the waiting polls."""
    s = make()
    register(s)
    s.poll("m1", 1.0)
    s.connect(
        "m1",
        "ws-1",
        capabilities={},
        concurrency=1,
        region=None,
        resume_session=None,
        now=2.0,
    )
    assert s.poll_cancel("m1") is True
    assert not s.miners["m1"].rest


def test_withdrawing_one_of_two_waiting_polls_keeps_the_miner_idle() -> None:
    """With two polls waiting, cancelling one leaves a slot open for the next submit."""
    s = make()
    register(s, concurrency=2)
    s.poll("m1", 1.0)
    s.poll("m1", 1.0)
    assert s.poll_cancel("m1") is True
    _, effects = s.submit(spec("a"), 2.0)
    assert assigns(effects) == ["a"]


def test_a_stale_lease_timer_does_nothing_after_the_job_moved_on() -> None:
    """The lease of an attempt that was requeued and reassigned never touches the new attempt."""
    s = make()
    register(s, "m1")
    register(s, "m2")
    s.submit(spec("a"), 0.0)
    s.poll("m1", 1.0)  # attempt 1 on m1, lease due at 1 + LEASE
    s.fail("m1", "a", error_code="e", error_message="m", retryable=True, now=2.0)
    s.poll("m2", 3.0)  # attempt 2 on m2, lease due at 3 + LEASE
    assert s.tick(1.0 + LEASE) == []
    job = s.jobs["a"]
    assert (job.state, job.miner_id, job.attempt) == ("RUNNING", "m2", 2)


def test_leave_requeues_uncharged_and_forgets_the_miner() -> None:
    """A deregistered miner's job goes back to the queue, not charged (its poll may never have
    delivered it), never back to the miner that left, even with a poll of it waiting."""
    s = make()
    register(s, "m1", concurrency=2)
    register(s, "m2")
    s.submit(spec("a"), 1.0)
    assert assigns(s.poll("m1", 2.0)) == ["a"]
    s.poll("m1", 2.5)  # m1's second slot waits: it must not get the job back
    effects = s.leave("m1", 4.0)
    assert (events(effects), assigns(effects)) == (["requeued"], [])
    job = s.job("a")
    assert job is not None
    assert (job.state, job.failures) == ("QUEUED", 0)
    assert "m1" not in s.miners
    assert s.poll_cancel("m1")  # a poll still waiting on the web side withdraws quietly
    assert assigns(s.poll("m2", 5.0)) == ["a"]
    assert job.attempt == 2
    with pytest.raises(UnknownMiner):
        s.leave("m1", 5.0)


def test_a_resumed_rest_miner_keeps_one_lease_timer_per_job() -> None:
    """Each resume (a capabilities update, a restart) re-arms the job's lease: the old timer
    is dropped, so updates do not pile timers up."""
    s = make()
    register(s, "m1")
    s.submit(spec("a"), 1.0)
    assert assigns(s.poll("m1", 2.0)) == ["a"]
    job = s.job("a")
    assert job is not None
    for n in range(5):
        register(s, now=3.0 + n, resume=True)
    leases = [t for t in job.timers if getattr(t, "kind", None) == "lease"]
    assert len(leases) == 1
    assert leases[0].when == 2.0 + LEASE  # still from the start: a resume adds no run time
    assert len(s._timers) - s._dead_timers <= 2  # the lease and the job's expiry


def test_a_lease_outlived_by_its_attempt_changes_nothing_when_it_fires() -> None:
    """A job requeued before its lease ran out (here its miner deregistered) keeps the old
    lease timer until it fires; then it finds another state or attempt and does nothing."""
    s = make()
    register(s, "m1")
    s.submit(spec("a"), 1.0)
    assert assigns(s.poll("m1", 2.0)) == ["a"]
    s.leave("m1", 3.0)
    job = s.job("a")
    assert job is not None
    assert (job.state, job.attempt) == ("QUEUED", 1)
    assert s.tick(2.0 + LEASE + 1) == []
    assert (job.state, job.attempt, job.failures) == ("QUEUED", 1, 0)


def test_a_rest_session_resumed_over_a_socket_drops_its_leases() -> None:
    """A socket hello resuming a REST miner's session (same key) kept the REST lease timers:
    its jobs, running on the socket now, were requeued "lease expired" (a socket miner's
    liveness is its connection). The leases end with the switch."""
    s = make()
    register(s)
    s.submit(spec("a", ttl=10_000), 0.0)
    s.poll("m1", 1.0)
    info, _ = s.connect(
        "m1",
        "ws-1",
        capabilities={},
        concurrency=1,
        region=None,
        resume_session="rest:m1",
        now=2.0,
    )
    assert info.resumed == ("a",)
    assert events(s.tick(1.0 + LEASE)) == []
    assert s.jobs["a"].state == "RUNNING"
    assert s.jobs["a"].miner_id == "m1"
