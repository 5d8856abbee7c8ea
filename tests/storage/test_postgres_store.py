"""What only the PostgreSQL store does: its schema against SQLite's, migrations, the owner lock,
the start-up checks, read-only use. (The shared contract: test_store_contract.py.)"""

from __future__ import annotations

import contextlib
import secrets
import socket
import sqlite3
from contextlib import closing
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio
import asyncpg
import pytest

import storage.postgres
from storage.backends import shown_url, store_for
from storage.base import JobQuery
from storage.errors import StorageError, StoreInUse, StoreUnreachable
from storage.postgres import PostgresJobStore, check_postgres
from storage.schema import PG_MIGRATIONS
from storage.sql import DatabasesJobStore
from tests.conftest import make_settings
from tests.postgres import admin
from tests.storage.test_store_contract import batch, event, job
from web import cli

if TYPE_CHECKING:
    from pathlib import Path

    from tests.postgres import PostgresServer

pytestmark = pytest.mark.anyio


async def _columns_pg(url: str) -> dict[str, list[str]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = 'public' ORDER BY table_name, ordinal_position"
        )
    finally:
        await conn.close()
    tables: dict[str, list[str]] = {}
    for r in rows:
        tables.setdefault(r["table_name"], []).append(r["column_name"])
    return tables


def _columns_sqlite(path: Path) -> dict[str, list[str]]:
    with closing(sqlite3.connect(path)) as db:
        names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: [c[1] for c in db.execute(f"PRAGMA table_info({t})")] for t in names}


async def _check_and_use(url: str) -> None:
    """The start-up check passes for ``url``, and a store opened on it commits, reads by key
    (the read pool) and scans (the scan pool)."""
    await anyio.to_thread.run_sync(check_postgres, url)
    s = PostgresJobStore(url)
    await s.open()
    try:
        await s.commit(batch(jobs=[job("j1")], events=[event("j1", 1)]))
        assert await s.get_job("j1") == job("j1")
        assert (await s.list_jobs(JobQuery(job_type="none")))[1] == 0
    finally:
        await s.close()


async def test_the_schema_has_sqlites_tables_and_columns(postgres_url: str, tmp_path: Path) -> None:
    """Every table and column SQLite's migrations leave, under the same names (so the shared
    reads and writes fit both); PostgreSQL's jobs add only their ``rowid`` (SQLite's is
    implicit)."""
    with anyio.fail_after(20):
        for s in (PostgresJobStore(postgres_url), DatabasesJobStore(f"sqlite:///{tmp_path}/s.db")):
            await s.open()
            await s.close()
        pg = await _columns_pg(postgres_url)
    lite = _columns_sqlite(tmp_path / "s.db")
    assert pg["jobs"][0] == "rowid"
    pg["jobs"] = pg["jobs"][1:]
    assert {t: sorted(c) for t, c in pg.items()} == {t: sorted(c) for t, c in lite.items()}


async def test_a_second_coordinator_is_refused_until_the_first_closes(postgres_url: str) -> None:
    """The owner lock: a second dispatching store on the database gets ``StoreInUse`` naming
    the holder (as the start-up check does); once the first closes, it opens."""
    with anyio.fail_after(20):
        first = PostgresJobStore(postgres_url)
        await first.open()
        try:
            second = PostgresJobStore(postgres_url)
            with pytest.raises(StoreInUse, match=r"in use by another coordinator \(PostgreSQL"):
                await second.open()
            with pytest.raises(StoreInUse, match="in use by another coordinator"):
                await anyio.to_thread.run_sync(check_postgres, postgres_url)
            # A read-only tool may open it meanwhile, and sees the owner's commits.
            await first.commit(batch(jobs=[job("j1")], events=[event("j1", 1)]))
            reader = PostgresJobStore(postgres_url, exclusive=False)
            await reader.open()
            assert await reader.get_job("j1") == job("j1")
            await reader.close()
        finally:
            await first.close()
        await anyio.to_thread.run_sync(check_postgres, postgres_url)
        second = PostgresJobStore(postgres_url)
        await second.open()
        assert await second.get_job("j1") == job("j1")
        await second.close()


async def test_a_read_only_store_never_creates_the_schema(postgres_url: str) -> None:
    with anyio.fail_after(10):
        reader = PostgresJobStore(postgres_url, exclusive=False)
        with pytest.raises(StorageError, match="no coordinator schema yet"):
            await reader.open()
        assert "schema_version" not in await _columns_pg(postgres_url)


