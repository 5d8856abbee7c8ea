"""The example client and miner (examples/) against real servers: a job followed to its
verified receipt, trying a standby first, and a resubmission answered from the store."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

import examples.ws_client
from examples.connection import Refused
from examples.ws_client import follow_job
from examples.ws_miner import MinerOptions, SimulatedMiner
from protocol.messages import Ack, JobAssign, JobEvent, JobSubmit
from protocol.receipts import verify_receipt
from protocol.types import CloseCode
from tests.conftest import CLIENT_KEY, MINER_KEY
from tests.e2e.conftest import RunningServer, start_server
from tests.e2e.manual_miner import ManualMiner
from web.ws_client import ClientConnection

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


async def test_the_examples_pass_over_a_standby_and_a_resubmit_replays_the_stored_job(
    server: RunningServer,
) -> None:
    miner_logs: list[str] = []
    client_lines: list[str] = []
    submit = JobSubmit(id="submit", payload={"prompt": "hi"}, idempotency_key="example-1")
    async with anyio.create_task_group() as tg:
        # A standby on the same database: it refuses everything while ``server`` holds it.
        standby, standby_uv = await start_server(server.settings.with_(standby=True), tg)
        miner = SimulatedMiner(
            MinerOptions(
                url=standby.url("/v1/miners/ws"),
                standby_urls=[server.url("/v1/miners/ws")],
                key=MINER_KEY,
                delay=0.01,
                chunks=2,
                load_interval=0,
            ),
            log=miner_logs.append,
        )
        tg.start_soon(miner.run)
        urls = [standby.url("/v1/jobs/ws"), server.url("/v1/jobs/ws")]
        with anyio.fail_after(20):
            events = await follow_job(
                urls, CLIENT_KEY, submit, out=client_lines.append, retry_after=0.01
            )
            again = await follow_job(
                server.url("/v1/jobs/ws"), CLIENT_KEY, submit, out=client_lines.append
            )
        standby_uv.should_exit = True
        tg.cancel_scope.cancel()

    kinds = [e.event for e in events]
    assert kinds[0] == "queued"
    assert kinds[-1] == "completed"
    assert verify_receipt(events[-1].data["receipt"]) == []
    seqs = [e.seq for e in events]
    assert seqs == sorted(set(seqs))
    # Both tried the standby first and were turned away (1001), then found the coordinator.
    assert any(f"connection to {urls[0]} lost" in line for line in client_lines)
    assert any(standby.url("/v1/miners/ws") in line and "1001" in line for line in miner_logs)
    # The same idempotency key again: the stored job, its whole history replayed, not a rerun.
    assert len({line for line in client_lines if line.startswith("submitted ")}) == 1
    assert [e.seq for e in again] == list(range(1, again[-1].seq + 1))
    replayed = {(e.seq, e.event) for e in again}
    assert {(e.seq, e.event) for e in events} <= replayed
    assert again[-1].data["receipt"] == events[-1].data["receipt"]


async def test_the_examples_take_frames_over_the_frame_limit_that_carry_a_receipt(
    server: RunningServer,
) -> None:
    """A receipt holds the job's payload and result: the ack of a result and the completed
    event (the result once more) are larger than frames the coordinator takes. With their
    library's default limit (1 MiB, as the coordinator's) the examples were closed 1009 by
    their own side at each of them, and looped for ever: the miner resent its result after each
    resume and got the same ack, the client re-subscribed and got the same event replayed."""
    limit = server.settings.max_frame_bytes
    prompt = "word " * (limit // 2 // 5)  # half the limit; the miner's result is as long
    miner = SimulatedMiner(
        MinerOptions(
            url=server.url("/v1/miners/ws"),
            key=MINER_KEY,
            delay=0.01,
            chunks=1,
            load_interval=0,
            max_jobs=1,  # its run ends with the first receipt
        ),
        log=lambda line: None,
    )
    lines: list[str] = []
    submit = JobSubmit(id="submit", payload={"prompt": prompt})
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(miner.run)
            events = await follow_job(
                server.url("/v1/jobs/ws"), CLIENT_KEY, submit, out=lines.append
            )
    assert not [line for line in lines if "lost" in line]
    receipt = events[-1].data["receipt"]
    assert events[-1].event == "completed"
    assert len(orjson.dumps(events[-1].data)) > limit
    assert miner.receipts == {events[-1].job_id: receipt}
    assert verify_receipt(receipt) == []


@pytest.mark.parametrize(
    ("path", "key", "why"),
    [
        ("/v1/jobs/ws", "no-such-key", "closed 4401"),  # a typo in --key
        ("/v1/miners/ws", CLIENT_KEY, "closed 4403"),  # the miners' URL with a client key
        ("/", CLIENT_KEY, "HTTP 404"),  # the address without the socket's path
    ],
)
async def test_the_example_client_stops_with_one_line_on_a_refusal_a_retry_cannot_change(
    server: RunningServer, path: str, key: str, why: str
) -> None:
    """It reconnected for ever, every half second, printing the exception's repr each time
    (or, on an HTTP answer to the upgrade, died with a traceback)."""
    lines: list[str] = []
    submit = JobSubmit(id="submit", payload={"prompt": "hi"})
    with anyio.fail_after(10), pytest.raises(Refused) as refused:
        await follow_job(server.url(path), key, submit, out=lines.append, retry_after=0.01)
    assert lines == []
    assert str(refused.value).startswith(f"{server.url(path)} refused: {why}")


async def test_the_example_miner_stops_when_refused_and_when_replaced(
    server: RunningServer,
) -> None:
    """A miner with a wrong key reconnected for ever; two miners started with the same
    ``--miner-id`` replaced each other (4409) for ever, each resume taking the other's jobs."""

    def miner(key: str, logs: list[str]) -> SimulatedMiner:
        opts = MinerOptions(
            url=server.url("/v1/miners/ws"), key=key, miner_id="rig-1", load_interval=0
        )
        return SimulatedMiner(opts, log=logs.append)

    wrong: list[str] = []
    with anyio.fail_after(10):
        await miner("no-such-key", wrong).run()
    assert wrong == [
        f"{server.url('/v1/miners/ws')} refused: closed 4401 (unknown credential): "
        "the key is not known to the coordinator: check --key"
    ]

    first, second = miner(MINER_KEY, []), miner(MINER_KEY, [])
    first_stopped = anyio.Event()

    async def run_first() -> None:
        await first.run()
        first_stopped.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_first)
            await first.welcomed.wait()
            tg.start_soon(second.run)
            await first_stopped.wait()
            await second.welcomed.wait()
            tg.cancel_scope.cancel()
    assert "closed 4409" in str(first.refused)
    assert second.refused is None


