"""What a SQLite store refuses to open, and how: a database another coordinator holds (the
owner lock, storage/owner.py), a file that is not a database, a schema from a newer build."""

from __future__ import annotations

import gc
import os
import sqlite3
import subprocess
import sys
import threading
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import pytest

from protocol.records import MinerRecord
from storage.errors import StorageError, StoreInUse
from storage.owner import OwnerLock, lock_path
from storage.schema import MIGRATIONS, SCHEMA_VERSION
from storage.sql import DatabasesJobStore, check_database
from tests.serve_once import serve_once
from tests.storage.test_store_contract import batch, event, job, receipt_row, sqlite_url
from web.cli import main

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.anyio

# A process that takes the lock and says so, then waits for stdin to close.
HOLDER = """
import sys
from pathlib import Path
from storage.owner import OwnerLock
OwnerLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
sys.stdin.read()
"""


def _connection_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if "_connection_worker_thread" in t.name}


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the owner lock of ``tmp_path/store.db``."""
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "store.db")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "held\n"
            yield proc
        finally:
            proc.kill()


async def test_a_second_store_on_one_file_is_refused_until_the_first_closes(
    tmp_path: Path,
) -> None:
    """Two dispatching stores never share a file; the lock goes when the first closes."""
    first = DatabasesJobStore(sqlite_url(tmp_path))
    await first.open()
    second = DatabasesJobStore(sqlite_url(tmp_path))
    try:
        with pytest.raises(StoreInUse, match=f"in use by another coordinator \\(pid {os.getpid()}"):
            await second.open()
        assert second._raw is None  # refused before any connection was made
    finally:
        await first.close()
    await second.open()
    await second.close()


async def test_a_symlink_to_the_file_shares_its_lock(tmp_path: Path) -> None:
    """The lock is the file's, not the name's: a symlinked path is refused too."""
    first = DatabasesJobStore(sqlite_url(tmp_path))
    await first.open()
    (tmp_path / "link.db").symlink_to(tmp_path / "store.db")
    link = DatabasesJobStore(f"sqlite:///{tmp_path / 'link.db'}")
    try:
        with pytest.raises(StoreInUse):
            await link.open()
    finally:
        await link.close()  # a no-op unless it wrongly opened
        await first.close()


async def test_a_hard_link_to_the_file_is_refused(tmp_path: Path) -> None:
    """A hard link is another name for the file, with a lock file and a WAL of its own: two
    coordinators ran on one database through two names (each took its own name's lock), and
    commits in one name's WAL went unseen through the other. A database file with another
    name is refused, whichever name opens it."""
    first = DatabasesJobStore(sqlite_url(tmp_path))
    await first.open()
    os.link(tmp_path / "store.db", tmp_path / "link.db")
    link = DatabasesJobStore(f"sqlite:///{tmp_path / 'link.db'}")
    try:
        with pytest.raises(StorageError, match="has 2 names \\(hard links\\)"):
            await link.open()
        assert link._raw is None  # refused before any connection was made
    finally:
        await link.close()  # a no-op unless it wrongly opened
        await first.close()
    assert not lock_path(tmp_path / "link.db").exists()
    again = DatabasesJobStore(sqlite_url(tmp_path))
    with pytest.raises(StorageError, match="hard links"):
        await again.open()
    (tmp_path / "link.db").unlink()
    await again.open()
    await again.close()


async def test_a_read_only_store_opens_beside_the_owner(tmp_path: Path) -> None:
    """``exclusive=False`` (the receipts audit) reads a database a coordinator holds."""
    owner = DatabasesJobStore(sqlite_url(tmp_path))
    await owner.open()
    try:
        await owner.commit(batch(jobs=[job("j1")]))
        reader = DatabasesJobStore(sqlite_url(tmp_path), exclusive=False)
        await reader.open()
        try:
            assert (await reader.get_job("j1")) is not None
        finally:
            await reader.close()
        assert owner.owner is not None
        assert owner.owner.held  # the reader took nothing away
    finally:
        await owner.close()


async def test_a_store_that_fails_to_open_lets_the_lock_go(tmp_path: Path) -> None:
    """A database SQLite cannot read leaves neither the lock nor an open connection behind
    (a connection's thread would keep the process from exiting)."""
    (tmp_path / "store.db").write_bytes(b"not a database" * 512)
    before = _connection_threads()
    broken = DatabasesJobStore(sqlite_url(tmp_path))
    with pytest.raises(Exception, match="not a database"):
        await broken.open()
    for thread in _connection_threads() - before:
        # A closed connection's thread sets its stop future just before it ends: give it
        # that moment (under load it was still alive when the check ran).
        thread.join(timeout=5)
    assert _connection_threads() == before
    lock = OwnerLock(tmp_path / "store.db")
    lock.acquire()  # would raise StoreInUse if the failed open had kept it
    lock.release()


async def test_another_process_holds_the_lock_until_it_dies(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    """The refusal names the holder's pid; killed with -9, it leaves no stale lock behind."""
    store = DatabasesJobStore(sqlite_url(tmp_path))
    with pytest.raises(StoreInUse, match=f"\\(pid {holder.pid}\\)"):
        await store.open()
    holder.kill()
    holder.wait()
    await store.open()
    await store.close()
    assert lock_path(tmp_path / "store.db").exists()  # kept: removing it would race a newcomer


def test_serve_on_a_held_database_exits_1_with_one_line(
    tmp_path: Path,
    holder: subprocess.Popen[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``serve`` refuses before it writes keys or starts a server, and says who holds it."""
    for name in ("CLIENT_API_KEYS", "MINER_API_KEYS", "ADMIN_API_KEYS", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["serve", "--port", "0", "--db", str(tmp_path / "store.db")]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"aitbc-coordinator: {tmp_path / 'store.db'} is in use by another coordinator "
        f"(pid {holder.pid}): stop it, or give this one a database of its own "
        "(DATABASE_URL or --db)"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no keys generated


async def test_the_lock_holds_while_the_store_serves(tmp_path: Path) -> None:
    """Held from open to close, not just at open: a claim in between is refused."""
    store = DatabasesJobStore(sqlite_url(tmp_path))
    await store.open()
    try:
        await store.commit(batch(jobs=[job("j1")]))
        await anyio.lowlevel.checkpoint()
        with pytest.raises(StoreInUse):
            OwnerLock(tmp_path / "store.db").acquire()
    finally:
        await store.close()


def _newer(tmp_path: Path) -> None:
    """Mark the database at ``tmp_path/store.db`` as written by a newer coordinator."""
    con = sqlite3.connect(tmp_path / "store.db")
    con.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION + 1,))
    con.commit()
    con.close()


def _versions(tmp_path: Path) -> list[int]:
    con = sqlite3.connect(tmp_path / "store.db")
    try:
        return sorted(r[0] for r in con.execute("SELECT version FROM schema_version"))
    finally:
        con.close()


async def test_a_database_from_a_newer_coordinator_is_refused_untouched(tmp_path: Path) -> None:
    """Its rows may mean what this build cannot know: no migration runs, nothing is written."""
    store = DatabasesJobStore(sqlite_url(tmp_path))
    await store.open()
    await store.close()
    _newer(tmp_path)
    before = _versions(tmp_path)
    newer = f"schema version {SCHEMA_VERSION + 1}, newer than this coordinator knows"
    with pytest.raises(StorageError, match=newer):
        await DatabasesJobStore(sqlite_url(tmp_path)).open()
    with pytest.raises(StorageError, match=newer):
        check_database(sqlite_url(tmp_path))
    assert _versions(tmp_path) == before
    OwnerLock(tmp_path / "store.db").acquire()  # the refused open let the lock go


def test_check_database_accepts_a_missing_or_current_file_and_names_a_broken_one(
    tmp_path: Path,
) -> None:
    check_database(sqlite_url(tmp_path))  # missing: open creates it
    assert not (tmp_path / "store.db").exists()  # and the check did not
    (tmp_path / "store.db").write_bytes(b"not a database" * 512)
    with pytest.raises(StorageError, match=r"cannot open .*store\.db: file is not a database"):
        check_database(sqlite_url(tmp_path))


async def test_check_database_accepts_a_database_this_build_wrote(tmp_path: Path) -> None:
    store = DatabasesJobStore(sqlite_url(tmp_path))
    await store.open()
    await store.close()
    check_database(sqlite_url(tmp_path))


@pytest.mark.parametrize(
    "case",
    [
        "not a database",
        "newer schema",
        "another program's",
        "a folder",
        "no folder",
        "memory",
        "hard link",
    ],
)
def test_serve_on_a_database_it_cannot_run_on_exits_1_with_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    case: str,
) -> None:
    """No traceback, no server, and no keys generated beside a file that is not ours."""
    db = tmp_path / "store.db"
    if case == "not a database":
        db.write_bytes(b"not a database" * 512)
        expected = f"cannot open {db}: file is not a database"
    elif case == "newer schema":
        anyio.run(_create, tmp_path)
        _newer(tmp_path)
        expected = f"schema version {SCHEMA_VERSION + 1}, newer than this coordinator knows"
    elif case == "another program's":
        _foreign(db)
        expected = f"{db}: not a coordinator database: it has a 'jobs' of its own"
    elif case == "a folder":
        db.mkdir()
        expected = f"cannot open {db}: it is a folder, not a database file"
    elif case == "hard link":  # another name: its own lock file, its own WAL
        anyio.run(_create, tmp_path)
        os.link(db, tmp_path / "other.db")
        expected = f"{db} has 2 names (hard links)"
    elif case == "memory":  # each connection would have its own: readers found no tables
        db = Path(":memory:")
        expected = "a SQLite :memory: database is private to one connection"
    else:
        db = tmp_path / "missing" / "store.db"
        expected = f"cannot create {db}: the folder {db.parent} does not exist"
    before = sorted(p.name for p in tmp_path.iterdir())
    for name in ("CLIENT_API_KEYS", "MINER_API_KEYS", "ADMIN_API_KEYS", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    assert main(["serve", "--port", "0", "--db", str(db)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith("aitbc-coordinator: ")
    assert expected in err
    after = sorted(p.name for p in tmp_path.iterdir())
    assert not [name for name in after if name not in before and "key" in name]


def _foreign(db: Path) -> list[tuple[str, str]]:
    """Another program's SQLite database at ``db``, with a table named as one of ours; its
    objects."""
    with closing(sqlite3.connect(db)) as con:
        con.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, title TEXT)")
        con.execute("INSERT INTO jobs (title) VALUES ('theirs')")
        con.commit()
        return con.execute("SELECT type, name FROM sqlite_schema ORDER BY name").fetchall()


async def test_another_programs_database_is_refused_untouched(tmp_path: Path) -> None:
    """A database that records no migration but has a table of ours by name is not ours: one
    line, and nothing written (migration 1 failed on the clash: a traceback at start-up, after
    ``schema_version`` had been created in the other program's database)."""
    db = tmp_path / "store.db"
    before = _foreign(db)
    refusal = "not a coordinator database: it has a 'jobs' of its own"
    with pytest.raises(StorageError, match=refusal):
        check_database(sqlite_url(tmp_path))
    for exclusive in (True, False):
        with pytest.raises(StorageError, match=refusal):
            await DatabasesJobStore(sqlite_url(tmp_path), exclusive=exclusive).open()
    with closing(sqlite3.connect(db)) as con:
        assert (
            con.execute("SELECT type, name FROM sqlite_schema ORDER BY name").fetchall() == before
        )
    # A database with tables of its own under other names takes the coordinator's beside them.
    other = tmp_path / "other.db"
    with closing(sqlite3.connect(other)) as con:
        con.execute("CREATE TABLE notes (body TEXT)")
    store = DatabasesJobStore(f"sqlite:///{other}")
    await store.open()
    await store.close()


async def _corrupt_jobs(tmp_path: Path) -> None:
    """A coordinator database at ``tmp_path/store.db`` whose jobs table is damaged deep inside:
    its header, schema and ``schema_version`` read fine."""
    store = DatabasesJobStore(sqlite_url(tmp_path))
    await store.open()
    jobs = [job(f"j{n}", payload={"type": "x", "blob": "y" * 2000}) for n in range(50)]
    await store.commit(batch(jobs=jobs, events=[event(j.job_id, 1) for j in jobs]))
    await store.close()
    db = tmp_path / "store.db"
    with closing(sqlite3.connect(db)) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        (root,) = con.execute("SELECT rootpage FROM sqlite_schema WHERE name = 'jobs'").fetchone()
        (size,) = con.execute("PRAGMA page_size").fetchone()
    with db.open("r+b") as f:
        f.seek((root - 1) * size)
        f.write(b"\xab" * size)


def test_serve_on_a_database_damaged_deep_inside_stops_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start-up checks read only the schema; the damage shows when the app loads the live
    jobs: the reason is one line (it was Starlette's traceback, twice chained), then uvicorn's
    start-up failure (exit status 3)."""
    anyio.run(_corrupt_jobs, tmp_path)
    for name in ("CLIENT_API_KEYS", "MINER_API_KEYS", "ADMIN_API_KEYS", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as stopped:
        main(["serve", "--port", "0", "--log-level", "warning", "--db", str(tmp_path / "store.db")])
    assert stopped.value.code == 3
    gc.collect()  # the listening socket was closed: no ResourceWarning
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "cannot start: database disk image is malformed\n" in err


async def _create(tmp_path: Path) -> None:
    store = DatabasesJobStore(sqlite_url(tmp_path))
    await store.open()
    await store.close()


def _older(tmp_path: Path) -> None:
    """A database at ``tmp_path/store.db`` with every migration but the last applied."""
    con = sqlite3.connect(tmp_path / "store.db")
    con.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for version, statements in MIGRATIONS[:-1]:
        for sql in statements:
            con.execute(sql)
        con.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
    con.commit()
    con.close()


async def test_only_the_owner_migrates(tmp_path: Path) -> None:
    """A read-only store (the audit) refuses an older schema instead of upgrading it under a
    coordinator that may be running on it; the owner then upgrades it as before."""
    _older(tmp_path)
    before = _versions(tmp_path)
    reader = DatabasesJobStore(sqlite_url(tmp_path), exclusive=False)
    lacks = f"older than this build's \\(it lacks version {SCHEMA_VERSION}\\): start the"
    with pytest.raises(StorageError, match=lacks):
        await reader.open()
    assert _versions(tmp_path) == before
    owner = DatabasesJobStore(sqlite_url(tmp_path))
    await owner.open()
    await owner.close()
    assert _versions(tmp_path) == [*before, SCHEMA_VERSION]


async def test_a_read_only_store_creates_nothing_in_an_empty_file(tmp_path: Path) -> None:
    reader = DatabasesJobStore(sqlite_url(tmp_path), exclusive=False)
    with pytest.raises(StorageError, match="no coordinator schema yet"):
        await reader.open()
    con = sqlite3.connect(tmp_path / "store.db")
    try:
        assert con.execute("SELECT name FROM sqlite_schema").fetchall() == []
    finally:
        con.close()


def test_receipts_audit_of_an_older_database_exits_2_and_leaves_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECEIPT_SIGNING_KEY_HEX", "42" * 32)
    _older(tmp_path)
    before = _versions(tmp_path)
    assert main(["receipts", "audit", "--db", str(tmp_path / "store.db")]) == 2
    out, err = capsys.readouterr()
    assert len((out + err).splitlines()) == 1
    assert "start the coordinator on it once, which upgrades it" in out + err
    assert _versions(tmp_path) == before


def _full_after(monkeypatch: pytest.MonkeyPatch, pages: int) -> None:
    """Every store connection opened from now on finds its database full at ``pages`` pages
    (SQLite answers a write past that as a full disk, and rolls the transaction back)."""
    pragmas = DatabasesJobStore._pragmas

    async def full(self: DatabasesJobStore, raw: Any) -> None:
        await pragmas(self, raw)
        await self._pragma(raw, f"max_page_count = {pages}")

    monkeypatch.setattr(DatabasesJobStore, "_pragmas", full)


def _pages(db: Path) -> int:
    with closing(sqlite3.connect(db)) as con:
        (pages,) = con.execute("PRAGMA page_count").fetchone()
    return int(pages)


async def test_a_commit_on_a_full_disk_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite rolls back a transaction that finds the disk full: the store's own ROLLBACK then
    failed, and its "cannot rollback - no transaction is active" was the error that stopped
    the coordinator, in place of the full disk."""
    await _create(tmp_path)
    _full_after(monkeypatch, _pages(tmp_path / "store.db") + 2)
    store = DatabasesJobStore(sqlite_url(tmp_path))
    await store.open()
    try:
        jobs = [job(f"j{n}", payload={"type": "x", "blob": "y" * 2000}) for n in range(50)]
        with pytest.raises(StorageError, match=r"^database or disk is full$"):
            await store.commit(batch(jobs=jobs, events=[event(j.job_id, 1) for j in jobs]))
        await store.commit(batch(jobs=[job("small")], events=[event("small", 1)]))
        assert await store.get_job("small") is not None
    finally:
        await store.close()


def test_a_migration_that_cannot_be_written_says_why_and_changes_nothing(tmp_path: Path) -> None:
    """The same at start-up: migration 5's COMMIT failed (the WAL could not grow), SQLite rolled
    it back, and the start-up said ``cannot start: cannot rollback - no transaction is
    active``."""
    _older(tmp_path)
    db = tmp_path / "store.db"
    with closing(sqlite3.connect(db)) as con:  # receipts that migration 5 copies
        con.executemany(
            "INSERT INTO receipts (receipt_id, job_id, issued_at, receipt, chain_seq) "
            "VALUES (?, ?, ?, ?, ?)",
            [(f"r{n}", f"j{n}", n, "x" * 2000, n + 1) for n in range(50)],
        )
        con.commit()
    before = _versions(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEYS")}
    keys = {"CLIENT_API_KEYS": "client-key-1", "RECEIPT_SIGNING_KEY_HEX": "11" * 32}
    done = serve_once(db, {**env, **keys}, max_file_bytes=64 << 10)
    assert done.returncode == 3, done.stderr
    assert "cannot start: disk I/O error\n" in done.stderr
    assert "rollback" not in done.stderr
    assert _versions(tmp_path) == before


@pytest.mark.parametrize(
    ("table", "column", "value", "where", "said"),
    [
        ("jobs", "payload", "'{\"gpus\": ['", "job_id = 'j1'", "not JSON"),
        ("miners", "capabilities", "'{\"gpus\": ['", "miner_id = 'm1'", "not JSON"),
        # A value of the wrong kind (SQLite keeps any value in any column): a traceback at
        # start-up (``-priority`` of a text, ``constraints.get`` of an int, a payment that is
        # no object), or a start that went on with a job or miner that failed later.
        ("jobs", "payload", "5", "job_id = 'j1'", "'5' is not a JSON object"),
        ("jobs", "constraints", "'null'", "job_id = 'j1'", "'null' is not a JSON object"),
        ("jobs", "priority", "'abc'", "job_id = 'j1'", "'abc' is not an integer"),
        ("jobs", "seq", "'abc'", "job_id = 'j1'", "'abc' is not an integer"),
        ("jobs", "expires_at", "'abc'", "job_id = 'j1'", "'abc' is not a number"),
        ("jobs", "payment", "'[1]'", "job_id = 'j1'", "'[1]' is not a JSON object"),
        ("jobs", "payment", "'{\"amount\": 1}'", "job_id = 'j1'", "not a payment"),
        ("miners", "concurrency", "'abc'", "miner_id = 'm1'", "'abc' is not an integer"),
        ("miners", "capabilities", "'[]'", "miner_id = 'm1'", "'[]' is not a JSON object"),
        ("miners", "last_seen", "'abc'", "miner_id = 'm1'", "'abc' is not a number"),
    ],
)
def test_serve_on_a_damaged_row_stops_with_one_line_naming_it(
    tmp_path: Path,
    table: str,
    column: str,
    value: str,
    where: str,
    said: str,
) -> None:
    """SQLite keeps no checksum of a value, nor its column's type: a payload cut short (a
    damaged file, a hand edit) reads back as text that is no JSON, and any column can hold a
    value of another kind. Start-up then died with a traceback (ending in the protocol's
    "malformed JSON (close 1007)", as if a peer had sent it), or went on with the row; now
    the store says which table, row and column are damaged, one line, exit 3."""

    async def create() -> None:
        store = DatabasesJobStore(sqlite_url(tmp_path))
        await store.open()
        miner = MinerRecord(
            miner_id="m1",
            key_hash="k" * 64,
            session_id="s1",
            capabilities={"gpus": []},
            concurrency=1,
            region=None,
            last_seen=1.0,
        )
        jobs = [job("j0"), job("j1")]
        await store.commit(
            batch(jobs=jobs, events=[event(j.job_id, 1) for j in jobs], miners=[miner])
        )
        await store.close()

    anyio.run(create)
    with closing(sqlite3.connect(tmp_path / "store.db")) as con:
        con.execute(f"UPDATE {table} SET {column} = {value} WHERE {where}")
        con.commit()
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEYS")}
    env.pop("DATABASE_URL", None)
    # A child process: a start that goes on with the row would serve until the timeout.
    done = serve_once(tmp_path / "store.db", env, timeout=20)
    err = done.stderr
    assert done.returncode == 3, err
    assert "Traceback" not in err
    row = where.split(" = ")[1].strip("'")
    assert (
        f"cannot start: {table} row {row}, column {column}: the stored value is damaged ({said})\n"
        in err
    )


@contextmanager
def _read_only(path: Path) -> Iterator[None]:
    """``path`` cannot be written while this lasts: mode 0444, and for root (whom modes do not
    stop) the immutable attribute; skips the test where neither holds."""
    path.chmod(0o444)
    immutable = False
    try:
        if os.access(path, os.W_OK):
            done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False)
            immutable = done.returncode == 0
            if not immutable:
                pytest.skip("cannot make a file read-only here (root, no chattr +i)")
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o644)


def test_serve_on_a_read_only_database_exits_1_with_one_line(tmp_path: Path) -> None:
    """A database file the coordinator cannot write (a read-only file or mount) passed the
    checks and the start-up, which only read it: the coordinator reported ready, then stopped
    on its first commit ("attempt to write a readonly database", a traceback in the log). It
    is now refused before anything starts, as any database serve cannot run on."""
    anyio.run(_create, tmp_path)
    db = tmp_path / "store.db"
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEYS")}
    env.pop("DATABASE_URL", None)
    with _read_only(db):
        done = serve_once(db, env, timeout=20)  # it served (and waited for its first commit)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == f"aitbc-coordinator: cannot write {db}: it is read-only\n"
    assert not [p for p in tmp_path.iterdir() if "key" in p.name]


def test_receipts_audit_reads_a_read_only_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit only reads: a read-only database (a backup on a read-only mount) is fine."""
    monkeypatch.setenv("RECEIPT_SIGNING_KEY_HEX", "42" * 32)
    anyio.run(_create, tmp_path)
    db = tmp_path / "store.db"
    with _read_only(db):
        assert main(["receipts", "audit", "--db", str(db)]) == 0
    assert "receipt chain OK: 0 receipts" in capsys.readouterr().out


def test_serve_on_a_fifo_exits_1_with_one_line(tmp_path: Path) -> None:
    """A database path that is a FIFO (or another file that is not a regular one) blocked the
    start-up's checks for good, opening it to read, and no SIGTERM could stop it (found by the
    lifecycle hunt). It is refused before anything opens it."""
    db = tmp_path / "store.db"
    os.mkfifo(db)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEYS")}
    env.pop("DATABASE_URL", None)
    done = serve_once(db, env, timeout=20)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == f"aitbc-coordinator: cannot open {db}: it is not a regular file\n"


@pytest.mark.parametrize(
    ("value", "said"),
    [("'5'", "'5' is not a JSON object"), ('\'{"chain_seq": "x"}\'', "no chain_seq")],
)
async def test_a_damaged_chain_head_is_refused_naming_its_row(
    tmp_path: Path, value: str, said: str
) -> None:
    """The newest receipt is read at every start to continue the chain: one that reads back as
    JSON but not a receipt (a hand edit, a damaged file) stopped the start with a traceback
    (TypeError, KeyError); now it is the store's one line naming the row, as other rows."""
    store = DatabasesJobStore(sqlite_url(tmp_path))
    await store.open()
    await store.commit(batch(receipts=[receipt_row("r1", chain_seq=1)]))
    await store.close()
    with closing(sqlite3.connect(tmp_path / "store.db")) as con:
        con.execute(f"UPDATE receipts SET receipt = {value}")
        con.commit()
    await store.open()
    try:
        with pytest.raises(
            StorageError,
            match=f"receipts row 1, column receipt: the stored value is damaged \\({said}",
        ):
            await store.receipt_chain_head()
    finally:
        await store.close()
