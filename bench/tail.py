"""The tail of unloaded dispatch: submit→assign percentiles up to the maximum, and when the
slow jobs happened.

    python -m bench.tail --jobs 8000

runs one job at a time through a fresh coordinator (as ``bench.dispatch --only "1 in flight,
1 miner"``) and prints p50, p99, p99.9 and the maximum, then the jobs at or above p99 as
``second:ms`` (seconds since the first submit): slow jobs that come in bursts at a steady
cadence point at something periodic in the server (checkpoints, the collector), lone ones at
the host. Through ``BENCH_SERVER_SCRIPT=bench/checkpoint_modes.py`` (with ``CKPT_MODE``) the
same run shows what the WAL checkpoints add (docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from bench.dispatch import Trace, run_once
from bench.harness import pct

__all__ = ["main", "run", "slow_jobs"]


def slow_jobs(trace: Trace) -> tuple[list[float], list[tuple[float, float]]]:
    """Every job's submit→assign ms, and (seconds since the first submit, ms) of those at or
    above the p99, in time order."""
    if not trace.sent:
        return [], []
    first = min(trace.sent.values())
    rows = sorted(
        (sent - first, (at - sent) * 1000)
        for job_id, at in trace.assigned.items()
        for sent in [trace.sent[trace.job_of.get(job_id, job_id)]]
    )
    ms = [row[1] for row in rows]
    p99 = pct(ms, 99)
    return ms, [row for row in rows if row[1] >= p99]


async def run(jobs: int) -> dict[str, Any]:
    trace = Trace()
    result = await run_once(jobs=jobs, inflight=1, miners=1, clients=1, trace=trace)
    ms, slow = slow_jobs(trace)
    return {
        "jobs": result["jobs"],
        "server_cpu_us_per_job": result["server_cpu_us_per_job"],
        "p50_ms": pct(ms, 50),
        "p99_ms": pct(ms, 99),
        "p99.9_ms": pct(ms, 99.9),
        "max_ms": max(ms, default=float("nan")),
        "slow": slow,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=8000)
    a = p.parse_args()
    out = asyncio.run(run(a.jobs))
    print(
        f"{out['jobs']} jobs, server {out['server_cpu_us_per_job']:.0f} µs CPU/job; "
        f"submit→assign p50 {out['p50_ms']:.3f} p99 {out['p99_ms']:.3f} "
        f"p99.9 {out['p99.9_ms']:.3f} max {out['max_ms']:.3f} ms"
    )
    print("at or above p99 (s:ms):", " ".join(f"{s:.2f}:{ms:.1f}" for s, ms in out["slow"]))


if __name__ == "__main__":
    main()
