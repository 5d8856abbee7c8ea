"""Ring 2: operator actions of the pure Scheduler (admin cancel, requeue, disconnect, drain)."""

from __future__ import annotations

import pytest

from dispatcher.effects import Persist
from dispatcher.errors import InvalidTransition, NotAssigned, UnknownJob, UnknownMiner
from dispatcher.jobs import JobState
from protocol.types import CloseCode
from tests.dispatcher.test_core import connect, held, make, state, submit, summary


def test_admin_cancel_any_clients_job_revokes_with_reason() -> None:
    """An operator cancels another client's RUNNING job: the miner is told why."""
    s = make()
    connect(s, "m1")
    submit(s, "j1", now=0.0, client_id="someone")
    job, effects = s.admin_cancel("j1", 1.0)
    assert summary(effects) == [
        ("revoke", "m1", "j1", "canceled by admin"),
        ("persist", "j1", "canceled"),
    ]
    persist = effects[-1]
    assert isinstance(persist, Persist)
    assert persist.event.data == {"error": "canceled by admin"}
    assert job.state is JobState.CANCELED
    assert held(s, "m1") == []


def test_admin_cancel_errors() -> None:
    """Unknown job -> UnknownJob; a terminal job -> InvalidTransition."""
    s = make()
    with pytest.raises(UnknownJob):
        s.admin_cancel("nope", 0.0)
    submit(s, "j1", now=0.0)
    s.admin_cancel("j1", 1.0)
    with pytest.raises(InvalidTransition):
        s.admin_cancel("j1", 2.0)


def test_requeue_moves_running_job_to_another_miner_uncharged() -> None:
    """Requeue: revoke on the holder, 'requeued' event, then assigned to the other miner."""
    s = make()
    connect(s, "m1")
    submit(s, "j1", now=0.0)
    s.accept("m1", "j1", 1.0)
    connect(s, "m2", now=2.0)
    job, effects = s.requeue("j1", 3.0)
    assert summary(effects) == [
        ("revoke", "m1", "j1", "requeued by admin"),
        ("persist", "j1", "requeued"),
        ("persist", "j1", "assigned"),
        ("assign", "m2", "j1", 2),
    ]
    first = effects[1]
    assert isinstance(first, Persist)
    assert first.event.data == {"reason": "requeued by admin"}
    assert job.failures == 0
    assert held(s, "m1") == []
    with pytest.raises(NotAssigned):
        s.complete("m1", "j1", {}, {}, 4.0)


def test_requeue_without_other_miner_waits_in_queue() -> None:
    """The old holder is not offered the job again: with no other miner it stays QUEUED."""
    s = make()
    connect(s, "m1")
    submit(s, "j1", now=0.0)
    s.requeue("j1", 1.0)
    assert state(s, "j1") is JobState.QUEUED
    assert s.statistics().jobs_queued == 1
    assert held(s, "m1") == []
    # Not a refusal with a pause: the admin moved it off that miner for good.
    s.tick(s.config.reject_pause_max + 10.0)
    assert held(s, "m1") == []
    assert state(s, "j1") is JobState.QUEUED


def test_requeue_errors() -> None:
    """Unknown job -> UnknownJob; a QUEUED or terminal job -> InvalidTransition."""
    s = make()
    with pytest.raises(UnknownJob):
        s.requeue("nope", 0.0)
    submit(s, "j1", now=0.0)
    with pytest.raises(InvalidTransition):
        s.requeue("j1", 1.0)
    s.cancel("c1", "j1", 2.0)
    with pytest.raises(InvalidTransition):
        s.requeue("j1", 3.0)


def test_disconnect_miner_closes_session_and_requeues_unstarted() -> None:
    """Disconnect: CloseSession(1000) first; unaccepted jobs requeue, started ones wait grace."""
    s = make()
    connect(s, "m1", concurrency=2)
    submit(s, "j1", now=0.0)
    submit(s, "j2", now=0.0)
    s.accept("m1", "j1", 1.0)
    effects = s.disconnect_miner("m1", 2.0)
    assert summary(effects) == [
        ("close", "m1", "m1-s1", CloseCode.NORMAL),
        ("persist", "j2", "requeued"),
    ]
    assert held(s, "m1") == ["j1"]
    assert s.statistics().miners_connected == 0
    assert s.disconnect("m1", "m1-s1", 3.0) == []  # the socket's own close changes nothing
    with pytest.raises(UnknownMiner):
        s.disconnect_miner("m1", 4.0)
    with pytest.raises(UnknownMiner):
        s.disconnect_miner("never", 4.0)


def test_disconnect_idle_miner_forgets_it() -> None:
    """An idle miner that is disconnected is gone at once."""
    s = make()
    connect(s, "m1")
    s.disconnect_miner("m1", 1.0)
    assert "m1" not in s.miners
