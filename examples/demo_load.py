"""Simulated miners of several kinds plus a client load, for ``aitbc-coordinator demo``.

Kinds differ in GPUs, models, region, concurrency and speed; one kind fails now and then (some
failures are retryable), and one leaves after a few jobs and comes back, so the ops page shows
miners coming and going, requeues and failures. The client submits a steady mix of jobs,
including some that no miner can serve (they wait, then expire) and some it cancels.
"""

from __future__ import annotations

import itertools
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.ws_miner import MinerOptions, SimulatedMiner
from protocol.codec import decode_server_to_client, encode
from protocol.messages import Ack, ClientHello, JobAssign, JobCancelRequest, JobSubmit

if TYPE_CHECKING:
    from protocol.types import JSONObject

__all__ = ["KINDS", "MinerKind", "run_load"]


@dataclass(frozen=True, kw_only=True)
class MinerKind:
    name: str
    gpu: str
    vram_gb: int
    models: tuple[str, ...]
    region: str
    concurrency: int
    delay: float
    price: float
    fail_rate: float = 0.0
    churn: int | None = None  # leaves after this many jobs, then comes back


KINDS = (
    MinerKind(name="a100", gpu="A100", vram_gb=80, models=("llama3", "mixtral"), region="eu-west",
              concurrency=2, delay=1.2, price=0.5),
    MinerKind(name="h100", gpu="H100", vram_gb=80, models=("llama3", "mixtral", "sdxl"),
              region="us-east", concurrency=4, delay=0.8, price=0.9),
    MinerKind(name="4090", gpu="RTX 4090", vram_gb=24, models=("sdxl", "whisper"),
              region="ap-south", concurrency=1, delay=0.6, price=0.2, fail_rate=0.15),
    MinerKind(name="l4", gpu="L4", vram_gb=24, models=("whisper",), region="eu-west",
              concurrency=1, delay=2.0, price=0.1, churn=6),
)  # fmt: skip

# (payload, constraints) of a job the client submits
JOB_MIX: tuple[tuple[JSONObject, JSONObject], ...] = (
    ({"type": "inference", "model": "llama3"}, {"models": ["llama3"]}),
    ({"type": "inference", "model": "mixtral"}, {"models": ["mixtral"], "min_vram_gb": 40}),
    ({"type": "image", "model": "sdxl"}, {"models": ["sdxl"]}),
    ({"type": "audio", "model": "whisper"}, {"models": ["whisper"]}),
    ({"type": "inference", "model": "llama3"}, {}),
)
UNSERVABLE: tuple[JSONObject, JSONObject] = (
    {"type": "inference", "model": "grok-5"},
    {"gpu": "TPU v5"},
)


class FlakyMiner(SimulatedMiner):
    """Fails a share of its jobs (half of those failures retryable) instead of finishing them."""

    def __init__(self, opts: MinerOptions, fail_rate: float, rng: random.Random) -> None:
        super().__init__(opts, log=lambda line: None)
        self.fail_rate = fail_rate
        self.rng = rng

    async def _run_job(self, job: JobAssign) -> None:
        if self.rng.random() >= self.fail_rate:
            await super()._run_job(job)
            return
        self.client.accept(job.job_id)
        await self.flush()
        await anyio.sleep(self.opts.delay / 2)
        retryable = self.rng.random() < 0.5
        self.client.fail(job.job_id, "cuda_oom", "CUDA out of memory", retryable=retryable)
        await self.flush()


def _options(kind: MinerKind, n: int, url: str, key: str) -> MinerOptions:
    return MinerOptions(
        url=url,
        key=key,
        miner_id=f"{kind.name}-{n:02d}",
        gpus=[{"name": kind.gpu, "memory_mb": kind.vram_gb * 1024}],
        cuda="12.4",
        models=list(kind.models),
        price=kind.price,
        region=kind.region,
        concurrency=kind.concurrency,
        delay=kind.delay,
        chunks=4,
        max_jobs=kind.churn,
        reconnect=kind.churn is None,
    )


async def _miner(kind: MinerKind, n: int, url: str, key: str, rng: random.Random) -> None:
    await anyio.sleep(rng.uniform(0, 2))  # a staggered arrival
    while True:
        miner = FlakyMiner(_options(kind, n, url, key), kind.fail_rate, rng)
        await miner.run()
        if kind.churn is None:
            return
        if miner.ws is not None:
            await miner.ws.close()
        await anyio.sleep(rng.uniform(3, 8))  # away for a while, then back


async def _client(url: str, key: str, rate: float, rng: random.Random) -> None:
    counter = itertools.count(1)
    while True:
        try:
            async with connect(url, additional_headers={"X-Api-Key": key}, max_size=None) as ws:
                await ws.send(encode(ClientHello(protocol=1)).decode())

                async def read() -> None:
                    async for raw in ws:
                        msg = decode_server_to_client(raw)
                        if isinstance(msg, Ack) and msg.id.startswith("c") and "job" in msg.fields:
                            if rng.random() < 0.05:  # change of mind: cancel it
                                job_id = msg.fields["job"]["job_id"]
                                await ws.send(
                                    encode(JobCancelRequest(id="x", job_id=job_id)).decode()
                                )

                async with anyio.create_task_group() as tg:
                    tg.start_soon(read)
                    while True:
                        n = next(counter)
                        unservable = rng.random() < 0.03
                        payload, constraints = UNSERVABLE if unservable else rng.choice(JOB_MIX)
                        submit = JobSubmit(
                            id=f"c{n}",
                            payload={**payload, "prompt": f"demo job {n}"},
                            constraints=constraints,
                            ttl_seconds=30 if unservable else 300,
                            priority=rng.choice((0, 0, 0, 1, 5)),
                        )
                        await ws.send(encode(submit).decode())
                        await anyio.sleep(rng.expovariate(rate))
        except* (ConnectionClosed, OSError):
            pass  # the coordinator went away: try again in a second
        await anyio.sleep(1)


async def run_load(
    base_ws: str, *, miner_key: str, client_key: str, miners: int, rate: float, seed: int = 7
) -> None:
    """Run ``miners`` simulated miners (kinds in turn) and a client at ``rate`` jobs/s, forever."""
    rng = random.Random(seed)
    async with anyio.create_task_group() as tg:
        for i in range(miners):
            kind = KINDS[i % len(KINDS)]
            tg.start_soon(
                _miner, kind, i // len(KINDS) + 1, f"{base_ws}/v1/miners/ws", miner_key, rng
            )
        tg.start_soon(_client, f"{base_ws}/v1/jobs/ws", client_key, rate, rng)
