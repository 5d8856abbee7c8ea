"""A shutdown (SIGTERM, SIGINT) closes every socket with 1001, "going away" (docs/protocol.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import pytest
from websockets.asyncio.client import connect

from tests.conftest import ADMIN_KEY, CLIENT_KEY, MINER_KEY
from tests.e2e.conftest import start_server
from tests.e2e.manual_miner import close_code

if TYPE_CHECKING:
    from web.settings import Settings

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


async def test_a_shutdown_closes_every_socket_with_1001(settings: Settings) -> None:
    """Miner, client and ops sockets (and one still waiting for its auth frame) get 1001 from a
    shutdown, as the spec says. ``CoordinatorServer.shutdown`` only asked the connections to
    close, and uvicorn's own shutdown, which came right after, sent 1012 first."""
    async with anyio.create_task_group() as tg:
        running, uv = await start_server(settings, tg)
        async with (
            connect(
                running.url("/v1/miners/ws"), additional_headers={"X-Api-Key": MINER_KEY}
            ) as miner,
            connect(
                running.url("/v1/jobs/ws"), additional_headers={"X-Api-Key": CLIENT_KEY}
            ) as client,
            connect(
                running.url("/v1/admin/ws"), additional_headers={"X-Api-Key": ADMIN_KEY}
            ) as ops,
            connect(running.url("/v1/admin/ws")) as unauthenticated,
        ):
            await miner.send('{"type": "hello", "protocol": 1, "capabilities": {}}')
            await client.send('{"type": "hello", "protocol": 1}')
            with anyio.fail_after(5):
                for ws in (miner, client, ops):
                    await ws.recv()
            uv.should_exit = True
            codes = [await close_code(ws) for ws in (miner, client, ops, unauthenticated)]
        assert codes == [1001, 1001, 1001, 1001]
        with anyio.fail_after(15):
            await running.stopped.wait()