async def test_a_database_from_a_newer_coordinator_is_refused(postgres_url: str) -> None:
    with anyio.fail_after(20):
        s = PostgresJobStore(postgres_url)
        await s.open()
        await s.close()
        conn = await asyncpg.connect(postgres_url)
        await conn.execute("INSERT INTO schema_version (version) VALUES (99)")
        await conn.close()
        with pytest.raises(StorageError, match="schema version 99, newer than this coordinator"):
            await anyio.to_thread.run_sync(check_postgres, postgres_url)
        with pytest.raises(StorageError, match="schema version 99"):
            await PostgresJobStore(postgres_url).open()


async def test_another_programs_database_is_refused_untouched(postgres_url: str) -> None:
    """A table of ours by name and no coordinator schema: another program's database, refused
    on one line before anything is written (migration 1 failed midway through start-up)."""
    with anyio.fail_after(20):
        conn = await asyncpg.connect(postgres_url)
        await conn.execute("CREATE TABLE receipts (id BIGINT PRIMARY KEY, body TEXT)")
        await conn.close()
        before = await _columns_pg(postgres_url)
        refusal = "not a coordinator database: it has a 'receipts' of its own"
        with pytest.raises(StorageError, match=refusal):
            await anyio.to_thread.run_sync(check_postgres, postgres_url)
        for exclusive in (True, False):
            with pytest.raises(StorageError, match=refusal):
                await PostgresJobStore(postgres_url, exclusive=exclusive).open()
        assert await _columns_pg(postgres_url) == before


@pytest.mark.parametrize("encoding", ["LATIN1", "SQL_ASCII"])
async def test_a_database_whose_encoding_cannot_store_unicode_is_refused(
    postgres_server: PostgresServer, encoding: str
) -> None:
    """LATIN1 cannot store most characters: a client's payload in Japanese failed its commit,
    which stops the coordinator. Such a database is refused at start-up; SQL_ASCII keeps any
    bytes, and serves."""
    name = f"enc_{encoding.lower()}_{secrets.token_hex(4)}"
    await admin(
        postgres_server,
        f"CREATE DATABASE {name} ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C' "
        "TEMPLATE template0",
    )
    url = postgres_server.database_url(name)
    try:
        with anyio.fail_after(20):
            if encoding == "LATIN1":
                refusal = "the database's encoding is LATIN1, which cannot store every character"
                with pytest.raises(StorageError, match=refusal):
                    await anyio.to_thread.run_sync(check_postgres, url)
                with pytest.raises(StorageError, match=refusal):
                    await PostgresJobStore(url).open()
                return
            await anyio.to_thread.run_sync(check_postgres, url)
            store = PostgresJobStore(url)
            await store.open()
            try:
                rec = job("j1", payload={"type": "翻訳", "text": "日本語 é 🎉"})
                await store.commit(batch(jobs=[rec], events=[event("j1", 1)]))
                assert await store.get_job("j1") == rec
                found, _ = await store.list_jobs(JobQuery(job_type="翻訳"))
                assert found == [rec]
            finally:
                await store.close()
    finally:
        await admin(postgres_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def test_an_unreachable_server_is_one_clear_error() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"postgresql://someone:hunter2@127.0.0.1:{port}/db"
    with anyio.fail_after(20):
        with pytest.raises(StorageError, match="cannot connect to") as checked:
            await anyio.to_thread.run_sync(check_postgres, url)
        with pytest.raises(StorageError, match="cannot connect to") as opened:
            await PostgresJobStore(url).open()
    for exc in (checked.value, opened.value):
        assert "hunter2" not in str(exc)
        assert "\n" not in str(exc)


async def test_a_connect_refusal_with_a_hint_is_still_one_line(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncpg puts a refusal's DETAIL and HINT on lines of their own (here: TLS verification
    asked for, and no root certificate in ~/.postgresql): serve's refusal is one line."""
    monkeypatch.setenv("HOME", str(tmp_path))
    url = f"{postgres_url}?sslmode=verify-full"
    with anyio.fail_after(20):
        with pytest.raises(StorageError, match="cannot connect to") as checked:
            await anyio.to_thread.run_sync(check_postgres, url)
        with pytest.raises(StorageError, match="cannot connect to") as opened:
            await PostgresJobStore(url).open()
    for exc in (checked.value, opened.value):
        assert "root.crt" in str(exc)
        assert "HINT:" in str(exc)  # kept, on the same line
        assert "\n" not in str(exc)


def test_store_for_picks_the_backend_by_scheme(tmp_path: Path) -> None:
    for url in ("postgresql://u@h/db", "postgres://u@h/db", "postgresql+asyncpg://u@h/db"):
        assert isinstance(store_for(url), PostgresJobStore)
    assert isinstance(store_for(f"sqlite:///{tmp_path}/x.db"), DatabasesJobStore)
    with pytest.raises(StorageError):
        PostgresJobStore("sqlite:///x.db")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u:p@ss:w@rd@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("sqlite:///a@b.db", "sqlite:///a@b.db"),
        # libpq's query parameters carry passwords too (asyncpg reads them)
        ("postgresql://u@h/db?password=hunter2", "postgresql://u@h/db?password=***"),
        (
            "postgresql://u@h/db?sslmode=verify-full&sslpassword=k3y&application_name=a",
            "postgresql://u@h/db?sslmode=verify-full&sslpassword=***&application_name=a",
        ),
        ("postgresql://u:pw@h/db?password=x", "postgresql://u:***@h/db?password=***"),
        ("postgresql://u@/db?host=/run/postgresql", "postgresql://u@/db?host=/run/postgresql"),
    ],
)
def test_shown_urls_never_carry_a_password(url: str, shown: str) -> None:
    assert shown_url(url) == shown


