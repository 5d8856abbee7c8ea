"""Ring 2: the coalescing HTTP protocol (web/http_protocol.py), driven without a socket."""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.frames import Frame, Opcode

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


async def _serve(stock: bool, chunks: list[bytes]) -> tuple[Any, Any, list[Any], bytes]:
    """Serve an upgrade request (read in ``chunks``) with our protocols or uvicorn's own; the
    app accepts, then receives the frame the client sent right after its request."""
    seen: list[Any] = []
    done = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(await receive())
        await send({"type": "websocket.accept"})
        seen.append(await receive())
        done.set()

    http_cls = HttpToolsProtocol if stock else CoalescingHttpProtocol
    config = Config(
        app=app,
        ws=WebSocketsSansIOProtocol if stock else CoalescingWSProtocol,
        lifespan="off",
        log_level="warning",
    )
    config.load()
    state = ServerState()
    state.default_headers = [(b"server", b"uvicorn"), (b"date", b"Thu, 26 Nov 2026 08:00:00 GMT")]
    proto = http_cls(config=config, server_state=state, app_state={})
    transport = UpgradableTransport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    for chunk in chunks:
        (transport.protocol or proto).data_received(chunk)
    if transport.protocol is not None:
        transport.protocol.data_received(Frame(Opcode.TEXT, b"early").serialize(mask=True))
        await done.wait()
    for _ in range(3):
        await asyncio.sleep(0)  # the end-of-tick flush
    ws = transport.protocol
    scope = None if ws is None else {k: v for k, v in ws.scope.items() if k != "extensions"}
    return proto, scope, seen, b"".join(transport.writes)


MIXED_CASE = HANDSHAKE.replace(b"Host: t", b"HOST:t\r\nX-Trace-Id:  a b \t").replace(
    b"/ws", b"/w%20s?a=1"
)


@pytest.mark.parametrize(
    "request_bytes",
    [
        HANDSHAKE,
        MIXED_CASE,
        HANDSHAKE.replace(b"Connection: Upgrade", b"connection: keep-alive, upgrade"),
    ],
)
async def test_a_plain_upgrade_skips_httptools_and_serves_as_uvicorn(request_bytes: bytes) -> None:
    """The first read, a plain upgrade request, goes straight to the socket protocol (httptools
    never starts a request) and the app and the peer see what stock uvicorn gives them."""
    proto, *ours = await _serve(False, [request_bytes])
    assert proto.scope is None  # httptools never began a message
    stock_proto, *stock = await _serve(True, [request_bytes])
    assert stock_proto.scope is not None
    assert ours == stock
    assert ours[1] == [
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": "early"},
    ]
    assert ours[2].startswith(b"HTTP/1.1 101 Switching Protocols\r\n")


async def test_an_upgrade_in_several_reads_goes_through_httptools() -> None:
    chunks = [HANDSHAKE[:20], HANDSHAKE[20:]]
    proto, *ours = await _serve(False, chunks)
    assert proto.scope is not None  # parsed by httptools, then upgraded as before
    _, *stock = await _serve(True, chunks)
    assert ours == stock
    assert ours[2].startswith(b"HTTP/1.1 101 Switching Protocols\r\n")


@pytest.mark.parametrize(
    "request_bytes",
    [
        HANDSHAKE.replace(b"Host: t", b"Bad Name: t"),  # not a token
        HANDSHAKE.replace(b"Host: t", b"Host: t\x01"),  # a control character
        HANDSHAKE.replace(b"Host: t", b"Host: t\r\n folded"),  # obsolete line folding
        HANDSHAKE.replace(b"GET /ws", b"GET /w\x7fs"),
    ],
)
async def test_a_malformed_upgrade_is_refused_as_uvicorn_refuses_it(request_bytes: bytes) -> None:
    _, scope, seen, written = await _serve(False, [request_bytes])
    _, stock_scope, stock_seen, stock_written = await _serve(True, [request_bytes])
    assert (scope, seen, written) == (stock_scope, stock_seen, stock_written)
    assert scope is None
    assert written.startswith(b"HTTP/1.1 400 Bad Request\r\n")


@pytest.mark.parametrize("chunks", [[HANDSHAKE], [HANDSHAKE[:20], HANDSHAKE[20:]]])
async def test_an_upgraded_http_protocol_is_freed_without_the_garbage_collector(
    chunks: list[bytes],
) -> None:
    """Its parser referenced it back: each upgrade left a cycle for the collector."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()

    proto, transport = _protocol(app)
    gone = weakref.ref(proto)
    gc.disable()
    try:
        for chunk in chunks:
            proto.data_received(chunk)
        assert isinstance(transport.protocol, CoalescingWSProtocol)
        del proto
        assert gone() is None
    finally:
        gc.enable()


async def test_a_request_head_past_its_bound_is_431_and_closes() -> None:
    """httptools puts no bound on a request's headers: 16 MiB of them were read, kept and
    served (200), before any credential was looked at. Past ``MAX_HEAD_BYTES`` (64 KiB, and at
    most one read more) the request is now answered 431 and the connection closed; a body of
    any size allowed, or requests pipelined in one read, are not counted as head."""
    from web.http_protocol import MAX_HEAD_BYTES

    served: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        served.append(scope["path"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    proto, transport = _protocol(app)
    proto.data_received(b"GET /a HTTP/1.1\r\nHost: t\r\n")
    pad = b"X-Pad: " + b"a" * 8000 + b"\r\n"
    for _ in range(MAX_HEAD_BYTES // len(pad) + 40):
        proto.data_received(pad)
        if transport.closing:
            break
    assert transport.closing
    assert transport.writes[-1].startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert transport.writes[-1].endswith(b"\r\n\r\nrequest line and headers over 65536 bytes")
    assert served == []

    # A large body, and several requests in one read, are served.
    proto, transport = _protocol(app)
    body = b"b" * (4 * MAX_HEAD_BYTES)
    head = b"POST /big HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body)
    proto.data_received(head)
    for i in range(0, len(body), 16384):
        proto.data_received(body[i : i + 16384])
    for _ in range(20):
        await asyncio.sleep(0)
    pipelined = b"".join(b"GET /p%d HTTP/1.1\r\nHost: t\r\n\r\n" % n for n in range(3000))
    proto.data_received(pipelined)
    for _ in range(20000):
        if len(served) == 3001:
            break
        await asyncio.sleep(0)
    assert not transport.closing
    assert served[:2] == ["/big", "/p0"]
    assert len(served) == 3001
