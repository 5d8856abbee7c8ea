"""Miner session resume, reassignment after the grace, and replacement, over real sockets."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

import anyio
import pytest

from protocol.messages import (
    Ack,
    Error,
    Heartbeat,
    JobAssign,
    JobCancel,
    JobCancelRequest,
    JobResult,
    JobSubmit,
)
from tests.conftest import CLIENT_KEY, MINER_KEY, MINER_KEY_2, make_settings
from tests.e2e.conftest import Client, RunningServer, start_server
from tests.e2e.manual_miner import ManualMiner, client_session

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.both_backends]

SHORT_GRACE = 0.3


@pytest.fixture
async def short_grace_server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    async with anyio.create_task_group() as tg:
        running, uv = await start_server(
            make_settings(tmp_path, resume_grace_seconds=SHORT_GRACE), tg
        )
        yield running
        uv.should_exit = True


async def _submit(client: Client, prompt: str) -> str:
    await client.send(JobSubmit(id="submit", payload={"prompt": prompt}))
    ack = await client.recv()
    assert isinstance(ack, Ack)
    assert ack.id == "submit"
    return str(ack.fields["job"]["job_id"])


async def _start_job(miner: ManualMiner, client: Client, job_id: str) -> None:
    """The miner takes the pushed job and accepts it; the client sees it started."""
    assign = await miner.expect(JobAssign)
    assert assign.job_id == job_id
    assert assign.attempt == 1
    miner.client.accept(job_id)
    await miner.flush()
    await client.events_until(job_id, "started")


async def _wait_disconnected(server: RunningServer, miner_id: str) -> None:
    """Poll until the scheduler saw the miner's socket end (it is then in its resume grace)."""
    with anyio.fail_after(5):
        while server.core.dispatcher.scheduler.miners[miner_id].connected:  # noqa: ASYNC110
            await anyio.sleep(0.005)


async def test_miner_resuming_within_grace_keeps_and_completes_its_job(
    server: RunningServer,
) -> None:
    """A miner that drops mid-job and resumes its session within the grace gets the job in
    welcome.resumed and completes it: attempt 1, no requeue."""
    async with AsyncExitStack() as stack:
        miner = await stack.enter_async_context(ManualMiner(server, MINER_KEY, "resume-a"))
        first = await miner.connect()
        client = await stack.enter_async_context(client_session(server, CLIENT_KEY))
        job_id = await _submit(client, "keep me")
        await _start_job(miner, client, job_id)

        await miner.drop()
        await _wait_disconnected(server, "resume-a")
        welcome = await miner.connect(resume=True)
        assert welcome.session_id != first.session_id
        assert welcome.resumed == (job_id,)
        assert welcome.revoked == ()

        rid = miner.client.result(job_id, {"output": "kept"})
        await miner.flush()
        ack = await miner.expect(Ack)
        assert ack.id == rid
        assert ack.fields["receipt"]["job_id"] == job_id
        events = await client.events_until(job_id, "completed")
    assert [e.event for e in events] == ["completed"]
    assert events[0].attempt == 1
    assert events[0].miner_id == "resume-a"
    assert events[0].data["result"] == {"output": "kept"}


async def test_job_moves_to_another_miner_after_the_grace_and_late_result_is_refused(
    short_grace_server: RunningServer,
) -> None:
    """A miner that stays away past the grace loses its job to a second miner (attempt 2);
    its late attempt-1 result, sent on a new socket, is refused not_assigned."""
    server = short_grace_server
    async with AsyncExitStack() as stack:
        gone = await stack.enter_async_context(ManualMiner(server, MINER_KEY, "grace-a"))
        await gone.connect()
        client = await stack.enter_async_context(client_session(server, CLIENT_KEY))
        job_id = await _submit(client, "move me")
        await _start_job(gone, client, job_id)
        backup = await stack.enter_async_context(ManualMiner(server, MINER_KEY_2, "grace-b"))
        await backup.connect()

        await gone.drop()
        reassigned = await backup.expect(JobAssign, within=5)
        assert reassigned.job_id == job_id
        assert reassigned.attempt == 2
        moved = await client.events_until(job_id, "assigned")
        backup.client.accept(job_id)
        await backup.flush()

        welcome = await gone.connect(resume=True)
        assert job_id not in welcome.resumed
        await gone.send(JobResult(job_id=job_id, result={"output": "stale"}, attempt=1, id="late"))
        refused = await gone.expect(Error)

        rid = backup.client.result(job_id, {"output": "fresh"})
        await backup.flush()
        ack = await backup.expect(Ack)
        assert ack.id == rid
        done = await client.events_until(job_id, "completed")
        stored = await server.core.dispatcher.get_job(job_id)

    assert [(e.event, e.attempt, e.miner_id) for e in moved] == [
        ("requeued", 1, None),
        ("assigned", 2, "grace-b"),
    ]
    assert refused.id == "late"
    assert refused.code == "not_assigned"
    assert [e.event for e in done] == ["started", "completed"]
    assert done[-1].attempt == 2
    assert done[-1].miner_id == "grace-b"
    assert done[-1].data["result"] == {"output": "fresh"}
    assert ack.fields["receipt"]["provider"] == "grace-b"
    assert stored is not None
    assert stored.state == "COMPLETED"
    assert stored.result == {"output": "fresh"}
    assert stored.attempt == 2


