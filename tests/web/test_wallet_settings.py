"""Wallet, billing and exchange settings (docs/configuration.md)."""

from __future__ import annotations

import pytest

from tests.web.test_exchange import XPUB
from web.settings import Settings, SettingsError


def test_defaults() -> None:
    s = Settings.from_env({})
    assert (s.billing, s.session_ttl_hours, s.btc_to_aitbc_rate) == (False, 24.0, "100000")
    assert (s.bitcoin_xpub, s.bitcoin_address, s.esplora_url) == (None, None, None)
    assert (s.btc_confirmations, s.payment_ttl_seconds, s.esplora_poll_seconds) == (1, 3600, 30)
    assert s.admin_wallet_addresses == frozenset()
    assert s.max_pending_payments == 5


def test_values_are_read() -> None:
    s = Settings.from_env(
        {
            "BILLING": "on",
            "SESSION_TTL_HOURS": "2",
            "BTC_TO_AITBC_RATE": "250000.5",
            "BITCOIN_XPUB": XPUB,
            "BITCOIN_ADDRESS": "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4",
            "ESPLORA_URL": "http://127.0.0.1:3002/api/",
            "BTC_CONFIRMATIONS": "3",
            "MAX_PENDING_PAYMENTS": "20",
            "ADMIN_WALLET_ADDRESSES": " 0x" + "AB" * 20 + ", ,0x" + "cd" * 20,
        }
    )
    assert s.admin_wallet_addresses == {"0x" + "ab" * 20, "0x" + "cd" * 20}
    assert s.billing is True
    assert s.session_ttl_hours == 2
    assert s.btc_to_aitbc_rate == "250000.5"
    assert s.bitcoin_xpub == XPUB
    assert s.bitcoin_address == "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4"
    assert s.esplora_url == "http://127.0.0.1:3002/api"
    assert s.btc_confirmations == 3
    assert s.max_pending_payments == 20


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BILLING", "maybe"),
        ("BTC_TO_AITBC_RATE", "-1"),
        ("BTC_TO_AITBC_RATE", "abc"),
        ("BTC_TO_AITBC_RATE", "1.000000001"),
        ("BITCOIN_XPUB", "xpubNotAKey"),
        ("BITCOIN_XPUB", "hello"),
        ("BITCOIN_ADDRESS", "notanaddress"),
        ("BITCOIN_ADDRESS", "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t5"),  # checksum
        ("BITCOIN_ADDRESS", "1A1zP1eP5QGefi2DMPTfTL5SLmv7DivfNb"),  # checksum
        ("BITCOIN_ADDRESS", "0x" + "ab" * 20),  # an Ethereum address
        ("ESPLORA_URL", "ftp://x"),
        ("SESSION_TTL_HOURS", "0"),
        ("BTC_CONFIRMATIONS", "1.5"),
        ("MAX_PENDING_PAYMENTS", "0"),
        ("ADMIN_WALLET_ADDRESSES", "0x1234"),
        ("ADMIN_WALLET_ADDRESSES", "0x" + "ab" * 20 + ",admin"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


@pytest.mark.parametrize(("raw", "on"), [("yes", True), ("no", False), ("TRUE", True), ("", False)])
def test_billing_takes_the_spellings_of_every_other_switch(raw: str, on: bool) -> None:
    """BILLING=yes stopped the start ('BILLING: must be on or off') where METRICS_PUBLIC=yes and
    STANDBY=yes were taken: one set of spellings for every on/off variable."""
    assert Settings.from_env({"BILLING": raw}).billing is on


def test_a_bad_billing_value_is_quoted() -> None:
    with pytest.raises(SettingsError, match=r"^BILLING: must be on or off, got 'maybe'$"):
        Settings.from_env({"BILLING": "maybe"})


@pytest.mark.parametrize(
    "address",
    [
        "1A1zP1eP5QGefi2DMPTfTL5SLmv7DivfNa",  # P2PKH
        "3J98t1WpEZ73CNmQviecrnyiWrnqRhWNLy",  # P2SH
        "bc1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3qccfmv3",  # P2WSH
        "bc1p5cyxnuxmeuwuvkwfem96lqzszd02n6xdcjrs20cac6yqjjwudpxqkedrcr",  # taproot
        "tb1qw508d6qejxtdg4y5r3zarvary0c5xw7kxpjzsx",  # testnet
        "mipcBbFg9gMiCh81Kj8tqqdgoZub1ZJRfn",  # testnet P2PKH
    ],
)
def test_bitcoin_address_takes_every_kind_a_wallet_pays(address: str) -> None:
    """BITCOIN_ADDRESS took any text (`junk` was shown to payers as the address to pay; found
    by the lifecycle hunt): it must be an address, its checksum included."""
    assert Settings.from_env({"BITCOIN_ADDRESS": f" {address} "}).bitcoin_address == address


def test_an_uppercase_segwit_bitcoin_address_is_written_as_esplora_writes_it() -> None:
    """A SegWit address is valid in capitals (as QR codes carry it), but Esplora lists outputs
    by their lowercase address: an uppercase BITCOIN_ADDRESS was shown to payers as is, and no
    output ever matched it, so every paid payment expired uncredited."""
    upper = "BC1QW508D6QEJXTDG4Y5R3ZARVARY0C5XW7KV8F3T4"
    assert Settings.from_env({"BITCOIN_ADDRESS": upper}).bitcoin_address == upper.lower()


@pytest.mark.parametrize(
    "address",
    [
        "bc1zw508d6qejxtdg4y5r3zarvaryvaxxpcs",  # witness version 2
        "BC1SW50QGDZ25J",  # witness version 16
        "tb1zqqqsyqcyq5rqwzqfpg9scrgwpugpzysnzs23v9ccrydpk8qarc0shpym8x",  # 2, testnet
        # version 1 with a 40-byte program: not taproot (32 bytes)
        "bc1pqqqsyqcyq5rqwzqfpg9scrgwpugpzysnzs23v9ccrydpk8qarc0jqgfzyvjz2f38wjxkpz",
    ],
)
def test_a_bitcoin_address_anyone_can_spend_is_refused(address: str) -> None:
    """SegWit versions 2 to 16 (and version 1 but for a 32-byte taproot key) are valid
    addresses that no soft fork gives a meaning yet: an output to one is anyone-can-spend, so
    the payers' coins were anybody's to take. Such a BITCOIN_ADDRESS stops the start."""
    with pytest.raises(SettingsError, match="BITCOIN_ADDRESS"):
        Settings.from_env({"BITCOIN_ADDRESS": address})
