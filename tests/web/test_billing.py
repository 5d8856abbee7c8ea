"""Job billing (BILLING=on): reserve at submission, pay the receipt price, return the rest."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import pytest

from tests.conftest import ADMIN_KEY, CLIENT_KEY
from tests.fakes import FakeClock, RecordingStore
from tests.web.rest_harness import Api, answered_after_commit, miner_headers, running_api
from tests.web.wallet_helpers import bearer, login

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.anyio

ADMIN = {"X-Api-Key": ADMIN_KEY}
PAYOUT = "0x" + "ab" * 20


async def credit(api: Api, account: str, amount: str) -> None:
    r = await api.http.post(
        f"/v1/admin/accounts/{account}/credit", json={"amount": amount}, headers=ADMIN
    )
    assert r.status_code == 200, r.text


async def account(api: Api, name: str) -> dict[str, Any]:
    r = await api.http.get(f"/v1/admin/accounts/{name}", headers=ADMIN)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


async def balance(api: Api, user: dict[str, Any]) -> str:
    r = await api.http.get(
        f"/v1/users/{user['user_id']}/balance", headers=bearer(user["session_token"])
    )
    assert r.status_code == 200, r.text
    return str(r.json()["balance"])


async def funded_user(api: Api, amount: str = "10") -> dict[str, Any]:
    user = await login(api.http)
    await credit(api, f"wallet:{user['wallet_address']}", amount)
    return user


async def submit(api: Api, user: dict[str, Any], amount: Any, **body: Any) -> Any:
    body.setdefault("payload", {"type": "inference"})
    return await api.http.post(
        "/v1/jobs",
        json={**body, "payment_amount": amount},
        headers=bearer(user["session_token"]),
    )


async def ledger_total(api: Api) -> int:
    return sum(api.core.dispatcher.ledger.balances().values())


async def test_completion_pays_the_receipt_price_and_returns_the_rest(tmp_path: Path) -> None:
    """4 reserved; 10 s at 0.1/s: the payout wallet gets 1, the user 3 back, released."""
    clock = FakeClock()
    async with running_api(tmp_path, clock, billing=True) as api:
        user = await funded_user(api)
        r = await submit(api, user, "4")
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["payment_status"] == "reserved"
        assert job["payment_amount"] == "4.00000000"
        assert job["payment_id"]
        assert await balance(api, user) == "6.00000000"
        assert (await account(api, f"escrow:{job['job_id']}"))["balance"] == "4.00000000"

        caps = {"price": 0.1, "payout_address": PAYOUT}
        assert (await api.register("m1", capabilities=caps)).status_code == 200
        assert (await api.poll("m1")).status_code == 200
        clock.advance(10)
        r = await api.result(job["job_id"], "m1")
        assert r.json()["receipt"]["price"] == 1.0
        view = await api.job(job["job_id"], key=user["session_token"])
        assert (view["state"], view["payment_status"]) == ("COMPLETED", "released")
        assert await balance(api, user) == "9.00000000"
        assert (await account(api, f"wallet:{PAYOUT}"))["balance"] == "1.00000000"
        assert (await account(api, f"escrow:{job['job_id']}"))["balance"] == "0.00000000"
        assert await ledger_total(api) == 0
        r = await api.http.get(
            f"/v1/users/{user['user_id']}/transactions", headers=bearer(user["session_token"])
        )
        kinds = [(t["type"], t["amount"]) for t in r.json()["transactions"]]
        assert sorted(kinds) == sorted(
            [
                ("admin_credit", "10.00000000"),
                ("job_reserve", "-4.00000000"),
                ("job_refund", "3.00000000"),
            ]
        )


async def test_a_result_after_an_operators_disconnect_pays_the_payout_wallet(
    tmp_path: Path,
) -> None:
    """A REST miner an operator disconnected posts the result of the job it ran: its payout
    wallet is paid (the completion dropped the away miner before the payment was staged, which
    then went to miner:m1 as for a miner that named no wallet)."""
    clock = FakeClock()
    async with running_api(tmp_path, clock, billing=True) as api:
        user = await funded_user(api)
        job = (await submit(api, user, "4")).json()
        caps = {"price": 0.1, "payout_address": PAYOUT}
        assert (await api.register("m1", capabilities=caps)).status_code == 200
        assert (await api.poll("m1")).status_code == 200
        r = await api.http.post("/v1/admin/miners/m1/disconnect", headers=ADMIN)
        assert r.status_code == 200, r.text
        clock.advance(10)
        assert (await api.result(job["job_id"], "m1")).status_code == 200
        assert (await account(api, f"wallet:{PAYOUT}"))["balance"] == "1.00000000"
        assert (await account(api, "miner:m1"))["balance"] == "0.00000000"


async def priced_job(api: Api, clock: FakeClock) -> tuple[Any, Any, Any]:
    """A funded user reserves 0.5 for a job that miner m1 (price 1/s) runs for 10 s:
    (user, job, receipt)."""
    user = await funded_user(api)
    job = (await submit(api, user, "0.5")).json()
    await api.register("m1", capabilities={"price": 1})
    await api.poll("m1")
    clock.advance(10)
    receipt = (await api.result(job["job_id"], "m1")).json()["receipt"]
    return user, job, receipt


async def test_price_above_the_reservation_pays_the_reservation(tmp_path: Path) -> None:
    """The client never pays more than it reserved; a miner without payout wallet is miner:id."""
    clock = FakeClock()
    async with running_api(tmp_path, clock, billing=True) as api:
        user, _, _ = await priced_job(api, clock)
        assert (await account(api, "miner:m1"))["balance"] == "0.50000000"
        assert await balance(api, user) == "9.50000000"


async def test_a_price_past_a_floats_range_pays_the_reservation(tmp_path: Path) -> None:
    """A miner advertising 1e308 per second, 10 s: the price overflowed to infinity and the
    settlement raised OverflowError in the batch, a 500 for a result already applied in
    memory (found by a hunt). Now the price saturates and the reservation is paid."""
    clock = FakeClock()
    async with running_api(tmp_path, clock, billing=True) as api:
        user = await funded_user(api)
        job = (await submit(api, user, "0.5")).json()
        await api.register("m1", capabilities={"price": 1e308})
        await api.poll("m1")
        clock.advance(10)
        r = await api.result(job["job_id"], "m1")
        assert r.status_code == 200, r.text
        assert r.json()["receipt"]["price"] == 1.7976931348623157e308
        assert (await api.job(job["job_id"], user["session_token"]))["state"] == "COMPLETED"
        assert (await account(api, "miner:m1"))["balance"] == "0.50000000"
        assert await balance(api, user) == "9.50000000"


async def test_short_balance_is_402_and_changes_nothing(tmp_path: Path) -> None:
    async with running_api(tmp_path, billing=True) as api:
        user = await funded_user(api, "1")
        r = await submit(api, user, "1.00000001")
        assert r.status_code == 402
        assert "insufficient balance" in r.json()["detail"]
        assert await balance(api, user) == "1.00000000"
        r = await api.http.get("/v1/jobs", headers=bearer(user["session_token"]))
        assert r.json()["total"] == 0
        r = await api.http.post(
            "/v1/jobs", json={"payload": {}, "payment_amount": 1}, headers={"X-Api-Key": CLIENT_KEY}
        )
        assert r.status_code == 402  # an API-key client has an account too, empty


@pytest.mark.parametrize(
    ("amount", "status"),
    [("abc", 422), ("1.000000001", 422), (-1, 422), (True, 422), ("NaN", 422), (0, 201)],
)
async def test_invalid_payment_amounts(tmp_path: Path, amount: Any, status: int) -> None:
    async with running_api(tmp_path, billing=True) as api:
        user = await funded_user(api)
        r = await submit(api, user, amount)
        assert r.status_code == status, r.text
        if status == 201:
            assert r.json()["payment_id"] is None
        r = await submit(api, user, "1", payment_currency="ETH")
        assert r.status_code == 422


async def test_concurrent_submits_cannot_overspend(tmp_path: Path) -> None:
    """Ten concurrent submits of 3 from a balance of 10: exactly three are accepted."""
    async with running_api(tmp_path, billing=True) as api:
        user = await funded_user(api)
        codes: list[int] = []

        async def one() -> None:
            codes.append((await submit(api, user, "3")).status_code)

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(one)
        assert sorted(codes) == [201] * 3 + [402] * 7
        assert await balance(api, user) == "1.00000000"


@pytest.mark.parametrize("end", ["cancel", "fail", "expire", "failed-result"])
async def test_every_other_end_refunds_in_full(tmp_path: Path, end: str) -> None:
    clock = FakeClock()
    async with running_api(tmp_path, clock, billing=True) as api:
        user = await funded_user(api)
        job = (await submit(api, user, "4", ttl_seconds=60)).json()
        await api.register("m1", capabilities={"price": 0.1})
        if end != "cancel":
            assert (await api.poll("m1")).status_code == 200
        clock.advance(5)
        if end == "cancel":
            r = await api.http.post(
                f"/v1/jobs/{job['job_id']}/cancel", headers=bearer(user["session_token"])
            )
            assert r.status_code == 200
        elif end == "fail":
            r = await api.http.post(
                f"/v1/miners/{job['job_id']}/fail",
                json={"error_code": "E", "error_message": "boom"},
                headers=miner_headers("m1"),
            )
            assert r.status_code == 200
        elif end == "failed-result":
            r = await api.result(job["job_id"], "m1", result={"status": "failed", "error": "x"})
            assert r.status_code == 200
        else:
            clock.advance(60)
            await api.settle()  # the timer loop sees the new time and expires the job
            await api.core.dispatcher.wait_flushed()
        view = await api.job(job["job_id"], key=user["session_token"])
        assert view["payment_status"] == "refunded", view["state"]
        assert await balance(api, user) == "10.00000000"
        assert (await account(api, "miner:m1"))["balance"] == "0.00000000"
        assert await ledger_total(api) == 0


async def test_billing_off_ignores_payment_and_leaves_payment_id_null(tmp_path: Path) -> None:
    async with running_api(tmp_path) as api:
        user = await login(api.http)
        r = await submit(api, user, "4")
        assert r.status_code == 201
        assert (r.json()["payment_id"], r.json()["payment_status"]) == (None, None)


async def test_idempotent_resubmit_reserves_once(tmp_path: Path) -> None:
    async with running_api(tmp_path, billing=True) as api:
        user = await funded_user(api)
        first = await submit(api, user, "4", idempotency_key="k1")
        again = await submit(api, user, "4", idempotency_key="k1")
        assert (first.status_code, again.status_code) == (201, 200)
        assert first.json()["payment_id"] == again.json()["payment_id"]
        assert await balance(api, user) == "6.00000000"


async def test_balances_and_reservations_survive_a_restart(tmp_path: Path) -> None:
    """After a restart the balance is read back and a reserved job still settles."""
    clock = FakeClock()
    async with running_api(tmp_path, clock, billing=True) as api:
        user = await funded_user(api)
        job = (await submit(api, user, "4")).json()
    async with running_api(tmp_path, clock) as api:  # billing now off: it still settles
        assert await balance(api, user) == "6.00000000"
        r = await api.http.post(
            f"/v1/jobs/{job['job_id']}/cancel", headers=bearer(user["session_token"])
        )
        assert r.json()["payment_status"] == "refunded"
        assert await balance(api, user) == "10.00000000"


async def test_admin_account_routes_validate(tmp_path: Path) -> None:
    async with running_api(tmp_path) as api:
        for bogus in ("bogus", "client:x%0A", "client:x%0A%0A"):  # whole text, no newline
            r = await api.http.get(f"/v1/admin/accounts/{bogus}", headers=ADMIN)
            assert r.status_code == 400, bogus
            r = await api.http.post(
                f"/v1/admin/accounts/{bogus}/credit", json={"amount": 1}, headers=ADMIN
            )
            assert r.status_code == 400, bogus
        r = await api.http.post(
            "/v1/admin/accounts/exchange:btc/credit", json={"amount": 1}, headers=ADMIN
        )
        assert r.status_code == 400
        for bad in ("x", 0, -2):
            r = await api.http.post(
                "/v1/admin/accounts/miner:m9/credit", json={"amount": bad}, headers=ADMIN
            )
            assert r.status_code == 422
        r = await api.http.get("/v1/admin/accounts/miner:m9", headers={"X-Api-Key": CLIENT_KEY})
        assert r.status_code == 403


async def test_an_amount_a_json_number_cannot_carry_is_refused_not_rounded(
    tmp_path: Path,
) -> None:
    """A JSON number is read as a float: an admin credit of 4503599627.37049599 credited
    4503599627.37049600 and one of 1234567890.12345678 credited 1234567890.12345670, without
    a word (job payment amounts alike). Past 15 digits a number is 422; the string is exact."""
    async with running_api(tmp_path) as api:
        url = "/v1/admin/accounts/miner:m9/credit"
        body = b'{"amount": 4503599627.37049599}'
        r = await api.http.post(
            url, content=body, headers={**ADMIN, "content-type": "application/json"}
        )
        assert r.status_code == 422, r.text
        assert "send it as a string" in r.json()["detail"]
        r = await api.http.post(url, json={"amount": "4503599627.37049599"}, headers=ADMIN)
        assert r.json()["balance"] == "4503599627.37049599"


async def test_the_account_of_a_miner_id_with_a_slash_is_reachable(tmp_path: Path) -> None:
    """miner:rack-2/gpu-1, sent as is or as "%2F": "{account}" stopped at the "/" (404)."""
    async with running_api(tmp_path) as api:
        await credit(api, "miner:rack-2%2Fgpu-1", "2")
        got = await account(api, "miner:rack-2/gpu-1")
        assert (got["account"], got["balance"]) == ("miner:rack-2/gpu-1", "2.00000000")


@pytest.mark.parametrize("miner_id", ["gpu-é-✓", "gpu box 7", "矿工-" + "m" * 125])
async def test_the_account_of_any_miner_id_is_reachable(tmp_path: Path, miner_id: str) -> None:
    """Miner ids are UTF-8 text of up to 128 characters (X-Miner-ID, a socket hello): the
    account route took only printable ASCII, so these miners' accounts were a 400."""
    async with running_api(tmp_path) as api:
        await credit(api, f"miner:{miner_id}", "2")
        got = await account(api, f"miner:{miner_id}")
        assert (got["account"], got["balance"]) == (f"miner:{miner_id}", "2.00000000")
        for bogus in ("miner:" + "m" * 129, "miner:a%09b"):  # too long; a control character
            r = await api.http.get(f"/v1/admin/accounts/{bogus}", headers=ADMIN)
            assert r.status_code == 400, bogus


