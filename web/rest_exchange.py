"""Exchange routes (rest-api.md §2.6, seed doc): buy AITBC credit with BTC.

``POST /v1/exchange/create-payment`` takes ``aitbc_amount`` or ``btc_amount`` (or both, which
must agree at ``BTC_TO_AITBC_RATE``) and answers with a receiving address; confirmation (by the
Esplora watcher or ``POST /v1/admin/payments/{id}/confirm``) credits the payer once.
``GET /v1/exchange/market-stats`` reports the configured price and the stored payments.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from dispatcher.exchange import Match, QuoteError, is_txid, quote
from protocol.amounts import AmountError, format_units, to_units
from web.auth import Role
from web.http import Call, Endpoint, HTTPError, json_response

if TYPE_CHECKING:
    from decimal import Decimal

    from starlette.responses import Response

    from storage.base import PaymentRecord

__all__ = ["ENDPOINTS", "payment_view"]

_USER_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_DAY_SECONDS = 86400.0  # market-stats' "daily" window


def payment_view(p: PaymentRecord) -> dict[str, Any]:
    return {
        "payment_id": p.payment_id,
        "user_id": p.user_id,
        "aitbc_amount": format_units(p.aitbc_units),
        "btc_amount": format_units(p.btc_sats),
        "payment_address": p.address,
        "status": p.status,
        "created_at": int(p.created_at),
        "expires_at": int(p.expires_at),
        "confirmations": p.confirmations,
        "tx_hash": p.tx_hash,
        "confirmed_at": None if p.confirmed_at is None else int(p.confirmed_at),
    }


def _amount(body: dict[str, Any], name: str) -> int | None:
    if body.get(name) is None:
        return None
    try:
        return to_units(body[name], name=name)
    except AmountError as exc:
        raise HTTPError(422, str(exc)) from None


async def create_payment(call: Call) -> Response:
    body = call.body
    if body.get("eth_amount") is not None:
        raise HTTPError(400, "ETH payments are not supported: send btc_amount (or aitbc_amount)")
    user_id = body.get("user_id")
    if user_id is not None and not _USER_ID.fullmatch(str(user_id)):
        raise HTTPError(422, "user_id must be 1-128 characters of A-Z a-z 0-9 _ -")
    aitbc, btc = _amount(body, "aitbc_amount"), _amount(body, "btc_amount")
    try:
        units, sats = quote(aitbc, btc, call.core.exchange.rate)
    except QuoteError as exc:
        raise HTTPError(400 if str(exc) == "Amount mismatch" else 422, str(exc)) from None
    assert call.principal is not None  # the caller's identity wins over the body's user_id
    return json_response(payment_view(await call.core.exchange.create(call.principal, units, sats)))


async def payment_status(call: Call) -> Response:
    record = await call.core.exchange.get(call.path("payment_id"))
    principal = call.principal
    assert principal is not None
    if record is None or (not principal.acts_as(Role.ADMIN) and record.user_id != principal.id):
        raise HTTPError(404, "Payment not found")
    return json_response(payment_view(record))


def _aitbc_to_btc(rate: Decimal) -> str:
    """The BTC price of one AITBC at ``rate`` (AITBC per BTC), to the satoshi."""
    return format_units(round(10**8 / rate))


async def rates(call: Call) -> Response:
    rate = call.core.exchange.rate
    return json_response(
        {
            "btc_to_aitbc": format_units(to_units(rate)),
            "aitbc_to_btc": _aitbc_to_btc(rate),
            "fee_percent": 0,
            "currency_pair": "BTC/AITBC",
            "configured": call.core.exchange.configured,
        }
    )


async def market_stats(call: Call) -> Response:
    """Upstream's market stats, from what this exchange knows: the price is the configured
    rate, so there is no price history and no 24 h change (upstream hard-coded 5.2)."""
    exchange = call.core.exchange
    await exchange.expire_unwatched()  # as payment-status
    stats = await call.core.store.payment_stats(exchange.clock.now() - _DAY_SECONDS)
    return json_response(
        {
            "price": _aitbc_to_btc(exchange.rate),
            "price_change_24h": None,
            "daily_volume": format_units(stats.confirmed_units),
            "daily_volume_btc": format_units(stats.confirmed_sats),
            "total_payments": stats.total,
            "pending_payments": stats.pending,
        }
    )


async def admin_confirm(call: Call) -> Response:
    body = call.body or {}
    tx_hash = body.get("tx_hash")
    if tx_hash is not None and not is_txid(tx_hash.lower()):
        raise HTTPError(422, "tx_hash must be 64 hex digits")
    match = None
    if tx_hash is not None:
        match = Match(tx_hash=tx_hash.lower(), vout=body.get("vout") or 0, value=0, confirmations=0)
    return json_response(payment_view(await call.core.exchange.confirm(call.path("id"), match)))


_auth = {401: ("missing or unknown credential", "Error")}

ENDPOINTS = [
    Endpoint(
        "POST",
        ("/v1/exchange/create-payment",),
        create_payment,
        "Request a BTC payment that buys AITBC credit",
        "exchange",
        role=Role.CLIENT,
        body="PaymentCreate",
        responses={
            200: ("pending, with its receiving address and exact BTC amount", "Payment"),
            400: ("Amount mismatch / ETH amounts", "Error"),
            403: ("not a client credential", "Error"),
            409: (
                "the caller has MAX_PENDING_PAYMENTS pending / "
                "the AITBC issued in all would pass 10000000000",
                "Error",
            ),
            422: ("invalid amounts", "Error"),
            503: ("the exchange is not configured", "Error"),
            **_auth,
        },
    ),
    Endpoint(
        "GET",
        ("/v1/exchange/payment-status/{payment_id}",),
        payment_status,
        "A payment's status (pending, confirmed, expired)",
        "exchange",
        any_role=True,
        responses={200: ("the payment", "Payment"), 404: ("Payment not found", "Error"), **_auth},
    ),
    Endpoint(
        "GET",
        ("/v1/exchange/rates",),
        rates,
        "The BTC/AITBC rate (BTC_TO_AITBC_RATE)",
        "exchange",
        responses={200: ("rates as exact decimals", "Rates")},
    ),
    Endpoint(
        "GET",
        ("/v1/exchange/market-stats",),
        market_stats,
        "Price (BTC per AITBC) and the last 24 h of confirmed payments",
        "exchange",
        description="`price` is the configured rate (as `/v1/exchange/rates`' `aitbc_to_btc`), "
        "so `price_change_24h` is null: there is no price history. `daily_volume` and "
        "`daily_volume_btc` add up the payments confirmed in the last 24 hours.",
        responses={200: ("price and payment figures (committed state)", "MarketStats")},
    ),
    Endpoint(
        "POST",
        ("/v1/admin/payments/{id}/confirm",),
        admin_confirm,
        "Confirm a pending payment by hand and credit it (once)",
        "admin",
        role=Role.ADMIN,
        body="PaymentConfirm",
        body_required=False,
        responses={
            200: ("confirmed (again: unchanged, no second credit)", "Payment"),
            403: ("not an admin credential", "Error"),
            404: ("Payment not found", "Error"),
            409: (
                "expired / output already used / its credit would pass the 64-bit limit",
                "Error",
            ),
            **_auth,
        },
    ),
]
