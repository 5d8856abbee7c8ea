"""A miner the test drives step by step: ``protocol.client.MinerClient`` over one real socket."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Self, TypeVar

import anyio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from protocol.client import MinerClient
from protocol.codec import encode
from protocol.messages import ServerToMiner, Welcome
from tests.e2e.conftest import Client, RunningServer, open_client

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from types import TracebackType

__all__ = ["ManualMiner", "client_session", "close_code"]

T = TypeVar("T")


class ManualMiner:
    """Connects, says hello (optionally resuming), and sends or awaits one frame at a time."""

    def __init__(
        self, server: RunningServer, key: str, miner_id: str, *, concurrency: int = 1
    ) -> None:
        self.server = server
        self.key = key
        self.client = MinerClient(
            capabilities={"gpus": [{"name": "A100", "memory_mb": 40960}], "models": ["llama3"]},
            miner_id=miner_id,
            concurrency=concurrency,
        )
        self.ws: ClientConnection | None = None

    async def connect(self, *, resume: bool = True) -> Welcome:
        """Open a new socket and complete the hello; returns the welcome."""
        self.ws = await connect(
            self.server.url("/v1/miners/ws"),
            additional_headers={"X-Api-Key": self.key},
            compression=None,
            open_timeout=5,
        )
        self.client.hello(resume=resume)
        await self.flush()
        return await self.expect(Welcome)

    async def flush(self) -> None:
        assert self.ws is not None
        for frame in self.client.data_to_send():
            await self.ws.send(frame.decode())

    async def send(self, msg: object) -> None:
        """Send a message as is (bypassing MinerClient's bookkeeping, e.g. a stale result)."""
        assert self.ws is not None
        await self.ws.send(encode(msg).decode())

    async def recv(self, within: float = 5.0) -> ServerToMiner:
        assert self.ws is not None
        with anyio.fail_after(within):
            raw = await self.ws.recv()
        self.client.receive_data(raw)
        (msg,) = self.client.events_received()
        return msg

    async def expect(self, cls: type[T], within: float = 5.0) -> T:
        msg = await self.recv(within)
        assert isinstance(msg, cls), msg
        return msg

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.drop()

    async def drop(self) -> None:
        """Close the socket from the miner side (the server sees the session end)."""
        if self.ws is not None:
            ws, self.ws = self.ws, None
            await ws.close()

    async def close_code(self, within: float = 5.0) -> int | None:
        assert self.ws is not None
        return await close_code(self.ws, within)


async def close_code(ws: ClientConnection, within: float = 5.0) -> int | None:
    """Read until the server closes the socket; return the close code it sent."""
    with anyio.fail_after(within):
        try:
            while True:
                await ws.recv()
        except ConnectionClosed as exc:
            return None if exc.rcvd is None else exc.rcvd.code


@asynccontextmanager
async def client_session(server: RunningServer, key: str) -> AsyncIterator[Client]:
    """``open_client`` whose socket is always closed at the end."""
    client, cm = await open_client(server, key)
    try:
        yield client
    finally:
        await cm.__aexit__(None, None, None)
