"""Scheduler cost with many constraint or capability classes (pure scheduler, no I/O).

Jobs that carry their own budget (``max_price``) make a constraint class each, and miners
that advertise their own ``price`` make a capability class each. This times a completion plus
the next assignment with 50,000 such jobs queued (also with 50,000 classes no miner can take
queued ahead of them, and with one job the miner refused at the front of one class), and a
submit plus completion with 10,000 such miners idle.

    python -m bench.classes
"""

from __future__ import annotations

import argparse
import gc
import time
from typing import TYPE_CHECKING

from dispatcher.core import JobSpec, Scheduler

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["main"]

NOW = 1000.0


def _connect(s: Scheduler, miner_id: str, gpu: str, price: float) -> None:
    caps = {"gpus": [{"name": gpu}], "price": price}
    s.connect(miner_id, f"s-{miner_id}", capabilities=caps, concurrency=1, region=None,
              resume_session=None, now=NOW)  # fmt: skip


def _submit(s: Scheduler, job_id: str, gpu: str, max_price: float) -> str | None:
    spec = JobSpec(
        job_id=job_id, client_id="c", payload={}, constraints={"gpu": gpu, "max_price": max_price}
    )
    job, _ = s.submit(spec, NOW)
    return job.miner_id


def _settle() -> None:
    """As the server does after start-up (web/gctune.py): set-up objects leave the collector's
    view, so its passes don't land in the timed part."""
    gc.collect()
    gc.freeze()


def queued(
    jobs: int, picks: int, *, distinct: bool, unservable: int = 0, refuse: bool = False
) -> float:
    """µs per completion + next assignment, one miner, ``jobs`` queued (``refuse``: the miner
    first refuses the oldest job, which stays at the front of the queue)."""
    s = Scheduler()
    for i in range(unservable):
        _submit(s, f"u{i}", "H100", 0.02 + i * 1e-7)
    for i in range(jobs):
        _submit(s, f"j{i}", "A100", 0.02 + i * 1e-7 if distinct else 0.05)
    _connect(s, "m1", "A100", 0.01)
    if refuse:
        s.reject("m1", next(iter(s.miners["m1"].jobs)), "refused", NOW)
    _settle()
    started = time.perf_counter()
    for _ in range(picks):
        job_id = next(iter(s.miners["m1"].jobs))
        s.accept("m1", job_id, NOW)
        s.complete("m1", job_id, {}, {}, NOW)
    return (time.perf_counter() - started) / picks * 1e6


def idle(miners: int, jobs: int, *, distinct: bool) -> float:
    """µs per submit + completion, ``miners`` idle."""
    s = Scheduler()
    for i in range(miners):
        _connect(s, f"m{i}", "A100", 0.01 + i * 1e-7 if distinct else 0.01)
    _settle()
    started = time.perf_counter()
    for i in range(jobs):
        miner_id = _submit(s, f"j{i}", "A100", 0.05)
        assert miner_id is not None
        s.accept(miner_id, f"j{i}", NOW)
        s.complete(miner_id, f"j{i}", {}, {}, NOW)
    return (time.perf_counter() - started) / jobs * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=50_000)
    p.add_argument("--miners", type=int, default=10_000)
    p.add_argument("--picks", type=int, default=2_000)
    a = p.parse_args()
    rows: list[tuple[str, Callable[[], float]]] = [
        (f"{a.jobs} queued, one class", lambda: queued(a.jobs, a.picks, distinct=False)),
        (f"{a.jobs} queued, a class per job", lambda: queued(a.jobs, a.picks, distinct=True)),
        (
            f"{a.jobs} queued, a class per job, {a.jobs} unservable classes ahead",
            lambda: queued(a.jobs, a.picks, distinct=True, unservable=a.jobs),
        ),
        (
            f"{a.jobs} queued, one class, the oldest refused by the miner",
            lambda: queued(a.jobs, a.picks, distinct=False, refuse=True),
        ),
        (f"{a.miners} idle miners, one class", lambda: idle(a.miners, a.picks, distinct=False)),
        (f"{a.miners} idle miners, a class each", lambda: idle(a.miners, a.picks, distinct=True)),
    ]
    for name, run in rows:
        unit = "complete + next assign" if "queued" in name else "submit + complete"
        print(f"{name}: {run():.1f} µs per {unit}")


if __name__ == "__main__":
    main()
