"""bench/dispatch.py's latency bookkeeping and table (the ceiling reuses both)."""

from __future__ import annotations

import pytest

from bench.dispatch import Trace, latencies, render


def test_latencies_map_job_ids_to_submit_ids_or_use_the_submit_id() -> None:
    trace = Trace(
        sent={"s1": 1.000, "s2": 2.000},
        job_of={"job-a": "s1"},  # s2 was never acked: its job id is its submit id (ceiling)
        assigned={"job-a": 1.001, "s2": 2.004},
        completed={"job-a": 1.010},
    )
    assign_ms, complete_ms = latencies(trace)
    assert assign_ms == pytest.approx([1.0, 4.0])
    assert complete_ms == pytest.approx([10.0])


def run(jobs_per_s: float) -> dict[str, float]:
    return {
        "jobs_per_s": jobs_per_s,
        "server_cpu_us_per_job": 100.0,
        "loadgen_cpu_pct": 50.0,
        "assign_p50_ms": 1.0,
        "assign_p99_ms": 2.0,
        "complete_p50_ms": 3.0,
        "complete_p99_ms": 4.0,
    }


def test_render_adds_the_fraction_of_each_ceiling() -> None:
    results = {"100 in flight, 1 miner": [run(2000), run(3000), run(4000)]}
    ceiling = {
        "100 in flight, no persistence": [run(10_000)],
        "100 in flight, group-committed SQLite": [run(6_000)],
        "1 in flight, no persistence (unloaded)": [run(500)],
    }
    text = render(results, ceiling)
    assert "| 100 in flight, 1 miner | 3000 (2000-4000) | 100 (100-100) | 50 (50-50) |" in text
    assert "0.30 x “100 in flight, no persistence”" in text
    assert "0.50 x “100 in flight, group-committed SQLite”" in text
    assert "unloaded”" not in text
    assert "fraction" not in render(results, None)
