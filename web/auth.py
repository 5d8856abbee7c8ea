"""Credentials: per-role API key sets, as ``X-Api-Key`` or ``Authorization: Bearer``.

Wallet users' session tokens (``X-Session-Token`` or Bearer) are client credentials too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from starlette.datastructures import Headers

    from web.settings import Settings

__all__ = ["Authenticator", "Principal", "Role", "key_hash"]


class Role(StrEnum):
    CLIENT = "client"
    MINER = "miner"
    ADMIN = "admin"


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    role: Role
    key_hash: str
    user_id: str | None = None  # a wallet user's session (a client)
    wallet: str | None = None
    admin: bool = False  # a wallet in ADMIN_WALLET_ADDRESSES: a client that is an admin too

    def acts_as(self, role: Role) -> bool:
        """Whether this caller may use what ``role`` may (an admin wallet: client and admin)."""
        return self.role is role or (self.admin and role is Role.ADMIN)

    @property
    def id(self) -> str:
        """A stable, non-secret identity derived from the key (never the key itself)."""
        if self.user_id is not None:
            return self.user_id
        return f"{self.role.value}-{self.key_hash[:12]}"

    @property
    def account(self) -> str:
        """The ledger account this caller pays from (docs/wallet.md)."""
        if self.wallet is not None:
            return f"wallet:{self.wallet}"
        return f"{self.role.value}:{self.id}"


class SessionLookup(Protocol):
    def __call__(self, token_hash: str) -> Principal | None: ...


class Authenticator:
    def __init__(self, settings: Settings) -> None:
        # Wallet user sessions (web/wallet_auth.py), consulted after the API keys.
        self.sessions: SessionLookup = lambda token_hash: None
        # An API key's principal never changes: one shared (immutable) object per key, found
        # by the key itself, so the credential of nearly every request costs no SHA-256.
        self._keys: dict[str, Principal] = {}
        for role, keys in (
            (Role.CLIENT, settings.client_api_keys),
            (Role.MINER, settings.miner_api_keys),
            (Role.ADMIN, settings.admin_api_keys),
        ):
            for key in keys:
                self._keys[key] = Principal(role, key_hash(key))

    def from_token(self, token: str) -> Principal | None:
        # A dict lookup compares a token's characters with a key's only once their (randomly
        # seeded, 64-bit) string hashes are equal: its timing tells nothing about a key.
        principal = self._keys.get(token)
        return self.sessions(key_hash(token)) if principal is None else principal

    @staticmethod
    def unknown_detail(headers: Headers) -> str:
        """The 401 detail for a credential ``token_from_headers`` found but no key or live
        session matches: an ``X-Api-Key`` is an "Invalid API key" (upstream's words); a token
        (Bearer, ``X-Session-Token``) may be a wallet session that expired or was logged out,
        so it is an "Invalid or expired token" (upstream: "Invalid token")."""
        if headers.get("x-api-key"):
            return "Invalid API key"
        return "Invalid or expired token"

    @staticmethod
    def token_from_headers(headers: Headers) -> str | None:
        key = headers.get("x-api-key") or headers.get("x-session-token")
        if key:
            return key.strip()
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
