"""A real PostgreSQL server for tests: ``postgres_url`` is a fresh empty database per test.

The server is ``AITBC_TEST_POSTGRES_URL`` when set (e.g. ``postgresql://postgres@127.0.0.1:5432/
postgres``, a role that may create databases). Otherwise it is a throwaway cluster that
``initdb``/``pg_ctl`` (on PATH, or the newest /usr/lib/postgresql/*/bin) start in a temporary
directory on 127.0.0.1, once per session and only when a test asks for ``postgres_url``; it is
stopped and deleted at the end of the session. As root, the server runs as the ``postgres`` user
(PostgreSQL refuses root).

Without either, these tests skip with a message, except where ``CI=true`` or
``POSTGRES_TESTS=required`` (set by ``.ci/run``, which also installs ``postgresql``): there they
fail. Registered for every test module by ``pytest_plugins`` in tests/conftest.py.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import sqlite3
import subprocess
import tempfile
from contextlib import asynccontextmanager, closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import pytest

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

URL_ENV = "AITBC_TEST_POSTGRES_URL"
DEBIAN_BINDIRS = "/usr/lib/postgresql/*/bin"
START_S = 20  # pg_ctl -w's own bound on the server's startup
CONNECT_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 6


@dataclass(frozen=True)
class PostgresServer:
    """A server tests may create databases on; ``url`` names its maintenance database."""

    url: str

    def database_url(self, name: str) -> str:
        """The same server, user and options, database ``name``."""
        return urlunsplit(urlsplit(self.url)._replace(path=f"/{name}"))


class ClusterStartError(Exception):
    """initdb or pg_ctl failed; the message is one line ending in the output's last lines."""


def unavailable(reason: str) -> NoReturn:
    """Skip the test, or fail it where PostgreSQL tests are required (CI)."""
    if os.environ.get("CI") == "true" or os.environ.get("POSTGRES_TESTS") == "required":
        pytest.fail(f"PostgreSQL tests are required here but {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL tests need a server: {reason}")


def find_tools() -> tuple[str, str] | None:
    """``initdb`` and ``pg_ctl``: from PATH, else from the newest Debian-packaged version."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb is not None and pg_ctl is not None:
        return initdb, pg_ctl
    bindirs = [
        path
        for path in Path("/").glob(DEBIAN_BINDIRS.lstrip("/"))
        if (path / "initdb").is_file() and (path / "pg_ctl").is_file()
    ]
    if not bindirs:
        return None
    newest = max(bindirs, key=lambda path: tuple(int(n) for n in path.parent.name.split(".")))
    return str(newest / "initdb"), str(newest / "pg_ctl")


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tail(*texts: str) -> str:
    """The last lines of ``texts``, joined on one line."""
    lines = [line.strip() for text in texts for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-LOG_TAIL_LINES:]) or "(no output)"


@contextmanager
def throwaway_cluster(initdb: str, pg_ctl: str, port: int) -> Iterator[PostgresServer]:
    """A new cluster in a temporary directory, serving 127.0.0.1:``port`` with trust auth;
    stopped and deleted on exit. ``pg_ctl -w`` waits for it to accept connections."""
    root = Path(tempfile.mkdtemp(prefix="aitbc-pg-"))
    data, log = str(root / "data"), root / "server.log"
    as_owner: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        as_owner = ["runuser", "-u", "postgres", "--"]

    def run(*args: str) -> None:
        done = subprocess.run([*as_owner, *args], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            server_log = log.read_text(errors="replace") if log.exists() else ""
            raise ClusterStartError(
                f"{Path(args[0]).name} exited {done.returncode}: "
                f"{tail(done.stdout, done.stderr, server_log)}"
            )

    try:
        # --no-sync and fsync=off: nothing is flushed to disk (the cluster is thrown away, and
        # no test crashes the server itself: kill -9 tests kill the coordinator, whose commits
        # the server has acknowledged either way); commits are otherwise the same. A database
        # per test then costs ~0.1 s instead of ~0.6. --locale=C: text compares bytewise, as
        # in SQLite's default collation.
        run(initdb, "-D", data, *"-A trust -U postgres -E UTF8 --locale=C --no-sync".split())
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
        try:
            run(pg_ctl, "start", "-w", f"-t{START_S}", "-D", data, "-l", str(log), "-o", options)
            yield PostgresServer(f"postgresql://postgres@127.0.0.1:{port}/postgres")
        finally:  # also after a failed start: a server pg_ctl gave up waiting for may be running
            stop = [*as_owner, pg_ctl, "-D", data, "-m", "immediate", "-w", "stop"]
            subprocess.run(stop, capture_output=True, check=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server: ``AITBC_TEST_POSTGRES_URL``, or a throwaway cluster
    started on first use (tests that do not ask for it never start one)."""
    url = os.environ.get(URL_ENV)
    if url:
        yield PostgresServer(url)
        return
    tools = find_tools()
    if tools is None:
        unavailable(f"{URL_ENV} is not set and initdb/pg_ctl are not installed (postgresql)")
    try:
        with throwaway_cluster(*tools, free_port()) as server:
            yield server
    except ClusterStartError as exc:
        pytest.fail(f"PostgreSQL test cluster did not start: {exc}", pytrace=False)


@asynccontextmanager
async def fresh_database(server: PostgresServer) -> AsyncIterator[str]:
    """An empty database ``t_<hex>`` on ``server``; dropped on exit, its connections closed."""
    name = f"t_{secrets.token_hex(8)}"
    await admin(server, f'CREATE DATABASE "{name}"')
    try:
        yield server.database_url(name)
    finally:
        await admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def admin(server: PostgresServer, sql: str) -> None:
    """Run one statement on the server's maintenance database."""
    import asyncpg  # imported here: the rest of the suite runs without the PostgreSQL driver

    conn = await asyncpg.connect(server.url, timeout=CONNECT_TIMEOUT_S)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
async def postgres_url(postgres_server: PostgresServer) -> AsyncIterator[str]:
    """A fresh empty database for this test (``postgresql://postgres@127.0.0.1:PORT/t_<hex>``),
    dropped after it even if connections to it are left open."""
    async with fresh_database(postgres_server) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each backend's database in turn: a file in ``tmp_path``, or a fresh PostgreSQL one."""
    if request.param == "postgres":
        return str(request.getfixturevalue("postgres_url"))
    return f"sqlite:///{tmp_path / 'coordinator.db'}"


async def fetch_rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    """The rows of ``sql`` (SQL both backends read alike) on the database ``url`` names."""
    if url.startswith("sqlite:///"):
        with closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db:
            return db.execute(sql).fetchall()
    import asyncpg

    conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT_S)
    try:
        return [tuple(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()
