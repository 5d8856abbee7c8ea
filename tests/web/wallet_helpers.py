"""Wallet test helpers: real secp256k1 keys (eth-account) signing the real login message."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from eth_account import Account
from eth_account.messages import encode_defunct

from web.wallet_auth import login_message

if TYPE_CHECKING:
    import httpx

# Fixed keys: deterministic addresses, no randomness in tests.
KEY_A = "0x" + "1a" * 32
KEY_B = "0x" + "2b" * 32


def address_of(key: str) -> str:
    return str(Account.from_key(key).address)


def sign(key: str, wallet: str, nonce: str) -> str:
    signed = Account.sign_message(encode_defunct(text=login_message(wallet, nonce)), key)
    return "0x" + bytes(signed.signature).hex()


async def get_nonce(http: httpx.AsyncClient, wallet: str) -> str:
    r = await http.post("/v1/auth/nonce", json={"wallet_address": wallet})
    assert r.status_code == 200, r.text
    return str(r.json()["nonce"])


async def login(
    http: httpx.AsyncClient, key: str = KEY_A, path: str = "/v1/login", **extra: Any
) -> dict[str, Any]:
    """Nonce, sign, log in; returns the UserProfile (with ``session_token``)."""
    wallet = address_of(key)
    nonce = await get_nonce(http, wallet)
    body = {"wallet_address": wallet, "nonce": nonce, "signature": sign(key, wallet, nonce)}
    r = await http.post(path, json={**body, **extra})
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
