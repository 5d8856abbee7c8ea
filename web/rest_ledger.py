"""Admin ledger routes: read any account, credit an account (docs/wallet.md).

Accounts: ``wallet:<0x address>`` (a user, or a miner's payout wallet), ``client:<client id>``
(an API-key client), ``miner:<miner id>``, ``escrow:<job id>``; issuers ``exchange:btc`` and
``system:admin`` are where money enters (their balances are negative).
"""

from __future__ import annotations

import re
import uuid
from typing import TYPE_CHECKING

from dispatcher.ledger import ADMIN_ACCOUNT, Movement, is_payout_address
from protocol.amounts import AmountError, format_units, to_units
from protocol.codec import CONTROL_CHARACTERS
from web.auth import Role
from web.http import Call, Endpoint, HTTPError, json_response, page_params
from web.rest_users import transaction_view

if TYPE_CHECKING:
    from starlette.responses import Response

__all__ = ["ENDPOINTS", "account_view"]

# Matched whole (``$`` also matched before a final newline). An id is any text of up to 128
# characters but control characters (C0, DEL, C1: what a hello and X-Miner-ID refuse in a
# miner id, so every miner's account can be read): a miner id is UTF-8 (X-Miner-ID, a socket
# hello), so "gpu-é" or "rack 2/gpu 1" has an account too (with "/": the route's
# ``{account:id}``).
ACCOUNT = re.compile(
    rf"wallet:0x[0-9a-f]{{40}}|(client|miner|escrow):[^{CONTROL_CHARACTERS}]{{1,128}}"
    r"|exchange:btc|system:admin"
)
_CREDITABLE = ("wallet:", "client:", "miner:")


def _account(call: Call) -> str:
    account = call.path("account")
    if account.startswith("wallet:"):  # an address in any case names its lowercase account
        account = account.lower()  # (ledger.wallet_account), as every other route reads it
    if not ACCOUNT.fullmatch(account):
        raise HTTPError(400, "invalid account (wallet:0x…, client:…, miner:…, escrow:…)")
    return account


async def account_view(call: Call, account: str) -> dict[str, str]:
    """The account's balance and what is available of it, answered once what ``available``
    counts is committed (it is less the debits staged for work in flight)."""
    dispatcher = call.core.dispatcher
    ledger = dispatcher.ledger
    view = {
        "account": account,
        "balance": format_units(ledger.balance(account)),
        "available": format_units(ledger.available(account)),
        "currency": "AITBC",
    }
    return await dispatcher.committed(view)


async def get_account(call: Call) -> Response:
    account = _account(call)
    entries, total = await call.core.store.ledger_entries(
        account, call.query["limit"], call.query["offset"]
    )
    return json_response(
        {
            **(await account_view(call, account)),
            "transactions": [transaction_view(e) for e in entries],
            "total": total,
        }
    )


async def credit(call: Call) -> Response:
    account = _account(call)
    if not account.startswith(_CREDITABLE):
        raise HTTPError(400, "only wallet:, client: and miner: accounts can be credited")
    address = call.path("account").removeprefix("wallet:")
    if account.startswith("wallet:") and not is_payout_address(address):
        # No route takes a credit back: a mistyped address would keep it for good.
        raise HTTPError(
            400,
            f"{address}: its mixed case is not its EIP-55 checksum (a typo?); "
            "give the address as the wallet shows it, or in one case",
        )
    try:
        amount = to_units(call.body["amount"])
    except AmountError as exc:
        raise HTTPError(422, str(exc)) from None
    if amount <= 0:
        raise HTTPError(422, "amount must be positive")
    await call.core.exchange.check_cap(amount)  # pending exchange payments count too
    movement = Movement(
        key=f"admin:{uuid.uuid4()}",
        src=ADMIN_ACCOUNT,
        dst=account,
        amount=amount,
        kind="admin_credit",
        ref=call.body.get("note"),
    )
    await call.core.dispatcher.write(lambda batch: None, [movement])
    return json_response(await account_view(call, account))


_errors = {
    400: ("invalid account", "Error"),
    401: ("missing or unknown credential", "Error"),
    403: ("not an admin credential", "Error"),
}

ENDPOINTS = [
    Endpoint(
        "GET",
        ("/v1/admin/accounts/{account:id}",),
        get_account,
        "A ledger account: balance and entries, newest first",
        "admin",
        role=Role.ADMIN,
        query=page_params(default=50),
        strict_query=True,
        responses={
            200: ("the account", "Account"),
            422: ("invalid or unknown query parameter", "Error"),
            **_errors,
        },
    ),
    Endpoint(
        "POST",
        ("/v1/admin/accounts/{account:id}/credit",),
        credit,
        "Credit an account from system:admin (each call is a new movement)",
        "admin",
        role=Role.ADMIN,
        body="Credit",
        responses={
            200: ("credited (committed)", "Account"),
            **_errors,
            400: ("invalid account / a mixed-case wallet address failing its checksum", "Error"),
            409: ("the AITBC issued in all would pass 10000000000", "Error"),
            422: ("invalid amount", "Error"),
        },
    ),
]
