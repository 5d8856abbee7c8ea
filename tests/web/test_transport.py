"""Ring 2: the coalescing WebSocket protocol (web/transport.py), driven without a socket."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN

from web.transport import (
    ACCEPT_NOW,
    SEND_NOW,
    CoalescingTransport,
    CoalescingWSProtocol,
    TickFlusher,
)
from web.wire import plain_upgrade, text_frame_head

pytestmark = pytest.mark.anyio

HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def as_rebuilt(request: bytes) -> bytes:
    """``request`` as uvicorn's httptools protocol rebuilds it for the WebSocket protocol."""
    first, *lines = request[:-4].split(b"\r\n")
    headers = [
        name.lower() + b": " + value.strip()
        for name, _, value in (line.partition(b":") for line in lines)
    ]
    return b"\r\n".join([first, *headers]) + b"\r\n\r\n"


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def set_write_buffer_limits(self, *args: Any, **kwargs: Any) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


def _frames(data: bytes) -> list[bytes]:
    """Payloads of the unmasked server frames in ``data`` (after the HTTP response)."""
    data = data[data.index(b"\r\n\r\n") + 4 :] if data.startswith(b"HTTP/") else data
    out = []
    while data:
        n, head = data[1] & 0x7F, 2
        if n == 126:
            n, head = int.from_bytes(data[2:4], "big"), 4
        out.append(data[head : head + n])
        data = data[head + n :]
    return out


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_send_text_now_writes_one_coalesced_frame_per_tick_and_refuses_before_accept() -> (
    None
):
    results: list[object] = []
    accepted = asyncio.Event()
    done = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        send_now = scope["extensions"][SEND_NOW]
        await receive()  # websocket.connect
        results.append(send_now(b"too early"))  # before the handshake: ASGI only
        await send({"type": "websocket.accept"})
        accepted.set()
        results.append(send_now(b'{"n":1}'))
        results.append(send_now(b'{"n":2}'))
        await done.wait()
        results.append(send_now(b"after close"))

    config = Config(app=app, ws=CoalescingWSProtocol, lifespan="off", log_level="warning")
    config.load()
    proto = CoalescingWSProtocol(config=config, server_state=ServerState(), app_state={})
    transport = FakeTransport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    proto.data_received(HANDSHAKE)
    await accepted.wait()
    await asyncio.sleep(0)  # let the app send both frames, then the end-of-tick flush
    await asyncio.sleep(0)
    assert results == [False, True, True]
    # The 101 response and both frames were written in the same tick: one write.
    assert len(transport.writes) == 1
    assert transport.writes[0].startswith(b"HTTP/1.1 101")
    assert _frames(transport.writes[0]) == [b'{"n":1}', b'{"n":2}']
    # A close frame from the peer: from then on only the ASGI path may answer.
    proto.data_received(Frame(Opcode.CLOSE, b"\x03\xe8").serialize(mask=True))
    done.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert results[-1] is False


def _load(app: Any, cls: type = CoalescingWSProtocol) -> Any:
    config = Config(app=app, ws=cls, lifespan="off", log_level="warning")
    config.load()
    state = ServerState()
    state.default_headers = [(b"server", b"uvicorn"), (b"date", b"Thu, 26 Nov 2026 08:00:00 GMT")]
    return cls(config=config, server_state=state, app_state={})


async def _handshake(cls: type, request: bytes, accept: dict[str, Any]) -> tuple[Any, bytes]:
    """Serve one upgrade ``request`` with ``cls``; the app accepts with ``accept``."""
    seen: list[Any] = []
    accepted = asyncio.Event()
    done = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(await receive())
        await send({"type": "websocket.accept", **accept})
        seen.append(await receive())  # the frame the client sent right after its request
        accepted.set()
        await done.wait()

    proto = _load(app, cls)
    transport = FakeTransport()
    proto.connection_made(transport)
    proto.data_received(request)
    assert (getattr(proto, "_accept", None) is not None) is (cls is CoalescingWSProtocol)
    proto.data_received(Frame(Opcode.TEXT, b"early").serialize(mask=True))
    await accepted.wait()
    await asyncio.sleep(0)  # the end-of-tick flush
    done.set()
    scope = {k: v for k, v in proto.scope.items() if k != "extensions"}
    assert seen == [{"type": "websocket.connect"}, {"type": "websocket.receive", "text": "early"}]
    return scope, b"".join(transport.writes)


