"""``DatabasesJobStore``: the SQLite store (the only module that imports aiosqlite/sqlite3),
and ``SqlStore``: the reads it shares with the PostgreSQL store (storage/postgres.py).

``databases`` owns the connections, migrations and reads. The group-commit writer does not pay
per-statement SQL compilation: it uses pre-built SQL and one ``executemany`` per statement type
per batch on the writer connection's raw driver, and one COMMIT per batch.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from databases import Database, DatabaseURL

from protocol.codec import dumps, loads as decode
from protocol.errors import RemoteProtocolError
from protocol.records import EventRecord, JobRecord, MinerRecord
from storage import wallet_sql
from storage.base import (
    RECENT_FIELDS,
    JobAge,
    JobSummary,
    MinerEarnings,
    PaymentStats,
    chars_page,
)
from storage.errors import Conflict, StorageError, StoreInUse
from storage.owner import OwnerLock, check_one_name, lock_path
from storage.schema import MIGRATIONS, OUR_NAMES

if TYPE_CHECKING:
    from collections.abc import (
        AsyncIterator,
        Callable,
        Collection,
        Iterable,
        Iterator,
        Sequence,
    )

    from databases.core import Connection

    from protocol.types import JSONObject
    from storage.base import JobQuery, LedgerEntry, PaymentRecord, WalletSnapshot, WriteBatch

__all__ = [
    "DatabasesJobStore",
    "SqlStore",
    "check_database",
    "check_schema",
    "copy_database",
    "database_file",
    "left_beside",
    "map_driver_errors",
    "refuse_orphaned_wal",
    "sync_file",
]

# Idempotency keys ``find_jobs`` looks up per query (two parameters each: below SQLite's
# 32766 and PostgreSQL's 32767 parameters, and short enough for the planner to use the index).
FIND_JOBS_PAGE = 200

_JOB_COLUMNS = (
    "job_id",
    "client_id",
    "state",
    "payload",
    "constraints",
    "priority",
    "requested_at",
    "expires_at",
    "attempt",
    "failures",
    "max_attempts",
    "seq",
    "miner_id",
    "assigned_at",
    "started_at",
    "finished_at",
    "result",
    "receipt",
    "error",
    "idempotency_key",
    "payment",
)
# Set at submission and never changed afterwards: a later snapshot (update or upsert) keeps them.
_IMMUTABLE = (
    "job_id",
    "client_id",
    "payload",
    "constraints",
    "priority",
    "requested_at",
    "expires_at",
    "max_attempts",
    "idempotency_key",
    "payment",
)
# ``receipt_id`` is stored, not read back: it names the job's receipt in ``receipts``.
_UPDATE_COLUMNS = (*(c for c in _JOB_COLUMNS if c not in _IMMUTABLE), "receipt_id")
# The order of ``_job_row``'s values: what never changes, then what ``_UPDATE_JOB`` sets.
_ROW_COLUMNS = _IMMUTABLE + _UPDATE_COLUMNS
_UPSERT_JOB = "INSERT INTO jobs ({}) VALUES ({}) ON CONFLICT (job_id) DO UPDATE SET {}".format(
    ", ".join(_ROW_COLUMNS),
    ", ".join("?" * len(_ROW_COLUMNS)),
    ", ".join(f"{c} = excluded.{c}" for c in _UPDATE_COLUMNS),
)
# A job's row is written whole with its first event (seq 1); later snapshots only update the
# columns that change: cheaper for SQLite than an upsert, and the write-once JSON (payload,
# constraints) is encoded once. A snapshot whose row turns out not to exist yet (a batch
# without the first event: restores, tests) falls back to the upsert.
_UPDATE_JOB = f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in _UPDATE_COLUMNS)} WHERE job_id = ?"
# The driver binds ``None`` after an adapter probe (a key tuple, a registry lookup, two attribute
# lookups): about 0.5 µs a value, ten values a job. The usual shapes of a row say their NULLs in
# the statement instead: a job written with its first event has not started, finished or failed
# and has no idempotency key or payment (``_fresh_row``); a later snapshot without an error or a
# receipt copy of its own (the receipt is in ``receipts``) updates them to NULL (``_plain``).
_FRESH_NULLS = frozenset(
    (
        "idempotency_key",
        "payment",
        "started_at",
        "finished_at",
        "result",
        "receipt",
        "error",
        "receipt_id",
    )
)
_UPSERT_FRESH_JOB = _UPSERT_JOB.replace(
    ", ".join("?" * len(_ROW_COLUMNS)),
    ", ".join("NULL" if c in _FRESH_NULLS else "?" for c in _ROW_COLUMNS),
)
_UPDATE_PLAIN_JOB = _UPDATE_JOB.replace("receipt = ?, error = ?", "receipt = NULL, error = NULL")
_PLAIN_NULLS = ("receipt", "error")


def _nulls_said(
    columns: tuple[str, ...], nulls: Iterable[str]
) -> Callable[[tuple[Any, ...]], tuple[Any, ...] | None]:
    """For a row in ``columns`` order: the values of the other columns when those of ``nulls``
    (at least two) are all None, which the statement then says as NULL; else None."""
    at = {c: i for i, c in enumerate(columns)}
    null_values = itemgetter(*(at[c] for c in nulls))
    values = itemgetter(*(i for c, i in at.items() if c not in nulls))

    def bound(row: tuple[Any, ...]) -> tuple[Any, ...] | None:
        said = null_values(row)
        return values(row) if said.count(None) == len(said) else None

    return bound


# The ``_UPSERT_FRESH_JOB`` parameters of a ``_job_row``, or None when it cannot be used.
_fresh_row = _nulls_said(_ROW_COLUMNS, _FRESH_NULLS)
# The ``_UPDATE_PLAIN_JOB`` parameters of a ``_job_update``, or None when it cannot be used.
_plain = _nulls_said((*_UPDATE_COLUMNS, "job_id"), _PLAIN_NULLS)
_INSERT_EVENT = (
    "INSERT INTO job_events (job_id, seq, event, state, at, attempt, miner_id, data) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_DELETE_EVENTS = "DELETE FROM job_events WHERE job_id = ?"
_DELETE_JOB = "DELETE FROM jobs WHERE job_id = ?"
_UPSERT_MINER = (
    "INSERT INTO miners (miner_id, key_hash, session_id, capabilities, concurrency, region, "
    "last_seen) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (miner_id) DO UPDATE SET "
    "session_id = excluded.session_id, capabilities = excluded.capabilities, "
    "concurrency = excluded.concurrency, region = excluded.region, last_seen = excluded.last_seen"
)
_INSERT_RECEIPT = (
    "INSERT INTO receipts (receipt_id, job_id, miner_id, issued_at, receipt, chain_seq) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (receipt_id) DO NOTHING"
)
# The exchange's public figures (/v1/exchange/market-stats), in one pass over the payments.
# The sums in two parts (``wallet_sql.split_sum``): a payment asks at most 21,000,000 BTC, but
# a day's payments sum past 64 bits of satoshis at a small rate (SQLite: "integer overflow").
_RECENTLY_CONFIRMED = "status = 'confirmed' AND confirmed_at >= :since"
_RECENT_UNITS = f"CASE WHEN {_RECENTLY_CONFIRMED} THEN aitbc_units ELSE 0 END"
_RECENT_SATS = f"CASE WHEN {_RECENTLY_CONFIRMED} THEN btc_sats ELSE 0 END"
_PAYMENT_STATS = (
    "SELECT COUNT(*) AS total, "
    "COALESCE(SUM(CASE WHEN status = 'pending' THEN 1 ELSE 0 END), 0) AS pending, "
    f"{wallet_sql.split_sum(_RECENT_UNITS, 'units')}, {wallet_sql.split_sum(_RECENT_SATS, 'sats')} "
    "FROM exchange_payments"
)
# The receipt a job's row names (``jobs.receipt_id``, migration 5): none or one.
_JOB_RECEIPTS = (
    "SELECT r.receipt FROM jobs AS j JOIN receipts AS r ON r.receipt_id = j.receipt_id "
    "WHERE j.job_id = :j"
)


_RECEIPT, _RECEIPT_REF = "receipt", "$receipt_id"
# Job rows as ``JobRecord``s: a completed job's receipt is the ``receipts`` row its
# ``receipt_id`` names (written in the same batch) unless the row kept a copy of its own (older
# rows, rows written without a receipt row).
_JOB_SELECT = (
    "SELECT "
    + ", ".join(
        c
        if c != "receipt"
        else "CASE WHEN jobs.receipt IS NULL AND jobs.receipt_id IS NOT NULL THEN (SELECT "
        "r.receipt FROM receipts AS r WHERE r.receipt_id = jobs.receipt_id) "
        "ELSE jobs.receipt END AS receipt"
        for c in _JOB_COLUMNS
    )
    + " FROM jobs"
)


# ``job_chars`` of a row: the characters of its stored JSON text (one length per value, which
# the database works out without handing the text over).
_JOB_CHARS = (
    "(LENGTH(payload) + LENGTH(constraints) + COALESCE(LENGTH(result), 0) "
    "+ COALESCE(LENGTH(error), 0))"
)

_KEY = re.compile(r"[A-Za-z0-9_]+")


def _present(keys: Sequence[str], values: Sequence[Any]) -> JSONObject:
    """``keys`` with their ``values``, those that are null (absent) left out."""
    return {k: v for k, v in zip(keys, values, strict=True) if v is not None}


def _key_paths(paths: Sequence[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """``paths`` to spell in SQL: plain keys only (they are our own field names), at least
    two paths (a single one is repeated; the caller keeps the first value)."""
    for path in paths:
        if not path or not all(_KEY.fullmatch(k) for k in path):
            raise ValueError(f"not a plain key path: {path!r}")
    return [*paths, *paths] if len(paths) == 1 else list(paths)


def loads(data: str | bytes) -> Any:
    """JSON the store wrote. One that no longer parses is a damaged database: ``StorageError``,
    not the "malformed JSON (close 1007)" a peer's frame gets, which a damaged row raised (a
    traceback at start-up, blaming no one in particular)."""
    try:
        return decode(data)
    except RemoteProtocolError:
        raise StorageError("a value stored in the database is damaged (not JSON)") from None


def _text(value: Any) -> str | None:
    return None if value is None else dumps(value).decode()


def _json(value: Any) -> Any:
    return None if value is None else loads(value)


# The WAL (storage.sql.DatabasesJobStore._checkpoint_round): past this many frames (64 MiB
# of 4 KiB pages) a checkpoint round makes sure the WAL restarts; catch-up rounds run while
# the round before left at least _CATCH_UP_FRAMES behind, at most _CATCH_UP_ROUNDS of them;
# a restarted WAL file is cut back to WAL_SIZE_LIMIT bytes.
WAL_RESTART_FRAMES = 16384
_CATCH_UP_FRAMES = 256
_CATCH_UP_ROUNDS = 4
WAL_SIZE_LIMIT = 128 * 1024 * 1024


@asynccontextmanager
async def map_driver_errors() -> AsyncIterator[None]:
    """Turn driver exceptions into StorageError subclasses (the one translation point)."""
    try:
        yield
    except sqlite3.IntegrityError as exc:
        raise Conflict(str(exc)) from exc
    except (sqlite3.Error, ValueError) as exc:
        raise StorageError(str(exc)) from exc


# How long a commit waits for another process's write lock on the database (a ``sqlite3`` shell
# in a transaction, a script writing to the file) before it fails. The writer connection's own
# busy timeout is 0: SQLite's busy handler sleeps in the calling thread, which for a NORMAL
# commit is the event loop's (every socket and request stood still for the full wait).
LOCK_WAIT_SECONDS = 5.0
_LOCK_RETRY_MIN = 0.001
_LOCK_RETRY_MAX = 0.05


def _transient(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_LOCKED / SQLITE_BUSY: another statement holds the database for a moment."""
    text = str(exc)
    return "locked" in text or "busy" in text


