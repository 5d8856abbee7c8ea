"""A shutdown (SIGTERM, SIGINT) closes every socket with 1001, "going away" (docs/protocol.md)."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import anyio
import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from protocol.messages import JobSubmit
from storage.sql import DatabasesJobStore
from tests.conftest import ADMIN_KEY, CLIENT_KEY, MINER_KEY
from tests.e2e.conftest import Client, RunningServer, start_server
from tests.e2e.manual_miner import client_session, close_code
from web import cli

if TYPE_CHECKING:
    from storage.base import WriteBatch
    from web.settings import Settings

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


async def test_a_shutdown_closes_every_socket_with_1001(settings: Settings) -> None:
    """Miner, client and ops sockets (and one still waiting for its auth frame) get 1001 from a
    shutdown, as the spec says. ``CoordinatorServer.shutdown`` only asked the connections to
    close, and uvicorn's own shutdown, which came right after, sent 1012 first."""
    async with anyio.create_task_group() as tg:
        running, uv = await start_server(settings, tg)
        async with (
            connect(
                running.url("/v1/miners/ws"), additional_headers={"X-Api-Key": MINER_KEY}
            ) as miner,
            connect(
                running.url("/v1/jobs/ws"), additional_headers={"X-Api-Key": CLIENT_KEY}
            ) as client,
            connect(
                running.url("/v1/admin/ws"), additional_headers={"X-Api-Key": ADMIN_KEY}
            ) as ops,
            connect(running.url("/v1/admin/ws")) as unauthenticated,
        ):
            await miner.send('{"type": "hello", "protocol": 1, "capabilities": {}}')
            await client.send('{"type": "hello", "protocol": 1}')
            with anyio.fail_after(5):
                for ws in (miner, client, ops):
                    await ws.recv()
            uv.should_exit = True
            codes = [await close_code(ws) for ws in (miner, client, ops, unauthenticated)]
        assert codes == [1001, 1001, 1001, 1001]
        with anyio.fail_after(15):
            await running.stopped.wait()


