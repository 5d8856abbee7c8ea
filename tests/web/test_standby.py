"""A standby (``STANDBY=on``): serves health checks and refuses the rest while another
coordinator holds the database, then takes over with the memory rebuilt from the store."""

from __future__ import annotations

import contextlib
import itertools
import logging
import sqlite3
from contextlib import asynccontextmanager, closing
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio
import pytest

from protocol.receipt_verify import TrustedKey, key_id_from_text
from storage import postgres
from storage.backends import store_for
from storage.errors import StorageError
from storage.owner import lock_path
from storage.postgres import OWNER_LOCK_KEY
from tests.conftest import ADMIN_KEY, CLIENT_KEY
from tests.fakes import FakeClock
from tests.postgres import admin, fetch_rows
from tests.web.rest_harness import running_api
from tests.web.test_rest_ops import samples
from web import lifecycle
from web.http import STANDBY_DETAIL

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    import httpx

    from tests.postgres import PostgresServer
    from tests.web.rest_harness import Api

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def _holding(url: str) -> AsyncIterator[Any]:
    """Another coordinator's hold on the database: its store, opened (owner lock taken), and
    closed on the way out (again, when the test let go of it itself; a test that ended its
    sessions on the server leaves it nothing to close cleanly)."""
    holder = store_for(url)
    await holder.open()
    try:
        yield holder
    finally:
        with contextlib.suppress(StorageError):
            await holder.close()


async def _until(condition: Callable[[], object], within: float = 10) -> None:
    with anyio.fail_after(within):
        while not condition():  # noqa: ASYNC110 - a tiny poll loop under fail_after
            await anyio.sleep(0.01)


async def _until_ready(api: Api, within: float = 10) -> httpx.Response:
    with anyio.fail_after(within):
        while True:
            resp = await api.http.get("/health/ready")
            if resp.status_code != 503:
                return resp
            await anyio.sleep(0.02)


async def test_a_standby_refuses_work_until_the_store_is_free_then_serves_what_it_holds(
    tmp_path: Path, database_url: str
) -> None:
    async with running_api(tmp_path, database_url=database_url) as primary:
        queued = await primary.submit()
    async with _holding(database_url) as holder:
        async with running_api(tmp_path, database_url=database_url, standby=True) as api:
            assert (await api.http.get("/health")).json()["status"] == "ok"
            ready = await api.http.get("/health/ready")
            assert (ready.status_code, ready.json()["status"]) == (503, "standby")
            for method, path in [
                ("POST", "/v1/jobs"),
                ("GET", f"/v1/jobs/{queued['job_id']}"),
                ("POST", "/v1/miners/poll"),
            ]:
                resp = await api.http.request(
                    method, path, json={}, headers={"X-Api-Key": CLIENT_KEY}
                )
                assert resp.status_code == 503, (path, resp.text)
                assert resp.json() == {"detail": STANDBY_DETAIL}
                assert resp.headers["retry-after"] == "1"

            await holder.close()
            assert (await _until_ready(api)).json()["status"] == "ready"
            assert (await api.job(queued["job_id"]))["state"] == "QUEUED"
            assert (await api.submit())["state"] == "QUEUED"


async def test_a_standby_answers_metrics_saying_it_is_one(tmp_path: Path) -> None:
    """A Prometheus scraping both nodes gets 200 from the standby too (it was the standby 503
    of every other route), with aitbc_standby 1 and aitbc_ready 0 and nothing else: the rest
    would describe a dispatcher that has restored nothing yet. Once it has taken over it says
    0 and 1, beside every other series. The admin key is still required."""
    url = f"sqlite:///{tmp_path / 'coordinator.db'}"
    async with _holding(url) as holder:
        async with running_api(tmp_path, database_url=url, standby=True) as api:
            assert (await api.http.get("/metrics")).status_code == 401
            r = await api.http.get("/metrics", headers={"X-Api-Key": ADMIN_KEY})
            assert r.status_code == 200, r.text
            assert samples(r.text) == {
                ("aitbc_standby", ()): 1.0,
                ("aitbc_ready", ()): 0.0,
            }
            await holder.close()
            await _until_ready(api)
            r = await api.http.get("/metrics", headers={"X-Api-Key": ADMIN_KEY})
            got = samples(r.text)
            assert (got["aitbc_standby", ()], got["aitbc_ready", ()]) == (0.0, 1.0)
            assert got["aitbc_jobs", (("state", "QUEUED"),)] == 0.0


async def test_a_standby_stopped_while_waiting_leaves_the_store_to_its_holder(
    tmp_path: Path, database_url: str
) -> None:
    async with _holding(database_url):
        async with running_api(tmp_path, database_url=database_url, standby=True) as api:
            assert (await api.http.get("/health/ready")).status_code == 503
        assert not api.core.ready
        assert api.core.standby
        # The holder still owns it: a third store is refused.
        third = store_for(database_url)
        with pytest.raises(Exception, match="in use"):
            await third.open()


