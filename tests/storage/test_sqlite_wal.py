"""The SQLite store's WAL upkeep: background checkpoints, and a WAL that restarts under load."""

from __future__ import annotations

import sqlite3
import threading
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest

import storage.sql
from storage.errors import StorageError
from storage.sql import DatabasesJobStore
from tests.storage.test_store_contract import batch, event, job, sqlite_url

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

pytestmark = pytest.mark.anyio


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[DatabasesJobStore]:
    store = DatabasesJobStore(sqlite_url(tmp_path))
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def checkpointer(store: DatabasesJobStore) -> Any:
    assert store._checkpointer is not None
    return store._checkpointer.raw_connection


async def fill(store: DatabasesJobStore, prefix: str, n: int) -> None:
    for i in range(n):
        await store.commit(batch(jobs=[job(f"{prefix}{i}")], events=[event(f"{prefix}{i}", 1)]))


async def test_a_checkpoint_skips_a_locked_round_and_stops_on_other_errors(
    store: DatabasesJobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PASSIVE checkpoint that meets "database table is locked" is retried next round;
    any other driver error still stops the store (the dispatcher then fails loudly)."""
    answers = [
        sqlite3.OperationalError("database table is locked"),
        sqlite3.OperationalError("database is busy"),
        None,
        sqlite3.OperationalError("disk I/O error"),
    ]
    rounds = 0

    async def checkpoint(raw: Any) -> tuple[int, int, int]:
        nonlocal rounds
        rounds += 1
        answer = answers.pop(0)
        if answer is not None:
            raise answer
        return 0, 0, 0

    monkeypatch.setattr(store, "_checkpoint", checkpoint)
    with anyio.fail_after(10), pytest.raises(StorageError, match="disk I/O error"):
        await store.maintain(0.001)
    assert rounds == 4


async def test_a_wal_that_every_round_leaves_behind_is_restarted(
    store: DatabasesJobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under steady load commits land while every checkpoint runs, so no round ends with
    every frame checkpointed and SQLite never writes the WAL from its start again: the file
    grew without end. Past ``wal_restart_frames`` the last round of a catch-up holds the
    writer: the commit asked for meanwhile waits, and then starts the WAL over."""
    await fill(store, "before", 10)
    log = (await store._checkpoint(checkpointer(store)))[1]
    assert log >= 20
    await fill(store, "load", 10)
    store.wal_restart_frames = 20
    real = store._checkpoint
    rounds: list[tuple[bool, bool]] = []  # (writer held, the commit asked during it landed)

    async with anyio.create_task_group() as tg:

        async def checkpoint_under_load(raw: Any) -> tuple[int, int, int]:
            landed = anyio.Event()

            async def commit() -> None:
                await fill(store, f"late{len(rounds)}-", 1)
                landed.set()

            tg.start_soon(commit)
            for _ in range(3):
                await anyio.lowlevel.checkpoint()
            answer = await real(raw)
            rounds.append((store._held is not None, landed.is_set()))
            return answer

        monkeypatch.setattr(store, "_checkpoint", checkpoint_under_load)
        with anyio.fail_after(10):
            await store._checkpoint_round(checkpointer(store))
    assert rounds[0] == (False, True)
    assert rounds[-1] == (True, False)
    assert store._held is None
    assert store.wal_restarts == 1
    busy, frames, _ = await real(checkpointer(store))
    assert store.wal_frames == frames
    assert busy == 0
    assert 0 < frames < log  # only the commit that waited: the WAL began again under it


async def test_a_small_wal_is_left_to_restart_by_itself(
    store: DatabasesJobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Below ``wal_restart_frames`` a round is one checkpoint: commits never wait."""
    await fill(store, "j", 3)
    calls: list[object] = []
    real = store._checkpoint

    async def checkpoint(raw: Any) -> tuple[int, int, int]:
        calls.append(store._held)
        return await real(raw)

    monkeypatch.setattr(store, "_checkpoint", checkpoint)
    await store._checkpoint_round(checkpointer(store))
    assert calls == [None]


async def test_the_held_round_releases_the_writer_when_it_fails(
    store: DatabasesJobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint error in the held round stops the store, and no commit stays parked."""
    store.wal_restart_frames = 0
    answers: list[tuple[int, int, int] | None] = [(0, 10, 10), (0, 11, 11), None]

    async def checkpoint(raw: Any) -> tuple[int, int, int]:
        answer = answers.pop(0)
        if answer is None:
            assert store._held is not None
            raise sqlite3.OperationalError("disk I/O error")
        return answer

    monkeypatch.setattr(store, "_checkpoint", checkpoint)
    with anyio.fail_after(10), pytest.raises(StorageError, match="disk I/O error"):
        await store.maintain(0.001)
    assert store._held is None
    with anyio.fail_after(10):
        await fill(store, "after", 1)


async def test_a_restarted_wal_file_is_cut_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``journal_size_limit``: after a burst, the WAL file shrinks once the WAL restarts."""
    monkeypatch.setattr(storage.sql, "WAL_SIZE_LIMIT", 0)
    store = DatabasesJobStore(sqlite_url(tmp_path))
    await store.open()
    try:
        await fill(store, "burst", 50)
        wal = tmp_path / "store.db-wal"
        grown = wal.stat().st_size
        await store._checkpoint_round(checkpointer(store))
        await fill(store, "after", 1)
        assert wal.stat().st_size < grown // 4
    finally:
        await store.close()


async def test_a_checkpoint_does_not_wait_behind_a_read(store: DatabasesJobStore) -> None:
    """Checkpoints have their own connection: a round (whose last checkpoint may hold every
    commit) runs while the reader's thread is busy with a long read."""
    await fill(store, "j", 30)
    store.wal_restart_frames = 0  # this round holds the writer for its last checkpoint
    assert store._reader is not None
    busy_reader = threading.Event()
    release = threading.Event()

    def long_read() -> None:
        busy_reader.set()
        release.wait(10)

    async with anyio.create_task_group() as tg:
        tg.start_soon(store._reader.raw_connection._execute, long_read)
        await anyio.to_thread.run_sync(busy_reader.wait, 10)
        try:
            with anyio.fail_after(5):
                tg.start_soon(store.maintain, 0.001)
                while store.wal_restarts == 0:  # noqa: ASYNC110 - bounded poll (style §4.7)
                    await anyio.sleep(0.001)
                await fill(store, "after", 1)
        finally:
            release.set()
        tg.cancel_scope.cancel()


async def test_a_held_round_that_a_read_kept_short_is_not_counted(
    store: DatabasesJobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read holding older frames stops the checkpoint short of the WAL's end: the WAL does
    not restart, so ``wal_restarts`` (the metric) does not count the round."""
    store.wal_restart_frames = 0
    answers = [(0, 10, 10), (0, 11, 11), (0, 12, 5), (0, 12, 12), (0, 13, 13), (0, 13, 13)]

    async def checkpoint(raw: Any) -> tuple[int, int, int]:
        return answers.pop(0)

    monkeypatch.setattr(store, "_checkpoint", checkpoint)
    await store._checkpoint_round(checkpointer(store))
    assert store.wal_restarts == 0
    await store._checkpoint_round(checkpointer(store))
    assert store.wal_restarts == 1
    assert store._held is None


async def test_the_database_file_is_synced_before_the_writer_is_held(
    store: DatabasesJobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rounds that stop short of the WAL's end copy pages into the database file without
    syncing it; the held round's sync would write them all while every commit waits. So the
    file is synced first, on the checkpointer's thread, while commits still go on."""
    await fill(store, "j", 10)
    store.wal_restart_frames = 0
    steps: list[str] = []
    real_sync, real_checkpoint = storage.sql.sync_file, store._checkpoint

    def sync(path: str) -> None:
        assert threading.current_thread() is not threading.main_thread()
        steps.append(f"sync {path} held={store._held is not None}")
        real_sync(path)

    async def checkpoint(raw: Any) -> tuple[int, int, int]:
        steps.append(f"checkpoint held={store._held is not None}")
        return await real_checkpoint(raw)

    monkeypatch.setattr(storage.sql, "sync_file", sync)
    monkeypatch.setattr(store, "_checkpoint", checkpoint)
    await store._checkpoint_round(checkpointer(store))
    assert steps[-2:] == [f"sync {tmp_path / 'store.db'} held=False", "checkpoint held=True"]
    assert store.wal_restarts == 1


async def test_a_failed_sync_stops_the_store(
    store: DatabasesJobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An fsync error is not retried (the kernel may already have dropped the pages it could
    not write): it stops the store, and no commit stays parked."""
    await fill(store, "j", 3)
    store.wal_restart_frames = 0

    def sync(path: str) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(storage.sql, "sync_file", sync)
    with anyio.fail_after(10), pytest.raises(StorageError, match="Input/output error"):
        await store.maintain(0.001)
    assert store._held is None
