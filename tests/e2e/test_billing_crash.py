"""kill -9 in the middle of billing: the ledger loses nothing and counts nothing twice.

A real ``aitbc-coordinator serve`` with BILLING=on; a client submits paid jobs over REST
(each with its own idempotency key, retried with the same key across the crash) while socket
miners complete them; the server is killed with SIGKILL mid-load and restarted on the same
database. Afterwards, from the database itself: every entry pair sums to zero, every job that
exists was reserved once and settled once, completed jobs paid exactly their receipt's price,
no account is negative, and the client's balance is what it started with minus what miners got.
"""

from __future__ import annotations

import hashlib
import json
import signal
import time
from decimal import Decimal
from typing import TYPE_CHECKING

import anyio
import httpx
import pytest

from examples.ws_miner import MinerOptions, SimulatedMiner
from tests.conftest import ADMIN_KEY, CLIENT_KEY, MINER_KEY
from tests.e2e.processes import CoordinatorProcess, wait_for
from tests.postgres import fetch_rows

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.slow]

JOBS = 120
KILL_AT = 50
AMOUNT = "0.5"
FUNDS = Decimal(1000)


class PaidClient:
    """Submits JOBS paid jobs, retrying each with its idempotency key until acknowledged."""

    def __init__(self, server: CoordinatorProcess) -> None:
        self.server = server
        self.acked: dict[int, str] = {}
        self.refused: list[int] = []

    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    async def run(self) -> None:
        async with httpx.AsyncClient(trust_env=False, timeout=3.0) as http:
            for n in range(JOBS):
                while n not in self.acked:
                    try:
                        r = await http.post(
                            self.base() + "/v1/jobs",
                            json={
                                "payload": {"n": n},
                                "payment_amount": AMOUNT,
                                "idempotency_key": f"paid-{n}",
                            },
                            headers={"X-Api-Key": CLIENT_KEY},
                        )
                    except httpx.TransportError:
                        await anyio.sleep(0.02)  # the server is down: retry the same key
                        continue
                    if r.status_code in (200, 201):
                        self.acked[n] = r.json()["job_id"]
                    elif r.status_code == 402:
                        self.refused.append(n)
                        return
                    else:
                        await anyio.sleep(0.02)
                await anyio.sleep(0.005)


async def _active_jobs(server: CoordinatorProcess) -> int:
    async with httpx.AsyncClient(trust_env=False, timeout=3.0) as http:
        r = await http.get(
            f"http://127.0.0.1:{server.port}/v1/admin/stats", headers={"X-Api-Key": ADMIN_KEY}
        )
        return int(r.json()["active_jobs"])


@pytest.mark.timeout(90)
async def test_kill_9_mid_billing_loses_and_double_counts_nothing(
    tmp_path: Path, database_url: str
) -> None:
    with (tmp_path / "coordinator.log").open("a") as log:
        server = CoordinatorProcess(database_url, log)
        server.env["BILLING"] = "on"
        try:
            await server.start()
            async with httpx.AsyncClient(trust_env=False, timeout=5.0) as http:
                client_id = "client-" + hashlib.sha256(CLIENT_KEY.encode()).hexdigest()[:12]
                r = await http.post(
                    f"http://127.0.0.1:{server.port}/v1/admin/accounts/client:{client_id}/credit",
                    json={"amount": str(FUNDS)},
                    headers={"X-Api-Key": ADMIN_KEY},
                )
                assert r.status_code == 200, r.text
            client = PaidClient(server)
            miners = [
                SimulatedMiner(
                    MinerOptions(
                        url=server.url("/v1/miners/ws"),
                        key=MINER_KEY,
                        miner_id=f"bill-miner-{i}",
                        price=0.3,
                        concurrency=3,
                        delay=0.1,
                        chunks=1,
                    ),
                    log=lambda line: None,
                )
                for i in range(3)
            ]
            async with anyio.create_task_group() as tg:
                for m in miners:
                    tg.start_soon(m.run)
                tg.start_soon(client.run)
                await wait_for(lambda: len(client.acked) >= KILL_AT, 30)

                server.kill9()
                acked_at_kill = dict(client.acked)
                assert await server.wait_exit() == -signal.SIGKILL
                restarted_at = time.time()
                await server.restart(miners)
                await wait_for(lambda: len(client.acked) == JOBS, 40)
                with anyio.fail_after(30):
                    while await _active_jobs(server):  # noqa: ASYNC110 - a remote process
                        await anyio.sleep(0.05)
                tg.cancel_scope.cancel()
            await server.terminate()
        finally:
            await server.stop_now()
            print((tmp_path / "coordinator.log").read_text()[-3000:])

    assert client.refused == []
    entries = await fetch_rows(
        database_url, "SELECT movement_key, leg, account, amount, kind, ref, at FROM ledger_entries"
    )
    jobs = {
        job_id: (state, payment, receipt)
        for job_id, state, payment, receipt in await fetch_rows(
            database_url,
            # A receipt is stored once, in ``receipts`` (older rows: in the job row).
            "SELECT j.job_id, j.state, j.payment, COALESCE(j.receipt, r.receipt) "
            "FROM jobs AS j LEFT JOIN receipts AS r ON r.job_id = j.job_id",
        )
    }
    assert set(client.acked.values()) <= set(jobs)
    assert sum(e[3] for e in entries) == 0
    by_key: dict[str, list[int]] = {}
    balances: dict[str, int] = {}
    settled_at: dict[str, float] = {}
    for key, _, account, amount, kind, ref, at in entries:
        if kind in ("job_payment", "job_refund"):
            settled_at[ref] = at
        by_key.setdefault(key, []).append(amount)
        balances[account] = balances.get(account, 0) + amount
    assert all(len(v) == 2 and sum(v) == 0 for v in by_key.values())
    assert all(v >= 0 for a, v in balances.items() if not a.startswith("system:"))
    units = int(Decimal(AMOUNT) * 10**8)
    paid_total = 0
    completed = 0
    for job_id, (state, payment, receipt) in jobs.items():
        assert payment is not None
        assert state in ("COMPLETED", "FAILED", "CANCELED", "EXPIRED")
        assert by_key[f"job:{job_id}:reserve"] == [-units, units]
        assert balances.get(f"escrow:{job_id}", 0) == 0
        pay = by_key.get(f"job:{job_id}:pay", [0, 0])[1]
        refund = by_key.get(f"job:{job_id}:refund", [0, 0])[1]
        assert pay + refund == units
        if state == "COMPLETED":
            completed += 1
            price = json.loads(receipt)["price"]
            assert pay == min(units, int(Decimal(repr(price)) * 10**8))
        else:
            assert pay == 0
        paid_total += pay
    client_account = f"client:{client_id}"
    assert balances[client_account] == int(FUNDS * 10**8) - paid_total
    miner_total = sum(v for a, v in balances.items() if a.startswith("miner:"))
    assert miner_total == paid_total
    in_flight = [j for j in acked_at_kill.values() if settled_at[j] > restarted_at]
    print(
        f"jobs={len(jobs)} completed={completed} paid={paid_total / 1e8} AITBC "
        f"reserved before the kill and settled after it: {len(in_flight)}"
    )
    assert completed > 0
    assert in_flight, "every reservation was settled before the kill: the crash tested nothing"
