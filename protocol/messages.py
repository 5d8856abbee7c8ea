"""Every wire message of protocol v1 as a frozen dataclass (docs/protocol.md).

Rule 1: these classes hold already-validated values; :mod:`protocol.codec` is the only place
that turns raw frames into them.
Rule 2: each direction is one union alias, so handlers ``match`` on it exhaustively.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeAlias

if TYPE_CHECKING:
    from protocol.types import JSONObject

__all__ = [
    "Ack",
    "Auth",
    "ClientHello",
    "ClientToServer",
    "ClientWelcome",
    "Error",
    "Heartbeat",
    "Hello",
    "JobAccept",
    "JobAssign",
    "JobCancel",
    "JobCancelRequest",
    "JobEvent",
    "JobFail",
    "JobProgress",
    "JobReject",
    "JobResult",
    "JobSubmit",
    "MinerToServer",
    "ServerToClient",
    "ServerToMiner",
    "Status",
    "Subscribe",
    "Unsubscribe",
    "Welcome",
]


def _size() -> int:
    """A message's ``size``: the length of the frame it was decoded from, as received (what
    its job's payload or result counts as in the scheduler's memory bound). Not a field of the
    wire format: ``encode`` leaves it out, and equality ignores it."""
    return field(default=0, compare=False, repr=False, metadata={"wire": False})


# ---- shared -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Auth:
    """First frame of a browser session that could not send credential headers."""

    token: str
    id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack:
    """Success reply to a request that carried an ``id``; ``fields`` are merged into the frame."""

    id: str
    fields: JSONObject = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Error:
    """Failure reply (with the request ``id``) or an unsolicited error (with ``ref``)."""

    code: str
    message: str
    id: str | None = None
    ref: str | None = None


# ---- miner -> server ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    protocol: int
    miner_id: str | None
    capabilities: JSONObject
    concurrency: int = 1
    region: str | None = None
    resume_session: str | None = None
    # Optional Ed25519 public key (its 43-character base64url key id) that signs results.
    result_key: str | None = None
    id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class JobAccept:
    job_id: str
    attempt: int | None = None
    id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class JobReject:
    job_id: str
    reason: str = ""
    attempt: int | None = None
    id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class JobProgress:
    job_id: str
    progress: float | None = None
    message: str | None = None
    output: str | None = None
    attempt: int | None = None
    id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class JobResult:
    job_id: str
    result: JSONObject
    metrics: JSONObject = field(default_factory=dict)
    attempt: int | None = None
    # Optional: the miner's Ed25519 signature (base64url) of the result (docs/receipts.md).
    result_sig: str | None = None
    id: str | None = None
    size: int = _size()  # not sent: the frame's length as received (0 when built here)


@dataclass(frozen=True, slots=True, kw_only=True)
class JobFail:
    job_id: str
    error_code: str
    error_message: str
    retryable: bool = False
    attempt: int | None = None
    id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Status:
    concurrency: int | None = None
    draining: bool | None = None
    metrics: JSONObject | None = None
    id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat:
    metrics: JSONObject | None = None
    id: str | None = None


MinerToServer: TypeAlias = (
    Auth | Hello | JobAccept | JobReject | JobProgress | JobResult | JobFail | Status | Heartbeat
)


# ---- server -> miner ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Welcome:
    protocol: int
    session_id: str
    miner_id: str
    heartbeat_interval: float
    heartbeat_timeout: float
    resumed: tuple[str, ...] = ()
    revoked: tuple[str, ...] = ()
    id: str | None = None  # the hello's, when it carried one (its reply)


@dataclass(frozen=True, slots=True, kw_only=True)
class JobAssign:
    job_id: str
    attempt: int
    payload: JSONObject
    constraints: JSONObject
    expires_at: str
    accept_timeout: float


@dataclass(frozen=True, slots=True, kw_only=True)
class JobCancel:
    job_id: str
    reason: str


ServerToMiner: TypeAlias = Welcome | JobAssign | JobCancel | Ack | Error


# ---- client -> server ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientHello:
    protocol: int
    id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class JobSubmit:
    payload: JSONObject
    constraints: JSONObject = field(default_factory=dict)
    ttl_seconds: int | None = None
    priority: int = 0
    idempotency_key: str | None = None
    payment_amount: str | None = None  # decimal text; billed only with BILLING=on
    payment_currency: str | None = None  # "AITBC" (the default) is the only one taken
    id: str | None = None
    size: int = _size()  # not sent: the frame's length as received (0 when built here)


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscribe:
    job_ids: tuple[str, ...] | Literal["all"]
    after: dict[str, int] = field(default_factory=dict)
    id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Unsubscribe:
    job_ids: tuple[str, ...] | Literal["all"]
    id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class JobCancelRequest:
    """Client asks to cancel one of its jobs (wire type ``job.cancel``)."""

    job_id: str
    id: str | None = None


ClientToServer: TypeAlias = (
    Auth | ClientHello | JobSubmit | Subscribe | Unsubscribe | JobCancelRequest
)


# ---- server -> client ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientWelcome:
    protocol: int
    client_id: str
    id: str | None = None  # the hello's, when it carried one (its reply)


@dataclass(frozen=True, slots=True, kw_only=True)
class JobEvent:
    """One stored job event; ``data`` holds the event-specific fields (result, error, ...)."""

    job_id: str
    seq: int
    event: str
    state: str
    at: str
    attempt: int
    miner_id: str | None = None
    data: JSONObject = field(default_factory=dict)


ServerToClient: TypeAlias = ClientWelcome | JobEvent | Ack | Error