async def test_reads_recover_from_a_lost_connection(postgres_url: str) -> None:
    """A read connection the server ends (an admin, an idle timeout, a proxy) fails the read
    that meets it, and the next read gets a new one; the writer's connection is untouched."""
    with anyio.fail_after(20):
        s = PostgresJobStore(postgres_url)
        await s.open()
        try:
            await s.commit(batch(jobs=[job("j1")], events=[event("j1", 1)]))
            assert await s.get_job("j1") == job("j1")
            assert (await s.list_jobs(JobQuery(job_type="none")))[1] == 0  # the scan pool
            writer = await s._raw.fetchval("SELECT pg_backend_pid()")
            admin = await asyncpg.connect(postgres_url)
            ended = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid NOT IN ($1, pg_backend_pid())",
                writer,
            )
            await admin.close()
            assert ended >= 2
            for _ in range(2):  # at most the first read of each pool meets a dead connection
                with contextlib.suppress(StorageError):
                    await s.get_job("j1")
                with contextlib.suppress(StorageError):
                    await s.list_jobs(JobQuery(job_type="none"))
            assert await s.get_job("j1") == job("j1")
            assert (await s.list_jobs(JobQuery(job_type="none")))[1] == 0
            await s.commit(batch(jobs=[job("j2")], events=[event("j2", 1)]))
            assert await s.get_job("j2") == job("j2")
        finally:
            await s.close()


async def test_the_writer_session_is_exempt_from_idle_session_timeout(postgres_url: str) -> None:
    """A server that ends idle sessions would end the writer's in any quiet minute, and with
    it the coordinator: the writer turns the timeout off for its own session."""
    with anyio.fail_after(20):
        admin = await asyncpg.connect(postgres_url)
        name = await admin.fetchval("SELECT current_database()")
        await admin.execute(f"ALTER DATABASE \"{name}\" SET idle_session_timeout = '50s'")
        await admin.close()
        s = PostgresJobStore(postgres_url)
        await s.open()
        try:
            assert await s._raw.fetchval("SHOW idle_session_timeout") == "0"
            # The owner lock's session: a dead coordinator host lets go of it in ~25 s.
            assert [
                await s._raw.fetchval(f"SHOW tcp_keepalives_{name}")
                for name in ("idle", "interval", "count")
            ] == ["10", "5", "3"]
            # ... also when the server's last reply was never acknowledged (keepalives only
            # probe an idle connection; a retransmitting one waits ~15 min without this).
            assert await s._raw.fetchval("SHOW tcp_user_timeout") == "25000"
            other = await asyncpg.connect(postgres_url)  # the database's setting holds
            assert await other.fetchval("SHOW idle_session_timeout") == "50s"
            await other.close()
        finally:
            await s.close()