async def test_the_example_client_shows_each_event_once_when_its_job_ends_while_it_is_away(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client's socket drops after ``started``; the job streams and completes before it is
    back: the re-subscribe with ``after`` brings exactly the events it missed, each once."""
    lines: list[str] = []
    started, ended = anyio.Event(), anyio.Event()
    connects = 0

    def out(line: str) -> None:
        lines.append(line)
        if " started " in line:
            started.set()

    class Gated:
        """``connect``, whose second connection waits until the job has ended."""

        def __init__(self, url: str, **kwargs: Any) -> None:
            self.real = connect(url, **kwargs)

        async def __aenter__(self) -> Any:
            nonlocal connects
            connects += 1
            if connects > 1:
                await ended.wait()
            return await self.real.__aenter__()

        async def __aexit__(self, *exc: Any) -> Any:
            return await self.real.__aexit__(*exc)

    monkeypatch.setattr(examples.ws_client, "connect", Gated)
    submit = JobSubmit(id="submit", payload={"prompt": "hi"}, idempotency_key="away-1")
    events: list[JobEvent] = []

    async def follow() -> None:
        events.extend(await follow_job(server.url("/v1/jobs/ws"), CLIENT_KEY, submit, out=out))

    async with (
        ManualMiner(server, MINER_KEY, "away-miner") as miner,
        anyio.create_task_group() as tg,
    ):
        await miner.connect()
        tg.start_soon(follow)
        with anyio.fail_after(10):
            assign = await miner.expect(JobAssign)
            miner.client.accept(assign.job_id)
            await miner.flush()
            await started.wait()
            (conn,) = [c for c in server.core.connections if isinstance(c, ClientConnection)]
            conn.close(CloseCode.GOING_AWAY, "server shutting down")
            for n in range(3):
                miner.client.progress(assign.job_id, output=f"tok{n} ")
            miner.client.result(assign.job_id, {"output": "done"})
            await miner.flush()
            assert isinstance(await miner.expect(Ack), Ack)  # the result is committed
            ended.set()
    assert [(e.seq, e.event) for e in events] == [
        (1, "queued"),
        (2, "assigned"),
        (3, "started"),
        (4, "progress"),
        (5, "progress"),
        (6, "progress"),
        (7, "completed"),
    ]
    assert connects == 2
    assert any("lost (closed 1001 (server shutting down))" in line for line in lines)


@asynccontextmanager
async def silent_server() -> AsyncIterator[tuple[str, list[str]]]:
    """A WebSocket server on 127.0.0.1:0 that takes every socket, reads its frames and answers
    its pings (the library does), but never sends a frame: yields its address and the frames
    read."""
    frames: list[str] = []

    async def handler(ws: ServerConnection) -> None:
        async for frame in ws:
            frames.append(str(frame))

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}", frames


async def test_the_example_client_stops_when_no_welcome_comes() -> None:
    """A server that takes the socket and answers pings but never sends ``welcome`` (not the
    coordinator, or one that cannot serve) kept the client waiting for ever, saying nothing."""
    lines: list[str] = []
    submit = JobSubmit(id="submit", payload={"prompt": "hi"})
    async with silent_server() as (address, frames):
        url = f"{address}/v1/jobs/ws"
        with anyio.fail_after(10), pytest.raises(Refused) as refused:
            await follow_job(url, CLIENT_KEY, submit, out=lines.append, welcome_timeout=0.2)
    assert str(refused.value) == (
        f"{url} sent no welcome within 0.2 s of the hello: "
        "is it the coordinator's client socket (…/v1/jobs/ws)?"
    )
    assert lines == []
    assert orjson.loads(frames[0])["type"] == "hello"


async def test_the_example_miner_stops_when_no_welcome_comes() -> None:
    """The miner, as the client: it sat connected for ever to a server that never welcomed it."""
    lines: list[str] = []
    async with silent_server() as (address, frames):
        url = f"{address}/v1/miners/ws"
        opts = MinerOptions(url=url, key=MINER_KEY, load_interval=0, welcome_timeout=0.2)
        miner = SimulatedMiner(opts, log=lines.append)
        with anyio.fail_after(10):
            await miner.run()
    assert lines == [
        f"{url} sent no welcome within 0.2 s of the hello: "
        "is it the coordinator's miner socket (…/v1/miners/ws)?"
    ]
    assert str(miner.refused) == lines[0]
    assert orjson.loads(frames[0])["type"] == "hello"


async def test_the_welcome_timeout_ends_with_the_welcome(server: RunningServer) -> None:
    """The welcome timeout guards the welcome only: once welcomed, a job that runs longer than
    it is followed to its end (the miner here takes 5 timeouts to finish it)."""
    miner = SimulatedMiner(
        MinerOptions(
            url=server.url("/v1/miners/ws"),
            key=MINER_KEY,
            delay=0.5,
            chunks=2,
            load_interval=0,
            max_jobs=1,
            welcome_timeout=0.1,
        ),
        log=lambda line: None,
    )
    submit = JobSubmit(id="submit", payload={"prompt": "hi"})
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(miner.run)
            events = await follow_job(
                server.url("/v1/jobs/ws"),
                CLIENT_KEY,
                submit,
                out=lambda line: None,
                welcome_timeout=0.1,
            )
    assert events[-1].event == "completed"
    assert miner.refused is None
