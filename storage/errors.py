"""Errors of the storage layer.

Tree::

    StorageError          the store failed (driver error, closed store, corrupt row)
    ├── NotFound          the row does not exist
    ├── Conflict          a uniqueness rule was violated
    ├── StoreInUse        another coordinator holds the database (storage.owner)
    └── StoreUnreachable  the database server cannot be connected to (PostgreSQL)
"""

from __future__ import annotations

__all__ = ["Conflict", "NotFound", "StorageError", "StoreInUse", "StoreUnreachable"]


class StorageError(Exception):
    """Base class of storage errors."""


class NotFound(StorageError):
    pass


class Conflict(StorageError):
    pass


class StoreInUse(StorageError):
    pass


class StoreUnreachable(StorageError):
    """No connection could be made: a standby keeps waiting through it. ``lasting``: the
    server answered that it never will be for these settings (credentials refused, no such
    database, a bad TLS setting), where a server restarting or a network in trouble may be
    over in seconds."""

    def __init__(self, message: str, *, lasting: bool = False) -> None:
        super().__init__(message)
        self.lasting = lasting
