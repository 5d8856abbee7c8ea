"""The SQLite store at scale: a schema upgrade and the newest-first lists on a large database.

Builds a database of ``--jobs`` completed jobs, each with a signed-receipt-sized receipt
(``--receipt-bytes``), written straight through SQL at schema version ``--from-version``
(default: the one before the newest), then times what a large installation notices:

- the first start after the upgrade (``DatabasesJobStore.open()`` applies the missing
  migrations; the coordinator opens its port only after it) and the file's size before and
  after;
- a page of 100 jobs newest first: all jobs (``/v1/admin/jobs``), one state, one client
  (``/v1/jobs``); a job's receipts; a page of 50 receipts (``/v1/explorer/receipts``). Each
  the best of five, on a warm cache.

    python -m bench.store_scale --jobs 1000000

Not part of ``make bench`` (about a minute per million jobs, most of it building the file).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import anyio

from storage.base import JobQuery
from storage.schema import MIGRATIONS
from storage.sql import DatabasesJobStore

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

CLIENTS = 50
T0 = 1.7e9


class _Page(TypedDict):
    """The paging fields of a ``JobQuery``, shared by the list cases."""

    limit: int
    offset: int
    with_total: bool


def build(path: Path, jobs: int, version: int, receipt_bytes: int) -> None:
    """``jobs`` completed jobs and their receipts at schema ``version`` (chain_seq 1..jobs)."""
    with closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for v, statements in MIGRATIONS:
            if v > version:
                break
            for sql in statements:
                db.execute(sql)
            db.execute("INSERT INTO schema_version (version) VALUES (?)", (v,))
        db.executemany(
            "INSERT INTO jobs (job_id, client_id, state, payload, constraints, priority, "
            "requested_at, expires_at, attempt, failures, max_attempts, seq, miner_id) "
            "VALUES (printf('%032x', ?), 'client-' || (? % ?), 'COMPLETED', "
            """'{"type":"bench"}', '{"gpu":"A100"}', 0, ?, ?, 1, 0, 3, 4, 'gpu-1')""",
            ((i, i, CLIENTS, T0 + i / 1000, T0 + 900) for i in range(jobs)),
        )
        if version >= 5:  # jobs name their receipts
            db.execute("UPDATE jobs SET receipt_id = 'r' || substr(job_id, 2)")
        db.executemany(
            "INSERT INTO receipts (receipt_id, job_id, miner_id, issued_at, receipt, chain_seq) "
            "VALUES ('r' || substr(printf('%032x', ?), 2), printf('%032x', ?), 'gpu-1', ?, ?, ?)",
            (
                (i, i, T0 + i / 1000, json.dumps({"n": i, "pad": "x" * receipt_bytes}), i + 1)
                for i in range(jobs)
            ),
        )
        db.commit()


async def best_ms(call: Callable[[], Awaitable[Any]], times: int = 5) -> float:
    best = float("inf")
    for _ in range(times):
        start = time.perf_counter()
        await call()
        best = min(best, time.perf_counter() - start)
    return best * 1000


async def measure(path: Path, jobs: int) -> None:
    store = DatabasesJobStore(f"sqlite:///{path}")
    start = time.perf_counter()
    await store.open()
    print(f"first start (migrations): {time.perf_counter() - start:.1f} s")
    try:
        page: _Page = {"limit": 100, "offset": 0, "with_total": False}
        cases: dict[str, Callable[[], Awaitable[Any]]] = {
            "100 newest jobs": lambda: store.list_jobs(JobQuery(**page)),
            "100 newest COMPLETED jobs": lambda: store.list_jobs(
                JobQuery(state="COMPLETED", **page)
            ),
            "a client's 100 newest jobs": lambda: store.list_jobs(
                JobQuery(client_id="client-7", **page)
            ),
            "a job's receipts": lambda: store.receipts_for(f"{jobs // 2:032x}"),
            "50 newest receipts": lambda: store.list_receipts(None, 50, 0),
        }
        for name, call in cases.items():
            print(f"{name}: {await best_ms(call):.2f} ms")
    finally:
        await store.close()


def main() -> None:
    newest = MIGRATIONS[-1][0]
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--from-version", type=int, default=newest - 1)
    parser.add_argument("--receipt-bytes", type=int, default=700)
    args = parser.parse_args()
    if not 2 <= args.from_version <= newest:  # receipts have a chain_seq from version 2
        parser.error(f"--from-version must be 2..{newest}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scale.db"
        start = time.perf_counter()
        build(path, args.jobs, args.from_version, args.receipt_bytes)
        print(
            f"built {args.jobs:,} completed jobs at schema version {args.from_version} "
            f"in {time.perf_counter() - start:.0f} s"
        )
        size = path.stat().st_size
        anyio.run(measure, path, args.jobs)
        print(f"file: {size / 1e6:.0f} MB before, {path.stat().st_size / 1e6:.0f} MB after")


if __name__ == "__main__":
    main()