async def test_a_failed_take_over_stops_the_coordinator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'coordinator.db'}"
    stopped: list[bool] = []
    async with _holding(url) as holder:
        async with running_api(tmp_path, database_url=url, standby=True) as api:
            core = api.core
            core.on_fatal = lambda: stopped.append(True)

            async def broken_restore() -> None:
                raise RuntimeError("restore failed")

            monkeypatch.setattr(core, "restore", broken_restore)
            await holder.close()
            await _until(lambda: stopped)
            assert core.failed
            ready = await api.http.get("/health/ready")
            assert (ready.status_code, ready.json()["status"]) == (503, "not ready")


async def test_a_standby_stopped_while_restoring_closes_the_store_and_lets_go_of_it(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    restoring = anyio.Event()
    async with _holding(database_url) as holder:
        async with running_api(tmp_path, database_url=database_url, standby=True) as api:
            core = api.core

            async def slow_restore() -> None:
                restoring.set()
                await anyio.sleep_forever()

            monkeypatch.setattr(core, "restore", slow_restore)
            await holder.close()
            with anyio.fail_after(10):
                await restoring.wait()
        # Stopped mid-restore: the store was closed (its connections too), so a third
        # coordinator can open it.
        assert core.store._raw is None
        assert not any(db.is_connected for db in (core.store._db, core.store._read_db))
        third = store_for(database_url)
        await third.open()
        await third.close()


async def test_a_standby_whose_lock_file_cannot_be_made_stops_instead_of_waiting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Nobody holds the database: the lock file cannot be opened (a directory in its place;
    # a read-only directory or a file of another user alike). That is no other coordinator,
    # so waiting for one to let go would wait for ever.
    url = f"sqlite:///{tmp_path / 'coordinator.db'}"
    lock_path(tmp_path / "coordinator.db").mkdir()
    async with running_api(tmp_path, database_url=url, standby=True) as api:
        await _until(lambda: api.core.failed)
    assert "in use by another coordinator" not in caplog.text
    assert "cannot create the lock file" in caplog.text


async def test_a_take_over_refused_by_the_store_is_one_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The holder was a newer build: its schema is one this standby cannot run on.
    url = f"sqlite:///{tmp_path / 'coordinator.db'}"
    async with _holding(url) as holder:
        with closing(sqlite3.connect(tmp_path / "coordinator.db")) as db:
            db.execute("INSERT INTO schema_version (version) VALUES (999)")
            db.commit()
        async with running_api(tmp_path, database_url=url, standby=True) as api:
            await holder.close()
            await _until(lambda: api.core.failed)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [(r.exc_info, "schema version 999" in r.getMessage()) for r in errors] == [(None, True)]


async def test_a_standby_takes_over_only_once_the_previous_keys_until_has_come(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A standby given a key rotation (RECEIPT_PREVIOUS_KEYS, UNTIL the planned switch) took
    over a database freed before UNTIL at once, its key published as valid only from UNTIL:
    every receipt it signed meanwhile failed verification (serve refuses such an UNTIL at
    start; a standby was never checked). It now waits for UNTIL, saying so once, then takes
    over."""
    monkeypatch.setattr(lifecycle, "STANDBY_POLL_SECONDS", 0.01)
    clock = FakeClock()
    old = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    until = int(clock.now()) + 60
    previous = TrustedKey(key_id=key_id_from_text(old), valid_until=until)
    async with running_api(
        tmp_path, clock=clock, standby=True, receipt_previous_keys=(previous,)
    ) as api:
        polls: list[None] = []
        monkeypatch.setattr(lifecycle.anyio, "sleep", _counted(polls, anyio.sleep))
        await _until(lambda: len(polls) >= 5)
        assert api.core.store.owner is not None
        assert not api.core.store.owner.held  # nothing taken meanwhile
        ready = await api.http.get("/health/ready")
        assert (ready.status_code, ready.json()["status"]) == (503, "standby")
        clock.advance(60)
        assert (await _until_ready(api)).json()["status"] == "ready"
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1
    assert "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo is valid until" in said[0]


def _counted(calls: list[None], sleep: Callable[[float], Any]) -> Callable[[float], Any]:
    async def counted(delay: float) -> None:
        calls.append(None)
        await sleep(delay)

    return counted


async def test_a_postgres_standby_keeps_waiting_while_the_server_refuses_connections(
    tmp_path: Path,
    postgres_server: PostgresServer,
    postgres_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A server restart or maintenance window (here: the database refusing connections) ends the
    # primary's session and its lock: the standby must still be there to take over after it.
    name = postgres_url.rsplit("/", 1)[1]
    async with _holding(postgres_url):
        async with running_api(tmp_path, database_url=postgres_url, standby=True) as api:
            await admin(postgres_server, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            # As a restart would: every session ends, the holder's lock and the poll's too.
            await admin(
                postgres_server,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE datname = '{name}' AND pid <> pg_backend_pid()",
            )
            try:
                await _until(lambda: "cannot connect" in caplog.text)
            finally:
                await admin(postgres_server, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            assert not api.core.failed
            assert (await _until_ready(api)).json()["status"] == "ready"


@pytest.mark.parametrize("stop_while_waiting", [False, True])
async def test_a_postgres_standby_polls_on_one_connection(
    tmp_path: Path,
    postgres_url: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    stop_while_waiting: bool,
) -> None:
    """Not a pool opened and refused every poll (a new server session and two log lines each
    time): one kept connection asks, and is closed once free, or when the standby stops."""
    monkeypatch.setattr(lifecycle, "STANDBY_POLL_SECONDS", 0.01)
    count_sessions = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
    async with _holding(postgres_url) as holder:
        [(before,)] = await fetch_rows(postgres_url, count_sessions)
        caplog.set_level(logging.INFO)
        async with running_api(tmp_path, database_url=postgres_url, standby=True) as api:
            store = api.core.store
            polls: list[bool] = []
            ask = store.owner_free

            async def counted() -> bool:
                polls.append(await ask())
                return polls[-1]

            monkeypatch.setattr(store, "owner_free", counted)
            await _until(lambda: len(polls) >= 20)
            assert not any(polls)
            assert [r for r in caplog.records if r.name == "databases"] == []
            [(waiting,)] = await fetch_rows(postgres_url, count_sessions)
            assert waiting == before + 1  # the poll's one connection
            if not stop_while_waiting:
                await holder.close()
                assert (await _until_ready(api)).json()["status"] == "ready"
        assert store._probe is None


async def test_a_coordinator_whose_postgres_session_ends_stops_and_its_standby_takes_over(
    tmp_path: Path, postgres_url: str
) -> None:
    """A server restart (here: the writer's session ended) takes the owner lock with it: the
    standby takes over, and the old coordinator stops at once, though it had nothing to
    commit (it stayed ready until its next commit, answering from its memory and keeping its
    miners' sockets: two ready coordinators on one database)."""
    async with running_api(tmp_path, database_url=postgres_url) as primary:
        stopped: list[bool] = []
        primary.core.on_fatal = lambda: stopped.append(True)
        queued = await primary.submit()
        async with running_api(tmp_path, database_url=postgres_url, standby=True) as api:
            assert (await api.http.get("/health/ready")).status_code == 503
            [(ended,)] = await fetch_rows(
                postgres_url,
                "SELECT pg_terminate_backend(pid) FROM pg_locks "
                f"WHERE locktype = 'advisory' AND granted AND objid = {OWNER_LOCK_KEY}",
            )
            assert ended
            assert (await _until_ready(api)).json()["status"] == "ready"
            await _until(lambda: stopped)
            ready = await primary.http.get("/health/ready")
            assert (ready.status_code, ready.json()["status"]) == (503, "not ready")
            assert (await api.job(queued["job_id"]))["state"] == "QUEUED"


@asynccontextmanager
async def _relay(url: str) -> AsyncIterator[tuple[str, Callable[[], None]]]:
    """``url`` through a TCP relay, and a function that makes the relay's connections so far
    stop relaying (a database host that died, or a network that dropped them: the socket
    stays open, nothing answers); connections made later relay again."""
    where = urlsplit(url)
    host, port = where.hostname, where.port
    assert host is not None
    assert port is not None
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    relayed = listener.extra(anyio.abc.SocketAttribute.local_port)
    numbers = itertools.count()
    live_from = [0]  # connections numbered below this one relay nothing

    def silence() -> None:
        live_from[0] = next(numbers) + 1

    async def handle(client: anyio.abc.SocketStream) -> None:
        n = next(numbers)
        async with client, await anyio.connect_tcp(host, port) as server:
            async with anyio.create_task_group() as tg:

                async def pipe(src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream) -> None:
                    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                        async for chunk in src:
                            if n >= live_from[0]:
                                await dst.send(chunk)
                    tg.cancel_scope.cancel()

                tg.start_soon(pipe, client, server)
                tg.start_soon(pipe, server, client)

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield where._replace(netloc=f"{where.username}@127.0.0.1:{relayed}").geturl(), silence
        tg.cancel_scope.cancel()


async def test_a_postgres_standby_whose_poll_is_never_answered_asks_again(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database host that died, or a network that dropped the connection, leaves the
    standby's kept connection open with nobody answering: its poll waited for ever (~15 min of
    TCP retransmissions without a relay), so it never took over from the coordinator the
    outage stopped. A poll's query is bounded as a connect is, then asked on a new one."""
    monkeypatch.setattr(lifecycle, "STANDBY_POLL_SECONDS", 0.01)
    monkeypatch.setattr(postgres, "_CONNECT_TIMEOUT", 0.5)
    async with _relay(postgres_url) as (relayed, silence), _holding(postgres_url) as holder:
        async with running_api(tmp_path, database_url=relayed, standby=True) as api:
            await _until(lambda: api.core.store._probe is not None)
            silence()
            await holder.close()
            assert (await _until_ready(api)).json()["status"] == "ready"
