"""Wallet login, sessions, profile, balance and transactions (rest-api.md §2.5, §8 54-57)."""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING

import anyio
import pytest

from tests.conftest import ADMIN_KEY, CLIENT_KEY
from tests.fakes import FakeClock, RecordingStore
from tests.web.rest_harness import running_api
from tests.web.wallet_helpers import KEY_A, KEY_B, address_of, bearer, get_nonce, login, sign

if TYPE_CHECKING:
    from pathlib import Path

    from tests.web.rest_harness import Api

pytestmark = pytest.mark.anyio


async def test_nonce_for_a_wallet_and_400_for_a_bad_address(tmp_path: Path) -> None:
    """A valid address gets a nonce valid 300 s and the exact message; "bad" is 400."""
    clock = FakeClock()
    async with running_api(tmp_path, clock) as api:
        wallet = address_of(KEY_A)
        r = await api.http.post("/v1/auth/nonce", json={"wallet_address": wallet})
        assert r.status_code == 200
        body = r.json()
        assert body["wallet_address"] == wallet.lower()
        assert body["expires_at"] == int(clock.now() + 300)
        assert body["message"].endswith(f"Wallet: {wallet.lower()}\nNonce: {body['nonce']}")
        for bad in ("bad", "0x123", "0x" + "g" * 40):
            r = await api.http.post("/v1/auth/nonce", json={"wallet_address": bad})
            assert r.status_code == 400
            assert r.json() == {"detail": "Invalid wallet address"}
        r = await api.http.post("/v1/auth/nonce", json={})
        assert r.status_code == 422


async def test_login_registers_then_logs_in_the_same_user(tmp_path: Path) -> None:
    """The first login creates the user; a later one finds it; both tokens are distinct."""
    async with running_api(tmp_path) as api:
        first = await login(api.http)
        assert set(first) >= {"user_id", "email", "username", "created_at", "session_token"}
        assert first["email"] == f"{address_of(KEY_A).lower()}@aitbc.local"
        again = await login(api.http, path="/v1/users/login")  # the seed alias
        assert again["user_id"] == first["user_id"]
        assert again["session_token"] != first["session_token"]


async def test_replayed_nonce_and_foreign_signature_are_401(tmp_path: Path) -> None:
    """A nonce works once; a signature by another key is refused and burns the nonce."""
    async with running_api(tmp_path) as api:
        wallet = address_of(KEY_A)
        nonce = await get_nonce(api.http, wallet)
        body = {"wallet_address": wallet, "nonce": nonce, "signature": sign(KEY_A, wallet, nonce)}
        assert (await api.http.post("/v1/login", json=body)).status_code == 200
        r = await api.http.post("/v1/login", json=body)
        assert r.status_code == 401
        assert "nonce" in r.json()["detail"]

        nonce = await get_nonce(api.http, wallet)
        forged = {**body, "nonce": nonce, "signature": sign(KEY_B, wallet, nonce)}
        r = await api.http.post("/v1/login", json=forged)
        assert r.status_code == 401
        assert r.json() == {"detail": "Invalid wallet signature"}
        ok = {**body, "nonce": nonce, "signature": sign(KEY_A, wallet, nonce)}
        assert (await api.http.post("/v1/login", json=ok)).status_code == 401  # burnt
        for garbage in ("0x1234", "zz" * 65, "0x" + "00" * 65):
            nonce = await get_nonce(api.http, wallet)
            r = await api.http.post(
                "/v1/login", json={**body, "nonce": nonce, "signature": garbage}
            )
            assert r.status_code == 401


async def test_expired_nonce_is_401(tmp_path: Path) -> None:
    """A nonce older than 300 s no longer logs in."""
    clock = FakeClock()
    async with running_api(tmp_path, clock) as api:
        wallet = address_of(KEY_A)
        nonce = await get_nonce(api.http, wallet)
        clock.advance(301)
        body = {"wallet_address": wallet, "nonce": nonce, "signature": sign(KEY_A, wallet, nonce)}
        r = await api.http.post("/v1/login", json=body)
        assert r.status_code == 401