def _receipt_text(receipt: JSONObject | None, stored: dict[int, str]) -> str | None:
    """The job row's own copy of its receipt: none when the batch stores it in ``receipts``."""
    if receipt is None or id(receipt) in stored:
        return None
    return dumps(receipt).decode()


# States and event kinds arrive as ``StrEnum`` members; ``str()`` makes them exact ``str``s
# before binding. The driver binds an exact str directly, but a str subclass first goes through
# its adapter lookup (a failed registry probe, then ``__conform__``): bench.inproc measured
# 31,000 instructions a job less (2%) with the conversion.


def _job_changes(j: JobRecord, stored: dict[int, str]) -> tuple[Any, ...]:
    """The values of ``_UPDATE_COLUMNS``. Unpacked: it runs for nearly every job row, and a
    NamedTuple's fields read by name each take the interpreter's slow path."""
    (_, _, state, _, _, _, _, _, attempt, failures, _, seq, miner_id, assigned_at,
     started_at, finished_at, result, receipt, error, _, _) = j  # fmt: skip
    return (
        str(state),
        attempt,
        failures,
        seq,
        miner_id,
        assigned_at,
        started_at,
        finished_at,
        _text(result),
        _receipt_text(receipt, stored),
        error,
        None if receipt is None else receipt.get("receipt_id"),
    )


def _job_update(j: JobRecord, stored: dict[int, str]) -> tuple[Any, ...]:
    """The ``_UPDATE_JOB`` parameters: the changing columns, then the key."""
    return (*_job_changes(j, stored), j.job_id)


def _job_row(j: JobRecord, stored: dict[int, str]) -> tuple[Any, ...]:
    """The ``_UPSERT_JOB`` parameters, in ``_ROW_COLUMNS`` order."""
    (job_id, client_id, _, payload, constraints, priority, requested_at, expires_at,
     _, _, max_attempts, _, _, _, _, _, _, _, _, idempotency_key, payment) = j  # fmt: skip
    return (
        job_id,
        client_id,
        _text(payload),
        _text(constraints),
        priority,
        requested_at,
        expires_at,
        max_attempts,
        idempotency_key,
        None if payment is None else dumps(payment).decode(),
        *_job_changes(j, stored),
    )


