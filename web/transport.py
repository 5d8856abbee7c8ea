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
subprotocol or extension offer) ``CoalescingWSProtocol`` checks the few headers that matter
itself, builds the ASGI scope, and answers ``websocket.accept`` with the response bytes built
directly (the same status line and headers as the library's); anything else goes the library's
way unchanged. After a lean handshake, inbound frames are parsed here too while they are plain
(final, masked text frames within the size limit, pings and pongs): the same payloads go the
same way as websockets' generator-based parser would send them. The first other frame (close,
binary, fragment, anything malformed) hands it and the rest of the stream to the library for good;
both parsers stop only at frame boundaries, so the hand-over is exact.
``scope["extensions"][ACCEPT_NOW]`` takes the ``websocket.connect`` message
and accepts synchronously, for callers that would otherwise await both through starlette.
"""

from __future__ import annotations

import binascii
import logging
from base64 import b64decode
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from uvicorn.logging import TRACE_LOG_LEVEL
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState
from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN, Protocol
from websockets.utils import accept_key

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask

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
    "plain_frames",
    "plain_upgrade",
    "text_frame_head",
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


# websockets' own limits on a request head (``websockets.http11``): larger ones go its way.
_MAX_HEAD = 8192
_MAX_HEADERS = 128
# Headers whose presence needs the library's negotiation or checks.
_LIBRARY_HEADERS = frozenset((b"sec-websocket-protocol", b"sec-websocket-extensions", b"origin"))
_CHECKED_HEADERS = _LIBRARY_HEADERS | {
    b"connection",
    b"upgrade",
    b"sec-websocket-key",
    b"sec-websocket-version",
}
_RESPONSE_HEAD = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: "
)


def plain_upgrade(data: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], str] | None:
    """``(target, headers, Sec-WebSocket-Accept)`` of a plain, valid upgrade request, else None.

    ``None`` sends the request through the websockets library: anything unusual (another
    method or version, several keys, a subprotocol or extension offer, an ``Origin``, an
    oversized head, a bad key) is left to its checks and error responses.
    """
    if len(data) > _MAX_HEAD or not data.endswith(b"\r\n\r\n") or not data.isascii():
        return None
    lines = data[:-4].split(b"\r\n")
    method, _, rest = lines[0].partition(b" ")
    target, _, protocol = rest.partition(b" ")
    if method != b"GET" or protocol != b"HTTP/1.1" or not target.startswith(b"/"):
        return None
    if len(lines) > _MAX_HEADERS + 1:
        return None
    headers: list[tuple[bytes, bytes]] = []
    seen: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name:
            return None
        value = value.strip(b" \t")
        headers.append((name, value))
        lname = name.lower()
        if lname in _CHECKED_HEADERS:
            seen.setdefault(lname, []).append(value)
    key = _plain_key(seen)
    return None if key is None else (target, headers, accept_key(key))


def _plain_key(seen: dict[bytes, list[bytes]]) -> str | None:
    """The key when the upgrade headers are exactly the plain ones."""
    if seen.keys() & _LIBRARY_HEADERS:
        return None
    connection = seen.get(b"connection")
    if connection is None or b"upgrade" not in {
        token.strip().lower() for token in b",".join(connection).split(b",")
    }:
        return None
    upgrade, version, keys = (
        seen.get(b"upgrade"),
        seen.get(b"sec-websocket-version"),
        seen.get(b"sec-websocket-key"),
    )
    if upgrade is None or len(upgrade) != 1 or upgrade[0].lower() != b"websocket":
        return None
    if version != [b"13"] or keys is None or len(keys) != 1:
        return None
    try:
        if len(b64decode(keys[0], validate=True)) != 16:
            return None
    except binascii.Error:
        return None
    return keys[0].decode()


def text_frame_head(size: int) -> bytes:
    """The header of a final, unmasked text frame of ``size`` bytes (RFC 6455 5.2)."""
    if size < 126:
        return bytes((0x81, size))
    if size < 1 << 16:
        return b"\x81\x7e" + size.to_bytes(2, "big")
    return b"\x81\x7f" + size.to_bytes(8, "big")


_TEXT, _PING, _PONG = 0x81, 0x89, 0x8A  # first bytes of final frames without RSV bits


def plain_frames(buf: bytes, limit: int | None) -> tuple[list[tuple[int, bytes]], int, bool]:
    """The whole final, masked text, ping and pong frames at the start of ``buf``.

    Returns ``(frames, end, plain)``: ``frames`` are ``(first byte, payload)``; ``end`` is
    where they end; ``plain`` is false when the next frame is another kind, malformed or over
    ``limit``: the library's from there.
    """
    end = len(buf)
    pos = 0
    frames: list[tuple[int, bytes]] = []
    while end - pos >= 2:
        head = buf[pos]
        length = buf[pos + 1] & 0x7F
        if buf[pos + 1] < 0x80 or (head != _TEXT and (head not in (_PING, _PONG) or length > 125)):
            return frames, pos, False  # not masked, or not plain
        start = pos + 2
        if length == 126:
            if end - start < 2:
                break
            length = int.from_bytes(buf[start : start + 2], "big")
            start += 2
        elif length == 127:
            if end - start < 8:
                break
            length = int.from_bytes(buf[start : start + 8], "big")
            start += 8
        if limit is not None and length > limit:
            return frames, pos, False  # the library raises PayloadTooBig: 1009
        if end - start < 4 + length:
            break
        payload = apply_mask(buf[start + 4 : start + 4 + length], buf[start : start + 4])
        frames.append((head, payload))
        pos = start + 4 + length
    return frames, pos, True


class CoalescingWSProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O websockets protocol on a coalescing transport."""

    _accept: str | None = None  # Sec-WebSocket-Accept of a lean handshake, until accepted
    _on_text: Callable[[bytes | str], bool] | None = None
    _lean_in = False  # inbound frames are parsed by ``_lean_frames`` (see the module doc)
    _partial = b""  # the start of a frame ``_lean_frames`` has not received whole yet

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
        elif not self.handshake_initiated and self._lean_connect(data):
            self._lean_in = True  # the library's frame parser is primed, at a boundary
        else:
            super().data_received(data)

    def _lean_frames(self, data: bytes) -> None:
        """Parse plain frames; hand the rest to the library at the first other one.

        Like uvicorn's ``data_received``, frames parsed from one read are delivered after the
        whole read is parsed, and not at all when the library finds it malformed.
        """
        conn = self.conn
        if conn.state is not OPEN or self.close_sent:
            self._lean_in = False
            data, self._partial = self._partial + data, b""
            super().data_received(data)
            return
        buf = self._partial + data if self._partial else data
        limit = conn.max_message_size
        if conn.max_fragment_size is not None:
            limit = conn.max_fragment_size if limit is None else min(limit, conn.max_fragment_size)
        frames, pos, plain = plain_frames(buf, limit)
        for head, payload in frames:
            if head == _PING:  # what websockets does as it parses a ping: queue the pong
                conn.send_frame(Frame(Opcode.PONG, payload))
        if plain:
            self._partial = buf[pos:] if pos else buf
        else:  # from the first frame that is not plain: the library's
            self._lean_in = False
            self._partial = b""
            conn.receive_data(buf[pos:])
            if conn.parser_exc is not None:
                self.handle_parser_exception()
                return
        for head, payload in frames:
            if head == _TEXT:  # uvicorn's handle_text, for a final frame
                self.curr_msg_data_type = "text"
                self.frames = [payload]
                self.send_receive_event_to_app()
            elif head == _PING:  # uvicorn's: write the pong(s) websockets queued
                self.handle_ping()
            else:
                self.handle_pong(Frame(Opcode.PONG, payload))
        if not plain:
            self.handle_events()

    def _lean_connect(self, data: bytes) -> bool:
        """``handle_connect`` for a plain upgrade request, without the library's parse."""
        request = plain_upgrade(data)
        if request is None:
            return False
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
        return True

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
        parts = [_RESPONSE_HEAD, self._accept.encode(), b"\r\n"]
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
