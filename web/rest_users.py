"""Wallet users: nonce, login/register, logout, profile, balance, transactions (§2.5).

The seed path ``POST /v1/users/login`` is an alias of ``POST /v1/login`` (login or register).
Balances come from the ledger's in-memory view (docs/wallet.md); transactions from the store.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from protocol.amounts import format_units
from protocol.types import iso_time
from web.auth import Role
from web.http import Call, Endpoint, HTTPError, json_response, page_params
from web.wallet_auth import AUTO_EMAIL_DOMAIN, login_message, normalize_wallet

if TYPE_CHECKING:
    from starlette.responses import Response

    from storage.base import LedgerEntry, UserRecord
    from web.auth import Principal

__all__ = ["ENDPOINTS", "transaction_view"]

_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]{1,189}")
DESCRIPTIONS = {
    "job_reserve": "payment reserved for job",
    "job_payment": "payment for job",
    "job_refund": "reservation returned for job",
    "exchange_credit": "credit bought with BTC, payment",
    "admin_credit": "credit from an administrator",
}


def _profile(user: UserRecord, token: str) -> dict[str, str]:
    return {
        "user_id": user.user_id,
        "email": user.email,
        "username": user.username,
        "wallet_address": user.wallet_address,
        "created_at": iso_time(user.created_at),
        "session_token": token,
    }


async def nonce(call: Call) -> Response:
    wallet = normalize_wallet(call.body["wallet_address"])
    record = await call.core.wallet.issue_nonce(wallet)
    return json_response(
        {
            "wallet_address": wallet,
            "nonce": record.nonce,
            "expires_at": int(record.expires_at),
            "message": login_message(wallet, record.nonce),
        }
    )


async def login(call: Call) -> Response:
    body = call.body
    wallet = normalize_wallet(body["wallet_address"])
    user, token = await call.core.wallet.login(wallet, body["nonce"], body["signature"])
    return json_response(_profile(user, token))


async def register(call: Call) -> Response:
    body = call.body
    wallet = normalize_wallet(body["wallet_address"])
    email = str(body["email"]).strip().lower()
    username = str(body["username"]).strip()
    if not _EMAIL.fullmatch(email):
        raise HTTPError(400, "Invalid email address")
    if email.endswith("@" + AUTO_EMAIL_DOMAIN):
        # Logins of unregistered wallets get these addresses (``<wallet>@aitbc.local``).
        raise HTTPError(400, f"Email addresses @{AUTO_EMAIL_DOMAIN} are reserved")
    if not username:
        raise HTTPError(400, "username must not be empty")
    user, token = await call.core.wallet.login(
        wallet, body["nonce"], body["signature"], register=(email, username)
    )
    return json_response(_profile(user, token))


def _session(call: Call) -> Principal:
    principal = call.principal
    if principal is None or principal.user_id is None:
        raise HTTPError(401, "a wallet session token is required (POST /v1/login)")
    return principal


async def logout(call: Call) -> Response:
    principal = _session(call)
    await call.core.wallet.logout(principal.key_hash)
    return json_response({"message": "Logged out successfully"})


async def me(call: Call) -> Response:
    principal = call.principal
    assert principal is not None
    user = call.core.wallet.users.get(principal.user_id or "")
    if user is None:
        raise HTTPError(404, "User not found (this credential is an API key, not a session)")
    token = call.core.auth.token_from_headers(call.request.headers) or ""
    return json_response(_profile(user, token))


def _owned_user(call: Call) -> UserRecord:
    """The path's user: the caller's own, or any for an admin (403 otherwise)."""
    user_id = call.path("user_id")
    principal = call.principal
    assert principal is not None
    if not principal.acts_as(Role.ADMIN) and principal.user_id != user_id:
        raise HTTPError(403, "Access denied")
    user = call.core.wallet.users.get(user_id)
    if user is None:
        raise HTTPError(404, "User not found")
    return user


async def balance(call: Call) -> Response:
    user = _owned_user(call)
    account = f"wallet:{user.wallet_address}"
    dispatcher = call.core.dispatcher
    ledger = dispatcher.ledger
    latest, _ = await call.core.store.ledger_entries(account, 1, 0)
    view = {
        "user_id": user.user_id,
        "address": user.wallet_address,
        "balance": format_units(ledger.balance(account)),
        "available": format_units(ledger.available(account)),
        "currency": "AITBC",
        "updated_at": iso_time(latest[0].at if latest else user.created_at),
    }
    # ``available`` is less the debits staged for work in flight: answered once committed.
    return json_response(await dispatcher.committed(view))


def transaction_view(e: LedgerEntry) -> dict[str, object]:
    at = iso_time(e.at)
    return {
        "id": f"{e.movement_key}#{e.leg}",
        "type": e.kind,
        "status": "confirmed",
        "amount": format_units(e.amount),
        "fee": format_units(0),
        "description": f"{DESCRIPTIONS.get(e.kind, e.kind)} {e.ref or ''}".strip(),
        "reference": e.ref,
        "created_at": at,
        "confirmed_at": at,
    }


async def transactions(call: Call) -> Response:
    user = _owned_user(call)
    entries, total = await call.core.store.ledger_entries(
        f"wallet:{user.wallet_address}", call.query["limit"], call.query["offset"]
    )
    return json_response(
        {
            "user_id": user.user_id,
            "transactions": [transaction_view(e) for e in entries],
            "total": total,
        }
    )


_any = {
    401: ("missing, unknown or expired credential", "Error"),
}
_nonce_errors = {
    400: ("invalid wallet address / already registered", "Error"),
    401: ("invalid, replayed or expired nonce; invalid signature", "Error"),
    422: ("invalid body", "Error"),
}
_user_path = {
    401: ("missing, unknown or expired credential", "Error"),
    403: ("another user's account (admins may read any)", "Error"),
    404: ("User not found", "Error"),
}

ENDPOINTS = [
    Endpoint(
        "POST",
        ("/v1/auth/nonce",),
        nonce,
        "Get a login challenge for a wallet (single use, 300 s)",
        "users",
        body="NonceRequest",
        responses={
            200: ("the nonce and the exact message to sign", "Nonce"),
            400: ("Invalid wallet address", "Error"),
        },
    ),
    Endpoint(
        "POST",
        ("/v1/login", "/v1/users/login"),
        login,
        "Log in with a signed challenge (unknown wallets are registered)",
        "users",
        body="LoginRequest",
        responses={200: ("a new session token, shown once", "UserProfile"), **_nonce_errors},
    ),
    Endpoint(
        "POST",
        ("/v1/register",),
        register,
        "Register a wallet with an email and username",
        "users",
        body="RegisterRequest",
        responses={200: ("a new session token, shown once", "UserProfile"), **_nonce_errors},
    ),
    Endpoint(
        "POST",
        ("/v1/logout",),
        logout,
        "Revoke the session token used for this call",
        "users",
        any_role=True,
        body_required=False,
        responses={200: ("revoked", "Message"), **_any},
    ),
    Endpoint(
        "GET",
        ("/v1/users/me",),
        me,
        "The session's user",
        "users",
        any_role=True,
        responses={
            200: ("the profile (echoes the token)", "UserProfile"),
            404: ("not a wallet session", "Error"),
            **_any,
        },
    ),
    Endpoint(
        "GET",
        ("/v1/users/{user_id}/balance",),
        balance,
        "A user's AITBC balance",
        "users",
        any_role=True,
        responses={200: ("balance and available amount", "Balance"), **_user_path},
    ),
    Endpoint(
        "GET",
        ("/v1/users/{user_id}/transactions",),
        transactions,
        "A user's ledger entries, newest first",
        "users",
        any_role=True,
        query=page_params(default=50),
        strict_query=True,
        responses={
            200: ("entries", "TransactionList"),
            422: ("invalid or unknown query parameter", "Error"),
            **_user_path,
        },
    ),
]
