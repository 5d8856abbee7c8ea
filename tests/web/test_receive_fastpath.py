"""Ring 2: the receive fast path (web/transport.py ``ON_TEXT``, web/connection.py ``_on_text``).

A real ``CoalescingWSProtocol`` on a fake transport serves a small ``Connection`` whose
``handle_now`` declines messages whose id starts with ``slow`` until the test opens a gate.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.websockets import WebSocket
from websockets.frames import Frame, Opcode

from protocol.codec import encode
from protocol.messages import Heartbeat, Hello
from protocol.session import MinerSession
from tests.web.test_transport import HANDSHAKE, FakeTransport, _frames, _load
from web.auth import Principal, Role
from web.connection import Connection

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class PausingTransport(FakeTransport):
    def __init__(self) -> None:
        super().__init__()
        self.paused = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class Recording(Connection):
    role = Role.MINER

    def __init__(self, core: Any, websocket: WebSocket) -> None:
        super().__init__(core, websocket)
        self.log: list[tuple[str, str | None]] = []
        self.gate = asyncio.Event()
        self.seen: dict[str | None, asyncio.Event] = {}

    def make_session(self, *, authenticated: bool) -> MinerSession:
        return MinerSession(authenticated=authenticated)

    def _saw(self, msg_id: str | None) -> None:
        self.seen.setdefault(msg_id, asyncio.Event()).set()

    def handle_now(self, msg: Any, session: Any) -> bool:
        self.log.append(("now", msg.id))
        if msg.id is not None and msg.id.startswith("slow"):
            return False
        self.reply(msg.id)
        self._saw(msg.id)
        return True

    async def handle(self, msg: Any, session: Any) -> None:
        self.log.append(("later", msg.id))
        self._saw(f"later {msg.id}")
        await self.gate.wait()
        self.reply(msg.id)
        self._saw(msg.id)

    def on_closed(self) -> None:
        self._saw("closed")

    async def saw(self, msg_id: str | None) -> None:
        await self.seen.setdefault(msg_id, asyncio.Event()).wait()


def frame(msg: object) -> bytes:
    return Frame(Opcode.TEXT, encode(msg)).serialize(mask=True)


def hb(msg_id: str) -> bytes:
    return frame(Heartbeat(id=msg_id))


async def _open() -> tuple[Any, PausingTransport, Recording]:
    core = SimpleNamespace(
        auth=SimpleNamespace(
            token_from_headers=lambda headers: headers.get("x-api-key"),
            from_token=lambda token: Principal(role=Role.MINER, key_hash="k" * 64),
        ),
        connections=set(),
        dispatcher=SimpleNamespace(performed=0),
        settings=SimpleNamespace(max_frame_bytes=1 << 20),
        standby=False,
        stopping=False,
        sockets={"miner": 0, "client": 0, "admin": 0},
    )
    made: list[Recording] = []
    started = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        made.append(Recording(core, WebSocket(scope, receive, send)))
        started.set()
        await made[0].run()

    proto = _load(app)
    transport = PausingTransport()
    proto.connection_made(transport)
    proto.data_received(HANDSHAKE.replace(b"\r\n\r\n", b"\r\nx-api-key: k\r\n\r\n"))
    proto.data_received(frame(Hello(protocol=1, miner_id="m", capabilities={}, id="hello")))
    await started.wait()
    conn = made[0]
    await conn.saw("hello")  # the reader now waits, idle, in its steady state
    return proto, transport, conn


async def _acks(transport: FakeTransport) -> list[str]:
    await asyncio.sleep(0)  # the coalescing transport writes at the end of the tick
    out = b"".join(transport.writes)
    return [f.decode() for f in _frames(out) if f.startswith(b"{")]


def _ids(acks: list[str]) -> list[str]:
    return [a.split('"id":"')[1].split('"')[0] for a in acks]


async def test_frames_are_handled_synchronously_in_the_steady_state() -> None:
    proto, transport, conn = await _open()
    proto.data_received(hb("a") + hb("b"))
    # Handled inside data_received: nothing queued, reading never paused.
    assert conn.log[-2:] == [("now", "a"), ("now", "b")]
    assert proto.queue.empty()
    assert not transport.paused
    assert _ids(await _acks(transport)) == ["hello", "a", "b"]


async def test_order_is_kept_across_a_handler_that_must_await() -> None:
    proto, transport, conn = await _open()
    proto.data_received(hb("a") + hb("slow1") + hb("b"))
    proto.data_received(hb("c"))
    await conn.saw("later slow1")
    # "b" and "c" wait behind "slow1" in the reader's queue, and reading is paused.
    assert conn.log[1:] == [("now", "a"), ("now", "slow1"), ("later", "slow1")]
    assert transport.paused
    assert _ids(await _acks(transport)) == ["hello", "a"]
    conn.gate.set()
    await conn.saw("c")
    assert conn.log[4:] == [("now", "b"), ("now", "c")]
    assert _ids(await _acks(transport)) == ["hello", "a", "slow1", "b", "c"]
    assert not transport.paused
    # Caught up: the next frame is handled synchronously again.
    proto.data_received(hb("d"))
    assert conn.log[-1] == ("now", "d")


async def test_a_disconnect_mid_stream_ends_after_the_frames_before_it() -> None:
    proto, _, conn = await _open()
    proto.data_received(hb("slow1") + hb("b"))
    proto.connection_lost(None)
    conn.gate.set()
    await conn.saw("closed")
    assert conn.log[1:] == [("now", "slow1"), ("later", "slow1"), ("now", "b")]
    assert proto._on_text is None  # the connection let go of the protocol


async def test_a_close_frame_and_binary_frames_take_the_queued_path() -> None:
    proto, transport, conn = await _open()
    proto.data_received(Frame(Opcode.BINARY, b"\x00").serialize(mask=True))
    await conn.saw("closed")
    out = b"".join(transport.writes)
    assert b"\x88!\x03\xebbinary frames are not supported" in out  # close 1003
    assert conn.log == [("now", "hello")]


async def test_a_flood_the_peer_does_not_read_ends_in_4429_and_paused_reading() -> None:
    Recording.outbox_limits = {"soft_limit": 2, "hard_limit": 4}
    try:
        proto, transport, conn = await _open()
    finally:
        del Recording.outbox_limits
    proto.pause_writing()  # the peer reads nothing: the transport's buffer is full
    proto.data_received(b"".join(hb(f"f{i}") for i in range(10)))
    # Handled synchronously until the outbox overflowed; the rest waits, unread, in the queue.
    assert [msg_id for _, msg_id in conn.log[1:]] == ["f0", "f1", "f2", "f3", "f4"]
    assert conn._close is not None
    assert conn._close[0] == 4429
    assert transport.paused
    proto.resume_writing()
    await conn.saw("closed")
    out = b"".join(transport.writes)
    assert b"\x11\x4doutbound queue overflow" in out  # the close frame, 4429
    assert _ids([f.decode() for f in _frames(out) if f.startswith(b"{")]) == [
        "hello",
        "f0",
        "f1",
        "f2",
        "f3",
    ]


async def test_a_peer_that_reads_nothing_is_closed_once_its_outbox_holds_too_many_characters() -> (
    None
):
    """A socket's outbox counted frames only (4096), and frames can be megabytes: a client
    that read nothing had gigabytes held for it (4096 acks of 1 MiB jobs, say). Past 64 Mi
    characters (or 16 of the largest frames) it is now closed 4429 as on any overflow."""
    proto, _, conn = await _open()
    proto.pause_writing()  # the peer reads nothing
    big = "x" * (1 << 20)
    for _ in range(100):
        conn.send_frame(big)
        if conn._close is not None:
            break
    assert conn._close == (4429, "outbound queue overflow")
    assert len(conn.outbox) < 100
    proto.resume_writing()
    await conn.saw("closed")
