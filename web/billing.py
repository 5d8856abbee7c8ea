"""The payment a job submission asks for (BILLING=on), shared by REST and the client socket.

See docs/wallet.md: the amount is reserved from the caller's ledger account by the
dispatcher when it queues the job; here it is only parsed and checked.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from protocol.amounts import to_units

if TYPE_CHECKING:
    from protocol.types import JSONObject
    from web.auth import Principal
    from web.settings import Settings

__all__ = ["job_payment"]


def job_payment(
    settings: Settings, principal: Principal, amount: object, currency: object
) -> JSONObject | None:
    """The payment to reserve, or None (billing off, no amount, or zero).

    Raises ValueError (protocol.amounts.AmountError included) with a message for the client.
    """
    if not settings.billing or amount is None:
        return None
    units = to_units(amount, name="payment_amount")
    if units < 0:
        raise ValueError("payment_amount must not be negative")
    if (currency or "AITBC") != "AITBC":
        raise ValueError("payment_currency: only AITBC is accepted")
    if units == 0:
        return None
    return {
        "payment_id": str(uuid.uuid4()),
        "account": principal.account,
        "amount": units,
        "currency": "AITBC",
    }