def _hold_commits(
    running: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> tuple[anyio.Event, anyio.Event]:
    """From now on every commit waits until the first event is set; the second is set once one
    is waiting."""
    store = running.core.store
    commit = store.commit
    release, waiting = anyio.Event(), anyio.Event()

    async def held(batch: WriteBatch) -> None:
        waiting.set()
        await release.wait()
        await commit(batch)

    monkeypatch.setattr(store, "commit", held)
    return release, waiting


async def _a_submit_held_in_its_commit(
    running: RunningServer, client: Client, monkeypatch: pytest.MonkeyPatch
) -> anyio.Event:
    """The client submits a job whose commit then waits, as every later commit does, until
    the returned event is set."""
    release, waiting = _hold_commits(running, monkeypatch)
    await client.send(JobSubmit(id="r1", payload={"type": "x"}))
    with anyio.fail_after(5):
        await waiting.wait()
    return release


async def _refused(port: int) -> bool:
    try:
        stream = await anyio.connect_tcp("127.0.0.1", port)
    except OSError:
        return True
    await stream.aclose()
    return False


async def test_a_shutdown_stops_accepting_before_it_waits_for_the_writer(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a shutdown waits for a slow commit, a new connection is refused, and a socket
    whose TCP connection was accepted before the shutdown is closed with 1001 as it opens. The
    listener stayed open until after the writer's flush (up to 12 s): a miner or client that
    reconnected on its 1001 was welcomed and served, then closed with uvicorn's 1012."""
    async with anyio.create_task_group() as tg:
        running, uv = await start_server(settings, tg)
        early = socket.create_connection(("127.0.0.1", running.port))
        async with client_session(running, CLIENT_KEY) as client:
            release = await _a_submit_held_in_its_commit(running, client, monkeypatch)
            uv.should_exit = True
            assert await close_code(client.ws) == 1001
        with anyio.fail_after(5):
            while not await _refused(running.port):  # noqa: ASYNC110 - polls the kernel
                await anyio.sleep(0.01)
        async with connect(
            running.url("/v1/jobs/ws"), sock=early, additional_headers={"X-Api-Key": CLIENT_KEY}
        ) as late:
            with pytest.raises(ConnectionClosed) as closed, anyio.fail_after(5):
                await late.recv()  # no welcome: a close, before any hello
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1001, "server shutting down")
        release.set()
        with anyio.fail_after(15):
            await running.stopped.wait()


async def test_a_second_sigint_still_flushes_the_writer_and_closes_the_store(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn answers a second SIGINT (``force_exit``) by skipping the app's shutdown: the
    writer was not flushed nor the store closed, and the lifespan task was cancelled as the
    loop closed (a traceback on the way out of ``serve``). It still skips the waits for peers,
    but the dispatcher stops in order: the job whose commit was in flight is stored, the store
    is closed, and its owner lock is free for the next coordinator."""
    async with anyio.create_task_group() as tg:
        running, uv = await start_server(settings, tg)
        async with client_session(running, CLIENT_KEY) as client:
            release = await _a_submit_held_in_its_commit(running, client, monkeypatch)
            uv.should_exit = True
            uv.force_exit = True  # what uvicorn's handler does on a second SIGINT
            release.set()
            assert await close_code(client.ws) == 1001
        with anyio.fail_after(15):
            await running.stopped.wait()
    assert not running.core.dispatcher.running
    after = DatabasesJobStore(settings.database_url)
    await after.open()  # StoreInUse while the stopped server still held it
    try:
        jobs, _ = await after.load_active()
    finally:
        await after.close()
    assert [j.state for j in jobs] == ["QUEUED"]


@pytest.mark.parametrize("forwarded", [False, True], ids=["lean", "asgi"])
async def test_a_shutdown_ends_a_waiting_long_poll_at_once(
    settings: Settings, forwarded: bool
) -> None:
    """A REST miner's long-poll (up to 25 s) held the shutdown for uvicorn's graceful timeout
    (10 s), and was then cancelled: a 500 to the miner and an ERROR traceback in the log. A
    shutdown ends it as a hang-up would: 204, nothing charged, and the server stops at once.
    ``forwarded``: the request takes uvicorn's ASGI path instead of the lean one."""
    miner = {"X-Api-Key": MINER_KEY, "X-Miner-ID": "m1"}
    if forwarded:
        miner["X-Forwarded-For"] = "10.0.0.7"
    async with anyio.create_task_group() as tg:
        running, uv = await start_server(settings, tg)
        base = f"http://127.0.0.1:{running.port}"
        async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=30) as http:
            register = {"capabilities": {}, "concurrency": 1}
            r = await http.post("/v1/miners/register", json=register, headers=miner)
            assert r.status_code == 200
            scheduler = running.core.dispatcher.scheduler
            answers: list[int] = []

            async def poll() -> None:
                body = {"max_wait_seconds": 25}
                answers.append(
                    (await http.post("/v1/miners/poll", json=body, headers=miner)).status_code
                )

            tg.start_soon(poll)
            with anyio.fail_after(5):
                while scheduler.miners["m1"].polls != 1:  # noqa: ASYNC110 - scheduler data
                    await anyio.sleep(0.005)
            uv.should_exit = True
            with anyio.fail_after(5):
                await running.stopped.wait()
                while not answers:  # noqa: ASYNC110 - the poll's task records its answer
                    await anyio.sleep(0.005)
        assert answers == [204]


async def test_a_rest_call_whose_commit_outlasts_the_shutdown_gets_503_not_500(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shutdown waits for the writer (10 s), then for requests in flight (uvicorn's graceful
    timeout, 10 s), then cancels them: a submit whose commit took longer than those 20 s (a
    stalled disk) was answered 500, with an ERROR traceback in the log. It is refused with 503
    and ``Retry-After`` once the writer's wait ends, like other store trouble; its commit goes
    on, whole: after the stop the job is stored, queued. (Both waits are shortened here.)"""
    monkeypatch.setattr(cli, "FLUSH_GRACE", 0.2, raising=False)
    async with anyio.create_task_group() as tg:
        running, uv = await start_server(settings, tg)
        uv.config.timeout_graceful_shutdown = 1
        release, waiting = _hold_commits(running, monkeypatch)
        base = f"http://127.0.0.1:{running.port}"
        async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=30) as http:
            answers: list[httpx.Response] = []

            async def submit() -> None:
                job = {"payload": {"type": "x"}, "idempotency_key": "k1"}
                headers = {"X-Api-Key": CLIENT_KEY}
                answers.append(await http.post("/v1/jobs", json=job, headers=headers))

            tg.start_soon(submit)
            with anyio.fail_after(5):
                await waiting.wait()
            uv.should_exit = True
            with anyio.fail_after(15):
                while not answers:  # noqa: ASYNC110 - the submit's task records its answer
                    await anyio.sleep(0.01)
            release.set()
            with anyio.fail_after(15):
                await running.stopped.wait()
    [answer] = answers
    assert (answer.status_code, answer.headers.get("Retry-After")) == (503, "1")
    assert "retry" in answer.json()["detail"]
    after = DatabasesJobStore(settings.database_url)
    await after.open()
    try:
        jobs, _ = await after.load_active()
    finally:
        await after.close()
    assert [(j.state, j.idempotency_key) for j in jobs] == [("QUEUED", "k1")]