# What each column read back into a record holds. SQLite keeps any value in any column (a text
# where an integer belongs, a JSON column holding ``5``), and such a row used to fail far from
# its read: a traceback at start-up (``-priority`` of a text, ``constraints.get`` of an int) or a
# job that started and failed later. A row that does not hold its kinds is refused as damaged,
# naming its table, row and column (at start-up: one line, exit 3).
_TEXT, _INTEGER, _NUMBER, _OBJECT, _PAYMENT = "a text", "an integer", "a number", "{", "$"
_KINDS: dict[str, tuple[type, ...]] = {_TEXT: (str,), _INTEGER: (int,), _NUMBER: (int, float)}
_JOB_KINDS: tuple[tuple[str, str, bool], ...] = (  # (column, kind, may be NULL), record order
    ("job_id", _TEXT, False),
    ("client_id", _TEXT, False),
    ("state", _TEXT, False),
    ("payload", _OBJECT, False),
    ("constraints", _OBJECT, False),
    ("priority", _INTEGER, False),
    ("requested_at", _NUMBER, False),
    ("expires_at", _NUMBER, False),
    ("attempt", _INTEGER, False),
    ("failures", _INTEGER, False),
    ("max_attempts", _INTEGER, False),
    ("seq", _INTEGER, False),
    ("miner_id", _TEXT, True),
    ("assigned_at", _NUMBER, True),
    ("started_at", _NUMBER, True),
    ("finished_at", _NUMBER, True),
    ("result", _OBJECT, True),
    ("receipt", _OBJECT, True),
    ("error", _TEXT, True),
    ("idempotency_key", _TEXT, True),
    ("payment", _PAYMENT, True),
)
_MINER_KINDS: tuple[tuple[str, str, bool], ...] = (
    ("miner_id", _TEXT, False),
    ("key_hash", _TEXT, False),
    ("session_id", _TEXT, True),
    ("capabilities", _OBJECT, False),
    ("concurrency", _INTEGER, False),
    ("region", _TEXT, True),
    ("last_seen", _NUMBER, False),
)
# A job's reservation (web/billing.py): what the ledger and the job view read from it.
_PAYMENT_KINDS = (("payment_id", str), ("account", str), ("amount", int), ("currency", str))


def _stored(m: Any, where: str, column: str, kind: str, nullable: bool) -> Any:
    """Column ``column`` of row ``m`` (``where``: its table and key), checked to hold ``kind``."""
    value = m[column]
    if value is None and nullable:
        return value
    if kind in (_OBJECT, _PAYMENT):
        text = value
        try:
            value = decode(text)
        except (RemoteProtocolError, TypeError):
            raise _damaged(where, column, "not JSON") from None
        if type(value) is not dict:
            raise _damaged(where, column, f"{_shown(text)} is not a JSON object")
        if kind == _PAYMENT and not all(type(value.get(key)) is of for key, of in _PAYMENT_KINDS):
            raise _damaged(where, column, "not a payment")
    elif type(value) not in _KINDS[kind]:
        raise _damaged(where, column, f"{_shown(value)} is not {kind}")
    return value


def _damaged(where: str, column: str, why: str) -> StorageError:
    return StorageError(f"{where}, column {column}: the stored value is damaged ({why})")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _job_record(row: Any) -> JobRecord:
    m = row._mapping
    where = f"jobs row {m['job_id']}"
    return JobRecord(*[_stored(m, where, *kinds) for kinds in _JOB_KINDS])


def _miner_record(row: Any) -> MinerRecord:
    m = row._mapping
    where = f"miners row {m['miner_id']}"
    return MinerRecord(**{kinds[0]: _stored(m, where, *kinds) for kinds in _MINER_KINDS})


def _event_record(row: Any) -> EventRecord:
    m = row._mapping
    data = loads(m["data"])
    ref = data.pop(_RECEIPT_REF, None)
    if ref is not None:  # the receipt stored once, in ``receipts`` (see ``_event_data``)
        data[_RECEIPT] = _json(m["stored_receipt"])
    return EventRecord(
        job_id=m["job_id"],
        seq=m["seq"],
        event=m["event"],
        state=m["state"],
        at=m["at"],
        attempt=m["attempt"],
        miner_id=m["miner_id"],
        data=data,
    )


def _event_data(data: JSONObject, stored: dict[int, str]) -> str:
    """The ``data`` column: a receipt this batch stores in ``receipts`` is referenced by id."""
    if not data:
        return "{}"
    receipt = data.get(_RECEIPT)
    if receipt is not None and id(receipt) in stored:
        data = {k: v for k, v in data.items() if k != _RECEIPT}
        data[_RECEIPT_REF] = stored[id(receipt)]
    return dumps(data).decode()


def _row_statements(
    batch: WriteBatch, stored: dict[int, str]
) -> Iterator[tuple[str, list[tuple[Any, ...]]]]:
    """Every statement of a batch but the job rows' (each dialect writes those its own way),
    with its rows, in the order they are written; ``?`` placeholders."""
    if batch.events:
        yield (
            _INSERT_EVENT,
            [  # unpacked: a NamedTuple's fields read by name take the slow path
                (
                    job_id,
                    seq,
                    str(event),
                    str(state),
                    at,
                    attempt,
                    miner_id,
                    _event_data(data, stored),
                )
                for job_id, seq, event, state, at, attempt, miner_id, data in batch.events
            ],
        )
    if batch.miners:
        yield (
            _UPSERT_MINER,
            [
                (
                    m.miner_id,
                    m.key_hash,
                    m.session_id,
                    dumps(m.capabilities).decode(),
                    m.concurrency,
                    m.region,
                    m.last_seen,
                )
                for m in batch.miners.values()
            ],
        )
    if batch.receipts:
        yield (
            _INSERT_RECEIPT,
            [
                (
                    r.receipt_id,
                    r.job_id,
                    r.miner_id,
                    r.issued_at,
                    dumps(r.receipt).decode(),
                    r.chain_seq,
                )
                for r in batch.receipts
            ],
        )
    if batch.entries or batch.users or batch.sessions or batch.nonces or batch.payments:
        yield from wallet_sql.statements(batch)
    if batch.pruned:
        pruned = [(job_id,) for job_id in batch.pruned]
        yield _DELETE_EVENTS, pruned
        yield _DELETE_JOB, pruned


def _commit_batch(conn: sqlite3.Connection, batch: WriteBatch) -> None:
    """Runs on the writer connection's thread: one transaction, one executemany per table.

    A receipt is stored once, in ``receipts``: the job row and the ``completed`` event of the
    same batch refer to it (``_JOB_SELECT`` and ``events_after`` put it back).
    """
    stored = {id(r.receipt): r.receipt_id for r in batch.receipts}
    conn.execute("BEGIN")
    try:
        if batch.jobs:
            created = {e.job_id for e in batch.events if e.seq == 1}
            new = [_job_row(j, stored) for j in batch.jobs.values() if j.job_id in created]
            updates = [
                _job_update(j, stored) for j in batch.jobs.values() if j.job_id not in created
            ]
            if new:
                # One statement for the whole batch (rows keep their order, and their rowids).
                fresh = [row for row in map(_fresh_row, new) if row is not None]
                if len(fresh) == len(new):
                    conn.executemany(_UPSERT_FRESH_JOB, fresh)
                else:
                    conn.executemany(_UPSERT_JOB, new)
            plain = [row for row in map(_plain, updates) if row is not None]
            sql, rows = (
                (_UPDATE_PLAIN_JOB, plain) if len(plain) == len(updates) else (_UPDATE_JOB, updates)
            )
            if updates and conn.executemany(sql, rows).rowcount != len(updates):
                conn.executemany(
                    _UPSERT_JOB,
                    [_job_row(j, stored) for j in batch.jobs.values() if j.job_id not in created],
                )
        for sql, rows in _row_statements(batch, stored):
            conn.executemany(sql, rows)
        conn.execute("COMMIT")
    except BaseException:
        _roll_back(conn)
        raise


