"""A simulated GPU miner on the coordinator's WebSocket protocol.

It advertises capabilities from flags, runs each pushed job for ``--delay`` seconds while
streaming ``--chunks`` progress/output chunks, sends the result, and reconnects with ``resume``
after a dropped connection (jobs it was running continue and are reported after the resume).

    python examples/ws_miner.py --key MINER_KEY --gpu "RTX 4090" --vram-gb 24 --models llama3

With ``--sign-results SEED_HEX`` (a 32-byte Ed25519 seed) the miner registers its public key in
``hello`` and co-signs every result; the receipts then carry its ``miner_attestation``.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from typing import TYPE_CHECKING

from examples.connection import (
    LOST,
    Refused,
    check_utf8,
    describe,
    no_welcome,
    refusal,
    url_refusal,
)
from protocol.client import MinerClient
from protocol.errors import RemoteProtocolError
from protocol.messages import Ack, Error, JobAssign, JobCancel, Welcome
from protocol.receipts import load_signing_key
from protocol.types import ErrorCode

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["MinerOptions", "SimulatedMiner", "main"]


@dataclass(kw_only=True)
class MinerOptions:
    url: str = "ws://127.0.0.1:8000/v1/miners/ws"
    standby_urls: list[str] = field(default_factory=list)  # tried in turn after ``url``
    key: str = ""
    miner_id: str | None = None
    gpus: list[dict[str, object]] = field(default_factory=list)
    cuda: str | None = None
    models: list[str] = field(default_factory=list)
    price: float | None = None
    region: str | None = None
    concurrency: int = 1
    delay: float = 0.5
    chunks: int = 3
    reconnect: bool = True
    max_jobs: int | None = None  # exit after this many results (None: run forever)
    result_seed_hex: str | None = None  # co-sign results with this Ed25519 seed
    load_interval: float = 5.0  # seconds between load reports (heartbeats); 0: none
    retry_after: float = 1.0  # before a result answered ``unavailable`` goes again
    welcome_timeout: float = 10.0  # seconds from the hello to the welcome; then it stops

    def capabilities(self) -> dict[str, object]:
        caps: dict[str, object] = {"gpus": self.gpus, "models": self.models}
        if self.cuda is not None:
            caps["cuda"] = self.cuda
        if self.price is not None:
            caps["price"] = self.price
        return caps


class SimulatedMiner:
    """Drives ``protocol.client.MinerClient`` over a websockets connection."""

    def __init__(self, opts: MinerOptions, log: Callable[[str], None] = print) -> None:
        self.opts = opts
        self.log = log
        self.client = MinerClient(
            capabilities=opts.capabilities(),
            miner_id=opts.miner_id,
            concurrency=opts.concurrency,
            region=opts.region,
            result_key=None
            if opts.result_seed_hex is None
            else load_signing_key(opts.result_seed_hex),
        )
        self.ws: ClientConnection | None = None
        self.connected = anyio.Event()
        self.welcomed = anyio.Event()
        self.receipts: dict[str, dict[str, object]] = {}
        self.assigned: list[JobAssign] = []
        self.canceled: list[str] = []
        self.completed = 0
        self._running: dict[str, anyio.CancelScope] = {}
        self._pending: list[bytes] = []
        self._send_lock = anyio.Lock()
        # Results not acknowledged yet (job id -> frame, request id -> job id): a result written
        # to a socket that then died may never have arrived, and is sent again after a resume.
        self._unacked: dict[str, bytes] = {}
        self._result_ids: dict[str, str] = {}
        self._done = anyio.Event()
        self.refused: Refused | None = None  # why it stopped, when the coordinator refused it

    async def flush(self) -> None:
        """Send what the Sans-I/O client queued; while offline, wait for the resume first.

        One sender at a time: two tasks sending ``_pending[0]`` concurrently would send one
        frame twice and drop the next.
        """
        self._pending.extend(self.client.data_to_send())
        async with self._send_lock:
            while self._pending:
                await self.welcomed.wait()
                ws = self.ws
                if ws is None:
                    await anyio.sleep(0.01)
                    continue
                try:
                    while self._pending:
                        await ws.send(self._pending[0].decode())
                        self._pending.pop(0)
                except ConnectionClosed:
                    continue

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._connect_loop, tg)
            if self.opts.load_interval > 0:
                tg.start_soon(self._report_load)
            await self._done.wait()
            tg.cancel_scope.cancel()

    async def _report_load(self) -> None:
        """A heartbeat with this miner's load every ``load_interval`` seconds while it is
        connected: the coordinator's ops page shows the figures in the miner's row."""
        while True:
            await anyio.sleep(self.opts.load_interval)
            if self.welcomed.is_set():
                busy = len(self._running)
                self.client.heartbeat(
                    {"jobs_running": busy, "utilization": round(busy / self.opts.concurrency, 3)}
                )
                await self.flush()

    async def _connect_loop(self, tg: anyio.abc.TaskGroup) -> None:
        backoff = 0.05
        attempt = 0
        while True:
            urls = [self.opts.url, *self.opts.standby_urls]
            target = urls[attempt % len(urls)]
            attempt += 1
            try:
                async with connect(
                    target,
                    additional_headers={"X-Api-Key": self.opts.key},
                    compression=None,
                    open_timeout=5,
                    # A result's ack carries the receipt, with the payload and the result: it
                    # may be larger than the frames the coordinator takes (docs/protocol.md).
                    max_size=None,
                ) as ws:
                    backoff = 0.05
                    self.client.hello(resume=True)
                    for frame in self.client.data_to_send():  # the hello goes out before all
                        await ws.send(frame.decode())
                    self.ws = ws
                    # Armed until the welcome: a server that takes the socket and answers pings
                    # but never welcomes (another service, an echo server) kept it idle for ever.
                    with anyio.move_on_after(self.opts.welcome_timeout) as welcome:
                        async for raw in ws:
                            self.client.receive_data(raw)
                            for event in self.client.events_received():
                                self._on_event(event, tg)
                            if self.welcomed.is_set():
                                welcome.deadline = math.inf
                    if welcome.cancelled_caught:
                        self.refused = no_welcome(
                            target, self.opts.welcome_timeout, "miner socket (…/v1/miners/ws)"
                        )
                        self.log(str(self.refused))
                        self._done.set()
                        return
            except LOST as exc:
                self.refused = refusal(exc, target)
                if self.refused is not None:
                    self.log(str(self.refused))
                    self._done.set()
                    return
                self.log(f"connection to {target} lost: {describe(exc)}")
            except RemoteProtocolError as exc:  # not a coordinator's frame: no use trying again
                why = "is it the coordinator's miner socket (…/v1/miners/ws)?"
                self.refused = Refused(
                    f"{target} sent a frame this miner cannot read ({exc}): {why}"
                )
                self.log(str(self.refused))
                self._done.set()
                return
            finally:
                self.ws = None
                if self.welcomed.is_set():  # a fresh event only once the last one was used:
                    self.welcomed = anyio.Event()  # flushes wait on it across failed attempts
            if not self.opts.reconnect:
                self._done.set()
                return
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _on_event(self, event: object, tg: anyio.abc.TaskGroup) -> None:
        match event:
            case Welcome():
                self.log(
                    f"welcome as {event.miner_id} (resumed {list(event.resumed)}, "
                    f"revoked {list(event.revoked)})"
                )
                for job_id in [*event.revoked, *self._running]:
                    if job_id not in self.client.jobs:
                        self._stop(job_id)  # revoked, or lost with the old session
                # A result not acknowledged goes again, unless its job was taken away: one of
                # a job still held, and one the coordinator took before the connection broke
                # (the job ended, so it is neither resumed nor revoked): its ack has the receipt.
                revoked = set(event.revoked)
                self._unacked = {j: f for j, f in self._unacked.items() if j not in revoked}
                resend = [f for f in self._unacked.values() if f not in self._pending]
                self._result_ids = {r: j for r, j in self._result_ids.items() if j in self._unacked}
                self._pending.extend(resend)
                self.welcomed.set()
                if resend:
                    tg.start_soon(self.flush)
            case JobAssign():
                # It said nothing of the jobs it ran: a new user saw "welcome as …" and then
                # silence, and could not tell a working miner from one no job reached.
                self.log(f"job {event.job_id} assigned (attempt {event.attempt})")
                self.assigned.append(event)
                tg.start_soon(self._run_job, event)
            case JobCancel():
                self.canceled.append(event.job_id)
                self.log(f"job {event.job_id} canceled: {event.reason}")
                self._stop(event.job_id)
            case Ack():
                self._settle(event.id)
                receipt = event.fields.get("receipt")
                job_id = str(event.fields.get("job_id"))
                if isinstance(receipt, dict) and job_id not in self.receipts:
                    self.log(f"job {job_id} completed (receipt {receipt.get('receipt_id')})")
                    self.receipts[job_id] = receipt
                    self.completed += 1
                    if self.opts.max_jobs is not None and self.completed >= self.opts.max_jobs:
                        self._done.set()
            case Error():
                self.log(f"error {event.code}: {event.message}")
                if event.code == ErrorCode.UNAVAILABLE and event.id in self._result_ids:
                    # The coordinator could not read its database: the result changed nothing
                    # and goes again (the same request: a repeat gets the same receipt).
                    tg.start_soon(self._resend, event.id)
                else:
                    self._settle(event.id)

    async def _resend(self, request_id: str) -> None:
        """Send an unanswered result again after ``retry_after`` (unless settled meanwhile)."""
        await anyio.sleep(self.opts.retry_after)
        frame = self._unacked.get(self._result_ids.get(request_id, ""))
        if frame is not None and frame not in self._pending:
            self._pending.append(frame)
            await self.flush()

    def _settle(self, request_id: str | None) -> None:
        """A result got its answer (receipt or refusal): it is not sent again."""
        job_id = self._result_ids.pop(request_id or "", None)
        if job_id is not None:
            self._unacked.pop(job_id, None)

    def _stop(self, job_id: str) -> None:
        scope = self._running.pop(job_id, None)
        if scope is not None:
            scope.cancel()

    async def _run_job(self, job: JobAssign) -> None:
        with anyio.CancelScope() as scope:
            self._running[job.job_id] = scope
            self.client.accept(job.job_id)
            await self.flush()
            prompt = str(job.payload.get("prompt", ""))
            words = (prompt or "done").split() or ["done"]
            steps = max(1, self.opts.chunks)
            for i in range(steps):
                await anyio.sleep(self.opts.delay / steps)
                self.client.progress(
                    job.job_id, progress=(i + 1) / steps, output=words[i % len(words)] + " "
                )
                await self.flush()
            request_id = self.client.result(
                job.job_id,
                {"output": prompt[::-1], "status": "completed"},
                {"duration_ms": int(self.opts.delay * 1000)},
            )
            frames = self.client.data_to_send()  # the result is the last frame queued
            self._unacked[job.job_id] = frames[-1]
            self._result_ids[request_id] = job.job_id
            self._pending.extend(frames)
            await self.flush()
            self._running.pop(job.job_id, None)


def _parse(argv: list[str] | None) -> MinerOptions:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--url",
        action="append",
        help="the miner socket's URL (default ws://127.0.0.1:8000/v1/miners/ws); repeat it "
        "for a standby: each reconnect tries the next",
    )
    p.add_argument("--key", required=True, help="a miner API key")
    p.add_argument("--miner-id", help="this miner's id (default: derived from the key)")
    p.add_argument("--gpu", action="append", default=[], help="GPU name (repeatable)")
    p.add_argument("--vram-gb", type=float, default=0.0, help="memory of each --gpu, in GB")
    p.add_argument("--cuda", help="CUDA version advertised")
    p.add_argument("--models", default="", help="comma-separated model names")
    p.add_argument("--price", type=float, help="price per GPU-second advertised")
    p.add_argument("--region", help="region advertised")
    p.add_argument("--concurrency", type=int, default=1, help="jobs run at once (default 1)")
    p.add_argument("--delay", type=float, default=0.5, help="seconds each job takes")
    p.add_argument("--chunks", type=int, default=3, help="progress chunks per job")
    p.add_argument("--max-jobs", type=int, help="exit after this many results (default: never)")
    p.add_argument(
        "--load-interval", type=float, default=5.0, help="seconds between load reports (0: none)"
    )
    p.add_argument(
        "--sign-results", metavar="SEED_HEX", help="co-sign results with this Ed25519 seed"
    )
    a = p.parse_args(argv)
    check_utf8(p, a, "url", "key", "miner_id", "gpu", "cuda", "models", "region", "sign_results")
    if a.sign_results is not None:
        try:
            load_signing_key(a.sign_results)  # a ValueError traceback once the miner started
        except ValueError:
            p.error("--sign-results must be an Ed25519 seed: 64 hex digits (32 bytes)")
    gpus: list[dict[str, object]] = [{"name": g, "memory_mb": int(a.vram_gb * 1024)} for g in a.gpu]
    return MinerOptions(
        url=(a.url or ["ws://127.0.0.1:8000/v1/miners/ws"])[0],
        standby_urls=(a.url or [])[1:],
        key=a.key,
        miner_id=a.miner_id,
        gpus=gpus,
        cuda=a.cuda,
        models=[m for m in a.models.split(",") if m],
        price=a.price,
        region=a.region,
        concurrency=a.concurrency,
        delay=a.delay,
        chunks=a.chunks,
        max_jobs=a.max_jobs,
        result_seed_hex=a.sign_results,
        load_interval=a.load_interval,
    )


def main(argv: list[str] | None = None) -> int:
    opts = _parse(argv)
    for url in [opts.url, *opts.standby_urls]:
        if (refused := url_refusal(url)) is not None:
            print(refused, file=sys.stderr)
            return 1
    miner = SimulatedMiner(opts)
    try:
        anyio.run(miner.run)
    except KeyboardInterrupt:
        pass
    return 0 if miner.refused is None else 1


if __name__ == "__main__":
    sys.exit(main())
