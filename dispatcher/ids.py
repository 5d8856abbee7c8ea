"""Identifiers for jobs and receipts: 32 lowercase hex digits, ordered by creation time.

The first 12 digits are the creation time in milliseconds, the other 20 are random (80 bits).
The format is what clients already check (32 hex, like ``uuid4().hex``); the order keeps the
store's B-tree inserts at the right edge, so a group commit dirties a few pages instead of one
random page per key (random keys made COMMIT the largest single cost of a job).

The random part comes from the OS's CSPRNG (``os.urandom``), read 4 KiB at a time: one
``getrandom`` call per 409 ids instead of one per id.
"""

from __future__ import annotations

import os
import time

__all__ = ["new_id"]

_CHUNK = 4096
_pool = b""
_at = 0


def _forget_pool() -> None:
    """A forked child must not reuse its parent's unread random bytes (duplicate ids)."""
    global _pool, _at
    _pool, _at = b"", 0


os.register_at_fork(after_in_child=_forget_pool)


def new_id() -> str:
    global _pool, _at
    if _at + 10 > len(_pool):
        _pool, _at = os.urandom(_CHUNK), 0
    rand = _pool[_at : _at + 10]
    _at += 10
    return f"{time.time_ns() // 1_000_000:012x}{rand.hex()}"
