"""One coordinator per SQLite database: an exclusive lock on ``<database>.lock``.

Every coordinator rebuilds its scheduler from the store and dispatches the queued jobs it
finds there. Two of them on one file would each push the same job to a miner of their own:
run twice, and then a commit that clashes with the other's rows stops one of them. So the
store that dispatches holds an ``flock`` on a file beside the database while it is open, and a
second one is refused at start-up with the holder's process id.

The lock is the kernel's: it goes with the process (``kill -9`` included), so a crashed
coordinator never leaves a stale lock behind, and the file itself is never removed (removing
it would let a newcomer lock a fresh file while the old holder still runs). It is a separate
file so that read-only tools (the ``sqlite3`` shell, ``aitbc-coordinator receipts audit``, a
backup) can still open the database while the coordinator runs.
"""

from __future__ import annotations

import fcntl
import os
from typing import TYPE_CHECKING

from storage.errors import StorageError, StoreInUse

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["OwnerLock", "check_one_name", "lock_path"]


def lock_path(database: Path) -> Path:
    """The lock file of the SQLite database file ``database``."""
    return database.with_name(database.name + ".lock")


def check_one_name(database: Path) -> None:
    """``StorageError`` when the database file has other names (hard links). Each name has a
    lock file of its own, so a coordinator on each would run at once, and SQLite keeps a WAL
    per name: commits in one name's WAL are unseen through the other (a crash, then a start
    by the other name, loses them). A symlink is fine: both resolve to the one name."""
    try:
        names = os.stat(database).st_nlink
    except OSError:
        return  # a file still to be created (or one the open will say it cannot reach)
    if names > 1:
        raise StorageError(
            f"{database} has {names} names (hard links): a coordinator on each would not see "
            "the other's lock, nor SQLite the other's WAL; remove the other names (a symbolic "
            "link is fine)"
        )


class OwnerLock:
    """The exclusive right to dispatch from one database file, for as long as it is held."""

    def __init__(self, database: Path) -> None:
        self.database = database
        self.path = lock_path(database.resolve())  # one lock whichever symlink names the file
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock (a no-op when this object holds it); ``StoreInUse`` when another does,
        ``StorageError`` when the lock file cannot be opened."""
        if self._fd is not None:
            return
        check_one_name(self.database)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            # Not another coordinator: a standby must not wait for this to change.
            raise StorageError(f"cannot create the lock file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise StoreInUse(
                f"{self.database} is in use by another coordinator{pid}: stop it, or give "
                "this one a database of its own (DATABASE_URL or --db)"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the last descriptor releases the flock
