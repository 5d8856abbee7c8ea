"""Exchange rules: quotes at the rate, unique amounts, matching chain outputs (pure)."""

from __future__ import annotations

import hashlib
from decimal import Decimal
from typing import Any

import pytest

from dispatcher.exchange import QuoteError, find_output, quote, unique_amount

RATE = Decimal(100000)


@pytest.mark.parametrize(
    ("aitbc", "sats", "expected"),
    [
        (10_000 * 10**8, None, (10_000 * 10**8, 10_000_000)),
        (None, 10_000_000, (10_000 * 10**8, 10_000_000)),
        (10_000 * 10**8, 10_000_000, (10_000 * 10**8, 10_000_000)),
        (10_000 * 10**8, 10_000_001, (10_000 * 10**8, 10_000_000)),  # within 1 sat
        (150_000_001, None, (150_000_001, 1501)),  # rounded up: the buyer never underpays
    ],
)
def test_quote(aitbc: int | None, sats: int | None, expected: tuple[int, int]) -> None:
    assert quote(aitbc, sats, RATE) == expected


@pytest.mark.parametrize(
    ("aitbc", "sats", "message"),
    [
        (None, None, "give"),
        (10_000 * 10**8, 50 * 10**8, "Amount mismatch"),
        (0, None, "positive"),
        (None, -1, "positive"),
        (10**5, None, "between"),
        (None, 10**12, "between"),
        (None, 21 * 10**14 + 1, "at most 21000000 BTC"),
    ],
)
def test_quote_refuses(aitbc: int | None, sats: int | None, message: str) -> None:
    with pytest.raises(QuoteError, match=message):
        quote(aitbc, sats, RATE)


def test_unique_amount_skips_taken_amounts() -> None:
    assert unique_amount(100, set()) == 100
    assert unique_amount(100, {100, 101, 103}) == 102


def h(name: str) -> str:
    """A txid (64 hex digits) named after ``name``."""
    return hashlib.sha256(name.encode()).hexdigest()


def tx(name: str, outs: list[tuple[str, Any]], height: int | None = None) -> dict[str, Any]:
    return {
        "txid": h(name),
        "status": {"confirmed": height is not None, "block_height": height},
        "vout": [{"scriptpubkey_address": a, "value": v} for a, v in outs],
    }


def test_find_output_exact_and_at_least() -> None:
    txs = [tx("t1", [("A", 99), ("A", 100)], height=10), tx("t2", [("A", 150)])]
    m = find_output(txs, "A", 100, exact=True, tip_height=12, claimed=set())
    assert m is not None
    assert (m.tx_hash, m.vout, m.confirmations) == (h("t1"), 1, 3)
    m = find_output(txs, "A", 120, exact=False, tip_height=12, claimed=set())
    assert m is not None
    assert (m.tx_hash, m.confirmations) == (h("t2"), 0)
    assert find_output(txs, "A", 100, exact=True, tip_height=12, claimed={(h("t1"), 1)}) is None
    assert find_output(txs, "B", 100, exact=False, tip_height=12, claimed=set()) is None


def test_find_output_prefers_more_confirmations_and_skips_junk() -> None:
    junk: list[Any] = [
        "x",
        {"txid": 5},
        {"txid": h("j1"), "status": "bad", "vout": "bad"},
        {"txid": h("j2"), "vout": ["x", {"scriptpubkey_address": "A", "value": True}]},
        tx("future", [("A", 100)], height=99),  # above the tip: not counted as confirmed
        tx("negative", [("A", 100)], height=-5),  # not a height: not counted as confirmed
        {**tx("short", [("A", 100)], height=9), "txid": "ab" * 31},  # not a txid: skipped
        {**tx("nul", [("A", 100)], height=9), "txid": "a\x00" + "b" * 62},
    ]
    txs = [*junk, tx("new", [("A", 100)], height=10), tx("old", [("A", 100)], height=5)]
    m = find_output(txs, "A", 100, exact=True, tip_height=10, claimed=set())
    assert m is not None
    assert (m.tx_hash, m.confirmations) == (h("old"), 6)
    # A tip past any real chain's height confirms nothing (its counts would not fit a column).
    too_high = find_output(txs, "A", 100, exact=True, tip_height=10**20, claimed=set())
    assert too_high is not None
    assert too_high.confirmations == 0
    assert find_output({"not": "a list"}, "A", 1, exact=False, tip_height=1, claimed=set()) is None


def test_find_output_mined_after_skips_older_blocks_only() -> None:
    """``mined_after``: a confirmed output in a block timed earlier is skipped; a later block, a
    block without a time and the mempool are not."""

    def at(name: str, height: int | None, block_time: object) -> dict[str, Any]:
        t = tx(name, [("A", 100)], height=height)
        t["status"]["block_time"] = block_time
        return t

    def found(*txs: dict[str, Any]) -> str | None:
        m = find_output(
            list(txs), "A", 100, exact=True, tip_height=10, claimed=set(), mined_after=500
        )
        return None if m is None else m.tx_hash

    assert found(at("old", 5, 499)) is None
    assert found(at("old", 5, 499), at("new", 9, 500)) == h("new")
    assert found(at("untimed", 5, None)) == h("untimed")
    assert found(at("mempool", None, 1)) == h("mempool")
    old = [at("old", 5, 499)]
    assert find_output(old, "A", 100, exact=True, tip_height=10, claimed=set()) is not None