async def test_a_wallet_account_is_named_in_any_case(tmp_path: Path) -> None:
    """A wallet's account is its address lowercased, and every other route takes an address
    in any case (the EIP-55 mixed case wallets show): the admin account routes refused that
    spelling (400), so an operator pasting it from a wallet could not credit or read it."""
    mixed = "0xABaBaBaBABabABabAbAbABAbABabababaBaBABaB"  # 0xab…ab with its EIP-55 checksum
    async with running_api(tmp_path) as api:
        await credit(api, f"wallet:{mixed}", "3")
        got = await account(api, f"wallet:{mixed.upper().replace('X', 'x')}")
        assert (got["account"], got["balance"]) == (f"wallet:{mixed.lower()}", "3.00000000")
        assert (await account(api, f"wallet:{mixed.lower()}"))["balance"] == "3.00000000"
        r = await api.http.get(f"/v1/admin/accounts/WALLET:{mixed}", headers=ADMIN)
        assert r.status_code == 400  # the kind is spelt as it is


async def test_a_credit_to_a_mistyped_checksummed_wallet_is_refused(tmp_path: Path) -> None:
    """A wallet address in mixed case carries an EIP-55 checksum: one letter's case or one
    digit mistyped was credited to a wallet whose key nobody holds, and no route takes a
    credit back. It is 400 naming the checksum; read, the account is shown as before."""
    typo = "0xABaBaBaBABabABabAbAbABAbABabababaBaBABab"  # the last letter's case
    async with running_api(tmp_path) as api:
        url = f"/v1/admin/accounts/wallet:{typo}/credit"
        r = await api.http.post(url, json={"amount": "3"}, headers=ADMIN)
        assert r.status_code == 400, r.text
        assert "checksum" in r.json()["detail"]
        assert (await account(api, f"wallet:{typo}"))["balance"] == "0.00000000"
        assert (await account(api, "wallet:0x" + "ab" * 20))["balance"] == "0.00000000"


