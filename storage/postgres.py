"""``PostgresJobStore``: the SQL store on PostgreSQL (``DATABASE_URL=postgresql://…``).

The reads are ``SqlStore``'s, through ``databases`` (asyncpg). The group-commit writer runs each
batch as one transaction on the writer connection's raw asyncpg driver: one ``executemany`` per
statement type, with the statements prepared once (asyncpg caches them), one COMMIT. PostgreSQL
fsyncs its WAL at every commit (``synchronous_commit`` is the server's setting), so a batch is
durable when ``commit`` returns, as with SQLite.

One coordinator per database, as on SQLite: the dispatching store holds a session advisory lock
(``pg_try_advisory_lock``) on its writer connection while it is open. The server drops it when
that connection ends, crash included, so it never goes stale. Several coordinator nodes on one
database are not built yet: a second one is refused with ``StoreInUse``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import socket
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import asyncpg
from databases import Database

from storage.backends import POSTGRES_SCHEMES, is_postgres_url, shown_url
from storage.errors import Conflict, StorageError, StoreInUse, StoreUnreachable
from storage.schema import PG_MIGRATIONS
from storage.sql import (
    _UPSERT_JOB,
    SqlStore,
    _job_row,
    _row_statements,
    _schema_refusal,
    check_schema,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator, Sequence

    from protocol.records import JobRecord, MinerRecord
    from protocol.types import JSONObject
    from storage.base import WalletSnapshot, WriteBatch

__all__ = ["PostgresJobStore", "check_postgres"]

# The advisory lock the dispatching store holds (per database: the key is scoped to it).
OWNER_LOCK_KEY = 0x41495442  # "AITB"
_CONNECT_TIMEOUT = 10.0
READ_CONNECTIONS = 4  # of the indexed reads' pool


def _driver_url(url: str) -> str:
    """The URL ``databases`` and asyncpg accept (``postgres://`` is libpq's short spelling)."""
    for scheme in POSTGRES_SCHEMES[1:]:
        if url.startswith(scheme):
            return "postgresql://" + url.removeprefix(scheme)
    return url


# The session settings of the start-up's reads (as the writer's session sets them for itself).
_NO_TIMEOUTS = {"statement_timeout": "0", "lock_timeout": "0"}
_START_UP: contextvars.ContextVar[bool] = contextvars.ContextVar("start_up", default=False)


@contextlib.contextmanager
def _start_up() -> Iterator[None]:
    """Reads within are the start-up's (``PostgresJobStore._start_db``)."""
    token = _START_UP.set(True)
    try:
        yield
    finally:
        _START_UP.reset(token)


_KEPT: dict[str, Any] = {"max_inactive_connection_lifetime": 0}  # asyncpg's default: 300 s

# What ``Database`` is given: the backend it picks, and nothing it reads (its own parse of a URL
# with several hosts, ``a:5432,b:5432``, failed on the port); the connections' URL is ``dsn``.
_POOL_URL = "postgresql://"


def _dsn_options(url: str) -> dict[str, Any]:
    """``Database`` options that make its pool connect as ``asyncpg.connect(url)`` does: from
    the whole URL, parsed by asyncpg. ``databases`` passes asyncpg the URL's host, port, user,
    password and database alone, which dropped every query parameter (``sslmode=verify-full``
    connected without checking the server's certificate; ``?host=/run/postgresql``, a Unix
    socket, tried TCP) while the start-up check and a standby's poll honoured them."""
    given = {"host": None, "port": None, "user": None, "password": None, "database": None}
    return {"dsn": url, **given}


@functools.cache
def _numbered(sql: str) -> str:
    """``sql`` with its ``?`` placeholders as asyncpg's ``$1, $2, …`` (none sit in literals)."""
    parts = sql.split("?")
    return parts[0] + "".join(f"${i}{part}" for i, part in enumerate(parts[1:], 1))


@asynccontextmanager
async def _map_errors() -> AsyncIterator[None]:
    """asyncpg's exceptions (and a lost connection) as ``StorageError`` subclasses."""
    try:
        yield
    except asyncpg.IntegrityConstraintViolationError as exc:
        raise Conflict(str(exc)) from exc
    except (
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        asyncpg.exceptions.InternalClientError,
        OSError,
    ) as exc:
        raise StorageError(str(exc) or type(exc).__name__) from exc


async def _commit_batch(conn: Any, batch: WriteBatch) -> None:
    """One transaction: every job snapshot as an upsert (whole rows: later snapshots keep what
    never changes), then the other rows, one ``executemany`` per statement."""
    stored = {id(r.receipt): r.receipt_id for r in batch.receipts}
    transaction = conn.transaction()
    await transaction.start()
    try:
        if batch.jobs:
            await conn.executemany(
                _numbered(_UPSERT_JOB), [_job_row(j, stored) for j in batch.jobs.values()]
            )
        for sql, rows in _row_statements(batch, stored):
            await conn.executemany(_numbered(sql), rows)
    except BaseException:
        # The failure is the statement's: a rollback on a connection the server ended fails
        # too ("cannot call Transaction.__aexit__(): the underlying connection is closed"),
        # and ``async with`` reported that instead of the server's reason.
        with contextlib.suppress(Exception):
            await transaction.rollback()
        raise
    await transaction.commit()


async def _applied_versions(conn: Any) -> tuple[set[int], set[str]]:
    """As SQLite's: the applied migrations, and the names of the tables, indexes and views in
    the schema the store's statements create in (the first of the search path)."""
    names = {
        r[0]
        for r in await conn.fetch(
            "SELECT c.relname FROM pg_class AS c JOIN pg_namespace AS n "
            "ON n.oid = c.relnamespace WHERE n.nspname = current_schema()"
        )
    }
    if await conn.fetchval("SELECT to_regclass('schema_version')") is None:
        return set(), names
    return {r[0] for r in await conn.fetch("SELECT version FROM schema_version")}, names


async def _lock_holder(conn: Any) -> str:
    """`` (PostgreSQL backend pid N, from ADDRESS)`` of the session holding the owner lock."""
    row = await conn.fetchrow(
        "SELECT l.pid, a.client_addr FROM pg_locks AS l LEFT JOIN pg_stat_activity AS a "
        "ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
        "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND l.classid = 0 AND l.objid = $1 AND l.objsubid = 1 LIMIT 1",  # one bigint key
        OWNER_LOCK_KEY,
    )
    if row is None:
        return ""
    where = f", from {row['client_addr']}" if row["client_addr"] is not None else ""
    return f" (PostgreSQL backend pid {row['pid']}{where})"


# Keepalives probe only a connection with nothing unacknowledged: when the host dies or is cut
# off right after the server replied (under load, the usual moment), the server retransmits
# its reply for ~15 min (tcp_retries2) instead; tcp_user_timeout bounds that at 25 s too.
_KEEPALIVES = (
    "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3; "
    "SET tcp_user_timeout = 25000"
)


# The writer's own side of the same bounds: a server host that died, or a network that dropped
# the connection, without a word, left a commit waiting ~15 min for its reply (TCP
# retransmissions), every caller with it, and an idle writer never learnt of it, keeping its
# miners' sockets from a standby that took over. With these the kernel gives up after ~25 s: the
# connection ends, and with it the coordinator (``maintain``), as on a server restart.
_CLIENT_KEEPALIVES = (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))
_CLIENT_USER_TIMEOUT_MS = 25000


