"""A closed socket's objects are freed as it closes, by reference counting, not by the collector.

Before, every closed miner or client socket left about 45 tracked objects in reference cycles
(the protocol's scope held its own methods; a connection's outbox held the connection's
``close``), so 10,000 sockets that went away stayed in memory until the collector's oldest
generation ran, and that pass took 0.7 s.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
import pytest

from examples.ws_miner import MinerOptions, SimulatedMiner
from protocol.messages import Ack, JobSubmit
from tests.conftest import MINER_KEY
from tests.e2e.conftest import RunningServer, open_client
from web.connection import Connection
from web.transport import CoalescingTransport, CoalescingWSProtocol

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

OURS = (Connection, CoalescingWSProtocol, CoalescingTransport)


def cyclic_garbage() -> Iterator[object]:
    """Objects only the collector could free (it runs with DEBUG_SAVEALL to keep them)."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        yield from gc.garbage
    finally:
        gc.garbage.clear()
        gc.set_debug(0)


async def test_closed_miner_and_client_sockets_leave_no_reference_cycles(
    server: RunningServer,
) -> None:
    """A miner and a client that ran a job and disconnected: none of the server's connection,
    protocol or transport objects is left in a reference cycle."""
    list(cyclic_garbage())  # what earlier tests left
    # Held until the end: objects of earlier tests that only become garbage during this one
    # (their harness lets go of them late) stay out of the count.
    earlier = [o for o in gc.get_objects() if isinstance(o, OURS)]
    gc.disable()
    try:
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
        for _ in range(20):  # the app's tasks return, then their done callbacks run
            await anyio.lowlevel.checkpoint()
        left = [type(o).__name__ for o in cyclic_garbage() if isinstance(o, OURS)]
        assert left == []
        del earlier
    finally:
        gc.enable()
