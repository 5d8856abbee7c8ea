"""``InMemoryJobStore``: the reference implementation of ``JobStore`` for pure tests.

Never a product mode: nothing survives the process.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from protocol.amounts import MAX_RECEIPT_UNITS, price_units
from storage.base import (
    RECENT_FIELDS,
    JobAge,
    JobQuery,
    JobSummary,
    MinerEarnings,
    PaymentStats,
    WalletSnapshot,
    chars_page,
    job_chars,
)
from storage.errors import Conflict, StorageError

if TYPE_CHECKING:
    from collections.abc import Collection, Sequence

    from protocol.records import EventRecord, JobRecord, MinerRecord
    from protocol.types import JSONObject
    from storage.base import (
        LedgerEntry,
        NonceRecord,
        PaymentRecord,
        SessionRecord,
        UserRecord,
        WriteBatch,
    )

__all__ = ["InMemoryJobStore"]


class InMemoryJobStore:
    def __init__(self) -> None:
        self.jobs: dict[str, JobRecord] = {}
        self.events: dict[str, list[EventRecord]] = {}
        self.miners: dict[str, MinerRecord] = {}
        self.receipts: dict[str, JSONObject] = {}  # receipt_id -> receipt
        self.chain: dict[int, JSONObject] = {}  # chain_seq -> receipt
        self.issued: dict[str, tuple[str | None, float]] = {}  # receipt_id -> (miner, issued_at)
        self._idem: dict[tuple[str, str], str] = {}  # (client_id, idempotency_key) -> job_id
        self.users: dict[str, UserRecord] = {}
        self.sessions: dict[str, SessionRecord] = {}
        self.nonces: dict[str, NonceRecord] = {}
        self.entries: dict[tuple[str, int], LedgerEntry] = {}
        self.payments: dict[str, PaymentRecord] = {}
        self.commits = 0
        self.is_open = False
        self._places: dict[str, int] = {}  # job id -> its place (rowid), in insertion order

    async def open(self) -> None:
        self.is_open = True

    async def owner_free(self) -> bool:
        return True  # nothing to share: a memory store is its process's own

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
        self._check_wallet(batch)
        self._idem.update(keys)
        for job in batch.jobs.values():
            old = self.jobs.get(job.job_id)
            if old is not None:
                job = job._replace(
                    payload=old.payload, constraints=old.constraints, payment=old.payment
                )
            self.jobs[job.job_id] = job
            self._places.setdefault(job.job_id, len(self._places) + 1)
        for e in batch.events:
            self.events.setdefault(e.job_id, []).append(e)
        for job_id in batch.pruned:
            gone = self.jobs.pop(job_id, None)
            self.events.pop(job_id, None)
            if gone is not None and gone.idempotency_key is not None:
                self._idem.pop((gone.client_id, gone.idempotency_key), None)
        for m in batch.miners.values():
            old_m = self.miners.get(m.miner_id)
            self.miners[m.miner_id] = m if old_m is None else replace(m, key_hash=old_m.key_hash)
        self._write_receipts(batch)
        self._write_wallet(batch)
        self.commits += 1

    def _check_chain(self, batch: WriteBatch) -> None:
        """A new receipt may not take a ``chain_seq`` another receipt holds (in store or batch)."""
        in_batch: dict[int, str] = {}
        for r in batch.receipts:
            if r.receipt_id in self.receipts:
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
            self.receipts[r.receipt_id] = self.chain[r.chain_seq] = r.receipt
            self.issued[r.receipt_id] = (r.miner_id, r.issued_at)

    def _check_wallet(self, batch: WriteBatch) -> None:
        """The SQL store's unique constraints, checked before anything is written."""
        keys = {(e.movement_key, e.leg) for e in batch.entries}
        if len(keys) != len(batch.entries) or keys & self.entries.keys():
            raise Conflict("ledger movement key exists")
        if batch.users:
            self._check_users(batch)
        if batch.payments:
            self._check_outpoints(batch)

    def _check_users(self, batch: WriteBatch) -> None:
        wallets = {u.wallet_address for u in self.users.values()}
        emails = {u.email for u in self.users.values()}
        for u in batch.users:
            if u.user_id in self.users or u.wallet_address in wallets or u.email in emails:
                raise Conflict(f"user {u.user_id} / {u.wallet_address} / {u.email} exists")
            wallets.add(u.wallet_address)
            emails.add(u.email)

    def _check_outpoints(self, batch: WriteBatch) -> None:
        taken = {
            (p.tx_hash, p.tx_vout): p.payment_id
            for p in self.payments.values()
            if p.tx_hash is not None
        }
        for p in batch.payments.values():
            if p.tx_hash is not None:
                owner = taken.setdefault((p.tx_hash, p.tx_vout), p.payment_id)
                if owner != p.payment_id:
                    raise Conflict(f"output {p.tx_hash}:{p.tx_vout} already paid a payment")

    def _write_wallet(self, batch: WriteBatch) -> None:
        for u in batch.users:
            self.users[u.user_id] = u
        for s in batch.sessions.values():
            old_s = self.sessions.get(s.token_hash)
            self.sessions[s.token_hash] = (
                s if old_s is None else replace(old_s, revoked_at=s.revoked_at)
            )
        for address, nonce in batch.nonces.items():
            if nonce is None:
                self.nonces.pop(address, None)
            else:
                self.nonces[address] = nonce
        for p in batch.payments.values():
            old_p = self.payments.get(p.payment_id)
            self.payments[p.payment_id] = (
                p
                if old_p is None
                else replace(
                    old_p,
                    status=p.status,
                    confirmed_at=p.confirmed_at,
                    tx_hash=p.tx_hash,
                    tx_vout=p.tx_vout,
                    confirmations=p.confirmations,
                )
            )
        for e in batch.entries:
            self.entries[e.movement_key, e.leg] = e

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

    async def find_jobs(
        self, keys: Collection[tuple[str, str]]
    ) -> dict[tuple[str, str], JobRecord]:
        self._check_open()
        return {key: self.jobs[self._idem[key]] for key in keys if key in self._idem}

    async def jobs_after(self, rowid: int, limit: int) -> list[JobAge]:
        self._check_open()
        ages = [
            JobAge(
                rowid=self._places[job.job_id],
                job_id=job.job_id,
                state=str(job.state),
                requested_at=job.requested_at,
                finished_at=job.finished_at,
            )
            for job in self.jobs.values()
            if self._places[job.job_id] > rowid
        ]
        return sorted(ages, key=lambda a: a.rowid)[:limit]

    async def events_after(self, job_id: str, after: int, limit: int = 10_000) -> list[EventRecord]:
        self._check_open()
        events = sorted(self.events.get(job_id, []), key=lambda e: e.seq)
        return [e for e in events if e.seq > after][:limit]

    async def receipts_for(self, job_id: str) -> list[JSONObject]:
        self._check_open()
        job = self.jobs.get(job_id)
        receipt_id = None if job is None or job.receipt is None else job.receipt.get("receipt_id")
        return [self.receipts[receipt_id]] if receipt_id in self.receipts else []

    async def list_jobs(self, query: JobQuery) -> tuple[list[JobRecord], int]:
        self._check_open()
        found = [
            j
            for j in self.jobs.values()
            if (query.client_id is None or j.client_id == query.client_id)
            and (query.miner_id is None or j.miner_id == query.miner_id)
            and (query.state is None or j.state == query.state)
            and (query.job_type is None or j.payload.get("type") == query.job_type)
        ]
        found.reverse()  # newest first: insertion order, as the SQL store's rowid
        page = found[query.offset : query.offset + query.limit]
        if query.max_chars is not None:
            page = page[: chars_page([job_chars(j) for j in page], query.max_chars)]
        return page, len(found) if query.with_total else len(page)

    async def job_summaries(self, limit: int) -> list[JobSummary]:
        jobs, _ = await self.list_jobs(JobQuery(limit=limit, offset=0, with_total=False))
        return [
            JobSummary(
                job_id=j.job_id,
                state=j.state,
                client_id=j.client_id,
                miner_id=j.miner_id,
                requested_at=j.requested_at,
                attempt=j.attempt,
            )
            for j in jobs
        ]

    async def mean_run_seconds(self, sample: int) -> float | None:
        jobs, _ = await self.list_jobs(
            JobQuery(state="COMPLETED", limit=sample, offset=0, with_total=False)
        )
        spans = [
            j.finished_at - j.started_at
            for j in jobs
            if j.finished_at is not None and j.started_at is not None
        ]
        return sum(spans) / len(spans) if spans else None

    async def count_jobs(self) -> dict[str, int]:
        self._check_open()
        counts: dict[str, int] = {}
        for j in self.jobs.values():
            counts[j.state] = counts.get(j.state, 0) + 1
        return counts

    async def list_receipts(self, job_id: str | None, limit: int, offset: int) -> list[JSONObject]:
        self._check_open()
        if job_id:
            rows = await self.receipts_for(job_id)
        else:  # newest first: the chain's order
            rows = [self.chain[n] for n in sorted(self.chain, reverse=True)]
        return rows[offset : offset + limit]

    async def list_receipt_fields(
        self, job_id: str | None, limit: int, offset: int, paths: Sequence[tuple[str, ...]]
    ) -> list[list[Any]]:
        return [
            [_at(receipt, path) for path in paths]
            for receipt in await self.list_receipts(job_id, limit, offset)
        ]

    async def receipt_chain_head(self) -> JSONObject | None:
        self._check_open()
        return self.chain[max(self.chain)] if self.chain else None

    async def receipt_chain(self, after: int, limit: int) -> list[tuple[int, JSONObject]]:
        self._check_open()
        return [(n, self.chain[n]) for n in sorted(self.chain) if n > after][:limit]

    # ---- wallet -----------------------------------------------------------------------------

    async def load_wallet(self, now: float, settled_since: float | None = None) -> WalletSnapshot:
        self._check_open()
        balances: dict[str, int] = {}
        for e in self.entries.values():
            balances[e.account] = balances.get(e.account, 0) + e.amount
        indexes = [p.address_index for p in self.payments.values() if p.address_index is not None]
        return WalletSnapshot(
            users=list(self.users.values()),
            sessions=[
                s for s in self.sessions.values() if s.revoked_at is None and s.expires_at > now
            ],
            nonces=list(self.nonces.values()),
            balances={a: b for a, b in balances.items() if b != 0},
            payments=[p for p in self.payments.values() if p.status == "pending"],
            next_address_index=max(indexes, default=-1) + 1,
            outpoints=[
                (p.tx_hash, p.tx_vout or 0) for p in self.payments.values() if p.tx_hash is not None
            ],
            shared_amounts=[
                (p.address, p.btc_sats, p.settled_at)
                for p in self.payments.values()
                if p.address_index is None
                and (p.settled_at is None or settled_since is None or p.settled_at >= settled_since)
            ],
        )

    async def ledger_entries(
        self, account: str, limit: int, offset: int
    ) -> tuple[list[LedgerEntry], int]:
        self._check_open()
        found = [e for e in self.entries.values() if e.account == account]
        found.sort(key=lambda e: (e.at, e.movement_key), reverse=True)
        return found[offset : offset + limit], len(found)

    async def get_payment(self, payment_id: str) -> PaymentRecord | None:
        self._check_open()
        return self.payments.get(payment_id)

    async def miner_earnings(
        self, miner_id: str, since: float, until: float, recent: int
    ) -> MinerEarnings:
        self._check_open()
        mine = [
            self.chain[n]
            for n in sorted(self.chain, reverse=True)
            if (m := self.issued[self.chain[n]["receipt_id"]])[0] == miner_id
            and since <= m[1] < until
        ]
        jobs = {r["job_id"] for r in mine}
        return MinerEarnings(
            completed=len(mine),
            billed=sum(min(price_units(r), MAX_RECEIPT_UNITS) for r in mine),
            paid=sum(
                e.amount
                for e in self.entries.values()
                if e.kind == "job_payment" and e.amount > 0 and e.ref in jobs
            ),
            recent=[
                {k: r[k] for k in RECENT_FIELDS if r.get(k) is not None} for r in mine[:recent]
            ],
        )

    async def payment_stats(self, since: float) -> PaymentStats:
        self._check_open()
        recent = [
            p
            for p in self.payments.values()
            if p.status == "confirmed" and p.confirmed_at is not None and p.confirmed_at >= since
        ]
        return PaymentStats(
            total=len(self.payments),
            pending=sum(1 for p in self.payments.values() if p.status == "pending"),
            confirmed_units=sum(p.aitbc_units for p in recent),
            confirmed_sats=sum(p.btc_sats for p in recent),
        )


def _at(value: Any, path: tuple[str, ...]) -> Any:
    """The value at ``path`` (keys) in ``value``; None where there is none."""
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value
