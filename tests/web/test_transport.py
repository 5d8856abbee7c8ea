"""Ring 2: the coalescing WebSocket protocol (web/transport.py), driven without a socket."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState
from websockets.frames import Frame, Opcode

from web.transport import SEND_NOW, CoalescingWSProtocol

pytestmark = pytest.mark.anyio

HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


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
