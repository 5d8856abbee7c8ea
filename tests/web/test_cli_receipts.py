"""``aitbc-coordinator receipts verify|audit`` against a real store written by the app."""

from __future__ import annotations

import json
import sqlite3
import sys
from contextlib import closing
from typing import TYPE_CHECKING, Any

import anyio
import asyncpg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.conftest import CLIENT_KEY, SIGNING_SEED
from tests.web.rest_harness import running_api
from web.cli import main

if TYPE_CHECKING:
    from pathlib import Path

PUBLIC_HEX = (
    Ed25519PrivateKey.from_private_bytes(bytes.fromhex(SIGNING_SEED))
    .public_key()
    .public_bytes_raw()
    .hex()
)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    monkeypatch.chdir(tmp_path)
    for name in ("RECEIPT_SIGNING_KEY_HEX", "RECEIPT_PREVIOUS_KEYS", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def issue_receipts(tmp_path: Path, count: int = 3) -> list[dict[str, Any]]:
    """Run the app and complete ``count`` jobs through a REST miner: their receipts."""
    return anyio.run(_issue, tmp_path, count)


async def _issue(tmp_path: Path, count: int, **settings: Any) -> list[dict[str, Any]]:
    out = []
    async with running_api(tmp_path, **settings) as api:
        assert (await api.register("m1")).status_code == 200
        for _ in range(count):
            job = await api.submit()
            assert (await api.poll("m1")).status_code == 200
            out.append((await api.result(job["job_id"])).json()["receipt"])
        r = await api.http.get(
            f"/v1/jobs/{out[0]['job_id']}/receipts", headers={"X-Api-Key": CLIENT_KEY}
        )
        assert r.json()["items"] == out[:1]
    return out


def db_path(tmp_path: Path) -> Path:
    return tmp_path / "coordinator.db"


def edit_db(tmp_path: Path, sql: str, *args: Any) -> None:
    with closing(sqlite3.connect(db_path(tmp_path))) as db:
        db.execute(sql, args)
        db.commit()


def audit(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> tuple[int, str]:
    code = main(["receipts", "audit", "--db", str(db_path(tmp_path))])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# ---- audit --------------------------------------------------------------------------------


def test_audit_of_an_intact_chain(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    issue_receipts(tmp_path)
    env.setenv("RECEIPT_SIGNING_KEY_HEX", SIGNING_SEED)
    assert audit(capsys, tmp_path) == (0, "receipt chain OK: 3 receipts\n")


@pytest.mark.anyio
async def test_audit_of_a_postgresql_chain_reads_database_url(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], postgres_url: str
) -> None:
    """On PostgreSQL the audit reads ``DATABASE_URL`` (no file to check), and finds a receipt
    edited in the database."""
    receipts = await _issue(tmp_path, 3, database_url=postgres_url)
    env.setenv("DATABASE_URL", postgres_url)
    env.setenv("RECEIPT_SIGNING_KEY_HEX", SIGNING_SEED)

    def run() -> tuple[int, str]:
        code = main(["receipts", "audit"])
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    assert await anyio.to_thread.run_sync(run) == (0, "receipt chain OK: 3 receipts\n")
    conn = await asyncpg.connect(postgres_url)
    await conn.execute(
        "UPDATE receipts SET receipt = $1 WHERE chain_seq = 3",
        json.dumps({**receipts[2], "price": 0.0}),
    )
    await conn.close()
    code, out = await anyio.to_thread.run_sync(run)
    assert code == 1
    assert out.startswith("chain broken at chain_seq 3 ")


def test_audit_db_overrides_an_invalid_database_url(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--db`` overrides DATABASE_URL, which was read (and refused: exit 2) first."""
    issue_receipts(tmp_path, 1)
    env.setenv("DATABASE_URL", "mysql://db/x")
    code, out = audit(capsys, tmp_path)
    assert (code, out.strip().splitlines()[-1]) == (0, "receipt chain OK: 1 receipts"), out


def test_audit_of_a_file_whose_name_a_url_would_misread(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--db`` names a file, whatever its characters: ``#`` and ``?`` ended the path of the
    URL it became (the audit read ``chain`` and found no schema there) and ``%41`` was read as
    ``A``."""
    issue_receipts(tmp_path)
    env.setenv("RECEIPT_SIGNING_KEY_HEX", SIGNING_SEED)
    for name in ("chain #1.db", "chain?x=1.db", "chain %41.db"):
        db = tmp_path / name
        db_path(tmp_path).rename(db)
        before = sorted(p.name for p in tmp_path.iterdir())
        assert main(["receipts", "audit", "--db", str(db)]) == 0, name
        assert capsys.readouterr().out == "receipt chain OK: 3 receipts\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing else opened
        db.rename(db_path(tmp_path))


def test_audit_reports_the_first_tampered_receipt(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    receipts = issue_receipts(tmp_path)
    env.setenv("RECEIPT_SIGNING_KEY_HEX", SIGNING_SEED)
    cheaper = {**receipts[1], "price": 0.0}
    edit_db(tmp_path, "UPDATE receipts SET receipt = ? WHERE chain_seq = 2", json.dumps(cheaper))
    code, out = audit(capsys, tmp_path)
    assert code == 1
    assert out == (
        f"chain broken at chain_seq 2 (receipt {receipts[1]['receipt_id']}, 1 receipts fine "
        "before it): signature does not verify\n"
    )


def test_audit_reports_a_deleted_receipt(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    issue_receipts(tmp_path)
    env.setenv("RECEIPT_SIGNING_KEY_HEX", SIGNING_SEED)
    edit_db(tmp_path, "DELETE FROM receipts WHERE chain_seq = 2")
    code, out = audit(capsys, tmp_path)
    assert code == 1
    assert out.startswith("chain broken at chain_seq 3")
    assert "a receipt is missing" in out


def test_audit_pins_the_configured_key(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another configured key: the first receipt is already not the coordinator's."""
    issue_receipts(tmp_path, 1)
    env.setenv("RECEIPT_SIGNING_KEY_HEX", "77" * 32)
    code, out = audit(capsys, tmp_path)
    assert code == 1
    assert "chain_seq 1" in out
    assert "not a pinned coordinator key" in out


def test_audit_without_a_key_warns_and_checks_integrity(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    issue_receipts(tmp_path, 2)
    code, out = audit(capsys, tmp_path)
    assert code == 0
    assert out.startswith("warning: no signing key configured")
    assert out.endswith("receipt chain OK: 2 receipts\n")


def test_audit_uses_a_generated_key_file(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The development key kept beside the database is the pinned key when none is set."""
    issue_receipts(tmp_path, 1)
    (tmp_path / "coordinator.db.signing-key").write_text("77" * 32 + "\n")
    code, out = audit(capsys, tmp_path)
    assert (code, "not a pinned coordinator key" in out) == (1, True)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "no database at"),
        ("bad-setting", "RECEIPT_PREVIOUS_KEYS"),
        ("folder", "it is a folder, not a database file"),
        ("not-sqlite", "file is not a database"),
    ],
)
def test_audit_usage_errors_exit_2(
    env: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    setup: str,
    message: str,
) -> None:
    if setup == "bad-setting":
        env.setenv("RECEIPT_PREVIOUS_KEYS", "nonsense")
    elif setup == "folder":  # aiosqlite's thread was left to fail after the loop closed
        db_path(tmp_path).mkdir()
    elif setup == "not-sqlite":
        db_path(tmp_path).write_text("hello")
    code, out = audit(capsys, tmp_path)
    assert code == 2
    assert message in out
    assert len(out.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["verify", "audit"])
def test_a_damaged_signing_key_file_exits_2_with_one_line(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """The generated ``<database>.signing-key`` that both commands fall back on, damaged: one
    line naming it, exit 2 (it was a traceback)."""
    issue_receipts(tmp_path, 1)
    key = tmp_path / "coordinator.db.signing-key"
    key.write_text("garbage\n")
    file = tmp_path / "r.json"
    file.write_text("{}")
    args = [str(file)] if command == "verify" else ["--db", str(db_path(tmp_path))]
    code = main(["receipts", command, *args])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert key.name in line


# ---- verify -------------------------------------------------------------------------------


def run_verify(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["receipts", "verify", *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_verify_a_file_with_a_pinned_key(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    receipts = issue_receipts(tmp_path, 2)
    ids = [r["receipt_id"] for r in receipts]
    good = tmp_path / "receipts.json"
    good.write_text(json.dumps({"items": receipts}))
    assert run_verify(capsys, str(good), "--key", PUBLIC_HEX) == (0, f"OK {ids[0]}\nOK {ids[1]}\n")
    single = tmp_path / "one.json"
    single.write_text(json.dumps({"status": "ok", "receipt": receipts[0]}))
    assert run_verify(capsys, str(single), "--key", PUBLIC_HEX)[0] == 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([receipts[0], {**receipts[1], "units": 0}, "junk"]))
    code, out = run_verify(capsys, str(bad), "--key", PUBLIC_HEX)
    assert code == 1
    assert out.splitlines() == [
        f"OK {ids[0]}",
        f"INVALID {ids[1]}: signature does not verify",
        "INVALID #2: receipt is not a JSON object",
    ]
    other = "0" * 63 + "1"
    code, out = run_verify(capsys, str(good), "--key", other)
    assert code == 1
    assert "not a pinned coordinator key" in out


@pytest.mark.parametrize("doc", [{"items": []}, []])
def test_verify_of_a_file_with_no_receipts_exits_1(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], doc: object
) -> None:
    """A file holding no receipt (a failed job's empty receipt list) printed nothing and exited
    0, "all valid", so `verify FILE && trust` passed on nothing (found by the docs hunt)."""
    empty = tmp_path / "none.json"
    empty.write_text(json.dumps(doc))
    assert run_verify(capsys, str(empty), "--key", PUBLIC_HEX) == (
        1,
        f"aitbc-coordinator receipts: no receipts in {empty}\n",
    )


def test_verify_with_keys_url_and_with_configured_keys(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    receipts = issue_receipts(tmp_path, 1)
    file = tmp_path / "r.json"
    file.write_text(json.dumps(receipts[0]))

    async def keys_doc() -> Any:
        async with running_api(tmp_path) as api:
            return (await api.http.get("/v1/receipts/signing-keys")).json()

    doc = tmp_path / "keys.json"
    doc.write_text(json.dumps(anyio.run(keys_doc)))
    assert run_verify(capsys, str(file), "--keys-url", doc.as_uri())[0] == 0
    env.setenv("RECEIPT_SIGNING_KEY_HEX", SIGNING_SEED)
    assert run_verify(capsys, str(file))[0] == 0
    env.setenv("RECEIPT_SIGNING_KEY_HEX", "77" * 32)
    assert run_verify(capsys, str(file))[0] == 1


def test_verify_with_an_empty_keys_url_is_refused(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--keys-url "$URL"`` with URL unset pinned the configured keys instead, and said OK:
    a script meant to check receipts against another coordinator's keys passed on this one's.
    It is a usage error, as an empty ``--db`` is."""
    receipts = issue_receipts(tmp_path, 1)
    file = tmp_path / "r.json"
    file.write_text(json.dumps(receipts[0]))
    env.setenv("RECEIPT_SIGNING_KEY_HEX", SIGNING_SEED)
    code, out = run_verify(capsys, str(file), "--keys-url", "")
    assert code == 2
    assert out.startswith("aitbc-coordinator receipts: --keys-url ''")
    assert len(out.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "no key to pin"),
        (("--key", "xyz"), "--key 'xyz'"),
        (("--keys-url", "file:///nonexistent/keys.json"), "--keys-url"),
        (("--keys-url", "RECEIPTS"), "--keys-url"),
        (("--keys-url", "DEEP"), "--keys-url"),  # was a RecursionError traceback
        (("--keys-url", "http://h:x/"), "--keys-url"),  # was an InvalidURL traceback
    ],
)
def test_verify_usage_errors_exit_2(
    env: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: tuple[str, ...],
    message: str,
) -> None:
    file = tmp_path / "r.json"
    file.write_text("{}")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    args = tuple(
        {"RECEIPTS": file.as_uri(), "DEEP": deep.as_uri()}.get(a, a)  # not a keys document
        for a in args
    )
    code, out = run_verify(capsys, str(file), *args)
    assert code == 2
    assert message in out


def test_verify_without_a_key_says_where_it_looked_for_one(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After ``serve --db FILE`` the generated key is beside FILE: ``receipts verify`` looked
    beside ./coordinator.db and said only "(or set RECEIPT_SIGNING_KEY_HEX)". It names the file
    it looked for, and the option that moves it."""
    file = tmp_path / "r.json"
    file.write_text("{}")
    code, out = run_verify(capsys, str(file))
    assert code == 2
    assert out == (
        "aitbc-coordinator receipts: no key to pin: give --key or --keys-url (no "
        "RECEIPT_SIGNING_KEY_HEX, and no generated key at coordinator.db.signing-key: --db "
        "names the coordinator's database)\n"
    )


def test_verify_db_finds_the_key_generated_beside_that_database(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``receipts verify FILE --db DB`` pins the key ``serve --db DB`` generated (as ``receipts
    audit --db`` reads it), over a DATABASE_URL that is not read then."""
    receipts = issue_receipts(tmp_path, 1)  # signed with SIGNING_SEED
    database = tmp_path / "served" / "c.db"
    database.parent.mkdir()
    (tmp_path / "served" / "c.db.signing-key").write_text(SIGNING_SEED + "\n")
    file = tmp_path / "r.json"
    file.write_text(json.dumps(receipts[0]))
    env.setenv("DATABASE_URL", "not a url")
    code, out = run_verify(capsys, str(file), "--db", str(database))
    assert (code, out) == (0, f"OK {receipts[0]['receipt_id']}\n")


@pytest.mark.parametrize("content", ["not json", None, "[" * 100_000, b"\xff\xfe"])
def test_verify_unreadable_input_exits_2(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: Any
) -> None:
    """Missing, not JSON, nested deeper than the parser goes, not UTF-8: one line naming the
    file, exit 2. The deep one was a RecursionError traceback, or a segmentation fault where
    the recursion limit was raised as py_ecc (which eth-account imports for wallet logins)
    raises it: so it is read under that limit here."""
    file = tmp_path / "r.json"
    if isinstance(content, bytes):
        file.write_bytes(content)
    elif content is not None:
        file.write_text(content)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 100_000))
    try:
        code, out = run_verify(capsys, str(file), "--key", PUBLIC_HEX)
    finally:
        sys.setrecursionlimit(limit)
    assert code == 2
    [line] = out.splitlines()
    assert "r.json" in line
    if content == b"\xff\xfe":  # it said "str is not valid UTF-8: surrogates not allowed"
        assert line.endswith("r.json: it is not UTF-8: byte 0xff at offset 0")


def test_receipts_without_a_command_names_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    """``aitbc-coordinator receipts`` said "the following arguments are required:
    receipts_command", an internal name: it names the commands to choose from."""
    with pytest.raises(SystemExit) as exited:
        main(["receipts"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.endswith(
        "error: the following arguments are required: {verify,audit}\n"
    )
