"""The SQLite store when its database misbehaves under it: another process holding the write
lock, the file deleted or replaced while the coordinator runs."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

import anyio
import pytest

from storage.errors import StorageError
from storage.sql import DatabasesJobStore, database_file
from tests.storage.test_store_contract import batch, event, job, sqlite_url

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

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
