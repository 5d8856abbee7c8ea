"""Chaos: socket miners that reject, fail, go silent, drop mid-job, report twice and report
late, REST miners that fail, abandon jobs and report after their lease ran out, a client that
cancels and reconnects, and two kill -9s of the coordinator, all in one run.

Whatever the interleaving, the two rules hold: every acknowledged job is stored and ends in
exactly one terminal state, its event log without gaps, and the client sees each event once;
a job completes at most once, with one receipt, for the attempt that completed it; every
receipt a miner was sent is the stored one (an acknowledgement is never lost in a crash); a
late result of an earlier attempt never gets a receipt; and the receipt chain audits clean.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import count
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from protocol.codec import decode_server_to_miner, encode
from protocol.messages import (
    Ack,
    Error,
    Hello,
    JobAccept,
    JobAssign,
    JobCancel,
    JobFail,
    JobProgress,
    JobReject,
    JobResult,
    Welcome,
)
from tests.conftest import MINER_KEY, MINER_KEY_2, SIGNING_SEED
from tests.e2e.processes import (
    EXE,
    CoordinatorProcess,
    LoadClient,
    assert_ended_once,
    stored,
    wait_for,
)

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.slow]

JOBS = 200
KILLS_AT = (70, 140)  # acknowledged submissions before each kill -9
MINERS = 4  # on sockets
REST_LEASE = 1.5  # seconds (REST_JOB_LEASE_SECONDS)
CAPS: dict[str, Any] = {"gpus": [{"name": "A100", "memory_mb": 40960}], "models": []}
# What a miner does with a job pushed to it, and how often.
ACTIONS = {
    "complete": 0.55,  # accept, progress, result
    "double": 0.10,  # the same, then the result again
    "reject": 0.08,
    "retry": 0.08,  # accept, then fail retryable
    "fail": 0.04,  # accept, then fail for good
    "silent": 0.05,  # never answer: the accept timeout takes the job back
    "drop": 0.10,  # accept, then cut the connection; report after the reconnect
}

# What a REST miner does with a job its poll got.
REST_ACTIONS = {
    "complete": 0.65,
    "retry": 0.10,  # fail retryable
    "abandon": 0.10,  # never report: the lease takes the job back
    "late": 0.15,  # report after the lease ran out (refused unless the job waited)
}


@dataclass(repr=False)
class ChaosMiner:
    """A socket miner that misbehaves on purpose and records every answer it was given."""

    server: CoordinatorProcess
    n: int
    rng: random.Random
    session_id: str | None = None
    held: dict[str, int] = field(default_factory=dict)  # accepted, not yet answered: attempt
    plan: dict[str, str] = field(default_factory=dict)  # job -> action
    due: dict[str, float] = field(default_factory=dict)  # job -> when to report it
    sent: dict[str, tuple[str, int]] = field(default_factory=dict)  # request id -> job, attempt
    receipts: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)
    refused: list[tuple[str, int, str]] = field(default_factory=list)
    stale: list[tuple[str, int]] = field(default_factory=list)  # reported after losing the job
    actions: Counter[str] = field(default_factory=Counter)
    resumed: int = 0  # jobs handed back by a welcome's ``resumed``
    ids: Any = field(default_factory=lambda: count(1))

    @property
    def miner_id(self) -> str:
        return f"chaos-miner-{self.n}"

    async def run(self) -> None:
        while True:
            try:
                await self._session()
            except* (WebSocketException, OSError, TimeoutError):
                pass  # the coordinator is down, or this miner cut the connection itself
            await anyio.sleep(0.02)

    async def _session(self) -> None:
        async with connect(
            self.server.url("/v1/miners/ws"),
            additional_headers={"X-Api-Key": MINER_KEY if self.n % 2 == 0 else MINER_KEY_2},
            compression=None,
            open_timeout=2,
        ) as ws:
            resume = self.session_id if self.rng.random() < 0.8 else None
            await self._send(
                ws,
                Hello(
                    protocol=1,
                    miner_id=self.miner_id,
                    capabilities=CAPS,
                    concurrency=2,
                    resume_session=resume,
                ),
            )
            welcome = decode_server_to_miner(await ws.recv())
            assert isinstance(welcome, Welcome), welcome
            self.session_id = welcome.session_id
            await self._welcomed(ws, welcome)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._report_due, ws)
                async for raw in ws:
                    await self._on_frame(ws, decode_server_to_miner(raw))

    async def _welcomed(self, ws: ClientConnection, welcome: Welcome) -> None:
        resumed = set(welcome.resumed)
        self.resumed += len(resumed)
        for job_id, attempt in list(self.held.items()):
            if job_id in resumed:  # still ours: report it (again, if the answer was lost)
                self.due[job_id] = time.monotonic()
            else:  # taken back while this miner was away: a late report of a stale attempt
                del self.held[job_id]
                self.due.pop(job_id, None)
                self.stale.append((job_id, attempt))
                await self._result(ws, job_id, attempt)
        for job_id in resumed - set(self.held):  # held by the coordinator, unknown here
            await self._send(
                ws,
                JobFail(
                    job_id=job_id, error_code="LOST", error_message="unknown here", retryable=True
                ),
            )

    async def _on_frame(self, ws: ClientConnection, msg: object) -> None:
        match msg:
            case JobAssign(job_id=job_id, attempt=attempt):
                await self._assigned(ws, job_id, attempt)
            case JobCancel(job_id=job_id):
                self.held.pop(job_id, None)
                self.due.pop(job_id, None)
            case Ack(id=request_id) if request_id in self.sent:
                job_id, attempt = self.sent.pop(request_id)
                self._answered(job_id, attempt)
                receipt = msg.fields.get("receipt")
                if isinstance(receipt, dict):
                    self.receipts.append((job_id, attempt, receipt))
            case Error(id=request_id) if request_id in self.sent:
                job_id, attempt = self.sent.pop(request_id)
                self._answered(job_id, attempt)
                self.refused.append((job_id, attempt, msg.code))

    def _answered(self, job_id: str, attempt: int) -> None:
        if self.held.get(job_id) == attempt:  # (a resumed job's report may be due again)
            del self.held[job_id]
            self.due.pop(job_id, None)

    async def _assigned(self, ws: ClientConnection, job_id: str, attempt: int) -> None:
        action = self.rng.choices(list(ACTIONS), weights=list(ACTIONS.values()))[0]
        self.actions[action] += 1
        if action == "reject":
            await self._send(ws, JobReject(job_id=job_id, reason="chaos", attempt=attempt))
            return
        if action == "silent":
            return
        self.held[job_id] = attempt
        self.plan[job_id] = action
        self.due[job_id] = time.monotonic() + self.rng.uniform(0.02, 0.3)
        await self._send(ws, JobAccept(job_id=job_id, attempt=attempt))
        if action == "drop":
            self.plan[job_id] = "complete"  # after the reconnect
            ws.transport.abort()  # no close handshake: as if the network went away

    async def _report_due(self, ws: ClientConnection) -> None:
        while True:
            await anyio.sleep(0.01)
            now = time.monotonic()
            for job_id in [j for j, when in self.due.items() if when <= now]:
                del self.due[job_id]
                await self._report(ws, job_id, self.held[job_id], self.plan[job_id])

    async def _report(self, ws: ClientConnection, job_id: str, attempt: int, action: str) -> None:
        if action in ("retry", "fail"):
            del self.held[job_id]
            fail = JobFail(
                job_id=job_id,
                error_code="CHAOS",
                error_message="told to fail",
                retryable=action == "retry",
                attempt=attempt,
            )
            await self._send(ws, fail)
            return
        await self._send(ws, JobProgress(job_id=job_id, progress=0.5, attempt=attempt))
        await self._result(ws, job_id, attempt)
        if action == "double":
            await self._result(ws, job_id, attempt)

    async def _result(self, ws: ClientConnection, job_id: str, attempt: int) -> None:
        request_id = f"r{next(self.ids)}"
        self.sent[request_id] = (job_id, attempt)
        result = JobResult(
            job_id=job_id, result={"output": "ok"}, id=request_id, attempt=attempt, metrics={}
        )
        await self._send(ws, result)

    @staticmethod
    async def _send(ws: ClientConnection, msg: object) -> None:
        await ws.send(encode(msg).decode())


@dataclass(repr=False)
class RestChaosMiner:
    """A REST miner (upstream's polling shapes) that misbehaves on purpose."""

    server: CoordinatorProcess
    n: int
    rng: random.Random
    receipts: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)
    refused: list[tuple[str, int, int]] = field(default_factory=list)  # job, attempt, status
    actions: Counter[str] = field(default_factory=Counter)

    @property
    def miner_id(self) -> str:
        return f"chaos-rest-miner-{self.n}"

    async def run(self) -> None:
        headers = {"X-Api-Key": MINER_KEY, "X-Miner-ID": self.miner_id}
        async with httpx.AsyncClient(trust_env=False, timeout=10, headers=headers) as http:
            while True:
                try:
                    await self._polls(http)
                except httpx.TransportError:
                    pass  # the coordinator is down
                await anyio.sleep(0.05)

    async def _polls(self, http: httpx.AsyncClient) -> None:
        base = f"http://127.0.0.1:{self.server.port}/v1/miners"
        body = {"capabilities": CAPS, "concurrency": 1}
        if (await http.post(f"{base}/register", json=body)).status_code != 200:
            return
        while True:
            r = await http.post(f"{base}/poll", json={"max_wait_seconds": 3})
            if r.status_code == 204:
                continue
            if r.status_code != 200:
                return
            job_id, attempt = r.json()["job_id"], int(r.json()["attempt"])
            action = self.rng.choices(list(REST_ACTIONS), weights=list(REST_ACTIONS.values()))[0]
            self.actions[action] += 1
            if action == "abandon":
                continue
            if action == "late":
                await anyio.sleep(REST_LEASE + 0.5)
            if action == "retry":
                failure = {"error_code": "CHAOS", "error_message": "told to fail"}
                report = {**failure, "retryable": True, "attempt": attempt}
                r = await http.post(f"{base}/{job_id}/fail", json=report)
            else:
                report = {"result": {"output": "ok"}, "metrics": {}, "attempt": attempt}
                r = await http.post(f"{base}/{job_id}/result", json=report)
            if r.status_code != 200:
                self.refused.append((job_id, attempt, r.status_code))
            elif isinstance(receipt := r.json().get("receipt"), dict):
                self.receipts.append((job_id, attempt, receipt))


