"""What ``JOB_RETENTION_DAYS`` costs the writer: one page of deletions in one commit.

Stores ``--jobs`` completed jobs through the SQLite store's own commits (each job with
``--events`` events, a result and a receipt), then deletes them as the retention walk does
(``dispatcher/retention.py``): read a page of ``RETENTION_PAGE`` jobs with ``jobs_after``,
commit their deletion as one batch. Prints the commit's duration per page (the time the
dispatcher's next batch could wait behind it) and the rate.

    python -m bench.retention --jobs 20000

Not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import anyio

from dispatcher.runtime import RETENTION_PAGE
from protocol.records import EventRecord, JobRecord
from storage.base import ReceiptRow, WriteBatch
from storage.sql import DatabasesJobStore

T0 = 1.7e9
STORE_BATCH = 500


def _job(n: int, events: int) -> tuple[JobRecord, list[EventRecord], ReceiptRow]:
    job_id = f"job-{n:08d}"
    receipt = {"receipt_id": f"r-{n}", "job_id": job_id, "signature": {"sig": "x" * 86}}
    job = JobRecord(
        job_id=job_id,
        client_id=f"client-{n % 50}",
        state="COMPLETED",
        payload={"type": "inference", "prompt": "p" * 200},
        constraints={},
        priority=0,
        requested_at=T0 + n,
        expires_at=T0 + n + 900,
        attempt=1,
        failures=0,
        max_attempts=3,
        seq=events,
        miner_id="gpu-1",
        finished_at=T0 + n + 1,
        result={"output": "o" * 200},
        receipt=receipt,
    )
    kinds = ["queued", "assigned", "started", *["progress"] * (events - 4), "completed"]
    log = [
        EventRecord(job_id=job_id, seq=i + 1, event=k, state="RUNNING", at=T0 + n, attempt=1)
        for i, k in enumerate(kinds)
    ]
    row = ReceiptRow(
        receipt_id=f"r-{n}",
        job_id=job_id,
        miner_id="gpu-1",
        issued_at=T0 + n + 1,
        receipt=receipt,
        chain_seq=n + 1,
    )
    return job, log, row


async def run(jobs: int, events: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = DatabasesJobStore(f"sqlite:///{Path(tmp) / 'retention.db'}")
        await store.open()
        try:
            for start in range(0, jobs, STORE_BATCH):
                batch = WriteBatch()
                for n in range(start, min(jobs, start + STORE_BATCH)):
                    job, log, row = _job(n, events)
                    batch.jobs[job.job_id] = job
                    batch.events.extend(log)
                    batch.receipts.append(row)
                await store.commit(batch)
            pages: list[float] = []
            began, after = time.perf_counter(), 0
            while page := await store.jobs_after(after, RETENTION_PAGE):
                t = time.perf_counter()
                await store.commit(WriteBatch(pruned=[j.job_id for j in page]))
                pages.append((time.perf_counter() - t) * 1000)
                after = page[-1].rowid
            took = time.perf_counter() - began
        finally:
            await store.close()
    print(
        f"{jobs} jobs of {events} events in pages of {RETENTION_PAGE}: commit per page "
        f"p50 {statistics.median(pages):.1f} ms, max {max(pages):.1f} ms; "
        f"{jobs / took:,.0f} jobs/s deleted (reads included)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=20000)
    p.add_argument("--events", type=int, default=6, help="events per job (at least 4)")
    args = p.parse_args()
    anyio.run(run, args.jobs, max(4, args.events), backend_options={"use_uvloop": True})


if __name__ == "__main__":
    main()