async def test_a_newer_nonce_replaces_the_older_one(tmp_path: Path) -> None:
    async with running_api(tmp_path) as api:
        wallet = address_of(KEY_A)
        old = await get_nonce(api.http, wallet)
        await get_nonce(api.http, wallet)
        body = {"wallet_address": wallet, "nonce": old, "signature": sign(KEY_A, wallet, old)}
        assert (await api.http.post("/v1/login", json=body)).status_code == 401


async def test_register_and_its_conflicts(tmp_path: Path) -> None:
    """Register with email and username; the same wallet or email again is 400."""
    async with running_api(tmp_path) as api:
        user = await login(
            api.http, path="/v1/register", email="Ann@Example.org", username="ann", password="x"
        )
        assert user["email"] == "ann@example.org"
        assert user["username"] == "ann"
        wallet = address_of(KEY_A)
        for key, email, detail in (
            (KEY_A, "other@example.org", "Wallet already registered"),
            (KEY_B, "ann@example.org", "Email already registered"),
            (KEY_B, "not-an-email", "Invalid email address"),
            (KEY_B, "x@AITBC.local", "Email addresses @aitbc.local are reserved"),
        ):
            wallet = address_of(key)
            nonce = await get_nonce(api.http, wallet)
            r = await api.http.post(
                "/v1/register",
                json={
                    "wallet_address": wallet,
                    "nonce": nonce,
                    "signature": sign(key, wallet, nonce),
                    "email": email,
                    "username": "x",
                },
            )
            assert (r.status_code, r.json()["detail"]) == (400, detail)


async def test_a_login_never_collides_with_a_taken_email(tmp_path: Path) -> None:
    """An unregistered wallet's login makes a user ``<wallet>@aitbc.local``. Taking that address
    first once made the login's commit fail, which stops the coordinator (found by a hunt):
    registration refuses the domain, and the login never reuses a taken address."""
    async with running_api(tmp_path) as api:
        wallet_a = address_of(KEY_A).lower()
        nonce = await get_nonce(api.http, address_of(KEY_B))
        r = await api.http.post(
            "/v1/register",
            json={
                "wallet_address": address_of(KEY_B),
                "nonce": nonce,
                "signature": sign(KEY_B, address_of(KEY_B), nonce),
                "email": f"{wallet_a}@aitbc.local",
                "username": "b",
            },
        )
        assert r.status_code == 400
        # The same collision through the store's memory (as a user from before this rule):
        api.core.wallet.by_email[f"{wallet_a}@aitbc.local"] = "someone-else"
        user = await login(api.http)
        assert user["email"].startswith(f"{wallet_a}+")
        assert user["email"].endswith("@aitbc.local")
        assert not api.core.failed
        assert (await login(api.http))["user_id"] == user["user_id"]


async def test_session_token_as_bearer_or_header_and_logout(tmp_path: Path) -> None:
    """/users/me works with Bearer and X-Session-Token; garbage 401; logout revokes it."""
    async with running_api(tmp_path) as api:
        user = await login(api.http)
        token = user["session_token"]
        for headers in (bearer(token), {"X-Session-Token": token}):
            r = await api.http.get("/v1/users/me", headers=headers)
            assert r.status_code == 200
            assert r.json()["user_id"] == user["user_id"]
            assert r.json()["email"] == user["email"]
        assert (await api.http.get("/v1/users/me", headers=bearer("garbage"))).status_code == 401
        assert (await api.http.get("/v1/users/me")).status_code == 401
        r = await api.http.get("/v1/users/me", headers={"X-Api-Key": CLIENT_KEY})
        assert r.status_code == 404
        r = await api.http.post("/v1/logout", headers={"X-Api-Key": CLIENT_KEY})
        assert r.status_code == 401
        r = await api.http.post("/v1/logout", headers=bearer(token))
        assert r.json() == {"message": "Logged out successfully"}
        assert (await api.http.get("/v1/users/me", headers=bearer(token))).status_code == 401
        assert (await api.http.post("/v1/logout", headers=bearer(token))).status_code == 401


