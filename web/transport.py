"""One ``write()`` per socket per event-loop tick, and a synchronous send for our pumps.

uvicorn's WebSocket protocol writes every frame to the transport as soon as it is sent, and
uvloop turns each write into a syscall. A job moves ~10 frames, most of them produced together
(an ack and three events after one commit, say), so the server spent a sixth of its CPU in
``transport.write``. ``CoalescingWSProtocol`` gives uvicorn a transport that gathers the
writes made during one tick and hands them to the real transport in one call at the end of it.

A text frame sent through ASGI passes four layers (starlette's ``send_text``, its exception
wrapper, uvicorn's ``send`` with its ``writable`` wait, a message dict) and an ``await`` per
frame. ``CoalescingWSProtocol`` also puts ``send_text_now`` in the connection's ASGI scope
(``scope["extensions"][SEND_NOW]``): it hands the frame to the websockets state machine and
the coalescing transport directly, and says ``False`` whenever only the ASGI path may send
(handshake not done, closing, flow control), so the caller falls back to it.

Receiving: uvicorn puts every text frame in a queue as a message dict and pauses reading until
the app's task takes it (through starlette's ``receive``, then resumes reading): a task switch
and two syscalls per frame. A connection in its steady state registers a callback with
``scope["extensions"][ON_TEXT]``; while it is set, a text frame that arrives when nothing is
queued goes to the callback synchronously. The callback says ``False`` to have the frame
queued as before (its task is busy: order is kept, and reading pauses as before). The
registration returns a ``wake`` function that queues a message carrying ``WAKE``: the callback
took a frame whose handling must await, and the task takes over from there.

The opening handshake: uvicorn's httptools protocol has already parsed the upgrade request; it
rebuilds the bytes and hands them to the websockets ``ServerProtocol``, which parses them again
into ``Headers`` objects, formats a ``Date`` with ``email.utils`` and serializes a ``Response``
that uvicorn then edits. For a plain upgrade request (GET, one valid key, version 13, no
subprotocol or extension offer; ``web.wire.plain_upgrade``) ``CoalescingWSProtocol`` builds
the ASGI scope itself and answers ``websocket.accept`` with the same response bytes, built
directly; anything else goes the library's way unchanged. ``scope["extensions"][ACCEPT_NOW]``
takes the ``websocket.connect`` message and accepts synchronously, for callers that would
otherwise await both through starlette. ``scope["extensions"][FLUSH_NOW]`` writes the frames
buffered so far this tick at once (the dispatcher does it for a new job's assign).

After a lean handshake, inbound frames are parsed here too while they are plain (final, masked
text frames within the size limit, pings and pongs; ``web.wire.plain_frames``): the payloads go
where websockets' generator-based parser would send them, and frames of a read the library
finds malformed are dropped as uvicorn drops them. The first other frame (close, binary,
fragment, anything malformed) hands itself and the rest of the stream to the library for good;
both parsers stop only at frame boundaries, so the hand-over is exact.

The websockets state machine (``ServerProtocol``: a UUID, a request parser, a stream reader)
is made only when something needs it (``conn``). A socket that did a lean handshake and has
exchanged only plain frames never does: its texts, pongs and keepalive pings are written
directly, as the state machine would have serialized them; made later, it starts in the
state it would have reached.
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
import weakref
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from uvicorn.logging import TRACE_LOG_LEVEL
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.protocol import CONNECTING, OPEN, Protocol
from websockets.server import ServerProtocol

from web.wire import (
    PING,
    PING_HEAD_4,
    RESPONSE_101,
    TEXT,
    frame_need,
    plain_frames,
    plain_upgrade,
    pong_frame,
    text_frame_head,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from uvicorn._types import ASGISendEvent
    from uvicorn.config import Config
    from uvicorn.server import ServerState
    from websockets.http11 import Request

__all__ = [
    "ACCEPT_NOW",
    "FLUSH_NOW",
    "ON_TEXT",
    "SEND_NOW",
    "WAKE",
    "TickFlusher",
    "CoalescingTransport",
    "CoalescingWSProtocol",
]

_LOGGER = logging.getLogger("uvicorn.error")  # uvicorn's, looked up once
SEND_NOW = "aitbc.send_text_now"
ON_TEXT = "aitbc.on_text"
ACCEPT_NOW = "aitbc.accept_now"
FLUSH_NOW = "aitbc.flush_now"
# What ``_extend`` puts in a socket's scope: each key and the protocol method it names.
_EXTENSIONS = (
    (SEND_NOW, "send_text_now"),
    (ON_TEXT, "set_on_text"),
    (ACCEPT_NOW, "accept_now"),
    (FLUSH_NOW, "flush_now"),
)
WAKE = "aitbc.wake"


_FLUSHERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, TickFlusher] = (
    weakref.WeakKeyDictionary()
)


class TickFlusher:
    """One per event loop: the coalescing transports written to since the last flush, all
    flushed by one callback at the end of the tick, or earlier by ``flush_all``."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._dirty: list[CoalescingTransport] = []

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> TickFlusher:
        flusher = _FLUSHERS.get(loop)
        if flusher is None:
            flusher = _FLUSHERS[loop] = cls(loop)
        return flusher

    def add(self, transport: CoalescingTransport) -> None:
        if not self._dirty:
            self._loop.call_soon(self.flush_all)
        self._dirty.append(transport)

    def flush_all(self) -> None:
        """Write every buffer now, in the order the transports were first written to."""
        dirty, self._dirty = self._dirty, []
        for transport in dirty:
            transport.flush()