class _WriterConnection(asyncpg.Connection):  # type: ignore[misc]
    """The writer's connection, whose TCP socket gives up on a server that stopped answering."""

    def __init__(self, protocol: Any, transport: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(protocol, transport, *args, **kwargs)
        sock = transport.get_extra_info("socket")
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return  # a Unix socket: the server's host is this one
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        options = (*_CLIENT_KEEPALIVES, ("TCP_USER_TIMEOUT", _CLIENT_USER_TIMEOUT_MS))
        for name, value in options:
            option = getattr(socket, name, None)  # Linux has them all
            if option is not None:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)


async def _take_owner_lock(conn: Any, url: str) -> None:
    """Take the owner lock on ``conn``'s session; ``StoreInUse`` naming the holder if taken."""
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", OWNER_LOCK_KEY):
        raise StoreInUse(
            f"{shown_url(url)} is in use by another coordinator{await _lock_holder(conn)}: stop "
            "it, or give this one a database of its own (DATABASE_URL)"
        )


# Server encodings that hold every character: UTF8, and SQL_ASCII (bytes kept as sent). Any
# other (LATIN1, WIN1252, ...) cannot store most of Unicode: a client's payload in Japanese
# then failed its commit, and a failed commit stops the coordinator.
_ENCODINGS = ("UTF8", "SQL_ASCII")


