"""The ``JobStore`` port and the write batch the group-commit writer hands to it.

Rule: the dispatcher talks to storage only through ``JobStore``. A ``WriteBatch`` is committed
in ONE transaction; nothing it describes may become visible before ``commit`` returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from protocol.records import EventRecord, JobRecord, MinerRecord
    from protocol.types import JSONObject

__all__ = ["JobQuery", "JobStore", "ReceiptRow", "WriteBatch"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiptRow:
    receipt_id: str
    job_id: str
    miner_id: str | None
    issued_at: float
    receipt: JSONObject
    chain_seq: int | None = None  # place in the coordinator's receipt chain (docs/receipts.md)


@dataclass(slots=True)
class WriteBatch:
    """Everything one transaction writes. Later job snapshots replace earlier ones."""

    jobs: dict[str, JobRecord] = field(default_factory=dict)
    events: list[EventRecord] = field(default_factory=list)
    miners: dict[str, MinerRecord] = field(default_factory=dict)
    receipts: list[ReceiptRow] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.jobs) + len(self.events) + len(self.miners) + len(self.receipts)


@dataclass(frozen=True, slots=True, kw_only=True)
class JobQuery:
    client_id: str | None = None
    state: str | None = None
    job_type: str | None = None
    limit: int = 20
    offset: int = 0


class JobStore(Protocol):
    """Persistence for jobs, their event logs, miners and receipts."""

    async def open(self) -> None:
        """Connect and apply migrations."""

    async def close(self) -> None: ...

    async def maintain(self) -> None:
        """Background housekeeping (e.g. WAL checkpoints); runs until cancelled or closed."""

    async def commit(self, batch: WriteBatch) -> None:
        """Write the whole batch in one transaction (raises StorageError)."""

    async def load_active(self) -> tuple[list[JobRecord], list[MinerRecord]]:
        """QUEUED and RUNNING jobs, and every known miner (for the start-up rebuild)."""

    async def get_job(self, job_id: str) -> JobRecord | None: ...

    async def find_job(self, client_id: str, idempotency_key: str) -> JobRecord | None: ...

    async def events_after(
        self, job_id: str, after: int, limit: int = 10_000
    ) -> list[EventRecord]: ...

    async def receipts_for(self, job_id: str) -> list[JSONObject]: ...

    async def list_jobs(self, query: JobQuery) -> tuple[list[JobRecord], int]:
        """A page of jobs, newest first, and the total number matching ``query``."""

    async def count_jobs(self) -> dict[str, int]:
        """Number of jobs per state."""

    async def list_receipts(self, job_id: str | None, limit: int, offset: int) -> list[JSONObject]:
        """Receipts, newest first (optionally of one job)."""

    async def receipt_chain_head(self) -> JSONObject | None:
        """The receipt with the highest ``chain_seq`` (start-up: where the chain continues)."""

    async def receipt_chain(self, after: int, limit: int) -> list[tuple[int, JSONObject]]:
        """``(chain_seq, receipt)`` with ``chain_seq > after``, in chain order (audit pages)."""