async def test_session_expires(tmp_path: Path) -> None:
    """A token stops working after SESSION_TTL_HOURS."""
    clock = FakeClock()
    async with running_api(tmp_path, clock, session_ttl_hours=1.0) as api:
        token = (await login(api.http))["session_token"]
        clock.advance(3599)
        assert (await api.http.get("/v1/users/me", headers=bearer(token))).status_code == 200
        clock.advance(2)
        assert (await api.http.get("/v1/users/me", headers=bearer(token))).status_code == 401


async def test_an_ended_session_is_an_invalid_token_not_an_invalid_api_key(tmp_path: Path) -> None:
    """A wallet user whose session had expired (or was logged out) was told 401 "Invalid API
    key" on every route, though a wallet user has no API key. A token sent as Bearer or
    X-Session-Token that is no credential is "Invalid or expired token" now (upstream's
    answer to a bad bearer token is "Invalid token"); an unknown X-Api-Key is still "Invalid
    API key", on /metrics too."""
    clock = FakeClock()
    async with running_api(tmp_path, clock, session_ttl_hours=1.0) as api:
        token = (await login(api.http))["session_token"]
        clock.advance(3601)
        invalid_token = (401, {"detail": "Invalid or expired token"})
        for headers in (bearer(token), {"X-Session-Token": token}):
            r = await api.http.get("/v1/users/me", headers=headers)
            assert (r.status_code, r.json()) == invalid_token
            r = await api.http.post("/v1/jobs", json={"payload": {}}, headers=headers)
            assert (r.status_code, r.json()) == invalid_token
            r = await api.http.get("/metrics", headers=headers)
            assert (r.status_code, r.json()) == invalid_token
        unknown_key = {"X-Api-Key": "not-a-key-at-all"}
        for r in (
            await api.http.post("/v1/jobs", json={"payload": {}}, headers=unknown_key),
            await api.http.get("/metrics", headers=unknown_key),
        ):
            assert (r.status_code, r.json()) == (401, {"detail": "Invalid API key"})


async def test_expired_sessions_leave_memory_without_being_used(tmp_path: Path) -> None:
    """A session only left memory when its token was tried after expiry: one a client never
    used again stayed until a restart, so memory grew with every login. Each login now drops
    the sessions that have expired (the oldest first: they expire in login order)."""
    clock = FakeClock()
    async with running_api(tmp_path, clock, session_ttl_hours=1.0) as api:
        wallet = api.core.wallet
        for _ in range(3):
            await login(api.http)
            clock.advance(1200)
        assert len(wallet.sessions) == 3
        token = (await login(api.http))["session_token"]  # the first one expired
        assert len(wallet.sessions) == 3
        await api.http.post("/v1/logout", headers=bearer(token))
        clock.advance(3600)
        last = (await login(api.http))["session_token"]
        assert len(wallet.sessions) == 1
        assert (await api.http.get("/v1/users/me", headers=bearer(last))).status_code == 200


async def test_sessions_users_and_nonces_survive_a_restart(tmp_path: Path) -> None:
    """A token, a revocation and an open nonce are read back from the database."""
    async with running_api(tmp_path) as api:
        user = await login(api.http)
        revoked = (await login(api.http))["session_token"]
        await api.http.post("/v1/logout", headers=bearer(revoked))
        wallet = address_of(KEY_B)
        nonce = await get_nonce(api.http, wallet)
    async with running_api(tmp_path) as api:
        r = await api.http.get("/v1/users/me", headers=bearer(user["session_token"]))
        assert r.status_code == 200
        assert r.json()["user_id"] == user["user_id"]
        assert (await api.http.get("/v1/users/me", headers=bearer(revoked))).status_code == 401
        body = {"wallet_address": wallet, "nonce": nonce, "signature": sign(KEY_B, wallet, nonce)}
        assert (await api.http.post("/v1/login", json=body)).status_code == 200


