"""An instrumented coordinator: where an unloaded job's time goes, step by step, inside the server.

Run a benchmark through it (``BENCH_SERVER_SCRIPT``, see bench/harness.py), one job at a time:

    BENCH_TIMELINE_OUT=/tmp/timeline.txt BENCH_SERVER_SCRIPT=bench/timeline.py \\
        python -m bench.dispatch --runs 1 --only "1 in flight, 1 miner" --jobs 5000 \\
        --results /tmp/try

    BENCH_TIMELINE=rest BENCH_TIMELINE_OUT=/tmp/timeline.txt \\
        BENCH_SERVER_SCRIPT=bench/timeline.py \\
        python -m bench.rest --runs 1 --only pickup --results /tmp/try

It starts the real coordinator with a few methods wrapped to note, for every job, how many
microseconds after the submit arrived (a ``job.submit`` frame; with ``BENCH_TIMELINE=rest``, a
``POST /v1/jobs`` request) each step was reached: decoding, the scheduler, the commit, the
batch's perform, the assign (or the long-poll's answer) written to the socket, the client's
frames (or the 201) written. At exit it writes the median of each over all jobs but the first
tenth (warm-up) to ``BENCH_TIMELINE_OUT`` (default: standard error, i.e. the coordinator log),
then each step's median gap from the one before over all jobs and over the slowest 2%: whether
the tail comes from one step or from all of them.

Only meaningful with one job in flight: a submit starts the next job's timeline. The wrappers
cost a few microseconds each, so the figures are a shape, not a measurement to quote.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import TYPE_CHECKING, Any

import dispatcher.core as core_module
import dispatcher.runtime as runtime_module
import storage.sql as sql_module
import web.connection as connection_module
import web.http as http_module
import web.http_protocol as http_protocol_module
import web.transport as transport_module
from bench.exit_report import write_at_exit

if TYPE_CHECKING:
    from collections.abc import Callable

SOCKET_STEPS = [
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
REST_STEPS = [
    "credentials checked",
    "body read",
    "body validated",
    "scheduler submit start",
    "scheduler submit end",
    "submit handled",
    "commit start",
    "commit end",
    "batch perform start",
    "job handed to the waiting poll",
    "batch perform end",
    "poll answer written to the socket",
    "201 written to the socket",
]
REST = os.environ.get("BENCH_TIMELINE") == "rest"
STEPS = REST_STEPS if REST else SOCKET_STEPS

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


def _wrap_async(cls: Any, name: str, before: str | None = None, after: str | None = None) -> None:
    original = getattr(cls, name)

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        if before:
            _mark(before)
        result = await original(*args, **kwargs)
        if after:
            _mark(after)
        return result

    setattr(cls, name, wrapper)


def _start_jobs_on(protocol: Any, is_submit: Callable[[bytes], bool]) -> None:
    """A read of ``protocol`` that ``is_submit`` starts the next job's timeline."""
    data_received = protocol.data_received

    def on_data(self: Any, data: bytes) -> None:
        if is_submit(data):
            if _current:
                _jobs.append(dict(_current))
            _current.clear()
            _current["t0"] = _now()
        data_received(self, data)

    protocol.data_received = on_data


def _install_socket() -> None:
    # Client frames are masked with the zero key: their text is plain in the read.
    _start_jobs_on(transport_module.CoalescingWSProtocol, lambda data: b'"job.submit"' in data)
    _wrap(connection_module.Connection, "_on_text", before=STEPS[0])
    _wrap(connection_module.Connection, "_handle_now", before=STEPS[1])
    _wrap(core_module.Scheduler, "submit", before=STEPS[2], after=STEPS[3])
    _wrap(runtime_module.Dispatcher, "submit_now", after=STEPS[4])
    _wrap(runtime_module.Dispatcher, "_perform", before=STEPS[7], after=STEPS[10])
    _wrap_async(sql_module.DatabasesJobStore, "commit", before=STEPS[5], after=STEPS[6])
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


