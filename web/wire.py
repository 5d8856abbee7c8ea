"""WebSocket bytes on the wire, parsed and built without websockets' objects (RFC 6455).

``web/transport.py`` uses these for the common case only: a plain upgrade request, plain
inbound frames, outbound text frame headers; anything else goes through websockets. Each is
tested byte for byte against the library (tests/web/test_transport.py, test_lean_frames.py).
"""

from __future__ import annotations

import binascii
import re
from base64 import b64decode

from websockets.utils import accept_key

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask

__all__ = [
    "PING",
    "PING_HEAD_4",
    "PONG",
    "RESPONSE_101",
    "TEXT",
    "frame_need",
    "plain_frames",
    "plain_upgrade",
    "pong_frame",
    "text_frame_head",
]

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
# A request head as HTTP/1.1 spells it (RFC 9110 tokens for names, visible characters, spaces
# and tabs for values, no obsolete line folding), so that one that ``httptools`` or websockets
# would refuse is never accepted here: the request line, then the header lines.
_HEAD = re.compile(
    rb"GET (/[\x21-\x7e]*) HTTP/1\.1((?:\r\n[-!#$%&'*+.^_`|~0-9A-Za-z]+:[\t\x20-\x7e]*)*)\r\n\r\n"
)
RESPONSE_101 = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: "
)


def plain_upgrade(data: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], str] | None:
    """``(target, headers, Sec-WebSocket-Accept)`` of a plain, valid upgrade request, else None.

    ``headers`` are as ASGI wants them: names lower-cased, values stripped. ``None`` sends the
    request through ``httptools`` and the websockets library: anything unusual (another
    method or version, several keys, a subprotocol or extension offer, an ``Origin``, an
    oversized or malformed head, a bad key, bytes after the head) is left to their checks
    and error responses.
    """
    if len(data) > _MAX_HEAD:
        return None
    head = _HEAD.fullmatch(data)
    if head is None:
        return None
    target, lines = head.group(1), head.group(2).split(b"\r\n")
    if len(lines) > _MAX_HEADERS + 1:  # the first is empty
        return None
    headers: list[tuple[bytes, bytes]] = []
    seen: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        value = value.strip(b" \t")
        name = name.lower()
        headers.append((name, value))
        if name in _CHECKED_HEADERS:
            seen.setdefault(name, []).append(value)
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


TEXT, PING, PONG = 0x81, 0x89, 0x8A  # first bytes of final frames without RSV bits
PING_HEAD_4 = b"\x89\x04"  # the header of an unmasked ping with a 4-byte payload


def pong_frame(payload: bytes) -> bytes:
    """The unmasked pong answering a ping's ``payload`` (at most 125 bytes, RFC 6455 5.5)."""
    return bytes((PONG, len(payload))) + payload


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
        if buf[pos + 1] < 0x80 or (head != TEXT and (head not in (PING, PONG) or length > 125)):
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


def frame_need(buf: bytes | bytearray) -> int:
    """The bytes the masked frame at the start of ``buf`` needs in all (header first).

    A frame that arrives in many reads is parsed once it is whole, not re-parsed at every
    read: with the buffer re-joined each time, a frame fed a byte at a time would cost
    quadratic time.
    """
    if len(buf) < 2:
        return 2
    length = buf[1] & 0x7F
    head = 2 + (2 if length == 126 else 8 if length == 127 else 0) + 4  # + the mask
    if len(buf) < head:
        return head
    if length >= 126:
        length = int.from_bytes(buf[2 : head - 4], "big")
    return head + length
