"""End to end over real sockets: miners, clients and the coordinator on 127.0.0.1."""

from __future__ import annotations

import anyio
import pytest

from examples.ws_miner import MinerOptions, SimulatedMiner
from protocol.messages import Ack, JobSubmit
from protocol.receipt_verify import TrustedKey, check_receipt
from protocol.receipts import key_id_for, load_signing_key, verify_receipt
from tests.conftest import MINER_KEY, MINER_KEY_2, SIGNING_SEED
from tests.e2e.conftest import RunningServer, open_client

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.both_backends]

A100_SEED = "22" * 32


async def test_jobs_reach_only_matching_miners_and_client_sees_full_lifecycle(
    server: RunningServer,
) -> None:
    """Two miners with different GPUs; each job goes to the one that matches, and the client
    sees queued -> assigned -> started -> progress -> completed with a verifying receipt."""
    logs: list[str] = []
    a100 = SimulatedMiner(
        MinerOptions(
            url=server.url("/v1/miners/ws"),
            key=MINER_KEY,
            miner_id="gpu-a100",
            gpus=[{"name": "A100", "memory_mb": 40960}],
            delay=0.05,
            chunks=2,
            result_seed_hex=A100_SEED,  # co-signs its results
        ),
        log=logs.append,
    )
    rtx = SimulatedMiner(
        MinerOptions(
            url=server.url("/v1/miners/ws"),
            key=MINER_KEY_2,
            miner_id="gpu-4090",
            gpus=[{"name": "RTX 4090", "memory_mb": 24576}],
            delay=0.05,
            chunks=2,
        ),
        log=logs.append,
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(a100.run)
        tg.start_soon(rtx.run)
        with anyio.fail_after(5):
            await a100.welcomed.wait()
            await rtx.welcomed.wait()
        client, cm = await open_client(server)
        try:
            results = {}
            for n, gpu in enumerate(["A100", "RTX 4090", "A100"]):
                await client.send(
                    JobSubmit(id=f"s{n}", payload={"prompt": f"job {n}"}, constraints={"gpu": gpu})
                )
                ack = await client.recv()
                assert isinstance(ack, Ack)
                assert ack.id == f"s{n}"
                job_id = ack.fields["job"]["job_id"]
                assert ack.fields["job"]["servable"] is True
                events = await client.events_until(job_id, "completed")
                results[job_id] = (gpu, events)
        finally:
            await cm.__aexit__(None, None, None)
        tg.cancel_scope.cancel()

    pinned = frozenset({key_id_for(load_signing_key(SIGNING_SEED).public_key())})
    for job_id, (gpu, events) in results.items():
        kinds = [e.event for e in events]
        assert kinds[:3] == ["queued", "assigned", "started"]
        assert "progress" in kinds
        assert kinds[-1] == "completed"
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        expected = "gpu-a100" if gpu == "A100" else "gpu-4090"
        assert events[1].miner_id == expected
        receipt = events[-1].data["receipt"]
        assert receipt["provider"] == expected
        assert receipt["job_id"] == job_id
        assert verify_receipt(receipt, pinned_key_ids=pinned) == []
        assert check_receipt(receipt, [TrustedKey(key_id=k) for k in pinned]) == []
        attestation = receipt.get("miner_attestation")
        if gpu == "A100":
            assert attestation is not None
            assert attestation["key_id"] == key_id_for(load_signing_key(A100_SEED).public_key())
        else:
            assert attestation is None
    assert {a.job_id for a in a100.assigned} | {a.job_id for a in rtx.assigned} == set(results)
    assert all(results[a.job_id][0] == "A100" for a in a100.assigned)
    assert all(results[a.job_id][0] == "RTX 4090" for a in rtx.assigned)


async def test_example_miner_reports_its_load_to_the_ops_feed(server: RunningServer) -> None:
    """examples/ws_miner.py sends a heartbeat with its load every --load-interval; the ops
    feed shows the figures in its row."""
    miner = SimulatedMiner(
        MinerOptions(
            url=server.url("/v1/miners/ws"),
            key=MINER_KEY,
            miner_id="gpu-load",
            concurrency=2,
            load_interval=0.02,
        ),
        log=lambda _: None,
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(miner.run)
        with anyio.fail_after(5):
            while True:
                rows = {m["miner_id"]: m for m in server.core.ops.snapshot()["miners"]}
                if rows.get("gpu-load", {}).get("load"):
                    break
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert rows["gpu-load"]["load"] == {"jobs_running": 0.0, "utilization": 0.0}
