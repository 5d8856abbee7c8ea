"""``aitbc-coordinator backup``: a consistent copy of a running coordinator's SQLite store."""

from __future__ import annotations

import sqlite3
import stat
from contextlib import closing
from typing import TYPE_CHECKING

import anyio

from tests.web.rest_harness import running_api
from web.cli import main

if TYPE_CHECKING:
    from pathlib import Path

    import pytest


def jobs_in(path: Path) -> list[tuple[str, str]]:
    with closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT job_id, state FROM jobs ORDER BY rowid").fetchall()


def test_a_backup_of_a_running_coordinator_has_every_committed_job_and_its_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Taken while the coordinator runs (its last commits may be in the WAL yet), the copy holds
    every committed job and a receipt chain that audits; the generated keys beside the
    database are copied beside it, private as they were."""
    db = tmp_path / "coordinator.db"
    for suffix, text in ((".keys.json", '{"client": "k"}'), (".signing-key", "11" * 32)):
        key = tmp_path / f"coordinator.db{suffix}"
        key.write_text(text)
        key.chmod(0o600)
    dest = tmp_path / "saved" / "backup.db"
    dest.parent.mkdir()
    ids, queued = anyio.run(_back_up_while_running, tmp_path, dest)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"backed up {db} to {dest} (")
    assert out[1:] == [
        f"with {db}.keys.json as {dest}.keys.json",
        f"with {db}.signing-key as {dest}.signing-key",
    ]
    assert jobs_in(dest) == [*((i, "COMPLETED") for i in ids), (queued, "QUEUED")]
    for suffix in (".keys.json", ".signing-key"):
        copy = tmp_path / "saved" / f"backup.db{suffix}"
        assert copy.read_text() == (tmp_path / f"coordinator.db{suffix}").read_text()
        assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert main(["receipts", "audit", "--db", str(dest)]) == 0
    assert "3 receipts" in capsys.readouterr().out
    assert not (tmp_path / "saved" / "backup.db.partial").exists()


async def _back_up_while_running(tmp_path: Path, dest: Path) -> tuple[list[str], str]:
    """Three jobs completed and one queued, then ``backup`` while the coordinator runs."""
    async with running_api(tmp_path) as api:
        assert (await api.register("m1")).status_code == 200
        ids = []
        for _ in range(3):
            job = await api.submit()
            assert (await api.poll("m1")).status_code == 200
            assert (await api.result(job["job_id"])).status_code == 200
            ids.append(job["job_id"])
        queued = (await api.submit())["job_id"]
        db = tmp_path / "coordinator.db"
        assert main(["backup", str(dest), "--db", str(db)]) == 0
    return ids, queued


def test_a_backup_never_overwrites_and_needs_a_sqlite_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "coordinator.db"
    taken = tmp_path / "taken.db"
    taken.write_text("keep me")

    def refused(*args: str) -> str:
        assert main(["backup", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        return err.removeprefix("aitbc-coordinator backup: ").strip()

    assert refused(str(tmp_path / "new.db"), "--db", str(db)) == f"no database at {db}"
    db.write_text("not a database at all, but long enough to have a header of sixteen bytes")
    assert "file is not a database" in refused(str(tmp_path / "new.db"), "--db", str(db))
    anyio.run(_create_store, tmp_path)
    assert refused(str(taken), "--db", str(db)) == f"{taken} exists: name a new file"
    assert taken.read_text() == "keep me"
    (tmp_path / "new.db.signing-key").write_text("an older backup's key")
    (tmp_path / "coordinator.db.signing-key").write_text("11" * 32)
    assert refused(str(tmp_path / "new.db"), "--db", str(db)) == (
        f"{tmp_path / 'new.db.signing-key'} exists: name a new file"
    )
    assert not (tmp_path / "new.db").exists()
    monkeypatch.setenv("DATABASE_URL", "postgresql://user@db.internal/aitbc")
    assert refused(str(tmp_path / "pg.db")) == (
        "this copies a SQLite database; back PostgreSQL up with pg_dump"
    )


async def _create_store(tmp_path: Path) -> None:
    (tmp_path / "coordinator.db").unlink()
    async with running_api(tmp_path):
        pass
