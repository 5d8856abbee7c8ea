"""Socket authentication and framing errors over real sockets: each ends in its close code."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import anyio
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from protocol.codec import decode_server_to_client, decode_server_to_miner
from protocol.messages import Ack, ClientWelcome, Welcome
from protocol.session import CLOSING
from tests.conftest import CLIENT_KEY, MINER_KEY, MINER_KEY_2
from tests.e2e.conftest import start_server
from tests.e2e.manual_miner import close_code
from tests.fakes import RecordingStore
from web.auth import key_hash

if TYPE_CHECKING:
    from tests.e2e.conftest import RunningServer
    from web.settings import Settings

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

MINERS = "/v1/miners/ws"
CLIENTS = "/v1/jobs/ws"


def _connect(server: RunningServer, path: str, key: str | None = None) -> Any:
    headers = {} if key is None else {"X-Api-Key": key}
    return connect(server.url(path), additional_headers=headers, compression=None)


def _hello(miner_id: str | None = None, protocol: int = 1) -> str:
    frame: dict[str, Any] = {"type": "hello", "protocol": protocol, "capabilities": {}}
    if miner_id is not None:
        frame["miner_id"] = miner_id
    return orjson.dumps(frame).decode()


async def _recv_miner(ws: ClientConnection) -> Any:
    with anyio.fail_after(5):
        return decode_server_to_miner(await ws.recv())


async def _recv_client(ws: ClientConnection) -> Any:
    with anyio.fail_after(5):
        return decode_server_to_client(await ws.recv())


@pytest.mark.parametrize("path", [CLIENTS, MINERS])
async def test_no_credential_and_non_auth_first_frame_closes_4401(
    server: RunningServer, path: str
) -> None:
    """Without a credential, a first frame other than auth closes the socket with 4401."""
    async with _connect(server, path) as ws:
        await ws.send(_hello() if path == MINERS else '{"type":"hello","protocol":1}')
        assert await close_code(ws) == 4401


@pytest.mark.parametrize("path", [CLIENTS, MINERS])
async def test_unknown_api_key_closes_4401(server: RunningServer, path: str) -> None:
    """An X-Api-Key that no role knows closes the socket with 4401."""
    async with _connect(server, path, "not-a-configured-key") as ws:
        assert await close_code(ws) == 4401


async def test_client_key_on_miner_socket_closes_4403(server: RunningServer) -> None:
    """A valid client credential on the miner socket closes it with 4403."""
    async with _connect(server, MINERS, CLIENT_KEY) as ws:
        assert await close_code(ws) == 4403


async def test_miner_key_on_client_socket_closes_4403(server: RunningServer) -> None:
    """A valid miner credential on the client socket closes it with 4403."""
    async with _connect(server, CLIENTS, MINER_KEY) as ws:
        assert await close_code(ws) == 4403


async def test_wrong_role_in_auth_frame_closes_4403(server: RunningServer) -> None:
    """A browser-style auth frame carrying a client key on the miner socket closes it 4403."""
    async with _connect(server, MINERS) as ws:
        await ws.send(orjson.dumps({"type": "auth", "token": CLIENT_KEY}).decode())
        assert await close_code(ws) == 4403


async def test_unknown_token_in_auth_frame_closes_4401(server: RunningServer) -> None:
    """A browser-style auth frame with an unknown token closes the socket with 4401."""
    async with _connect(server, CLIENTS) as ws:
        await ws.send(orjson.dumps({"type": "auth", "token": "nobody-knows-me"}).decode())
        assert await close_code(ws) == 4401


async def test_browser_auth_frame_then_client_hello_works(server: RunningServer) -> None:
    """An auth frame as the first frame authenticates a header-less client socket."""
    async with _connect(server, CLIENTS) as ws:
        await ws.send(orjson.dumps({"type": "auth", "token": CLIENT_KEY, "id": "a1"}).decode())
        await ws.send('{"type":"hello","protocol":1}')
        assert await _recv_client(ws) == Ack(id="a1")  # a request with an id gets its reply
        welcome = await _recv_client(ws)
        assert isinstance(welcome, ClientWelcome)
        assert welcome.client_id.startswith("client-")
        assert CLIENT_KEY not in welcome.client_id
        await ws.send('{"type":"subscribe","id":"s1","job_ids":[]}')
        ack = await _recv_client(ws)
        assert isinstance(ack, Ack)
        assert ack.id == "s1"


async def test_browser_auth_frame_then_miner_hello_works(server: RunningServer) -> None:
    """An auth frame as the first frame authenticates a header-less miner socket."""
    async with _connect(server, MINERS) as ws:
        await ws.send(orjson.dumps({"type": "auth", "token": MINER_KEY}).decode())
        await ws.send(_hello("browser-miner"))
        welcome = await _recv_miner(ws)
        assert isinstance(welcome, Welcome)
        assert welcome.miner_id == "browser-miner"


async def test_miner_id_bound_to_another_key_closes_4403(server: RunningServer) -> None:
    """A miner id first used with MINER_KEY cannot be claimed with MINER_KEY_2 (4403)."""
    async with _connect(server, MINERS, MINER_KEY) as first:
        await first.send(_hello("bound-miner"))
        assert isinstance(await _recv_miner(first), Welcome)
        async with _connect(server, MINERS, MINER_KEY_2) as thief:
            await thief.send(_hello("bound-miner"))
            assert await close_code(thief) == 4403
        await first.send('{"type":"heartbeat","id":"still-here"}')
        ack = await _recv_miner(first)
        assert isinstance(ack, Ack)
        assert ack.id == "still-here"


async def test_a_miner_id_bound_by_a_hello_being_committed_is_refused_after_it(
    settings: Settings,
) -> None:
    """A hello naming an id that another key's hello bound while its commit was in flight was
    closed 4403 at once: the binding was visible before it was durable (a failed commit then
    stops the coordinator, and the id was never bound). The 4403 now follows the commit, and
    the refused socket's later frames are not read."""
    store = RecordingStore()
    async with anyio.create_task_group() as tg:
        server, uv = await start_server(settings, tg, store=store)
        store.block_commits()
        async with _connect(server, MINERS, MINER_KEY) as first:
            await first.send(_hello("bound-miner"))
            with anyio.fail_after(5):
                while not store.waiting:  # noqa: ASYNC110 - bounded poll: the commit is held
                    await anyio.sleep(0.005)
            async with _connect(server, MINERS, MINER_KEY_2) as thief:
                await thief.send(_hello("bound-miner"))
                await thief.send('{"type":"job.accept","job_id":"j1"}')
                conn = await _connection_of(server, MINER_KEY_2)
                with anyio.fail_after(5):
                    while conn._close is None and conn._session.state is not CLOSING:  # noqa: ASYNC110 - bounded poll: its hello is handled
                        await anyio.sleep(0.005)
                assert conn._close is None  # not refused while the binding is not durable
                store.release_commits()
                assert isinstance(await _recv_miner(first), Welcome)
                assert await close_code(thief) == 4403
        uv.should_exit = True