def _audit(database_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EXE), "receipts", "audit"],
        env={"DATABASE_URL": database_url, "RECEIPT_SIGNING_KEY_HEX": SIGNING_SEED},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def _acknowledged(client: LoadClient, n: int) -> None:
    await wait_for(lambda: len(client.job_of) >= n, 60)


@pytest.mark.timeout(150)
async def test_chaos_keeps_every_job_and_completes_each_at_most_once(
    tmp_path: Path, database_url: str
) -> None:
    with (tmp_path / "coordinator.log").open("a") as log:
        server = CoordinatorProcess(database_url, log)
        server.env["JOB_TTL_SECONDS"] = "40"  # whatever the chaos, every job ends
        server.env["REST_JOB_LEASE_SECONDS"] = str(REST_LEASE)
        client = LoadClient(server, jobs=JOBS, pace=0.01, cancel=lambda n: n % 17 == 5)
        miners = [ChaosMiner(server, i, random.Random(1000 + i)) for i in range(MINERS)]
        rest_miners = [RestChaosMiner(server, i, random.Random(2000 + i)) for i in range(2)]
        kills = 0
        try:
            await server.start()
            async with anyio.create_task_group() as tg:
                for run in [*(m.run for m in miners), *(m.run for m in rest_miners)]:
                    tg.start_soon(run)
                tg.start_soon(client.run)
                for kill_at in KILLS_AT:
                    await _acknowledged(client, kill_at)
                    server.kill9()
                    assert await server.wait_exit() == -signal.SIGKILL
                    kills += 1
                    await server.restart()
                with anyio.move_on_after(60):
                    await client.done.wait()
                assert client.done.is_set(), client.describe_pending()
                tg.cancel_scope.cancel()
            await server.terminate()
        finally:
            await server.stop_now()
            print((tmp_path / "coordinator.log").read_text()[-4000:])

    jobs, events, receipt_counts = await stored(database_url)
    states = Counter(j.state for j in jobs.values())
    actions = sum((m.actions for m in miners), Counter())
    rest_actions = sum((m.actions for m in rest_miners), Counter())
    print(f"kills={kills} sessions={client.sessions} states={dict(states)} actions={dict(actions)}")
    print(f"rest actions={dict(rest_actions)} rest refused={[m.refused for m in rest_miners]}")
    answers = Counter(client.cancel_answers.values())
    print(f"cancels: sent {len(client.cancels_sent)}, answers {dict(answers)}")
    print(f"resumed={sum(m.resumed for m in miners)} stale={sum(len(m.stale) for m in miners)}")

    # Every acknowledged job is stored, once per idempotency key, and ended exactly once.
    assert kills == len(KILLS_AT)
    assert set(jobs) == set(client.job_of.values())
    assert len(jobs) == JOBS
    for job_id, job in jobs.items():
        kinds = assert_ended_once(job, events[job_id], receipt_counts.get(job_id, 0), client)
        if job.state == "CANCELED":
            assert job_id in client.cancels_sent, (job_id, kinds)
        if client.cancel_answers.get(job_id) == "ok":  # an acknowledged cancel is durable
            assert job.state == "CANCELED", (job_id, kinds)
    assert client.redelivered == []

    # Every receipt a miner was sent is the stored one, for the attempt it reported.
    receipt_ids: dict[str, set[str]] = defaultdict(set)
    reports = [(m.miner_id, r) for m in miners for r in m.receipts]
    reports += [(m.miner_id, r) for m in rest_miners for r in m.receipts]
    for miner_id, (job_id, attempt, receipt) in reports:
        job = jobs[job_id]
        assert job.state == "COMPLETED", (job_id, job.state)
        assert receipt == job.receipt, job_id
        # A late report of an attempt taken back is refused, never given this receipt.
        assert (attempt, miner_id) == (receipt["attempt"], receipt["provider"]), job_id
        receipt_ids[job_id].add(str(receipt["receipt_id"]))
    assert all(len(ids) == 1 for ids in receipt_ids.values())

    # The chaos happened: every kind of misbehaviour, and each kind of ending.
    assert set(actions) == set(ACTIONS), actions
    assert set(rest_actions) == set(REST_ACTIONS), rest_actions
    assert states["COMPLETED"] > JOBS // 2, states
    assert states["CANCELED"] >= 1, states
    audit = _audit(database_url)
    assert audit.returncode == 0, audit.stdout + audit.stderr