async def _encoding_refusal(conn: Any) -> str | None:
    """Why a dispatching store may not use ``conn``'s database for its encoding, if it may not."""
    encoding = await conn.fetchval("SHOW server_encoding")
    if encoding in _ENCODINGS:
        return None
    return (
        f"the database's encoding is {encoding}, which cannot store every character clients and "
        "miners send: give the coordinator a UTF8 database (CREATE DATABASE ... ENCODING 'UTF8')"
    )


@asynccontextmanager
async def _connecting(url: str) -> AsyncIterator[None]:
    """A connection that fails (refused, timed out, bad credentials) as one clear line."""
    try:
        yield
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        # asyncpg puts a DETAIL or HINT on lines of its own: one line, as any refusal at start.
        why = " ".join(str(exc).split()) or type(exc).__name__  # a TimeoutError says nothing
        lasting = isinstance(exc, asyncpg.ClientConfigurationError) or not isinstance(
            exc, _PASSING_REFUSALS
        )
        why = f"cannot connect to {shown_url(url)}: {why}"
        raise StoreUnreachable(why, lasting=lasting) from None


# Refusals of a connection that may be over once a server's restart is: refused, timed out,
# "the database system is starting up" (or shutting down), too many connections, a database
# not accepting connections for now, a connection lost during the handshake. Anything else the
# server answered (credentials, no such database, an unknown setting in the URL) or a bad TLS
# setting (ClientConfigurationError) does not change by waiting.
_PASSING_REFUSALS = (
    OSError,  # TimeoutError and ConnectionRefusedError included
    asyncpg.OperatorInterventionError,  # starting up, shutting down, in recovery
    asyncpg.PostgresConnectionError,
    asyncpg.InsufficientResourcesError,  # too many connections, out of memory
    asyncpg.ObjectNotInPrerequisiteStateError,  # "is not currently accepting connections"
    asyncpg.InterfaceError,
)


async def _preflight(url: str) -> None:
    async with _connecting(url):
        conn = await asyncpg.connect(_driver_url(url), timeout=_CONNECT_TIMEOUT)
    try:
        async with _map_errors():
            refusal = _schema_refusal(*await _applied_versions(conn)) or await _encoding_refusal(
                conn
            )
            if refusal is not None:
                raise StorageError(f"{shown_url(url)}: {refusal}")
            await _take_owner_lock(conn, url)
    finally:
        await conn.close()  # the lock, if taken, goes with the session


def check_postgres(url: str) -> None:
    """Before serving: a one-line ``StorageError`` when the database cannot be reached, was
    written by a newer coordinator or another program, has an encoding that cannot store every
    character, or has a coordinator already (``StoreInUse``). ``open``
    takes the lock for real; this only makes the usual refusals come before anything starts."""
    asyncio.run(_preflight(url))