@pytest.mark.parametrize(
    ("request_bytes", "accept"),
    [
        (HANDSHAKE, {}),
        (HANDSHAKE.replace(b"/ws", b"/w%20s?a=1&b=%20"), {"headers": [(b"X-Extra", b"1")]}),
        (HANDSHAKE.replace(b"Connection: Upgrade", b"Connection: keep-alive, Upgrade"), {}),
    ],
)
async def test_lean_handshake_matches_the_library(
    request_bytes: bytes, accept: dict[str, Any]
) -> None:
    """The lean path gives the app the same scope and the peer the same bytes as uvicorn's,
    for the request as uvicorn's HTTP protocol hands it over (test_http_protocol.py compares
    the whole stack on the request as the client sent it)."""
    request_bytes = as_rebuilt(request_bytes)
    assert plain_upgrade(request_bytes) is not None
    lean = await _handshake(CoalescingWSProtocol, request_bytes, accept)
    library = await _handshake(WebSocketsSansIOProtocol, request_bytes, accept)
    assert lean == library
    assert lean[1].startswith(b"HTTP/1.1 101 Switching Protocols\r\n")


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"GET /ws", b"POST /ws"),
        (b"HTTP/1.1\r\nHost", b"HTTP/1.0\r\nHost"),
        (b"Version: 13", b"Version: 8"),
        (b"Connection: Upgrade", b"Connection: keep-alive"),
        (b"Upgrade: websocket", b"Upgrade: h2c"),
        (b"dGhlIHNhbXBsZSBub25jZQ==", b"c2hvcnQ="),  # 5 bytes, not 16
        (b"dGhlIHNhbXBsZSBub25jZQ==", b"not base64!"),
        (b"Host: t\r\n", b"Host: t\r\nSec-WebSocket-Protocol: chat\r\n"),
        (b"Host: t\r\n", b"Host: t\r\nSec-WebSocket-Extensions: permessage-deflate\r\n"),
        (b"Host: t\r\n", b"Host: t\r\nOrigin: http://x\r\n"),
        (b"Host: t\r\n", b"Host: t\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"),
        (b"Host: t\r\n", b"Host: t\r\nX-Long: " + b"x" * 9000 + b"\r\n"),
    ],
)
def test_unusual_upgrade_requests_go_the_library_way(old: bytes, new: bytes) -> None:
    assert plain_upgrade(HANDSHAKE.replace(old, new)) is None


