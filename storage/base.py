"""The ``JobStore`` port and the write batch the group-commit writer hands to it.

Rule: the dispatcher talks to storage only through ``JobStore``. A ``WriteBatch`` is committed
in ONE transaction; nothing it describes may become visible before ``commit`` returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from protocol.codec import dumps

if TYPE_CHECKING:
    from collections.abc import Collection, Sequence

    from protocol.records import EventRecord, JobRecord, MinerRecord
    from protocol.types import JSONObject

__all__ = [
    "JobAge",
    "JobQuery",
    "JobStore",
    "JobSummary",
    "LedgerEntry",
    "MinerEarnings",
    "RECENT_FIELDS",
    "NonceRecord",
    "PaymentRecord",
    "PaymentStats",
    "ReceiptRow",
    "SessionRecord",
    "Store",
    "UserRecord",
    "WalletSnapshot",
    "WalletStore",
    "WriteBatch",
    "chars_page",
    "job_chars",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class JobSummary:
    """A job without its payload, constraints, result or receipt (``job_summaries``)."""

    job_id: str
    state: str
    client_id: str
    miner_id: str | None
    requested_at: float
    attempt: int


@dataclass(frozen=True, slots=True, kw_only=True)
class JobAge:
    """A job's place in the store (insertion order) and times (``jobs_after``)."""

    rowid: int
    job_id: str
    state: str
    requested_at: float
    finished_at: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiptRow:
    receipt_id: str
    job_id: str
    miner_id: str | None
    issued_at: float
    receipt: JSONObject
    chain_seq: int  # place in the coordinator's receipt chain (docs/receipts.md)


@dataclass(frozen=True, slots=True, kw_only=True)
class UserRecord:
    user_id: str
    wallet_address: str  # lowercased 0x + 40 hex; unique
    email: str  # unique
    username: str
    created_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionRecord:
    """A user session: only the SHA-256 of the token is ever stored."""

    token_hash: str
    user_id: str
    created_at: float
    expires_at: float
    revoked_at: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class NonceRecord:
    """The open login challenge of a wallet (a newer one replaces it; login deletes it)."""

    wallet_address: str
    nonce: str
    expires_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerEntry:
    """One leg of a movement: ``amount`` in units of 1e-8 (negative = debit).

    A movement is two entries with the same ``movement_key`` (legs 0 and 1) whose amounts sum
    to zero; ``(movement_key, leg)`` is unique, so a movement can be written only once.
    """

    movement_key: str
    leg: int
    account: str
    amount: int
    kind: str
    ref: str | None
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class PaymentRecord:
    """An exchange payment request: BTC in (satoshis), AITBC credited (units of 1e-8)."""

    payment_id: str
    user_id: str
    account: str
    aitbc_units: int
    btc_sats: int
    address: str
    address_index: int | None
    status: str  # pending | confirmed | expired
    created_at: float
    expires_at: float
    confirmed_at: float | None = None
    tx_hash: str | None = None
    tx_vout: int | None = None
    confirmations: int = 0

    @property
    def settled_at(self) -> float | None:
        """When it was confirmed, or its deadline once expired; None while pending."""
        if self.status == "pending":
            return None
        return self.confirmed_at if self.confirmed_at is not None else self.expires_at


# What ``MinerEarnings.recent`` keeps of each receipt (those it has).
RECENT_FIELDS = ("job_id", "receipt_id", "price", "completed_at")


@dataclass(frozen=True, slots=True, kw_only=True)
class MinerEarnings:
    """A miner's receipts issued in a time window (``miner_earnings``)."""

    completed: int  # receipts naming the miner as provider
    billed: int  # the sum of their prices, in units of 1e-8
    paid: int  # what the ledger paid out for those jobs (billing on), in units of 1e-8
    # The newest receipts, newest first, as their ``RECENT_FIELDS`` only (a receipt's metadata
    # holds the job's payload and result, up to a request body each).
    recent: list[JSONObject]


@dataclass(frozen=True, slots=True, kw_only=True)
class PaymentStats:
    """Exchange payment figures (the public ``/v1/exchange/market-stats``)."""

    total: int  # every payment ever requested, whatever its status
    pending: int
    confirmed_units: int  # AITBC (units of 1e-8) of the payments confirmed since the time asked
    confirmed_sats: int  # and the satoshis they asked