async def test_second_session_for_same_miner_id_replaces_the_first(server: RunningServer) -> None:
    """A second live session for the same miner id takes over: the old socket closes 4409."""
    async with AsyncExitStack() as stack:
        old = await stack.enter_async_context(ManualMiner(server, MINER_KEY, "twin"))
        new = await stack.enter_async_context(ManualMiner(server, MINER_KEY, "twin"))
        first = await old.connect()
        second = await new.connect()
        assert second.miner_id == "twin"
        assert second.session_id != first.session_id
        assert await old.close_code() == 4409
        await new.send(Heartbeat(id="hb"))
        ack = await new.expect(Ack)
    assert ack.id == "hb"


async def test_replacing_session_that_resumes_takes_over_running_job(
    server: RunningServer,
) -> None:
    """A replacing session that presents the old session id keeps the running job (resumed),
    while the old socket is closed 4409."""
    async with AsyncExitStack() as stack:
        old = await stack.enter_async_context(ManualMiner(server, MINER_KEY, "twin-r"))
        first = await old.connect()
        client = await stack.enter_async_context(client_session(server, CLIENT_KEY))
        job_id = await _submit(client, "hand over")
        await _start_job(old, client, job_id)

        new = await stack.enter_async_context(ManualMiner(server, MINER_KEY, "twin-r"))
        new.client.session_id = first.session_id
        new.client.jobs = dict(old.client.jobs)
        welcome = await new.connect(resume=True)
        assert welcome.resumed == (job_id,)
        assert await old.close_code() == 4409
        new.client.result(job_id, {"output": "handed"})
        await new.flush()
        await new.expect(Ack)
        events = await client.events_until(job_id, "completed")
    assert [e.event for e in events] == ["completed"]
    assert events[0].attempt == 1


async def test_replacing_session_without_resume_revokes_and_requeues_the_job(
    server: RunningServer,
) -> None:
    """A replacing session that does not resume gets the old session's job in revoked; the
    job is requeued and pushed again (attempt 2) to the new session."""
    async with AsyncExitStack() as stack:
        old = await stack.enter_async_context(ManualMiner(server, MINER_KEY, "twin-n"))
        await old.connect()
        client = await stack.enter_async_context(client_session(server, CLIENT_KEY))
        job_id = await _submit(client, "start over")
        await _start_job(old, client, job_id)

        new = await stack.enter_async_context(ManualMiner(server, MINER_KEY, "twin-n"))
        welcome = await new.connect(resume=False)
        assert welcome.revoked == (job_id,)
        assert welcome.resumed == ()
        assert await old.close_code() == 4409
        again = await new.expect(JobAssign)
        events = await client.events_until(job_id, "assigned")
    assert again.job_id == job_id
    assert again.attempt == 2
    assert [(e.event, e.attempt) for e in events] == [("requeued", 1), ("assigned", 2)]


async def test_a_cancel_sent_to_a_dead_socket_is_revoked_when_the_miner_resumes(
    server: RunningServer,
) -> None:
    """A job canceled while the miner's socket was dead, before the server noticed, is named in
    ``revoked`` when the miner resumes on a new socket (which replaces the dead one): its
    ``job.cancel`` went to the dead socket, and the welcome named the job in neither list."""
    async with AsyncExitStack() as stack:
        old = await stack.enter_async_context(ManualMiner(server, MINER_KEY, "twin-c"))
        first = await old.connect()
        client = await stack.enter_async_context(client_session(server, CLIENT_KEY))
        job_id = await _submit(client, "cancel me")
        await _start_job(old, client, job_id)

        # From here the miner never reads the old socket again (its network died).
        await client.send(JobCancelRequest(job_id=job_id, id="cancel"))
        await client.events_until(job_id, "canceled")
        new = await stack.enter_async_context(ManualMiner(server, MINER_KEY, "twin-c"))
        new.client.session_id = first.session_id
        new.client.jobs = dict(old.client.jobs)
        welcome = await new.connect(resume=True)
        unread = await old.expect(JobCancel)  # what the dead socket would have delivered
    assert (welcome.resumed, welcome.revoked) == ((), (job_id,))
    assert unread.job_id == job_id
