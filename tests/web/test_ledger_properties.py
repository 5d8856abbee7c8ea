"""Property: random submits, completions, failures, cancels, expiries and payment
confirmations (through the real app) keep the ledger balanced: sum(all entries) = 0, no
spendable account below zero, every escrow holds exactly its live job's reservation, the
in-memory view equals the store, and each confirmed payment is credited exactly once."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dispatcher.jobs import TERMINAL
from storage.memory import InMemoryJobStore
from tests.conftest import ADMIN_KEY, make_settings
from tests.fakes import FakeClock
from tests.web.rest_harness import miner_headers
from tests.web.wallet_helpers import KEY_A, KEY_B, bearer, login
from web.app import create_app

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.anyio

ADMIN = {"X-Api-Key": ADMIN_KEY}
SHARED = "bc1qsharedaddressfortests000000000000000"
UNIT = 10**8

op = st.one_of(
    st.tuples(st.just("pay"), st.integers(0, 1), st.integers(1, 20)),
    st.tuples(st.just("confirm"), st.integers(0, 9), st.booleans()),
    st.tuples(st.just("submit"), st.integers(0, 1), st.integers(1, 12)),
    st.tuples(st.just("start"), st.just(0), st.just(0)),
    st.tuples(st.just("complete"), st.integers(0, 9), st.integers(0, 30)),
    st.tuples(st.just("fail"), st.integers(0, 9), st.booleans()),
    st.tuples(st.just("cancel"), st.integers(0, 9), st.just(0)),
    st.tuples(st.just("expire"), st.just(0), st.just(0)),
)


class World:
    def __init__(self, http: httpx.AsyncClient, app: Any, clock: FakeClock) -> None:
        self.http, self.app, self.clock = http, app, clock
        self.core = app.state.core
        self.store: InMemoryJobStore = self.core.store
        self.users: list[dict[str, Any]] = []
        self.payments: list[str] = []
        self.jobs: list[tuple[str, dict[str, Any], int]] = []  # (job id, user, units)
        self.running: list[str] = []

    async def step(self, kind: str, a: int, b: Any) -> None:
        user = self.users[a % len(self.users)]
        auth = bearer(user["session_token"])
        if kind == "pay":
            r = await self.http.post(
                "/v1/exchange/create-payment", json={"aitbc_amount": b}, headers=auth
            )
            assert r.status_code == 200, r.text
            self.payments.append(r.json()["payment_id"])
        elif kind == "confirm" and self.payments:
            pid = self.payments[a % len(self.payments)]
            for _ in range(2 if b else 1):
                r = await self.http.post(f"/v1/admin/payments/{pid}/confirm", headers=ADMIN)
                assert r.status_code in (200, 409), r.text  # 409: expired
        elif kind == "submit":
            account = f"wallet:{user['wallet_address']}"
            enough = self.core.dispatcher.ledger.available(account) >= b * UNIT
            r = await self.http.post(
                "/v1/jobs",
                json={"payload": {}, "payment_amount": b, "ttl_seconds": 100},
                headers=auth,
            )
            assert r.status_code == (201 if enough else 402), r.text
            if enough:
                self.jobs.append((r.json()["job_id"], user, b * UNIT))
        elif kind == "start":
            r = await self.http.post(
                "/v1/miners/poll", json={"max_wait_seconds": 0}, headers=miner_headers("m1")
            )
            if r.status_code == 200:
                self.running.append(r.json()["job_id"])
        elif kind in ("complete", "fail") and self.running:
            job_id = self.running.pop(a % len(self.running))
            self.clock.advance(b if kind == "complete" else 1)
            if kind == "complete":
                r = await self.http.post(
                    f"/v1/miners/{job_id}/result",
                    json={"result": {"ok": True}},
                    headers=miner_headers("m1"),
                )
            else:
                r = await self.http.post(
                    f"/v1/miners/{job_id}/fail",
                    json={"error_code": "E", "error_message": "x"},
                    headers=miner_headers("m1"),
                )
            assert r.status_code in (200, 409), r.text  # 409: it had expired or was canceled
        elif kind == "cancel" and self.jobs:
            job_id, owner, _ = self.jobs[a % len(self.jobs)]
            r = await self.http.post(
                f"/v1/jobs/{job_id}/cancel", headers=bearer(owner["session_token"])
            )
            assert r.status_code in (200, 409), r.text
        elif kind == "expire":
            self.clock.advance(101)
            with anyio.fail_after(5):
                await anyio.wait_all_tasks_blocked()
        await self.core.dispatcher.wait_flushed()

    async def check(self) -> None:
        entries = list(self.store.entries.values())
        assert sum(e.amount for e in entries) == 0
        legs: dict[str, list[int]] = {}
        balances: dict[str, int] = {}
        for e in entries:
            legs.setdefault(e.movement_key, []).append(e.amount)
            balances[e.account] = balances.get(e.account, 0) + e.amount
        assert all(len(v) == 2 and sum(v) == 0 for v in legs.values())
        for account, value in balances.items():
            if not account.startswith(("exchange:", "system:")):
                assert value >= 0, (account, value)
        nonzero = {a: v for a, v in balances.items() if v}
        assert self.core.dispatcher.ledger.balances() == nonzero
        for job_id, _, units in self.jobs:
            job = self.store.jobs[job_id]
            held = balances.get(f"escrow:{job_id}", 0)
            assert held == (0 if job.state in TERMINAL else units), (job.state, held)
        for pid in self.payments:
            p = self.store.payments[pid]
            credits = [e for e in entries if e.movement_key == f"exchange:{pid}"]
            assert len(credits) == (2 if p.status == "confirmed" else 0)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(op, min_size=1, max_size=30))
async def test_random_histories_keep_the_ledger_balanced(tmp_path: Path, ops: list[Any]) -> None:
    clock = FakeClock()
    app = create_app(
        make_settings(tmp_path, billing=True, bitcoin_address=SHARED),
        store=InMemoryJobStore(),
        clock=clock,
    )
    with anyio.fail_after(25):
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                world = World(http, app, clock)
                world.users = [await login(http, KEY_A), await login(http, KEY_B)]
                for user in world.users:  # a starting balance, so submits mostly succeed
                    r = await http.post(
                        f"/v1/admin/accounts/wallet:{user['wallet_address']}/credit",
                        json={"amount": 25},
                        headers=ADMIN,
                    )
                    assert r.status_code == 200
                r = await http.post(
                    "/v1/miners/register",
                    json={"capabilities": {"price": 0.2}, "concurrency": 3},
                    headers=miner_headers("m1"),
                )
                assert r.status_code == 200
                for kind, a, b in ops:
                    await world.step(kind, a, b)
                    await world.check()
