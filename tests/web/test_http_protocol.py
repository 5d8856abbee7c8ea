"""Ring 2: the coalescing HTTP protocol (web/http_protocol.py), driven without a socket."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from tests.web.test_transport import HANDSHAKE, FakeTransport
from web.http_protocol import CoalescingHttpProtocol
from web.transport import CoalescingTransport, CoalescingWSProtocol

pytestmark = pytest.mark.anyio

REQUEST = b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}"


class UpgradableTransport(FakeTransport):
    protocol: Any = None

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol


def _protocol(app: Any) -> tuple[CoalescingHttpProtocol, UpgradableTransport]:
    config = Config(app=app, ws=CoalescingWSProtocol, lifespan="off", log_level="warning")
    config.load()
    proto = CoalescingHttpProtocol(config=config, server_state=ServerState(), app_state={})
    transport = UpgradableTransport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    return proto, transport


async def test_a_response_leaves_in_one_write_as_soon_as_it_is_complete() -> None:
    done = asyncio.Event()
    seen: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["body"] == b"{}"
        headers = [(b"content-type", b"application/json"), (b"content-length", b"7")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b'{"a":1}'})
        seen.append(len(transport.writes))  # flushed by the completion, not the next tick
        done.set()

    proto, transport = _protocol(app)
    proto.data_received(REQUEST)
    await done.wait()
    assert seen == [1]
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.writes[0].endswith(b'\r\n\r\n{"a":1}')
    # Keep-alive: the next request on the connection is answered the same way.
    done.clear()
    proto.data_received(REQUEST)
    await done.wait()
    assert len(transport.writes) == 2


async def test_a_streamed_response_is_flushed_at_the_end_of_each_tick() -> None:
    more = asyncio.Event()
    finished = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"one", "more_body": True})
        await more.wait()
        await send({"type": "http.response.body", "body": b"two"})
        finished.set()

    proto, transport = _protocol(app)
    proto.data_received(REQUEST)
    for _ in range(3):
        await asyncio.sleep(0)
    assert len(transport.writes) == 1  # headers and first chunk, while the app still waits
    assert transport.writes[0].endswith(b"\r\n\r\n3\r\none\r\n")
    more.set()
    await finished.wait()
    assert transport.writes[1] == b"3\r\ntwo\r\n0\r\n\r\n"


async def test_a_websocket_upgrade_gets_the_real_transport() -> None:
    accepted = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        accepted.set()

    proto, transport = _protocol(app)
    proto.data_received(HANDSHAKE)
    ws = transport.protocol
    assert isinstance(ws, CoalescingWSProtocol)
    # The socket protocol coalesces by itself, straight onto the connection.
    assert isinstance(ws.transport, CoalescingTransport)
    assert ws.transport._transport is transport
    await accepted.wait()
    for _ in range(3):
        await asyncio.sleep(0)
    assert transport.writes[0].startswith(b"HTTP/1.1 101")
