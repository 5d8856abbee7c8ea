"""Identifiers for jobs and receipts: 32 lowercase hex digits, ordered by creation time.

The first 12 digits are the creation time in milliseconds, the other 20 are random (80 bits).
The format is what clients already check (32 hex, like ``uuid4().hex``); the order keeps the
store's B-tree inserts at the right edge, so a group commit dirties a few pages instead of one
random page per key (random keys made COMMIT the largest single cost of a job).
"""

from __future__ import annotations

import secrets
import time

__all__ = ["new_id"]


def new_id() -> str:
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"