async def test_balance_and_transactions_of_self_other_and_admin(tmp_path: Path) -> None:
    """Own balance 200 (zero, 8 places); another user's 403; an admin reads any; 404 unknown."""
    async with running_api(tmp_path) as api:
        a = await login(api.http, KEY_A)
        b = await login(api.http, KEY_B)
        r = await api.http.get(
            f"/v1/users/{a['user_id']}/balance", headers=bearer(a["session_token"])
        )
        assert r.status_code == 200
        body = r.json()
        assert body["user_id"] == a["user_id"]
        assert body["address"] == address_of(KEY_A).lower()
        assert body["balance"] == "0.00000000"
        assert "updated_at" in body
        for path in ("balance", "transactions"):
            r = await api.http.get(
                f"/v1/users/{b['user_id']}/{path}", headers=bearer(a["session_token"])
            )
            assert (r.status_code, r.json()) == (403, {"detail": "Access denied"})
            r = await api.http.get(
                f"/v1/users/{b['user_id']}/{path}", headers={"X-Api-Key": ADMIN_KEY}
            )
            assert r.status_code == 200
            r = await api.http.get("/v1/users/nobody/" + path, headers={"X-Api-Key": ADMIN_KEY})
            assert r.status_code == 404
        r = await api.http.get(
            f"/v1/users/{a['user_id']}/transactions", headers=bearer(a["session_token"])
        )
        assert r.json() == {"user_id": a["user_id"], "transactions": [], "total": 0}


async def test_a_session_is_a_client_on_the_job_routes(tmp_path: Path) -> None:
    """A user submits and reads its own jobs with its token; not a miner or admin route."""
    async with running_api(tmp_path) as api:
        user = await login(api.http)
        headers = bearer(user["session_token"])
        r = await api.http.post("/v1/jobs", json={"payload": {"p": 1}}, headers=headers)
        assert r.status_code == 201
        job_id = r.json()["job_id"]
        r = await api.http.get(f"/v1/jobs/{job_id}", headers=headers)
        assert r.status_code == 200
        assert r.json()["payment_id"] is None  # billing is off
        r = await api.http.get(f"/v1/jobs/{job_id}", headers={"X-Api-Key": CLIENT_KEY})
        assert r.status_code == 404  # not the API-key client's job
        assert (await api.http.get("/v1/admin/stats", headers=headers)).status_code == 403
        r = await api.http.post("/v1/miners/register", json={"capabilities": {}}, headers=headers)
        assert r.status_code == 403


def test_a_session_token_opens_the_client_socket(tmp_path: Path) -> None:
    """The client socket takes a session token (Bearer or X-Session-Token) as a client."""
    from tests.conftest import make_settings
    from tests.web.test_app import TestClient
    from web.app import create_app

    app = create_app(make_settings(tmp_path))
    with TestClient(app) as c:
        wallet = address_of(KEY_A)
        nonce = c.post("/v1/auth/nonce", json={"wallet_address": wallet}).json()["nonce"]
        body = {"wallet_address": wallet, "nonce": nonce, "signature": sign(KEY_A, wallet, nonce)}
        user = c.post("/v1/login", json=body).json()
        token = user["session_token"]
        for headers in (bearer(token), {"X-Session-Token": token}):
            with c.websocket_connect("/v1/jobs/ws", headers=headers) as ws:
                ws.send_json({"type": "hello", "protocol": 1})
                welcome = ws.receive_json()
                assert (welcome["type"], welcome["client_id"]) == ("welcome", user["user_id"])