class CoalescingTransport:
    """Wraps a transport: ``write`` buffers until the end of the tick; the rest delegates.

    The rest of the ``asyncio.Transport`` API is spelled out below rather than forwarded by a
    ``__getattr__``: a class with one sends every attribute access on its instances (``write``
    and the buffer in ``write``, six frames a job) down the interpreter's slow path.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._flusher = TickFlusher.of(loop)
        self._buffer: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer.append(bytes(data))
        if not self._scheduled:
            self._scheduled = True
            self._flusher.add(self)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def write_now(self, data: bytes) -> None:
        """``write`` then ``flush``: one write, after anything buffered, without a callback
        for the end of the tick (a whole HTTP response, web/lean_http.py)."""
        if self._buffer:
            self._buffer.append(data)
            self.flush()
        elif not self._transport.is_closing():
            self._transport.write(data)

    def flush(self) -> None:
        self._scheduled = False
        if not self._buffer:
            return
        data = b"".join(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        self._buffer.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._buffer))

    # ---- delegated as is ---------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def abort(self) -> None:
        self._transport.abort()


class CoalescingWSProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O websockets protocol on a coalescing transport."""

    _accept: str | None = None  # Sec-WebSocket-Accept of a lean handshake, until accepted
    _lean = False  # the handshake is a lean one
    _lean_open = False  # and it was accepted (the state machine's OPEN, see ``conn``)
    _on_text: Callable[[bytes | str], bool] | None = None
    _lean_in = False  # inbound frames are parsed by ``_lean_frames`` (see the module doc)
    # The start of a frame ``_lean_frames`` has not received whole yet (a bytearray, grown in
    # place), and the size it needs in all before it is parsed again.
    _partial: bytes | bytearray = b""
    _need = 0

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """uvicorn's ``__init__`` (tests/web/test_transport.py checks it sets the same state),
        without its lookups of the logger and, until something needs it, the websockets
        state machine (``conn``)."""
        if not config.loaded:
            config.load()  # pragma: no cover - uvicorn's servers load it first
        self.config = config
        self.app = config.loaded_app
        self.loop = _loop or asyncio.get_event_loop()
        self.logger = _LOGGER
        self.root_path = config.root_path
        self.asgi_version = config.asgi_version
        self.app_state = app_state
        self.connections = server_state.connections
        self.tasks = server_state.tasks
        self.default_headers = server_state.default_headers
        self.transport = None  # type: ignore[assignment]
        self.server = None
        self.client = None
        self.scheme = None  # type: ignore[assignment]
        self.queue = asyncio.Queue()
        self.handshake_initiated = False
        self.handshake_complete = False
        self.close_sent = False
        self.disconnected = False
        self.close_timer = None
        self.close_timeout = 10.0
        self.initial_response = None
        self._conn: ServerProtocol | None = None
        self.read_paused = False
        self.writable = asyncio.Event()
        self.writable.set()
        self.ping_interval = config.ws_ping_interval
        self.ping_timeout = config.ws_ping_timeout
        self.ping_timer = None
        self.pong_timer = None
        self.pending_ping_payload = None
        self.ping_sent_at = 0.0
        self.last_ping_rtt = 0.0
        self.frames = []
        self.curr_msg_data_type = "bytes"

    @property
    def conn(self) -> ServerProtocol:
        """The websockets state machine, made on first use.

        A socket that only did a lean handshake and exchanges plain frames never needs one:
        ``_lean_frames``, ``send_text_now`` and the keepalive ping write its frames directly.
        Made later, it is in the state it would be in had it been made at the start: OPEN once
        a lean handshake was accepted, else CONNECTING (after a lean handshake, with the frame
        parser running, as ``lean_upgrade`` left it).
        """
        conn = self._conn
        if conn is None:
            config = self.config
            extensions = []
            if config.ws_per_message_deflate:
                extensions = [
                    ServerPerMessageDeflateFactory(
                        server_max_window_bits=12,
                        client_max_window_bits=12,
                        compress_settings={"memLevel": 5},
                    )
                ]
            conn = self._conn = ServerProtocol(
                extensions=extensions,
                max_size=config.ws_max_size,
                logger=_LOGGER,
                state=OPEN if self._lean_open else CONNECTING,
            )
            if self._lean and not self._lean_open:
                conn.parser = Protocol.parse(conn)
                next(conn.parser)
        return conn

    @conn.setter
    def conn(self, value: ServerProtocol) -> None:
        self._conn = value

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport implements the Transport API without subclassing it.
        wrapped = CoalescingTransport(transport, self.loop)  # type: ignore[arg-type]
        # The HTTP protocol that parsed the upgrade request is still the transport's, and has
        # looked up the addresses already (each lookup makes a socket object and a syscall).
        http = getattr(transport, "get_protocol", lambda: None)()
        scheme = getattr(http, "scheme", None)
        if scheme in ("http", "https") and self.logger.level > TRACE_LOG_LEVEL:
            self.connections.add(self)
            self.transport = wrapped  # type: ignore[assignment]
            self.server, self.client = http.server, http.client  # type: ignore[union-attr]
            self.scheme = "wss" if scheme == "https" else "ws"
            return
        super().connection_made(wrapped)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        if self._lean_in:
            self._lean_frames(data)
            return
        request = None if self.handshake_initiated else plain_upgrade(data)
        if request is None:
            super().data_received(data)
        else:
            self.lean_upgrade(request)

    def _lean_frames(self, data: bytes) -> None:
        """Parse plain frames; hand the rest to the library at the first other one.

        Like uvicorn's ``data_received``, frames parsed from one read are delivered after the
        whole read is parsed, and not at all when the library finds it malformed.
        """
        conn = self._conn
        is_open, limit = self._open_and_limit(conn)
        if not is_open or self.close_sent:
            self._lean_in = False
            data, self._partial = bytes(self._partial) + data, b""
            super().data_received(data)
            return
        buf = self._buffered(data)
        if buf is None:
            return  # the frame being received is not whole yet: nothing to parse
        frames, pos, plain = plain_frames(buf, limit)
        answered = conn is None and plain
        if answered:
            # Without a state machine: the pongs websockets would queue as it parses, written
            # before anything that delivering this read writes (as its next write would), while
            # the peer reads what it is sent (``handle_ping``).
            pongs = b"".join(pong_frame(payload) for head, payload in frames if head == PING)
            if pongs and self.writable.is_set():
                self.transport.write(pongs)
        else:
            conn = self.conn
            for head, payload in frames:
                if head == PING:  # what websockets does as it parses a ping: queue the pong
                    conn.send_frame(Frame(Opcode.PONG, payload))
        if plain:
            self._hold(buf, pos)
        else:  # from the first frame that is not plain: the library's
            assert conn is not None
            self._lean_in = False
            self._partial = b""
            conn.receive_data(buf[pos:])
            if conn.parser_exc is not None:
                self.handle_parser_exception()
                return
        self._deliver(frames, answered)
        if not plain:
            self.handle_events()

    def _open_and_limit(self, conn: ServerProtocol | None) -> tuple[bool, int | None]:
        """Whether the state machine is OPEN, and the largest frame payload it accepts."""
        if conn is None:  # not made yet: OPEN once accepted, with uvicorn's size limit
            return self._lean_open, self.config.ws_max_size
        limit, size = conn.max_message_size, conn.max_fragment_size
        if size is not None:
            limit = size if limit is None else min(limit, size)
        return conn.state is OPEN, limit

    def _deliver(self, frames: list[tuple[int, bytes]], answered: bool) -> None:
        """What uvicorn does with each frame; ``answered``: the pings' pongs are written
        already (else they are queued in the state machine)."""
        for head, payload in frames:
            if head == TEXT:  # uvicorn's handle_text, for a final frame
                self.curr_msg_data_type = "text"
                self.frames = [payload]
                self.send_receive_event_to_app()
            elif head == PING:  # uvicorn's: write the pong(s) websockets queued
                if not answered and self._conn is not None:
                    self.handle_ping()
            else:
                self.handle_pong(Frame(Opcode.PONG, payload))

    def _hold(self, buf: bytes, pos: int) -> None:
        """Keep the incomplete frame from ``pos`` (if any) until it is whole."""
        if pos < len(buf):
            self._partial = bytearray(buf[pos:])
            self._need = frame_need(self._partial)
        else:
            self._partial = b""

    def _buffered(self, data: bytes) -> bytes | None:
        """What to parse now: ``data`` after the partial frame held, or None while that frame
        is still short of the size it needs (``_need``)."""
        if not self._partial:
            return data
        self._partial += data
        return None if len(self._partial) < self._need else bytes(self._partial)

    def lean_upgrade(self, request: tuple[bytes, list[tuple[bytes, bytes]], str]) -> None:
        """``handle_connect`` for a plain upgrade request, as ``web.wire.plain_upgrade`` parsed
        it (here, or in ``web.http_protocol`` straight from the socket), without the library's
        parse."""
        target, headers, self._accept = request
        raw_path, _, query_string = target.partition(b"?")
        path = raw_path.decode("ascii")
        self.handshake_initiated = True
        # Frames that follow the request are parsed as the library does after its own parse
        # of the request: the frame parser runs from now on, the state turns OPEN on accept
        # (``conn`` makes the state machine so when it is first needed).
        self._lean = True
        if self._conn is not None:
            self._conn.parser = Protocol.parse(self._conn)
            next(self._conn.parser)
        self.scope = {
            "type": "websocket",
            "asgi": {"version": self.asgi_version, "spec_version": "2.4"},
            "http_version": "1.1",
            "scheme": self.scheme,
            "server": self.server,
            "client": self.client,
            "root_path": self.root_path,
            "path": self.root_path + (unquote(path) if "%" in path else path),
            "raw_path": self.root_path.encode("ascii") + raw_path,
            "query_string": query_string,
            "headers": headers,
            "subprotocols": [],
            "state": self.app_state.copy(),
            "extensions": {"websocket.http.response": {}},
        }
        self._extend(self.scope["extensions"])
        self.queue.put_nowait({"type": "websocket.connect"})
        task = self.loop.create_task(self.run_asgi())
        task.add_done_callback(self.on_task_complete)
        self.tasks.add(task)
        self._lean_in = True  # the library's frame parser is primed, at a boundary

    async def send(self, message: ASGISendEvent) -> None:
        if (
            self._accept is not None
            and message["type"] == "websocket.accept"
            and not self.handshake_complete
            and self.initial_response is None
        ):
            await self._lean_accept(message)
        else:
            await super().send(message)
            if self.initial_response is not None and self.close_sent:
                # A denial response sent whole (web.http.unknown_socket's 404) answers the
                # handshake: uvicorn's ``run_asgi`` would log "ASGI callable returned without
                # completing handshake" at ERROR for every such request.
                self.handshake_complete = True

    async def _lean_accept(self, message: Any) -> None:
        """uvicorn's ``websocket.accept`` for a lean handshake: the same response bytes."""
        await self.writable.wait()
        if self.disconnected:
            await super().send(message)  # raises ClientDisconnected
            return
        self._write_accept(message)

    def accept_now(self) -> bool:
        """Take ``websocket.connect`` and accept, synchronously; ``False``: use ASGI instead."""
        if (
            self._accept is None
            or self.handshake_complete
            or self.disconnected
            or self.initial_response is not None
            or not self.writable.is_set()
            or self.queue.empty()
        ):
            return False
        connect = self.queue.get_nowait()  # queued first, by ``_lean_connect``
        assert connect["type"] == "websocket.connect"
        self._write_accept({})
        return True

    def _write_accept(self, message: Any) -> None:
        if self.logger.isEnabledFor(logging.INFO):
            self.logger.info(
                '%s - "WebSocket %s" [accepted]',
                get_client_addr(self.scope),
                get_path_with_query_string(self.scope),
            )
        assert self._accept is not None
        parts = [RESPONSE_101, self._accept.encode(), b"\r\n"]
        for name, value in (*self.default_headers, *message.get("headers", ())):
            parts += [bytes(name).lower(), b": ", bytes(value), b"\r\n"]
        subprotocol = message.get("subprotocol")
        if subprotocol:
            parts += [b"Sec-WebSocket-Protocol: ", subprotocol.encode(), b"\r\n"]
        parts.append(b"\r\n")
        self._accept = None
        if not self.transport.is_closing():
            self.handshake_complete = True
            self._lean_open = True
            if self._conn is not None:
                self._conn.state = OPEN
            self.transport.write(b"".join(parts))
            self.start_keepalive()

    def handle_ping(self) -> None:
        """uvicorn's: write the pong(s) websockets queued; not while writing is paused (the
        write buffer is over its high-water mark: the peer reads nothing). Each ping was
        answered anyway, and a peer streaming pings grew the write buffer without bound. RFC
        6455 lets a pong answer only the latest ping; a peer that reads nothing sees none."""
        output = self.conn.data_to_send()
        if self.writable.is_set() or self.conn.state is not OPEN:
            self.transport.write(b"".join(output))

    def send_keepalive_ping(self) -> None:
        """uvicorn's, writing the ping frame itself while there is no state machine."""
        if self._conn is not None:
            super().send_keepalive_ping()
            return
        self.ping_timer = None
        if self.close_sent or self.transport.is_closing():
            return
        self.pending_ping_payload = struct.pack("!I", random.getrandbits(32))
        self.ping_sent_at = self.loop.time()
        self.transport.write(PING_HEAD_4 + self.pending_ping_payload)
        if self.ping_timeout is not None:
            self.pong_timer = self.loop.call_later(self.ping_timeout, self.keepalive_timeout)
        else:
            self.schedule_ping()

    def handle_connect(self, event: Request) -> None:
        """uvicorn's, with our extensions in the scope (set before the app's task starts)."""
        super().handle_connect(event)
        if self.response.status_code == 101:  # else uvicorn answered, and made no scope
            self._extend(self.scope["extensions"])

    def _extend(self, extensions: dict[str, Any]) -> None:
        for key, method in _EXTENSIONS:
            extensions[key] = getattr(self, method)

    def on_task_complete(self, task: asyncio.Task[None]) -> None:
        """uvicorn's, then our methods leave the scope: the app is done with it.

        The scope is the protocol's and holds the methods, which hold the protocol: a
        reference cycle that kept every closed socket's objects (about 45 tracked, ~19 KiB)
        until the collector's oldest generation ran, and made that pass long.
        """
        super().on_task_complete(task)
        scope = getattr(self, "scope", None)
        if scope is not None:
            extensions = scope["extensions"]
            for key, _ in _EXTENSIONS:
                extensions.pop(key, None)

    def flush_now(self) -> None:
        """Write what this tick buffered for the socket now, not at the end of the tick."""
        transport = self.transport
        if isinstance(transport, CoalescingTransport):
            transport.flush()

    def set_on_text(self, callback: Callable[[bytes | str], bool] | None) -> Callable[[], None]:
        """Hand text frames to ``callback`` (``None``: queue them all); returns ``wake``."""
        self._on_text = callback
        return self.wake

    def wake(self) -> None:
        """Queue a message that only says: the task has work (see ``ON_TEXT``)."""
        self.queue.put_nowait({"type": "websocket.receive", WAKE: True})  # type: ignore[arg-type]

    def send_receive_event_to_app(self) -> None:
        on_text = self._on_text
        if (
            on_text is not None
            and self.curr_msg_data_type == "text"
            and not self.close_sent
            and self.queue.empty()
        ):
            frames = self.frames
            data = frames[0] if len(frames) == 1 else b"".join(frames)
            text: bytes | str | None = data
            if not data.isascii():
                try:
                    text = data.decode()
                except UnicodeDecodeError:
                    text = None  # uvicorn's path closes with 1007
            if text is not None and on_text(text):
                self.frames = []
                return
        super().send_receive_event_to_app()

    def send_text_now(self, data: bytes) -> bool:
        """Send one text frame now; ``False`` when it must go through ASGI ``send`` instead."""
        if (
            self.disconnected
            or self.close_sent
            or not self.handshake_complete
            or self.initial_response is not None
            or not self.writable.is_set()
        ):
            return False
        conn = self._conn
        if conn is None and self._lean_open:  # nothing but plain frames so far
            self.transport.write(text_frame_head(len(data)) + data)
            return True
        conn = self.conn
        if conn.state is OPEN and not conn.expect_continuation_frame and not conn.extensions:
            # What ``conn.send_text`` would queue: one final, unmasked text frame.
            self.transport.write(text_frame_head(len(data)) + data)
            return True
        try:
            conn.send_text(data)
        except InvalidState:
            return False
        self.transport.write(b"".join(conn.data_to_send()))
        return True
