"""bench/tail.py's selection of slow jobs (pure)."""

from __future__ import annotations

from bench.dispatch import Trace
from bench.tail import slow_jobs


def test_slow_jobs_are_those_at_or_above_p99_in_time_order() -> None:
    trace = Trace()
    for n in range(200):
        trace.sent[f"s{n}"] = 100.0 + n * 0.01
        trace.job_of[f"j{n}"] = f"s{n}"
        # 0.1 ms and a microsecond more each time, but two at 5 and 9 ms (the slower earlier)
        delay = {150: 0.005, 40: 0.009}.get(n, 0.0001 + n * 1e-6)
        trace.assigned[f"j{n}"] = trace.sent[f"s{n}"] + delay
    ms, slow = slow_jobs(trace)
    assert len(ms) == 200
    # p99 of 200 (nearest rank) is the third largest: the last ordinary job, 0.299 ms
    assert [round(s, 2) for s, _ in slow] == [0.40, 1.50, 1.99]
    assert [round(v, 3) for _, v in slow] == [9.0, 5.0, 0.299]


def test_no_jobs_no_slow_ones() -> None:
    assert slow_jobs(Trace()) == ([], [])