async def test_maintain_raises_once_the_server_ends_the_writers_session(postgres_url: str) -> None:
    """The owner lock lives on the writer's session: when the server ends it (a restart, an
    admin), ``maintain`` fails at once (the coordinator stops, as on a failed commit) instead
    of the loss waiting for the next commit; a store that closes ends it quietly."""
    with anyio.fail_after(20):
        s = PostgresJobStore(postgres_url)
        await s.open()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(s.maintain)
                await anyio.wait_all_tasks_blocked()
                await s.close()
            await s.open()
            writer = await s._raw.fetchval("SELECT pg_backend_pid()")

            async def end_it() -> None:
                await anyio.wait_all_tasks_blocked()
                admin = await asyncpg.connect(postgres_url)
                try:
                    assert await admin.fetchval("SELECT pg_terminate_backend($1)", writer)
                finally:
                    await admin.close()

            async with anyio.create_task_group() as tg:
                tg.start_soon(end_it)
                with pytest.raises(StorageError, match=r"connection to .* was lost"):
                    await s.maintain()
        finally:
            await s.close()


async def test_the_writers_socket_gives_up_on_a_silent_server(postgres_url: str) -> None:
    """A database host that died without a word left a commit waiting ~15 min for its reply
    (TCP retransmissions) and an idle writer unaware of it: the writer's socket probes an idle
    server and gives up on an unacknowledged request after 25 s, as the server's side does."""
    with anyio.fail_after(20):
        s = PostgresJobStore(postgres_url)
        await s.open()
        try:
            sock = s._raw._con._transport.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert [
                sock.getsockopt(socket.IPPROTO_TCP, option)
                for option in (
                    socket.TCP_KEEPIDLE,
                    socket.TCP_KEEPINTVL,
                    socket.TCP_KEEPCNT,
                    socket.TCP_USER_TIMEOUT,
                )
            ] == [10, 5, 3, 25000]
            await s.commit(batch(jobs=[job("j1")], events=[event("j1", 1)]))
            assert await s.get_job("j1") == job("j1")
        finally:
            await s.close()


async def test_a_slow_commit_outlives_the_databases_statement_timeout(postgres_url: str) -> None:
    """A database or role with a ``statement_timeout`` (usual on managed servers) cancelled a
    commit that waited longer, here behind a row an operator's session held, and a failed
    commit stops the coordinator: the writer's session turns it off for itself."""
    with anyio.fail_after(20):
        admin = await asyncpg.connect(postgres_url)
        try:
            name = await admin.fetchval("SELECT current_database()")
            await admin.execute(f"ALTER DATABASE \"{name}\" SET statement_timeout = '100ms'")
            s = PostgresJobStore(postgres_url)
            await s.open()
            try:
                await s.commit(batch(jobs=[job("j1")], events=[event("j1", 1)]))
                writer = await s._raw.fetchval("SELECT pg_backend_pid()")
                await admin.execute("BEGIN")
                await admin.execute("SELECT 1 FROM jobs WHERE job_id = 'j1' FOR UPDATE")
                watcher = await asyncpg.connect(postgres_url)  # a statistics snapshot a poll
                try:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(s.commit, batch(jobs=[job("j1", state="RUNNING")]))
                        while not await watcher.fetchval(  # noqa: ASYNC110 - a bounded poll
                            "SELECT now() - query_start > interval '300ms' "
                            "FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'",
                            writer,
                        ):
                            await anyio.sleep(0.01)
                        await admin.execute("COMMIT")  # lets go of the row
                finally:
                    await watcher.close()
                assert (await s.get_job("j1")) == job("j1", state="RUNNING")
            finally:
                await s.close()
        finally:
            await admin.close()


