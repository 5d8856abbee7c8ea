"""Ring 2: behaviour of the pure Scheduler through its public methods (dispatcher/core.py).

Time is a float passed in; each test asserts the returned effects and ``next_deadline()``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest

from dispatcher.core import PROGRESS_EVENT_COST, JobSpec, ResumeInfo, Scheduler, SchedulerConfig
from dispatcher.effects import Assign, CloseSession, Effect, Persist, Revoke
from dispatcher.errors import (
    InvalidTransition,
    NotAssigned,
    ProgressLimit,
    UnknownJob,
    UnknownMiner,
)
from dispatcher.jobs import Job, JobState
from protocol.records import JobRecord
from protocol.types import CloseCode, JSONObject

A100: JSONObject = {
    "gpus": [{"name": "A100", "memory_mb": 81920}],
    "cuda": "12.2",
    "models": ["llama3"],
    "price": 0.5,
}


def receipt_factory(job: Job, unit_price: float | None, now: float) -> JSONObject:
    return {"receipt_id": f"r-{job.job_id}-{job.attempt}", "unit_price": unit_price, "at": now}


def make(**config: Any) -> Scheduler:
    return Scheduler(SchedulerConfig(**config), receipt_factory)


def spec(job_id: str = "j1", client_id: str = "c1", **kw: Any) -> JobSpec:
    kw.setdefault("payload", {"prompt": job_id})
    kw.setdefault("constraints", {})
    return JobSpec(job_id=job_id, client_id=client_id, **kw)


def submit(s: Scheduler, job_id: str = "j1", now: float = 0.0, **kw: Any) -> list[Effect]:
    _, effects = s.submit(spec(job_id, **kw), now)
    return effects


def connect(
    s: Scheduler,
    miner_id: str = "m1",
    session_id: str | None = None,
    *,
    capabilities: JSONObject | None = None,
    concurrency: int = 1,
    region: str | None = None,
    resume: str | None = None,
    now: float = 0.0,
) -> tuple[ResumeInfo, list[Effect]]:
    return s.connect(
        miner_id,
        session_id or f"{miner_id}-s1",
        capabilities=capabilities or {},
        concurrency=concurrency,
        region=region,
        resume_session=resume,
        now=now,
    )


def job_of(s: Scheduler, job_id: str) -> Job:
    job = s.job(job_id)
    assert job is not None
    return job


def summary(effects: list[Effect]) -> list[tuple[Any, ...]]:
    """A compact, order-preserving view of an effect list."""
    out: list[tuple[Any, ...]] = []
    for e in effects:
        match e:
            case Persist():
                out.append(("persist", e.event.job_id, e.event.event))
            case Assign():
                out.append(("assign", e.miner_id, e.job_id, e.attempt))
            case Revoke():
                out.append(("revoke", e.miner_id, e.job_id, e.reason))
            case CloseSession():
                out.append(("close", e.miner_id, e.session_id, e.code))
    return out


def assigns(effects: list[Effect]) -> list[tuple[str, str, int]]:
    return [(e.miner_id, e.job_id, e.attempt) for e in effects if isinstance(e, Assign)]


def state(s: Scheduler, job_id: str) -> JobState:
    job = s.job(job_id)
    assert job is not None
    return job.state


def held(s: Scheduler, miner_id: str) -> list[str]:
    miner = s.miners.get(miner_id)
    return [] if miner is None else list(miner.jobs)


# ---- submit and push -----------------------------------------------------------------------


def test_submit_without_miners_queues() -> None:
    """With no miner the job is QUEUED, one 'queued' Persist, deadline = its expiry."""
    s = make()
    job, effects = s.submit(spec("j1"), 100.0)
    assert summary(effects) == [("persist", "j1", "queued")]
    persist = effects[0]
    assert isinstance(persist, Persist)
    assert persist.event.seq == 1
    assert persist.event.state == "QUEUED"
    assert persist.event.at == 100.0
    assert persist.job.state == "QUEUED"
    assert job.state is JobState.QUEUED
    assert job.expires_at == 1000.0
    assert s.next_deadline() == 1000.0
    assert s.statistics().jobs_queued == 1


def test_push_goes_to_matching_idle_miner_only() -> None:
    """A job with a gpu constraint is pushed to the A100 miner, not the older plain one."""
    s = make()
    connect(s, "plain", now=0.0)
    connect(s, "gpu", capabilities=A100, now=1.0)
    effects = submit(s, "j1", now=2.0, constraints={"gpu": "A100"})
    assert summary(effects) == [
        ("persist", "j1", "queued"),
        ("persist", "j1", "assigned"),
        ("assign", "gpu", "j1", 1),
    ]
    assign = effects[-1]
    assert isinstance(assign, Assign)
    assert assign.session_id == "gpu-s1"
    assert assign.payload == {"prompt": "j1"}
    assert assign.constraints == {"gpu": "A100"}
    assert assign.expires_at == 902.0
    assert assign.accept_timeout == 10.0
    assert state(s, "j1") is JobState.RUNNING
    assert s.next_deadline() == 12.0  # accept timeout
    # an unconstrained job goes to the miner that has been free longest
    assert assigns(submit(s, "j2", now=3.0)) == [("plain", "j2", 1)]


def test_job_no_miner_matches_stays_queued() -> None:
    """A job nobody matches stays queued; a matching miner that connects later receives it."""
    s = make()
    connect(s, "plain")
    assert assigns(submit(s, "j1", constraints={"region": "us"})) == []
    assert state(s, "j1") is JobState.QUEUED
    _, effects = connect(s, "us", region="us", now=5.0)
    assert summary(effects) == [("persist", "j1", "assigned"), ("assign", "us", "j1", 1)]


def test_concurrency_never_exceeded() -> None:
    """A miner with concurrency 2 gets two of three jobs; the third waits for a free slot."""
    s = make()
    for i in range(3):
        submit(s, f"j{i}", now=float(i))
    _, effects = connect(s, "m1", concurrency=2, now=5.0)
    assert assigns(effects) == [("m1", "j0", 1), ("m1", "j1", 1)]
    assert state(s, "j2") is JobState.QUEUED
    assert assigns(submit(s, "j3", now=6.0)) == []
    s.accept("m1", "j0", 7.0)
    _, effects = s.complete("m1", "j0", {"ok": True}, {}, 8.0)
    # the freed slot is refilled within the same batch (Persists commit before any push)
    assert summary(effects) == [
        ("persist", "j2", "assigned"),
        ("assign", "m1", "j2", 1),
        ("persist", "j0", "completed"),
    ]
    assert held(s, "m1") == ["j1", "j2"]


def test_fifo_within_priority_and_priority_first() -> None:
    """Queued jobs go out by priority, then in submission order."""
    s = make()
    submit(s, "a", now=0.0)
    submit(s, "b", now=1.0, priority=5)
    submit(s, "c", now=2.0)
    submit(s, "d", now=3.0, priority=5)
    order: list[str] = []
    _, effects = connect(s, "m1", now=4.0)
    now = 5.0
    while assigns(effects):
        [(_, job_id, _)] = assigns(effects)
        order.append(job_id)
        s.accept("m1", job_id, now)
        _, effects = s.complete("m1", job_id, {}, {}, now)
        now += 1
    assert order == ["b", "d", "a", "c"]


def test_draining_and_concurrency_status() -> None:
    """A draining miner gets no new work; undraining or more slots fills it from the queue."""
    s = make()
    connect(s, "m1", concurrency=1)
    assert s.set_status("m1", concurrency=None, draining=True, now=1.0) == []
    assert assigns(submit(s, "j1", now=2.0)) == []
    assert assigns(submit(s, "j2", now=3.0)) == []
    assert assigns(s.set_status("m1", concurrency=None, draining=False, now=4.0)) == [
        ("m1", "j1", 1)
    ]
    assert assigns(s.set_status("m1", concurrency=2, draining=None, now=5.0)) == [("m1", "j2", 1)]
    # lowering concurrency never revokes; it only stops new work
    assert s.set_status("m1", concurrency=1, draining=None, now=6.0) == []
    submit(s, "j3", now=7.0)
    s.accept("m1", "j1", 8.0)
    _, effects = s.complete("m1", "j1", {}, {}, 9.0)
    assert assigns(effects) == []  # still holds j2 = its concurrency
    assert s.statistics().miners_idle == 0


def test_set_status_unknown_miner() -> None:
    """set_status for an unknown or disconnected miner raises UnknownMiner."""
    s = make()
    with pytest.raises(UnknownMiner):
        s.set_status("ghost", concurrency=1, draining=None, now=0.0)
    connect(s, "m1")
    s.disconnect("m1", "m1-s1", 1.0)
    with pytest.raises(UnknownMiner) as info:
        s.set_status("m1", concurrency=1, draining=None, now=2.0)
    assert info.value.miner_id == "m1"


# ---- accept / reject / progress ------------------------------------------------------------


def test_accept_and_progress_events() -> None:
    """accept emits 'started' once; progress relays its fields; repeat accept is a no-op."""
    s = make()
    connect(s, "m1")
    submit(s, "j1")
    effects = s.accept("m1", "j1", 1.0)
    assert summary(effects) == [("persist", "j1", "started")]
    assert s.accept("m1", "j1", 2.0) == []
    effects = s.progress("m1", "j1", 3.0, progress=0.5, message="half", output="tok")
    [persist] = effects
    assert isinstance(persist, Persist)
    assert persist.event.event == "progress"
    assert persist.event.data == {"progress": 0.5, "message": "half", "output": "tok"}
    assert persist.event.state == "RUNNING"
    [persist] = s.progress("m1", "j1", 4.0)
    assert isinstance(persist, Persist)
    assert persist.event.data == {}


def test_progress_before_accept_starts_the_job() -> None:
    """A progress frame on an unaccepted job implies the accept: 'started' comes first."""
    s = make()
    connect(s, "m1")
    submit(s, "j1")
    effects = s.progress("m1", "j1", 1.0, progress=0.1, attempt=1)
    assert summary(effects) == [("persist", "j1", "started"), ("persist", "j1", "progress")]
    assert s.tick(10.0) == []  # accepted: no accept timeout


def test_progress_past_the_jobs_budget_is_refused_and_changes_nothing() -> None:
    """A job stores at most ``max_progress_bytes`` of progress, over all its attempts: each
    event counts its output and message plus PROGRESS_EVENT_COST (so empty events count too).
    The event that would pass it is refused before anything changes, even the implied start;
    the job goes on and its result is taken."""
    budget = 3 * PROGRESS_EVENT_COST + 10
    s = make(max_progress_bytes=budget)
    connect(s, "m1")
    submit(s, "j1")
    s.progress("m1", "j1", 1.0, output="12345")  # 69
    s.progress("m1", "j1", 2.0, message="1234")  # 137
    with pytest.raises(ProgressLimit, match="MAX_PROGRESS_BYTES"):
        s.progress("m1", "j1", 3.0, output="1234", message="12")  # 207 > 202
    assert job_of(s, "j1").seq == 5  # queued, assigned, started, two progress; not the refused one
    [persist] = s.progress("m1", "j1", 4.0)  # 201: what is left still fits
    assert isinstance(persist, Persist)
    with pytest.raises(ProgressLimit):
        s.progress("m1", "j1", 5.0)
    job, _effects = s.complete("m1", "j1", {"ok": True}, {}, 6.0)
    assert job.state is JobState.COMPLETED
    assert job.seq == 7


def test_the_progress_budget_spans_attempts_and_a_refusal_starts_nothing() -> None:
    """A requeued job keeps what it used (the budget bounds the job's stored events, not one
    attempt's); a refused progress on an unaccepted job does not start it."""
    s = make(max_progress_bytes=2 * PROGRESS_EVENT_COST)
    connect(s, "m1")
    connect(s, "m2")
    submit(s, "j1")
    holder = job_of(s, "j1").miner_id
    assert holder is not None
    s.progress(holder, "j1", 1.0, output="x" * PROGRESS_EVENT_COST)
    s.fail(holder, "j1", error_code="oom", error_message="oom", retryable=True, now=2.0)
    other = job_of(s, "j1").miner_id
    assert other is not None
    assert other != holder
    with pytest.raises(ProgressLimit):
        s.progress(other, "j1", 3.0, output="y")
    assert not job_of(s, "j1").accepted
    assert summary(s.accept(other, "j1", 4.0)) == [("persist", "j1", "started")]


def test_reject_requeues_uncharged_and_other_miners_come_first() -> None:
    """A reject requeues without charging; during its pause that miner gets other work, and
    another matching miner gets the job."""
    s = make()
    connect(s, "m1")
    submit(s, "j1")
    effects = s.reject("m1", "j1", "busy", 1.0)
    assert summary(effects) == [("persist", "j1", "requeued")]
    persist = effects[0]
    assert isinstance(persist, Persist)
    assert persist.event.data == {"reason": "rejected: busy"}
    job = s.job("j1")
    assert job is not None
    assert job.failures == 0
    assert job.miner_id is None
    assert s.statistics().miners_idle == 1
    assert assigns(submit(s, "j2", now=2.0)) == [("m1", "j2", 1)]  # m1 still gets other work
    _, effects = connect(s, "m2", now=3.0)
    assert assigns(effects) == [("m2", "j1", 2)]
    [persist] = s.reject("m2", "j1", "", 4.0)
    assert isinstance(persist, Persist)
    assert persist.event.data == {"reason": "rejected"}


def test_a_refusing_miner_is_offered_the_job_again_after_a_growing_pause() -> None:
    """protocol.md: a reject returns the job to the queue, and repeated rejects lower the
    miner's priority for it. With one matching miner the job must not wait for its TTL: that
    miner gets it back once its pause ends (5 s, then 10 s: doubled per refusal, capped), the
    pause's end being a deadline of its own; no accept in time counts as a refusal too."""
    s = make(reject_pause=5.0, reject_pause_max=8.0, accept_timeout=2.0)

    def next_wake_after(now: float) -> float | None:
        """The next deadline once the stale ones (earlier attempts' timers) have fired."""
        while (deadline := s.next_deadline()) is not None and deadline <= now:
            assert assigns(s.tick(deadline)) == []
        return s.next_deadline()

    connect(s, "m1")
    submit(s, "j1")
    s.reject("m1", "j1", "busy", 1.0)
    assert next_wake_after(5.999) == 6.0
    assert state(s, "j1") is JobState.QUEUED
    assert assigns(s.tick(6.0)) == [("m1", "j1", 2)]
    s.reject("m1", "j1", "busy", 7.0, attempt=2)
    assert next_wake_after(14.999) == 15.0  # capped: 10 s would pass reject_pause_max
    assert assigns(s.tick(15.0)) == [("m1", "j1", 3)]
    assert summary(s.tick(17.0))[0] == ("revoke", "m1", "j1", "accept timeout")  # a refusal
    assert state(s, "j1") is JobState.QUEUED
    assert next_wake_after(24.999) == 25.0
    assert assigns(s.tick(25.0)) == [("m1", "j1", 4)]
    job = s.job("j1")
    assert job is not None
    assert job.failures == 0  # none was charged


def test_a_miner_may_refuse_a_job_any_number_of_times() -> None:
    """The pause stays at its cap however often one miner refuses one job (a week-long TTL
    allows thousands of refusals at a 5-minute pause; the doubling must not overflow)."""
    s = make(reject_pause=5.0, reject_pause_max=300.0, max_ttl=7 * 86400.0)
    connect(s, "m1")
    submit(s, "j1", ttl_seconds=7 * 86400.0)
    now = 0.0
    for n in range(1, 1100):
        s.reject("m1", "j1", "busy", now, attempt=n)
        pause = min(5.0 * 2.0 ** min(n - 1, 10), 300.0)
        assert assigns(s.tick(now + pause)) == [("m1", "j1", n + 1)]
        now += pause
    job = s.job("j1")
    assert job is not None
    assert job.rejected_by["m1"] == (now, 1099)


def test_a_pause_ending_while_another_miner_runs_the_job_changes_nothing() -> None:
    """The re-offer only applies to a job still queued under the same queue entry."""
    s = make(reject_pause=5.0)
    connect(s, "m1")
    submit(s, "j1")
    s.reject("m1", "j1", "busy", 1.0)
    _, effects = connect(s, "m2", now=2.0)
    assert assigns(effects) == [("m2", "j1", 2)]
    assert assigns(s.tick(6.0)) == []
    assert held(s, "m2") == ["j1"]
    assert state(s, "j1") is JobState.RUNNING


def test_acting_on_unknown_or_unheld_job() -> None:
    """accept/progress/fail on an unknown job -> UnknownJob; on another miner's -> NotAssigned."""
    s = make()
    connect(s, "m1")
    connect(s, "m2")
    submit(s, "j1")
    with pytest.raises(UnknownJob):
        s.accept("m1", "nope", 1.0)
    with pytest.raises(NotAssigned) as info:
        s.accept("m2", "j1", 1.0)
    assert (info.value.job_id, info.value.miner_id) == ("j1", "m2")
    with pytest.raises(NotAssigned):
        s.accept("m1", "j1", 1.0, attempt=2)
    with pytest.raises(NotAssigned):
        s.fail("m2", "j1", error_code="x", error_message="y", retryable=True, now=1.0)
    with pytest.raises(NotAssigned):
        s.complete("m2", "j1", {}, {}, 1.0)
    submit(s, "q1", constraints={"gpu": "none"})
    with pytest.raises(NotAssigned):
        s.progress("m1", "q1", 1.0)  # QUEUED: nobody holds it


# ---- accept timeout ------------------------------------------------------------------------


def test_accept_timeout_revokes_and_requeues_uncharged() -> None:
    """No accept within accept_timeout: Revoke, requeue uncharged, offered to another miner."""
    s = make()
    connect(s, "m1", now=0.0)
    connect(s, "m2", now=0.0)
    assert assigns(submit(s, "j1", now=1.0)) == [("m1", "j1", 1)]
    assert s.next_deadline() == 11.0
    assert s.tick(10.999) == []
    effects = s.tick(11.0)
    assert summary(effects) == [
        ("revoke", "m1", "j1", "accept timeout"),
        ("persist", "j1", "requeued"),
        ("persist", "j1", "assigned"),
        ("assign", "m2", "j1", 2),
    ]
    job = s.job("j1")
    assert job is not None
    assert job.failures == 0
    assert s.next_deadline() == 21.0
    with pytest.raises(NotAssigned):
        s.accept("m1", "j1", 11.5)


def test_accept_timeout_miner_not_offered_again() -> None:
    """After its accept timeout the job waits for another miner; the slow one gets other work."""
    s = make()
    connect(s, "m1")
    submit(s, "j1", now=1.0)
    effects = s.tick(11.0)
    assert summary(effects) == [
        ("revoke", "m1", "j1", "accept timeout"),
        ("persist", "j1", "requeued"),
    ]
    assert state(s, "j1") is JobState.QUEUED
    assert s.set_status("m1", concurrency=2, draining=None, now=12.0) == []
    assert assigns(submit(s, "j2", now=13.0)) == [("m1", "j2", 1)]
    _, effects = connect(s, "m2", now=14.0)
    assert assigns(effects) == [("m2", "j1", 2)]


def test_accept_timeout_is_per_attempt() -> None:
    """An accepted job is not timed out; the timeout of an old attempt does nothing."""
    s = make()
    connect(s, "m1")
    submit(s, "j1", now=0.0)
    s.accept("m1", "j1", 5.0)
    assert s.tick(10.0) == []
    assert state(s, "j1") is JobState.RUNNING


# ---- disconnect, resume and grace ----------------------------------------------------------


def test_disconnect_before_accept_requeues_immediately() -> None:
    """A disconnect before accept requeues at once (uncharged) and drops the miner."""
    s = make()
    connect(s, "m1")
    submit(s, "j1", now=1.0)
    connect(s, "m2", now=2.0)
    effects = s.disconnect("m1", "m1-s1", 3.0)
    assert summary(effects) == [
        ("persist", "j1", "requeued"),
        ("persist", "j1", "assigned"),
        ("assign", "m2", "j1", 2),
    ]
    job = s.job("j1")
    assert job is not None
    assert job.failures == 0
    assert "m1" not in s.miners
    stats = s.statistics()
    assert (stats.miners_connected, stats.miners_in_grace) == (1, 0)


def test_disconnect_after_accept_waits_for_grace_and_resume_keeps_job() -> None:
    """After accept a disconnect changes nothing for resume_grace; resume keeps the job."""
    s = make()
    connect(s, "m1", concurrency=2)
    submit(s, "j1", now=1.0)
    s.accept("m1", "j1", 2.0)
    assert s.disconnect("m1", "m1-s1", 10.0) == []
    assert s.next_deadline() == 11.0  # the stale accept timer of j1 (harmless)
    assert s.tick(11.0) == []
    assert s.next_deadline() == 25.0  # grace
    assert s.statistics().miners_in_grace == 1
    assert assigns(submit(s, "j2", now=12.0)) == []  # a miner in grace gets no work
    info, effects = connect(s, "m1", "m1-s2", concurrency=2, resume="m1-s1", now=20.0)
    assert info == ResumeInfo(resumed=("j1",), revoked=())
    assert assigns(effects) == [("m1", "j2", 1)]
    assert state(s, "j1") is JobState.RUNNING
    assert s.next_deadline() == 30.0  # j2's accept timeout; the grace timer is gone
    s.accept("m1", "j2", 21.0)
    assert s.tick(30.0) == []
    job, effects = s.complete("m1", "j1", {"v": 1}, {}, 31.0)
    assert summary(effects) == [("persist", "j1", "completed")]
    assert job.attempt == 1


def test_grace_expiry_requeues_and_fences_the_late_result() -> None:
    """After grace the job is requeued (charged); the lost miner's late result changes nothing."""
    s = make()
    connect(s, "m1")
    submit(s, "j1", now=0.0)
    s.accept("m1", "j1", 1.0)
    s.disconnect("m1", "m1-s1", 5.0)
    assert s.tick(19.999) == []
    effects = s.tick(20.0)
    assert summary(effects) == [("persist", "j1", "requeued")]
    persist = effects[0]
    assert isinstance(persist, Persist)
    assert persist.event.data == {"reason": "miner lost"}
    assert persist.job.failures == 1
    assert persist.job.miner_id is None
    assert "m1" not in s.miners
    _, effects = connect(s, "m2", now=21.0)
    assert assigns(effects) == [("m2", "j1", 2)]
    job = s.job("j1")
    assert job is not None
    before = job.record()
    with pytest.raises(NotAssigned):
        s.complete("m1", "j1", {"late": True}, {}, 22.0)
    with pytest.raises(NotAssigned):
        s.fail("m1", "j1", error_code="e", error_message="m", retryable=False, now=22.0)
    assert job.record() == before


def test_fencing_by_attempt_when_same_miner_gets_the_job_back() -> None:
    """The same miner, reassigned the job, cannot complete it with the old attempt."""
    s = make()
    connect(s, "m1")
    submit(s, "j1", now=0.0)
    s.accept("m1", "j1", 1.0, attempt=1)
    s.disconnect("m1", "m1-s1", 2.0)
    s.tick(17.0)
    _, effects = connect(s, "m1", "m1-s2", now=18.0)  # a fresh session, no resume
    assert assigns(effects) == [("m1", "j1", 2)]
    job = s.job("j1")
    assert job is not None
    before = job.record()
    with pytest.raises(NotAssigned):
        s.complete("m1", "j1", {"stale": True}, {}, 19.0, attempt=1)
    with pytest.raises(NotAssigned):
        s.progress("m1", "j1", 19.0, attempt=1)
    assert job.record() == before
    job, effects = s.complete("m1", "j1", {"fresh": True}, {}, 20.0, attempt=2)
    assert summary(effects) == [("persist", "j1", "started"), ("persist", "j1", "completed")]
    assert job.receipt == {"receipt_id": "r-j1-2", "unit_price": None, "at": 20.0}


def test_resume_with_wrong_session_is_a_restart() -> None:
    """A reconnect with an unknown resume id revokes and requeues what the miner held."""
    s = make()
    connect(s, "m1")
    submit(s, "j1", now=0.0)
    s.accept("m1", "j1", 1.0)
    s.disconnect("m1", "m1-s1", 2.0)
    info, effects = connect(s, "m1", "m1-s2", resume="bogus", now=3.0)
    assert info == ResumeInfo(resumed=(), revoked=("j1",))
    assert summary(effects) == [
        ("persist", "j1", "requeued"),
        ("persist", "j1", "assigned"),
        ("assign", "m1", "j1", 2),
    ]
    job = s.job("j1")
    assert job is not None
    assert job.failures == 1  # it had started: the attempt counts
    s.accept("m1", "j1", 4.0)
    assert s.tick(17.0) == []  # the old grace timer died with the old session


def test_restart_before_accept_is_not_charged() -> None:
    """A miner restarting (no resume) before accepting is treated like a disconnect: no charge."""
    s = make(max_attempts=1)
    connect(s, "m1")
    submit(s, "j1", now=0.0)
    info, effects = connect(s, "m1", "m1-s2", now=1.0)
    assert info.revoked == ("j1",)
    assert summary(effects) == [
        ("close", "m1", "m1-s1", CloseCode.REPLACED),
        ("persist", "j1", "requeued"),
        ("persist", "j1", "assigned"),
        ("assign", "m1", "j1", 2),
    ]
    job = s.job("j1")
    assert job is not None
    assert job.failures == 0


def test_replacement_of_live_session_closes_old_with_4409() -> None:
    """A second live session for the same miner closes the first (4409); it keeps its jobs."""
    s = make()
    connect(s, "m1")
    submit(s, "j1", now=0.0)
    s.accept("m1", "j1", 1.0)
    info, effects = connect(s, "m1", "m1-s2", resume="m1-s1", now=2.0)
    assert effects == [
        CloseSession(miner_id="m1", session_id="m1-s1", code=CloseCode.REPLACED, reason="replaced")
    ]
    assert info == ResumeInfo(resumed=("j1",), revoked=())
    # the old socket's close arrives later and is ignored
    assert s.disconnect("m1", "m1-s1", 3.0) == []
    assert s.miners["m1"].connected
    assert s.disconnect("ghost", "x", 3.0) == []
    job, _ = s.complete("m1", "j1", {}, {}, 4.0)
    assert job.state is JobState.COMPLETED


def test_reconnect_same_session_twice_is_not_a_replacement() -> None:
    """A repeated hello on the live session id closes nothing."""
    s = make()
    connect(s, "m1")
    info, effects = connect(s, "m1", "m1-s1", resume="m1-s1", now=1.0)
    assert effects == []
    assert info == ResumeInfo(resumed=(), revoked=())


def test_cancel_during_grace_is_revoked_on_resume() -> None:
    """A job canceled while its miner is in grace is listed in 'revoked' when it resumes."""
    s = make()
    connect(s, "m1")
    submit(s, "j1", now=0.0)
    s.accept("m1", "j1", 1.0)
    s.disconnect("m1", "m1-s1", 2.0)
    _, effects = s.cancel("c1", "j1", 3.0)
    assert summary(effects) == [("persist", "j1", "canceled")]  # nobody to push to
    info, _ = connect(s, "m1", "m1-s2", resume="m1-s1", now=4.0)
    assert info == ResumeInfo(resumed=(), revoked=("j1",))


def test_a_cancel_pushed_to_a_dead_socket_is_revoked_on_resume() -> None:
    """A job canceled while its miner's socket was already dead (not yet noticed) is listed in
    ``revoked`` when that session resumes: its ``job.cancel`` was lost with the socket, and the
    welcome listed the job in neither ``resumed`` nor ``revoked``."""
    s = make()
    connect(s, "m1", concurrency=2)
    submit(s, "j1", now=0.0)
    submit(s, "j2", now=0.0)
    s.accept("m1", "j1", 1.0)
    s.accept("m1", "j2", 1.0)
    _, effects = s.cancel("c1", "j1", 3.0)
    assert ("revoke", "m1", "j1", "canceled") in summary(effects)  # pushed to a dead socket
    s.disconnect("m1", "m1-s1", 4.0)
    info, _ = connect(s, "m1", "m1-s2", resume="m1-s1", concurrency=2, now=5.0)
    assert info == ResumeInfo(resumed=("j2",), revoked=("j1",))


def test_a_revoke_pushed_to_a_dead_socket_is_revoked_on_a_late_resume() -> None:
    """A miner left with no job once its last one was revoked (an expiry pushed to its dead
    socket) is dropped when its socket closes; a resume after that still names the job."""
    s = make()
    connect(s, "m1")
    submit(s, "j1", now=0.0, ttl_seconds=5)
    s.accept("m1", "j1", 1.0)
    assert ("revoke", "m1", "j1", "expired") in summary(s.tick(5.0))
    s.disconnect("m1", "m1-s1", 6.0)
    assert "m1" not in s.miners
    info, _ = connect(s, "m1", "m1-s2", resume="m1-s1", now=30.0)
    assert info == ResumeInfo(resumed=(), revoked=("j1",))


def test_a_resume_replacing_a_dead_socket_names_what_was_revoked_there() -> None:
    """A resume that replaces a session whose close was not noticed yet (the miner saw its
    socket die first) names the jobs revoked by pushes to that socket, which may be lost."""
    s = make()
    connect(s, "m1", concurrency=2)
    submit(s, "j1", now=0.0)
    submit(s, "j2", now=0.0)
    s.accept("m1", "j1", 1.0)
    s.accept("m1", "j2", 1.0)
    s.requeue("j1", 2.0)  # pushed: job.cancel "requeued by admin"
    info, effects = connect(s, "m1", "m1-s2", resume="m1-s1", concurrency=2, now=3.0)
    assert summary(effects)[0] == ("close", "m1", "m1-s1", CloseCode.REPLACED)
    assert info == ResumeInfo(resumed=("j2",), revoked=("j1",))
    # Named once: the new session starts with nothing to repeat.
    s.disconnect("m1", "m1-s2", 4.0)
    info, _ = connect(s, "m1", "m1-s3", resume="m1-s2", concurrency=2, now=5.0)
    assert info == ResumeInfo(resumed=("j2",), revoked=())


def test_only_revokes_pushed_within_the_window_before_the_session_ended_are_named() -> None:
    """A push earlier than ``revoke_window`` before the session's end reached a live socket
    (its death would have been noticed by then): not named again. A job revoked and then
    pushed to the same miner again is resumed, not revoked."""
    s = make(revoke_window=40.0, accept_timeout=10.0, reject_pause=1.0)
    connect(s, "m1", concurrency=3)
    submit(s, "old", now=0.0)
    submit(s, "again", now=0.0)
    submit(s, "kept", now=0.0)
    s.accept("m1", "old", 1.0)
    s.accept("m1", "kept", 1.0)
    s.cancel("c1", "old", 2.0)
    assert ("revoke", "m1", "again", "accept timeout") in summary(s.tick(10.0))
    assert assigns(s.tick(11.0)) == [("m1", "again", 2)]  # its pause over: offered again
    s.accept("m1", "again", 12.0)
    s.disconnect("m1", "m1-s1", 45.0)  # "old" was revoked 43 s before: its push went through
    info, _ = connect(s, "m1", "m1-s2", resume="m1-s1", concurrency=3, now=46.0)
    assert info == ResumeInfo(resumed=("kept", "again"), revoked=())


def test_expiry_during_grace_is_revoked_on_resume_with_other_jobs_kept() -> None:
    """Expired-while-away jobs are revoked on resume; the others are resumed."""
    s = make()
    connect(s, "m1", concurrency=2)
    submit(s, "short", now=0.0, ttl_seconds=5)
    submit(s, "long", now=0.0)
    s.accept("m1", "short", 1.0)
    s.accept("m1", "long", 1.0)
    s.disconnect("m1", "m1-s1", 2.0)
    assert summary(s.tick(5.0)) == [("persist", "short", "expired")]
    info, _ = connect(s, "m1", "m1-s2", concurrency=2, resume="m1-s1", now=6.0)
    assert info == ResumeInfo(resumed=("long",), revoked=("short",))


def test_miner_in_grace_without_revocations_is_dropped_when_empty() -> None:
    """If a miner in grace finishes its last job (e.g. a REST result), it is forgotten."""
    s = make()
    connect(s, "m1")
    submit(s, "j1", now=0.0)
    s.accept("m1", "j1", 1.0)
    s.disconnect("m1", "m1-s1", 2.0)
    _, effects = s.complete("m1", "j1", {}, {}, 3.0)
    assert summary(effects) == [("persist", "j1", "completed")]
    assert "m1" not in s.miners
    assert s.tick(17.0) == []


def test_grace_requeue_exhausting_attempts_fails() -> None:
    """A started job whose miner never returns FAILs when that was its last attempt."""
    s = make(max_attempts=1)
    connect(s, "m1")
    submit(s, "j1", now=0.0)
    s.accept("m1", "j1", 1.0)
    s.disconnect("m1", "m1-s1", 2.0)
    effects = s.tick(17.0)
    assert summary(effects) == [("persist", "j1", "failed")]
    job = s.job("j1")
    assert job is not None
    assert job.error == "max attempts reached (1): miner lost"
    assert job.finished_at == 17.0


# ---- fail ----------------------------------------------------------------------------------


def test_retryable_fail_requeues_until_max_attempts() -> None:
    """Retryable failures requeue (charged); the only matching miner gets the job back once
    the reject pause after its failure ends (5 s, then 10 s); the third failure (default
    max_attempts) FAILs."""
    s = make(reject_pause=5.0)
    connect(s, "m1")
    submit(s, "j1", now=0.0)
    now = 1.0
    for attempt, pause in ((1, 5.0), (2, 10.0)):
        s.accept("m1", "j1", now, attempt=attempt)
        effects = s.fail(
            "m1", "j1", error_code="oom", error_message="out of memory", retryable=True, now=now
        )
        assert summary(effects) == [("persist", "j1", "requeued")]
        assert state(s, "j1") is JobState.QUEUED
        while (deadline := s.next_deadline()) is not None and deadline < now + pause:
            assert assigns(s.tick(deadline)) == []  # earlier attempts' stale timers
        assert s.next_deadline() == now + pause
        now += pause
        assert assigns(s.tick(now)) == [("m1", "j1", attempt + 1)]
    s.accept("m1", "j1", now, attempt=3)
    effects = s.fail(
        "m1", "j1", error_code="oom", error_message="out of memory", retryable=True, now=now
    )
    assert summary(effects) == [("persist", "j1", "failed")]
    job = s.job("j1")
    assert job is not None
    assert job.state is JobState.FAILED
    assert job.failures == 3
    assert job.error == "max attempts reached (3): oom: out of memory"
    assert held(s, "m1") == []


def test_a_retryable_failure_waits_for_another_miner_first() -> None:
    """A miner that fails a job retryably, while the only idle one, is not handed it straight
    back: the job waits for another matching miner (or the pause's end), as after a reject;
    a broken miner would otherwise use up every attempt alone."""
    s = make(reject_pause=5.0)
    connect(s, "m1")
    connect(s, "m2")
    submit(s, "j1", now=0.0)
    submit(s, "j2", now=0.0)  # m1 runs j1, m2 runs j2
    s.accept("m1", "j1", 1.0, attempt=1)
    effects = s.fail(
        "m1", "j1", error_code="oom", error_message="out of memory", retryable=True, now=1.0
    )
    assert assigns(effects) == []
    assert state(s, "j1") is JobState.QUEUED
    _, effects = s.complete("m2", "j2", {}, {}, 2.0)
    assert assigns(effects) == [("m2", "j1", 2)]
    assert assigns(submit(s, "j3", now=3.0)) == [("m1", "j3", 1)]  # m1 still gets other work


def test_non_retryable_fail_is_final() -> None:
    """A non-retryable failure ends the job FAILED with the miner's message and code."""
    s = make()
    connect(s, "m1")
    submit(s, "j1", now=0.0)
    submit(s, "j2", now=0.0)
    effects = s.fail(
        "m1", "j1", error_code="bad_input", error_message="no such model", retryable=False, now=3.0
    )
    assert summary(effects) == [
        ("persist", "j2", "assigned"),
        ("assign", "m1", "j2", 1),
        ("persist", "j1", "failed"),
    ]
    persist = effects[-1]
    assert isinstance(persist, Persist)
    assert persist.event.data == {"error_code": "bad_input", "error": "no such model"}
    assert persist.job.finished_at == 3.0
    assert state(s, "j1") is JobState.FAILED
    with pytest.raises(NotAssigned):
        s.fail("m1", "j1", error_code="x", error_message="y", retryable=True, now=4.0)


# ---- TTL -----------------------------------------------------------------------------------


def test_ttl_expiry_is_eager_and_exact_and_revokes_the_running_miner() -> None:
    """tick(expires_at) expires a RUNNING job, revokes it and gives the slot to queued work."""
    s = make()
    connect(s, "m1")
    submit(s, "j1", now=0.0, ttl_seconds=60)
    submit(s, "j2", now=1.0)
    s.accept("m1", "j1", 2.0)
    assert s.next_deadline() == 10.0
    assert s.tick(10.0) == []
    assert s.next_deadline() == 60.0
    assert s.tick(59.999) == []
    effects = s.tick(60.0)
    assert summary(effects) == [
        ("revoke", "m1", "j1", "expired"),
        ("persist", "j2", "assigned"),
        ("assign", "m1", "j2", 1),
        ("persist", "j1", "expired"),
    ]
    persist = effects[-1]
    assert isinstance(persist, Persist)
    assert persist.event.data == {"error": "job expired"}
    assert persist.event.miner_id == "m1"
    assert state(s, "j1") is JobState.EXPIRED
    assert s.next_deadline() == 70.0  # j2's accept timeout


def test_ttl_expiry_of_queued_job() -> None:
    """A QUEUED job expires at exactly expires_at and leaves the queue."""
    s = make()
    submit(s, "j1", now=0.0, ttl_seconds=30)
    assert s.next_deadline() == 30.0
    effects = s.tick(30.0)
    assert summary(effects) == [("persist", "j1", "expired")]
    assert s.next_deadline() is None
    assert s.statistics().jobs_queued == 0
    _, effects = connect(s, "m1", now=31.0)
    assert effects == []


@pytest.mark.parametrize(
    ("ttl", "expected"), [(None, 900.0), (0, 1.0), (-5, 1.0), (30.5, 30.5), (1e12, 7 * 86400.0)]
)
def test_ttl_default_and_clamping(ttl: float | None, expected: float) -> None:
    """ttl_seconds defaults to 900 and is clamped to [1, max_ttl]."""
    s = make()
    job, _ = s.submit(spec("j1", ttl_seconds=ttl), 100.0)
    assert job.expires_at == 100.0 + expected


# ---- client cancel -------------------------------------------------------------------------


def test_cancel_queued() -> None:
    """Canceling a QUEUED job: one 'canceled' Persist, no Revoke, out of the queue."""
    s = make()
    submit(s, "j1", now=0.0)
    job, effects = s.cancel("c1", "j1", 1.0)
    assert summary(effects) == [("persist", "j1", "canceled")]
    persist = effects[0]
    assert isinstance(persist, Persist)
    assert persist.event.data == {"error": "canceled by client"}
    assert job.state is JobState.CANCELED
    assert s.statistics().jobs_queued == 0
    assert s.next_deadline() is None
    _, effects = connect(s, "m1", now=2.0)
    assert effects == []


def test_cancel_running_revokes_frees_slot_and_clears_miner() -> None:
    """Canceling a RUNNING job pushes a Revoke, frees the slot and clears miner_id."""
    s = make()
    connect(s, "m1")
    submit(s, "j1", now=0.0)
    submit(s, "j2", now=0.0)
    s.accept("m1", "j1", 1.0)
    job, effects = s.cancel("c1", "j1", 2.0)
    assert summary(effects) == [
        ("revoke", "m1", "j1", "canceled"),
        ("persist", "j2", "assigned"),
        ("assign", "m1", "j2", 1),
        ("persist", "j1", "canceled"),
    ]
    persist = effects[-1]
    assert isinstance(persist, Persist)
    assert persist.job.miner_id is None
    assert persist.event.miner_id is None
    assert persist.job.state == "CANCELED"
    assert job.miner_id is None
    assert held(s, "m1") == ["j2"]
    with pytest.raises(NotAssigned):
        s.complete("m1", "j1", {}, {}, 3.0)


def test_cancel_errors() -> None:
    """Cancel: terminal job -> InvalidTransition; another client's or unknown -> UnknownJob."""
    s = make()
    submit(s, "j1", now=0.0)
    with pytest.raises(UnknownJob):
        s.cancel("someone-else", "j1", 1.0)
    with pytest.raises(UnknownJob) as info:
        s.cancel("c1", "nope", 1.0)
    assert info.value.job_id == "nope"
    assert state(s, "j1") is JobState.QUEUED
    s.cancel("c1", "j1", 1.0)
    with pytest.raises(InvalidTransition):
        s.cancel("c1", "j1", 2.0)


# ---- complete and receipts -----------------------------------------------------------------


def test_complete_without_accept_and_receipt() -> None:
    """A result on an unaccepted job starts and completes it; the receipt uses the miner price."""
    s = make()
    connect(s, "gpu", capabilities=A100)
    submit(s, "j1", now=0.0)
    job, effects = s.complete("gpu", "j1", {"text": "hi"}, {"tokens": 3}, 5.0)
    assert summary(effects) == [("persist", "j1", "started"), ("persist", "j1", "completed")]
    persist = effects[1]
    assert isinstance(persist, Persist)
    receipt = {"receipt_id": "r-j1-1", "unit_price": 0.5, "at": 5.0}
    assert persist.event.data == {"result": {"text": "hi"}, "receipt": receipt}
    assert persist.job.receipt == receipt
    assert job.metrics == {"tokens": 3}
    assert job.finished_at == 5.0
    assert s.next_deadline() is None


def test_complete_is_idempotent() -> None:
    """The same result again returns the same job and receipt and no effects."""
    s = make()
    connect(s, "m1")
    submit(s, "j1", now=0.0)
    s.accept("m1", "j1", 1.0)
    job, _ = s.complete("m1", "j1", {"v": 1}, {}, 2.0)
    receipt = job.receipt
    again, effects = s.complete("m1", "j1", {"v": 2}, {}, 3.0)
    assert again is job
    assert effects == []
    assert again.receipt == receipt
    assert again.result == {"v": 1}
    again, effects = s.complete("m1", "j1", {"v": 1}, {}, 3.0, attempt=1)
    assert (again, effects) == (job, [])
    with pytest.raises(NotAssigned):
        s.complete("m1", "j1", {}, {}, 3.0, attempt=2)
    with pytest.raises(NotAssigned):
        s.complete("other", "j1", {}, {}, 3.0)


def test_complete_without_receipt_factory() -> None:
    """Without a receipt factory, completion carries only the result."""
    s = Scheduler()
    connect(s, "m1")
    submit(s, "j1", now=0.0)
    job, effects = s.complete("m1", "j1", {"v": 1}, {}, 1.0)
    assert job.receipt is None
    persist = effects[-1]
    assert isinstance(persist, Persist)
    assert persist.event.data == {"result": {"v": 1}}


# ---- idempotency, servability, statistics --------------------------------------------------


def test_idempotency_key_returns_same_job() -> None:
    """The same client and idempotency_key give back the same job with no effects."""
    s = make()
    first, effects = s.submit(spec("j1", idempotency_key="k"), 0.0)
    assert effects
    again, effects = s.submit(spec("j2", idempotency_key="k"), 1.0)
    assert again is first
    assert effects == []
    assert s.job("j2") is None
    assert s.find_idempotent("c1", "k") is first
    other, effects = s.submit(spec("j3", client_id="c2", idempotency_key="k"), 2.0)
    assert other.job_id == "j3"
    assert effects
    assert s.find_idempotent("c1", "nope") is None


def test_idempotency_key_forgotten_after_retention() -> None:
    """Terminal jobs beyond terminal_retention are evicted with their idempotency key."""
    s = make(terminal_retention=1)
    s.submit(spec("j1", idempotency_key="k1"), 0.0)
    s.submit(spec("j2", idempotency_key="k2"), 0.0)
    s.submit(spec("j3"), 0.0)
    s.cancel("c1", "j1", 1.0)
    assert s.job("j1") is not None
    s.cancel("c1", "j2", 2.0)
    assert s.job("j1") is None
    assert s.find_idempotent("c1", "k1") is None
    assert s.find_idempotent("c1", "k2") is not None
    s.cancel("c1", "j3", 3.0)
    assert s.job("j2") is None
    assert s.statistics().jobs_in_memory == 1
    again, effects = s.submit(spec("j4", idempotency_key="k1"), 4.0)
    assert again.job_id == "j4"
    assert effects
    s.cancel("c1", "j4", 5.0)  # evicts j3, which had no key
    assert s.job("j3") is None
    assert s.find_idempotent("c1", "k1") is again


def _end_big_jobs(s: Scheduler, n: int, kib: int) -> None:
    """``n`` jobs of ``c1`` (keys ``k0``…), each completed by ``m1`` with a result of ``kib``
    KiB, counted as received (a 1 KiB submission and the result's size)."""
    for i in range(n):
        submit(s, f"j{i}", idempotency_key=f"k{i}", size=1024)
        s.accept("m1", f"j{i}", 1.0)
        result = {"image": "x" * (kib * 1024) + str(i)}  # a new string, as a decode makes
        s.complete("m1", f"j{i}", result, {}, 2.0, size=kib * 1024 + 64)


def test_ended_jobs_are_kept_within_a_byte_budget() -> None:
    """Ended jobs also leave memory, oldest first, once their payloads and results (sizes as
    received) pass ``terminal_retention_bytes``, with their idempotency keys; the newest stays
    even alone over the budget (a late result of the job just ended is still answered)."""
    s = make(terminal_retention_bytes=3 * (100 * 1024 + 1024 + 64))
    connect(s, "m1")
    _end_big_jobs(s, 5, 100)
    assert [j for j in ("j0", "j1", "j2", "j3", "j4") if s.job(j)] == ["j2", "j3", "j4"]
    assert s.find_idempotent("c1", "k1") is None
    assert s.find_idempotent("c1", "k2") is s.job("j2")
    job, effects = s.complete("m1", "j4", {"image": "again"}, {}, 3.0, size=10)
    assert job is s.job("j4")  # the same completion, unchanged
    assert job.result != {"image": "again"}
    assert effects == []
    submit(s, "big", size=10 << 20)
    s.accept("m1", "big", 4.0)
    s.complete("m1", "big", {}, {}, 5.0)
    assert [j for j in ("j4", "big") if s.job(j)] == ["big"]
    assert s.statistics().jobs_in_memory == 1


def test_memory_held_by_ended_jobs_stays_within_the_byte_budget() -> None:
    """Measured (tracemalloc): 100 jobs ended with 100 KiB results held 10 MiB, however small
    the budget, as only their number (10,000) was bounded; now about the budget (1 MiB)."""
    import gc
    import tracemalloc

    s = make(terminal_retention_bytes=1 << 20)
    connect(s, "m1")
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        _end_big_jobs(s, 100, 100)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(s.jobs) == 10  # 1 MiB of 101 KiB jobs
    assert grown < 1.5 * (1 << 20), grown


def test_is_servable() -> None:
    """Servable iff a connected miner, or one in its resume grace, could match."""
    s = make()
    assert s.is_servable({}) is False
    connect(s, "gpu", capabilities=A100, region="eu")
    assert s.is_servable({})
    assert s.is_servable({"gpu": "A100", "region": "eu"})
    assert not s.is_servable({"gpu": "H100"})
    submit(s, "j1", now=0.0)
    s.accept("gpu", "j1", 1.0)
    s.disconnect("gpu", "gpu-s1", 2.0)
    assert s.is_servable({"gpu": "A100"})  # in grace
    s.tick(17.0)
    assert not s.is_servable({"gpu": "A100"})
    connect(s, "a", capabilities=A100)
    connect(s, "b", capabilities=A100)
    s.disconnect("a", "a-s1", 20.0)
    assert s.is_servable({"gpu": "A100"})  # still b
    connect(s, "b", "b-s2", now=21.0)  # b comes back without a gpu
    assert not s.is_servable({"gpu": "A100"})


def test_is_servable_verdicts_stay_right_past_the_memo_bound() -> None:
    """Verdicts are memoised per constraints class, bounded; past the bound they still hold."""
    s = make()
    connect(s, "gpu", capabilities=A100, region="eu")
    for n in range(4100):
        assert s.is_servable({"region": "eu", "max_price": n + 1})
        assert not s.is_servable({"region": f"r{n}"})
    assert s.is_servable({"gpu": "A100"})
    assert s.is_servable({"gpu": "A100"})  # the memoised verdict
    huge = {"gpu": "A100", "note": 2**70}  # no JSON key for its class: parsed every time
    assert s.is_servable(huge)
    assert s.is_servable(huge)


def test_statistics() -> None:
    """statistics() reports queue, leases, miners, slots, live timers and event counts."""
    s = make()
    stats = s.statistics()
    assert (stats.jobs_queued, stats.jobs_running, stats.miners_connected, stats.timers) == (
        0,
        0,
        0,
        0,
    )
    assert stats.events == dict.fromkeys(
        [
            "queued",
            "assigned",
            "started",
            "progress",
            "requeued",
            "completed",
            "failed",
            "canceled",
            "expired",
        ],
        0,
    )
    connect(s, "m1", concurrency=2)
    connect(s, "m2", concurrency=3)
    for i in range(3):
        submit(s, f"j{i}", now=0.0, constraints={"gpu": "A100"} if i == 2 else {})
    s.accept("m1", "j0", 1.0)
    s.accept("m2", "j1", 1.0)
    s.disconnect("m2", "m2-s1", 2.0)
    stats = s.statistics()
    assert stats.jobs_queued == 1
    assert stats.jobs_running == 2
    assert stats.jobs_in_memory == 3
    assert stats.miners_connected == 1
    assert stats.miners_in_grace == 1
    assert stats.miners_idle == 1
    assert stats.slots_total == 2
    assert stats.slots_used == 1
    assert stats.timers == 3 + 2 + 1  # expiries, accept timers, one grace
    assert stats.events["queued"] == 3
    assert stats.events["assigned"] == 2
    assert stats.events["started"] == 2


# ---- event log -----------------------------------------------------------------------------


def check_snapshots(batch: list[Effect]) -> None:
    """Persist.job is a snapshot no older than its event; a job's last one in a call is current.

    (Whether each event carries its own snapshot or all of a job's events in one call share
    the end-of-call one, the last Persist of each job must match that event.)
    """
    last: dict[str, Persist] = {}
    for effect in batch:
        if isinstance(effect, Persist):
            assert effect.job.job_id == effect.event.job_id
            assert effect.job.seq >= effect.event.seq
            last[effect.event.job_id] = effect
    for persist in last.values():
        assert persist.job.seq == persist.event.seq
        assert persist.job.state == persist.event.state


def test_event_seq_per_job_starts_at_one_without_gaps() -> None:
    """Across a busy scenario every job's Persist events are numbered 1, 2, 3, … in order."""
    s = make()
    batches: list[list[Effect]] = [
        connect(s, "m1", concurrency=2)[1],
        connect(s, "m2")[1],
        *(submit(s, f"j{i}", now=float(i), ttl_seconds=100) for i in range(4)),
    ]
    # j0 and j2 went to m1, j1 to m2, j3 waits
    assert [held(s, "m1"), held(s, "m2")] == [["j0", "j2"], ["j1"]]
    batches += [
        s.accept("m1", "j0", 5.0),
        s.progress("m1", "j0", 6.0, progress=0.5),
        s.reject("m2", "j1", "nope", 6.0),
        s.fail("m1", "j2", error_code="e", error_message="m", retryable=True, now=7.0),
        s.complete("m1", "j0", {}, {}, 8.0)[1],
        s.cancel("c1", "j3", 9.0)[1],
        s.tick(20.0),
        s.disconnect("m2", "m2-s1", 21.0),
        s.tick(200.0),
    ]
    seqs: dict[str, list[int]] = defaultdict(list)
    for batch in batches:
        check_snapshots(batch)
        for effect in batch:
            if isinstance(effect, Persist):
                seqs[effect.event.job_id].append(effect.event.seq)
    assert set(seqs) == {"j0", "j1", "j2", "j3"}
    for job_id, numbers in seqs.items():
        assert numbers == list(range(1, len(numbers) + 1)), job_id
    assert sum(s.statistics().events.values()) == sum(len(n) for n in seqs.values())


# ---- restore -------------------------------------------------------------------------------


def record(job_id: str, state: str, **kw: Any) -> JobRecord:
    base: dict[str, Any] = {
        "job_id": job_id,
        "client_id": "c1",
        "state": state,
        "payload": {},
        "constraints": {},
        "priority": 0,
        "requested_at": 0.0,
        "expires_at": 900.0,
        "attempt": 0,
        "failures": 0,
        "max_attempts": 3,
        "seq": 1,
    }
    base.update(kw)
    return JobRecord(**base)


def test_restore_queued_running_and_unaccepted() -> None:
    """restore(): queued jobs are queued, started ones wait grace, unaccepted ones requeue."""
    s = make()
    records = [
        record("q", "QUEUED", requested_at=1.0),
        record(
            "started",
            "RUNNING",
            requested_at=2.0,
            attempt=1,
            seq=3,
            miner_id="m1",
            assigned_at=2.0,
            started_at=3.0,
        ),
        record(
            "assigned",
            "RUNNING",
            requested_at=3.0,
            attempt=1,
            seq=2,
            miner_id="m2",
            assigned_at=3.0,
        ),
    ]
    effects = s.restore(records, {"m1": "m1-s1", "m2": "m2-s1"}, 100.0)
    assert summary(effects) == [("persist", "assigned", "requeued")]
    persist = effects[0]
    assert isinstance(persist, Persist)
    assert persist.event.seq == 3
    assert persist.event.data == {"reason": "coordinator restarted"}
    assert persist.job.failures == 0
    assert state(s, "q") is JobState.QUEUED
    assert state(s, "started") is JobState.RUNNING
    assert "m2" not in s.miners
    assert s.statistics().miners_in_grace == 1
    assert s.statistics().jobs_queued == 2
    assert s.next_deadline() == 115.0
    # m1 comes back with its old session: the started job is resumed
    info, effects = connect(s, "m1", "m1-s2", concurrency=2, resume="m1-s1", now=101.0)
    assert info == ResumeInfo(resumed=("started",), revoked=())
    assert assigns(effects) == [("m1", "q", 1)]
    job, _ = s.complete("m1", "started", {}, {}, 102.0, attempt=1)
    assert job.state is JobState.COMPLETED


def test_a_job_requeued_by_restore_is_revoked_from_its_miner() -> None:
    """An assigned, unaccepted job requeued at restart was taken from its miner (whose accept
    may have been lost with the crash): its resume lists it in ``revoked``, whether it has
    started jobs left to resume or none (it was listed nowhere, so the miner ran it on)."""
    s = make()
    s.restore(
        [
            record("lone", "RUNNING", attempt=1, miner_id="m1", assigned_at=1.0),
            record("a", "RUNNING", attempt=1, miner_id="m2", assigned_at=1.0, requested_at=1.0),
            record("b", "RUNNING", attempt=1, miner_id="m2", started_at=1.0, requested_at=2.0),
        ],
        {"m1": "m1-s1", "m2": "m2-s1"},
        10.0,
    )
    assert "m1" not in s.miners  # nothing to resume: no grace to wait out
    assert s.statistics().miners_in_grace == 1
    info, _ = connect(s, "m1", "m1-s2", resume="m1-s1", now=11.0)
    assert info == ResumeInfo(resumed=(), revoked=("lone",))
    info, _ = connect(s, "m2", "m2-s2", concurrency=2, resume="m2-s1", now=11.0)
    assert info == ResumeInfo(resumed=("b",), revoked=("a",))


def test_restore_grace_expires_without_miner() -> None:
    """A restored started job is requeued (charged) when its miner does not return in time."""
    s = make()
    s.restore([record("started", "RUNNING", attempt=1, miner_id="m1", started_at=1.0)], {}, 50.0)
    assert s.next_deadline() == 65.0
    effects = s.tick(65.0)
    assert summary(effects) == [("persist", "started", "requeued")]
    assert "m1" not in s.miners
    _, effects = connect(s, "m9", now=66.0)
    assert assigns(effects) == [("m9", "started", 2)]


def test_restore_fires_overdue_expiries() -> None:
    """Jobs whose TTL passed while the coordinator was down expire during restore()."""
    s = make()
    effects = s.restore(
        [
            record("old", "QUEUED", expires_at=10.0),
            record("gone", "RUNNING", expires_at=10.0, attempt=1, miner_id="m1", started_at=2.0),
            record("ok", "QUEUED", expires_at=500.0),
        ],
        {"m1": "s"},
        100.0,
    )
    assert sorted(summary(effects)) == [
        ("persist", "gone", "expired"),
        ("persist", "old", "expired"),
    ]
    assert s.statistics().jobs_queued == 1
    info, _ = connect(s, "m1", "s2", resume="s", now=101.0)
    assert info == ResumeInfo(resumed=(), revoked=("gone",))


def test_restore_two_jobs_one_miner() -> None:
    """Two started jobs of one miner share one grace period and are resumed together."""
    s = make()
    s.restore(
        [
            record("a", "RUNNING", attempt=1, miner_id="m1", started_at=1.0),
            record("b", "RUNNING", attempt=2, miner_id="m1", started_at=1.0, requested_at=1.0),
        ],
        {"m1": "s"},
        10.0,
    )
    assert s.miners["m1"].concurrency == 2
    assert s.statistics().timers == 3
    info, _ = connect(s, "m1", "s2", concurrency=2, resume="s", now=11.0)
    assert info.resumed == ("a", "b")


def test_restore_terminal_record_is_kept_for_lookups() -> None:
    """A terminal record passed to restore() is looked up (idempotency) but never scheduled."""
    s = make()
    rec = record(
        "done",
        "COMPLETED",
        attempt=1,
        seq=4,
        miner_id="m1",
        started_at=1.0,
        finished_at=2.0,
        result={"v": 1},
        idempotency_key="k",
    )
    assert s.restore([rec], {"m1": "s"}, 10.0) == []
    assert s.next_deadline() is None
    assert s.miners == {}
    job = s.find_idempotent("c1", "k")
    assert job is not None
    assert job.record() == rec
    again, effects = s.submit(spec("other", idempotency_key="k"), 11.0)
    assert (again, effects) == (job, [])


def test_requeued_then_reassigned_job_is_not_treated_as_started_after_restore() -> None:
    """started_at belongs to the attempt: a reassigned, unaccepted job requeues on restore."""
    s = make()
    connect(s, "m1")
    submit(s, "j1", now=0.0)
    s.accept("m1", "j1", 1.0)
    s.disconnect("m1", "m1-s1", 2.0)
    s.tick(17.0)
    _, effects = connect(s, "m2", now=18.0)
    persist = [e for e in effects if isinstance(e, Persist)][-1]
    assert persist.job.state == "RUNNING"
    assert persist.job.started_at is None
    fresh = make()
    effects = fresh.restore([persist.job], {"m2": "m2-s1"}, 20.0)
    assert summary(effects) == [("persist", "j1", "requeued")]


# ---- timers --------------------------------------------------------------------------------


def test_next_deadline_skips_dead_timers_and_is_never_in_the_past() -> None:
    """Canceled jobs' timers are skipped by next_deadline(); after tick(now) it is >= now."""
    s = make()
    submit(s, "a", now=0.0, ttl_seconds=10)
    submit(s, "b", now=0.0, ttl_seconds=20)
    s.cancel("c1", "a", 1.0)
    assert s.next_deadline() == 20.0
    assert s.statistics().timers == 1
    s.tick(25.0)
    assert s.next_deadline() is None


def test_many_dead_timers_are_compacted() -> None:
    """Once over 1024 dead timers are most of the heap, they are purged as the next one dies:
    a finished job's expiry timer does not stay in the heap for the rest of its TTL."""
    s = make()
    for i in range(1100):
        submit(s, f"j{i}", now=0.0, ttl_seconds=100 + i)
    submit(s, "keep", now=0.0, ttl_seconds=5000)
    for i in range(1100):
        s.cancel("c1", f"j{i}", 1.0)
    assert s.statistics().timers == 1
    assert len(s._timers) == 1 + 75  # purged at the 1025th death; 75 timers died after that
    assert s.tick(2.0) == []
    assert s.statistics().timers == 1
    assert s.next_deadline() == 5000.0


def _queue_entries(s: Scheduler) -> int:
    return sum(len(heap) for heap in s._queue._classes.values())


def test_queued_jobs_that_end_unpicked_leave_the_queue() -> None:
    """Jobs no miner can run wait in the queue; those canceled or expired there leave it, in
    bulk once they are most of it: no pick reaches their class, so they stayed for good (and
    with them, memory grew with every such job for the life of the process)."""
    s = make()
    submit(s, "keep", now=0.0, ttl_seconds=10_000, constraints={"gpu": "H100"})
    for cycle in range(30):
        now = 10.0 * cycle
        for i in range(100):
            submit(s, f"j{cycle}-{i}", now=now, ttl_seconds=5, constraints={"gpu": "H100"})
        for i in range(0, 100, 2):
            s.cancel("c1", f"j{cycle}-{i}", now + 1)
        s.tick(now + 6)  # the other half expires
        assert _queue_entries(s) <= 1 + 1024 + 100
    assert s.statistics().jobs_queued == 1
    _, effects = connect(s, capabilities={"gpus": [{"name": "H100"}]}, now=400.0)
    assert [e.job_id for e in effects if isinstance(e, Assign)] == ["keep"]
    assert _queue_entries(s) <= 1024  # stale entries, fewer than the bound


def test_stale_timers_are_ignored() -> None:
    """Defensive guards: timers whose job or miner is gone, or whose token is stale, do nothing."""
    s = make()
    s._arm(1.0, "expire", "no-such-job", None)
    s._arm(1.0, "accept", "no-such-job", 1)
    s._arm(1.0, "grace", "no-such-miner", "s")
    connect(s, "m1")
    submit(s, "j1", now=0.0)
    s.accept("m1", "j1", 0.5)
    s._arm(1.0, "grace", "m1", "m1-s1")  # miner is connected
    s.complete("m1", "j1", {}, {}, 0.5)
    s._arm(1.0, "expire", "j1", None)  # job is terminal
    s.disconnect("m1", "m1-s1", 0.6)
    assert s.tick(1.0) == []
    assert s.next_deadline() is None


def test_resume_after_grace_ended_lists_the_taken_jobs_as_revoked() -> None:
    """A miner back after its grace learns which jobs were taken away (welcome.revoked)."""
    s = make()
    connect(s, "m1")
    submit(s, "j1", now=0.0)
    s.accept("m1", "j1", 1.0)
    s.disconnect("m1", "m1-s1", 5.0)
    s.tick(20.0)  # grace over: j1 requeued
    info, effects = connect(s, "m1", "m1-s2", resume="m1-s1", now=30.0)
    assert info.resumed == ()
    assert info.revoked == ("j1",)
    assert assigns(effects) == [("m1", "j1", 2)]  # the idle miner takes it again
    s.complete("m1", "j1", {}, {}, 30.5, attempt=2)
    # Only the session that held the jobs learns about them, and only once.
    s.disconnect("m1", "m1-s2", 31.0)
    info, _ = connect(s, "m1", "m1-s3", resume="m1-s2", now=32.0)
    assert info.revoked == ()


def test_a_job_taken_before_its_accept_is_named_in_revoked_on_resume() -> None:
    """A job pushed but not accepted when the socket dropped goes back to the queue at once;
    its accept may have been on the way, so the miner's resume names it in ``revoked`` (the
    job may already run elsewhere), with or without a started job that waited for it."""
    s = make()
    connect(s, "m1", concurrency=2)
    submit(s, "j1", now=0.0)
    submit(s, "j2", now=0.0)
    s.accept("m1", "j1", 1.0)
    s.disconnect("m1", "m1-s1", 2.0)
    assert state(s, "j2") is JobState.QUEUED
    info, _ = connect(s, "m1", "m1-s2", resume="m1-s1", concurrency=2, now=3.0)
    assert (info.resumed, info.revoked) == (("j1",), ("j2",))
    # Nothing started: the miner is dropped at once, and a late resume still learns it.
    s = make()
    connect(s, "m1")
    submit(s, "j1", now=0.0)
    s.disconnect("m1", "m1-s1", 2.0)
    assert "m1" not in s.miners
    info, _ = connect(s, "m1", "m1-s2", resume="m1-s1", now=3.0)
    assert (info.resumed, info.revoked) == ((), ("j1",))


def test_a_replacing_resume_revokes_what_the_old_socket_had_not_accepted() -> None:
    """A resume that replaces a session still connected (its socket half-open) closes that
    socket (4409), and a job pushed there but not accepted went into ``resumed``, as if the
    miner held it: a push lost with the dead socket was never seen, and the job sat until its
    accept timeout (10 s), which then paused this miner for it. As when a socket closes
    (docs/protocol.md, 11), it goes back to the queue at once, named in ``revoked``."""
    s = make()
    connect(s, "m1", concurrency=2)
    submit(s, "j1", now=0.0)
    submit(s, "j2", now=0.0)
    s.accept("m1", "j1", 1.0)
    info, effects = connect(s, "m1", "m1-s2", resume="m1-s1", concurrency=2, now=2.0)
    assert (info.resumed, info.revoked) == (("j1",), ("j2",))
    assert summary(effects)[0] == ("close", "m1", "m1-s1", 4409)
    assert ("persist", "j2", "requeued") in summary(effects)
    assert ("assign", "m1", "j2", 2) in summary(effects)  # offered again, on the new session
    assert job_of(s, "j2").attempt == 2
    assert job_of(s, "j2").failures == 0  # not charged


def test_resume_with_an_unknown_session_after_grace_revokes_nothing() -> None:
    """A stale or foreign session id does not reveal another session's jobs."""
    s = make()
    connect(s, "m1")
    submit(s, "j1", now=0.0)
    s.accept("m1", "j1", 1.0)
    s.disconnect("m1", "m1-s1", 5.0)
    s.tick(20.0)
    info, _ = connect(s, "m1", "m1-s2", resume="not-my-session", now=30.0)
    assert info.revoked == ()


def test_reject_after_accept_is_charged_like_a_retryable_failure() -> None:
    """Rejecting a started job costs an attempt (it cannot dodge max_attempts)."""
    s = make(max_attempts=1)
    connect(s, "m1")
    submit(s, "j1", now=0.0)
    s.accept("m1", "j1", 1.0)
    effects = s.reject("m1", "j1", "changed my mind", 2.0)
    assert summary(effects)[-1] == ("persist", "j1", "failed")
    job = s.job("j1")
    assert job is not None
    assert job.state == "FAILED"
    assert job.failures == 1


def test_forgotten_sessions_are_bounded() -> None:
    """Only the most recent lost sessions are remembered (terminal_retention of them)."""
    s = make(terminal_retention=1)
    for n, miner_id in enumerate(("m1", "m2")):
        connect(s, miner_id)
        submit(s, f"j{n}", now=0.0)
        s.accept(miner_id, f"j{n}", 1.0)
        s.disconnect(miner_id, f"{miner_id}-s1", 5.0)
    s.tick(20.0)
    info, _ = connect(s, "m1", "m1-s2", resume="m1-s1", now=30.0)
    assert info.revoked == ()  # m1's memory was evicted by m2's
    info, _ = connect(s, "m2", "m2-s2", resume="m2-s1", now=30.0)
    assert info.revoked == ("j1",)


def test_changed_miners_name_every_miner_whose_row_can_change() -> None:
    """take_changed_miners (the ops feed's deltas): each miner added or dropped, or whose
    connection, drain state, concurrency or held jobs changed, even where no job event names
    it (a job requeued after the grace names no miner); each call forgets what it returned."""
    s = make()
    connect(s, "m1")
    connect(s, "m2")
    assert s.take_changed_miners() == {"m1", "m2"}
    assert s.take_changed_miners() == set()
    submit(s, "j1", now=1.0)
    (holder,) = [m for m in ("m1", "m2") if held(s, m)]
    other = "m2" if holder == "m1" else "m1"
    assert s.take_changed_miners() == {holder}
    s.accept(holder, "j1", 1.0)
    assert s.take_changed_miners() == set()
    s.set_status(other, concurrency=2, draining=None, now=1.0)
    assert s.take_changed_miners() == {other}
    s.set_status(other, concurrency=None, draining=True, now=1.0)
    assert s.take_changed_miners() == {other}
    s.disconnect(holder, f"{holder}-s1", 2.0)
    assert s.take_changed_miners() == {holder}
    s.tick(2.0 + s.config.resume_grace)  # the grace ends: the job is requeued, the miner gone
    assert holder not in s.miners
    assert s.take_changed_miners() == {holder}
    connect(s, "m3", now=30.0)  # takes the requeued job
    assert held(s, "m3") == ["j1"]
    assert s.take_changed_miners() == {"m3"}
    s.accept("m3", "j1", 31.0)
    s.complete("m3", "j1", {"ok": True}, {}, 32.0)
    assert s.take_changed_miners() == {"m3"}
    restored = make()
    restored.restore(
        [record("r1", "RUNNING", attempt=1, miner_id="m9", assigned_at=1.0, started_at=2.0)],
        {"m9": "m9-s1"},
        10.0,
    )
    assert restored.take_changed_miners() == {"m9"}
