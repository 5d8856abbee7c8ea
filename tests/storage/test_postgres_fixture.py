"""The PostgreSQL test server (tests/postgres.py): each test's database is new, empty and dropped
afterwards, open connections and all; a cluster that cannot start says why on one line."""

from __future__ import annotations

import re
import socket
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from tests.postgres import (
    ClusterStartError,
    PostgresServer,
    find_tools,
    fresh_database,
    throwaway_cluster,
    unavailable,
)

pytestmark = pytest.mark.anyio

USER_TABLES = "SELECT * FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
SEEN: set[str] = set()


async def fetchval(url: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


def database_name(url: str) -> str:
    return urlsplit(url).path.removeprefix("/")


@pytest.mark.parametrize("run", ["first", "second"])
async def test_each_test_gets_its_own_empty_database(run: str, postgres_url: str) -> None:
    """Both runs see no tables and leave one behind: the other run must not see it, whichever
    goes first, and the two databases have different names."""
    assert re.fullmatch(r"t_[0-9a-f]{16}", database_name(postgres_url))
    assert postgres_url not in SEEN
    SEEN.add(postgres_url)
    assert await fetchval(postgres_url, f"SELECT count(*) FROM ({USER_TABLES}) AS t") == 0
    assert await fetchval(postgres_url, "SELECT current_database()") == database_name(postgres_url)
    await fetchval(postgres_url, "CREATE TABLE left_behind (run text)")
    await fetchval(postgres_url, "INSERT INTO left_behind VALUES ($1)", run)


async def test_the_database_is_dropped_even_with_a_connection_left_open(
    postgres_server: PostgresServer,
) -> None:
    """A store a test forgot to close does not keep its database alive (DROP ... WITH FORCE)."""
    exists = "SELECT count(*) FROM pg_database WHERE datname = $1"
    async with fresh_database(postgres_server) as url:
        name = database_name(url)
        assert await fetchval(postgres_server.url, exists, name) == 1
        left_open = await asyncpg.connect(url)
        await left_open.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
    try:
        assert await fetchval(postgres_server.url, exists, name) == 0
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)):
            await left_open.fetchval("SELECT x FROM t")
    finally:
        left_open.terminate()


def test_no_server_skips_unless_postgres_tests_are_required(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("POSTGRES_TESTS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="PostgreSQL tests need a server: no pg"):
        unavailable("no pg")
    monkeypatch.setenv("POSTGRES_TESTS", "required")
    with pytest.raises(pytest.fail.Exception, match="required here but no pg"):
        unavailable("no pg")
    monkeypatch.delenv("POSTGRES_TESTS")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="required here but no pg"):
        unavailable("no pg")


def test_a_cluster_that_cannot_start_says_why_on_one_line() -> None:
    """Its port is taken: the error names pg_ctl and ends in the server log's last lines."""
    tools = find_tools()
    if tools is None:
        unavailable("initdb/pg_ctl are not installed (postgresql)")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cluster = throwaway_cluster(*tools, taken.getsockname()[1])
        with pytest.raises(ClusterStartError) as exc, cluster:
            pass
    message = str(exc.value)
    assert message.startswith("pg_ctl exited 1: ")
    assert "Address already in use" in message
    assert "\n" not in message
