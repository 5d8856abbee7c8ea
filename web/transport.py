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
otherwise await both through starlette.

After a lean handshake, inbound frames are parsed here too while they are plain (final, masked
text frames within the size limit, pings and pongs; ``web.wire.plain_frames``): the payloads go
where websockets' generator-based parser would send them, and frames of a read the library
finds malformed are dropped as uvicorn drops them. The first other frame (close, binary,
fragment, anything malformed) hands itself and the rest of the stream to the library for good;
both parsers stop only at frame boundaries, so the hand-over is exact.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from uvicorn.logging import TRACE_LOG_LEVEL
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState
from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN, Protocol

from web.wire import (
    PING,
    RESPONSE_101,
    TEXT,
    frame_need,
    plain_frames,
    plain_upgrade,
    text_frame_head,
)

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

    from uvicorn._types import ASGISendEvent

__all__ = [
    "ACCEPT_NOW",
    "ON_TEXT",
    "SEND_NOW",
    "WAKE",
    "CoalescingTransport",
    "CoalescingWSProtocol",
]

SEND_NOW = "aitbc.send_text_now"
ON_TEXT = "aitbc.on_text"
ACCEPT_NOW = "aitbc.accept_now"
WAKE = "aitbc.wake"


class CoalescingTransport:
    """Wraps a transport: ``write`` buffers until the end of the tick; the rest delegates."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._buffer: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer.append(bytes(data))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

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

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingWSProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O websockets protocol on a coalescing transport."""

    _accept: str | None = None  # Sec-WebSocket-Accept of a lean handshake, until accepted
    _on_text: Callable[[bytes | str], bool] | None = None
    _lean_in = False  # inbound frames are parsed by ``_lean_frames`` (see the module doc)
    # The start of a frame ``_lean_frames`` has not received whole yet (a bytearray, grown in
    # place), and the size it needs in all before it is parsed again.
    _partial: bytes | bytearray = b""
    _need = 0

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
        conn = self.conn
        if conn.state is not OPEN or self.close_sent:
            self._lean_in = False
            data, self._partial = bytes(self._partial) + data, b""
            super().data_received(data)
            return
        buf = self._buffered(data)
        if buf is None:
            return  # the frame being received is not whole yet: nothing to parse
        limit = conn.max_message_size
        if conn.max_fragment_size is not None:
            limit = conn.max_fragment_size if limit is None else min(limit, conn.max_fragment_size)
        frames, pos, plain = plain_frames(buf, limit)
        for head, payload in frames:
            if head == PING:  # what websockets does as it parses a ping: queue the pong
                conn.send_frame(Frame(Opcode.PONG, payload))
        if plain:
            self._hold(buf, pos)
        else:  # from the first frame that is not plain: the library's
            self._lean_in = False
            self._partial = b""
            conn.receive_data(buf[pos:])
            if conn.parser_exc is not None:
                self.handle_parser_exception()
                return
        for head, payload in frames:
            if head == TEXT:  # uvicorn's handle_text, for a final frame
                self.curr_msg_data_type = "text"
                self.frames = [payload]
                self.send_receive_event_to_app()
            elif head == PING:  # uvicorn's: write the pong(s) websockets queued
                self.handle_ping()
            else:
                self.handle_pong(Frame(Opcode.PONG, payload))
        if not plain:
            self.handle_events()

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
        # of the request: the frame parser runs from now on, the state turns OPEN on accept.
        conn = self.conn
        conn.parser = Protocol.parse(conn)
        next(conn.parser)
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
            self.conn.state = OPEN
            self.transport.write(b"".join(parts))
            self.start_keepalive()

    async def run_asgi(self) -> None:
        extensions = self.scope["extensions"]
        extensions[SEND_NOW] = self.send_text_now  # type: ignore[assignment]
        extensions[ON_TEXT] = self.set_on_text  # type: ignore[assignment]
        extensions[ACCEPT_NOW] = self.accept_now  # type: ignore[assignment]
        await super().run_asgi()

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