def test_socket_submissions_are_billed_too(tmp_path: Path) -> None:
    """job.submit with payment_amount reserves; short balance: error payment_required."""
    from tests.conftest import make_settings
    from tests.web.test_app import TestClient, client_socket, hello, recv
    from web.app import create_app

    app = create_app(make_settings(tmp_path, billing=True))
    with TestClient(app) as c:
        client_id = app.state.core.auth.from_token(CLIENT_KEY).id
        r = c.post(
            f"/v1/admin/accounts/client:{client_id}/credit", json={"amount": "5"}, headers=ADMIN
        )
        assert r.status_code == 200
        with client_socket(c) as ws:
            hello(ws)
            ws.send_json({"type": "job.submit", "id": "s1", "payload": {}, "payment_amount": 4})
            ack = recv(ws)
            assert (ack["type"], ack["job"]["payment_status"]) == ("ack", "reserved")
            assert ack["job"]["payment_amount"] == "4.00000000"
            ws.send_json({"type": "job.submit", "id": "s2", "payload": {}, "payment_amount": "2"})
            frames = [recv(ws), recv(ws)]  # the first job's queued event, then the refusal
            error = next(f for f in frames if f["type"] == "error")
            assert (error["code"], error["id"]) == ("payment_required", "s2")
            ws.send_json({"type": "job.submit", "id": "s3", "payload": {}, "payment_amount": "x"})
            error = recv(ws)
            assert (error["type"], error["code"], error["id"]) == ("error", "invalid", "s3")
            # Without an id, an error names the type it refuses (protocol.md, framing).
            ws.send_json({"type": "job.submit", "payload": {}, "payment_amount": "x"})
            assert recv(ws) == {
                "type": "error",
                "code": "invalid",
                "message": error["message"],
                "ref": "job.submit",
            }
            ws.send_json({"type": "job.submit", "payload": {}, "payment_amount": "2"})
            error = recv(ws)
            assert (error["code"], error.get("id"), error["ref"]) == (
                "payment_required",
                None,
                "job.submit",
            )
        r = c.get(f"/v1/admin/accounts/client:{client_id}", headers=ADMIN)
        assert r.json()["balance"] == "1.00000000"


