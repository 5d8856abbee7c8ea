"""``InMemoryJobStore``: the reference implementation of ``JobStore`` for pure tests.

Never a product mode: nothing survives the process.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from storage.errors import Conflict, StorageError

if TYPE_CHECKING:
    from protocol.records import EventRecord, JobRecord, MinerRecord
    from protocol.types import JSONObject
    from storage.base import JobQuery, WriteBatch

__all__ = ["InMemoryJobStore"]


class InMemoryJobStore:
    def __init__(self) -> None:
        self.jobs: dict[str, JobRecord] = {}
        self.events: dict[str, list[EventRecord]] = {}
        self.miners: dict[str, MinerRecord] = {}
        self.receipts: dict[str, tuple[str, float, JSONObject]] = {}
        self.chain: dict[int, JSONObject] = {}  # chain_seq -> receipt
        self._idem: dict[tuple[str, str], str] = {}  # (client_id, idempotency_key) -> job_id
        self.commits = 0
        self.is_open = False

    async def open(self) -> None:
        self.is_open = True

    async def maintain(self) -> None:
        """Nothing to maintain in memory; returns at once."""

    async def close(self) -> None:
        self.is_open = False

    def _check_open(self) -> None:
        if not self.is_open:
            raise StorageError("store is closed")

    async def commit(self, batch: WriteBatch) -> None:
        self._check_open()
        seen: set[tuple[str, int]] = set()
        for e in batch.events:  # validate first: a batch is all or nothing
            have = self.events.get(e.job_id, [])
            if (e.job_id, e.seq) in seen or any(x.seq == e.seq for x in have):
                raise Conflict(f"event {e.job_id}#{e.seq} exists")
            seen.add((e.job_id, e.seq))
        self._check_chain(batch)
        keys: dict[tuple[str, str], str] = {}
        for job in batch.jobs.values():
            if job.idempotency_key is not None:
                key = (job.client_id, job.idempotency_key)
                owner = self._idem.get(key) or keys.setdefault(key, job.job_id)
                if owner != job.job_id:
                    raise Conflict(f"idempotency key {job.idempotency_key!r} is taken")
        self._idem.update(keys)
        for job in batch.jobs.values():
            old = self.jobs.get(job.job_id)
            if old is not None:
                job = job._replace(payload=old.payload, constraints=old.constraints)
            self.jobs[job.job_id] = job
        for e in batch.events:
            self.events.setdefault(e.job_id, []).append(e)
        for m in batch.miners.values():
            old_m = self.miners.get(m.miner_id)
            self.miners[m.miner_id] = m if old_m is None else replace(m, key_hash=old_m.key_hash)
        self._write_receipts(batch)
        self.commits += 1

    def _check_chain(self, batch: WriteBatch) -> None:
        """A new receipt may not take a ``chain_seq`` another receipt holds (in store or batch)."""
        in_batch: dict[int, str] = {}
        for r in batch.receipts:
            if r.chain_seq is None or r.receipt_id in self.receipts:
                continue
            holder = self.chain.get(r.chain_seq)
            owner = (
                holder.get("receipt_id")
                if holder is not None
                else in_batch.setdefault(r.chain_seq, r.receipt_id)
            )
            if owner != r.receipt_id:
                raise Conflict(f"receipt chain_seq {r.chain_seq} exists")

    def _write_receipts(self, batch: WriteBatch) -> None:
        for r in batch.receipts:
            if r.receipt_id in self.receipts:
                continue  # a receipt id written again keeps the first receipt
            self.receipts[r.receipt_id] = (r.job_id, r.issued_at, r.receipt)
            if r.chain_seq is not None:
                self.chain[r.chain_seq] = r.receipt

    async def load_active(self) -> tuple[list[JobRecord], list[MinerRecord]]:
        self._check_open()
        active = [j for j in self.jobs.values() if j.state in ("QUEUED", "RUNNING")]
        return active, list(self.miners.values())

    async def get_job(self, job_id: str) -> JobRecord | None:
        self._check_open()
        return self.jobs.get(job_id)

    async def find_job(self, client_id: str, idempotency_key: str) -> JobRecord | None:
        self._check_open()
        for job in self.jobs.values():
            if job.client_id == client_id and job.idempotency_key == idempotency_key:
                return job
        return None

    async def events_after(self, job_id: str, after: int, limit: int = 10_000) -> list[EventRecord]:
        self._check_open()
        events = sorted(self.events.get(job_id, []), key=lambda e: e.seq)
        return [e for e in events if e.seq > after][:limit]

    async def receipts_for(self, job_id: str) -> list[JSONObject]:
        self._check_open()
        rows = [(t, r) for j, t, r in self.receipts.values() if j == job_id]
        return [r for _, r in sorted(rows, key=lambda row: row[0])]

    async def list_jobs(self, query: JobQuery) -> tuple[list[JobRecord], int]:
        self._check_open()
        found = [
            j
            for j in self.jobs.values()
            if (query.client_id is None or j.client_id == query.client_id)
            and (query.state is None or j.state == query.state)
            and (query.job_type is None or j.payload.get("type") == query.job_type)
        ]
        found.sort(key=lambda j: (j.requested_at, j.job_id), reverse=True)
        return found[query.offset : query.offset + query.limit], len(found)

    async def count_jobs(self) -> dict[str, int]:
        self._check_open()
        counts: dict[str, int] = {}
        for j in self.jobs.values():
            counts[j.state] = counts.get(j.state, 0) + 1
        return counts

    async def list_receipts(self, job_id: str | None, limit: int, offset: int) -> list[JSONObject]:
        self._check_open()
        rows = [
            (t, rid, r) for rid, (j, t, r) in self.receipts.items() if job_id is None or j == job_id
        ]
        rows.sort(key=lambda row: (-row[0], row[1]))
        return [r for _, _, r in rows[offset : offset + limit]]

    async def receipt_chain_head(self) -> JSONObject | None:
        self._check_open()
        return self.chain[max(self.chain)] if self.chain else None

    async def receipt_chain(self, after: int, limit: int) -> list[tuple[int, JSONObject]]:
        self._check_open()
        return [(n, self.chain[n]) for n in sorted(self.chain) if n > after][:limit]
