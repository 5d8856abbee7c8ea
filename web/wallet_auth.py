"""Wallet login: nonces, EIP-191 signatures, users and session tokens (rest-api.md §2.5).

Rule 1: nonces, users and sessions are kept in memory (loaded at start-up, so they survive
restarts) and every change to them is committed through the dispatcher's writer before the
caller sees it. Checks that must not race (a nonce used once, a wallet or email registered
once) are made synchronously on the in-memory state, then written.
Rule 2: a session token is 32 random bytes shown once; only its SHA-256 is stored. It is a
client credential (``X-Session-Token`` or ``Authorization: Bearer``) until it expires
(``SESSION_TTL_HOURS``) or its user logs out.
Rule 3: signatures are recovered with eth-account (EIP-191 ``personal_sign``); no curve code
lives here.
"""

from __future__ import annotations

import re
import secrets
import sys
import uuid
from collections import deque
from typing import TYPE_CHECKING

from dispatcher.ledger import is_wallet_address
from storage.base import NonceRecord, SessionRecord, UserRecord
from web.auth import Principal, Role, key_hash
from web.http import HTTPError

if TYPE_CHECKING:
    from dispatcher.clock import Clock
    from dispatcher.runtime import Dispatcher
    from storage.base import WalletSnapshot, WriteBatch

__all__ = [
    "AUTO_EMAIL_DOMAIN",
    "NONCE_TTL",
    "WalletAuth",
    "login_message",
    "normalize_wallet",
    "recover_signer",
]

# A wallet that logs in unregistered gets ``<wallet>@aitbc.local`` (as upstream); registration
# refuses the domain, so no one can take such an address first.
AUTO_EMAIL_DOMAIN = "aitbc.local"

NONCE_TTL = 300.0
# Open challenges of wallets that have no user yet (anyone can ask for any number of them). At
# the cap the oldest is dropped: a flood of requests only shortens how long a newcomer's
# challenge lasts (this many newer requests), where a refusal at the cap (429) had locked every
# login out. Registered wallets' challenges are not counted: at most one per user.
MAX_OPEN_NONCES = 100_000


def login_message(wallet: str, nonce: str) -> str:
    """The text the wallet signs (EIP-191 ``personal_sign``), exactly as upstream."""
    return f"Sign this message to log in to AITBC.\nWallet: {wallet.lower()}\nNonce: {nonce}"


def normalize_wallet(value: object) -> str:
    """Lowercased ``0x`` + 40 hex, or 400 "Invalid wallet address"."""
    if not is_wallet_address(value):
        raise HTTPError(400, "Invalid wallet address")
    return value.lower()


def recover_signer(message: str, signature: str) -> str | None:
    """The lowercased address that signed ``message``, or None for a malformed signature."""
    sig = signature[2:] if signature.lower().startswith("0x") else signature
    if not re.fullmatch(r"[0-9a-fA-F]{130}", sig):
        return None
    # Imported on first use: eth-account takes most of a second to import, which every
    # start of the server and of the CLI would pay. Its import (py_ecc) sets the recursion
    # limit to 100,000, past what the C stack holds: deep recursion would then crash the
    # process instead of raising RecursionError, so the limit is put back.
    limit = sys.getrecursionlimit()
    from eth_account import Account
    from eth_account.messages import encode_defunct

    sys.setrecursionlimit(limit)

    try:
        address = Account.recover_message(encode_defunct(text=message), signature="0x" + sig)
    except Exception:  # eth-account raises several types for bad points and v values
        return None
    return str(address).lower()


