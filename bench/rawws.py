"""A minimal WebSocket client on a bare asyncio protocol: cheap load-generator sockets.

A ``websockets`` client connection costs the load generator tens of kilobytes, a task and tens
of microseconds per frame; the benchmarks' sockets need only the HTTP upgrade, text frames both
ways, and pongs to the server's pings. Client frames are masked with an all-zero key (a valid
frame, no XOR to compute; the server never checks the key's randomness). Server frames are
parsed without extensions (the coordinator disables permessage-deflate).
"""

from __future__ import annotations

import asyncio
import struct
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "IdleMiner",
    "RawWebSocket",
    "encode_frame",
    "parse_frames",
    "upgrade_request",
]

OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x8, 0x9, 0xA
ZERO_MASK = b"\x00\x00\x00\x00"


def upgrade_request(host: str, port: int, path: str, headers: dict[str, str]) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def encode_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One final client frame (masked with the zero key, so the payload goes as is)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + ZERO_MASK + payload


def parse_frames(buf: bytearray) -> list[tuple[int, bytes]]:
    """Take every complete (opcode, payload) server frame off the front of ``buf``.

    Server frames are unmasked; a masked one is unmasked anyway. Fragments are returned as
    they come (opcode 0 for continuations): idle miners never get fragmented messages.
    """
    frames = []
    while len(buf) >= 2:
        opcode, length = buf[0] & 0x0F, buf[1] & 0x7F
        masked = buf[1] & 0x80
        at = 2
        if length == 126:
            if len(buf) < 4:
                break
            length, at = struct.unpack_from("!H", buf, 2)[0], 4
        elif length == 127:
            if len(buf) < 10:
                break
            length, at = struct.unpack_from("!Q", buf, 2)[0], 10
        key = b""
        if masked:
            if len(buf) < at + 4:
                break
            key, at = bytes(buf[at : at + 4]), at + 4
        if len(buf) < at + length:
            break
        payload = bytes(buf[at : at + length])
        if key:
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        del buf[: at + length]
        frames.append((opcode, payload))
    return frames


class RawWebSocket(asyncio.Protocol):
    """The client side of one WebSocket: upgrade, pongs, close; subclasses get ``on_open`` once
    upgraded, ``on_text`` per text frame, and ``on_failed`` if the socket ends before
    ``opened`` was set (by them)."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded = self.opened = self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def send(self, payload: bytes) -> None:
        assert self.transport is not None
        self.transport.write(encode_frame(payload))

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        if not self.upgraded:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.buf.startswith(b"HTTP/1.1 101"):
                self.transport.close()
                return
            del self.buf[: end + 4]
            self.upgraded = True
            self.on_open()
        for opcode, payload in parse_frames(self.buf):
            if opcode == OP_TEXT:
                self.on_text(payload)
            elif opcode == OP_PING:
                self.transport.write(encode_frame(payload, OP_PONG))
            elif opcode == OP_CLOSE:
                self.closed = True
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.opened:
            self.opened = True  # report once
            self.on_failed()

    def on_open(self) -> None:
        pass

    def on_text(self, payload: bytes) -> None:
        pass

    def on_failed(self) -> None:
        pass


class IdleMiner(RawWebSocket):
    """Send ``hello`` once upgraded, wait for ``welcome`` (then ``on_welcome(True)``), idle.

    ``on_welcome(False)`` if the connection fails before the welcome; ``closed`` tells whether
    the server closed it afterwards.
    """

    def __init__(self, request: bytes, hello: bytes, on_welcome: Callable[[bool], None]) -> None:
        super().__init__(request)
        self.hello, self.on_welcome = hello, on_welcome

    @property
    def welcomed(self) -> bool:
        return self.opened

    def on_open(self) -> None:
        self.send(self.hello)

    def on_text(self, payload: bytes) -> None:
        if self.opened:
            return
        if orjson.loads(payload).get("type") != "welcome":
            assert self.transport is not None
            self.transport.close()
            return
        self.opened = True
        self.on_welcome(True)

    def on_failed(self) -> None:
        self.on_welcome(False)