@dataclass(frozen=True, slots=True, kw_only=True)
class WalletSnapshot:
    """What the wallet keeps in memory, as loaded at start-up."""

    users: list[UserRecord]
    sessions: list[SessionRecord]  # neither revoked nor expired
    nonces: list[NonceRecord]  # all, expired too: only the wallet's cap deletes them
    balances: dict[str, int]  # account -> sum of its entries (non-zero only)
    payments: list[PaymentRecord]  # pending only
    next_address_index: int
    outpoints: list[tuple[str, int]]  # (txid, vout) already paying a payment
    # (address, sats, settled at: confirmed_at, else expires_at; None while pending) of the
    # shared-address payments pending or settled at or after the time ``load_wallet`` was given
    shared_amounts: list[tuple[str, int, float | None]]


@dataclass(slots=True)
class WriteBatch:
    """Everything one transaction writes. Later job snapshots replace earlier ones.

    The wallet parts (users … payments) are empty unless wallet login or billing is used; a
    job's ledger entries ride in the same batch as the job change they belong to.
    """

    jobs: dict[str, JobRecord] = field(default_factory=dict)
    events: list[EventRecord] = field(default_factory=list)
    miners: dict[str, MinerRecord] = field(default_factory=dict)
    receipts: list[ReceiptRow] = field(default_factory=list)
    entries: list[LedgerEntry] = field(default_factory=list)
    users: list[UserRecord] = field(default_factory=list)
    sessions: dict[str, SessionRecord] = field(default_factory=dict)
    nonces: dict[str, NonceRecord | None] = field(default_factory=dict)  # None: delete
    payments: dict[str, PaymentRecord] = field(default_factory=dict)
    # Ended jobs to delete, with their events (their receipts stay): JOB_RETENTION_DAYS.
    pruned: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return (
            len(self.pruned)
            + len(self.jobs)
            + len(self.events)
            + len(self.miners)
            + len(self.receipts)
            + len(self.entries)
            + len(self.users)
            + len(self.sessions)
            + len(self.nonces)
            + len(self.payments)
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class JobQuery:
    client_id: str | None = None
    miner_id: str | None = None  # the job's current or last miner
    state: str | None = None
    job_type: str | None = None
    limit: int = 20
    offset: int = 0
    # False: don't count the matching jobs (a scan of every match); the total returned is then
    # only the number of jobs on the page.
    with_total: bool = True
    # The page ends before the job that would take its jobs' stored text (payload, constraints,
    # result and error, as JSON text: ``job_chars``) past this; the first job comes whatever
    # its size. None: ``limit`` alone (a page of 500 jobs near the body limit was gigabytes).
    max_chars: int | None = None


def job_chars(job: JobRecord) -> int:
    """What ``JobQuery.max_chars`` counts of a job: the characters of its payload, constraints,
    result and error as the stores keep them (compact JSON text)."""
    n = len(_text(job.payload)) + len(_text(job.constraints)) + len(job.error or "")
    return n if job.result is None else n + len(_text(job.result))


def _text(value: JSONObject) -> str:
    return dumps(value).decode()


def chars_page(sizes: Sequence[int], max_chars: int) -> int:
    """How many of a page's jobs, of these ``job_chars``, fit ``max_chars`` (at least one)."""
    used = 0
    for n, size in enumerate(sizes):
        used += size
        if used > max_chars and n > 0:
            return n
    return len(sizes)


class JobStore(Protocol):
    """Persistence for jobs, their event logs, miners and receipts."""

    async def open(self) -> None:
        """Connect and apply migrations."""

    async def owner_free(self) -> bool:
        """Whether ``open`` would get the database's owner lock now (a standby's poll, cheaper
        than an ``open`` that is refused)."""

    async def close(self) -> None: ...

    async def maintain(self) -> None:
        """Background housekeeping (e.g. WAL checkpoints); runs until cancelled or closed."""

    async def commit(self, batch: WriteBatch) -> None:
        """Write the whole batch in one transaction (raises StorageError)."""

    async def load_active(self) -> tuple[list[JobRecord], list[MinerRecord]]:
        """QUEUED and RUNNING jobs, and every known miner (for the start-up rebuild)."""

    async def get_job(self, job_id: str) -> JobRecord | None: ...

    async def find_job(self, client_id: str, idempotency_key: str) -> JobRecord | None: ...

    async def find_jobs(
        self, keys: Collection[tuple[str, str]]
    ) -> dict[tuple[str, str], JobRecord]:
        """``find_job`` of each ``(client_id, idempotency_key)`` in one read: the jobs found,
        by their pair (pairs without a job are left out)."""

    async def events_after(
        self, job_id: str, after: int, limit: int = 10_000
    ) -> list[EventRecord]: ...

    async def jobs_after(self, rowid: int, limit: int) -> list[JobAge]:
        """Up to ``limit`` jobs stored after place ``rowid``, in the order they were stored."""

    async def receipts_for(self, job_id: str) -> list[JSONObject]:
        """The receipt the job's row names (none before it completes, or for an unknown job)."""

    async def list_jobs(self, query: JobQuery) -> tuple[list[JobRecord], int]:
        """A page of jobs, newest first, and the total number matching ``query`` (see
        ``JobQuery.with_total``)."""

    async def count_jobs(self) -> dict[str, int]:
        """Number of jobs per state (a scan: the dispatcher's ``JobCounts`` keeps them)."""

    async def job_summaries(self, limit: int) -> list[JobSummary]:
        """The newest ``limit`` jobs (newest first, as ``list_jobs``), read without their
        payloads, constraints, results and receipts."""

    async def mean_run_seconds(self, sample: int) -> float | None:
        """The mean of ``finished_at - started_at`` over the newest ``sample`` COMPLETED jobs
        (newest first as ``list_jobs`` orders them) that have both; None when none has. Read
        without the jobs' payloads and results."""

    async def list_receipts(self, job_id: str | None, limit: int, offset: int) -> list[JSONObject]:
        """Receipts, newest first in chain order (or only the job's, as ``receipts_for``)."""

    async def list_receipt_fields(
        self, job_id: str | None, limit: int, offset: int, paths: Sequence[tuple[str, ...]]
    ) -> list[list[Any]]:
        """``list_receipts``' page (same order), each receipt read as only its values at
        ``paths`` (key sequences, e.g. ``("signature", "key_id")``; None where absent): the
        public explorer's few fields, without reading whole receipts (whose metadata holds
        the job's payload and result)."""

    async def receipt_chain_head(self) -> JSONObject | None:
        """The receipt with the highest ``chain_seq`` (start-up: where the chain continues).
        Receipts from before the chain (numbered below 1 by migration 5) are never the head."""

    async def receipt_chain(self, after: int, limit: int) -> list[tuple[int, JSONObject]]:
        """``(chain_seq, receipt)`` with ``chain_seq > after``, in chain order (audit pages)."""

    async def miner_earnings(
        self, miner_id: str, since: float, until: float, recent: int
    ) -> MinerEarnings:
        """The receipts of ``miner_id`` issued in ``[since, until)``: how many, their prices'
        sum, the job payments the ledger made for them, and the ``recent`` newest."""


class WalletStore(Protocol):
    """Reads of users, sessions, the ledger and exchange payments (writes go in batches)."""

    async def load_wallet(self, now: float, settled_since: float | None = None) -> WalletSnapshot:
        """Everything the wallet keeps in memory (start-up); the shared-address amounts of
        payments pending or settled at or after ``settled_since`` (all when None)."""

    async def ledger_entries(
        self, account: str, limit: int, offset: int
    ) -> tuple[list[LedgerEntry], int]:
        """An account's entries, newest first, and how many it has."""

    async def get_payment(self, payment_id: str) -> PaymentRecord | None: ...

    async def payment_stats(self, since: float) -> PaymentStats:
        """How many payments there are and how many are pending; the AITBC and satoshis of
        those confirmed at or after ``since`` (one pass over the payments)."""


class Store(JobStore, WalletStore, Protocol):
    """The whole store as the app uses it."""