class WalletAuth:
    def __init__(
        self,
        dispatcher: Dispatcher,
        clock: Clock,
        session_ttl: float,
        admin_wallets: frozenset[str] = frozenset(),
    ) -> None:
        self.dispatcher = dispatcher
        self.clock = clock
        self.session_ttl = session_ttl
        self.admin_wallets = frozenset(a.lower() for a in admin_wallets)  # as users' are
        self.users: dict[str, UserRecord] = {}
        self.by_wallet: dict[str, str] = {}
        self.by_email: dict[str, str] = {}
        self.sessions: dict[str, SessionRecord] = {}
        # (expires_at, token hash) oldest first: sessions expire in the order they are made
        # (one TTL), so each login drops the expired ones from the front (see ``_expire``).
        self._expiries: deque[tuple[float, str]] = deque()
        self.nonces: dict[str, NonceRecord] = {}
        # The wallets without a user that have an open challenge, oldest first (MAX_OPEN_NONCES).
        self._newcomers: dict[str, None] = {}

    def load(self, snapshot: WalletSnapshot) -> None:
        for user in snapshot.users:
            self._remember(user)
        self.sessions = {s.token_hash: s for s in snapshot.sessions}
        self._expiries = deque(sorted((s.expires_at, s.token_hash) for s in snapshot.sessions))
        # Expired ones too (refused at login): they are stored until the cap drops them, oldest
        # first, so the stored rows stay as bounded as these (a restart left them for good).
        self.nonces = {n.wallet_address: n for n in snapshot.nonces}
        self._newcomers = {
            n.wallet_address: None
            for n in sorted(snapshot.nonces, key=lambda n: n.expires_at)
            if n.wallet_address not in self.by_wallet
        }

    def _remember(self, user: UserRecord) -> None:
        self.users[user.user_id] = user
        self.by_wallet[user.wallet_address] = user.user_id
        self.by_email[user.email] = user.user_id

    # ---- credentials ------------------------------------------------------------------------

    def lookup(self, token_hash: str) -> Principal | None:
        """The client principal of a live session token (``Authenticator.sessions``), an
        admin too when its wallet is listed in ``ADMIN_WALLET_ADDRESSES``."""
        session = self.sessions.get(token_hash)
        if session is None:
            return None
        if session.expires_at <= self.clock.now():
            del self.sessions[token_hash]
            return None
        user = self.users[session.user_id]
        wallet = user.wallet_address
        return Principal(
            Role.CLIENT, token_hash, user.user_id, wallet, admin=wallet in self.admin_wallets
        )

    # ---- nonce, login, register, logout -----------------------------------------------------

    async def issue_nonce(self, wallet: str) -> NonceRecord:
        now = self.clock.now()
        dropped: list[str] = []
        if wallet not in self.by_wallet:
            newcomers = self._newcomers
            newcomers.pop(wallet, None)  # to the back: the newest
            while len(newcomers) >= MAX_OPEN_NONCES:  # the oldest goes, here and stored
                oldest = next(iter(newcomers))
                del newcomers[oldest], self.nonces[oldest]
                dropped.append(oldest)
            newcomers[wallet] = None
        record = NonceRecord(
            wallet_address=wallet, nonce=secrets.token_urlsafe(16), expires_at=now + NONCE_TTL
        )
        self.nonces[wallet] = record  # a newer challenge replaces the older one

        def fill(batch: WriteBatch) -> None:
            for w in dropped:
                batch.nonces[w] = None
            batch.nonces[wallet] = record

        await self.dispatcher.write(fill, [])
        return record

    def _consume_nonce(self, wallet: str, nonce: object) -> None:
        """Single use: taken before the signature is checked (a failed try burns it)."""
        record = self.nonces.get(wallet)
        if record is None or not isinstance(nonce, str) or record.nonce != nonce:
            raise HTTPError(401, "Invalid or expired nonce")
        del self.nonces[wallet]
        self._newcomers.pop(wallet, None)
        if record.expires_at <= self.clock.now():
            raise HTTPError(401, "Invalid or expired nonce")

    async def login(
        self,
        wallet: str,
        nonce: object,
        signature: str,
        *,
        register: tuple[str, str] | None = None,
    ) -> tuple[UserRecord, str]:
        """Check the signed challenge; log in (registering unknown wallets) or register.

        ``register`` = (email, username) is POST /v1/register: the wallet and the email must
        be new. Returns the user and a new session token (shown once).
        """
        self._consume_nonce(wallet, nonce)

        def burn(batch: WriteBatch) -> None:
            batch.nonces[wallet] = None

        if recover_signer(login_message(wallet, str(nonce)), signature) != wallet:
            await self.dispatcher.write(burn, [])
            raise HTTPError(401, "Invalid wallet signature")
        now = self.clock.now()
        user_id = self.by_wallet.get(wallet)
        new_user = None
        if register is not None:
            email, username = register
            if user_id is not None or email in self.by_email:
                await self.dispatcher.write(burn, [])
                what = "Wallet" if user_id is not None else "Email"
                raise HTTPError(400, f"{what} already registered")
        elif user_id is None:
            email = f"{wallet}@{AUTO_EMAIL_DOMAIN}"  # upstream's; register refuses the domain
            while email in self.by_email:  # never a commit's unique violation (it would stop
                email = f"{wallet}+{secrets.token_hex(4)}@{AUTO_EMAIL_DOMAIN}"  # the process)
            username = f"user_{wallet[-8:]}_{secrets.token_hex(4)}"
        if user_id is None:
            new_user = UserRecord(
                user_id=str(uuid.uuid4()),
                wallet_address=wallet,
                email=email,
                username=username,
                created_at=now,
            )
            self._remember(new_user)  # reserved now: a concurrent login finds it
            user_id = new_user.user_id
        token = secrets.token_urlsafe(32)
        session = SessionRecord(
            token_hash=key_hash(token),
            user_id=user_id,
            created_at=now,
            expires_at=now + self.session_ttl,
        )

        def fill(batch: WriteBatch) -> None:
            burn(batch)
            if new_user is not None:
                batch.users.append(new_user)
            batch.sessions[session.token_hash] = session

        await self.dispatcher.write(fill, [])
        self._expire(self.clock.now())
        self.sessions[session.token_hash] = session
        self._expiries.append((session.expires_at, session.token_hash))
        return self.users[user_id], token

    def _expire(self, now: float) -> None:
        """Forget the sessions that have expired (``lookup`` only dropped the ones whose token
        was tried again, so memory grew with every login)."""
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            self.sessions.pop(expiries.popleft()[1], None)

    async def logout(self, token_hash: str) -> None:
        """Revoke the session; it stops working once the revocation is committed (before,
        a failed commit would leave a session the world had been told was gone)."""
        session = self.sessions.get(token_hash)
        if session is None:
            raise HTTPError(401, "Invalid or expired token")
        revoked = SessionRecord(
            token_hash=session.token_hash,
            user_id=session.user_id,
            created_at=session.created_at,
            expires_at=session.expires_at,
            revoked_at=self.clock.now(),
        )

        def fill(batch: WriteBatch) -> None:
            batch.sessions[token_hash] = revoked

        await self.dispatcher.write(fill, [])
        self.sessions.pop(token_hash, None)
