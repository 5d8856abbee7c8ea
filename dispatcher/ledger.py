"""The credit ledger's rules: accounts, movements, job billing, balances (docs/wallet.md).

Rule 1 (double entry): money only moves; a ``Movement`` takes ``amount`` from ``src`` and gives
it to ``dst`` and is written as two entries that sum to zero, under an idempotency ``key`` that
the store keeps unique. Only issuer accounts (``exchange:``, ``system:``) may go below zero:
their negative balance is the money that entered the system.
Rule 2 (no overspending): ``Ledger`` holds the committed balance of every account plus the
debits staged but not yet committed. ``stage`` refuses a movement that would take a spendable
account below zero counting what is already staged, and runs synchronously, so two
concurrent requests cannot both spend the same money. Credits count only once committed.
Rule 3: amounts are integers of 1e-8 (``protocol.amounts``). Pure: no I/O, no clock.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeGuard

from dispatcher.errors import PaymentRequired
from protocol.amounts import format_units

if TYPE_CHECKING:
    from collections.abc import Iterable

    from protocol.types import JSONObject

__all__ = [
    "ADMIN_ACCOUNT",
    "EXCHANGE_ACCOUNT",
    "MAX_ISSUED",
    "MAX_LEDGER",
    "Ledger",
    "Movement",
    "client_account",
    "escrow_account",
    "exchange_credit",
    "is_payout_address",
    "is_wallet_address",
    "job_reservation",
    "job_settlement",
    "payee_account",
    "wallet_account",
]

EXCHANGE_ACCOUNT = "exchange:btc"
ADMIN_ACCOUNT = "system:admin"
ISSUERS = ("exchange:", "system:")
# The most money the issuers may create together (1e10 AITBC), checked when money is asked
# for: an admin credit, an exchange payment request. Pending payments do not count against it
# (payers are free to make wallets, so unpaid requests would lock every other payer out), so a
# paid payment is credited past it, up to MAX_LEDGER: every balance, and every sum of entries
# a store adds up, then fits a 64-bit integer (SQLite's SUM raises on overflow).
MAX_ISSUED = 10**18
MAX_LEDGER = 2**63 - 1
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
PAYOUT_KEYS = ("payout_address", "wallet_address")


@dataclass(frozen=True, slots=True, kw_only=True)
class Movement:
    key: str
    src: str
    dst: str
    amount: int
    kind: str
    ref: str | None = None

    def __post_init__(self) -> None:
        assert self.amount > 0, "a movement moves a positive amount"
        assert self.src != self.dst


def is_wallet_address(value: object) -> TypeGuard[str]:
    """``0x`` and 40 hex digits, the whole text (a trailing newline is not one)."""
    return isinstance(value, str) and _ADDRESS.fullmatch(value) is not None


def is_payout_address(value: object) -> TypeGuard[str]:
    """A wallet address a miner's earnings may go to: in one case (no checksum), or in mixed
    case with its EIP-55 checksum right, as wallets show it: an address copied from a wallet
    and mistyped is caught (its earnings would go to a wallet whose key nobody holds)."""
    if not is_wallet_address(value):
        return False
    digits = value[2:]
    return digits in (digits.lower(), digits.upper()) or _checksum_holds(value)


@functools.lru_cache(maxsize=1024)  # settlement asks again for every job a miner completes
def _checksum_holds(address: str) -> bool:
    # Imported on first use, as web/wallet_auth.py imports eth-account: eth_utils (its
    # dependency) takes a fifth of a second to import, and only mixed-case addresses need it.
    from eth_utils.address import is_checksum_address

    return bool(is_checksum_address(address))


def wallet_account(address: str) -> str:
    """A user's account is its wallet: miners can name it as a payout address."""
    return f"wallet:{address.lower()}"


def client_account(client_id: str) -> str:
    return f"client:{client_id}"


def escrow_account(job_id: str) -> str:
    return f"escrow:{job_id}"


def payee_account(miner_id: str, capabilities: JSONObject) -> str:
    """Where a miner's earnings go: its payout wallet when it named one (a mixed-case one with
    its EIP-55 checksum right), else its own account."""
    for key in PAYOUT_KEYS:
        address = capabilities.get(key)
        if is_payout_address(address):
            return wallet_account(address)
    return f"miner:{miner_id}"


