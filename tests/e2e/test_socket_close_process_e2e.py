"""Closes decided while handling a frame in the protocol's callback, in a real server process.

A frame that reaches a waiting reader is handled straight from the socket's ``data_received``,
outside any task. In the served process (uvloop, no test harness context around it) a close
decided there could not start the task that writes the close frame: the TCP connection was
dropped with no close frame (1006), the connection's task waited for ever and the miner stayed
in the scheduler, taking jobs it would never accept. In-process servers do not show it (the
test's context lets anyio find its event loop even in callbacks), so these tests start
``aitbc-coordinator serve``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import httpx
import orjson
import pytest
from websockets.asyncio.client import connect

from protocol.codec import decode_server_to_miner
from protocol.messages import Ack, Welcome
from tests.conftest import ADMIN_KEY, MINER_KEY
from tests.e2e.manual_miner import close_code
from tests.e2e.processes import CoordinatorProcess

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

HELLO = orjson.dumps({"type": "hello", "protocol": 1, "capabilities": {}, "miner_id": "m-idle"})


@pytest.fixture
async def process(tmp_path: Path) -> AsyncIterator[CoordinatorProcess]:
    with (tmp_path / "coordinator.log").open("a") as log:
        server = CoordinatorProcess(f"sqlite:///{tmp_path / 'c.db'}", log)
        try:
            await server.start()
            yield server
        finally:
            await server.stop_now()
    text = (tmp_path / "coordinator.log").read_text()
    assert "Traceback" not in text, text[-3000:]


async def _ops(server: CoordinatorProcess) -> dict[str, Any]:
    async with httpx.AsyncClient(trust_env=False, timeout=5.0) as http:
        r = await http.get(
            f"http://127.0.0.1:{server.port}/v1/admin/ops", headers={"X-Api-Key": ADMIN_KEY}
        )
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json at all", 1007),
        ('{"type": "job.accept"}', 1007),  # breaks its type's schema
        ('{"type": "heartbeat", "note": "\\u0000"}', 1007),  # NUL
        (HELLO.decode(), 4000),  # a second hello
    ],
    ids=["json", "schema", "nul", "hello"],
)
async def test_a_close_decided_on_an_idle_socket_sends_its_code_and_forgets_the_miner(
    process: CoordinatorProcess, frame: str, code: int
) -> None:
    url = process.url("/v1/miners/ws")
    headers = {"X-Api-Key": MINER_KEY}
    async with connect(url, additional_headers=headers, compression=None) as ws:
        await ws.send(HELLO.decode())
        with anyio.fail_after(5):
            assert isinstance(decode_server_to_miner(await ws.recv()), Welcome)
            await ws.send('{"type": "heartbeat", "id": "hb"}')
            assert isinstance(decode_server_to_miner(await ws.recv()), Ack)  # idle from here
        await ws.send(frame)
        assert await close_code(ws) == code
    with anyio.fail_after(10):
        while (await _ops(process))["counters"]["sockets"]["miner"]:  # noqa: ASYNC110 - over HTTP
            await anyio.sleep(0.02)
