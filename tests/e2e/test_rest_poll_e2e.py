"""Real sockets: a REST miner that hangs up during its long-poll stops counting as waiting."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import httpx
import orjson
import pytest

from dispatcher.jobs import JobState
from tests.conftest import CLIENT_KEY, MINER_KEY

if TYPE_CHECKING:
    from tests.e2e.conftest import RunningServer

MINER = {"X-Api-Key": MINER_KEY, "X-Miner-ID": "m1"}


async def _until(predicate: object) -> None:
    assert callable(predicate)
    with anyio.fail_after(5):
        while not predicate():  # noqa: ASYNC110 - the scheduler exposes its state only as data
            await anyio.sleep(0.005)


@pytest.mark.anyio
@pytest.mark.both_backends
@pytest.mark.parametrize("forwarded", [False, True], ids=["lean", "asgi"])
async def test_a_miner_that_hangs_up_during_its_long_poll_is_offered_no_job(
    server: RunningServer, forwarded: bool
) -> None:
    # With an X-Forwarded-For header the request takes uvicorn's ASGI path, which hears of
    # the hang-up from ``receive``; without it, the lean path hears it from the connection.
    base = f"http://127.0.0.1:{server.port}"
    async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=5.0) as http:
        register = {"capabilities": {"gpus": [{"name": "A100"}]}, "concurrency": 1}
        r = await http.post("/v1/miners/register", json=register, headers=MINER)
        assert r.status_code == 200
        scheduler = server.core.dispatcher.scheduler
        body = orjson.dumps({"max_wait_seconds": 20})
        head = [
            "POST /v1/miners/poll HTTP/1.1",
            f"host: 127.0.0.1:{server.port}",
            f"x-api-key: {MINER_KEY}",
            "x-miner-id: m1",
            "content-type: application/json",
            f"content-length: {len(body)}",
        ]
        if forwarded:
            head.append("x-forwarded-for: 10.0.0.7")
        stream = await anyio.connect_tcp("127.0.0.1", server.port)
        await stream.send("\r\n".join(head).encode() + b"\r\n\r\n" + body)
        await _until(lambda: scheduler.miners["m1"].polls == 1)  # parked on the server
        await stream.aclose()
        await _until(lambda: scheduler.miners["m1"].polls == 0)  # withdrawn, not at 20 s

        job = {"payload": {"type": "x"}, "constraints": {"gpu": "A100"}}
        r = await http.post("/v1/jobs", json=job, headers={"X-Api-Key": CLIENT_KEY})
        assert r.status_code == 201
        queued = scheduler.jobs[r.json()["job_id"]]
        # Never offered to the gone miner: still waiting for its first assignment.
        assert (queued.state, queued.attempt) == (JobState.QUEUED, 0)
