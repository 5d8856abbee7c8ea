"""Identifiers, enums and small pure helpers shared by every layer.

Rule: nothing here performs I/O or reads a clock. Times are passed in as Unix seconds.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from typing import Any, NewType, TypeAlias

__all__ = [
    "JSON",
    "JSONObject",
    "PROTOCOL_VERSION",
    "ClientId",
    "CloseCode",
    "ErrorCode",
    "EventKind",
    "JobId",
    "MinerId",
    "SessionId",
    "finite_number",
    "iso_time",
    "parse_instant",
]

PROTOCOL_VERSION = 1

# The one place where ``Any`` is allowed: the JSON values that cross the codec boundary.
JSON: TypeAlias = Any
JSONObject: TypeAlias = dict[str, Any]

JobId = NewType("JobId", str)
MinerId = NewType("MinerId", str)
ClientId = NewType("ClientId", str)
SessionId = NewType("SessionId", str)


class CloseCode(IntEnum):
    """WebSocket close codes of protocol v1 (docs/protocol.md, "Close codes")."""

    NORMAL = 1000
    GOING_AWAY = 1001
    UNSUPPORTED_DATA = 1003
    INVALID_DATA = 1007
    TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    PROTOCOL_ERROR = 4000
    UNSUPPORTED_VERSION = 4002
    NOT_AUTHENTICATED = 4401
    FORBIDDEN = 4403
    LIVENESS_LOST = 4408
    REPLACED = 4409
    TOO_SLOW = 4429


class ErrorCode(StrEnum):
    """Codes carried by non-fatal ``error`` frames."""

    UNKNOWN_TYPE = "unknown_type"
    INVALID = "invalid"
    NOT_FOUND = "not_found"
    NOT_ASSIGNED = "not_assigned"
    NOT_CANCELABLE = "not_cancelable"
    CONFLICT = "conflict"
    UNAVAILABLE = "unavailable"
    PAYMENT_REQUIRED = "payment_required"
    INTERNAL = "internal"


class EventKind(StrEnum):
    """The ``event`` field of ``job.event`` frames."""

    QUEUED = "queued"
    ASSIGNED = "assigned"
    STARTED = "started"
    PROGRESS = "progress"
    REQUEUED = "requeued"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"
    EXPIRED = "expired"


# Recently formatted instants: each of a job's instants is formatted several times (its
# events, the assignment's expiry, the job view), and they come interleaved with other jobs'.
_iso_texts: dict[float, str] = {}
_iso_seconds: dict[int, str] = {}


def finite_number(value: object) -> float | None:
    """A JSON number, or numeric text, as a finite float; None for anything else (booleans,
    "nan", "inf", 1e400, an integer past a float's range)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def parse_instant(text: str) -> float:
    """Unix seconds from text that is Unix seconds (any finite number, e.g. ``1767139200`` or
    ``1767139200.5``) or an ISO-8601 time (UTC unless it names an offset, e.g.
    ``2026-01-31T00:00:00Z``); ValueError otherwise."""
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{text!r} is not Unix seconds or an ISO-8601 time") from None
        return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    if not math.isfinite(seconds):
        raise ValueError(f"{text!r} is not Unix seconds or an ISO-8601 time")
    return seconds


def iso_time(ts: float) -> str:
    """Format Unix seconds as ISO-8601 UTC with millisecond precision and a ``Z`` suffix."""
    text = _iso_texts.get(ts)
    if text is None:
        if len(_iso_texts) >= 4096:
            _iso_texts.clear()
        text = _iso_texts[ts] = _format_iso(ts)
    return text


def _format_iso(ts: float) -> str:
    second = int(ts // 1)
    # Round to microseconds first, as datetime does: int(0.123 * 1000) would give 122.
    us = round((ts - second) * 1_000_000)
    if us == 1_000_000:
        second, us = second + 1, 0
    prefix = _iso_seconds.get(second)
    if prefix is None:  # a few distinct seconds are live at once (now, now + TTL, ...)
        if len(_iso_seconds) >= 64:
            _iso_seconds.clear()
        prefix = _iso_seconds[second] = datetime.fromtimestamp(second, UTC).strftime(
            "%Y-%m-%dT%H:%M:%S"
        )
    return f"{prefix}.{us // 1000:03d}Z"
