"""Crash durability: kill -9 the real coordinator mid-load; every acknowledged job survives."""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING

import anyio
import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from examples.ws_miner import MinerOptions, SimulatedMiner
from tests.conftest import CLIENT_KEY, MINER_KEY, MINER_KEY_2
from tests.e2e.processes import (
    CoordinatorProcess,
    LoadClient,
    assert_ended_once,
    stored,
    wait_for,
)

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.slow]

JOBS = 300
KILL_AT = 120  # acknowledged submissions before the kill
PACE = 0.003  # seconds between submissions


def _miner(server: CoordinatorProcess, i: int, logs: list[str]) -> SimulatedMiner:
    return SimulatedMiner(
        MinerOptions(
            url=server.url("/v1/miners/ws"),
            key=MINER_KEY if i % 2 == 0 else MINER_KEY_2,
            miner_id=f"crash-miner-{i}",
            gpus=[{"name": "A100", "memory_mb": 40960}],
            concurrency=3,
            delay=0.1,
            chunks=2,
        ),
        log=logs.append,
    )


async def _standby_refuses_work(standby: CoordinatorProcess) -> None:
    """A waiting standby: alive, not ready, REST 503 and sockets closed 1001."""
    async with httpx.AsyncClient(trust_env=False, timeout=2.0) as http:
        base = f"http://127.0.0.1:{standby.port}"
        ready = await http.get(f"{base}/health/ready")
        assert (ready.status_code, ready.json()["status"]) == (503, "standby")
        submit = await http.post(f"{base}/v1/jobs", json={}, headers={"X-Api-Key": CLIENT_KEY})
        assert submit.status_code == 503
    async with connect(
        standby.url("/v1/jobs/ws"), additional_headers={"X-Api-Key": CLIENT_KEY}
    ) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1001


@pytest.mark.timeout(60)
@pytest.mark.parametrize("takeover", ["restart", "standby"])
async def test_kill_9_mid_load_loses_no_acknowledged_job(
    tmp_path: Path, database_url: str, takeover: str
) -> None:
    """SIGKILL mid-load, then the same database served again, by a restart or by a standby
    that was waiting for it (``serve --standby``; the client and miners then reconnect to its
    port): every acknowledged job exists, ends in exactly one terminal state (one completed
    event at most), and the client misses no event. On PostgreSQL, the new owner also finds
    the killed process's owner lock gone."""
    miner_logs: list[str] = []
    with (tmp_path / "coordinator.log").open("a") as log:
        server = CoordinatorProcess(database_url, log)
        standby = CoordinatorProcess(database_url, log, "--standby")
        try:
            await server.start()
            if takeover == "standby":
                await standby.start()
                await _standby_refuses_work(standby)
            client = LoadClient(server, jobs=JOBS, pace=PACE)
            miners = [_miner(server, i, miner_logs) for i in range(4)]
            async with anyio.create_task_group() as tg:
                for m in miners:
                    tg.start_soon(m.run)
                tg.start_soon(client.run)
                # Also a job running (its start committed, not ended): with acks as fast as the
                # pacing, KILL_AT came before the miners' first accept was committed.
                await wait_for(
                    lambda: (
                        len(client.job_of) >= KILL_AT
                        and bool(client.started - set(client.terminal))
                    ),
                    20,
                )

                server.kill9()
                acked_at_kill = dict(client.job_of)
                terminal_seen_at_kill = set(client.terminal)
                assert await server.wait_exit() == -signal.SIGKILL

                restarted_at = time.time()  # every event after this was written by the new process
                if takeover == "restart":
                    await server.restart(miners)
                else:
                    await server.stop_now()
                    server, client.server = standby, standby
                    for m in miners:
                        m.opts.url = standby.url("/v1/miners/ws")
                with anyio.move_on_after(15):
                    await client.done.wait()
                assert client.done.is_set(), client.describe_pending()
                tg.cancel_scope.cancel()

            await server.terminate()
        finally:
            await server.stop_now()
            await standby.stop_now()
            print((tmp_path / "coordinator.log").read_text()[-4000:])

    jobs, events, receipts = await stored(database_url)

    print(
        f"sessions={client.sessions} acked_at_kill={len(acked_at_kill)} "
        f"deduplicated={len(client.deduplicated)} "
        f"requeued={sum(any(e.event == 'requeued' for e in trail) for trail in events.values())}"
    )
    assert client.sessions >= 2
    assert len(acked_at_kill) >= KILL_AT
    assert len(client.job_of) == JOBS
    # Every acknowledged job survived, and resubmissions with the same key made no duplicate.
    assert set(acked_at_kill.values()) <= set(jobs)
    assert set(jobs) == set(client.job_of.values())
    assert sorted(j.idempotency_key for j in jobs.values()) == sorted(f"k{n}" for n in range(JOBS))
    for job_id, job in jobs.items():
        kinds = assert_ended_once(job, events[job_id], receipts.get(job_id, 0), client)
        assert job.state == "COMPLETED", (job_id, job.error, kinds)
    # The client saw each event once (a job acknowledged only on resubmission may overlap).
    assert client.redelivered == []
    # The kill was meaningful: some acknowledged jobs were not yet terminal when it hit.
    in_flight = [j for j in acked_at_kill.values() if events[j][-1].at > restarted_at]
    running = [
        j for j in in_flight if any(e.event == "started" and e.at < restarted_at for e in events[j])
    ]
    print(f"in flight at the kill: {len(in_flight)}, of them running: {len(running)}")
    assert in_flight, "every acknowledged job had already finished at the kill"
    assert running, "no job was running at the kill: the resume path went untested"
    assert not terminal_seen_at_kill & set(in_flight)
