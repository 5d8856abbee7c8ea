"""Event replay over real sockets: resubscribing with ``after``, "all" subscriptions, ownership."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

import anyio
import pytest

from protocol.messages import (
    Ack,
    Error,
    JobAssign,
    JobEvent,
    JobProgress,
    JobSubmit,
    Subscribe,
)
from tests.conftest import CLIENT_KEY, CLIENT_KEY_2, MINER_KEY
from tests.e2e.manual_miner import ManualMiner, client_session

if TYPE_CHECKING:
    from tests.e2e.conftest import Client, RunningServer

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.both_backends]


async def _submit(client: Client, request_id: str, prompt: str) -> str:
    await client.send(JobSubmit(id=request_id, payload={"prompt": prompt}))
    while True:
        msg = await client.recv()
        if isinstance(msg, Ack) and msg.id == request_id:
            return str(msg.fields["job"]["job_id"])


async def _progress(miner: ManualMiner, job_id: str, n: int) -> None:
    """Send one progress frame with an id and wait for its ack (the event is then durable)."""
    await miner.send(
        JobProgress(job_id=job_id, progress=n / 10, output=f"tok{n} ", attempt=1, id=f"p{n}")
    )
    ack = await miner.expect(Ack)
    assert ack.id == f"p{n}"


def _key(e: JobEvent) -> tuple[object, ...]:
    return (e.job_id, e.seq, e.event, e.state, e.at, e.attempt, e.miner_id, e.data)


async def test_resubscribe_with_after_replays_exactly_the_missed_events(
    server: RunningServer,
) -> None:
    """A client that drops after `started` and resubscribes with after=last gets seq last+1..end
    once each, then the live tail; a full replay (after 0) on a third socket agrees."""
    async with AsyncExitStack() as stack:
        miner = await stack.enter_async_context(ManualMiner(server, MINER_KEY, "replay-miner"))
        await miner.connect()
        async with client_session(server, CLIENT_KEY) as first:
            job_id = await _submit(first, "s1", "one two three")
            assign = await miner.expect(JobAssign)
            assert assign.job_id == job_id
            assert assign.attempt == 1
            miner.client.accept(job_id)
            await miner.flush()
            before = await first.events_until(job_id, "started")
        assert [e.event for e in before] == ["queued", "assigned", "started"]
        last = before[-1].seq

        for n in range(1, 4):  # committed while no client is connected
            await _progress(miner, job_id, n)

        second = await stack.enter_async_context(client_session(server, CLIENT_KEY))
        await second.send(Subscribe(id="resub", job_ids=(job_id,), after={job_id: last}))
        replayed: list[JobEvent] = []
        acked = False
        while len(replayed) < 3 or not acked:  # the ack may come before or after the replay
            msg = await second.recv()
            if isinstance(msg, JobEvent):
                replayed.append(msg)
            else:
                assert isinstance(msg, Ack)
                assert msg.id == "resub"
                assert msg.fields["missing"] == []
                acked = True
        for n in range(4, 6):  # live, on top of the replay
            await _progress(miner, job_id, n)
        rid = miner.client.result(job_id, {"output": "done"})
        await miner.flush()
        receipt_ack = await miner.expect(Ack)
        assert receipt_ack.id == rid
        assert receipt_ack.fields["receipt"]["job_id"] == job_id
        after = replayed + await second.events_until(job_id, "completed")

        third = await stack.enter_async_context(client_session(server, CLIENT_KEY))
        await third.send(Subscribe(id="full", job_ids=(job_id,), after={job_id: 0}))
        full = await third.events_until(job_id, "completed")

    assert [e.seq for e in full] == list(range(1, len(full) + 1))
    assert [e.event for e in full] == [
        "queued",
        "assigned",
        "started",
        *["progress"] * 5,
        "completed",
    ]
    assert [e.seq for e in after] == list(range(last + 1, full[-1].seq + 1))
    assert [_key(e) for e in before] == [_key(e) for e in full[:last]]
    assert [_key(e) for e in after] == [_key(e) for e in full[last:]]
    assert [e.data["output"] for e in after[:-1]] == [f"tok{n} " for n in range(1, 6)]


async def test_subscribe_all_sees_own_later_jobs_but_not_another_clients(
    server: RunningServer,
) -> None:
    """`subscribe all` delivers events of jobs the same client key submits later (on any
    socket) and nothing of another client's jobs."""
    async with AsyncExitStack() as stack:
        watcher = await stack.enter_async_context(client_session(server, CLIENT_KEY))
        submitter = await stack.enter_async_context(client_session(server, CLIENT_KEY))
        other = await stack.enter_async_context(client_session(server, CLIENT_KEY_2))
        await watcher.send(Subscribe(id="all", job_ids="all"))
        ack = await watcher.recv()
        assert isinstance(ack, Ack)
        assert ack.id == "all"

        mine_1 = await _submit(submitter, "a1", "first")
        theirs = await _submit(other, "b1", "not yours")
        mine_2 = await _submit(submitter, "a2", "second")

        seen: list[JobEvent] = []
        with anyio.fail_after(5):
            while not any(e.job_id == mine_2 for e in seen):
                msg = await watcher.recv()
                assert isinstance(msg, JobEvent), msg
                seen.append(msg)
    # Events are delivered in commit order: anything of `theirs` would precede mine_2's.
    assert [(e.job_id, e.event) for e in seen] == [(mine_1, "queued"), (mine_2, "queued")]
    assert theirs not in {e.job_id for e in seen}


async def test_subscribe_to_another_clients_job_is_not_found(server: RunningServer) -> None:
    """Subscribing to another client's job id yields error not_found and ack missing=[id]."""
    async with AsyncExitStack() as stack:
        owner = await stack.enter_async_context(client_session(server, CLIENT_KEY_2))
        snoop = await stack.enter_async_context(client_session(server, CLIENT_KEY))
        job_id = await _submit(owner, "b1", "private")
        await snoop.send(Subscribe(id="peek", job_ids=(job_id,), after={job_id: 0}))
        err = await snoop.recv()
        ack = await snoop.recv()
        await snoop.send(Subscribe(id="peek2", job_ids=(job_id,)))
        err2 = await snoop.recv()
        ack2 = await snoop.recv()
    assert isinstance(err, Error)
    assert err.code == "not_found"
    assert err.ref == job_id
    assert isinstance(ack, Ack)
    assert ack.id == "peek"
    assert ack.fields["missing"] == [job_id]
    assert isinstance(err2, Error)
    assert err2.code == "not_found"
    assert isinstance(ack2, Ack)
    assert ack2.fields["missing"] == [job_id]