async def _connection_of(server: RunningServer, key: str) -> Any:
    """The server's connection of the socket opened with ``key`` (bounded poll)."""
    with anyio.fail_after(5):
        while True:
            for conn in server.core.connections:
                if conn.principal is not None and conn.principal.key_hash == key_hash(key):
                    return conn
            await anyio.sleep(0.005)


@pytest.mark.parametrize("path", [CLIENTS, MINERS])
async def test_hello_with_protocol_2_closes_4002(server: RunningServer, path: str) -> None:
    """A hello announcing protocol 2 closes the socket with 4002."""
    key = MINER_KEY if path == MINERS else CLIENT_KEY
    async with _connect(server, path, key) as ws:
        await ws.send(_hello("v2-miner", protocol=2))
        assert await close_code(ws) == 4002


@pytest.mark.parametrize("path", [CLIENTS, MINERS])
async def test_binary_frame_closes_1003(server: RunningServer, path: str) -> None:
    """A binary frame closes the socket with 1003."""
    key = MINER_KEY if path == MINERS else CLIENT_KEY
    async with _connect(server, path, key) as ws:
        await ws.send(b'{"type":"hello","protocol":1}')
        assert await close_code(ws) == 1003


@pytest.mark.parametrize("path", [CLIENTS, MINERS])
async def test_malformed_json_closes_1007(server: RunningServer, path: str) -> None:
    """A text frame that is not JSON closes the socket with 1007."""
    key = MINER_KEY if path == MINERS else CLIENT_KEY
    async with _connect(server, path, key) as ws:
        await ws.send('{"type": "hello", "protocol": 1')
        assert await close_code(ws) == 1007


async def test_bad_frame_after_hello_closes_only_that_socket(server: RunningServer) -> None:
    """Malformed JSON on an open miner session closes it (1007) and no other session."""
    async with (
        _connect(server, MINERS, MINER_KEY) as good,
        _connect(server, MINERS, MINER_KEY) as bad,
    ):
        await good.send(_hello("good-miner"))
        await bad.send(_hello("bad-miner"))
        assert isinstance(await _recv_miner(good), Welcome)
        assert isinstance(await _recv_miner(bad), Welcome)
        await bad.send("not json at all")
        assert await close_code(bad) == 1007
        await good.send('{"type":"heartbeat","id":"hb"}')
        ack = await _recv_miner(good)
        assert isinstance(ack, Ack)
        assert ack.id == "hb"


async def test_a_session_socket_closes_4401_after_logout(server: RunningServer) -> None:
    """Over the transport's receive fast path: the next frame after the session's logout
    closes the socket with 4401 and is not acted on."""
    import httpx

    from tests.web.wallet_helpers import KEY_A, address_of, sign

    base = f"http://127.0.0.1:{server.port}"
    async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=10) as http:
        wallet = address_of(KEY_A)
        r = await http.post("/v1/auth/nonce", json={"wallet_address": wallet})
        nonce = r.json()["nonce"]
        body = {"wallet_address": wallet, "nonce": nonce, "signature": sign(KEY_A, wallet, nonce)}
        token = (await http.post("/v1/login", json=body)).json()["session_token"]
        headers = {"Authorization": f"Bearer {token}"}
        async with connect(server.url(CLIENTS), additional_headers=headers, compression=None) as ws:
            await ws.send('{"type":"hello","protocol":1}')
            assert isinstance(await _recv_client(ws), ClientWelcome)
            assert (await http.post("/v1/logout", headers=headers)).status_code == 200
            await ws.send('{"type":"job.submit","id":"s1","payload":{}}')
            assert await close_code(ws) == 4401
    assert sum(server.core.dispatcher.job_counts.by_state.values()) == 0


@pytest.mark.parametrize("path", ["/v1/job/ws", "/", "/v1/jobs/ws/"])
async def test_an_upgrade_at_a_path_with_no_socket_is_404_naming_the_sockets(
    server: RunningServer, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """It was 403 with an empty body (Starlette closes before accepting), which reads as a
    credential problem; a typo in the path is a 404 that says where the sockets are, and no
    error in the server's log (uvicorn logged one for every denial response)."""
    with caplog.at_level(logging.WARNING), pytest.raises(InvalidStatus) as refused:
        async with _connect(server, path, CLIENT_KEY):
            pass
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    response = refused.value.response
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert orjson.loads(response.body) == {
        "detail": f"no socket at {path}; the sockets are /v1/miners/ws, /v1/jobs/ws, /v1/admin/ws"
    }