class PostgresJobStore(SqlStore):
    """PostgreSQL store. ``exclusive`` as ``DatabasesJobStore``'s: the dispatching store holds
    the database's owner lock and migrates; read-only tools pass False."""

    @staticmethod
    def _json_text(column: str, key: str) -> str:
        # json, not jsonb (which would store a parsed copy first). PostgreSQL's JSON parser
        # refuses a document with a "\\u0000" escape (it cannot be text): input with NUL is
        # refused (protocol.codec.input_refusal), so no stored document has one.
        return f"(CAST({column} AS json) ->> '{key}')"

    @classmethod
    def _json_string(cls, column: str, key: str) -> str:
        # ``->>`` spells any JSON value as text (the number 5 as '5', true as 'true').
        return (
            f"CASE WHEN json_typeof(CAST({column} AS json) -> '{key}') = 'string' "
            f"THEN {cls._json_text(column, key)} END"
        )

    @staticmethod
    def _json_values(column: str, paths: Sequence[tuple[str, ...]]) -> str:
        # One parse of the document per row (each ``->`` on json parses the text again):
        # ``json_each`` splits it once, and only the top-level values the paths start at are
        # kept. json, not jsonb: jsonb rewrites numbers (the float 1e16 would come back as
        # the integer 10000000000000000), json keeps each value's text as written.
        tops = ", ".join(sorted({f"'{path[0]}'" for path in paths}))
        picks = ", ".join("o" + "".join(f" -> '{k}'" for k in path) for path in paths)
        return (
            f"(SELECT CAST(json_build_array({picks}) AS text) FROM (SELECT "
            f"json_object_agg(key, value) AS o FROM json_each(CAST({column} AS json)) "
            f"WHERE key IN ({tops})) AS p)"
        )

    # NUMERIC: exact, and no sum overflows it.
    _PRICE_UNITS = (
        "COALESCE(SUM(GREATEST(0, LEAST(1e18, ROUND(CAST(COALESCE("
        + _json_text("receipt", "price")
        + ", '0') AS NUMERIC) * 100000000)))), 0)"
    )

    def __init__(self, url: str, *, exclusive: bool = True) -> None:
        if not is_postgres_url(url):
            raise StorageError(f"not a PostgreSQL URL: {url.split(':', 1)[0]!r}")
        self.url = url
        self.exclusive = exclusive
        driver_url = _driver_url(url)
        # Three pools: the writer's one connection, held for the store's life (it holds the
        # owner lock), and the reads' and the scans' (a scan must not hold up the reads clients
        # wait on). A read takes a connection from its pool for each query, so a connection
        # the server or the network ended is replaced: only the read that met it fails.
        # The writer's pool keeps no minimum: its one connection is taken at open and held, and
        # once the server ends it (``maintain``) a minimum made the pool connect again in the
        # background, which the close then cut short mid-handshake (asyncpg left an unread
        # "unexpected connection_lost()" error on the loop).
        dsn = _dsn_options(driver_url)
        self._db = Database(
            _POOL_URL, min_size=0, max_size=1, connection_class=_WriterConnection, **dsn
        )
        # No minimum here either: a pool with one dialled every connection the server ended
        # again at once, in the background, and while the server refused connections (a
        # restart under way) logged a traceback for every try. A read that finds its
        # connection gone makes a new one; one made is kept however long it idles.
        self._read_db = Database(_POOL_URL, min_size=0, max_size=READ_CONNECTIONS, **_KEPT, **dsn)
        self._scan_db = Database(_POOL_URL, min_size=0, max_size=1, **_KEPT, **dsn)
        # The start-up's reads (``_START_UP``), one after the other, without the database's or
        # role's timeouts: a client's read may be cancelled (a 503 to retry), a start-up's
        # was a start that failed every time.
        self._start_db = Database(
            _POOL_URL, min_size=0, max_size=1, server_settings=_NO_TIMEOUTS, **dsn
        )
        self._stack = AsyncExitStack()
        self._reader = self._scanner = None  # SqlStore's pinned connections: unused here
        self._raw: Any = None  # the writer connection's asyncpg connection
        self._probe: Any = None  # a standby's one connection for polling the owner lock

    def _driver_errors(self) -> AbstractAsyncContextManager[None]:
        return _map_errors()

    async def _fetch(
        self, sql: str, values: dict[str, Any] | None = None, *, scan: bool = False
    ) -> Sequence[Any]:
        db = self._start_db if _START_UP.get() else self._scan_db if scan else self._read_db
        if self._raw is None:
            raise StorageError("store is closed")
        async with _map_errors():
            return await db.fetch_all(sql, values)

    # ``claim``: nothing to take before ``open``, the lock lives on the writer's connection.

    async def _connect(self) -> None:
        await self._connect_pool(self._db)
        async with _connecting(self.url):  # the writer's pool connects here (no minimum)
            writer = await asyncio.wait_for(
                self._stack.enter_async_context(self._db.connection()), _CONNECT_TIMEOUT
            )
        async with _map_errors():
            raw = writer.raw_connection
            # The writer's session is idle whenever nothing happens; a server that ends idle
            # sessions (idle_session_timeout, PostgreSQL 14+) must not end this one: its loss
            # stops the coordinator. (A server without the setting has no such timeout.)
            with contextlib.suppress(asyncpg.UndefinedObjectError):
                await raw.execute("SET idle_session_timeout = 0")
            # Nor may a database's or role's statement or lock timeout (usual on managed
            # servers) cancel a commit that is slow for once (a burst, a row an operator's
            # session holds): a cancelled commit failed, and stopped the coordinator too.
            await raw.execute(
                "SET statement_timeout = 0; SET lock_timeout = 0; "
                "SET idle_in_transaction_session_timeout = 0"
            )
            if self.exclusive:
                refusal = await _encoding_refusal(raw)
                if refusal is not None:
                    raise StorageError(f"{shown_url(self.url)}: {refusal}")
                await _take_owner_lock(raw, self.url)
                # The lock goes with this session; the server ends the session of a
                # coordinator whose host died or was cut off after about 25 s of silence
                # instead of the kernel's two hours, so a standby can take over.
                await raw.execute(_KEEPALIVES)
            self._raw = raw
            await self._migrate()
        await self._connect_pool(self._read_db)
        await self._connect_pool(self._scan_db)
        await self._connect_pool(self._start_db)  # no minimum: connects at its first read

    # What only a start-up reads (``Coordinator.restore``): the live jobs, the counts, the
    # wallet, the receipt chain's head. They read whole tables or indexes; a database's or
    # role's ``statement_timeout`` (usual on managed servers) cancelled one that took longer
    # (a big table, an operator's lock) and the coordinator could not start.
    async def load_active(self) -> tuple[list[JobRecord], list[MinerRecord]]:
        with _start_up():
            return await super().load_active()

    async def count_jobs(self) -> dict[str, int]:
        with _start_up():
            return await super().count_jobs()

    async def load_wallet(self, now: float, settled_since: float | None = None) -> WalletSnapshot:
        with _start_up():
            return await super().load_wallet(now, settled_since)

    async def receipt_chain_head(self) -> JSONObject | None:
        with _start_up():
            return await super().receipt_chain_head()

    async def _connect_pool(self, db: Database) -> None:
        async with _connecting(self.url):
            await asyncio.wait_for(db.connect(), _CONNECT_TIMEOUT)

    async def _migrate(self) -> None:
        raw = self._raw
        applied, names = await _applied_versions(raw)
        known = [v for vs, _ in PG_MIGRATIONS for v in vs]
        check_schema(applied, names, known, exclusive=self.exclusive)
        if self.exclusive:  # after the check: a database that is not ours is left as it was
            await raw.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
            )
        for versions, statements in PG_MIGRATIONS:
            if all(v in applied for v in versions):
                continue
            # Not ``async with``: on a session the server ended (a restart, a failover during a
            # long migration) its rollback's complaint ("cannot call Transaction.__aexit__():
            # the underlying connection is closed") replaced the reason, as in ``_commit_batch``.
            transaction = raw.transaction()
            await transaction.start()
            try:
                for sql in statements:
                    await raw.execute(sql)
                await raw.executemany(
                    "INSERT INTO schema_version (version) VALUES ($1)", [(v,) for v in versions]
                )
            except BaseException:
                with contextlib.suppress(Exception):
                    await transaction.rollback()
                raise
            await transaction.commit()

    async def owner_free(self) -> bool:
        """Whether the owner lock is free now, asked on one connection kept between polls (a
        standby's ``open`` per poll would start a server session and a pool every time);
        ``StoreUnreachable`` when the server cannot be asked."""
        try:
            async with _connecting(self.url):
                if self._probe is None:
                    self._probe = await asyncpg.connect(
                        _driver_url(self.url), timeout=_CONNECT_TIMEOUT
                    )
                # Bounded as a connect is: a server host that died, or a network that dropped
                # the connection, leaves it open with nobody answering, and the poll waited
                # ~15 min of TCP retransmissions (for ever behind a proxy) instead of asking
                # again on a new connection, and taking over once the database is back.
                free = await self._probe.fetchval(
                    "SELECT pg_try_advisory_lock($1)", OWNER_LOCK_KEY, timeout=_CONNECT_TIMEOUT
                )
                if free:
                    await self._probe.execute(
                        "SELECT pg_advisory_unlock($1)", OWNER_LOCK_KEY, timeout=_CONNECT_TIMEOUT
                    )
        except StoreUnreachable:
            await self._close_probe()  # lost (e.g. a server restart): a new one next time
            raise
        if free:
            await self._close_probe()  # done waiting: ``open`` takes the lock for real
        return bool(free)

    async def _close_probe(self) -> None:
        probe, self._probe = self._probe, None
        if probe is not None:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await probe.close(timeout=_CONNECT_TIMEOUT)

    async def close(self) -> None:
        self._raw = None  # first: reads and commits from now on are "store is closed"
        await self._close_probe()
        try:
            async with _map_errors():
                await self._stack.aclose()
        finally:
            for db in (self._db, self._read_db, self._scan_db, self._start_db):
                if db.is_connected:
                    with contextlib.suppress(Exception):  # each pool closes whatever happened
                        await db.disconnect()

    async def commit(self, batch: WriteBatch) -> None:
        raw = self._raw
        if raw is None:
            raise StorageError("store is closed")
        async with _map_errors():
            try:
                await _commit_batch(raw, batch)
            except (asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError) as exc:
                # Not the batch: the connection. The server ended the session (its message
                # arrived between two statements) and the next one met the protocol's state,
                # "cannot switch to state 13; another operation (2) is in progress", which
                # was the whole line the coordinator stopped with.
                raise StorageError(
                    f"the connection to {shown_url(self.url)} was lost or cannot be used (a "
                    f"server restart, or its session was ended): {exc}"
                ) from exc

    async def maintain(self) -> None:
        """Watch the writer's connection (PostgreSQL checkpoints and vacuums by itself): when
        the server ends it (a restart, ``pg_terminate_backend``), the owner lock went with it,
        so raise ``StorageError`` at once, which stops the coordinator as a failed commit
        does. Waiting for the next commit left an idle coordinator ready, answering from its
        memory and keeping its miners' sockets, while a standby took the database over."""
        raw = self._raw
        if raw is None:
            return
        lost = anyio.Event()

        def ended(_: object) -> None:
            lost.set()

        try:
            raw.add_termination_listener(ended)
            if raw.is_closed():
                lost.set()
        except asyncpg.InterfaceError:  # already released to the pool: the connection ended
            lost.set()
        try:
            await lost.wait()
        finally:
            with contextlib.suppress(asyncpg.InterfaceError):
                raw.remove_termination_listener(ended)
        if self._raw is raw:  # not ``close``: the server or the network ended it
            raise StorageError(
                f"the connection to {shown_url(self.url)} was lost (a server restart, or its "
                "session was ended): stopping, as a failed commit would"
            )
