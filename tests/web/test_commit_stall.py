"""A commit that hangs on PostgreSQL (a lock another session holds) shows in readiness."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
import asyncpg
import pytest

from tests.conftest import ADMIN_KEY, CLIENT_KEY
from tests.web.rest_harness import running_api

if TYPE_CHECKING:
    from pathlib import Path

    import httpx

pytestmark = pytest.mark.anyio
CLIENT = {"X-Api-Key": CLIENT_KEY}


async def test_a_commit_waiting_on_a_lock_another_session_holds_turns_readiness_503(
    tmp_path: Path, postgres_url: str
) -> None:
    """``LOCK TABLE jobs`` held by another session (an operator's maintenance) holds the
    writer's commit, and every change and answer with it, for as long as it is held (the
    writer's session has no lock timeout): /health/ready said 200 all along. Past
    ``commit_stall_seconds`` it is 503 naming the stalled commit; once the lock is gone the
    commit goes through, the submit is answered and readiness is 200 again. ``/metrics``
    answers during the stall (``aitbc_ready`` 0) instead of waiting for the commit."""
    async with running_api(tmp_path, database_url=postgres_url) as api:
        core = api.app.state.core
        assert (await api.http.get("/health/ready")).status_code == 200
        core.commit_stall_seconds = 0.0  # any commit under way counts as hanging
        blocker = await asyncpg.connect(postgres_url)
        try:
            locked = blocker.transaction()
            await locked.start()
            await blocker.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
            answers: list[httpx.Response] = []

            async def submit() -> None:
                answers.append(
                    await api.http.post("/v1/jobs", json={"payload": {"type": "x"}}, headers=CLIENT)
                )

            async with anyio.create_task_group() as tg:
                tg.start_soon(submit)
                with anyio.fail_after(10):
                    while core.dispatcher.commit_running_for() == 0.0:  # not yet under way
                        await anyio.lowlevel.checkpoint()
                stalled = await api.http.get("/health/ready")
                scraped = await api.http.get("/metrics", headers={"X-Api-Key": ADMIN_KEY})
                await locked.rollback()
        finally:
            await blocker.close()
        assert (stalled.status_code, stalled.json()["database"]) == (503, "commit stalled")
        assert "aitbc_ready 0.0" in scraped.text  # answered during the stall, not after it
        assert [a.status_code for a in answers] == [201]
        assert (await api.http.get("/health/ready")).status_code == 200
