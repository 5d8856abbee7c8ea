"""ONE table from domain and protocol errors to wire codes (WS error codes, HTTP statuses)."""

from __future__ import annotations

from dispatcher.errors import (
    DispatchError,
    InvalidTransition,
    NotAllowed,
    NotAssigned,
    PaymentRequired,
    ProgressLimit,
    TooLarge,
    TooManyJobs,
    Unavailable,
    UnknownJob,
    UnknownMiner,
)
from protocol.types import ErrorCode

__all__ = ["ERROR_TABLE", "READ_FAILED", "error_code_for", "http_status_for"]

# What a request is told when a read of the store failed (a dropped connection, a server
# restart): REST's 503 detail and a socket's `unavailable` error.
READ_FAILED = "the database could not be read; retry"

# exception type -> (WS error code, HTTP status)
ERROR_TABLE: dict[type[DispatchError], tuple[ErrorCode, int]] = {
    UnknownJob: (ErrorCode.NOT_FOUND, 404),
    InvalidTransition: (ErrorCode.CONFLICT, 409),
    NotAssigned: (ErrorCode.NOT_ASSIGNED, 409),
    UnknownMiner: (ErrorCode.NOT_FOUND, 404),
    NotAllowed: (ErrorCode.CONFLICT, 403),
    Unavailable: (ErrorCode.UNAVAILABLE, 503),
    PaymentRequired: (ErrorCode.PAYMENT_REQUIRED, 402),
    TooLarge: (ErrorCode.INVALID, 413),
    TooManyJobs: (ErrorCode.CONFLICT, 429),
    ProgressLimit: (ErrorCode.INVALID, 413),
}


def _lookup(exc: DispatchError) -> tuple[ErrorCode, int]:
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return ErrorCode.INTERNAL, 500


def error_code_for(exc: DispatchError) -> str:
    return _lookup(exc)[0].value


def http_status_for(exc: DispatchError) -> int:
    return _lookup(exc)[1]
