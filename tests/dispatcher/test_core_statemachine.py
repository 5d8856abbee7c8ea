"""Ring 2: a hypothesis state machine driving the pure Scheduler (dispatcher/core.py).

Rules submit jobs, connect/disconnect/resume miners, change their status, act on the jobs
they were pushed (accept, reject, progress, complete, fail — including stale attempts),
cancel jobs, play the operator (cancel, requeue, disconnect) and advance time. After every
step the invariants of core.py's module docstring are checked against the scheduler's state
and against every effect it returned.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hypothesis import HealthCheck, event, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from dispatcher.core import JobSpec, Scheduler, SchedulerConfig
from dispatcher.effects import Assign, CloseSession, Effect, Persist, Revoke
from dispatcher.errors import InvalidTransition, NotAssigned, UnknownJob, UnknownMiner
from dispatcher.jobs import ACTIVE, TERMINAL, Job, JobState
from dispatcher.policy import JobNeeds, matches
from protocol.types import CloseCode, JSONObject

if TYPE_CHECKING:
    from collections.abc import Callable

    from protocol.records import JobRecord

MINERS = ("m0", "m1", "m2")
CLIENTS = ("c0", "c1")
PROFILES: tuple[tuple[JSONObject, str | None], ...] = (
    ({}, None),
    ({"gpus": [{"name": "A100", "memory_mb": 81920}], "price": 1.0}, "eu"),
    ({"gpus": [{"name": "T4", "memory_mb": 16384}], "price": 0.2}, "us"),
)
CONSTRAINTS: tuple[JSONObject, ...] = (
    {},
    {},
    {},
    {"gpu": "A100"},
    {"region": "us"},
    {"min_vram_gb": 16},
    {"gpu": "H100"},  # nobody ever matches
)
CONFIG = SchedulerConfig(default_ttl=60.0, accept_timeout=10.0, resume_grace=15.0, max_attempts=3)


def receipt_factory(job: Job, unit_price: float | None, now: float) -> JSONObject:
    return {"receipt_id": f"{job.job_id}/{job.attempt}", "unit_price": unit_price}


class SchedulerMachine(RuleBasedStateMachine):
    """Random operation sequences against one Scheduler; invariants after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.s = Scheduler(CONFIG, receipt_factory)
        self.now = 0.0
        self.n_jobs = 0
        self.n_sessions = 0
        self.last_session: dict[str, str] = {}
        self.old_sessions: list[tuple[str, str]] = []
        self.last_seq: dict[str, int] = {}
        self.terminal_seen: dict[str, JobState] = {}
        self.pushed: set[tuple[str, str, int]] = set()  # (miner, job, attempt) from Assign
        self.belief: dict[str, set[str]] = {}  # the jobs each miner was told it holds
        self.persist_count = 0
        self.counter_base = 0  # Persists seen before the last restart
        self.stored: dict[str, JobRecord] = {}  # what the store holds: the last Persist's job
        self.prev_held: dict[str, int] = {}
        # miner -> (grace deadline, session, [(job, attempt)] started when it disconnected)
        self.away: dict[str, tuple[float, str, list[tuple[str, int]]]] = {}
        # miner -> the jobs pushed but not accepted when its socket closed (taken at once; its
        # resume, or a later hello, names them in ``revoked``)
        self.taken: dict[str, list[str]] = {}
        # miner -> (session, jobs) taken when its grace ended: revoked on a late resume
        self.lost: dict[str, tuple[str, list[str]]] = {}
        # miner -> (time, job) of each job.cancel pushed to its live session: those within
        # ``revoke_window`` of its end may have gone to a dead socket (``unheard``)
        self.sent: dict[str, list[tuple[float, str]]] = {}
        # miner -> jobs whose job.cancel may be unheard: its resume may name them again
        self.unheard_of: dict[str, set[str]] = {}

    @initialize(
        profiles=st.lists(st.sampled_from(PROFILES), min_size=3, max_size=3),
        concurrency=st.lists(st.integers(1, 3), min_size=3, max_size=3),
        jobs=st.integers(1, 6),
    )
    def fleet(
        self, profiles: list[tuple[JSONObject, str | None]], concurrency: list[int], jobs: int
    ) -> None:
        """Start with every miner connected and a few unconstrained jobs submitted."""
        for miner_id, profile, slots in zip(MINERS, profiles, concurrency, strict=True):
            self.connect(miner_id, profile, slots, "none")
        for _ in range(jobs):
            self.submit_one("c0", {}, 0, None, None)

    # ---- effect bookkeeping -------------------------------------------------------------

    def apply(self, effects: list[Effect]) -> None:
        """Check every returned effect and record what the miners were told."""
        assigned_persist: set[tuple[str, int]] = set()
        assigned_to: set[str] = set()
        last: dict[str, Persist] = {}  # each job's last Persist in this call
        for effect in effects:
            match effect:
                case Persist(job=rec, event=event):
                    job_id = event.job_id
                    assert rec.job_id == job_id
                    assert job_id not in self.terminal_seen, f"event after terminal: {event}"
                    assert event.seq == self.last_seq.get(job_id, 0) + 1, event
                    assert rec.seq >= event.seq  # a snapshot is never older than its event
                    last[job_id] = effect
                    self.check_charging(self.stored.get(job_id), rec, event.event, event.data)
                    self.last_seq[job_id] = event.seq
                    self.stored[job_id] = rec
                    self.persist_count += 1
                    if JobState(event.state) in TERMINAL:
                        self.terminal_seen[job_id] = JobState(event.state)
                    if event.event == "assigned":
                        assigned_persist.add((job_id, event.attempt))
                case Assign():
                    assert (effect.job_id, effect.attempt) in assigned_persist
                    miner = self.s.miners[effect.miner_id]
                    assert miner.connected
                    assert effect.session_id == miner.session_id
                    assert effect.accept_timeout == CONFIG.accept_timeout
                    self.pushed.add((effect.miner_id, effect.job_id, effect.attempt))
                    self.belief.setdefault(effect.miner_id, set()).add(effect.job_id)
                    assigned_to.add(effect.miner_id)
                case Revoke():
                    self.belief[effect.miner_id].remove(effect.job_id)
                    miner = self.s.miners[effect.miner_id]
                    assert miner.connected
                    assert effect.session_id == miner.session_id
                    self.sent.setdefault(effect.miner_id, []).append((self.now, effect.job_id))
                case CloseSession():
                    self.check_close(effect)
        for persist in last.values():  # a job's last snapshot of a call is current
            assert persist.job.seq == persist.event.seq
            assert persist.job.state == persist.event.state
        # a miner never holds more than its concurrency because of an assignment
        for miner_id, miner in self.s.miners.items():
            if len(miner.jobs) > miner.concurrency:
                assert miner_id not in assigned_to
                assert len(miner.jobs) <= self.prev_held.get(miner_id, 0)
        for miner_id in assigned_to:
            miner = self.s.miners[miner_id]
            assert len(miner.jobs) <= miner.concurrency
        self.prev_held = {m: len(miner.jobs) for m, miner in self.s.miners.items()}

    def unheard(self, miner_id: str, held: list[str]) -> list[str]:
        """The live session of ``miner_id`` ends, holding ``held``: the jobs revoked by a push
        to it within ``revoke_window``, which its socket may have lost (not those it holds
        again), each once."""
        since = self.now - CONFIG.revoke_window
        sent = self.sent.pop(miner_id, [])
        jobs = list(dict.fromkeys(j for when, j in sent if when >= since and j not in held))
        self.unheard_of.setdefault(miner_id, set()).update(jobs)
        event(f"session ended: unheard revokes={bool(jobs)}")
        return jobs

    def check_close(self, close: CloseSession) -> None:
        """A session is closed when a newer one replaced it, or by an operator (then it is
        over: its miner is away or gone)."""
        miner = self.s.miners.get(close.miner_id)
        if close.code is CloseCode.REPLACED:
            assert miner is not None
            assert close.session_id != miner.session_id
        else:
            assert close.code is CloseCode.NORMAL
            assert miner is None or not miner.connected

    @staticmethod
    def check_charging(prev: JobRecord | None, rec: JobRecord, kind: str, data: JSONObject) -> None:
        """Only lost started attempts, rejects after accept and retryable failures count
        against max_attempts."""
        if prev is None:
            assert rec.failures == 0
            return
        if kind == "requeued":
            reason = data["reason"]
            charged = reason in ("miner lost", "e: m") or (
                reason in ("miner restarted", "rejected: no") and prev.started_at is not None
            )
            assert rec.failures == prev.failures + charged, (reason, prev, rec)
            assert rec.failures < rec.max_attempts
        elif kind == "failed" and str(data["error"]).startswith("max attempts reached"):
            assert rec.failures == rec.max_attempts == prev.failures + 1
        else:
            assert rec.failures == prev.failures

    def unchanged(self, job_id: str, call: Any, *exc: type[Exception]) -> None:
        """``call()`` must raise one of ``exc`` and leave the job and the effects untouched."""
        job = self.s.job(job_id)
        before = None if job is None else job.record()
        try:
            call()
        except exc:
            pass
        else:  # pragma: no cover - a failure of the scheduler
            raise AssertionError(f"expected {exc} for {job_id}")
        assert (None if job is None else job.record()) == before
        assert self.s._effects == []

    # ---- clients ------------------------------------------------------------------------

    @rule(
        client=st.sampled_from(CLIENTS),
        constraints=st.sampled_from(CONSTRAINTS),
        priority=st.sampled_from([0, 0, 1, 5]),
        ttl=st.sampled_from([None, None, 5.0, 30.0, 200.0]),
        key=st.sampled_from([None, None, "k0", "k1"]),
        count=st.integers(1, 3),
    )
    def submit(
        self,
        client: str,
        constraints: JSONObject,
        priority: int,
        ttl: float | None,
        key: str | None,
        count: int,
    ) -> None:
        """A client submits one to three jobs (the same key returns the same job)."""
        for _ in range(count):
            self.submit_one(client, constraints, priority, ttl, key)

    def submit_one(
        self,
        client: str,
        constraints: JSONObject,
        priority: int,
        ttl: float | None,
        key: str | None,
    ) -> None:
        existing = None if key is None else self.s.find_idempotent(client, key)
        self.n_jobs += 1
        job_id = f"j{self.n_jobs}"
        spec = JobSpec(
            job_id=job_id,
            client_id=client,
            payload={"n": self.n_jobs},
            constraints=constraints,
            ttl_seconds=ttl,
            priority=priority,
            idempotency_key=key,
        )
        job, effects = self.s.submit(spec, self.now)
        if existing is not None:
            assert job is existing
            assert effects == []
        else:
            assert job.job_id == job_id
            first = effects[0]
            assert isinstance(first, Persist)
            assert first.event.event == "queued"
            assert job.expires_at > self.now
        self.apply(effects)

    @rule(data=st.data(), owner=st.booleans())
    def cancel(self, data: st.DataObject, owner: bool) -> None:
        """A client cancels a job (often one held by a miner in grace); or a stranger tries."""
        if not self.s.jobs:
            return
        active = sorted(j.job_id for j in self.s.jobs.values() if j.state in ACTIVE)
        away = sorted(
            j
            for _, _, started in self.away.values()
            for j, _ in started
            if self.s.jobs[j].state in ACTIVE
        )
        pick = data.draw(st.integers(0, 3))
        pool = away if away and pick < 2 else active if active and pick < 3 else sorted(self.s.jobs)
        job_id = data.draw(st.sampled_from(pool))
        job = self.s.jobs[job_id]
        client = job.client_id if owner else "intruder"
        if not owner:
            self.unchanged(job_id, lambda: self.s.cancel(client, job_id, self.now), UnknownJob)
        elif job.state in TERMINAL:
            self.unchanged(
                job_id, lambda: self.s.cancel(client, job_id, self.now), InvalidTransition
            )
        else:
            miner_id = job.miner_id
            _, effects = self.s.cancel(client, job_id, self.now)
            assert job.state is JobState.CANCELED
            assert job.miner_id is None
            miner = None if miner_id is None else self.s.miners.get(miner_id)
            assert miner is None or job_id not in miner.jobs  # the slot is free
            self.apply(effects)

    @rule(data=st.data())
    def admin_cancel(self, data: st.DataObject) -> None:
        """An operator cancels any client's job (an ended one is refused, nothing changes)."""
        if not self.s.jobs:
            return
        job_id = data.draw(st.sampled_from(sorted(self.s.jobs)))
        job = self.s.jobs[job_id]
        if job.state in TERMINAL:
            self.unchanged(job_id, lambda: self.s.admin_cancel(job_id, self.now), InvalidTransition)
            return
        _, effects = self.s.admin_cancel(job_id, self.now)
        assert (job.state, job.miner_id) == (JobState.CANCELED, None)
        self.apply(effects)

    @rule(data=st.data())
    def admin_requeue(self, data: st.DataObject) -> None:
        """An operator takes a RUNNING job back from its miner (connected or away): queued
        again, not charged, never offered to that miner again; anything else is refused."""
        running = sorted(j.job_id for j in self.s.jobs.values() if j.state is JobState.RUNNING)
        pool = running if running and data.draw(st.integers(0, 3)) else sorted(self.s.jobs)
        if not pool:
            return
        job_id = data.draw(st.sampled_from(pool))
        job = self.s.jobs[job_id]
        if job.state is not JobState.RUNNING:
            self.unchanged(job_id, lambda: self.s.requeue(job_id, self.now), InvalidTransition)
            return
        miner_id, attempt, failures = job.miner_id, job.attempt, job.failures
        assert miner_id is not None
        connected = self.s.miners[miner_id].connected
        _, effects = self.s.requeue(job_id, self.now)
        revokes = [e for e in effects if isinstance(e, Revoke)]
        assert [(r.miner_id, r.job_id) for r in revokes] == (
            [(miner_id, job_id)] if connected else []
        )
        self.apply(effects)
        assert job.failures == failures
        assert job.miner_id != miner_id
        self.check_released([(job_id, attempt)])
        if miner_id in self.away:  # taken while away: its resume names the job in ``revoked``
            due, session, started = self.away[miner_id]
            self.away[miner_id] = (due, session, [p for p in started if p[0] != job_id])
            self.taken.setdefault(miner_id, []).append(job_id)

    # ---- miners -------------------------------------------------------------------------

    @rule(
        miner_id=st.sampled_from(MINERS),
        profile=st.sampled_from(PROFILES),
        concurrency=st.sampled_from([0, 1, 1, 2, 3]),
        resume=st.sampled_from(["none", "same", "same", "bogus"]),
    )
    def connect(
        self, miner_id: str, profile: tuple[JSONObject, str | None], concurrency: int, resume: str
    ) -> None:
        """A miner says hello: new, replacing a live session, resuming, or restarting."""
        self.n_sessions += 1
        session = f"{miner_id}-s{self.n_sessions}"
        resume_session = {"none": None, "same": self.last_session.get(miner_id), "bogus": "bogus"}[
            resume
        ]
        old = self.s.miners.get(miner_id)
        old_session = None if old is None else old.session_id
        was_live = old is not None and old.connected
        held_before = [] if old is None else list(old.jobs)
        before = {j: (self.s.jobs[j].failures, self.s.jobs[j].accepted) for j in held_before}
        belief = self.belief.get(miner_id, set())
        if old_session is not None:
            self.old_sessions.append((miner_id, old_session))
        unheard = self.unheard(miner_id, held_before) if was_live else []
        # what the model expects, independently of the scheduler's bookkeeping
        watch = self.away.get(miner_id)
        gone = {JobState.CANCELED, JobState.EXPIRED}
        revoked_away = (
            [] if watch is None else [j for j, _ in watch[2] if self.s.jobs[j].state in gone]
        )
        resumed_ok = (was_live and resume_session == old_session) or (
            watch is not None and resume_session == watch[1]
        )
        lost = self.lost.pop(miner_id, None)
        late = lost[1] if old is None and lost is not None and resume_session == lost[0] else []
        taken = self.taken.pop(miner_id, []) if watch is not None else []
        capabilities, region = profile
        info, effects = self.s.connect(
            miner_id,
            session,
            capabilities=capabilities,
            concurrency=concurrency,
            region=region,
            resume_session=resume_session,
            now=self.now,
        )
        closes = [e for e in effects if isinstance(e, CloseSession)]
        assert closes == (
            [
                CloseSession(
                    miner_id=miner_id,
                    session_id=old_session or "",
                    code=CloseCode.REPLACED,
                    reason="replaced",
                )
            ]
            if was_live
            else []
        )
        miner = self.s.miners[miner_id]
        assert miner.connected
        assert miner.session_id == session
        event(
            f"connect: {'resume' if resumed_ok else 'fresh'}, live={was_live}, "
            f"away={watch is not None}, revoked={bool(info.revoked)}"
        )
        if resumed_ok:
            # it keeps what it holds; jobs canceled or expired while it was away are revoked,
            # and so are those a replaced (live) session had not accepted, requeued uncharged
            kept = [j for j in held_before if before[j][1]]
            assert list(info.resumed) == kept
            assert sorted(info.revoked) == sorted(
                unheard + revoked_away + taken + [j for j in held_before if j not in kept]
            )
            for job_id, (failures, _) in before.items():
                assert self.s.jobs[job_id].failures == failures
            for job_id in info.resumed:
                job = self.s.jobs[job_id]
                assert job.state is JobState.RUNNING
                assert job.miner_id == miner_id
        else:
            # a restart: everything it held or lost meanwhile is revoked and requeued;
            # only a started attempt counts against the job (like a disconnect)
            assert info.resumed == ()
            assert sorted(info.revoked) == sorted(
                unheard + revoked_away + taken + held_before + late
            )
            for job_id, (failures, accepted) in before.items():
                job = self.s.jobs[job_id]
                assert job.failures == failures + accepted or job.state is JobState.FAILED
        # what it was told it holds, and what it may not have heard was taken from it
        assert set(info.revoked) <= belief | self.unheard_of.pop(miner_id, set())
        self.belief[miner_id] = set(info.resumed)
        self.last_session[miner_id] = session
        self.apply(effects)
        self.away.pop(miner_id, None)
        if watch is not None and not resumed_ok:
            self.check_released(watch[2])

    @precondition(lambda self: bool(self.away))
    @rule(
        data=st.data(),
        profile=st.sampled_from(PROFILES),
        concurrency=st.integers(1, 3),
        resume=st.sampled_from(["same", "same", "same", "none", "bogus"]),
    )
    def come_back(
        self,
        data: st.DataObject,
        profile: tuple[JSONObject, str | None],
        concurrency: int,
        resume: str,
    ) -> None:
        """A miner in its resume grace reconnects, usually resuming its old session."""
        self.connect(data.draw(st.sampled_from(sorted(self.away))), profile, concurrency, resume)

    @rule(data=st.data(), stale=st.sampled_from([False, False, False, True]))
    def disconnect(self, data: st.DataObject, stale: bool) -> None:
        """A miner's socket closes (or an old, replaced socket closes: nothing happens)."""
        busy = sorted(m for m, miner in self.s.miners.items() if miner.connected and miner.jobs)
        prefer_busy = data.draw(st.integers(0, 3)) > 0
        pool = busy if busy and prefer_busy else list(MINERS)
        miner_id = data.draw(st.sampled_from(pool))
        miner = self.s.miners.get(miner_id)
        if stale:
            olds = [s for m, s in self.old_sessions if m == miner_id]
            session = olds[-1] if olds else "never"
            if miner is not None and session == miner.session_id:
                session = "never"
            before = self.s.statistics()
            assert self.s.disconnect(miner_id, session, self.now) == []
            assert self.s.statistics() == before
            return
        if miner is None or not miner.connected:
            assert self.s.disconnect(miner_id, self.last_session.get(miner_id, "x"), self.now) == []
            return
        self.gone(miner_id, lambda: self.s.disconnect(miner_id, miner.session_id, self.now))

    @rule(data=st.data())
    def operator_disconnect(self, data: st.DataObject) -> None:
        """An operator closes a miner's session: as if its socket closed (UnknownMiner unless
        it is connected)."""
        miner_id = data.draw(st.sampled_from(MINERS))
        miner = self.s.miners.get(miner_id)
        if miner is None or not miner.connected:
            before = self.s.statistics()
            try:
                self.s.disconnect_miner(miner_id, self.now)
            except UnknownMiner:
                pass
            else:  # pragma: no cover - a failure of the scheduler
                raise AssertionError(f"expected UnknownMiner for {miner_id}")
            assert self.s.statistics() == before
            assert self.s._effects == []
            return
        session = miner.session_id

        def call() -> list[Effect]:
            effects = self.s.disconnect_miner(miner_id, self.now)
            closes = [e for e in effects if isinstance(e, CloseSession)]
            assert [(c.session_id, c.code) for c in closes] == [(session, CloseCode.NORMAL)]
            return effects

        self.gone(miner_id, call)

    def gone(self, miner_id: str, call: Callable[[], list[Effect]]) -> None:
        """``call()`` ends the live session of ``miner_id``: unaccepted jobs go back at once,
        started ones wait for the resume grace."""
        miner = self.s.miners[miner_id]
        session = miner.session_id
        unaccepted = [
            (j, self.s.jobs[j].attempt) for j in miner.jobs if not self.s.jobs[j].accepted
        ]
        started = [(j, self.s.jobs[j].attempt) for j in miner.jobs if self.s.jobs[j].accepted]
        unheard = self.unheard(miner_id, list(miner.jobs))
        effects = call()
        assert not [e for e in effects if isinstance(e, Assign) and e.miner_id == miner_id]
        self.apply(effects)
        self.check_released(unaccepted)  # unaccepted jobs go back at once
        event(f"disconnect: started={len(started)}, unaccepted={len(unaccepted)}")
        if started:
            assert self.s.miners[miner_id].grace_timer is not None
            self.away[miner_id] = (self.now + CONFIG.resume_grace, session, started)
            self.taken[miner_id] = unheard + [j for j, _ in unaccepted]
        else:
            assert miner_id not in self.s.miners
            if unheard or unaccepted:  # dropped at once: a late resume still learns them
                self.lost[miner_id] = (session, unheard + [j for j, _ in unaccepted])

    @rule(data=st.data())
    def leave(self, data: st.DataObject) -> None:
        """A miner deregisters: everything it held goes back at once, not charged, never to
        itself, and it is forgotten."""
        live = sorted(m for m, miner in self.s.miners.items() if miner.connected)
        if not live:
            return
        miner_id = data.draw(st.sampled_from(live))
        held = [(j, self.s.jobs[j].attempt) for j in self.s.miners[miner_id].jobs]
        effects = self.s.leave(miner_id, self.now)
        assert not [e for e in effects if isinstance(e, Assign) and e.miner_id == miner_id]
        self.apply(effects)
        self.check_released(held)
        assert miner_id not in self.s.miners
        self.belief[miner_id] = set()
        self.sent.pop(miner_id, None)
        event(f"leave: held={len(held)}")

    @rule(
        miner_id=st.sampled_from(MINERS),
        concurrency=st.sampled_from([None, 0, 1, 2, 3]),
        draining=st.sampled_from([None, True, False]),
    )
    def status(self, miner_id: str, concurrency: int | None, draining: bool | None) -> None:
        """A miner changes its concurrency or draining flag."""
        miner = self.s.miners.get(miner_id)
        if miner is None or not miner.connected:
            return
        effects = self.s.set_status(
            miner_id, concurrency=concurrency, draining=draining, now=self.now
        )
        if miner.draining:
            assert not [e for e in effects if isinstance(e, Assign)]
        self.apply(effects)

    # ---- miner actions on pushed jobs (current or stale attempts) -----------------------

    def lease(self, data: st.DataObject, *, unaccepted: bool = False) -> tuple[str, str, int, bool]:
        """Draw a (miner, job, attempt) some miner was pushed; mostly a current lease."""
        current = sorted(
            (j.miner_id, j.job_id, j.attempt)
            for j in self.s.jobs.values()
            if j.state is JobState.RUNNING
            and j.miner_id is not None
            and not (unaccepted and j.accepted)
        )
        prefer_current = data.draw(st.integers(0, 3)) > 0
        pool = current if current and prefer_current else sorted(self.pushed)
        miner_id, job_id, attempt = data.draw(st.sampled_from(pool))
        job = self.s.jobs[job_id]
        valid = (
            job.state is JobState.RUNNING and job.miner_id == miner_id and job.attempt == attempt
        )
        return miner_id, job_id, attempt, valid

    @precondition(lambda self: bool(self.pushed))
    @rule(data=st.data())
    def accept(self, data: st.DataObject) -> None:
        """A miner accepts a pushed job (a stale attempt is refused and changes nothing)."""
        miner_id, job_id, attempt, valid = self.lease(data, unaccepted=True)
        if not valid:
            self.unchanged(
                job_id, lambda: self.s.accept(miner_id, job_id, self.now, attempt), NotAssigned
            )
            return
        self.apply(self.s.accept(miner_id, job_id, self.now, attempt))
        assert self.s.jobs[job_id].accepted

    @precondition(lambda self: bool(self.pushed))
    @rule(data=st.data())
    def reject(self, data: st.DataObject) -> None:
        """A miner rejects a job: not offered to it again during a pause; charged only once it
        was started."""
        miner_id, job_id, attempt, valid = self.lease(data)
        if not valid:
            self.unchanged(
                job_id,
                lambda: self.s.reject(miner_id, job_id, "no", self.now, attempt),
                NotAssigned,
            )
            return
        job = self.s.jobs[job_id]
        failures, started = job.failures, job.accepted
        self.apply(self.s.reject(miner_id, job_id, "no", self.now, attempt))
        self.let_go(miner_id, job_id)
        assert job.failures == failures + started
        if job.state is not JobState.FAILED:  # a charged reject may use up the attempts
            assert job.state in (JobState.QUEUED, JobState.RUNNING)
            assert job.miner_id != miner_id

    @precondition(lambda self: bool(self.pushed))
    @rule(data=st.data(), output=st.sampled_from([None, "tok"]))
    def progress(self, data: st.DataObject, output: str | None) -> None:
        """A miner reports progress (and implicitly accepts)."""
        miner_id, job_id, attempt, valid = self.lease(data)
        if not valid:
            self.unchanged(
                job_id,
                lambda: self.s.progress(miner_id, job_id, self.now, attempt=attempt, output=output),
                NotAssigned,
            )
            return
        effects = self.s.progress(
            miner_id, job_id, self.now, attempt=attempt, progress=0.5, output=output
        )
        last = effects[-1]
        assert isinstance(last, Persist)
        assert last.event.event == "progress"
        self.apply(effects)

    @precondition(lambda self: bool(self.pushed))
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        """A miner sends a result: completes, repeats idempotently, or is refused as stale."""
        miner_id, job_id, attempt, valid = self.lease(data)
        job = self.s.jobs[job_id]
        if job.state is JobState.COMPLETED and job.miner_id == miner_id and job.attempt == attempt:
            receipt = job.receipt
            again, effects = self.s.complete(miner_id, job_id, {"again": 1}, {}, self.now, attempt)
            assert again is job
            assert effects == []
            assert job.receipt == receipt
            return
        if not valid:
            self.unchanged(
                job_id,
                lambda: self.s.complete(miner_id, job_id, {"late": 1}, {}, self.now, attempt),
                NotAssigned,
            )
            return
        price = self.s.miners[miner_id].caps.price
        done, effects = self.s.complete(miner_id, job_id, {"ok": 1}, {}, self.now, attempt)
        assert done.state is JobState.COMPLETED
        assert done.receipt == {"receipt_id": f"{job_id}/{attempt}", "unit_price": price}
        self.let_go(miner_id, job_id)
        self.apply(effects)

    @precondition(lambda self: bool(self.pushed))
    @rule(data=st.data(), retryable=st.booleans())
    def fail(self, data: st.DataObject, retryable: bool) -> None:
        """A miner reports a failure, retryable (requeue while attempts remain) or not."""
        miner_id, job_id, attempt, valid = self.lease(data)

        def call() -> list[Effect]:
            return self.s.fail(
                miner_id,
                job_id,
                error_code="e",
                error_message="m",
                retryable=retryable,
                now=self.now,
                attempt=attempt,
            )

        if not valid:
            self.unchanged(job_id, call, NotAssigned)
            return
        job = self.s.jobs[job_id]
        failures = job.failures
        self.let_go(miner_id, job_id)
        self.apply(call())
        if not retryable:
            assert job.state is JobState.FAILED
        elif failures + 1 >= job.max_attempts:
            assert job.state is JobState.FAILED
            assert job.failures == job.max_attempts
        else:
            assert job.state in (JobState.QUEUED, JobState.RUNNING)
            assert job.failures == failures + 1

    # ---- time ---------------------------------------------------------------------------

    @rule(dt=st.sampled_from([0.0, 1.0, 1.0, 4.0, 9.0, 10.0, 15.0, 30.0, 100.0]))
    def advance(self, dt: float) -> None:
        """Time passes and the scheduler's timers fire."""
        self.tick(self.now + dt)

    @rule()
    def advance_to_next_deadline(self) -> None:
        """Time jumps exactly to the next deadline (boundaries are inclusive)."""
        deadline = self.s.next_deadline()
        if deadline is not None:
            self.tick(max(self.now, deadline))

    def tick(self, now: float) -> None:
        self.now = now
        self.apply(self.s.tick(now))
        deadline = self.s.next_deadline()
        assert deadline is None or deadline > now
        for miner_id, (due, session, started) in list(self.away.items()):
            if now >= due:
                assert miner_id not in self.s.miners or self.s.miners[miner_id].connected
                self.check_released(started)
                taken = self.taken.pop(miner_id, [])
                self.lost[miner_id] = (session, [j for j, _ in started] + taken)
                del self.away[miner_id]

    def let_go(self, miner_id: str, job_id: str) -> None:
        """The miner itself gave the job up (result, failure or reject), maybe while away."""
        self.belief[miner_id].discard(job_id)
        if miner_id in self.away:
            due, session, started = self.away[miner_id]
            self.away[miner_id] = (due, session, [p for p in started if p[0] != job_id])

    def check_released(self, leases: list[tuple[str, int]]) -> None:
        """None of these (job, attempt) leases is still held."""
        for job_id, attempt in leases:
            job = self.s.jobs[job_id]
            assert not (job.state is JobState.RUNNING and job.attempt == attempt), job_id

    @rule(roll=st.integers(0, 2))
    def restart(self, roll: int) -> None:
        """The coordinator restarts: a new Scheduler is rebuilt from the stored records."""
        if roll:
            return  # keeps restarts rarer than the other rules
        records = [rec for rec in self.stored.values() if JobState(rec.state) in ACTIVE]
        accepted = {j.job_id: j.accepted for j in self.s.jobs.values()}
        self.s = Scheduler(CONFIG, receipt_factory)
        self.counter_base = self.persist_count
        self.prev_held = {}
        self.pushed = {p for p in self.pushed if p[1] in {r.job_id for r in records}}
        self.away = {}
        self.lost = {}
        self.taken = {}
        self.sent = {}  # the pushes a restart closed every socket on are not stored
        started: dict[str, list[tuple[str, int]]] = {}
        unaccepted: dict[str, list[str]] = {}  # requeued by the restart: revoked on resume
        for rec in sorted(records, key=lambda r: r.requested_at):
            if rec.state == JobState.RUNNING:
                assert rec.miner_id is not None
                if accepted[rec.job_id]:
                    started.setdefault(rec.miner_id, []).append((rec.job_id, rec.attempt))
                else:
                    unaccepted.setdefault(rec.miner_id, []).append(rec.job_id)
        effects = self.s.restore(records, dict(self.last_session), self.now)
        event(
            f"restart: {len(records)} active, requeued="
            f"{any(isinstance(e, Persist) and e.event.event == 'requeued' for e in effects)}"
        )
        self.apply(effects)
        assert {j.job_id for j in self.s.jobs.values()} == {r.job_id for r in records}
        for rec in records:
            job = self.s.jobs[rec.job_id]
            if job.state is JobState.RUNNING:
                # only started attempts wait for their miner; the rest were requeued
                assert accepted[rec.job_id]
                assert job.accepted
                assert (job.job_id, job.attempt) in started[job.miner_id or ""]
        for miner_id, miner in self.s.miners.items():
            assert not miner.connected
            self.away[miner_id] = (
                self.now + CONFIG.resume_grace,
                miner.session_id,
                started[miner_id],
            )
            self.taken[miner_id] = unaccepted.get(miner_id, [])
        for miner_id, jobs in unaccepted.items():
            if miner_id not in self.s.miners:  # dropped at once, as after a disconnect
                self.lost[miner_id] = (self.last_session.get(miner_id, ""), jobs)
        assert set(started) >= set(self.s.miners)

    # ---- invariants ---------------------------------------------------------------------

    @invariant()
    def leases_are_exclusive_and_consistent(self) -> None:
        """Each job is in at most one miner's jobs; RUNNING jobs are held by their miner_id."""
        holders: dict[str, str] = {}
        for miner_id, miner in self.s.miners.items():
            for job_id in miner.jobs:
                assert job_id not in holders, f"{job_id} leased twice"
                holders[job_id] = miner_id
                job = self.s.jobs[job_id]
                assert job.state is JobState.RUNNING
                assert job.miner_id == miner_id
        for job in self.s.jobs.values():
            if job.state is JobState.RUNNING:
                assert holders.get(job.job_id) == job.miner_id
                # never pushed to a miner during its pause after refusing the job
                paused_until, _ = job.rejected_by.get(job.miner_id, (0.0, 0))
                assert job.assigned_at is not None
                assert paused_until <= job.assigned_at

    @invariant()
    def miners_know_what_they_hold(self) -> None:
        """A connected miner was pushed exactly the jobs it holds (every loss was revoked)."""
        for miner_id, miner in self.s.miners.items():
            if miner.connected:
                assert self.belief.get(miner_id, set()) == set(miner.jobs), miner_id

    @invariant()
    def active_jobs_are_queued_or_leased(self) -> None:
        """Every QUEUED job has exactly one live queue entry and no miner."""
        live: dict[str, int] = {}
        for heap in self.s._queue._classes.values():
            for _, _, token, job_id in heap:
                if self.s._valid_entry(job_id, token):
                    live[job_id] = live.get(job_id, 0) + 1
        queued = {j.job_id for j in self.s.jobs.values() if j.state is JobState.QUEUED}
        assert set(live) == queued
        assert all(n == 1 for n in live.values())
        for job_id in queued:
            assert self.s.jobs[job_id].miner_id is None
        assert self.s.statistics().jobs_queued == len(queued)

    @invariant()
    def no_idle_miner_could_take_a_queued_job(self) -> None:
        """Work conserving: a queued job never matches a free, willing, connected miner."""
        for job in self.s.jobs.values():
            if job.state is not JobState.QUEUED:
                continue
            assert isinstance(job.needs, JobNeeds)
            for miner_id, miner in self.s.miners.items():
                if miner.connected and not miner.draining and miner.free > 0:
                    paused = job.rejected_by.get(miner_id, (0.0, 0))[0] > self.now
                    assert paused or not matches(job.needs, miner.caps), (job.job_id, miner_id)

    @invariant()
    def terminal_states_are_absorbing(self) -> None:
        """A job seen terminal keeps that state and holds no lease."""
        for job_id, state in self.terminal_seen.items():
            job = self.s.jobs.get(job_id)
            if job is not None:  # terminal jobs are not restored after a restart
                assert job.state is state
                assert job.timers == []

    @invariant()
    def memory_matches_the_store(self) -> None:
        """Every change to a job's record went out in a Persist: memory equals the store."""
        for job_id, job in self.s.jobs.items():
            assert job.record() == self.stored[job_id]

    @invariant()
    def deadline_not_in_the_past(self) -> None:
        """next_deadline() is never earlier than the current time."""
        deadline = self.s.next_deadline()
        assert deadline is None or deadline > self.now

    @invariant()
    def event_log_is_complete(self) -> None:
        """Each job's seq equals the last Persist seen for it; counters match the log."""
        for job_id, job in self.s.jobs.items():
            assert job.seq == self.last_seq[job_id]
        assert sum(self.s.statistics().events.values()) == self.persist_count - self.counter_base

    @invariant()
    def statistics_agree(self) -> None:
        """statistics() matches the scheduler's own state."""
        stats = self.s.statistics()
        running = [j for j in self.s.jobs.values() if j.state is JobState.RUNNING]
        assert stats.jobs_running == len(running)
        connected = [m for m in self.s.miners.values() if m.connected]
        assert stats.miners_connected == len(connected)
        assert stats.miners_in_grace == len(self.s.miners) - len(connected)
        for miner in self.s.miners.values():
            assert (miner.grace_timer is not None) is (not miner.connected)
            assert (miner.miner_id in self.s._idle) is (
                miner.connected and not miner.draining and miner.free > 0
            )


SchedulerMachine.TestCase.settings = settings(
    max_examples=120,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.__doc__ = "Random operation sequences keep every scheduler invariant."
