"""The BTC exchange: quotes, addresses, status, admin confirmation, the Esplora watcher."""

from __future__ import annotations

import socket
import sys
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest
import uvicorn
from bip_utils import Bip44Changes, Bip84, Bip84Coins
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from storage.errors import StorageError
from tests.conftest import ADMIN_KEY, CLIENT_KEY, CLIENT_KEY_2
from tests.fakes import FakeClock, RecordingStore
from tests.web.rest_harness import Api, answered_after_commit, running_api
from tests.web.wallet_helpers import bearer, login
from web import esplora

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    from starlette.requests import Request

pytestmark = pytest.mark.anyio

ADMIN = {"X-Api-Key": ADMIN_KEY}
CLIENT = {"X-Api-Key": CLIENT_KEY}
SHARED = "bc1qsharedaddressfortests000000000000000"
_ACCOUNT = Bip84.FromSeed(bytes(range(32)), Bip84Coins.BITCOIN).Purpose().Coin().Account(0)
XPUB = _ACCOUNT.PublicKey().ToExtended()
TXID = "ab" * 32


def derived(index: int) -> str:
    return str(_ACCOUNT.Change(Bip44Changes.CHAIN_EXT).AddressIndex(index).PublicKey().ToAddress())


async def create(api: Api, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    return await api.http.post("/v1/exchange/create-payment", json=body, headers=headers or CLIENT)


async def status(api: Api, pid: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return await api.http.get(f"/v1/exchange/payment-status/{pid}", headers=headers or CLIENT)


async def client_balance(api: Api) -> str:
    r = await api.http.get("/v1/admin/accounts/client:" + api_client_id(api), headers=ADMIN)
    return str(r.json()["balance"])


def api_client_id(api: Api) -> str:
    principal = api.core.auth.from_token(CLIENT_KEY)
    return str(principal.id)


async def test_rates_are_public_and_exact(tmp_path: Path) -> None:
    async with running_api(tmp_path) as api:
        r = await api.http.get("/v1/exchange/rates")
        assert r.status_code == 200
        assert r.json()["btc_to_aitbc"] == "100000.00000000"
        assert r.json()["aitbc_to_btc"] == "0.00001000"


async def market_stats(api: Api) -> dict[str, Any]:
    r = await api.http.get("/v1/exchange/market-stats")  # public: no credential
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


async def test_market_stats_count_payments_and_the_last_days_volume(tmp_path: Path) -> None:
    """Price from the configured rate, no invented 24 h change; volume = payments confirmed in
    the last 24 h (AITBC and BTC, exact decimals); pending ones expire when stats are read."""
    clock = FakeClock()
    async with running_api(tmp_path, clock, bitcoin_address=SHARED) as api:
        assert await market_stats(api) == {
            "price": "0.00001000",
            "price_change_24h": None,
            "daily_volume": "0.00000000",
            "daily_volume_btc": "0.00000000",
            "total_payments": 0,
            "pending_payments": 0,
        }
        paid = (await create(api, aitbc_amount=10000)).json()["payment_id"]
        await create(api, aitbc_amount=5)
        clock.advance(1800)
        await create(api, aitbc_amount="0.5")
        r = await api.http.post(f"/v1/admin/payments/{paid}/confirm", headers=ADMIN)
        assert r.status_code == 200, r.text
        stats = await market_stats(api)
        assert (stats["total_payments"], stats["pending_payments"]) == (3, 2)
        assert (stats["daily_volume"], stats["daily_volume_btc"]) == (
            "10000.00000000",
            "0.10000000",
        )
        clock.advance(1801)  # the 5 AITBC order is past its hour; the 0.5 one is not
        stats = await market_stats(api)
        assert (stats["total_payments"], stats["pending_payments"]) == (3, 1)
        assert stats["daily_volume"] == "10000.00000000"
        clock.advance(86400 - 1801)  # 24 h after the confirmation: still in the window
        assert (await market_stats(api))["daily_volume"] == "10000.00000000"
        clock.advance(1)
        stats = await market_stats(api)
        assert (stats["daily_volume"], stats["daily_volume_btc"]) == ("0.00000000", "0.00000000")
        assert (stats["total_payments"], stats["pending_payments"]) == (3, 0)
    async with running_api(tmp_path, btc_to_aitbc_rate="250000") as api:
        stats = await market_stats(api)
        assert (stats["price"], stats["price_change_24h"]) == ("0.00000400", None)
        assert stats["total_payments"] == 3


async def test_unconfigured_exchange_is_503(tmp_path: Path) -> None:
    async with running_api(tmp_path) as api:
        r = await create(api, aitbc_amount=100)
        assert r.status_code == 503


async def test_create_with_a_shared_address_gives_unique_amounts(tmp_path: Path) -> None:
    """10000 AITBC = 0.1 BTC; a second pending order on the address gets 1 sat more."""
    clock = FakeClock()
    async with running_api(tmp_path, clock, bitcoin_address=SHARED) as api:
        r = await create(api, user_id="u1", aitbc_amount=10000)
        assert r.status_code == 200, r.text
        first = r.json()
        assert first["status"] == "pending"
        assert (first["aitbc_amount"], first["btc_amount"]) == ("10000.00000000", "0.10000000")
        assert first["payment_address"] == SHARED
        assert first["expires_at"] - first["created_at"] == 3600
        assert (first["confirmations"], first["tx_hash"]) == (0, None)
        assert first["user_id"] == api_client_id(api)  # the caller, not the body's user_id
        second = (await create(api, btc_amount="0.1")).json()
        assert second["btc_amount"] == "0.10000001"
        assert second["aitbc_amount"] == "10000.00000000"


@pytest.mark.parametrize(
    ("body", "code", "detail"),
    [
        ({"aitbc_amount": 10000, "btc_amount": "0.5"}, 400, "Amount mismatch"),
        ({"aitbc_amount": 10000, "eth_amount": 10}, 400, None),
        ({"aitbc_amount": -1}, 422, None),
        ({"aitbc_amount": "0.001"}, 422, None),
        ({"aitbc_amount": 2_000_000}, 422, None),
        ({"aitbc_amount": "x"}, 422, None),
        ({}, 422, None),
        ({"aitbc_amount": 1, "user_id": "bad id!"}, 422, None),
        # past Decimal's largest exponent: was a 500 (InvalidOperation)
        ({"btc_amount": "1E+1000000000000000000"}, 422, "btc_amount is too large"),
    ],
)
async def test_create_refuses_bad_orders(
    tmp_path: Path, body: dict[str, Any], code: int, detail: str | None
) -> None:
    async with running_api(tmp_path, bitcoin_address=SHARED) as api:
        r = await create(api, **body)
        assert r.status_code == code, r.text
        if detail:
            assert r.json() == {"detail": detail}
        ok = await create(api, aitbc_amount=10000, btc_amount="0.1")
        assert ok.status_code == 200


async def test_an_order_beyond_all_bitcoin_is_refused(tmp_path: Path) -> None:
    """At a rate of 0.00000001 AITBC per BTC (accepted by the settings), 1,000,000 AITBC was
    10^22 satoshis: the payment's commit overflowed its 64-bit column and stopped the
    coordinator. No order asks more than the 21 million BTC there are."""
    rate = {"btc_to_aitbc_rate": "0.00000001"}
    async with running_api(tmp_path, bitcoin_address=SHARED, **rate) as api:
        r = await create(api, aitbc_amount=1000000)
        assert r.status_code == 422, r.text
        assert r.json() == {"detail": "btc_amount must be at most 21000000 BTC"}
        r = await create(api, aitbc_amount="0.21")  # 21,000,000 BTC exactly
        assert (r.status_code, r.json()["btc_amount"]) == (200, "21000000.00000000")
        assert api.core.ready


async def test_a_payer_has_at_most_max_pending_payments(tmp_path: Path) -> None:
    """Nothing limited pending payments per payer: one client key (the rate limit off by
    default) made 10,000 requests of 1,000,000 AITBC, which held the ledger cap (they counted
    against it then) for an hour, each request also burning an xpub address index. A payer
    has at most MAX_PENDING_PAYMENTS pending (409, no address used); settling one (confirmed,
    expired, also after a restart) frees a place, and other payers are not affected."""
    clock = FakeClock()
    limit = {"bitcoin_xpub": XPUB, "max_pending_payments": 3}
    async with running_api(tmp_path, clock, **limit) as api:
        ids = [(await create(api, aitbc_amount=1_000_000)).json()["payment_id"] for _ in range(3)]
        r = await create(api, aitbc_amount=1)
        assert r.status_code == 409, r.text
        assert r.json() == {
            "detail": "you have 3 pending payments (MAX_PENDING_PAYMENTS): "
            "pay one or let one expire first"
        }
        user = await login(api.http)
        other = await create(api, bearer(user["session_token"]), aitbc_amount=1_000_000)
        assert (other.status_code, other.json()["payment_address"]) == (200, derived(3))
        r = await api.http.post(f"/v1/admin/payments/{ids[0]}/confirm", headers=ADMIN)
        assert r.status_code == 200, r.text
        r = await create(api, aitbc_amount=1)
        assert (r.status_code, r.json()["payment_address"]) == (200, derived(4))
        assert (await create(api, aitbc_amount=1)).status_code == 409
    async with running_api(tmp_path, clock, **limit) as api:
        assert (await create(api, aitbc_amount=1)).status_code == 409  # loaded pending
        clock.advance(3601)
        assert (await status(api, ids[1])).json()["status"] == "expired"
        r = await create(api, aitbc_amount=1)
        assert (r.status_code, r.json()["payment_address"]) == (200, derived(5))


async def test_overdue_payments_free_their_places_without_a_watcher(tmp_path: Path) -> None:
    """Without ESPLORA_URL payments expire when someone looks (payment-status, market-stats),
    but a new request did not look: a payer whose MAX_PENDING_PAYMENTS requests were all
    past their hour was refused 409 "let one expire first" for good, and an admin could
    confirm (and credit) a request past its deadline that a status read would have shown
    expired. Both now expire what is overdue first."""
    clock = FakeClock()
    limit = {"bitcoin_xpub": XPUB, "max_pending_payments": 1}
    async with running_api(tmp_path, clock, **limit) as api:
        first = (await create(api, aitbc_amount=1)).json()["payment_id"]
        assert (await create(api, aitbc_amount=1)).status_code == 409
        clock.advance(3601)
        r = await create(api, aitbc_amount=1)
        assert r.status_code == 200, r.text
        assert (await status(api, first)).json()["status"] == "expired"
        clock.advance(3601)
        r = await api.http.post(
            f"/v1/admin/payments/{r.json()['payment_id']}/confirm", headers=ADMIN
        )
        assert (r.status_code, r.json()) == (409, {"detail": "payment is expired"})
        assert await client_balance(api) == "0.00000000"


async def test_a_pending_payments_refusal_waits_for_the_payment_it_counts(tmp_path: Path) -> None:
    """The MAX_PENDING_PAYMENTS refusal counts a payment whose request is still being
    committed: it is answered once that payment is (it must not show what a failed commit
    would undo)."""
    store = RecordingStore()
    limit = {"bitcoin_xpub": XPUB, "max_pending_payments": 1}
    async with running_api(tmp_path, FakeClock(), store=store, **limit) as api:
        answers = await answered_after_commit(
            api,
            store,
            ("first", create(api, aitbc_amount=1)),
            ("second", create(api, aitbc_amount=1)),
        )
        assert sorted(answers) == [("first", 200), ("second", 409)]


async def test_xpub_gives_each_payment_its_own_address_across_restarts(tmp_path: Path) -> None:
    async with running_api(tmp_path, bitcoin_xpub=XPUB) as api:
        a = (await create(api, aitbc_amount=1)).json()
        b = (await create(api, aitbc_amount=1)).json()
        assert [a["payment_address"], b["payment_address"]] == [derived(0), derived(1)]
        assert a["btc_amount"] == b["btc_amount"] == "0.00001000"
    async with running_api(tmp_path, bitcoin_xpub=XPUB) as api:
        c = (await create(api, aitbc_amount=1)).json()
        assert c["payment_address"] == derived(2)
        assert (await status(api, a["payment_id"])).json()["status"] == "pending"


async def test_status_owner_admin_other_and_unknown(tmp_path: Path) -> None:
    async with running_api(tmp_path, bitcoin_address=SHARED) as api:
        pid = (await create(api, aitbc_amount=5)).json()["payment_id"]
        assert (await status(api, pid)).json()["status"] == "pending"
        assert (await status(api, pid, ADMIN)).status_code == 200
        r = await status(api, pid, {"X-Api-Key": CLIENT_KEY_2})
        assert r.status_code == 404
        r = await status(api, "no-such-payment")
        assert (r.status_code, r.json()) == (404, {"detail": "Payment not found"})


async def test_admin_confirm_credits_exactly_once(tmp_path: Path) -> None:
    async with running_api(tmp_path, bitcoin_address=SHARED) as api:
        user = await login(api.http)
        headers = bearer(user["session_token"])
        pid = (await create(api, headers, aitbc_amount=10000)).json()["payment_id"]
        for _ in range(2):
            r = await api.http.post(
                f"/v1/admin/payments/{pid}/confirm", json={"tx_hash": TXID}, headers=ADMIN
            )
            assert r.status_code == 200, r.text
            assert (r.json()["status"], r.json()["tx_hash"]) == ("confirmed", TXID)
        r = await api.http.get(f"/v1/users/{user['user_id']}/balance", headers=headers)
        assert r.json()["balance"] == "10000.00000000"
        r = await api.http.get(f"/v1/users/{user['user_id']}/transactions", headers=headers)
        assert [t["type"] for t in r.json()["transactions"]] == ["exchange_credit"]
        assert (await status(api, pid, headers)).json()["status"] == "confirmed"
        r = await api.http.post("/v1/admin/payments/nope/confirm", headers=ADMIN)
        assert r.status_code == 404
        other = (await create(api, headers, aitbc_amount=1)).json()["payment_id"]
        r = await api.http.post(
            f"/v1/admin/payments/{other}/confirm", json={"tx_hash": TXID}, headers=ADMIN
        )
        assert r.status_code == 409  # that output already paid the first payment
        r = await api.http.post(
            f"/v1/admin/payments/{other}/confirm", json={"tx_hash": "zz"}, headers=ADMIN
        )
        assert r.status_code == 422
        r = await api.http.post(f"/v1/admin/payments/{other}/confirm", headers=CLIENT)
        assert r.status_code == 403


async def test_unpaid_payment_expires_and_cannot_be_confirmed(tmp_path: Path) -> None:
    clock = FakeClock()
    async with running_api(tmp_path, clock, bitcoin_address=SHARED) as api:
        pid = (await create(api, aitbc_amount=5)).json()["payment_id"]
        clock.advance(3599)
        assert (await status(api, pid)).json()["status"] == "pending"
        clock.advance(2)
        assert (await status(api, pid)).json()["status"] == "expired"
        r = await api.http.post(f"/v1/admin/payments/{pid}/confirm", headers=ADMIN)
        assert (r.status_code, r.json()) == (409, {"detail": "payment is expired"})
        assert await client_balance(api) == "0.00000000"


async def test_overdue_payments_expire_in_one_commit(tmp_path: Path) -> None:
    """Reading a status expires every overdue payment in one write: each was committed on its
    own, one after the other, so with many overdue payments the read (and the public
    market-stats) waited for as many commits."""
    clock = FakeClock()
    many = {"max_pending_payments": 20}
    async with running_api(tmp_path, clock, bitcoin_address=SHARED, **many) as api:
        ids = [(await create(api, aitbc_amount=1)).json()["payment_id"] for _ in range(20)]
        clock.advance(3601)
        before = api.core.dispatcher.writer_statistics()["batches"]
        assert (await status(api, ids[0])).json()["status"] == "expired"
        assert api.core.dispatcher.writer_statistics()["batches"] == before + 1
        for pid in ids:
            assert (await status(api, pid)).json()["status"] == "expired"
        assert api.core.exchange.pending == {}


# ---- the watcher, against a local Esplora-shaped server -------------------------------------


class FakeEsplora:
    """Serves ``/blocks/tip/height``, ``/address/{a}/txs`` and ``/tx/{txid}`` (404 for a txid
    no address lists) from dicts the test edits."""

    def __init__(self) -> None:
        self.tip = 100
        self.txs: dict[str, list[dict[str, Any]]] = {}
        self.fail = False
        self.requests = 0
        self.body: bytes | None = None  # the txs answer as is, when set
        self.broken: set[str] = set()  # txids whose lookup fails (502)
        self.nulls: set[str] = set()  # txids whose lookup answers 200 null
        self.broken_addresses: set[str] = set()  # addresses whose list fails (500)
        self.on_txs: Callable[[str], None] | None = None  # called with each address asked
        # Answer as Esplora does: newest first, at most 50 unconfirmed and 25 confirmed, older
        # confirmed ones by pages of 25 (``/address/{a}/txs/chain/{last txid}``).
        self.paged = False
        self.chain_pages = 0
        self.chain_body: bytes | None = None  # the older pages' answer as is, when set

    def pay(
        self,
        address: str,
        sats: int,
        txid: str = TXID,
        height: int | None = None,
        block_time: float | None = None,
    ) -> None:
        status: dict[str, Any] = {"confirmed": height is not None, "block_height": height}
        if block_time is not None:
            status["block_time"] = int(block_time)
        self.txs.setdefault(address, []).append(
            {
                "txid": txid,
                "status": status,
                "vout": [
                    {"scriptpubkey_address": "bc1qchange", "value": 5},
                    {"scriptpubkey_address": address, "value": sats},
                ],
            }
        )

    @staticmethod
    def chain(listed: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The confirmed ones, newest first (highest block, then last paid)."""
        confirmed = [t for t in reversed(listed) if t["status"]["confirmed"]]
        return sorted(confirmed, key=lambda t: -t["status"]["block_height"])

    def app(self) -> Starlette:
        async def tip(request: Request) -> PlainTextResponse:
            self.requests += 1
            if self.fail:
                return PlainTextResponse("down", status_code=503)
            return PlainTextResponse(str(self.tip))

        async def txs(request: Request) -> Response:
            self.requests += 1
            if self.body is not None:
                return Response(self.body, media_type="application/json")
            if self.on_txs is not None:
                self.on_txs(request.path_params["address"])
            if request.path_params["address"] in self.broken_addresses:
                return PlainTextResponse("internal error", status_code=500)
            listed = self.txs.get(request.path_params["address"], [])
            if not self.paged:
                return JSONResponse(listed)
            mempool = [t for t in reversed(listed) if not t["status"]["confirmed"]]
            return JSONResponse(mempool[:50] + self.chain(listed)[:25])

        async def chain(request: Request) -> Response:
            self.requests += 1
            self.chain_pages += 1
            if self.chain_body is not None:
                return Response(self.chain_body, media_type="application/json")
            listed = self.chain(self.txs.get(request.path_params["address"], []))
            after = [t["txid"] for t in listed].index(request.path_params["last"]) + 1
            return JSONResponse(listed[after : after + 25])

        return Starlette(
            routes=[
                Route("/blocks/tip/height", tip),
                Route("/address/{address}/txs", txs),
                Route("/address/{address}/txs/chain/{last}", chain),
                Route("/tx/{txid}", self.tx),
            ]
        )

    async def tx(self, request: Request) -> Response:
        self.requests += 1
        txid = request.path_params["txid"]
        if txid in self.broken:
            return PlainTextResponse("bad gateway", status_code=502)
        if txid in self.nulls:
            return Response(b"null", media_type="application/json")
        for t in (t for listed in self.txs.values() for t in listed):
            if t["txid"] == txid:
                return JSONResponse(t)
        return PlainTextResponse("Transaction not found", status_code=404)


@asynccontextmanager
async def esplora_server() -> AsyncIterator[tuple[FakeEsplora, str]]:
    fake = FakeEsplora()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(fake.app(), log_level="warning", lifespan="off"))
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            with anyio.fail_after(10):
                while not server.started:  # noqa: ASYNC110 - uvicorn's readiness is a flag
                    await anyio.sleep(0.005)
            yield fake, f"http://127.0.0.1:{sock.getsockname()[1]}"
            server.should_exit = True
    finally:
        sock.close()


@asynccontextmanager
async def watched_api(
    tmp_path: Path, clock: FakeClock, **settings: Any
) -> AsyncIterator[tuple[Api, FakeEsplora, httpx.AsyncClient]]:
    async with (
        esplora_server() as (fake, url),
        running_api(
            tmp_path, clock, esplora_url=url, esplora_poll_seconds=86400.0, **settings
        ) as api,
        httpx.AsyncClient(trust_env=False, timeout=5) as http,
    ):
        yield api, fake, http


async def test_watcher_confirms_a_paid_xpub_address_once(tmp_path: Path) -> None:
    """An output of at least the amount with one confirmation credits the payer, once."""
    clock = FakeClock()
    async with watched_api(tmp_path, clock, bitcoin_xpub=XPUB) as (api, fake, http):
        p = (await create(api, aitbc_amount=1000)).json()
        watcher = api.core.watcher
        await watcher.poll_once(http)
        assert (await status(api, p["payment_id"])).json()["status"] == "pending"
        fake.pay(p["payment_address"], 1_000_000 + 7, height=None)  # in the mempool
        await watcher.poll_once(http)
        seen = (await status(api, p["payment_id"])).json()
        assert (seen["status"], seen["tx_hash"], seen["confirmations"]) == ("pending", TXID, 0)
        clock.advance(4000)  # past expiry, but an output was seen: it waits for it
        await watcher.poll_once(http)
        assert (await status(api, p["payment_id"])).json()["status"] == "pending"
        fake.txs[p["payment_address"]][0]["status"] = {"confirmed": True, "block_height": 100}
        await watcher.poll_once(http)
        await watcher.poll_once(http)
        done = (await status(api, p["payment_id"])).json()
        assert (done["status"], done["confirmations"]) == ("confirmed", 1)
        assert await client_balance(api) == "1000.00000000"
        assert sum(api.core.dispatcher.ledger.balances().values()) == 0


async def test_an_xpub_address_is_not_paid_by_an_output_mined_before_the_request(
    tmp_path: Path,
) -> None:
    """With BITCOIN_XPUB any output of at least the amount paid the payment, however old: an
    address index handed out again (the database restored from a backup, or the xpub's
    wallet using the index too) credited its new payer with someone else's earlier money.
    As on a shared address, an output in a block timed over two hours before the request
    does not pay it; a new one does."""
    clock = FakeClock()
    async with watched_api(tmp_path, clock, bitcoin_xpub=XPUB) as (api, fake, http):
        p = (await create(api, aitbc_amount=1000)).json()
        old = clock.now() - 3 * 3600
        fake.pay(p["payment_address"], 1_000_000, txid="aa" * 32, height=90, block_time=old)
        await api.core.watcher.poll_once(http)
        assert (await status(api, p["payment_id"])).json()["status"] == "pending"
        assert await client_balance(api) == "0.00000000"
        fake.pay(
            p["payment_address"], 1_000_000, txid="bb" * 32, height=100, block_time=clock.now()
        )
        await api.core.watcher.poll_once(http)
        done = (await status(api, p["payment_id"])).json()
        assert (done["status"], done["tx_hash"]) == ("confirmed", "bb" * 32)
        assert await client_balance(api) == "1000.00000000"


async def test_a_status_read_shows_the_watchers_chain_facts_once_saved(tmp_path: Path) -> None:
    """payment-status showed the output the watcher had just seen (tx_hash, confirmations)
    while the save of it was still being committed (a failed commit then stops the
    coordinator, and the restarted one never saw it). The read is answered once it is saved."""
    clock, store = FakeClock(), RecordingStore()
    async with watched_api(tmp_path, clock, store=store, bitcoin_xpub=XPUB) as (api, fake, http):
        pid = (await create(api, aitbc_amount=10)).json()["payment_id"]
        fake.pay(api.core.exchange.pending[pid].address, 10_000)  # in the mempool
        store.block_commits()
        read: list[dict[str, Any]] = []

        async def read_status() -> None:
            read.append((await status(api, pid)).json())

        async with anyio.create_task_group() as tg:
            tg.start_soon(api.core.watcher.poll_once, http)
            with anyio.fail_after(5):
                while not store.waiting:  # noqa: ASYNC110 - bounded poll: the save is held
                    await anyio.sleep(0.005)
            tg.start_soon(read_status)
            await api.settle()
            assert read == []
            store.release_commits()
        assert [(r["status"], r["tx_hash"], r["confirmations"]) for r in read] == [
            ("pending", TXID, 0)
        ]


async def test_watcher_matches_exact_unique_amounts_on_a_shared_address(tmp_path: Path) -> None:
    clock = FakeClock()
    async with watched_api(tmp_path, clock, bitcoin_address=SHARED, btc_confirmations=2) as (
        api,
        fake,
        http,
    ):
        a = (await create(api, aitbc_amount=1000)).json()
        b = (await create(api, aitbc_amount=1000)).json()
        assert (a["btc_amount"], b["btc_amount"]) == ("0.01000000", "0.01000001")
        fake.pay(SHARED, 1_000_001, txid="cd" * 32, height=99)  # pays b exactly
        fake.pay(SHARED, 1_000_009, txid="ef" * 32, height=99)  # an amount nobody asked
        await api.core.watcher.poll_once(http)
        assert (await status(api, a["payment_id"])).json()["status"] == "pending"
        assert (await status(api, b["payment_id"])).json()["status"] == "confirmed"
        assert await client_balance(api) == "1000.00000000"
        clock.advance(3601)
        await api.core.watcher.poll_once(http)
        assert (await status(api, a["payment_id"])).json()["status"] == "expired"
        fake.pay(SHARED, 1_000_000, txid="aa" * 32, height=100)  # late, to a's expired amount
        c = (await create(api, aitbc_amount=1000)).json()
        assert c["btc_amount"] == "0.01000002"  # a's amount is held a day ...
        await api.core.watcher.poll_once(http)  # ... so a's late payment never pays c
        assert (await status(api, c["payment_id"])).json()["status"] == "pending"
        fake.pay(SHARED, 1_000_002, txid="bb" * 32, height=99)
        await api.core.watcher.poll_once(http)
        assert (await status(api, c["payment_id"])).json()["status"] == "confirmed"
        assert await client_balance(api) == "2000.00000000"


async def test_a_shared_address_in_capitals_matches_esploras_lowercase_outputs(
    tmp_path: Path,
) -> None:
    """A SegWit address may be written in capitals (a payment stored so before settings wrote
    it in lowercase); Esplora lists its outputs in lowercase. No output ever matched, so the
    payer paid and the payment expired uncredited."""
    upper = "BC1QW508D6QEJXTDG4Y5R3ZARVARY0C5XW7KV8F3T4"
    clock = FakeClock()
    async with watched_api(tmp_path, clock, bitcoin_address=upper) as (api, fake, http):
        a = (await create(api, aitbc_amount=1000)).json()
        fake.pay(upper, 1_000_000, height=100)  # listed under the address asked for ...
        fake.txs[upper][-1]["vout"][1]["scriptpubkey_address"] = upper.lower()  # ... as Esplora
        await api.core.watcher.poll_once(http)
        assert (await status(api, a["payment_id"])).json()["status"] == "confirmed"
        assert await client_balance(api) == "1000.00000000"


async def test_watcher_survives_a_failing_api_and_a_restart(tmp_path: Path) -> None:
    """A 503 from the API fails one poll, changes nothing; state is re-read after a restart."""
    clock = FakeClock()
    async with watched_api(tmp_path, clock, bitcoin_xpub=XPUB) as (api, fake, http):
        p = (await create(api, aitbc_amount=10)).json()
        fake.fail = True
        with pytest.raises(httpx.HTTPStatusError):
            await api.core.watcher.poll_once(http)
    async with watched_api(tmp_path, clock, bitcoin_xpub=XPUB) as (api, fake, http):
        fake.pay(p["payment_address"], 10_000, height=100)  # 10 AITBC = 0.0001 BTC
        await api.core.watcher.poll_once(http)
        assert (await status(api, p["payment_id"])).json()["status"] == "confirmed"
        assert await client_balance(api) == "10.00000000"


async def test_a_deeply_nested_answer_is_an_api_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Esplora's JSON is read with a depth limit: 100,000 nested arrays fail the address's read
    as a ValueError, which the watcher logs and retries. The stdlib parser raised RecursionError,
    which ``run`` does not catch (its task took the app down), or, with the recursion limit
    eth-account's import sets (100,000), crashed the process (segmentation fault)."""
    clock = FakeClock()
    async with watched_api(tmp_path, clock, bitcoin_xpub=XPUB) as (api, fake, http):
        await create(api, aitbc_amount=10)
        fake.body = b"[" * 100_000 + b"]" * 100_000
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(1000)  # the interpreter's (this process imported eth-account)
        try:
            await api.core.watcher.poll_once(http)  # its address counts as not read
        finally:
            sys.setrecursionlimit(limit)
        assert api.core.watcher.errors == 1
        assert "depth" in caplog.text


@pytest.mark.parametrize("entry", [b"1", b"null", b'"x"', b"[]"])
async def test_an_older_page_of_junk_entries_ends_the_reading(tmp_path: Path, entry: bytes) -> None:
    """An older page (``/txs/chain/:txid``) of 25 entries that are not transactions: its last
    entry was read as a dict (AttributeError), which ``run`` does not catch, so the watcher's
    task took the app down. The junk is skipped like a first page's, and the address's
    payments are checked as usual."""
    clock = FakeClock()
    async with watched_api(tmp_path, clock, bitcoin_address=SHARED) as (api, fake, http):
        fake.paged = True
        for n in range(25):  # a full first page: the watcher reads the next one
            fake.pay(SHARED, 5_000 + n, txid=f"{n:064x}", height=99, block_time=clock.now())
        pid = (await create(api, aitbc_amount=1000)).json()["payment_id"]
        fake.pay(SHARED, 1_000_000, txid="cd" * 32, height=100, block_time=clock.now())
        fake.chain_body = b"[" + b",".join([entry] * 25) + b"]"
        await api.core.watcher.poll_once(http)
        assert fake.chain_pages == 1
        assert (await status(api, pid)).json()["status"] == "confirmed"


async def test_the_background_watcher_polls_on_the_clock(tmp_path: Path) -> None:
    """``run`` polls every ESPLORA_POLL_SECONDS; an API failure is counted and retried."""
    clock = FakeClock()
    async with watched_api(tmp_path, clock, bitcoin_xpub=XPUB) as (api, fake, _):
        watcher = api.core.watcher
        p = (await create(api, aitbc_amount=10)).json()
        fake.fail = True
        clock.advance(86400)
        with anyio.fail_after(10):
            while watcher.errors < 1:  # noqa: ASYNC110 - real sockets to the fake API
                await anyio.sleep(0.01)
        fake.fail = False
        fake.pay(p["payment_address"], 10_000, height=100)
        clock.advance(86400)
        with anyio.fail_after(10):
            while watcher.polls < 1:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        await api.core.dispatcher.wait_flushed()
        assert (await status(api, p["payment_id"])).json()["status"] == "confirmed"


async def test_a_vanished_transaction_waits_again_then_expires(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A transaction seen in the mempool that the API no longer knows (replaced, evicted: 404)
    kept its payment pending for ever. The payment waits again and expires at its deadline,
    keeping the lost outpoint (it never pays anything else), also after a restart, and the
    log says why; if the transaction comes back before then, it is credited once."""
    clock = FakeClock()
    async with watched_api(tmp_path, clock, bitcoin_xpub=XPUB) as (api, fake, http):
        p = (await create(api, aitbc_amount=10)).json()
        back = (await create(api, aitbc_amount=10)).json()
        for payment in (p, back):
            fake.pay(payment["payment_address"], 10_000, txid=payment["payment_id"][:8] * 8)
        await api.core.watcher.poll_once(http)
        assert (await status(api, p["payment_id"])).json()["tx_hash"] is not None
    async with watched_api(tmp_path, clock, bitcoin_xpub=XPUB) as (api, fake, http):
        watcher = api.core.watcher
        clock.advance(1800)
        await watcher.poll_once(http)  # the two transactions are gone
        assert "is unknown to the chain API" in caplog.text
        assert (await status(api, p["payment_id"])).json()["status"] == "pending"
        fake.pay(back["payment_address"], 10_000, txid=back["payment_id"][:8] * 8, height=100)
        await watcher.poll_once(http)  # one comes back, confirmed
        assert (await status(api, back["payment_id"])).json()["status"] == "confirmed"
        clock.advance(1801)
        await watcher.poll_once(http)
        lost = (await status(api, p["payment_id"])).json()
        assert (lost["status"], lost["tx_hash"]) == ("expired", p["payment_id"][:8] * 8)
        fake.pay(p["payment_address"], 10_000, txid=p["payment_id"][:8] * 8, height=100)
        await watcher.poll_once(http)  # too late: the expired payment keeps its outpoint
        assert (await status(api, p["payment_id"])).json()["status"] == "expired"
        assert await client_balance(api) == "10.00000000"
        assert sum(api.core.dispatcher.ledger.balances().values()) == 0


async def test_a_seen_transaction_off_the_first_page_is_looked_up(tmp_path: Path) -> None:
    """``/address/:a/txs`` lists the newest transactions only: a busy shared address pushes a
    seen payment's transaction off it. The watcher looks it up by txid and confirms it."""
    clock = FakeClock()
    async with watched_api(tmp_path, clock, bitcoin_address=SHARED) as (api, fake, http):
        p = (await create(api, aitbc_amount=1000)).json()
        fake.pay(SHARED, 1_000_000)
        await api.core.watcher.poll_once(http)
        fake.txs["elsewhere"] = fake.txs.pop(SHARED)  # not listed, still known by its txid
        fake.txs["elsewhere"][0]["status"] = {"confirmed": True, "block_height": 100}
        await api.core.watcher.poll_once(http)
        done = (await status(api, p["payment_id"])).json()
        assert (done["status"], done["confirmations"]) == ("confirmed", 1)
        assert await client_balance(api) == "1000.00000000"


async def test_a_transaction_lost_past_the_deadline_has_a_grace(tmp_path: Path) -> None:
    """Past its deadline, a payment whose transaction went missing expires only once it has
    been missing for LOST_GRACE_SECONDS (an API that restarts forgets its mempool a while);
    found again in that time, it is confirmed."""
    from web.exchange import LOST_GRACE_SECONDS

    clock = FakeClock()
    async with watched_api(tmp_path, clock, bitcoin_xpub=XPUB) as (api, fake, http):
        watcher = api.core.watcher
        p = (await create(api, aitbc_amount=10)).json()
        q = (await create(api, aitbc_amount=10)).json()
        for payment, txid in ((p, TXID), (q, "cd" * 32)):
            fake.pay(payment["payment_address"], 10_000, txid=txid)
        await watcher.poll_once(http)
        clock.advance(4000)
        saved, fake.txs = fake.txs, {}
        await watcher.poll_once(http)
        clock.advance(LOST_GRACE_SECONDS - 1)
        await watcher.poll_once(http)
        assert (await status(api, p["payment_id"])).json()["status"] == "pending"
        fake.txs = {q["payment_address"]: saved[q["payment_address"]]}
        fake.txs[q["payment_address"]][0]["status"] = {"confirmed": True, "block_height": 100}
        clock.advance(1)
        await watcher.poll_once(http)
        assert (await status(api, p["payment_id"])).json()["status"] == "expired"
        assert (await status(api, q["payment_id"])).json()["status"] == "confirmed"
        assert await client_balance(api) == "10.00000000"


async def test_shared_address_amounts_are_reused_a_day_after_settlement(tmp_path: Path) -> None:
    """Each request on a shared address got an amount never asked before, so the extra
    satoshis grew with every payment ever made. An amount is free again a day after its payment
    was confirmed or expired (a restart keeps what is held); two pending payments never share
    one; and an output older than the request (late, or lost) never pays it."""
    clock = FakeClock()
    async with watched_api(tmp_path, clock, bitcoin_address=SHARED) as (api, fake, http):
        a = (await create(api, aitbc_amount=1000)).json()  # will expire, paid late
        b = (await create(api, aitbc_amount=1000)).json()  # will be confirmed
        c = (await create(api, aitbc_amount=1000)).json()  # will expire, its tx lost
        assert [p["btc_amount"] for p in (a, b, c)] == ["0.01000000", "0.01000001", "0.01000002"]
        fake.pay(SHARED, 1_000_001, txid="bb" * 32, height=100, block_time=clock.now())
        fake.pay(SHARED, 1_000_002, txid="cc" * 32)
        await api.core.watcher.poll_once(http)
        assert (await status(api, b["payment_id"])).json()["status"] == "confirmed"
        lost = fake.txs[SHARED].pop()
        await api.core.watcher.poll_once(http)
        clock.advance(3601)
        await api.core.watcher.poll_once(http)
        late = clock.now()
        fake.pay(SHARED, 1_000_000, txid="aa" * 32, height=101, block_time=late)
        await api.core.watcher.poll_once(http)  # a's late payment: a is expired
        assert (await status(api, a["payment_id"])).json()["status"] == "expired"
        assert (await status(api, c["payment_id"])).json()["status"] == "expired"
        clock.advance(86400 - 3601 - 1)  # b's amount is held until a day after its credit
        d = (await create(api, aitbc_amount=1000)).json()
        assert d["btc_amount"] == "0.01000003"
    async with watched_api(tmp_path, clock, bitcoin_address=SHARED) as (api, fake, http):
        clock.advance(1)
        e = (await create(api, aitbc_amount=1000)).json()  # b's amount; d's is held
        f = (await create(api, aitbc_amount=1000)).json()  # a's and c's are still held
        assert [e["btc_amount"], f["btc_amount"]] == ["0.01000001", "0.01000004"]
        clock.advance(3600)  # a's and c's amounts are free
        await api.core.watcher.poll_once(http)  # d, e and f expire: theirs are held
        g, h, i = [(await create(api, aitbc_amount=1000)).json() for _ in range(3)]
        assert [p["btc_amount"] for p in (g, h, i)] == ["0.01000000", "0.01000002", "0.01000005"]
        fake.tip = 120
        fake.pay(SHARED, 1_000_000, txid="aa" * 32, height=101, block_time=late)
        lost["status"] = {"confirmed": True, "block_height": 120, "block_time": int(clock.now())}
        fake.txs[SHARED].append(lost)  # c's lost transaction confirms after all: still c's
        fake.pay(SHARED, 1_000_005, txid="dd" * 32, height=120, block_time=clock.now() - 60)
        await api.core.watcher.poll_once(http)  # a's late payment is older than g
        assert (await status(api, g["payment_id"])).json()["status"] == "pending"
        assert (await status(api, h["payment_id"])).json()["status"] == "pending"
        assert (await status(api, i["payment_id"])).json()["status"] == "confirmed"
        assert await client_balance(api) == "2000.00000000"


async def test_a_failed_transaction_lookup_fails_only_its_payment(tmp_path: Path) -> None:
    """A lookup by txid that fails (502, not 404) leaves that payment as it is for the next
    poll, counted as an error; the poll goes on with the other payments and expiry."""
    clock = FakeClock()
    async with watched_api(tmp_path, clock, bitcoin_xpub=XPUB) as (api, fake, http):
        watcher = api.core.watcher
        p, q, r = [(await create(api, aitbc_amount=10)).json() for _ in range(3)]
        fake.pay(p["payment_address"], 10_000)
        await watcher.poll_once(http)
        saved, fake.txs = fake.txs, {}
        fake.broken.add(TXID)
        fake.pay(q["payment_address"], 10_000, txid="cd" * 32, height=100)
        clock.advance(3601)
        await watcher.poll_once(http)
        assert watcher.errors == 1
        assert (await status(api, p["payment_id"])).json()["status"] == "pending"
        assert (await status(api, q["payment_id"])).json()["status"] == "confirmed"
        assert (await status(api, r["payment_id"])).json()["status"] == "expired"
        fake.broken.clear()
        fake.txs.update(saved)
        await watcher.poll_once(http)
        assert (await status(api, p["payment_id"])).json()["status"] == "pending"


async def test_a_slow_poll_expires_only_what_was_due_when_it_began(tmp_path: Path) -> None:
    """The watcher expired what was due when its poll ended, so a payment whose deadline fell
    during a slow poll (many addresses) expired though it was paid in time, after its address
    had been read. A poll expires what was due when it began: the next poll finds the output."""
    clock = FakeClock()
    async with watched_api(tmp_path, clock, bitcoin_xpub=XPUB) as (api, fake, http):
        q = (await create(api, aitbc_amount=10)).json()  # its address is read first
        p = (await create(api, aitbc_amount=10)).json()

        def slow(address: str) -> None:
            if address == p["payment_address"]:
                fake.pay(q["payment_address"], 10_000)  # in time, after q's address was read
                clock.advance(2)

        clock.advance(3599)
        fake.on_txs = slow
        await api.core.watcher.poll_once(http)
        fake.on_txs = None
        assert (await status(api, q["payment_id"])).json()["status"] == "pending"
        await api.core.watcher.poll_once(http)
        seen = (await status(api, q["payment_id"])).json()
        assert (seen["status"], seen["tx_hash"]) == ("pending", TXID)
        assert (await status(api, p["payment_id"])).json()["status"] == "expired"


async def test_an_address_the_api_fails_holds_up_only_its_own_payments(tmp_path: Path) -> None:
    """One address whose list the API fails failed the whole poll: no other payment was
    confirmed and nothing expired. Now only that address's payments wait (and are not expired:
    they may have been paid); the others are confirmed or expired as usual."""
    clock = FakeClock()
    async with watched_api(tmp_path, clock, bitcoin_xpub=XPUB) as (api, fake, http):
        bad = (await create(api, aitbc_amount=10)).json()
        paid = (await create(api, aitbc_amount=10)).json()
        unpaid = (await create(api, aitbc_amount=10)).json()
        fake.broken_addresses.add(bad["payment_address"])
        fake.pay(paid["payment_address"], 10_000, height=100)
        await api.core.watcher.poll_once(http)
        assert (await status(api, paid["payment_id"])).json()["status"] == "confirmed"
        clock.advance(3601)
        await api.core.watcher.poll_once(http)
        assert (await status(api, unpaid["payment_id"])).json()["status"] == "expired"
        assert (await status(api, bad["payment_id"])).json()["status"] == "pending"
        assert api.core.watcher.errors == 2
        fake.broken_addresses.clear()
        fake.pay(bad["payment_address"], 10_000, txid="cc" * 32, height=100)  # seen late
        await api.core.watcher.poll_once(http)
        assert (await status(api, bad["payment_id"])).json()["status"] == "confirmed"


async def test_a_lookup_answering_null_does_not_lose_the_transaction(tmp_path: Path) -> None:
    """Only a 404 says the API does not know a transaction; a 200 ``null`` is a bad answer."""
    clock = FakeClock()
    async with watched_api(tmp_path, clock, bitcoin_xpub=XPUB) as (api, fake, http):
        p = (await create(api, aitbc_amount=10)).json()
        fake.pay(p["payment_address"], 10_000)
        await api.core.watcher.poll_once(http)
        fake.txs, fake.nulls = {}, {TXID}
        clock.advance(4000)
        await api.core.watcher.poll_once(http)
        clock.advance(4000)
        await api.core.watcher.poll_once(http)
        assert api.core.exchange.lost == {}
        assert (await status(api, p["payment_id"])).json()["status"] == "pending"


async def test_the_watcher_reads_older_pages_of_a_busy_address(tmp_path: Path) -> None:
    """Esplora lists an address's 25 newest confirmed transactions, older ones by pages: on a
    busy shared address, payments whose outputs were on a later page were never found and
    expired unpaid. The watcher reads older pages until they are older than its oldest
    pending payment (BLOCK_TIME_SLACK allowed)."""
    clock = FakeClock()
    many = {"max_pending_payments": 30}
    async with watched_api(tmp_path, clock, bitcoin_address=SHARED, **many) as (api, fake, http):
        fake.paged = True
        for n in range(100):  # old traffic on the address
            fake.pay(SHARED, 5_000 + n, txid=f"{n:064x}", height=50, block_time=clock.now() - 1e6)
        ids = [(await create(api, aitbc_amount=1000)).json()["payment_id"] for _ in range(30)]
        for n in range(30):
            txid = f"{n + 1000:064x}"
            fake.pay(SHARED, 1_000_000 + n, txid=txid, height=100, block_time=clock.now())
        await api.core.watcher.poll_once(http)
        statuses = [(await status(api, pid)).json()["status"] for pid in ids]
        assert statuses == ["confirmed"] * 30
        assert fake.chain_pages == 1  # the second page reached the old traffic: no third
        assert await client_balance(api) == "30000.00000000"


async def test_a_poll_reads_a_shared_address_once_not_once_per_payment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each pending payment on the shared address was matched against every transaction the
    address lists, in one stretch with no await: wallets cost nothing, so a flood of unpaid
    requests (MAX_PENDING_PAYMENTS each) times a busy address's 2,550 listed transactions held
    the event loop for seconds each poll, stalling every socket. A payment is matched against
    the transactions paying its exact amount only."""
    examined = 0
    real = esplora.find_output

    def counting(txs: list[Any], *args: Any, **kw: Any) -> Any:
        nonlocal examined
        examined += len(txs)
        return real(txs, *args, **kw)

    monkeypatch.setattr(esplora, "find_output", counting)
    clock = FakeClock()
    many = {"max_pending_payments": 200}
    async with watched_api(tmp_path, clock, bitcoin_address=SHARED, **many) as (api, fake, http):
        for n in range(100):  # other traffic on the address
            fake.pay(SHARED, 5_000 + n, txid=f"{n:064x}", height=99, block_time=clock.now())
        ids = [(await create(api, aitbc_amount=1000)).json()["payment_id"] for _ in range(200)]
        fake.pay(SHARED, 1_000_007, txid="cd" * 32, height=100, block_time=clock.now())
        await api.core.watcher.poll_once(http)
        statuses = [(await status(api, pid)).json()["status"] for pid in ids]
        assert statuses == ["pending"] * 7 + ["confirmed"] + ["pending"] * 192
        assert examined <= 101  # was 200 payments x 101 transactions


async def test_unpaid_payments_of_fresh_wallets_lock_nobody_out(tmp_path: Path) -> None:
    """Pending payments held their share of the 1e10 AITBC cap, and a wallet costs nothing
    (MAX_PENDING_PAYMENTS is per payer): fresh wallets' unpaid requests filled the cap and
    every other payer's create-payment and every admin credit was 409 for an hour. The cap
    now counts what is issued only: a request is refused once the AITBC issued would pass
    it, and a paid payment is credited even past it (docs/wallet.md)."""
    clock = FakeClock()

    async def credit(amount: str) -> httpx.Response:
        url = "/v1/admin/accounts/client:c1/credit"
        return await api.http.post(url, json={"amount": amount}, headers=ADMIN)

    async with watched_api(tmp_path, clock, bitcoin_xpub=XPUB) as (api, fake, http):
        assert (await credit("9999000000")).status_code == 200  # 1e10 - 1e6
        fresh = bearer((await login(api.http))["session_token"])  # a wallet made for this
        flood = await create(api, fresh, aitbc_amount=1_000_000)
        assert flood.status_code == 200, flood.text
        mine = await create(api, aitbc_amount=1)  # another payer: not locked out
        assert mine.status_code == 200, mine.text
        assert (await credit("1")).status_code == 200  # nor the admin
        assert (await credit("999999")).status_code == 200  # exactly at the cap
        r = await credit("0.00000001")
        assert r.status_code == 409, r.text
        assert r.json()["detail"] == (
            "the ledger holds at most 10000000000.00000000 AITBC in all; "
            "10000000000.00000000 AITBC are issued"
        )
        assert (await create(api, aitbc_amount=1)).status_code == 409
        for n, p in enumerate((flood.json(), mine.json())):  # both paid: both credited
            sats = int(p["btc_amount"].replace(".", ""))
            fake.pay(p["payment_address"], sats, txid=f"{n:064x}", height=100)
        await api.core.watcher.poll_once(http)
        for p in (flood.json(), mine.json()):
            assert (await status(api, p["payment_id"], ADMIN)).json()["status"] == "confirmed"
        assert await client_balance(api) == "1.00000000"
        r = await api.http.get("/v1/admin/accounts/exchange:btc", headers=ADMIN)
        assert r.json()["balance"] == "-1000001.00000000"  # past the cap by what was pending


async def test_a_payment_past_the_64_bit_limit_waits_pending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Payments requested below the cap and paid past it are credited up to MAX_LEDGER (here
    100 AITBC past the cap; really 2**63 - 1 units). One that would pass it stays pending
    with its output recorded (it does not expire: it was paid), the watcher goes on with the
    other payments, and an admin confirmation of it is 409."""
    monkeypatch.setattr("web.exchange.MAX_LEDGER", 10**18 + 100 * 10**8)
    clock = FakeClock()
    async with watched_api(tmp_path, clock, bitcoin_xpub=XPUB) as (api, fake, http):
        url = "/v1/admin/accounts/client:c1/credit"
        r = await api.http.post(url, json={"amount": "9999999000"}, headers=ADMIN)
        assert r.status_code == 200, r.text
        other = {"X-Api-Key": CLIENT_KEY_2}
        orders = [(CLIENT, 1000), (other, 1000), (CLIENT, 50)]
        ps = [(await create(api, h, aitbc_amount=a)).json() for h, a in orders]
        for n, p in enumerate(ps):
            sats = int(p["btc_amount"].replace(".", ""))
            fake.pay(p["payment_address"], sats, txid=f"{n:064x}", height=100)
        await api.core.watcher.poll_once(http)
        states = [(await status(api, p["payment_id"], ADMIN)).json() for p in ps]
        assert [s["status"] for s in states] == ["confirmed", "pending", "confirmed"]
        assert (states[1]["tx_hash"], states[1]["confirmations"]) == (f"{1:064x}", 1)
        clock.advance(4000)  # past its deadline: it was paid, so it waits
        await api.core.watcher.poll_once(http)
        assert (await status(api, ps[1]["payment_id"], ADMIN)).json()["status"] == "pending"
        r = await api.http.post(f"/v1/admin/payments/{ps[1]['payment_id']}/confirm", headers=ADMIN)
        assert r.status_code == 409, r.text
        assert "would pass the ledger's 64-bit limit" in r.json()["detail"]
        r = await api.http.get("/v1/admin/accounts/exchange:btc", headers=ADMIN)
        assert r.json()["balance"] == "-1050.00000000"


@pytest.mark.parametrize("second", ["create-payment", "credit"])
async def test_a_cap_refusal_waits_for_the_credit_it_counts(tmp_path: Path, second: str) -> None:
    """The cap check counts credits not yet committed: a create-payment or admin credit was
    refused (409) at once on the strength of an admin credit still being committed (a failed
    commit then stops the coordinator, and that credit never was). The 409 now waits for it."""
    store = RecordingStore()
    async with running_api(tmp_path, FakeClock(), store=store, bitcoin_xpub=XPUB) as api:
        credit = "/v1/admin/accounts/client:c1/credit"
        r = await api.http.post(credit, json={"amount": "9999000000"}, headers=ADMIN)
        assert r.status_code == 200, r.text
        answers = await answered_after_commit(
            api,
            store,
            ("cap", api.http.post(credit, json={"amount": "1000000"}, headers=ADMIN)),
            (
                second,
                create(api, aitbc_amount=1)
                if second == "create-payment"
                else api.http.post(credit, json={"amount": "1"}, headers=ADMIN),
            ),
        )
        assert sorted(answers) == sorted([("cap", 200), (second, 409)])  # after the commit


async def test_admin_confirms_in_flight_are_answered_once_committed(tmp_path: Path) -> None:
    """While an admin confirmation was being committed, a second confirmation of the payment
    was 409 "being confirmed" and one of another payment with the same output 409 "already
    paid" at once (a failed commit then stops the coordinator, and neither was). Now the
    repeat is answered as the committed payment (200, unchanged, no second credit) and the
    refusal once the confirmation it was decided on is committed."""
    store = RecordingStore()
    async with running_api(tmp_path, FakeClock(), store=store, bitcoin_xpub=XPUB) as api:
        a = (await create(api, aitbc_amount=10)).json()["payment_id"]
        b = (await create(api, aitbc_amount=10)).json()["payment_id"]

        def confirm(pid: str) -> Any:
            url = f"/v1/admin/payments/{pid}/confirm"
            return api.http.post(url, json={"tx_hash": TXID}, headers=ADMIN)

        answers = await answered_after_commit(
            api, store, ("a", confirm(a)), ("again", confirm(a)), ("b", confirm(b))
        )
        assert sorted(answers) == [("a", 200), ("again", 200), ("b", 409)]
        assert await client_balance(api) == "10.00000000"
        assert (await status(api, b)).json()["status"] == "pending"


async def test_the_background_watcher_outlives_a_failed_store_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A poll whose store read failed (a dropped PostgreSQL connection: a payment that left the
    pending ones meanwhile is read back from the store) is counted and retried like an API
    failure: the StorageError escaped ``run``, and its task took the coordinator down with a
    traceback."""
    clock = FakeClock()
    async with watched_api(tmp_path, clock, bitcoin_xpub=XPUB) as (api, _, _):
        watcher = api.core.watcher
        polled = anyio.Event()

        async def poll_once(http: httpx.AsyncClient) -> None:
            if watcher.errors == 0:
                raise StorageError("connection lost")
            polled.set()

        monkeypatch.setattr(watcher, "poll_once", poll_once)
        with anyio.fail_after(10):
            # Time moves on a day at a time until the watcher polled twice (the first poll
            # fails): one advance made before the watcher is back in its wait is taken as its
            # start. Not ``wait_all_tasks_blocked`` between advances: the fake explorer's
            # server wakes every 0.1 s, in step with its checks, and kept it waiting for ever.
            while not polled.is_set():
                clock.advance(86400)
                await anyio.lowlevel.checkpoint()
        assert watcher.errors == 1