async def test_miner_earnings_split_paid_and_pending(tmp_path: Path) -> None:
    """POST /v1/miners/{id}/earnings: the receipts' prices, of which the ledger paid what the
    client had reserved; the rest is pending."""
    clock = FakeClock()
    async with running_api(tmp_path, clock, billing=True) as api:
        _, job, receipt = await priced_job(api, clock)
        r = await api.http.post("/v1/miners/m1/earnings", headers=miner_headers("m1"))
        assert r.status_code == 200, r.text
        got = r.json()
    assert receipt["price"] == 10.0
    assert {k: got[k] for k in got if k != "earnings_history"} == {
        "miner_id": "m1",
        "total_earnings": 10.0,
        "pending_earnings": 9.5,
        "paid_earnings": 0.5,
        "completed_jobs": 1,
        "currency": "AITBC",
        "from_time": None,
        "to_time": None,
    }
    assert got["earnings_history"] == [
        {
            "job_id": job["job_id"],
            "receipt_id": receipt["receipt_id"],
            "amount": 10.0,
            "completed_at": receipt["completed_at"],
        }
    ]


async def test_credits_never_issue_more_than_the_ledger_holds(tmp_path: Path) -> None:
    """Admin credits together stay within 1e10 AITBC (every stored sum fits 64 bits): ten
    credits of the largest amount once made SQLite's SUM overflow, so the coordinator could
    not start again. Concurrent credits are counted before they commit."""
    half = "6000000000"  # 6e9 AITBC: two would pass 1e10
    async with running_api(tmp_path) as api:
        codes: list[int] = []

        async def one(name: str, amount: str = "9999999999") -> None:
            r = await api.http.post(
                f"/v1/admin/accounts/{name}/credit", json={"amount": amount}, headers=ADMIN
            )
            codes.append(r.status_code)
            if r.status_code != 200:
                assert r.json()["detail"].startswith("the ledger holds at most"), r.text

        async with anyio.create_task_group() as tg:
            for name in ("miner:m1", "miner:m2", "client:c1"):
                tg.start_soon(one, name, half)
        assert sorted(codes) == [200, 409, 409]
        for _ in range(10):  # the largest amount: refused, the total would pass 1e10
            await one("miner:m3")
        assert codes.count(200) == 1
        before = api.core.dispatcher.ledger.balances()
        assert before["system:admin"] == -6 * 10**17
    async with running_api(tmp_path) as api:  # it starts again, with the same balances
        assert api.core.dispatcher.ledger.balances() == before


