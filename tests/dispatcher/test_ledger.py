"""The ledger's pure rules: movements, job settlement, staging (docs/wallet.md)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given, strategies as st

from dispatcher.errors import PaymentRequired
from dispatcher.ledger import (
    ADMIN_ACCOUNT,
    EXCHANGE_ACCOUNT,
    MAX_ISSUED,
    Ledger,
    Movement,
    client_account,
    escrow_account,
    exchange_credit,
    is_wallet_address,
    job_reservation,
    job_settlement,
    payee_account,
    wallet_account,
)
from protocol.amounts import AmountError, format_units, price_units, to_units

WALLET = "0xABaBaBaBABabABabAbAbABAbABabababaBaBABaB"  # 0xab…ab as wallets show it (EIP-55)
PAY: dict[str, Any] = {"payment_id": "p", "account": "client:c1", "amount": 400, "currency": "A"}


@pytest.mark.parametrize(
    ("value", "units"),
    [
        ("1", 100_000_000),
        ("0.00000001", 1),
        (0.1, 10_000_000),
        (3, 300_000_000),
        ("-2.5", -250_000_000),
        (Decimal("1.10000000"), 110_000_000),
        (" 9999999999.99999999 ", 999_999_999_999_999_999),
        ("1e3", 100_000_000_000),
        (".5", 50_000_000),
        ("0e1000000", 0),
    ],
)
def test_to_units_is_exact(value: object, units: int) -> None:
    assert to_units(value) == units


@pytest.mark.parametrize(
    "value",
    [
        *("x", "", "1e400000", "NaN", "Infinity", "0.000000001", True, None, [1], 1e12, "1e10"),
        # Past the decimal context: arithmetic on them raised Overflow (a 500), found by a hunt.
        *("1e1000000", "-1e1000000", Decimal("1e1000000"), "10000000000"),
        *("1_0", "\u0661", "+-1", "1e", "e5"),  # Decimal() takes the first two
        *(float("nan"), float("inf"), Decimal("NaN"), Decimal("-Infinity")),
        # Past the largest exponent Decimal() takes: it raised InvalidOperation (a 500).
        *("0E+1000000000000000000", "1e+1000000000000000000", "-5E9999999999999999999"),
    ],
)
def test_to_units_refuses_what_is_not_an_8_place_amount(value: object) -> None:
    with pytest.raises(AmountError):
        to_units(value, name="payment_amount")


@pytest.mark.parametrize(
    ("text", "units"),
    [("999999.99999999", 99_999_999_999_999), ("1234567.12345678", 123_456_712_345_678)],
)
def test_a_json_number_of_up_to_15_digits_is_exact(text: str, units: int) -> None:
    assert to_units(orjson.loads(text)) == units == to_units(text)


@pytest.mark.parametrize(
    "text", ["1234567890.12345678", "4503599627.37049599", "0.1234567890123456"]
)
def test_a_json_number_a_float_cannot_hold_is_refused(text: str) -> None:
    """A JSON number reaches us as a float, which holds 15 significant digits for sure:
    1234567890.12345678 was read as 1234567890.1234567 (0.00000008 less) and 4503599627.37049599
    as 4503599627.370496 (0.00000001 more), charged or credited without a word. More than 15
    digits is refused, pointing at the string form, which is exact."""
    with pytest.raises(AmountError, match="send it as a string"):
        to_units(orjson.loads(text), name="amount")
    if "." in text and len(text.split(".")[1]) <= 8:
        assert to_units(text) == int(text.replace(".", ""))


@pytest.mark.parametrize(
    ("units", "text"),
    [(0, "0.00000000"), (1, "0.00000001"), (123_456_789, "1.23456789"), (-5, "-0.00000005")],
)
def test_format_units(units: int, text: str) -> None:
    assert format_units(units) == text


@given(st.integers(min_value=-(10**18) + 1, max_value=10**18 - 1))
def test_format_and_parse_round_trip(units: int) -> None:
    assert to_units(format_units(units)) == units


def test_accounts() -> None:
    assert wallet_account(WALLET) == "wallet:" + WALLET.lower()
    assert client_account("client-abc") == "client:client-abc"
    assert escrow_account("j1") == "escrow:j1"
    assert is_wallet_address(WALLET)
    assert not is_wallet_address("0x12")
    assert not is_wallet_address(12)


@pytest.mark.parametrize(
    ("caps", "account"),
    [
        ({}, "miner:m1"),
        ({"payout_address": WALLET}, "wallet:" + WALLET.lower()),
        ({"wallet_address": WALLET}, "wallet:" + WALLET.lower()),
        ({"payout_address": "not-a-wallet"}, "miner:m1"),
        # EIP-55: one case carries no checksum; mixed case must have it right. A wallet shows
        # 0xABaBaB…; one letter's case mistyped is another wallet, whose key nobody holds.
        ({"payout_address": "0x" + "AB" * 20}, "wallet:0x" + "ab" * 20),
        ({"payout_address": "0x" + "12" * 20}, "wallet:0x" + "12" * 20),
        ({"payout_address": "0xab" + WALLET[4:]}, "miner:m1"),
        ({"payout_address": "0x" + "Ab" * 20}, "miner:m1"),
    ],
)
def test_payee_is_the_payout_wallet_when_named(caps: dict[str, Any], account: str) -> None:
    assert payee_account("m1", caps) == account


@pytest.mark.parametrize(
    ("receipt", "units"),
    [
        (None, 0),
        ({}, 0),
        ({"price": 0.03}, 3_000_000),
        ({"price": 1}, 100_000_000),
        ({"price": -1.0}, 0),
        ({"price": True}, 0),
        ({"price": "1"}, 0),
        ({"price": 0.123456789}, 12_345_678),
    ],
)
def test_price_units(receipt: Any, units: int) -> None:
    assert price_units(receipt) == units


def test_reservation_moves_the_amount_to_the_escrow() -> None:
    m = job_reservation("j1", PAY)
    assert (m.src, m.dst, m.amount, m.key) == ("client:c1", "escrow:j1", 400, "job:j1:reserve")


@pytest.mark.parametrize(
    ("state", "price", "payee", "expected"),
    [
        ("COMPLETED", 100, "miner:m", [("miner:m", 100), ("client:c1", 300)]),
        ("COMPLETED", 400, "miner:m", [("miner:m", 400)]),
        ("COMPLETED", 900, "miner:m", [("miner:m", 400)]),
        ("COMPLETED", 0, "miner:m", [("client:c1", 400)]),
        ("COMPLETED", 100, None, [("client:c1", 400)]),
        ("FAILED", 100, "miner:m", [("client:c1", 400)]),
        ("CANCELED", 0, None, [("client:c1", 400)]),
        ("EXPIRED", 0, "miner:m", [("client:c1", 400)]),
    ],
)
def test_settlement_empties_the_escrow(
    state: str, price: int, payee: str | None, expected: list[tuple[str, int]]
) -> None:
    moves = job_settlement("j1", PAY, state, price, payee)
    assert [(m.dst, m.amount) for m in moves] == expected
    assert all(m.src == "escrow:j1" for m in moves)
    assert sum(m.amount for m in moves) == 400
    assert len({m.key for m in moves}) == len(moves)


def test_exchange_credit_comes_from_the_issuer_once_per_payment() -> None:
    m = exchange_credit("pay-1", "wallet:x", 5)
    assert (m.src, m.dst, m.key) == (EXCHANGE_ACCOUNT, "wallet:x", "exchange:pay-1")


def test_movements_are_positive_between_two_accounts() -> None:
    with pytest.raises(AssertionError):
        Movement(key="k", src="a", dst="b", amount=0, kind="x")
    with pytest.raises(AssertionError):
        Movement(key="k", src="a", dst="a", amount=1, kind="x")


def test_stage_holds_debits_until_commit() -> None:
    ledger = Ledger({"client:a": 10, "zero": 0})
    assert "zero" not in ledger.balances()
    m = Movement(key="k1", src="client:a", dst="client:b", amount=6, kind="x")
    ledger.stage([m])
    assert (ledger.balance("client:a"), ledger.available("client:a")) == (10, 4)
    assert ledger.available("client:b") == 0  # credits count once committed
    with pytest.raises(PaymentRequired, match="insufficient balance"):
        ledger.stage([Movement(key="k2", src="client:a", dst="client:b", amount=5, kind="x")])
    ledger.commit([m])
    assert ledger.balances() == {"client:a": 4, "client:b": 6}
    assert ledger.available("client:a") == 4


def test_stage_is_all_or_nothing_and_unstage_gives_back() -> None:
    ledger = Ledger({"client:a": 10})
    two = [
        Movement(key="k1", src="client:a", dst="x:1", amount=6, kind="x"),
        Movement(key="k2", src="client:a", dst="x:2", amount=6, kind="x"),
    ]
    with pytest.raises(PaymentRequired):
        ledger.stage(two)
    assert ledger.available("client:a") == 10
    ledger.stage(two[:1])
    ledger.unstage(two[:1])
    assert ledger.available("client:a") == 10
    with pytest.raises(AssertionError):
        ledger.unstage(two[:1])


def test_issuers_and_escrows_are_not_checked_at_staging() -> None:
    ledger = Ledger()
    credit = exchange_credit("p", "wallet:u", 7)
    ledger.stage([credit])
    ledger.stage([Movement(key="e", src="escrow:j", dst="client:c", amount=3, kind="x")])
    ledger.commit([credit])
    assert ledger.balance(EXCHANGE_ACCOUNT) == -7
    assert ledger.balance("wallet:u") == 7


def test_issued_counts_both_issuers_and_staged_credits() -> None:
    ledger = Ledger({EXCHANGE_ACCOUNT: -7, ADMIN_ACCOUNT: -3, "wallet:u": 10})
    assert ledger.issued() == 10
    credit = Movement(key="a", src=ADMIN_ACCOUNT, dst="client:c", amount=5, kind="admin_credit")
    ledger.stage([credit])
    assert ledger.issued() == 15
    ledger.commit([credit])
    assert ledger.issued() == 15 <= MAX_ISSUED


def test_partial_commit_keeps_the_rest_held_and_spent_accounts_vanish() -> None:
    ledger = Ledger({"client:a": 10})
    a = Movement(key="k1", src="client:a", dst="client:b", amount=4, kind="x")
    b = Movement(key="k2", src="client:a", dst="client:b", amount=6, kind="x")
    ledger.stage([a, b])
    ledger.commit([a])
    assert ledger.available("client:a") == 0
    ledger.commit([b])
    assert ledger.balances() == {"client:b": 10}  # a is spent to zero: no entry kept