def job_reservation(job_id: str, payment: JSONObject) -> Movement:
    """Submission: the job's amount moves from the payer to the job's escrow."""
    return Movement(
        key=f"job:{job_id}:reserve",
        src=payment["account"],
        dst=escrow_account(job_id),
        amount=payment["amount"],
        kind="job_reserve",
        ref=job_id,
    )


def job_settlement(
    job_id: str, payment: JSONObject, state: str, price: int, payee: str | None
) -> list[Movement]:
    """The job ended in ``state``: empty its escrow.

    COMPLETED pays ``min(price, reserved)`` to ``payee`` and returns the rest; every other end
    (FAILED, CANCELED, EXPIRED) returns the whole reservation.
    """
    escrow, amount = escrow_account(job_id), payment["amount"]
    paid = min(price, amount) if state == "COMPLETED" and payee is not None else 0
    out = []
    if paid > 0:
        assert payee is not None
        out.append(
            Movement(
                key=f"job:{job_id}:pay",
                src=escrow,
                dst=payee,
                amount=paid,
                kind="job_payment",
                ref=job_id,
            )
        )
    if amount - paid > 0:
        out.append(
            Movement(
                key=f"job:{job_id}:refund",
                src=escrow,
                dst=payment["account"],
                amount=amount - paid,
                kind="job_refund",
                ref=job_id,
            )
        )
    return out


def exchange_credit(payment_id: str, account: str, amount: int) -> Movement:
    """A confirmed exchange payment: new credit from the exchange issuer (once per payment)."""
    return Movement(
        key=f"exchange:{payment_id}",
        src=EXCHANGE_ACCOUNT,
        dst=account,
        amount=amount,
        kind="exchange_credit",
        ref=payment_id,
    )


def _checked(account: str) -> bool:
    """Spendable accounts are checked at staging; issuers may go negative, and an escrow is
    only ever debited by the settlement of the reservation that filled it."""
    return not account.startswith(ISSUERS) and not account.startswith("escrow:")


class Ledger:
    """Committed balances plus staged debits: the in-memory view of the ledger (Rule 2)."""

    def __init__(self, balances: dict[str, int] | None = None) -> None:
        self._balances: dict[str, int] = {a: b for a, b in (balances or {}).items() if b}
        self._held: dict[str, int] = {}

    def balance(self, account: str) -> int:
        """Committed balance."""
        return self._balances.get(account, 0)

    def available(self, account: str) -> int:
        """Committed balance less the debits staged and not yet committed."""
        return self._balances.get(account, 0) - self._held.get(account, 0)

    def balances(self) -> dict[str, int]:
        return dict(self._balances)

    def issued(self) -> int:
        """The money the issuers created, counting their debits staged but not committed."""
        return -self.available(EXCHANGE_ACCOUNT) - self.available(ADMIN_ACCOUNT)

    def stage(self, movements: Iterable[Movement]) -> None:
        """Hold the debits of ``movements`` (all or nothing); raises PaymentRequired."""
        moves = list(movements)
        need: dict[str, int] = {}
        for m in moves:
            if _checked(m.src):
                need[m.src] = need.get(m.src, 0) + m.amount
        for account, amount in need.items():
            if self.available(account) < amount:
                raise PaymentRequired(
                    f"insufficient balance: {format_units(self.available(account))} AITBC "
                    f"available, {format_units(amount)} AITBC needed"
                )
        for m in moves:
            self._held[m.src] = self._held.get(m.src, 0) + m.amount

    def unstage(self, movements: Iterable[Movement]) -> None:
        """Give staged debits back (the write they belonged to was not made)."""
        for m in movements:
            self._release(m.src, m.amount)

    def commit(self, movements: Iterable[Movement]) -> None:
        """Staged movements are durable: apply them to the committed balances."""
        for m in movements:
            self._release(m.src, m.amount)
            self._add(m.src, -m.amount)
            self._add(m.dst, m.amount)

    def _release(self, account: str, amount: int) -> None:
        left = self._held.get(account, 0) - amount
        assert left >= 0, "released more than was held"
        if left:
            self._held[account] = left
        else:
            self._held.pop(account, None)

    def _add(self, account: str, amount: int) -> None:
        value = self._balances.get(account, 0) + amount
        if value:
            self._balances[account] = value
        else:
            self._balances.pop(account, None)
