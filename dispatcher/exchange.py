"""Exchange rules: BTC <-> AITBC quotes, unique amounts, matching chain outputs (pure).

Rule 1: BTC amounts are satoshis and AITBC amounts units of 1e-8, both integers; the rate is
AITBC per BTC (``BTC_TO_AITBC_RATE``), so ``sats = aitbc_units / rate`` (rounded up: the buyer
never underpays) and ``aitbc_units = sats * rate`` (rounded down).
Rule 2: with one shared receiving address (``BITCOIN_ADDRESS``) payments are told apart by
amount: each payment request on the address gets a satoshi amount no pending payment holds and
no payment settled (confirmed or expired) in the last ``AMOUNT_HOLD_SECONDS`` held, and only an
output of exactly that amount, not in a block older than the request (``BLOCK_TIME_SLACK``
allowed), pays it: a late payment to an expired request cannot pay a later one of the same
amount. With one address per payment (``BITCOIN_XPUB``) any output of at least the amount pays
it, not in a block older than the request either (an index may be handed out again: a
restored database, a wallet sharing the xpub). An output (txid, vout) pays at most one
payment, ever.
Rule 3: a payment is confirmed once its output has the required confirmations; the ledger
credit's key is the payment id, so it is credited once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Container

__all__ = [
    "AMOUNT_HOLD_SECONDS",
    "BLOCK_TIME_SLACK",
    "MIN_AITBC_UNITS",
    "MAX_AITBC_UNITS",
    "MAX_SATS",
    "Match",
    "QuoteError",
    "find_output",
    "quote",
]

MIN_AITBC_UNITS = 1_000_000  # 0.01 AITBC (upstream minimum)
MAX_AITBC_UNITS = 10**6 * 10**8  # 1,000,000 AITBC (upstream maximum)
MAX_SATS = 21_000_000 * 10**8  # every bitcoin there will be: no order asks more
# A shared address's amount stays held this long after its payment settled (a late payment
# is mined by then, so the block-time rule keeps it from paying the amount's next request).
AMOUNT_HOLD_SECONDS = 86400.0
# A block's timestamp may be up to two hours off the time it was mined (consensus allows).
BLOCK_TIME_SLACK = 7200.0


class QuoteError(ValueError):
    """The amounts asked for are not a valid order; the message says why."""


def quote(aitbc_units: int | None, btc_sats: int | None, rate: Decimal) -> tuple[int, int]:
    """(aitbc_units, btc_sats) for an order given in AITBC, in BTC, or both (must agree).

    Raises QuoteError "Amount mismatch" when both are given and differ by more than 1 sat,
    for amounts outside [0.01, 1,000,000] AITBC, and beyond 21,000,000 BTC.
    """
    if aitbc_units is None and btc_sats is None:
        raise QuoteError("give aitbc_amount or btc_amount")
    if btc_sats is not None and btc_sats <= 0:
        raise QuoteError("btc_amount must be positive")
    if aitbc_units is not None and aitbc_units <= 0:
        raise QuoteError("aitbc_amount must be positive")
    if aitbc_units is not None:
        sats = int((Decimal(aitbc_units) / rate).to_integral_value(rounding=ROUND_CEILING))
        if btc_sats is not None and abs(Decimal(btc_sats) - Decimal(aitbc_units) / rate) > 1:
            raise QuoteError("Amount mismatch")
        units = aitbc_units
    else:
        assert btc_sats is not None
        sats = btc_sats
        units = int((Decimal(btc_sats) * rate).to_integral_value(rounding=ROUND_FLOOR))
    if sats > MAX_SATS:  # at a tiny rate, 10^22 sats overflowed the payment's 64-bit column
        raise QuoteError("btc_amount must be at most 21000000 BTC")
    if not MIN_AITBC_UNITS <= units <= MAX_AITBC_UNITS:
        raise QuoteError("aitbc_amount must be between 0.01 and 1000000")
    return units, max(sats, 1)


def unique_amount(sats: int, taken: Container[int]) -> int:
    """The smallest amount >= ``sats`` not in ``taken`` (amounts held on the address)."""
    while sats in taken:
        sats += 1
    return sats


@dataclass(frozen=True, slots=True, kw_only=True)
class Match:
    tx_hash: str
    vout: int
    value: int
    confirmations: int


# Esplora's answers are not trusted to be sane: a txid is 64 hex digits (a stored text), and
# heights beyond this are refused (a confirmation count is a stored 64-bit integer).
_TXID = re.compile(r"[0-9a-f]{64}")
MAX_HEIGHT = 1 << 40


def canonical_address(address: str) -> str:
    """A SegWit address in lowercase (valid in capitals too, as QR codes carry it; Esplora and
    wallets write it in lowercase); any other address as it is (Base58 is case-sensitive)."""
    lower = address.lower()
    return lower if lower.startswith(("bc1", "tb1", "bcrt1")) else address


def is_txid(value: object) -> bool:
    """64 lowercase hex digits, the whole text."""
    return isinstance(value, str) and _TXID.fullmatch(value) is not None


def find_output(
    txs: list[Any],
    address: str,
    sats: int,
    *,
    exact: bool,
    tip_height: int,
    claimed: set[tuple[str, int]],
    mined_after: float | None = None,
) -> Match | None:
    """The best unclaimed output paying ``address`` (Esplora ``/address/:a/txs`` shape).

    Malformed entries are skipped. Confirmed outputs are preferred, most confirmations first.
    With ``mined_after``, outputs in a block whose ``block_time`` is earlier are skipped too.
    """
    best: Match | None = None
    address = canonical_address(address)  # as Esplora writes it
    for tx in txs if isinstance(txs, list) else []:
        if not isinstance(tx, dict) or not is_txid(tx.get("txid")):
            continue
        status = tx.get("status")
        if not isinstance(status, dict):
            status = {}
        height = status.get("block_height")
        confs = 0
        if (
            status.get("confirmed") is True
            and isinstance(height, int)
            and 0 <= height <= tip_height <= MAX_HEIGHT
        ):
            confs = tip_height - height + 1
        mined = status.get("block_time")
        if confs and mined_after is not None and isinstance(mined, int) and mined < mined_after:
            continue
        vouts = tx.get("vout")
        for n, out in enumerate(vouts if isinstance(vouts, list) else []):
            if not isinstance(out, dict) or out.get("scriptpubkey_address") != address:
                continue
            value = out.get("value")
            if isinstance(value, bool) or not isinstance(value, int):
                continue
            if (value != sats if exact else value < sats) or (tx["txid"], n) in claimed:
                continue
            if best is None or confs > best.confirmations:
                best = Match(tx_hash=tx["txid"], vout=n, value=value, confirmations=confs)
    return best


__all__ += ["canonical_address", "is_txid", "unique_amount"]