@pytest.mark.parametrize(
    "request_bytes",
    [
        HANDSHAKE.replace(b"Version: 13", b"Version: 8"),  # 426 from the library
        HANDSHAKE.replace(b"Host: t\r\n", b"Host: t\r\nSec-WebSocket-Protocol: chat\r\n"),
    ],
)
async def test_fallback_requests_behave_as_uvicorn(request_bytes: bytes) -> None:
    async def accept(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept", "subprotocol": "chat"})

    written = []
    for cls in (CoalescingWSProtocol, WebSocketsSansIOProtocol):
        proto = _load(accept, cls)
        transport = FakeTransport()
        proto.connection_made(transport)
        proto.data_received(request_bytes)
        for _ in range(4):
            await asyncio.sleep(0)
        written.append(
            b"".join(w for w in transport.writes).split(b"\r\n")[0]
            + b"|"
            + b"|".join(
                line
                for line in b"".join(transport.writes).split(b"\r\n")
                if line.lower().startswith((b"sec-websocket", b"upgrade"))
            )
        )
    assert written[0] == written[1]


async def test_accept_now_takes_the_connect_message_and_writes_the_same_response() -> None:
    results: list[object] = []
    done = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        accept_now = scope["extensions"][ACCEPT_NOW]
        results.append(accept_now())
        results.append(accept_now())  # accepted already
        results.append(await receive())  # the connect message was taken: the next frame
        done.set()

    proto = _load(app)
    transport = FakeTransport()
    proto.connection_made(transport)
    proto.data_received(HANDSHAKE)
    proto.data_received(Frame(Opcode.TEXT, b"early").serialize(mask=True))
    await done.wait()
    await asyncio.sleep(0)  # the end-of-tick flush
    assert results == [True, False, {"type": "websocket.receive", "text": "early"}]
    _, library = await _handshake(WebSocketsSansIOProtocol, HANDSHAKE, {})
    assert b"".join(transport.writes) == library


async def test_accept_now_refuses_requests_that_went_the_library_way() -> None:
    results: list[object] = []
    done = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        results.append(scope["extensions"][ACCEPT_NOW]())
        done.set()

    proto = _load(app)
    proto.connection_made(FakeTransport())
    proto.data_received(HANDSHAKE.replace(b"Host: t\r\n", b"Host: t\r\nOrigin: http://x\r\n"))
    await done.wait()
    assert results == [False]


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_text_frame_head_is_the_library_serialization(size: int) -> None:
    payload = b"x" * size
    assert text_frame_head(size) + payload == Frame(Opcode.TEXT, payload).serialize(mask=False)


async def test_addresses_come_from_the_http_protocol_that_parsed_the_upgrade() -> None:
    class Upgrading(FakeTransport):
        def get_protocol(self) -> Any:
            return SimpleNamespace(server=("10.0.0.1", 443), client=("10.0.0.2", 5), scheme="https")

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            raise AssertionError("looked up again")

    proto = _load(lambda *a: None)
    proto.connection_made(Upgrading())
    assert (proto.server, proto.client, proto.scheme) == (("10.0.0.1", 443), ("10.0.0.2", 5), "wss")
    plain = _load(lambda *a: None)
    plain.connection_made(FakeTransport())  # no HTTP protocol before it: uvicorn's lookups
    assert (plain.server, plain.client, plain.scheme) == (
        ("127.0.0.1", 8000),
        ("127.0.0.1", 5000),
        "ws",
    )


class LoggedTransport(FakeTransport):
    def __init__(self, name: str, log: list[tuple[str, bytes]]) -> None:
        super().__init__()
        self.name, self.log = name, log

    def write(self, data: bytes) -> None:
        self.log.append((self.name, bytes(data)))


async def test_one_callback_flushes_every_transport_written_this_tick_in_first_write_order() -> (
    None
):
    loop = asyncio.get_running_loop()
    log: list[tuple[str, bytes]] = []
    a, _, c = (CoalescingTransport(LoggedTransport(n, log), loop) for n in "abc")  # type: ignore[arg-type]
    ready = len(loop._ready)  # type: ignore[attr-defined]
    c.write(b"1")
    a.write(b"2")
    c.write(b"3")
    assert len(loop._ready) == ready + 1  # type: ignore[attr-defined]
    assert log == []
    await asyncio.sleep(0)
    assert log == [("c", b"13"), ("a", b"2")]  # first written, first out; one write each


async def test_flush_all_writes_now_and_leaves_the_callback_nothing() -> None:
    loop = asyncio.get_running_loop()
    raw = FakeTransport()
    wrapped = CoalescingTransport(raw, loop)  # type: ignore[arg-type]
    wrapped.write(b"x")
    TickFlusher.of(loop).flush_all()
    assert raw.writes == [b"x"]
    wrapped.write(b"y")  # buffers again, for the end of this tick
    await asyncio.sleep(0)
    assert raw.writes == [b"x", b"y"]


async def test_init_sets_uvicorns_state_without_a_state_machine() -> None:
    """Every attribute uvicorn's ``__init__`` sets, with equal values (the websockets state
    machine aside: ``conn`` makes it on first use, as uvicorn would have made it)."""

    async def app(scope: Any, receive: Any, send: Any) -> None: ...

    ours, stock = _load(app), _load(app, WebSocketsSansIOProtocol)
    assert set(vars(ours)) == set(vars(stock)) - {"conn"} | {"_conn"}
    skip = {"conn", "_conn", "queue", "writable", "config", "app", "loop"}  # objects
    assert {k: v for k, v in vars(ours).items() if k not in skip} == {
        k: v for k, v in vars(stock).items() if k not in skip
    }
    assert ours.queue.empty()
    assert ours.writable.is_set()
    assert ours._conn is None
    conn, library = ours.conn, stock.conn  # made now: a fresh one, as uvicorn's
    assert (conn.state, conn.max_message_size, conn.max_fragment_size, conn.extensions) == (
        library.state,
        library.max_message_size,
        library.max_fragment_size,
        library.extensions,
    )
    assert [(type(e), vars(e)) for e in conn.available_extensions or ()] == [
        (type(e), vars(e)) for e in library.available_extensions or ()
    ]
    assert conn.available_extensions  # the test config offers permessage-deflate
    assert ours.conn is conn


async def _handshaken(
    cls: type, app: Any, accepted: asyncio.Event, **config: Any
) -> tuple[Any, FakeTransport]:
    """A ``cls`` protocol on a fake transport, past the handshake ``app`` accepts."""
    conf = Config(app=app, ws=cls, lifespan="off", log_level="warning", **config)
    conf.load()
    state = ServerState()
    state.default_headers = [(b"server", b"uvicorn")]
    proto = cls(config=conf, server_state=state, app_state={})
    transport = FakeTransport()
    proto.connection_made(transport)
    proto.data_received(as_rebuilt(HANDSHAKE))
    await accepted.wait()
    return proto, transport


async def _plain_session(cls: type) -> tuple[Any, list[Any], bytes]:
    """A lean handshake, then only plain frames both ways: texts, the peer's ping, our
    keepalive ping and the peer's pong to it."""
    seen: list[Any] = []
    accepted = asyncio.Event()
    done = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        accepted.set()
        seen.append(await receive())
        send_now = scope["extensions"].get(SEND_NOW)  # ours; uvicorn's has only ASGI
        if send_now is not None:
            assert send_now(b'{"n":1}')
        else:
            await send({"type": "websocket.send", "text": '{"n":1}'})
        await done.wait()

    proto, transport = await _handshaken(cls, app, accepted, ws_ping_interval=5.0)
    proto.data_received(
        Frame(Opcode.TEXT, b"hi").serialize(mask=True)
        + Frame(Opcode.PING, b"p1").serialize(mask=True)
        + Frame(Opcode.PING, b"p2").serialize(mask=True)
    )
    for _ in range(3):
        await asyncio.sleep(0)
    random.seed(7)  # the keepalive ping's payload
    proto.stop_keepalive()
    proto.send_keepalive_ping()
    assert proto.pending_ping_payload is not None
    proto.data_received(Frame(Opcode.PONG, proto.pending_ping_payload).serialize(mask=True))
    await asyncio.sleep(0)
    assert proto.pending_ping_payload is None  # the pong was taken as the answer
    assert proto.ping_timer is not None  # and the next ping scheduled
    proto.stop_keepalive()
    done.set()
    return proto, seen, b"".join(transport.writes)


async def test_plain_frames_both_ways_never_need_the_state_machine() -> None:
    """Texts, pings and pongs after a lean handshake: no websockets state machine is made,
    and the app and the peer see what uvicorn's protocol gives them."""
    ours, *lean = await _plain_session(CoalescingWSProtocol)
    _, *library = await _plain_session(WebSocketsSansIOProtocol)
    assert ours._conn is None
    assert lean == library
    assert lean[0] == [{"type": "websocket.receive", "text": "hi"}]
    # Both pongs (written at once, as websockets queues them), our text, our ping.
    assert _frames(lean[1])[:3] == [b"p1", b"p2", b'{"n":1}']
    assert lean[1].count(b"\x89\x04") == 1
    # Made when first needed, the state machine is OPEN: a close goes the library's way.
    assert ours.conn.state is OPEN


async def _unanswered_ping(cls: type) -> tuple[bytes, bool]:
    """A lean handshake, our keepalive ping, no pong before the timeout."""
    accepted = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        accepted.set()
        await receive()  # the disconnect

    proto, transport = await _handshaken(
        cls, app, accepted, ws_ping_interval=5.0, ws_ping_timeout=2.0
    )
    random.seed(3)
    proto.stop_keepalive()
    proto.send_keepalive_ping()
    assert proto.pong_timer is not None  # the timeout is armed
    proto.pong_timer.cancel()
    proto.keepalive_timeout()  # as if it fired
    await asyncio.sleep(0)
    proto.connection_lost(None)
    await asyncio.sleep(0)
    return b"".join(transport.writes), transport.closing


async def test_an_unanswered_keepalive_ping_fails_the_connection_as_uvicorn_does() -> None:
    lean, library = (
        await _unanswered_ping(CoalescingWSProtocol),
        await _unanswered_ping(WebSocketsSansIOProtocol),
    )
    assert lean == library
    assert lean[1] is True
    assert _frames(lean[0])[-1].startswith(b"\x03\xf3")  # close 1011


async def test_write_now_writes_after_what_is_buffered_without_a_tick_callback() -> None:
    loop = asyncio.get_running_loop()
    raw = FakeTransport()
    wrapped = CoalescingTransport(raw, loop)  # type: ignore[arg-type]
    ready = len(loop._ready)  # type: ignore[attr-defined]
    wrapped.write_now(b"a")
    assert raw.writes == [b"a"]
    assert len(loop._ready) == ready  # type: ignore[attr-defined]
    wrapped.write(b"b")
    wrapped.write_now(b"c")
    assert raw.writes == [b"a", b"bc"]  # one write, in order
    raw.closing = True
    wrapped.write_now(b"d")
    await asyncio.sleep(0)
    assert raw.writes == [b"a", b"bc"]


def test_coalescing_transport_has_the_whole_transport_api_and_delegates_the_rest() -> None:
    """No ``__getattr__`` forwards unknown names (it would slow every attribute access down):
    every method of ``asyncio.Transport`` is spelled out, and those not about writing pass
    straight through."""
    from unittest.mock import MagicMock

    api = {n for n in dir(asyncio.Transport) if not n.startswith("_")}
    assert api <= set(dir(CoalescingTransport))
    assert "__getattr__" not in CoalescingTransport.__dict__
    raw = MagicMock()
    loop = asyncio.new_event_loop()
    wrapped = CoalescingTransport(raw, loop)
    loop.close()
    calls = {
        "is_closing": (),
        "get_extra_info": ("peername", None),
        "set_protocol": ("p",),
        "get_protocol": (),
        "is_reading": (),
        "pause_reading": (),
        "resume_reading": (),
        "set_write_buffer_limits": (10, 5),
        "get_write_buffer_limits": (),
        "can_write_eof": (),
        "abort": (),
    }
    assert api - set(calls) == {
        "close",
        "write",
        "writelines",
        "write_eof",
        "get_write_buffer_size",
    }
    for name, args in calls.items():
        result = getattr(wrapped, name)(*args)
        getattr(raw, name).assert_called_once_with(*args)
        assert result is getattr(raw, name).return_value or result is None


async def test_pings_from_a_peer_that_reads_nothing_do_not_grow_the_write_buffer() -> None:
    """Every ping was answered with a pong written to the transport, whether or not the peer
    read anything: a peer streaming pings and reading nothing grew the server's write buffer
    without bound (49 MB of pings: 44 MB buffered, and on). While writing is paused (the
    buffer is over its high-water mark) pings are now left unanswered, as RFC 6455 allows (a
    pong may answer only the latest ping); once the peer reads again, they are answered."""
    accepted = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        accepted.set()
        while (await receive())["type"] != "websocket.disconnect":
            pass

    proto, transport = await _handshaken(CoalescingWSProtocol, app, accepted)
    ping = Frame(Opcode.PING, b"p" * 125).serialize(mask=True)
    proto.pause_writing()
    before = sum(map(len, transport.writes))
    proto.data_received(ping * 1000)  # plain frames: our parser
    await asyncio.sleep(0)
    lean = sum(map(len, transport.writes)) - before
    proto.data_received(Frame(Opcode.BINARY, b"b").serialize(mask=True))  # the library's from here
    await asyncio.sleep(0)
    before = sum(map(len, transport.writes))
    proto.data_received(ping * 1000)
    await asyncio.sleep(0)
    library = sum(map(len, transport.writes)) - before
    assert (lean, library) == (0, 0)
    proto.resume_writing()
    proto.data_received(Frame(Opcode.PING, b"again").serialize(mask=True))
    await asyncio.sleep(0)
    assert _frames(b"".join(transport.writes))[-1] == b"again"
    proto.stop_keepalive()