@pytest.mark.parametrize("end", ["logout", "expiry"])
def test_a_socket_dies_with_its_session(tmp_path: Path, end: str) -> None:
    """A client socket opened with a session token stops with it: once the session is logged
    out or expired, its next message closes it (4401) before it is acted on. The socket kept
    submitting paid jobs from the wallet after logout (found by a hunt)."""
    from starlette.websockets import WebSocketDisconnect

    from tests.conftest import make_settings
    from tests.web.test_app import TestClient, hello, recv
    from web.app import create_app

    clock = FakeClock()
    app = create_app(make_settings(tmp_path, billing=True, session_ttl_hours=1.0), clock=clock)
    with TestClient(app) as c:
        wallet = address_of(KEY_A)
        nonce = c.post("/v1/auth/nonce", json={"wallet_address": wallet}).json()["nonce"]
        body = {"wallet_address": wallet, "nonce": nonce, "signature": sign(KEY_A, wallet, nonce)}
        token = c.post("/v1/login", json=body).json()["session_token"]
        account = f"/v1/admin/accounts/wallet:{wallet.lower()}"
        admin = {"X-Api-Key": ADMIN_KEY}
        assert c.post(account + "/credit", json={"amount": "5"}, headers=admin).status_code == 200
        with c.websocket_connect("/v1/jobs/ws", headers=bearer(token)) as ws:
            hello(ws)
            first = {"id": "s1", "payload": {}, "payment_amount": 1, "ttl_seconds": 86400}
            ws.send_json({"type": "job.submit", **first})
            assert recv(ws)["type"] == "ack"
            assert recv(ws)["type"] == "job.event"
            if end == "logout":
                assert c.post("/v1/logout", headers=bearer(token)).status_code == 200
            else:
                clock.advance(3601)
            ws.send_json({"type": "job.submit", "id": "s2", "payload": {}, "payment_amount": 1})
            with pytest.raises(WebSocketDisconnect) as info:
                recv(ws)
            assert info.value.code == 4401
        assert c.get(account, headers=admin).json()["balance"] == "4.00000000"


async def test_public_wallet_posts_are_rate_limited_per_client_address(tmp_path: Path) -> None:
    """With RATE_LIMIT_PER_MINUTE, nonce requests without a credential are limited per IP."""
    async with running_api(tmp_path, rate_limit_per_minute=2) as api:
        wallet = address_of(KEY_A)
        for _ in range(2):
            await get_nonce(api.http, wallet)
        r = await api.http.post("/v1/auth/nonce", json={"wallet_address": wallet})
        assert r.status_code == 429
        assert "Retry-After" in r.headers


async def _log_in_with(api: Api, key: str, nonce: str) -> int:
    wallet = address_of(key)
    body = {"wallet_address": wallet, "nonce": nonce, "signature": sign(key, wallet, nonce)}
    return (await api.http.post("/v1/login", json=body)).status_code


async def test_a_flood_of_nonce_requests_does_not_lock_out_logins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the rate limit off, MAX_OPEN_NONCES requests for random wallets in a nonce's
    lifetime (about 333 a second) answered every other wallet 429, so no one could log in. At
    the cap the oldest newcomer's challenge goes (memory and database), and registered wallets'
    challenges are not counted, so a flood never touches them."""
    from web import wallet_auth

    monkeypatch.setattr(wallet_auth, "MAX_OPEN_NONCES", 3)
    flood = iter(f"0x{n:040x}" for n in range(1, 100))
    async with running_api(tmp_path, FakeClock()) as api:
        for _ in range(3):
            await get_nonce(api.http, next(flood))
        first = await get_nonce(api.http, address_of(KEY_A))  # a newcomer, at the cap
        for _ in range(2):
            await get_nonce(api.http, next(flood))
        assert await _log_in_with(api, KEY_A, first) == 200  # now registered
        again = await get_nonce(api.http, address_of(KEY_A))
        newcomer = await get_nonce(api.http, address_of(KEY_B))
        for _ in range(3):
            await get_nonce(api.http, next(flood))
        assert await _log_in_with(api, KEY_B, newcomer) == 401  # three newer: it went first
        assert await _log_in_with(api, KEY_A, again) == 200
        assert len(api.core.wallet.nonces) == 3
        snap = await api.core.store.load_wallet(0)
        assert {n.wallet_address for n in snap.nonces} == set(api.core.wallet.nonces)


async def test_the_oldest_newcomer_goes_first_after_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Challenges are reloaded oldest first; a registered wallet's is not counted."""
    from web import wallet_auth

    monkeypatch.setattr(wallet_auth, "MAX_OPEN_NONCES", 2)
    clock = FakeClock()
    async with running_api(tmp_path, clock) as api:
        await login(api.http, KEY_A)
        mine = await get_nonce(api.http, address_of(KEY_A))
        for n in (1, 2):
            clock.advance(1)
            await get_nonce(api.http, f"0x{n:040x}")
    async with running_api(tmp_path, clock) as api:
        await get_nonce(api.http, f"0x{3:040x}")
        assert set(api.core.wallet.nonces) == {
            address_of(KEY_A).lower(),
            f"0x{2:040x}",
            f"0x{3:040x}",
        }
        assert await _log_in_with(api, KEY_A, mine) == 200


