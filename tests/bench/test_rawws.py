"""bench/rawws.py: frame encoding/parsing and the idle miner's handshake, on a fake transport."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from bench.rawws import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    IdleMiner,
    encode_frame,
    parse_frames,
    upgrade_request,
)


def server_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, n])
    elif n < 1 << 16:
        head = bytes([0x80 | opcode, 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 127]) + n.to_bytes(8, "big")
    return head + payload


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536])
def test_client_frames_are_masked_and_parse_back(size: int) -> None:
    payload = bytes(i % 251 for i in range(size))
    frame = encode_frame(payload)
    assert frame[0] == 0x80 | OP_TEXT
    assert frame[1] & 0x80  # masked, as a client must
    assert parse_frames(bytearray(frame)) == [(OP_TEXT, payload)]


@pytest.mark.parametrize("size", [5, 200, 70_000])
def test_partial_frames_wait_for_the_rest(size: int) -> None:
    data = server_frame(b"x" * size) + server_frame(b"ping", OP_PING)
    buf = bytearray()
    got = []
    for i in range(0, len(data), 7):
        buf += data[i : i + 7]
        got += parse_frames(buf)
    assert got == [(OP_TEXT, b"x" * size), (OP_PING, b"ping")]
    assert buf == bytearray()


def test_masked_frames_are_unmasked() -> None:
    key = b"\x01\x02\x03\x04"
    body = b"hello"
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(body))
    assert parse_frames(bytearray(bytes([0x81, 0x80 | 5]) + key + masked)) == [(OP_TEXT, body)]


def test_upgrade_request_carries_the_headers() -> None:
    req = upgrade_request("127.0.0.1", 8000, "/v1/miners/ws", {"X-Api-Key": "k"})
    assert req.startswith(b"GET /v1/miners/ws HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n")
    assert b"\r\nUpgrade: websocket\r\n" in req
    assert b"\r\nX-Api-Key: k\r\n" in req
    assert req.endswith(b"\r\n\r\n")


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True


def connected(results: list[bool]) -> tuple[IdleMiner, FakeTransport]:
    miner = IdleMiner(b"REQ", b'{"type":"hello"}', results.append)
    transport = FakeTransport()
    miner.connection_made(transport)  # type: ignore[arg-type]
    assert transport.written == [b"REQ"]
    return miner, transport


OK = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"


def test_idle_miner_says_hello_after_the_upgrade_then_answers_pings() -> None:
    results: list[bool] = []
    miner, transport = connected(results)
    miner.data_received(OK[:10])
    assert transport.written == [b"REQ"]
    welcome = orjson.dumps({"type": "welcome", "session_id": "s"})
    miner.data_received(OK[10:] + server_frame(welcome)[:3])
    assert transport.written[1] == encode_frame(b'{"type":"hello"}')
    assert results == []
    miner.data_received(server_frame(welcome)[3:] + server_frame(b"p1", OP_PING))
    assert results == [True]
    assert transport.written[2] == encode_frame(b"p1", OP_PONG)
    miner.data_received(server_frame(b"", OP_CLOSE))
    assert miner.closed
    assert transport.closed
    miner.connection_lost(None)
    assert results == [True]  # reported once


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n",
        OK + server_frame(orjson.dumps({"type": "error", "code": "bad"})),
    ],
)
def test_idle_miner_reports_a_refused_handshake(reply: bytes) -> None:
    results: list[Any] = []
    miner, transport = connected(results)
    miner.data_received(reply)
    assert transport.closed
    miner.connection_lost(None)
    assert results == [False]
