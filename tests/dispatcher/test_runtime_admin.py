"""``Dispatcher`` operator actions and observation hooks (ring 3)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from dispatcher.errors import InvalidTransition, UnknownMiner
from tests.dispatcher.test_runtime import running, stored

pytestmark = pytest.mark.anyio


async def test_admin_cancel_reaches_miner_after_commit_and_watchers_see_it() -> None:
    """The miner's job.cancel and the watchers' event both follow the commit."""
    async with running() as h:
        seen: list[tuple[str, str, Any]] = []
        h.dispatcher.watchers.append(lambda job, e, frame: seen.append((e.job_id, e.event, frame)))
        sink = h.miner()
        spec = h.spec()
        await h.submit(spec)
        await h.flushed()
        assert [f["job_id"] for f in sink.of_type("job.assign")] == [spec.job_id]
        h.store.block_commits()
        async with anyio.create_task_group() as tg:
            tg.start_soon(h.dispatcher.admin_cancel, spec.job_id)
            await h.settle()
            assert sink.of_type("job.cancel") == []  # not durable yet: nobody hears of it
            h.store.release_commits()
        assert sink.of_type("job.cancel") == [
            {"type": "job.cancel", "job_id": spec.job_id, "reason": "canceled by admin"}
        ]
        assert stored(h, spec.job_id)[-1] == (3, "canceled")
        assert [(j, e) for j, e, _ in seen] == [
            (spec.job_id, "queued"),
            (spec.job_id, "assigned"),
            (spec.job_id, "canceled"),
        ]
        assert '"canceled"' in seen[-1][2]
        assert h.dispatcher.tally.events == {"queued": 1, "assigned": 1, "canceled": 1}
        assert h.dispatcher.batch_sizes.count == h.dispatcher.statistics().batches
        assert h.dispatcher.commit_seconds.count == h.dispatcher.statistics().batches


async def test_requeue_drain_and_disconnect() -> None:
    """Requeue moves the job to the other miner; drain stops offers; disconnect closes."""
    async with running() as h:
        first = h.miner("gpu-1")
        spec = h.spec()
        await h.submit(spec)
        await h.flushed()
        second = h.miner("gpu-2")
        with anyio.fail_after(5):
            rec = await h.dispatcher.requeue(spec.job_id)
        assert (rec.state, rec.miner_id, rec.attempt) == ("RUNNING", "gpu-2", 2)
        await h.flushed()
        assert first.of_type("job.cancel")[0]["reason"] == "requeued by admin"
        assert [f["attempt"] for f in second.of_type("job.assign")] == [2]
        assert h.dispatcher.tally.requeues == {"admin": 1}
        with anyio.fail_after(5):
            await h.dispatcher.drain_miner("gpu-1", True)
        other = h.spec()
        await h.submit(other)
        await h.flushed()
        assert len(first.of_type("job.assign")) == 1  # draining: not offered the new job
        with pytest.raises(InvalidTransition):
            await h.dispatcher.requeue(other.job_id)  # QUEUED: nothing to take back
        with anyio.fail_after(5):
            await h.dispatcher.disconnect_miner("gpu-2")
        assert second.closed == (1000, "disconnected by an operator")
        with pytest.raises(UnknownMiner):
            await h.dispatcher.disconnect_miner("gpu-2")


async def test_a_rest_registration_while_its_socket_replacement_commits_keeps_its_polls() -> None:
    """A REST miner registers again while the socket session that replaced it is being
    committed: the replaced session's close, performed after that commit, ends the old REST
    session only (it dropped the new one's sink: every poll was refused as unregistered)."""
    async with running() as h:
        d = h.dispatcher

        async def register() -> None:
            await d.rest_register(
                miner_id="gpu-1", key_hash="k" * 64, capabilities={}, concurrency=1, region=None
            )

        with anyio.fail_after(5):
            await register()
        h.store.block_commits()
        h.miner("gpu-1")  # a socket session of the same miner replaces the REST one
        await h.settle()
        async with anyio.create_task_group() as tg:
            tg.start_soon(register)
            await h.settle()
            h.store.release_commits()
        spec = h.spec()
        await h.submit(spec)
        with anyio.fail_after(5):
            polled = await d.rest_poll("gpu-1", 0)
        assert polled is not None
        assert polled.job_id == spec.job_id
