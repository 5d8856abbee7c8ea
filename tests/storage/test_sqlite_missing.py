"""A SQLite database file that went missing (deleted, moved): a WAL left without it is refused,
and a start on a new database beside the files of an earlier one says so."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from storage.errors import StorageError
from storage.sql import DatabasesJobStore, check_database
from tests.serve_once import serve_once
from tests.storage.test_store_contract import batch, event, job, sqlite_url

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.anyio


async def _crashed_with_a_commit_in_the_wal(tmp_path: Path) -> Path:
    """``tmp_path/store.db`` as a crash leaves it: job ``j1`` committed to the WAL only. Returns
    a folder holding a copy of the database file and its WAL taken then (the file moved away)."""
    db = tmp_path / "store.db"
    store = DatabasesJobStore(sqlite_url(tmp_path))
    await store.open()
    try:
        await store.commit(batch(jobs=[job("j1")], events=[event("j1", 1)]))
        moved = tmp_path / "moved"
        moved.mkdir()
        for name in ("store.db", "store.db-wal"):
            shutil.copy(tmp_path / name, moved / name)
    finally:
        await store.close()  # a clean close checkpoints and deletes the WAL: put it back
    shutil.copy(moved / "store.db-wal", tmp_path / "store.db-wal")
    db.unlink()
    return moved


async def test_a_wal_without_its_database_is_refused_and_kept(tmp_path: Path) -> None:
    """The database file is gone and its WAL holds the last commits. SQLite, creating a new
    database there, deleted that WAL without a word, and the store started empty: those commits
    were lost even for an operator about to put the file back. Now the open (and the check
    before a serve) refuses, naming both files, and leaves them as they are; the moved file
    put back opens with every commit."""
    moved = await _crashed_with_a_commit_in_the_wal(tmp_path)
    db, wal = tmp_path / "store.db", tmp_path / "store.db-wal"
    log = wal.read_bytes()
    said = (
        f"{db} does not exist but its write-ahead log {wal} does: the database was deleted or "
        "moved, and the log may hold its last commits, which a new database would delete; put "
        "the moved file back, or move store.db-wal and store.db-shm away first to restore a "
        "backup or start on a new, empty database"
    )
    with pytest.raises(StorageError) as refused:
        check_database(sqlite_url(tmp_path))
    assert str(refused.value) == said
    store = DatabasesJobStore(sqlite_url(tmp_path))
    with pytest.raises(StorageError) as refused:
        await store.open()
    assert str(refused.value) == said
    assert not db.exists()
    assert wal.read_bytes() == log

    shutil.copy(moved / "store.db", db)  # put back
    store = DatabasesJobStore(sqlite_url(tmp_path))
    await store.open()
    try:
        assert await store.get_job("j1") is not None
    finally:
        await store.close()


async def test_a_wal_beside_the_file_a_link_names_is_found(tmp_path: Path) -> None:
    """SQLite names the WAL after the file a symbolic link names: a database reached through a
    link whose file is gone is refused for the WAL beside that file."""
    await _crashed_with_a_commit_in_the_wal(tmp_path)
    link = tmp_path / "link" / "coordinator.db"
    link.parent.mkdir()
    link.symlink_to(tmp_path / "store.db")
    wal = tmp_path / "store.db-wal"
    with pytest.raises(StorageError, match=re.escape(f"its write-ahead log {wal} does")):
        check_database(f"sqlite:///{link}")
    with pytest.raises(StorageError, match="does not exist but its write-ahead log"):
        await DatabasesJobStore(f"sqlite:///{link}").open()
    assert not (tmp_path / "store.db").exists()


async def test_a_wal_moved_away_lets_a_new_database_start(tmp_path: Path) -> None:
    """What the refusal offers: with the WAL moved away, the start makes a new, empty database."""
    await _crashed_with_a_commit_in_the_wal(tmp_path)
    (tmp_path / "store.db-wal").rename(tmp_path / "old-wal")
    store = DatabasesJobStore(sqlite_url(tmp_path))
    await store.open()
    try:
        assert await store.get_job("j1") is None
    finally:
        await store.close()


def _env() -> dict[str, str]:
    """No configured keys (a start generates them beside the database) and no DATABASE_URL."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEYS")}
    for name in ("DATABASE_URL", "RECEIPT_SIGNING_KEY_HEX", "RECEIPT_PREVIOUS_KEYS"):
        env.pop(name, None)
    return env


async def test_serve_beside_a_wal_without_its_database_exits_1_with_one_line(
    tmp_path: Path,
) -> None:
    """``serve`` refuses before it writes anything beside the database (no lock, no keys)."""
    await _crashed_with_a_commit_in_the_wal(tmp_path)
    shutil.rmtree(tmp_path / "moved")
    for name in os.listdir(tmp_path):
        if name != "store.db-wal":
            os.unlink(tmp_path / name)  # as if the database had never been started here
    db = tmp_path / "store.db"
    done = serve_once(db, _env(), timeout=20)  # a start that goes on serves until the timeout
    assert (done.returncode, done.stdout) == (1, "")
    [line] = done.stderr.splitlines()
    assert line.startswith(f"aitbc-coordinator: {db} does not exist but its write-ahead log ")
    assert sorted(os.listdir(tmp_path)) == ["store.db-wal"]


def _serve_until_started(db: Path) -> list[str]:
    """``serve`` on ``db`` until its start-up is complete, then SIGTERM: its stderr lines."""
    with subprocess.Popen(
        [sys.executable, "-m", "web.cli", "serve", "--port", "0", "--db", str(db)],
        env={**_env(), "PYTHONPATH": os.getcwd()},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stderr is not None
        try:
            lines = []
            for line in proc.stderr:  # ends at EOF if the start fails
                lines.append(line.rstrip("\n"))
                if "Application startup complete" in line:
                    break
            assert any("Application startup complete" in line for line in lines), lines
            proc.send_signal(signal.SIGTERM)
            lines += proc.stderr.read().splitlines()
            assert proc.wait(timeout=20) == 0, lines
        finally:
            proc.kill()
    return lines


def test_a_start_without_its_database_beside_an_earlier_starts_files_warns(tmp_path: Path) -> None:
    """The database deleted (its WAL too, or after a clean stop): a restart began on a new,
    empty database without a word, every job, receipt and balance gone from view. It still
    starts (a first start that stopped before creating the file leaves the same files), but
    says so first, naming the files of the earlier start; a first start says nothing."""
    db = tmp_path / "coordinator.db"
    first = _serve_until_started(db)
    assert not [line for line in first if "warning" in line]
    assert db.exists()
    db.unlink()
    second = _serve_until_started(db)
    [warning] = [line for line in second if "does not exist" in line]
    left = ", ".join(
        str(tmp_path / f"coordinator.db{suffix}")
        for suffix in (".lock", ".keys.json", ".signing-key")
    )
    assert warning == (
        f"aitbc-coordinator: warning: the database {db} does not exist, but {left} from an "
        "earlier start on it are beside it: starting on a new, empty database, without the "
        "jobs, receipts and balances of any earlier one (the receipt chain starts again at "
        "chain_seq 1); if it was deleted or moved by mistake, stop the coordinator and put it "
        "back (docs/ops.md)"
    )
    assert second.index(warning) < next(
        i for i, line in enumerate(second) if "startup complete" in line
    )