def _roll_back(conn: sqlite3.Connection) -> None:
    """End the failed transaction on ``conn``. SQLite rolls some back itself (a full disk, an
    I/O error): a ROLLBACK then fails, and its error would hide the one that says why."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def sync_file(path: str | Path) -> None:
    """``fdatasync`` a file (or a folder, for the names in it) by name: a checkpoint
    connection's thread runs it, and ``aitbc-coordinator backup``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _applied_versions(conn: sqlite3.Connection) -> tuple[set[int], set[str]]:
    """The migrations a database records as applied (none when it has no ``schema_version``),
    and the names of its tables, indexes and views."""
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema")}
    if "schema_version" not in names:
        return set(), names
    return {r[0] for r in conn.execute("SELECT version FROM schema_version")}, names


def _schema_refusal(applied: set[int], names: set[str]) -> str | None:
    """Why a database whose applied migrations are ``applied`` (and whose tables and indexes are
    ``names``) is not ours to run, if it is not: a newer coordinator wrote it (its rows may mean
    what this build cannot know), or it is another program's (a name of ours, no migration)."""
    known = {version for version, _ in MIGRATIONS}
    unknown = sorted(applied - known)
    if unknown:
        return (
            f"the database has schema version {unknown[-1]}, newer than this coordinator knows "
            f"({max(known)}): run the coordinator that wrote it, or a newer one"
        )
    clash = sorted(names & OUR_NAMES)
    if not applied and clash:
        return (
            f"not a coordinator database: it has a {clash[0]!r} of its own and no coordinator "
            "schema; give the coordinator a database of its own"
        )
    return None


def check_schema(
    applied: set[int], names: set[str], versions: list[int], *, exclusive: bool
) -> None:
    """``StorageError`` when a store may not run on a database whose applied migrations are
    ``applied`` (this build's are ``versions``): a newer coordinator wrote it, another program
    did (``_schema_refusal``), or a read-only store (not ``exclusive``: only the owner
    migrates) finds migrations missing."""
    refusal = _schema_refusal(applied, names)
    if refusal is not None:
        raise StorageError(refusal)
    missing = [version for version in versions if version not in applied]
    if missing and not exclusive:
        raise StorageError(
            "the database has no coordinator schema yet: start the coordinator on it first"
            if not applied
            else f"the database's schema is older than this build's (it lacks version "
            f"{missing[-1]}): start the coordinator on it once, which upgrades it"
        )


def database_file(url: str) -> str:
    """The file a ``sqlite:///`` URL names, as the store opens it (``databases`` unescapes it and
    drops a query)."""
    return str(DatabaseURL(url).database)


def copy_database(source: Path, dest: Path) -> None:
    """Copy the SQLite database ``source`` (its WAL included) to a new file ``dest`` in one
    backup step: one read transaction on a read-only connection, the database as of one
    commit, while its coordinator's commits and checkpoints go on (``aitbc-coordinator
    backup``). Raises StorageError."""
    try:
        reader = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
        with contextlib.closing(reader), contextlib.closing(sqlite3.connect(dest)) as copy:
            reader.backup(copy)
    except sqlite3.Error as exc:
        raise StorageError(str(exc)) from exc


def check_database(url: str, *, writable: bool = True) -> None:
    """Before serving: ``StorageError`` with a one-line reason when ``url`` names a file that
    cannot be this store's database (a folder, a FIFO or device, in a missing folder, read-only,
    not SQLite, unreadable, from a newer coordinator, or another program's). A missing file is fine:
    ``open`` creates it. ``writable=False``: a read-only tool's check (the file may be
    read-only)."""
    path = Path(database_file(url))
    if path.is_dir():
        raise StorageError(f"cannot open {path}: it is a folder, not a database file")
    if not path.parent.is_dir():
        raise StorageError(f"cannot create {path}: the folder {path.parent} does not exist")
    if not path.exists():
        refuse_orphaned_wal(path)
        return
    if not path.is_file():
        # A FIFO blocks the open below for good (and a signal's handler cannot run meanwhile).
        raise StorageError(f"cannot open {path}: it is not a regular file")
    check_one_name(path)
    if writable and not os.access(path, os.W_OK):
        # A read-only file or mount: the start-up only reads, and the coordinator would report
        # ready, then stop on its first commit.
        raise StorageError(f"cannot write {path}: it is read-only")
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            applied, names = _applied_versions(con)
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open {path}: {exc}") from None
    refusal = _schema_refusal(applied, names)
    if refusal is not None:
        raise StorageError(f"{path}: {refusal}")


def _beside(path: Path, suffix: str) -> list[Path]:
    """``path`` + ``suffix`` beside the file ``path`` names and, when that is another (a
    symbolic link), beside the link too: SQLite names its WAL after the file a link names."""
    real = path.resolve()
    return list(
        dict.fromkeys((real.with_name(real.name + suffix), path.with_name(path.name + suffix)))
    )


def refuse_orphaned_wal(path: Path) -> None:
    """``StorageError`` when the database file ``path`` does not exist but its WAL does.

    The file was deleted or moved, and the WAL may hold its last commits. Creating a new
    database there, SQLite deletes that WAL without a word (a WAL beside an empty database is
    taken for a leftover): the commits would be gone, even for an operator about to put the
    file back. Nor may a backup be restored beside it: SQLite would replay the WAL, pages of
    another history, into the backup (a case no check can tell from a database's own WAL,
    hence the refusal now, while the file is missing)."""
    if path.exists():
        return
    for wal in _beside(path, "-wal"):
        if wal.exists():
            shm = wal.with_name(wal.name[: -len("-wal")] + "-shm")
            raise StorageError(
                f"{path} does not exist but its write-ahead log {wal} does: the database was "
                "deleted or moved, and the log may hold its last commits, which a new "
                "database would delete; put the moved file back, or move "
                f"{wal.name} and {shm.name} away first to restore a backup or start on a new, "
                "empty database"
            )


def left_beside(path: Path) -> list[Path]:
    """The files a start on the SQLite database ``path`` leaves beside it that exist: its owner
    lock (never removed) and SQLite's shared-memory index (left by a crash)."""
    found = [lock_path(path.resolve()), *_beside(path, "-shm")]
    return [p for p in found if p.exists()]