def _install_rest() -> None:
    _start_jobs_on(  # the lean protocol inherits it
        http_protocol_module.CoalescingHttpProtocol,
        lambda data: data.startswith(b"POST /v1/jobs "),
    )
    # The endpoint wrapper looks these up in its module at every request.
    _wrap(http_module, "_authorize", after=STEPS[0])
    _wrap_async(http_module, "_read_body", after=STEPS[1])
    _wrap(http_module, "validate", after=STEPS[2])
    _wrap(core_module.Scheduler, "submit", before=STEPS[3], after=STEPS[4])
    _wrap(runtime_module.Dispatcher, "submit_now", after=STEPS[5])
    _wrap_async(sql_module.DatabasesJobStore, "commit", before=STEPS[6], after=STEPS[7])
    _wrap(runtime_module.Dispatcher, "_perform", before=STEPS[8], after=STEPS[10])
    _wrap(runtime_module._RestSink, "assign", before=STEPS[9])
    coalescing = transport_module.CoalescingTransport
    flush, write_now = coalescing.flush, coalescing.write_now

    def answered(head: bytes) -> None:
        if head.startswith(b"HTTP/1.1 200") and "batch perform start" in _current:
            _mark(STEPS[11])
        elif head.startswith(b"HTTP/1.1 201"):
            _mark(STEPS[12])

    def on_flush(self: Any) -> None:  # the layered protocol's responses
        head = bytes(self._buffer[0][:40]) if self._buffer else b""
        flush(self)
        answered(head)

    def on_write_now(self: Any, data: bytes) -> None:  # the lean protocol's
        direct = not self._buffer  # else write_now flushes, and on_flush marks
        write_now(self, data)
        if direct:
            answered(data[:40])

    coalescing.flush = on_flush  # type: ignore[method-assign]
    coalescing.write_now = on_write_now  # type: ignore[method-assign]


def report() -> str:
    jobs = _jobs[len(_jobs) // 10 :]
    what = "POST /v1/jobs" if REST else "the job.submit frame"
    lines = [f"server timeline of {len(jobs)} jobs: median µs after {what} arrived"]
    for step in STEPS:
        values = [j[step] / 1000 for j in jobs if step in j]
        if values:
            lines.append(f"  {statistics.median(values):8.1f}  {step} (n={len(values)})")
    return "\n".join(lines + _tail(jobs)) + "\n"


def _tail(jobs: list[dict[str, int]]) -> list[str]:
    """Where the slowest 2% of jobs lost their time: each step's median gap from the step
    before it (steps in the order of their medians), over all jobs and over the jobs whose
    work reached the miner last (the assign or the long-poll's answer written)."""
    last = "poll answer written to the socket" if REST else "assign written to the socket"
    if not jobs or not all(last in j for j in jobs):
        return []
    steps = sorted(
        (s for s in STEPS if all(s in j for j in jobs)),
        key=lambda s: statistics.median(j[s] for j in jobs),
    )
    ranked = sorted(jobs, key=lambda j: j[last])
    slow = ranked[-max(1, len(ranked) // 50) :]

    def gaps(group: list[dict[str, int]]) -> list[float]:
        return [
            statistics.median(j[s] - (j[steps[i - 1]] if i else 0) for j in group) / 1000
            for i, s in enumerate(steps)
        ]

    lines = [f"step gaps (median µs): all jobs | slowest {len(slow)} by '{last}'"]
    for step, a, b in zip(steps, gaps(jobs), gaps(slow), strict=True):
        lines.append(f"  {a:8.1f} | {b:8.1f}  {step}")
    return lines


def main() -> None:
    if REST:
        _install_rest()
    else:
        _install_socket()
    write_at_exit(report, "BENCH_TIMELINE_OUT")
    from web.cli import main as serve

    sys.argv[0] = "aitbc-coordinator"
    serve()


if __name__ == "__main__":
    main()
