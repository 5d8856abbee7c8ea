"""In-process cost of a job through the dispatcher alone: no sockets, no HTTP.

Builds the real ``Coordinator`` (scheduler, runtime, SQLite store with group commit, receipt
signer, ops feed, tallies) on a fresh database, connects one fake miner, keeps ``--inflight``
jobs submitted and has the miner accept and return a result as soon as each is pushed (through
the same ``Dispatcher`` calls the socket endpoints make). Prints the process CPU time per job.

CPU time on a shared machine is noisy; for A/B comparisons of the dispatcher's logic count
instructions instead (deterministic for the same code and inputs), e.g.:

    valgrind --tool=callgrind --callgrind-out-file=/dev/null python -m bench.inproc --jobs 500
    valgrind --tool=callgrind --callgrind-out-file=/dev/null python -m bench.inproc --jobs 2500

and take (Ir(2500) - Ir(500)) / 2000 as the instructions per job (start-up cancels out).
Instructions do not count the kernel's side of system calls (WAL writes).

``--breakdown`` also times, per job, the two parts a faster interpreter would not make
cheaper: the group commits (the store's ``commit``: SQLite and the rows it is given) and the
Ed25519 signatures of the receipts; the rest is the dispatcher's Python (scheduler, runtime,
fan-out, receipts' other work, the fake miner's decoding).

It also prints the database pages the commits wrote per job: the WAL's growth over the run
(nothing checkpoints it here), a count that does not depend on the machine. Compare it at
``--inflight 1``, where every commit stands alone, as when the server is unloaded.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import anyio
import anyio.lowlevel

from dispatcher.clock import SystemClock
from dispatcher.core import JobSpec
from dispatcher.fanout import Outbox, Subscriber
from dispatcher.ids import new_id
from protocol.codec import decode_server_to_miner
from protocol.messages import JobAssign
from storage.sql import DatabasesJobStore
from web.app import Coordinator
from web.gctune import tune_gc
from web.settings import Settings

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine

    from protocol.records import JobRecord

__all__ = ["main", "run"]

PAYLOAD = {"model": "bench", "prompt": "hello"}
T = TypeVar("T")
P = ParamSpec("P")


class _Sink:
    """The fake miner's socket: frames pushed to it, read by the driving loop."""

    def __init__(self) -> None:
        self.frames: list[str] = []

    def send_frame(self, frame: str) -> None:
        self.frames.append(frame)

    def flush(self) -> None:
        pass

    def close(self, code: Any, reason: str) -> None:
        pass


