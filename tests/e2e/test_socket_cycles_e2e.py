"""A closed socket's objects are freed as it closes, by reference counting, not by the collector.

Before, every closed miner or client socket left about 45 tracked objects in reference cycles
(the protocol's scope held its own methods; a connection's outbox held the connection's
``close``), so 10,000 sockets that went away stayed in memory until the collector's oldest
generation ran, and that pass took 0.7 s.
"""

from __future__ import annotations

import gc
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
import httpx
import pytest
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from examples.ws_miner import MinerOptions, SimulatedMiner
from protocol.messages import Ack, JobSubmit
from tests.conftest import CLIENT_KEY, MINER_KEY
from tests.e2e.conftest import RunningServer, open_client
from web.connection import Connection
from web.http_protocol import CoalescingHttpProtocol
from web.transport import CoalescingTransport, CoalescingWSProtocol

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

OURS = (Connection, CoalescingWSProtocol, CoalescingTransport)
HTTP = (CoalescingHttpProtocol, RequestResponseCycle, CoalescingTransport)


def of_kinds(o: object, kinds: tuple[type, ...]) -> bool:
    """``isinstance`` by the object's own type: ``isinstance`` asks a weak proxy for its
    referent's class, which raises ReferenceError once the referent is gone (a library's dead
    proxy among ``gc.get_objects()``)."""
    return issubclass(type(o), kinds)


def cyclic_garbage() -> Iterator[object]:
    """Objects only the collector could free (it runs with DEBUG_SAVEALL to keep them)."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        yield from gc.garbage
    finally:
        gc.garbage.clear()
        gc.set_debug(0)


@asynccontextmanager
async def no_cycles_left(kinds: tuple[type, ...]) -> AsyncIterator[None]:
    """Run the block with the collector off, then check that no object of ``kinds`` it made
    is left in a reference cycle (once the server's tasks have returned)."""
    list(cyclic_garbage())  # what earlier tests left
    # Held until the end: objects of earlier tests that only become garbage during this one
    # (their harness lets go of them late) stay out of the count.
    earlier = [o for o in gc.get_objects() if of_kinds(o, kinds)]
    gc.disable()
    try:
        yield
        for _ in range(20):  # the server's tasks return, then their done callbacks run
            await anyio.lowlevel.checkpoint()
        left = [type(o).__name__ for o in cyclic_garbage() if of_kinds(o, kinds)]
        assert left == []
        del earlier
    finally:
        gc.enable()


async def test_closed_miner_and_client_sockets_leave_no_reference_cycles(
    server: RunningServer,
) -> None:
    """A miner and a client that ran a job and disconnected: none of the server's connection,
    protocol or transport objects is left in a reference cycle."""
    async with no_cycles_left(OURS):
        miner = SimulatedMiner(
            MinerOptions(url=server.url("/v1/miners/ws"), key=MINER_KEY, miner_id="gpu-c"),
            log=lambda line: None,
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(miner.run)
            with anyio.fail_after(5):
                await miner.welcomed.wait()
            client, cm = await open_client(server)
            try:
                await client.send(JobSubmit(id="s1", payload={"prompt": "p"}))
                ack = await client.recv()
                assert isinstance(ack, Ack)
                await client.events_until(ack.fields["job"]["job_id"], "completed")
            finally:
                await cm.__aexit__(None, None, None)
            tg.cancel_scope.cancel()
        with anyio.fail_after(5):
            while server.core.connections:  # noqa: ASYNC110 - bounded poll (style §4.7)
                await anyio.sleep(0.001)


async def test_closed_http_connections_leave_no_reference_cycles(server: RunningServer) -> None:
    """A REST miner's connections (register, a poll that takes a job, its result, a poll that
    waits in vain) and a client's: once closed, none of the server's protocol, request cycle
    or transport objects is left in a reference cycle. The protocol held its last request's
    cycle, which holds the protocol: each closed connection stayed until the collector's
    oldest generation ran (rarely, with the server's thresholds; web/gctune.py)."""
    base = f"http://127.0.0.1:{server.port}"
    miner = {"X-Api-Key": MINER_KEY, "X-Miner-ID": "rest-c"}
    async with no_cycles_left(HTTP):
        for _ in range(3):
            async with httpx.AsyncClient(base_url=base) as http:
                r = await http.post("/v1/miners/register", json={"capabilities": {}}, headers=miner)
                assert r.status_code == 200, r.text
                r = await http.post(
                    "/v1/jobs", json={"payload": {}}, headers={"X-Api-Key": CLIENT_KEY}
                )
                assert r.status_code == 201, r.text
                r = await http.post("/v1/miners/poll", json={"max_wait_seconds": 1}, headers=miner)
                assert r.status_code == 200, r.text
                path = f"/v1/miners/{r.json()['job_id']}/result"
                r = await http.post(path, json={"result": {}}, headers=miner)
                assert r.status_code == 200, r.text
                r = await http.post("/v1/miners/poll", json={"max_wait_seconds": 1}, headers=miner)
                assert r.status_code == 204, r.text
        with anyio.fail_after(5):
            while server.core.dispatcher.scheduler.miners["rest-c"].polls:  # noqa: ASYNC110 - bounded poll (style §4.7)
                await anyio.sleep(0.001)
