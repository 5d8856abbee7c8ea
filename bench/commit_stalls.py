"""An instrumented coordinator that reports how long commits waited and checkpoints ran (run a
benchmark through it with ``BENCH_SERVER_SCRIPT``, see bench/harness.py):

    STALLS_OUT=/tmp/stalls.txt BENCH_SERVER_SCRIPT=bench/commit_stalls.py \\
        python -m bench.tail --jobs 8000

At exit (the harness stops the server with SIGTERM) it writes, to ``STALLS_OUT`` or stderr:
the commits that waited for a checkpoint round holding the writer (a WAL restart), the other
commits over 5 ms, and the checkpoint rounds' count and longest run, in milliseconds. A commit
is timed from ``DatabasesJobStore.commit`` being called to its return, so a wait for a held
round counts, and so does time the event-loop thread spent blocked in the kernel.
"""

from __future__ import annotations

import runpy
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.exit_report import write_at_exit  # noqa: E402
from storage.sql import DatabasesJobStore  # noqa: E402

SLOW_MS = 5.0
held_waits: list[float] = []  # ms, commits that found a round holding the writer
slow_commits: list[float] = []  # ms, other commits over SLOW_MS
rounds: list[float] = []  # ms, every checkpoint


def patch() -> None:
    commit, checkpoint = DatabasesJobStore.commit, DatabasesJobStore._checkpoint

    async def timed_commit(self: DatabasesJobStore, batch: Any) -> None:
        held = self._held is not None
        started = time.perf_counter()
        await commit(self, batch)
        ms = (time.perf_counter() - started) * 1000
        if held:
            held_waits.append(ms)
        elif ms > SLOW_MS:
            slow_commits.append(ms)

    async def timed_checkpoint(self: DatabasesJobStore, raw: Any) -> tuple[int, int, int]:
        started = time.perf_counter()
        try:
            return await checkpoint(self, raw)
        finally:
            rounds.append((time.perf_counter() - started) * 1000)

    DatabasesJobStore.commit = timed_commit  # type: ignore[method-assign]
    DatabasesJobStore._checkpoint = timed_checkpoint  # type: ignore[method-assign]


def report() -> str:
    def listed(values: list[float]) -> str:
        return " ".join(f"{v:.1f}" for v in values) or "none"

    return (
        f"commits that waited for a held checkpoint round (ms): {listed(held_waits)}\n"
        f"other commits over {SLOW_MS:g} ms (ms): {listed(sorted(slow_commits, reverse=True))}\n"
        f"checkpoint rounds: {len(rounds)}, longest {max(rounds, default=0.0):.1f} ms\n"
    )


if __name__ == "__main__":
    patch()
    write_at_exit(report, "STALLS_OUT")
    sys.argv[0] = "web.cli"
    runpy.run_module("web.cli", run_name="__main__")