class SqlStore:
    """The reads every SQL store shares, over ``databases`` connections that a subclass opens
    (``_reader`` for indexed reads, ``_scanner`` for reads that walk a table) and the few SQL
    spellings that differ between dialects. Subclasses open, close and write."""

    _reader: Connection | None
    _scanner: Connection | None

    # The sum of receipts' prices in units of 1e-8 (a price has at most 6 places, so rounding
    # the product gives the exact units; no price or a negative one counts 0). A receipt
    # counts at most 1e18 units (protocol.amounts.MAX_RECEIPT_UNITS), and the sum is TOTAL's
    # float, which is exact up to 2**53 units (90 million coins) and never overflows as SUM of
    # integers does (a miner's advertised price is any finite number).
    _PRICE_UNITS = (
        "COALESCE(TOTAL(MAX(0, MIN(1e18, ROUND(COALESCE(json_extract(receipt, '$.price'), 0) "
        "* 100000000)))), 0)"
    )

    @staticmethod
    def _json_text(column: str, key: str) -> str:
        """SQL for the value of ``key`` in the JSON object stored as text in ``column``."""
        return f"json_extract({column}, '$.\"{key}\"')"

    @classmethod
    def _json_string(cls, column: str, key: str) -> str:
        """SQL for the value of ``key`` when it is a JSON string (else NULL or a non-text value,
        which equals no text: SQLite's ``json_extract`` gives numbers as numbers)."""
        return cls._json_text(column, key)

    def _driver_errors(self) -> AbstractAsyncContextManager[None]:
        """The driver's exceptions as ``StorageError``s."""
        return map_driver_errors()

    def claim(self) -> None:
        """Take the database's owner lock now, where the backend can before ``open``."""

    async def owner_free(self) -> bool:
        """Whether ``open`` would get the owner lock now (a standby's poll): on SQLite, taking
        the lock is as cheap as asking, so this takes it, and ``open`` keeps it."""
        try:
            self.claim()
        except StoreInUse:
            return False
        return True

    async def _connect(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def open(self) -> None:
        """Claim, connect, migrate: ``StoreInUse`` if another coordinator holds the database."""
        self.claim()
        try:
            await self._connect()
        except BaseException:
            # Close what did open (connections, their threads); ``close`` lets the lock go.
            # The error that stopped the open is the one to report.
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self.close()
            raise

    async def _fetch(
        self, sql: str, values: dict[str, Any] | None = None, *, scan: bool = False
    ) -> Sequence[Any]:
        """Rows of a read; ``scan``: one that walks a table, on the scanning connection."""
        conn = self._scanner if scan else self._reader
        if conn is None:
            raise StorageError("store is closed")
        async with self._driver_errors():
            return await conn.fetch_all(sql, values)

    async def load_active(self) -> tuple[list[JobRecord], list[MinerRecord]]:
        jobs = await self._fetch(  # in submission order (the scheduler's tie-break)
            f"{_JOB_SELECT} WHERE state IN ('QUEUED', 'RUNNING') ORDER BY jobs.rowid"
        )
        miners = await self._fetch("SELECT * FROM miners")
        return [_job_record(r) for r in jobs], [_miner_record(r) for r in miners]

    async def get_job(self, job_id: str) -> JobRecord | None:
        rows = await self._fetch(f"{_JOB_SELECT} WHERE job_id = :j", {"j": job_id})
        return _job_record(rows[0]) if rows else None

    async def find_job(self, client_id: str, idempotency_key: str) -> JobRecord | None:
        rows = await self._fetch(
            f"{_JOB_SELECT} WHERE client_id = :c AND idempotency_key = :k",
            {"c": client_id, "k": idempotency_key},
        )
        return _job_record(rows[0]) if rows else None

    async def find_jobs(
        self, keys: Collection[tuple[str, str]]
    ) -> dict[tuple[str, str], JobRecord]:
        found: dict[tuple[str, str], JobRecord] = {}
        pairs = list(keys)
        for start in range(0, len(pairs), FIND_JOBS_PAGE):
            page = pairs[start : start + FIND_JOBS_PAGE]
            # One index lookup per pair (SQLite's OR-by-union, PostgreSQL's BitmapOr).
            cond = " OR ".join(
                f"(client_id = :c{i} AND idempotency_key = :k{i})" for i in range(len(page))
            )
            values: dict[str, Any] = {}
            for i, (client_id, key) in enumerate(page):
                values[f"c{i}"], values[f"k{i}"] = client_id, key
            for row in await self._fetch(f"{_JOB_SELECT} WHERE {cond}", values):
                rec = _job_record(row)
                assert rec.idempotency_key is not None
                found[rec.client_id, rec.idempotency_key] = rec
        return found

    async def jobs_after(self, rowid: int, limit: int) -> list[JobAge]:
        rows = await self._fetch(
            "SELECT jobs.rowid AS place, job_id, state, requested_at, finished_at FROM jobs "
            "WHERE jobs.rowid > :r ORDER BY jobs.rowid LIMIT :n",
            {"r": rowid, "n": limit},
        )
        return [
            JobAge(
                rowid=int(r["place"]),
                job_id=r["job_id"],
                state=r["state"],
                requested_at=float(r["requested_at"]),
                finished_at=None if r["finished_at"] is None else float(r["finished_at"]),
            )
            for r in rows
        ]

    async def events_after(self, job_id: str, after: int, limit: int = 10_000) -> list[EventRecord]:
        rows = await self._fetch(
            "SELECT e.*, r.receipt AS stored_receipt FROM job_events AS e LEFT JOIN receipts AS r "
            "ON r.receipt_id = CASE WHEN e.event = 'completed' THEN "  # CASE: only their data
            f"{self._json_text('e.data', _RECEIPT_REF)} END "  # is parsed as JSON
            "WHERE e.job_id = :j AND e.seq > :s ORDER BY e.seq LIMIT :n",
            {"j": job_id, "s": after, "n": limit},
        )
        return [_event_record(r) for r in rows]

    async def list_jobs(self, query: JobQuery) -> tuple[list[JobRecord], int]:
        where, values = ["1 = 1"], {}
        if query.client_id is not None:
            where.append("client_id = :c")
            values["c"] = query.client_id
        if query.miner_id is not None:
            where.append("miner_id = :m")
            values["m"] = query.miner_id
        if query.state is not None:
            where.append("state = :s")
            values["s"] = query.state
        if query.job_type is not None:
            where.append(f"{self._json_string('payload', 'type')} = :t")
            values["t"] = query.job_type
        cond = " AND ".join(where)
        scan = query.miner_id is not None or query.job_type is not None  # no index for these
        page = "ORDER BY jobs.rowid DESC LIMIT :limit OFFSET :offset"
        paging = {**values, "limit": query.limit, "offset": query.offset}
        if query.max_chars is None:
            rows = await self._fetch(f"{_JOB_SELECT} WHERE {cond} {page}", paging, scan=scan)
        else:
            rows = await self._chars_page(cond, page, paging, query.max_chars, scan)
        if not query.with_total:
            return [_job_record(r) for r in rows], len(rows)
        total = await self._fetch(f"SELECT COUNT(*) AS n FROM jobs WHERE {cond}", values, scan=scan)
        return [_job_record(r) for r in rows], int(total[0]._mapping["n"])

    async def _chars_page(
        self, cond: str, page: str, values: dict[str, Any], max_chars: int, scan: bool
    ) -> Sequence[Any]:
        """The page's rows up to ``max_chars`` (``chars_page``): their lengths are read first,
        then only the rows that fit (the page's ids: a job inserted meanwhile does not move
        it)."""
        sizes = await self._fetch(
            f"SELECT job_id, {_JOB_CHARS} AS n FROM jobs WHERE {cond} {page}",
            values,
            scan=scan,
        )
        keep = chars_page([int(r._mapping["n"]) for r in sizes], max_chars)
        if keep == 0:
            return []
        ids = {f"j{i}": r._mapping["job_id"] for i, r in enumerate(sizes[:keep])}
        # The filter again: a job that left it meanwhile (a QUEUED one assigned) is not shown.
        values = {k: v for k, v in values.items() if k not in ("limit", "offset")}
        return await self._fetch(
            f"{_JOB_SELECT} WHERE {cond} AND job_id IN ({', '.join(':' + k for k in ids)}) "
            "ORDER BY jobs.rowid DESC",
            {**values, **ids},
            scan=scan,
        )

    async def job_summaries(self, limit: int) -> list[JobSummary]:
        rows = await self._fetch(
            "SELECT job_id, state, client_id, miner_id, requested_at, attempt FROM jobs "
            "ORDER BY rowid DESC LIMIT :limit",
            {"limit": limit},
        )
        return [
            JobSummary(
                job_id=m["job_id"],
                state=m["state"],
                client_id=m["client_id"],
                miner_id=m["miner_id"],
                requested_at=float(m["requested_at"]),
                attempt=int(m["attempt"]),
            )
            for m in (r._mapping for r in rows)
        ]

    async def mean_run_seconds(self, sample: int) -> float | None:
        rows = await self._fetch(
            "SELECT AVG(finished_at - started_at) AS mean FROM ("
            "SELECT started_at, finished_at FROM jobs WHERE state = 'COMPLETED' "
            "ORDER BY rowid DESC LIMIT :limit) AS recent "
            "WHERE started_at IS NOT NULL AND finished_at IS NOT NULL",
            {"limit": sample},
        )
        mean = rows[0]._mapping["mean"] if rows else None
        return None if mean is None else float(mean)

    async def count_jobs(self) -> dict[str, int]:
        rows = await self._fetch("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        return {r._mapping["state"]: int(r._mapping["n"]) for r in rows}

    async def list_receipts(self, job_id: str | None, limit: int, offset: int) -> list[JSONObject]:
        if job_id:
            rows = await self._fetch(
                f"{_JOB_RECEIPTS} LIMIT :limit OFFSET :offset",
                {"j": job_id, "limit": limit, "offset": offset},
            )
        else:  # newest first: the chain's order (pre-chain receipts last, see migration 5)
            rows = await self._fetch(
                "SELECT receipt FROM receipts ORDER BY chain_seq DESC LIMIT :limit OFFSET :offset",
                {"limit": limit, "offset": offset},
            )
        return [loads(r._mapping["receipt"]) for r in rows]

    async def list_receipt_fields(
        self, job_id: str | None, limit: int, offset: int, paths: Sequence[tuple[str, ...]]
    ) -> list[list[Any]]:
        # As ``list_receipts``, but the database picks the values out (in C, off the event
        # loop): a receipt's metadata holds the job's payload and result, up to a request
        # body each, which a page of whole receipts would read and parse here.
        values = f"{self._json_values('r.receipt', _key_paths(paths))} AS v"
        if job_id:
            rows = await self._fetch(
                f"SELECT {values} FROM jobs AS j JOIN receipts AS r "
                "ON r.receipt_id = j.receipt_id WHERE j.job_id = :j LIMIT :limit OFFSET :offset",
                {"j": job_id, "limit": limit, "offset": offset},
            )
        else:  # newest first, as list_receipts
            rows = await self._fetch(
                f"SELECT {values} FROM receipts AS r ORDER BY r.chain_seq DESC "
                "LIMIT :limit OFFSET :offset",
                {"limit": limit, "offset": offset},
            )
        return [loads(r._mapping["v"])[: len(paths)] for r in rows]

    @staticmethod
    def _json_values(column: str, paths: Sequence[tuple[str, ...]]) -> str:
        """SQL for a JSON array of the values at ``paths`` (at least two) in the JSON object
        stored as text in ``column``, null where absent, the document parsed once: SQLite's
        ``json_extract`` with several paths gives that array."""
        spelled = ", ".join("'$" + "".join(f'."{k}"' for k in path) + "'" for path in paths)
        return f"json_extract({column}, {spelled})"

    async def receipts_for(self, job_id: str) -> list[JSONObject]:
        rows = await self._fetch(_JOB_RECEIPTS, {"j": job_id})
        return [loads(r._mapping["receipt"]) for r in rows]

    async def receipt_chain_head(self) -> JSONObject | None:
        rows = await self._fetch(
            "SELECT chain_seq, receipt FROM receipts WHERE chain_seq > 0 "
            "ORDER BY chain_seq DESC LIMIT 1"
        )
        if not rows:
            return None
        # The chain goes on from it at every start: a value that is no receipt is a damaged
        # row (one line), not a TypeError or KeyError out of the signer's resume.
        m = rows[0]._mapping
        head = _stored(m, f"receipts row {m['chain_seq']}", "receipt", _OBJECT, False)
        if type(head.get("chain_seq")) is not int:
            raise _damaged(f"receipts row {m['chain_seq']}", "receipt", "no chain_seq")
        return head  # type: ignore[no-any-return]

    async def receipt_chain(self, after: int, limit: int) -> list[tuple[int, JSONObject]]:
        rows = await self._fetch(
            "SELECT chain_seq, receipt FROM receipts WHERE chain_seq > :a "
            "ORDER BY chain_seq LIMIT :n",
            {"a": after, "n": limit},
        )
        return [(r._mapping["chain_seq"], loads(r._mapping["receipt"])) for r in rows]

    # ---- wallet (storage/wallet_sql.py holds the SQL) ------------------------------------

    async def load_wallet(self, now: float, settled_since: float | None = None) -> WalletSnapshot:
        return wallet_sql.snapshot(
            now,
            {
                name: await self._fetch(sql, values)
                for name, (sql, values) in wallet_sql.snapshot_queries(now, settled_since).items()
            },
        )

    async def miner_earnings(
        self, miner_id: str, since: float, until: float, recent: int
    ) -> MinerEarnings:
        values = {"m": miner_id, "a": since, "b": until}
        mine = "FROM receipts WHERE miner_id = :m AND issued_at >= :a AND issued_at < :b"
        # Scans of receipts and ledger entries (no index by miner or by reference: the hot
        # path writes fewer trees), on the scanning connection.
        totals = await self._fetch(
            f"SELECT COUNT(*) AS n, {self._PRICE_UNITS} AS billed {mine}", values, scan=True
        )
        paid = await self._fetch(
            f"SELECT {wallet_sql.split_sum('amount', 'paid')} FROM ledger_entries "
            f"WHERE kind = 'job_payment' AND amount > 0 AND ref IN (SELECT job_id {mine})",
            values,
            scan=True,
        )
        # Only the fields listed: the database picks them out (see list_receipt_fields).
        picked = self._json_values("receipt", [(k,) for k in RECENT_FIELDS])
        rows = await self._fetch(
            f"SELECT {picked} AS v {mine} ORDER BY chain_seq DESC LIMIT :k",
            {**values, "k": recent},
            scan=True,
        )
        row = totals[0]._mapping
        return MinerEarnings(
            completed=int(row["n"]),
            billed=int(row["billed"]),
            paid=wallet_sql.exact_sum(paid[0]._mapping, "paid"),
            recent=[_present(RECENT_FIELDS, loads(r._mapping["v"])) for r in rows],
        )

    async def ledger_entries(
        self, account: str, limit: int, offset: int
    ) -> tuple[list[LedgerEntry], int]:
        values = {"a": account}
        total = await self._fetch(
            "SELECT COUNT(*) AS n FROM ledger_entries WHERE account = :a", values
        )
        rows = await self._fetch(
            "SELECT * FROM ledger_entries WHERE account = :a "
            "ORDER BY at DESC, movement_key DESC LIMIT :limit OFFSET :offset",
            {**values, "limit": limit, "offset": offset},
        )
        return [wallet_sql.entry(r._mapping) for r in rows], int(total[0]._mapping["n"])

    async def get_payment(self, payment_id: str) -> PaymentRecord | None:
        rows = await self._fetch(
            "SELECT * FROM exchange_payments WHERE payment_id = :p", {"p": payment_id}
        )
        return wallet_sql.payment(rows[0]._mapping) if rows else None

    async def payment_stats(self, since: float) -> PaymentStats:
        rows = await self._fetch(_PAYMENT_STATS, {"since": since}, scan=True)
        m = rows[0]._mapping
        return PaymentStats(
            total=int(m["total"]),
            pending=int(m["pending"]),
            confirmed_units=wallet_sql.exact_sum(m, "units"),
            confirmed_sats=wallet_sql.exact_sum(m, "sats"),
        )


class DatabasesJobStore(SqlStore):
    """SQLite (WAL) store. ``synchronous`` is NORMAL by default, FULL on request.

    ``exclusive`` (the default): the store holds the database's owner lock while it is open
    (``storage.owner``), so that a second coordinator on the same file is refused with
    ``StoreInUse`` instead of dispatching the same jobs. Read-only tools pass False; such a
    store never migrates (a newer tool would change the schema under a running coordinator):
    it refuses a database whose schema is not this build's.
    """

    def __init__(self, url: str, *, synchronous: str = "NORMAL", exclusive: bool = True) -> None:
        if not url.startswith("sqlite"):
            raise StorageError(f"unsupported DATABASE_URL scheme: {url.split(':', 1)[0]!r}")
        if synchronous not in ("NORMAL", "FULL"):
            raise StorageError("synchronous must be NORMAL or FULL")
        self.url = url
        self.synchronous = synchronous
        database = database_file(url)
        if database in ("", ":memory:"):
            # Each connection would open a database of its own: the readers would find no
            # tables (the app failed at start-up with "no such table: receipts").
            raise StorageError(
                "a SQLite :memory: database is private to one connection, and the store opens "
                "several: name a file (or file:NAME?mode=memory&cache=shared)"
            )
        in_memory = "mode=memory" in url
        self.exclusive = exclusive
        self.owner = OwnerLock(Path(database)) if exclusive and not in_memory else None
        self._file = None if in_memory else database  # the database file, synced in rounds
        # (device, inode) of the database file, its WAL and shared-memory index, once open.
        self._file_ids: dict[str, tuple[int, int]] = {}
        # The writer connection is opened on aiosqlite's thread and then committed to from
        # the event loop (see ``commit``); SQLite itself is built thread-safe (serialized).
        self._db = Database(url, check_same_thread=False)
        # A second Database on purpose: ``databases`` hands out one connection per task, so
        # two connections from one Database opened in the same task are the SAME connection.
        self._read_db = Database(url)
        # And a third for checkpoints, so that a round never waits behind a slow read on the
        # reader's thread (the last round of a restart holds every commit while it runs).
        self._checkpoint_db = Database(url)
        # And a fourth for the reads that walk a whole table (a miner's jobs and earnings, a
        # job-type filter, the exchange's totals): on a big store they take seconds, which
        # must not hold up the indexed reads every client and miner waits on.
        self._scan_db = Database(url)
        self._stack = AsyncExitStack()
        self._reader: Connection | None = None
        self._scanner: Connection | None = None
        self._checkpointer: Connection | None = None
        self._raw: Any = None  # the writer connection's aiosqlite driver object
        self._held: anyio.Event | None = None  # set while commits wait for a checkpoint
        self.wal_restart_frames = WAL_RESTART_FRAMES
        # For /metrics: frames in the WAL at the last checkpoint, and the rounds that held
        # the writer so that the WAL would restart.
        self.wal_frames = 0
        self.wal_restarts = 0
        # Commits that met another process's write lock and waited for it (``commit``).
        self.lock_wait = LOCK_WAIT_SECONDS
        self.lock_waits = 0

    def claim(self) -> None:
        """Take the owner lock now (``open`` does too): ``StoreInUse`` if another holds it."""
        if self.owner is not None:
            self.owner.acquire()

    async def _connect(self) -> None:
        if self._file is not None:  # also where ``check_database`` did not run (a test, an app)
            refuse_orphaned_wal(Path(self._file))
        async with map_driver_errors():
            await self._db.connect()
            writer = await self._stack.enter_async_context(self._db.connection())
            self._raw = writer.raw_connection
            await self._pragmas(self._raw)
            if self.synchronous == "NORMAL":  # checkpoints run in maintain(), off the loop
                await self._pragma(self._raw, "wal_autocheckpoint = 0")
            # After a restart, the next commit cuts a WAL file grown by a burst back to this.
            await self._pragma(self._raw, f"journal_size_limit = {WAL_SIZE_LIMIT}")
            await self._migrate()
            await self._pragma(self._raw, "busy_timeout = 0")  # ``commit`` waits, off the loop
            if self._file is not None:
                for path in (self._file, f"{self._file}-wal", f"{self._file}-shm"):
                    with contextlib.suppress(FileNotFoundError):  # no WAL: not in WAL mode
                        found = os.stat(path)
                        self._file_ids[path] = (found.st_dev, found.st_ino)
            await self._read_db.connect()
            self._reader = await self._stack.enter_async_context(self._read_db.connection())
            await self._pragmas(self._reader.raw_connection)
            await self._checkpoint_db.connect()
            self._checkpointer = await self._stack.enter_async_context(
                self._checkpoint_db.connection()
            )
            await self._pragmas(self._checkpointer.raw_connection)
            await self._scan_db.connect()
            self._scanner = await self._stack.enter_async_context(self._scan_db.connection())
            await self._pragmas(self._scanner.raw_connection)

    @staticmethod
    async def _pragma(raw: Any, pragma: str) -> None:
        # Read the result row: an unfinished statement would make a later COMMIT on this
        # connection fail with "SQL statements in progress".
        async with raw.execute(f"PRAGMA {pragma}") as cursor:
            await cursor.fetchall()

    async def _pragmas(self, raw: Any) -> None:
        for pragma in (
            "journal_mode = WAL",
            f"synchronous = {self.synchronous}",
            "busy_timeout = 5000",
            "foreign_keys = ON",
        ):
            await self._pragma(raw, pragma)

    async def _migrate(self) -> None:
        raw = self._raw
        applied, names = await raw._execute(_applied_versions, raw._conn)
        check_schema(
            applied, names, [version for version, _ in MIGRATIONS], exclusive=self.exclusive
        )
        if self.exclusive:  # after the check: a database that is not ours is left as it was
            await raw.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
            )
        for version, statements in MIGRATIONS:
            if version in applied:
                continue
            await raw.execute("BEGIN")
            try:
                for sql in statements:
                    await raw.execute(sql)
                await raw.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
                await raw.execute("COMMIT")
            except BaseException:
                await raw._execute(_roll_back, raw._conn)
                raise

    async def close(self) -> None:
        try:
            async with map_driver_errors():
                await self._stack.aclose()
                await self._db.disconnect()
                await self._read_db.disconnect()
                await self._checkpoint_db.disconnect()
                await self._scan_db.disconnect()
        finally:
            self._raw = self._reader = self._checkpointer = self._scanner = None
            if self.owner is not None:
                self.owner.release()

    async def commit(self, batch: WriteBatch) -> None:
        if self._held is not None:  # a checkpoint round that lets the WAL restart
            await self._held.wait()
        raw = self._raw
        if raw is None:
            raise StorageError("store is closed")
        async with map_driver_errors():
            try:
                if self.synchronous == "NORMAL":
                    # A WAL commit without fsync is pure CPU (~10 µs a row): run it right here.
                    # Handing it to the driver's thread cost more than the work itself: the two
                    # threads share a core and executemany re-takes the GIL for every row, so
                    # the writer queued behind the loop (measured: 10-17 ms per commit vs 1.4 ms
                    # inline). The fsyncs of NORMAL mode happen in checkpoints, which
                    # ``maintain()`` runs on the checkpointer's thread, never on the loop.
                    _commit_batch(raw._conn, batch)
                else:
                    # FULL: every commit fsyncs, so wait for it on the driver's thread (one hop
                    # for the whole batch).
                    await raw._execute(_commit_batch, raw._conn, batch)
            except sqlite3.OperationalError as exc:
                if not _transient(exc):
                    raise
                await self._commit_when_unlocked(batch, exc)

    async def _commit_when_unlocked(self, batch: WriteBatch, exc: sqlite3.OperationalError) -> None:
        """Another process holds the database's write lock, and the batch was rolled back
        whole: try it again (on the driver's thread), sleeping between tries, for
        ``lock_wait`` seconds at most."""
        self.lock_waits += 1
        deadline = anyio.current_time() + self.lock_wait
        delay = _LOCK_RETRY_MIN
        while anyio.current_time() < deadline:
            await anyio.sleep(delay)
            delay = min(delay * 2, _LOCK_RETRY_MAX)
            if self._held is not None:
                await self._held.wait()
            raw = self._raw
            if raw is None:
                raise StorageError("store is closed")
            try:
                await raw._execute(_commit_batch, raw._conn, batch)
                return
            except sqlite3.OperationalError as again:
                if not _transient(again):
                    raise
                exc = again
        raise StorageError(
            f"{exc}: another process has held the database's write lock for {self.lock_wait:g} s"
            " (a sqlite3 shell or a script in a write transaction on the file?)"
        ) from exc

    async def maintain(self, interval: float = 1.0) -> None:
        """Checkpoint the WAL in the background (PASSIVE: never blocks the writer).

        A checkpoint is best effort: when SQLite answers "locked" or "busy" (a read holds
        it, seen right after a restart), this round is skipped and the next one tries
        again. Any other error stops the store as before. Checkpoints have a connection (and
        so a thread) of their own: the reader's may be busy with a long list.
        """
        while True:
            await anyio.sleep(interval)
            checkpointer = self._checkpointer
            if checkpointer is None:
                return
            self._check_file()
            try:
                await self._checkpoint_round(checkpointer.raw_connection)
            except sqlite3.OperationalError as exc:
                if not _transient(exc):
                    raise StorageError(str(exc)) from exc
            except (sqlite3.Error, ValueError, OSError) as exc:  # OSError: a failed sync
                raise StorageError(str(exc)) from exc

    def _check_file(self) -> None:
        """Fail once the database's path no longer names the file the store opened (deleted,
        moved, or another file put in its place): SQLite writes on to the file it has open,
        which no restart would find, so every commit acknowledged from then on would be lost.
        Its WAL and shared-memory index alike (taken for temporary files): every other program
        reading the database then fails ("disk I/O error"), and a crash loses what the WAL
        holds; a stop copies it into the database file."""
        for path, opened in self._file_ids.items():
            try:
                found = os.stat(path)
            except FileNotFoundError:
                pass
            except OSError:
                continue  # cannot tell (a folder that cannot be looked into): still open
            else:
                if (found.st_dev, found.st_ino) == opened:
                    continue
            if path == self._file:
                raise StorageError(
                    f"the database file {path} was deleted, moved or replaced while the "
                    "coordinator had it open: what it commits would be in no file a restart "
                    "opens; put the file back (a moved one is whole once this process has "
                    "stopped) or restore it from a backup"
                )
            raise StorageError(
                f"{path} was deleted, moved or replaced while the coordinator had the database "
                f"open: stopping, which copies what it held into {self._file}"
            )

    async def _checkpoint_round(self, raw: Any) -> None:
        """One PASSIVE checkpoint; when the WAL has stopped restarting, make it restart.

        SQLite writes the WAL from its start again only when a write transaction begins with
        every frame already checkpointed. Commits land while a round runs on the
        checkpointer's thread (the writer never waits for it), so under steady load no round
        ever caught up and the file grew without end (355 MB in 8 s of unloaded dispatch). Past
        ``wal_restart_frames``, more rounds follow while each still leaves many frames
        behind, then one last round holds the writer (``commit`` waits for it) so that it
        ends with nothing behind; the next commit then writes from the WAL's start, and
        ``journal_size_limit`` cuts the file back.
        """
        busy, log, _ = await self._checkpoint(raw)
        if busy or log < self.wal_restart_frames:
            return
        for _ in range(_CATCH_UP_ROUNDS):
            busy, frames, _ = await self._checkpoint(raw)
            if busy:
                return
            added, log = frames - log, frames  # committed while the round before ran
            if added < _CATCH_UP_FRAMES:
                break
        if self._file is not None:
            # The rounds so far copied pages into the database file without syncing it
            # (SQLite syncs it only in a round that reaches the WAL's end): sync them now,
            # while commits go on, so the held round's own sync has only its few pages to
            # write (measured: that sync held every commit for ~11 ms, every ~2 s unloaded).
            await raw._execute(sync_file, self._file)
        self._held = hold = anyio.Event()
        try:
            busy, log, done = await self._checkpoint(raw)
            if not busy and done == log:  # else a read holds older frames: next round
                self.wal_restarts += 1
        finally:
            self._held = None
            hold.set()

    async def _checkpoint(self, raw: Any) -> tuple[int, int, int]:
        """``wal_checkpoint(PASSIVE)``: (busy, frames in the WAL, frames checkpointed)."""
        async with raw.execute("PRAGMA wal_checkpoint(PASSIVE)") as cursor:
            row = await cursor.fetchone()
        busy, log, done = int(row[0]), int(row[1]), int(row[2])
        self.wal_frames = log
        return busy, log, done