class _Timed:
    """Wall-clock seconds spent in the wrapped calls (the process is CPU-bound: ~CPU time)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def sync(self, fn: Callable[P, T]) -> Callable[P, T]:
        def timed(*args: P.args, **kwargs: P.kwargs) -> T:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        return timed

    def coro(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        async def timed(*args: P.args, **kwargs: P.kwargs) -> T:
            started = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        return timed


class _TimedKey:
    """The signing key with its ``sign`` timed (the receipt signer's only use of it)."""

    def __init__(self, key: Any, timer: _Timed) -> None:
        self.sign = timer.sync(key.sign)


_WAL_FRAME_HEADER = 24  # bytes before each page in the WAL (sqlite.org/fileformat.html)


def _wal_bytes(folder: Path) -> int:
    return (folder / "inproc.db-wal").stat().st_size


def _page_size(folder: Path) -> int:
    with (folder / "inproc.db-wal").open("rb") as wal:
        return int.from_bytes(wal.read(12)[8:12], "big")  # the WAL header's page size


async def run(
    jobs: int, inflight: int, folder: Path, *, gc_tuned: bool = True, breakdown: bool = False
) -> dict[str, float]:
    """``gc_tuned``: tune the collector as the server does (``web.gctune``; process-wide).
    ``breakdown``: also report the µs per job spent committing and signing."""
    settings = Settings.from_env(
        {
            "DATABASE_URL": f"sqlite:///{folder / 'inproc.db'}",
            "CLIENT_API_KEYS": "c" * 32,
            "MINER_API_KEYS": "m" * 32,
            "ADMIN_API_KEYS": "a" * 32,
            "RECEIPT_SIGNING_KEY_HEX": "42" * 32,
        }
    )
    store = DatabasesJobStore(settings.database_url, synchronous=settings.sqlite_synchronous)
    core = Coordinator(settings, store, SystemClock())
    await store.open()
    await core.restore()
    dispatcher = core.dispatcher
    commits, signs = _Timed(), _Timed()
    if breakdown:
        store.commit = commits.coro(store.commit)  # type: ignore[method-assign]
        core.signer._key = _TimedKey(core.signer._key, signs)  # type: ignore[assignment]
    sink = _Sink()
    delivered: list[object] = []  # what a client socket would be sent (kept, then dropped)
    client = Subscriber("client-1", Outbox(lambda *_: None))

    def deliver(frame: str) -> bool:
        delivered.append(frame)
        return True  # written at once (never queued in the outbox)

    client.outbox.direct = deliver
    sent = completed = 0

    async def submit() -> None:
        nonlocal sent
        sent += 1
        spec = JobSpec(job_id=new_id(), client_id="client-1", payload=PAYLOAD, constraints={})

        def committed(rec: JobRecord, existed: bool) -> None:
            dispatcher.fanout.subscribe(client, [rec.job_id])
            delivered.append(core.job_view(rec))

        await dispatcher.submit(spec, committed)

    async with anyio.create_task_group() as tg:
        await tg.start(dispatcher.serve)
        dispatcher.miner_hello(
            miner_id="m1",
            key_hash="k",
            session_id="s1",
            sink=sink,
            capabilities={"gpus": [{"name": "A100"}]},
            concurrency=inflight,
            region=None,
            resume_session=None,
            then=lambda _: None,
        )
        await dispatcher.wait_flushed()
        if gc_tuned:
            tune_gc()
        commits.seconds = signs.seconds = 0.0
        wal_before = _wal_bytes(folder)
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(inflight):
            await submit()
        while completed < jobs:
            await anyio.lowlevel.checkpoint()
            frames, sink.frames = sink.frames, []
            for frame in frames:
                msg = decode_server_to_miner(frame)
                if isinstance(msg, JobAssign):
                    dispatcher.miner_call("accept", "m1", msg.job_id, attempt=msg.attempt)
                    dispatcher.miner_result(
                        "m1", msg.job_id, {"ok": True}, {}, msg.attempt, delivered.append
                    )
                    completed += 1
                    if sent < jobs:
                        await submit()
            delivered.clear()
        await dispatcher.wait_flushed()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        pages = (_wal_bytes(folder) - wal_before) / (_WAL_FRAME_HEADER + _page_size(folder))
        dispatcher.stop()
    await store.close()
    out = {
        "jobs": jobs,
        "cpu_us_per_job": 1e6 * cpu / jobs,
        "jobs_per_s": jobs / wall,
        "wal_pages_per_job": pages / jobs,
    }
    if breakdown:
        out["commit_us_per_job"] = 1e6 * commits.seconds / jobs
        out["sign_us_per_job"] = 1e6 * signs.seconds / jobs
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--inflight", type=int, default=100)
    parser.add_argument("--breakdown", action="store_true", help="time commits and signing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aitbc-inproc-") as folder:
        out = anyio.run(
            partial(run, args.jobs, args.inflight, Path(folder), breakdown=args.breakdown),
            backend_options={"use_uvloop": True},
        )
    print(
        f"{out['jobs']} jobs: {out['cpu_us_per_job']:.1f} us CPU/job, "
        f"{out['jobs_per_s']:.0f} jobs/s (in process, {args.inflight} in flight), "
        f"{out['wal_pages_per_job']:.2f} WAL pages written per job"
    )
    if args.breakdown:
        commit, sign = out["commit_us_per_job"], out["sign_us_per_job"]
        print(
            f"  per job: commit {commit:.1f} us, Ed25519 signing {sign:.1f} us, "
            f"the rest {out['cpu_us_per_job'] - commit - sign:.1f} us"
        )


if __name__ == "__main__":
    main()
