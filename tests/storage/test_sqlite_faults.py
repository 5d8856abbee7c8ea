"""The SQLite store when its database misbehaves under it: another process holding the write
lock, the file deleted or replaced while the coordinator runs."""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest

from storage.errors import StorageError
from storage.sql import DatabasesJobStore, database_file
from tests.storage.test_store_contract import batch, event, job, sqlite_url

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["NORMAL", "FULL"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[DatabasesJobStore]:
    store = DatabasesJobStore(sqlite_url(tmp_path), synchronous=request.param)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
def other(store: DatabasesJobStore) -> Iterator[sqlite3.Connection]:
    """Another process's connection to the same file (a ``sqlite3`` shell, a script)."""
    conn = sqlite3.connect(database_file(store.url), isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


async def test_a_commit_waits_for_another_writer_without_holding_the_event_loop(
    store: DatabasesJobStore, other: sqlite3.Connection
) -> None:
    """While another process holds the write lock, the commit waits for it off the event loop
    (other tasks run), and commits once it is released."""
    other.execute("BEGIN IMMEDIATE")
    committed = anyio.Event()

    async def commit() -> None:
        await store.commit(batch(jobs=[job("j1")], events=[event("j1", 1)]))
        committed.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(commit)
            # This test's task runs meanwhile: the loop is free (FULL: until the commit's first
            # try on the driver's thread has met the lock).
            while not store.lock_waits:
                await anyio.wait_all_tasks_blocked()
            assert not committed.is_set()
            other.execute("ROLLBACK")
            await committed.wait()
    assert await store.get_job("j1") is not None


async def test_a_write_lock_held_past_the_wait_fails_the_commit_saying_so(
    store: DatabasesJobStore, other: sqlite3.Connection
) -> None:
    """A write lock held elsewhere for longer than ``lock_wait`` fails the commit with a message
    that says what holds it; the batch is not in the store."""
    store.lock_wait = 0.05
    other.execute("BEGIN IMMEDIATE")
    with (
        anyio.fail_after(10),
        pytest.raises(StorageError, match=r"another process has held the database's write lock"),
    ):
        await store.commit(batch(jobs=[job("j1")], events=[event("j1", 1)]))
    other.execute("ROLLBACK")
    assert await store.get_job("j1") is None
    await store.commit(batch(jobs=[job("j2")], events=[event("j2", 1)]))  # usable again
    assert await store.get_job("j2") is not None


def take_away(path: Path, how: str) -> None:
    if how == "deleted":
        path.unlink()
    elif how == "moved":
        path.rename(path.with_name("elsewhere.db"))
    else:
        copy = path.with_name("copy")
        copy.write_bytes(path.read_bytes())
        copy.replace(path)


@pytest.mark.parametrize("how", ["deleted", "moved", "replaced"])
async def test_the_store_fails_once_its_database_file_is_gone(
    store: DatabasesJobStore, how: str
) -> None:
    """A database file deleted, moved or replaced under a running store stops it at the next
    round of ``maintain`` (the dispatcher then stops): SQLite writes on to the file it has
    open, which no restart finds, so every commit acknowledged from then on would be lost."""
    path = Path(database_file(store.url))
    await store.commit(batch(jobs=[job("j1")], events=[event("j1", 1)]))
    take_away(path, how)
    await store.commit(batch(jobs=[job("j2")], events=[event("j2", 1)]))  # SQLite cannot tell
    with anyio.fail_after(5), pytest.raises(StorageError, match=f"{path} was deleted, moved or"):
        await store.maintain(0.001)


@pytest.mark.parametrize("how", ["deleted", "replaced"])
@pytest.mark.parametrize("suffix", ["-wal", "-shm"])
async def test_the_store_fails_once_its_wal_or_shared_memory_file_is_gone(
    store: DatabasesJobStore, how: str, suffix: str
) -> None:
    """Its write-ahead log or shared-memory index deleted or replaced (a cleanup script taking
    them for temporary files) under a running store: every other program reading the database
    failed ('disk I/O error'), and a crash lost the commits the open WAL held; the store fails
    at the next round instead, and a stop puts what the WAL holds into the database file."""
    path = Path(database_file(store.url))
    await store.commit(batch(jobs=[job("j1")], events=[event("j1", 1)]))
    take_away(path.with_name(path.name + suffix), how)
    await store.commit(batch(jobs=[job("j2")], events=[event("j2", 1)]))
    with anyio.fail_after(5), pytest.raises(StorageError, match=f"{path}{suffix} was deleted"):
        await store.maintain(0.001)
    await store.close()
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT job_id FROM jobs ORDER BY job_id").fetchall() == [
            ("j1",),
            ("j2",),
        ]


async def test_a_store_whose_file_is_in_place_keeps_checkpointing(
    store: DatabasesJobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file's check passes while the file is the one opened, and a folder that cannot be
    looked into (a stat that fails otherwise) tells nothing: the rounds go on."""
    rounds = 0

    async def checkpoint(raw: object) -> tuple[int, int, int]:
        nonlocal rounds
        rounds += 1
        if rounds == 2:
            monkeypatch.setattr(os, "stat", refuse)
        if rounds == 3:
            raise sqlite3.OperationalError("disk I/O error")
        return 0, 0, 0

    def refuse(path: str) -> os.stat_result:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(store, "_checkpoint", checkpoint)
    with anyio.fail_after(5), pytest.raises(StorageError, match="disk I/O error"):
        await store.maintain(0.001)
    assert rounds == 3
