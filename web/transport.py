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
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState

if TYPE_CHECKING:
    import asyncio

__all__ = ["SEND_NOW", "CoalescingTransport", "CoalescingWSProtocol"]

SEND_NOW = "aitbc.send_text_now"


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

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport implements the Transport API without subclassing it.
        wrapped = CoalescingTransport(transport, self.loop)  # type: ignore[arg-type]
        super().connection_made(wrapped)  # type: ignore[arg-type]

    async def run_asgi(self) -> None:
        self.scope["extensions"][SEND_NOW] = self.send_text_now  # type: ignore[assignment]
        await super().run_asgi()

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
        try:
            self.conn.send_text(data)
        except InvalidState:
            return False
        self.transport.write(b"".join(self.conn.data_to_send()))
        return True
