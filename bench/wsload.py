"""A lean WebSocket client for load generation: one asyncio ``Protocol``, no tasks per message.

The ``websockets`` asyncio client costs about a millisecond of CPU per dispatched job (a task
wake-up, a queue and a frame object per message), so with it the *load generator*, not the
coordinator, saturated its core first and the benchmarks measured the client. This client
parses frames straight out of ``data_received``, calls a synchronous handler per text message,
and writes everything the handler sent in one ``transport.write`` at the end of the batch.

Client frames are masked with an all-zero key (RFC 6455 requires a mask, not a random one for
the server to accept it; on loopback, against our own server, no proxy can be confused).
Only what the benchmarks need: text frames, ping -> pong, close; no fragmentation, no
extensions (none are offered, so the server uses none).
"""

from __future__ import annotations

import asyncio
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["WSClient", "connect", "frame"]

_HEADER_END = b"\r\n\r\n"
_ZERO_MASK = b"\0\0\0\0"


def frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One masked client frame (FIN set) carrying ``payload``."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0xFE, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0xFF, n)
    return head + _ZERO_MASK + payload


class WSClient(asyncio.Protocol):
    """A WebSocket client connection; ``on_message(self, payload)`` handles each text message."""

    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        headers: dict[str, str],
        on_message: Callable[[WSClient, bytes], None],
    ) -> None:
        self._request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: YmVuY2gtbG9hZGdlbi0xMg==\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            + "\r\n"
        ).encode()
        self._on_message = on_message
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._in_batch = False
        self._flush_scheduled = False
        self._open = False
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport) or hasattr(transport, "write")
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self._request)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed before the handshake"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        self._in_batch = True
        try:
            if not self._open:
                end = buf.find(_HEADER_END)
                if end < 0:
                    return
                status = bytes(buf[: buf.find(b"\r\n")])
                if b" 101 " not in status:
                    raise ConnectionError(f"handshake refused: {status.decode(errors='replace')}")
                del buf[: end + 4]
                self._open = True
                self.opened.set_result(None)
            self._parse(buf)
        finally:
            self._in_batch = False
            self.flush()

    def _parse(self, buf: bytearray) -> None:
        pos, size = 0, len(buf)
        on_message = self._on_message
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n = b1 & 0x7F
            head = 2
            if n == 126:
                if size - pos < 4:
                    break
                n = (buf[pos + 2] << 8) | buf[pos + 3]
                head = 4
            elif n == 127:
                if size - pos < 10:
                    break
                (n,) = struct.unpack_from("!Q", buf, pos + 2)
                head = 10
            if size - pos < head + n:
                break
            start = pos + head
            pos = start + n
            opcode = b0 & 0x0F
            if opcode == 0x1:
                on_message(self, bytes(buf[start:pos]))
            elif opcode == 0x9:
                self._out.append(frame(bytes(buf[start:pos]), 0xA))
            elif opcode == 0x8:
                self._out.append(frame(bytes(buf[start : start + 2]), 0x8))
        del buf[:pos]

    # -- sending --------------------------------------------------------------------------

    def send(self, payload: bytes) -> None:
        """Queue a text message; it leaves with the others of this batch (or this tick)."""
        self._out.append(frame(payload))
        if not self._in_batch and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self._out))
        self._out.clear()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.flush()
            self.transport.close()


async def connect(
    port: int,
    path: str,
    headers: dict[str, str],
    on_message: Callable[[WSClient, bytes], None],
    host: str = "127.0.0.1",
) -> WSClient:
    """Open a connection and wait for the handshake."""
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(
        lambda: WSClient(host, port, path, headers, on_message), host, port
    )
    await proto.opened
    return proto