async def test_nonces_stored_stay_bounded_across_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Start-up loaded only the unexpired nonces, so the expired rows were left in the database
    for good: each flood followed by a restart added up to MAX_OPEN_NONCES rows more. Every
    stored nonce is loaded (an expired one is refused at login) and goes at the cap."""
    from web import wallet_auth

    monkeypatch.setattr(wallet_auth, "MAX_OPEN_NONCES", 3)
    clock = FakeClock()
    flood = iter(f"0x{n:040x}" for n in range(1, 100))
    for _ in range(3):
        async with running_api(tmp_path, clock) as api:
            for _ in range(3):
                await get_nonce(api.http, next(flood))
            stored = (await api.core.store.load_wallet(0)).nonces
            assert len(stored) == 3
        clock.advance(301)
    async with running_api(tmp_path, clock) as api:
        old = next(n for n in stored if n.wallet_address == f"0x{9:040x}")
        body = {"wallet_address": old.wallet_address, "nonce": old.nonce, "signature": "0x"}
        r = await api.http.post("/v1/login", json=body)
        assert (r.status_code, r.json()) == (401, {"detail": "Invalid or expired nonce"})


def test_checking_a_signature_keeps_the_recursion_limit() -> None:
    """eth-account's import (py_ecc) sets the recursion limit to 100,000, past what the C stack
    holds: deep recursion then crashed the process instead of raising RecursionError. The
    first login imports it; the limit is put back. (A fresh interpreter: this one imported
    eth-account for the helpers.)"""
    code = (
        "import sys; from web.wallet_auth import recover_signer; "
        "before = sys.getrecursionlimit(); recover_signer('m', '0x' + '11' * 65); "
        "print(before, sys.getrecursionlimit())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    before, after = out.stdout.split()
    assert after == before


async def test_a_session_works_until_its_logout_is_committed(tmp_path: Path) -> None:
    """A logout dropped the session from memory before its revocation was committed: every
    request with the token was 401 at once (a failed commit then stops the coordinator, and
    after the restart the session the world was told was gone works again). It now works
    until the revocation is committed, and not after."""
    store = RecordingStore()
    async with running_api(tmp_path, FakeClock(), store=store) as api:
        token = (await login(api.http))["session_token"]
        store.block_commits()
        async with anyio.create_task_group() as tg:
            logged_out: list[int] = []

            async def logout() -> None:
                logged_out.append(
                    (await api.http.post("/v1/logout", headers=bearer(token))).status_code
                )

            tg.start_soon(logout)
            await api.settle()
            assert (await api.http.get("/v1/users/me", headers=bearer(token))).status_code == 200
            assert logged_out == []
            store.release_commits()
        assert logged_out == [200]
        assert (await api.http.get("/v1/users/me", headers=bearer(token))).status_code == 401
