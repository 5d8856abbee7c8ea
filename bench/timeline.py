"""An instrumented coordinator: where an unloaded job's submit→assign time goes, inside the server.

Run a benchmark through it (``BENCH_SERVER_SCRIPT``, see bench/harness.py), one job at a time:

    BENCH_TIMELINE_OUT=/tmp/timeline.txt BENCH_SERVER_SCRIPT=bench/timeline.py \\
        python -m bench.dispatch --runs 1 --only "1 in flight, 1 miner" --jobs 5000 \\
        --results /tmp/try

It starts the real coordinator with a few methods wrapped to note, for every job, how many
microseconds after its ``job.submit`` frame arrived each step was reached: the frame handed to
the connection, decoded, the scheduler's submit, the commit's start and end, the batch's
perform, the assign written to the miner's transport and written to the socket, the client's
frames written to the socket. At exit it writes the median of each over all jobs but the first
tenth (warm-up) to ``BENCH_TIMELINE_OUT`` (default: standard error, i.e. the coordinator log).

Only meaningful with one job in flight: a submit frame starts the next job's timeline. The
wrappers cost a few microseconds each, so the figures are a shape, not a measurement to quote.
"""

from __future__ import annotations

import atexit
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import dispatcher.core as core_module
import dispatcher.runtime as runtime_module
import storage.sql as sql_module
import web.connection as connection_module
import web.transport as transport_module

STEPS = [
    "frame handed to the connection",
    "frame decoded",
    "scheduler submit start",
    "scheduler submit end",
    "submit handled",
    "commit start",
    "commit end",
    "batch perform start",
    "assign written to the miner's transport",
    "assign written to the socket",
    "batch perform end",
    "client frames written to the socket",
]

_now = time.perf_counter_ns
_current: dict[str, int] = {}
_jobs: list[dict[str, int]] = []


def _mark(step: str) -> None:
    if "t0" in _current and step not in _current:
        _current[step] = _now() - _current["t0"]


def _wrap(cls: Any, name: str, before: str | None = None, after: str | None = None) -> None:
    original = getattr(cls, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if before:
            _mark(before)
        result = original(*args, **kwargs)
        if after:
            _mark(after)
        return result

    setattr(cls, name, wrapper)


def _install() -> None:
    ws = transport_module.CoalescingWSProtocol
    data_received = ws.data_received

    def on_data(self: Any, data: bytes) -> None:
        if b'"job.submit"' in data:  # client frames are masked with the zero key: plain text
            if _current:
                _jobs.append(dict(_current))
            _current.clear()
            _current["t0"] = _now()
        data_received(self, data)

    ws.data_received = on_data  # type: ignore[method-assign]
    _wrap(connection_module.Connection, "_on_text", before=STEPS[0])
    _wrap(connection_module.Connection, "_handle_now", before=STEPS[1])
    _wrap(core_module.Scheduler, "submit", before=STEPS[2], after=STEPS[3])
    _wrap(runtime_module.Dispatcher, "submit_now", after=STEPS[4])
    _wrap(runtime_module.Dispatcher, "_perform", before=STEPS[7], after=STEPS[10])
    commit = sql_module.DatabasesJobStore.commit

    async def timed_commit(self: Any, batch: Any) -> None:
        _mark(STEPS[5])
        await commit(self, batch)
        _mark(STEPS[6])

    sql_module.DatabasesJobStore.commit = timed_commit  # type: ignore[method-assign]
    coalescing = transport_module.CoalescingTransport
    write, flush = coalescing.write, coalescing.flush

    def on_write(self: Any, data: Any) -> None:
        if b'"job.assign"' in bytes(data):
            _mark(STEPS[8])
            self.bench_assign = True
        write(self, data)

    def on_flush(self: Any) -> None:
        pending = bool(self._buffer)
        flush(self)
        if pending:
            _mark(STEPS[9] if getattr(self, "bench_assign", False) else STEPS[11])
        self.bench_assign = False

    coalescing.write = on_write  # type: ignore[method-assign]
    coalescing.flush = on_flush  # type: ignore[method-assign]


def report() -> str:
    jobs = _jobs[len(_jobs) // 10 :]
    lines = [f"server timeline of {len(jobs)} jobs: median µs after the job.submit frame arrived"]
    for step in STEPS:
        values = [j[step] / 1000 for j in jobs if step in j]
        if values:
            lines.append(f"  {statistics.median(values):8.1f}  {step} (n={len(values)})")
    return "\n".join(lines) + "\n"


def _write_report() -> None:
    out = os.environ.get("BENCH_TIMELINE_OUT")
    if out:
        Path(out).write_text(report())
    else:
        sys.stderr.write(report())


def main() -> None:
    _install()
    atexit.register(_write_report)  # the harness stops the server with SIGTERM: a clean exit
    from web.cli import main as serve

    sys.argv[0] = "aitbc-coordinator"
    serve()


if __name__ == "__main__":
    main()
