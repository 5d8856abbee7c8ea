"""What the pure scheduler asks the runtime to do, as data.

Rule: the scheduler never performs these; it returns them. The runtime commits every
``Persist`` of a batch first and only then performs the visible effects of that batch
(durability before visibility, docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, TypeAlias

if TYPE_CHECKING:
    from protocol.records import EventRecord, JobRecord
    from protocol.types import CloseCode, JSONObject

__all__ = ["Assign", "CloseSession", "Effect", "Persist", "Revoke"]


class Persist(NamedTuple):
    """Store the job snapshot and append the event; then fan the event out to subscribers.

    ``job`` is the job as it stands at the end of the scheduler call that emitted the event
    (one snapshot per job per call); ``event.state`` is the state the event itself reports.
    A NamedTuple because one is built per event (see protocol/records.py).
    """

    job: JobRecord
    event: EventRecord


class Assign(NamedTuple):
    """Push ``job.assign`` to the miner's live session (a NamedTuple: one per assignment)."""

    miner_id: str
    session_id: str
    job_id: str
    attempt: int
    payload: JSONObject
    constraints: JSONObject
    expires_at: float
    accept_timeout: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Revoke:
    """Push ``job.cancel`` to the miner's session (cancel, expiry or reassignment)."""

    miner_id: str
    session_id: str
    job_id: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseSession:
    """Close a miner's socket (e.g. 4409 when a newer session replaced it)."""

    miner_id: str
    session_id: str
    code: CloseCode
    reason: str


Effect: TypeAlias = Persist | Assign | Revoke | CloseSession