@pytest.mark.parametrize("read", ["user", "admin"])
async def test_a_balance_read_while_a_reservation_commits_waits_for_it(
    tmp_path: Path, read: str
) -> None:
    """A balance read showed ``available`` less a paid submit's reservation while that submit
    was still being committed (a failed commit then stops the coordinator, and nothing was
    ever reserved). The read is answered once it is committed."""
    store = RecordingStore()
    async with running_api(tmp_path, FakeClock(), store=store, billing=True) as api:
        user = await funded_user(api)
        if read == "user":
            path, headers = f"/v1/users/{user['user_id']}/balance", bearer(user["session_token"])
        else:
            path, headers = f"/v1/admin/accounts/wallet:{user['wallet_address']}", ADMIN
        answers = await answered_after_commit(
            api,
            store,
            ("submit", submit(api, user, "4")),
            ("read", api.http.get(path, headers=headers)),
        )
        assert answers == [("submit", 201), ("read", 200)]


def test_a_socket_submission_in_another_currency_is_refused_as_on_rest(tmp_path: Path) -> None:
    """REST refuses a payment_currency other than AITBC (422); the socket ignored the field and
    reserved the amount in AITBC: a client paying 1 BTC was charged 1 AITBC (found by the input
    hunt). The socket reads payment_currency as REST does: error invalid, nothing reserved."""
    from tests.conftest import make_settings
    from tests.web.test_app import TestClient, client_socket, hello, recv
    from web.app import create_app

    app = create_app(make_settings(tmp_path, billing=True))
    with TestClient(app) as c:
        client_id = app.state.core.auth.from_token(CLIENT_KEY).id
        r = c.post(
            f"/v1/admin/accounts/client:{client_id}/credit", json={"amount": "5"}, headers=ADMIN
        )
        assert r.status_code == 200
        body = {"payload": {}, "payment_amount": 1, "payment_currency": "BTC"}
        r = c.post("/v1/jobs", json=body, headers={"X-Api-Key": CLIENT_KEY})
        detail = "payment_currency: only AITBC is accepted"
        assert (r.status_code, r.json()["detail"]) == (422, detail)
        with client_socket(c) as ws:
            hello(ws)
            ws.send_json({"type": "job.submit", "id": "s1", **body})
            error = recv(ws)
            assert (error["type"], error["code"], error["id"]) == ("error", "invalid", "s1")
            assert error["message"] == detail
            ack_body = {**body, "payment_currency": "AITBC"}
            ws.send_json({"type": "job.submit", "id": "s3", **ack_body})
            ack = recv(ws)
            assert (ack["type"], ack["job"]["payment_amount"]) == ("ack", "1.00000000")
        r = c.get(f"/v1/admin/accounts/client:{client_id}", headers=ADMIN)
        assert r.json()["balance"] == "4.00000000"