async def test_the_urls_parameters_reach_every_connection(postgres_url: str) -> None:
    """``DATABASE_URL``'s query parameters are asyncpg's (libpq's names): the start-up check
    honoured them, but the store's own connections were made from the URL's host, port, user,
    password and database alone, so ``sslmode=require`` (or ``verify-full``) connected without
    TLS where the server offers none (or without checking its certificate), and every other
    parameter (``application_name``, ``options``, ...) was dropped."""
    with anyio.fail_after(20):
        named = f"{postgres_url}?application_name=coordinator-a"
        s = PostgresJobStore(named)
        await s.open()
        try:
            await s.commit(batch(jobs=[job("j1")], events=[event("j1", 1)]))
            assert await s.get_job("j1") == job("j1")
            assert (await s.list_jobs(JobQuery(job_type="none")))[1] == 0  # the scan pool
            conn = await asyncpg.connect(postgres_url)
            try:
                names = [
                    r[0]
                    for r in await conn.fetch(
                        "SELECT application_name FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                ]
                ssl = await conn.fetchval("SHOW ssl")
            finally:
                await conn.close()
            assert len(names) >= 3  # the writer, a read and a scan connection
            assert set(names) == {"coordinator-a"}
        finally:
            await s.close()
        if ssl == "off":  # the test cluster's: TLS asked for must be refused, not skipped
            with pytest.raises(StoreUnreachable, match=r"cannot connect to .*SSL"):
                await PostgresJobStore(f"{postgres_url}?sslmode=require").open()
            with pytest.raises(StoreUnreachable, match="cannot connect to"):  # or no root.crt
                await PostgresJobStore(f"{postgres_url}?sslmode=verify-full").open()


async def test_a_unix_socket_url_serves(postgres_url: str) -> None:
    """libpq's spelling of a local server's socket directory, ``postgresql://USER@/DB?host=DIR``
    (peer authentication, no TCP): the start-up check took it, then the store tried a TCP
    connection to nowhere and the start failed (``No such file or directory``)."""
    with anyio.fail_after(20):
        conn = await asyncpg.connect(postgres_url)
        try:
            directories = await conn.fetchval("SHOW unix_socket_directories")
            port = await conn.fetchval("SHOW port")
            name = await conn.fetchval("SELECT current_database()")
        finally:
            await conn.close()
        directory = directories.split(",")[0].strip()
        if not directory or not await anyio.Path(directory, f".s.PGSQL.{port}").exists():
            pytest.skip("the test server has no Unix socket on this machine")
        user = urlsplit(postgres_url).username
        url = f"postgresql://{user}@/{name}?host={directory}&port={port}"
        await _check_and_use(url)


async def test_serve_waits_for_a_server_that_refuses_connections_for_now(
    postgres_server: PostgresServer,
    postgres_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A coordinator stops when its server restarts, and its supervisor starts it again: each
    start refused at once counted against the supervisor's limits (systemd gives up after five
    in 10 s), so a server down for a few seconds kept the coordinator down for good. ``serve``
    now tries again for ``DATABASE_WAIT_SECONDS`` (here: the database not accepting connections
    for now, as while it restarts), saying so on one line."""
    name = postgres_url.rsplit("/", 1)[1]
    settings = make_settings(tmp_path, database_url=postgres_url, database_wait_seconds=30)
    await admin(postgres_server, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    stores: list[object] = []

    async def serve_check() -> None:
        stores.append(await anyio.to_thread.run_sync(cli._claimed_store_or_say, settings))

    err = ""
    try:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(serve_check)
                while "trying again" not in err:
                    err += capsys.readouterr().err
                    await anyio.sleep(0.01)
                await admin(postgres_server, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    finally:
        await admin(postgres_server, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    assert isinstance(stores[0], PostgresJobStore)
    assert (err + capsys.readouterr().err).splitlines() == [
        f'aitbc-coordinator: cannot connect to {postgres_url}: database "{name}" is not '
        "currently accepting connections; trying again for 30 s"
    ]


async def test_serve_refuses_lasting_refusals_at_once_and_stops_waiting_in_time(
    postgres_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Credentials refused, no such database, a setting the server does not know (libpq's
    ``connect_timeout`` is one to asyncpg): waiting changes nothing, one line at once. A server
    that stays unreachable: the waiting line, then the refusal once the wait is over."""
    missing = postgres_url.rsplit("/", 1)[0] + "/no_such_database"
    unknown = f"{postgres_url}?connect_timeout=5"
    with anyio.fail_after(20):
        for url, why in [
            (missing, 'database "no_such_database" does not exist'),
            (unknown, 'unrecognized configuration parameter "connect_timeout"'),
        ]:
            settings = make_settings(tmp_path, database_url=url, database_wait_seconds=3600)
            assert await anyio.to_thread.run_sync(cli._claimed_store_or_say, settings) is None
            assert capsys.readouterr().err.splitlines() == [
                f"aitbc-coordinator: cannot connect to {url}: {why}"
            ]
        with socket.socket() as sock:  # a port nothing listens on
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        nobody = f"postgresql://someone@127.0.0.1:{port}/db"
        settings = make_settings(tmp_path, database_url=nobody, database_wait_seconds=1)
        assert await anyio.to_thread.run_sync(cli._claimed_store_or_say, settings) is None
        said = capsys.readouterr().err.splitlines()
    assert len(said) == 2
    assert said[0].startswith(f"aitbc-coordinator: cannot connect to {nobody}: ")
    assert said[0].endswith("; trying again for 1 s")
    assert said[1].startswith(f"aitbc-coordinator: cannot connect to {nobody}: ")


async def test_start_up_reads_outlive_the_databases_statement_timeout(postgres_url: str) -> None:
    """A database's or role's ``statement_timeout`` cancelled the start-up's reads (the live
    jobs, the counts, the wallet, the receipt chain's head) that waited longer: here behind an
    operator's lock, as on a big table, and the coordinator could not start at all, however
    often its supervisor tried. They run without it; a client's read keeps the database's bound
    (a 503 the client may retry)."""
    with anyio.fail_after(20):
        s = PostgresJobStore(postgres_url)
        await s.open()
        await s.commit(batch(jobs=[job("j1")], events=[event("j1", 1)]))
        await s.close()
        admin = await asyncpg.connect(postgres_url)
        watcher = await asyncpg.connect(postgres_url)
        try:
            name = await admin.fetchval("SELECT current_database()")
            await admin.execute(f"ALTER DATABASE \"{name}\" SET statement_timeout = '100ms'")
            s = PostgresJobStore(postgres_url)
            await s.open()
            try:
                await admin.execute("BEGIN")
                await admin.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
                with pytest.raises(StorageError, match="statement timeout"):
                    await s.get_job("j1")
                loaded: list[object] = []

                async def start_up() -> None:
                    loaded.append((await s.load_active())[0])
                    loaded.append(await s.count_jobs())

                async with anyio.create_task_group() as tg:
                    tg.start_soon(start_up)
                    while not await watcher.fetchval(  # noqa: ASYNC110 - a bounded poll
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND wait_event_type = 'Lock' AND now() - query_start > interval '300ms'"
                    ):
                        await anyio.sleep(0.01)
                    await admin.execute("COMMIT")  # lets go of the table
                assert loaded == [[job("j1")], {"QUEUED": 1}]
            finally:
                await s.close()
        finally:
            await watcher.close()
            await admin.close()


async def test_a_commit_whose_session_ends_says_why(postgres_url: str) -> None:
    """A commit under way when the server ended the writer's session (a restart, an admin)
    failed with the rollback's complaint instead ("cannot call Transaction.__aexit__(): the
    underlying connection is closed", or "cannot switch to state 15; another operation (2) is
    in progress", which reads as a bug of ours), and that was the line the coordinator stopped
    with: now it is the server's reason."""
    with anyio.fail_after(20):
        s = PostgresJobStore(postgres_url)
        await s.open()
        admin = await asyncpg.connect(postgres_url)
        watcher = await asyncpg.connect(postgres_url)  # a statistics snapshot a poll
        try:
            await s.commit(batch(jobs=[job("j1")], events=[event("j1", 1)]))
            writer = await s._raw.fetchval("SELECT pg_backend_pid()")
            await admin.execute("BEGIN")
            await admin.execute("SELECT 1 FROM jobs WHERE job_id = 'j1' FOR UPDATE")

            async def end_it() -> None:  # once the commit waits for the row
                while not await watcher.fetchval(  # noqa: ASYNC110 - a bounded poll
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 "
                    "AND wait_event_type = 'Lock'",
                    writer,
                ):
                    await anyio.sleep(0.01)
                await watcher.fetchval("SELECT pg_terminate_backend($1)", writer)

            async with anyio.create_task_group() as tg:
                tg.start_soon(end_it)
                with pytest.raises(StorageError) as failed:
                    await s.commit(batch(jobs=[job("j1", state="RUNNING")]))
            assert "terminating connection due to administrator command" in str(failed.value)
        finally:
            await watcher.close()
            await admin.close()
            with contextlib.suppress(StorageError):
                await s.close()


async def test_several_hosts_are_tried_in_turn(postgres_url: str) -> None:
    """libpq's list of hosts (a primary and its replicas, ``target_session_attrs=read-write``
    picks the primary): the settings refused it, and the store's pools could not parse it
    ('Port could not be cast to integer value as ...')."""
    with socket.socket() as sock:  # a port nothing listens on: the first host is down
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    parts = urlsplit(postgres_url)
    hosts = f"127.0.0.1:{port},{parts.hostname}:{parts.port}"
    url = f"postgresql://{parts.username}@{hosts}{parts.path}?target_session_attrs=read-write"
    with anyio.fail_after(20):
        await _check_and_use(url)


async def test_lost_read_connections_are_not_redialled_in_the_background(
    postgres_server: PostgresServer, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The read pools kept a minimum: each connection the server ended was dialled again at
    once in the background, and while the server refused connections (a restart under way,
    a database closed to connections) every try logged asyncpg's warning with a traceback
    ("Failed to restore the pool connection floor"), again and again. A lost connection is
    now replaced by the next read that needs one (which fails once, a 503, if it cannot)."""
    name = postgres_url.rsplit("/", 1)[1]
    with anyio.fail_after(20):
        s = PostgresJobStore(postgres_url)
        await s.open()
        try:
            await s.commit(batch(jobs=[job("j1")], events=[event("j1", 1)]))
            assert await s.get_job("j1") == job("j1")
            assert (await s.list_jobs(JobQuery(job_type="none")))[1] == 0
            pools = [db._backend._pool for db in (s._read_db, s._scan_db)]
            assert all(p.get_size() == 1 for p in pools)
            writer = await s._raw.fetchval("SELECT pg_backend_pid()")
            await admin(postgres_server, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            try:
                await admin(
                    postgres_server,
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    f"WHERE datname = '{name}' AND pid <> {writer}",
                )
                while any(p.get_size() for p in pools):  # noqa: ASYNC110 - a bounded poll
                    await anyio.sleep(0.01)
                assert [p._maintenance_task for p in pools] == [None, None]
                with pytest.raises(StorageError, match="not currently accepting connections"):
                    await s.get_job("j1")
            finally:
                await admin(postgres_server, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            assert await s.get_job("j1") == job("j1")
        finally:
            await s.close()
    assert "Failed to restore the pool connection floor" not in caplog.text


async def test_a_commit_on_a_connection_in_a_broken_state_says_it_was_lost(
    postgres_url: str,
) -> None:
    """When the server's message ending the session arrived between two statements of a
    batch, the next statement failed on asyncpg's protocol state ("cannot switch to state 13;
    another operation (2) is in progress", reading as a bug of ours), and that was the line
    the coordinator stopped with: it now says the connection was lost."""

    class Broken:  # the writer's connection in that state: every statement is refused
        def transaction(self) -> Any:
            return self

        async def start(self) -> None:
            raise asyncpg.exceptions.InternalClientError(
                "cannot switch to state 13; another operation (2) is in progress"
            )

    with anyio.fail_after(20):
        s = PostgresJobStore(postgres_url)
        await s.open()
        raw, s._raw = s._raw, Broken()
        try:
            with pytest.raises(StorageError, match=r"connection to .* was lost or cannot be used"):
                await s.commit(batch(jobs=[job("j1")], events=[event("j1", 1)]))
        finally:
            s._raw = raw
            await s.close()


async def test_a_migration_whose_session_ends_says_why(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start-up migration under way when the server ended the writer's session (a restart, a
    failover, an admin: a long one builds indexes on big tables) stopped the start with the
    rollback's complaint, 'cannot start: cannot call Transaction.__aexit__(): the underlying
    connection is closed', as commits did before: it is now the server's reason."""
    migrations = [
        *PG_MIGRATIONS,
        ((999,), ["SELECT pg_terminate_backend(pg_backend_pid())"]),
    ]
    monkeypatch.setattr(storage.postgres, "PG_MIGRATIONS", migrations)
    with anyio.fail_after(20), pytest.raises(StorageError) as failed:
        await PostgresJobStore(postgres_url).open()
    assert "terminating connection due to administrator command" in str(failed.value)
    assert "__aexit__" not in str(failed.value)
    conn = await asyncpg.connect(postgres_url)
    try:  # the migrations before it are in, and it is not
        assert 999 not in {r[0] for r in await conn.fetch("SELECT version FROM schema_version")}
    finally:
        await conn.close()
