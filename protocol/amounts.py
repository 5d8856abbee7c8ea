"""Exact money amounts: integers of 1e-8 (like satoshis), written as decimal strings.

Rule: no float ever holds a balance. Amounts cross the wire as decimal strings with exactly
8 places (``"10000.00000000"``, the upstream Decimal form); JSON numbers are accepted as input
and read through their shortest text (``0.1`` is 0.1, not 0.1000000000000000055…).
"""

from __future__ import annotations

import re
from decimal import ROUND_DOWN, Decimal, InvalidOperation
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["MAX_RECEIPT_UNITS", "UNIT", "AmountError", "format_units", "price_units", "to_units"]

UNIT = 10**8  # units of 1e-8 in one coin
# What one receipt counts at most in a miner's earnings (a miner may advertise any finite
# price): the stores' sums stay exact and never overflow (storage/sql.py ``_PRICE_UNITS``).
MAX_RECEIPT_UNITS = 10**18
_PLACES = Decimal(1).scaleb(-8)
# The significant digits any float keeps exactly (DBL_DIG): a decimal of up to 15 digits read
# as a float has itself as its shortest text (``repr``), a longer one may not.
FLOAT_DIGITS = 15
_DECIMAL_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


class AmountError(ValueError):
    """Not a valid amount; the message says why."""


def to_units(value: object, *, name: str = "amount") -> int:
    """Parse a decimal string, int or float into units of 1e-8.

    Raises AmountError for anything that is not a finite number or has more than 8 places.
    """
    if isinstance(value, bool) or not isinstance(value, str | int | float | Decimal):
        raise AmountError(f"{name} must be a decimal number")
    if isinstance(value, str) and not _DECIMAL_TEXT.fullmatch(value.strip()):
        # Decimal() also takes "1_0", other scripts' digits, "NaN" and "Infinity"
        raise AmountError(f"{name} must be a decimal number")
    # Every value left is one Decimal takes (text matched the pattern above), but for an
    # exponent past Decimal's largest ("1e+1000000000000000000" raised InvalidOperation: a 500).
    try:
        d = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except InvalidOperation:
        raise AmountError(f"{name} is too large") from None
    if not d.is_finite():  # a float or Decimal NaN or infinity
        raise AmountError(f"{name} must be a finite number")
    if isinstance(value, float) and len(d.as_tuple().digits) > FLOAT_DIGITS:
        # A JSON number is read as a float: past 15 digits its shortest text may not be the
        # number sent (1234567890.12345678 reads as 1234567890.1234567).
        raise AmountError(
            f"{name} has more than {FLOAT_DIGITS} digits, more than a JSON number keeps "
            "exactly: send it as a string"
        )
    # 1e10 coins (1e18 units: sums stay inside 64-bit integers). ``adjusted`` (the exponent of
    # the leading digit), not arithmetic: arithmetic on 1e1000000 overflows the decimal context.
    if d and d.adjusted() >= 10:  # (a zero's exponent says nothing: 0e1000000 is 0)
        raise AmountError(f"{name} is too large")
    if d.quantize(_PLACES) != d:
        raise AmountError(f"{name} has more than 8 decimal places")
    return int(d.scaleb(8))


def format_units(units: int) -> str:
    """Units of 1e-8 as a decimal string with exactly 8 places."""
    sign = "-" if units < 0 else ""
    whole, frac = divmod(abs(units), UNIT)
    return f"{sign}{whole}.{frac:08d}"


def price_units(receipt: Mapping[str, object] | None) -> int:
    """The receipt's price (a JSON float, 6 places) in units of 1e-8; 0 without a receipt or
    a positive price."""
    price = None if receipt is None else receipt.get("price")
    if isinstance(price, bool) or not isinstance(price, int | float) or price <= 0:
        return 0
    return int((Decimal(repr(price)).scaleb(8)).to_integral_value(rounding=ROUND_DOWN))
