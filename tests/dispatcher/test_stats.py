"""Ring 2: the lock-free tallies behind /metrics and the ops page (dispatcher/stats.py)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

from dispatcher import core
from dispatcher.stats import (
    REQUEUE_REASONS,
    EventTally,
    Histogram,
    JobCounts,
    requeue_label,
    requeue_reason,
)
from protocol.records import EventRecord, JobRecord


def job(requested_at: float = 100.0) -> JobRecord:
    return JobRecord(
        job_id="j1",
        client_id="c1",
        state="QUEUED",
        payload={},
        constraints={},
        priority=0,
        requested_at=requested_at,
        expires_at=requested_at + 900,
        attempt=0,
        failures=0,
        max_attempts=3,
        seq=1,
    )


def event(kind: str, at: float, attempt: int = 1, **data: object) -> EventRecord:
    return EventRecord("j1", 1, kind, "RUNNING", at, attempt, "m1", data)


def observe(t: EventTally, kind: str, committed: float, **kw: Any) -> None:
    """An event that happened at 100.0 (the submit's time) and was committed later."""
    t.observe(job(), event(kind, 100.0, **kw), committed)


def test_histogram_buckets_are_upper_inclusive_and_cumulative() -> None:
    """A value equal to a bound lands in that bucket; larger ones in +Inf."""
    h = Histogram((1.0, 2.0))
    for v in (0.5, 1.0, 1.5, 2.0, 7.0):
        h.observe(v)
    assert h.counts == [2, 2, 1]
    assert h.cumulative() == [(1.0, 2), (2.0, 4), (float("inf"), 5)]
    assert (h.count, h.sum) == (5, 12.0)


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("requeued by admin", "admin"),
        ("accept timeout", "accept_timeout"),
        ("miner disconnected before accepting", "disconnected"),
        ("miner lost", "miner_lost"),
        ("miner restarted", "miner_restarted"),
        ("lease expired", "lease_expired"),
        ("rejected: busy", "rejected"),
        ("rejected", "rejected"),
        ("coordinator restarted", "coordinator_restarted"),
        ("poll gone", "poll_gone"),
        ("miner deregistered", "deregistered"),  # was counted as a miner's failure
        ("miner reconnected before accepting", "disconnected"),  # the same
        ("oom: out of memory", "retryable_failure"),
        ("", "retryable_failure"),
    ],
)
def test_requeue_reason_labels(text: str, label: str) -> None:
    """Free-form requeue texts map onto a small closed set of labels."""
    assert requeue_reason(text) == label
    assert label in REQUEUE_REASONS


@pytest.mark.parametrize(
    ("data", "label"),
    [
        ({"reason": "rejected: content filter", "error_code": "rejected"}, "retryable_failure"),
        ({"reason": "miner restarted: oops", "error_code": "miner restarted"}, "retryable_failure"),
        ({"reason": "OOM: out of memory", "error_code": "OOM"}, "retryable_failure"),
        ({"reason": "rejected: busy"}, "rejected"),
        ({"reason": "lease expired"}, "lease_expired"),
        ({}, "retryable_failure"),
    ],
)
def test_a_miners_failure_is_told_by_its_error_code_never_by_its_text(
    data: dict[str, str], label: str
) -> None:
    """A retryable failure's reason is the miner's own ``code: message``: a code that began
    like a coordinator's reason ("rejected", "lease expired", "miner restarted") was counted
    under that reason, and the ops page counted no failure against the miner (a failing miner
    could hide its failures). The event names its ``error_code``, which decides."""
    assert requeue_label(data) == label


def test_every_requeue_text_of_the_scheduler_has_its_own_label() -> None:
    """Each fixed reason ``dispatcher/core.py`` requeues with is labelled as itself, not as a
    miner's failure (a new one must be added to the labels, and to docs/ops.md)."""
    tree = ast.parse(Path(core.__file__).read_text())
    texts = [
        call.args[2].value
        for call in ast.walk(tree)
        if isinstance(call, ast.Call)
        and isinstance(call.func, ast.Attribute)
        and call.func.attr == "_requeue"
        and isinstance(call.args[2], ast.Constant)
    ]
    assert len(texts) >= 10
    for text in texts:
        assert requeue_reason(text) != "retryable_failure", text


def test_tally_counts_events_and_latencies() -> None:
    """Latencies run from submit to the commit; assign only for the first attempt."""
    t = EventTally()
    observe(t, "queued", 100.001, attempt=0)
    observe(t, "assigned", 100.004)
    observe(t, "requeued", 101.0, reason="accept timeout")
    observe(t, "assigned", 102.0, attempt=2)
    observe(t, "requeued", 103.0)
    observe(t, "completed", 103.5)
    assert t.events == {"queued": 1, "assigned": 2, "requeued": 2, "completed": 1}
    assert t.assign_latency.count == 1
    assert t.assign_latency.sum == pytest.approx(0.004)
    assert t.complete_latency.count == 1
    assert t.complete_latency.sum == pytest.approx(3.5)
    assert t.requeues == {"accept_timeout": 1, "retryable_failure": 1}


def test_tally_clamps_clock_steps_backwards() -> None:
    """A wall clock that stepped back never produces a negative latency."""
    t = EventTally()
    t.observe(job(requested_at=200.0), event("completed", 199.0), 199.0)
    assert t.complete_latency.counts[0] == 1
    assert t.complete_latency.sum == 0.0


def test_job_counts_follow_each_job_to_its_final_state() -> None:
    """Seeded with the store's counts and the live jobs; each committed event moves its job
    to the event's state, once (progress and repeats change nothing); a final state is
    forgotten."""
    counts = JobCounts()
    counts.seed({"COMPLETED": 7, "RUNNING": 1}, [job()._replace(job_id="old", state="RUNNING")])

    def ev(job_id: str, kind: str, state: str) -> EventRecord:
        return EventRecord(job_id, 1, kind, state, 100.0, 1, "m1", {})

    steps = [
        (ev("new", "queued", "QUEUED"), {"COMPLETED": 7, "RUNNING": 1, "QUEUED": 1}),
        (ev("new", "assigned", "RUNNING"), {"COMPLETED": 7, "RUNNING": 2, "QUEUED": 0}),
        (ev("new", "progress", "RUNNING"), {"COMPLETED": 7, "RUNNING": 2, "QUEUED": 0}),
        (ev("new", "requeued", "QUEUED"), {"COMPLETED": 7, "RUNNING": 1, "QUEUED": 1}),
        (ev("old", "completed", "COMPLETED"), {"COMPLETED": 8, "RUNNING": 0, "QUEUED": 1}),
        (
            ev("new", "expired", "EXPIRED"),
            {"COMPLETED": 8, "RUNNING": 0, "QUEUED": 0, "EXPIRED": 1},
        ),
    ]
    for event_, expected in steps:
        counts.observe(event_)
        assert counts.by_state == expected
    assert counts._live == {}  # nothing live is left to remember


def test_job_counts_count_a_final_event_of_a_job_never_seen_live() -> None:
    """A job that ends without a live state in memory (say, seeded without it) is counted in
    its final state and not remembered."""
    counts = JobCounts()
    counts.seed({}, [])
    counts.observe(EventRecord("ghost", 3, "completed", "COMPLETED", 100.0, 1, "m1", {}))
    assert counts.by_state == {"COMPLETED": 1}
    assert counts._live == {}
