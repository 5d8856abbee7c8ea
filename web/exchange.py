"""The BTC exchange: payment requests, receiving addresses, confirmation (docs/wallet.md).

Rule 1: pending payments live in memory (loaded at start-up) and every change is committed
through the dispatcher's writer before it is answered. Decisions that must not race (which
address index, which unique amount, which chain output, whether a payment is still pending)
are made synchronously on that state, then written.
Rule 2: confirming credits ``aitbc_amount`` to the payer's ledger account in the same
transaction that marks the payment confirmed; the movement key is the payment id, so a payment
is credited once whoever confirms it (admin or watcher) and however often.
Rule 3: addresses come from ``BITCOIN_XPUB`` through bip_utils (BIP-84 for zpub/vpub, BIP-44
for xpub/tpub), never from curve code of our own.
"""

from __future__ import annotations

import heapq
import logging
import math
import uuid
from collections import Counter
from dataclasses import replace
from decimal import Decimal
from typing import TYPE_CHECKING

from dispatcher.exchange import AMOUNT_HOLD_SECONDS, Match, canonical_address, unique_amount
from dispatcher.ledger import MAX_ISSUED, MAX_LEDGER, exchange_credit
from protocol.amounts import format_units
from storage.base import PaymentRecord
from web.http import HTTPError

if TYPE_CHECKING:
    from collections.abc import Collection

    from dispatcher.clock import Clock
    from dispatcher.runtime import Dispatcher
    from storage.base import Store, WalletSnapshot, WriteBatch
    from web.auth import Principal
    from web.settings import Settings

__all__ = ["AddressBook", "Exchange", "XpubError", "is_bitcoin_address"]

log = logging.getLogger("aitbc.coordinator")

# A payment whose transaction went missing expires no sooner than this after it was found
# missing, even past its deadline: an Esplora server that restarts answers 404 for mempool
# transactions until it has reloaded its mempool.
LOST_GRACE_SECONDS = 600.0


class XpubError(ValueError):
    """BITCOIN_XPUB is not an account-level extended public key we can derive from."""


class AddressBook:
    """Receiving addresses: index n of the external chain of an account-level xpub."""

    def __init__(self, xpub: str) -> None:
        # Imported here: bip_utils takes a quarter of a second to import, and only a
        # coordinator with BITCOIN_XPUB needs it.
        from bip_utils import Bip44, Bip44Changes, Bip44Coins, Bip84, Bip84Coins

        prefix = xpub[:4]
        try:
            if prefix in ("zpub", "vpub"):
                coin = Bip84Coins.BITCOIN if prefix == "zpub" else Bip84Coins.BITCOIN_TESTNET
                self._chain = Bip84.FromExtendedKey(xpub, coin).Change(Bip44Changes.CHAIN_EXT)
            elif prefix in ("xpub", "tpub"):
                coin44 = Bip44Coins.BITCOIN if prefix == "xpub" else Bip44Coins.BITCOIN_TESTNET
                self._chain = Bip44.FromExtendedKey(xpub, coin44).Change(Bip44Changes.CHAIN_EXT)
            else:
                raise XpubError("BITCOIN_XPUB: expected an xpub, tpub, zpub or vpub key")
        except XpubError:
            raise
        except Exception as exc:  # bip_utils raises several types for a bad key
            raise XpubError(f"BITCOIN_XPUB: not a usable account-level key ({exc})") from None

    def address(self, index: int) -> str:
        return str(self._chain.AddressIndex(index).PublicKey().ToAddress())


# Base58Check version bytes of P2PKH and P2SH addresses (mainnet, then testnet and regtest).
_BASE58_VERSIONS = (0x00, 0x05, 0x6F, 0xC4)
_SEGWIT_HRPS = ("bc", "tb", "bcrt")
# The SegWit outputs with a meaning: P2WPKH, P2WSH (version 0) and taproot (version 1, a
# 32-byte key). Other versions and lengths are valid addresses whose outputs anyone can spend.
_SEGWIT_PROGRAMS = ((0, 20), (0, 32), (1, 32))


def is_bitcoin_address(text: str) -> bool:
    """A mainnet, testnet or regtest address a wallet can pay and only its key can spend:
    Base58Check P2PKH or P2SH, or SegWit P2WPKH, P2WSH (bech32) or P2TR (bech32m), checksum
    included. SegWit versions 2 to 16 (and version 1 but for taproot's 32 bytes) are not: no
    soft fork gives them a meaning yet, so an output to one is anyone's to take."""
    from bip_utils import Base58Decoder, SegwitBech32Decoder

    if text[:3].lower() in ("bc1", "tb1") or text[:5].lower() == "bcrt1":
        for hrp in _SEGWIT_HRPS:
            try:
                version, program = SegwitBech32Decoder.Decode(hrp, text)
            except Exception:  # bip_utils raises several types
                continue
            return (version, len(program)) in _SEGWIT_PROGRAMS
        return False
    try:
        raw = Base58Decoder.CheckDecode(text)
    except Exception:  # bip_utils raises several types for a bad string
        return False
    return len(raw) == 21 and raw[0] in _BASE58_VERSIONS


class Exchange:
    def __init__(self, settings: Settings, dispatcher: Dispatcher, store: Store, clock: Clock):
        self.rate = Decimal(settings.btc_to_aitbc_rate)
        self.ttl = settings.payment_ttl_seconds
        self.max_pending = settings.max_pending_payments
        self.required_confirmations = settings.btc_confirmations
        self.watched = settings.esplora_url is not None
        self.book = None if settings.bitcoin_xpub is None else AddressBook(settings.bitcoin_xpub)
        self.shared_address = settings.bitcoin_address
        self.dispatcher = dispatcher
        self.store = store
        self.clock = clock
        self.pending: dict[str, PaymentRecord] = {}
        self.pending_by_payer: Counter[str] = Counter()  # account -> its pending payments
        self.claimed: set[tuple[str, int]] = set()
        # The amounts held on a shared address: sats -> when free again (inf while pending,
        # AMOUNT_HOLD_SECONDS after settling), and the settled ones in the order they free up.
        self.shared_amounts: dict[str, dict[int, float]] = {}
        self._freeing: list[tuple[float, str, int]] = []
        self.next_index = 0
        self._settling: dict[str, str] = {}  # payment id -> new status, commit in flight
        # Pending payments whose recorded transaction the chain API no longer knows, with when
        # it was found missing: they wait again (and expire) but keep the outpoint, so it never
        # pays another payment. Not stored: after a restart the watcher's first poll finds them
        # again (and their grace starts again).
        self.lost: dict[str, float] = {}

    def load(self, snapshot: WalletSnapshot) -> None:
        self.pending = {p.payment_id: p for p in snapshot.payments}
        self.pending_by_payer = Counter(p.account for p in snapshot.payments)
        self.claimed = set(snapshot.outpoints)
        self.shared_amounts, self._freeing = {}, []
        # The longest hold of an amount wins: settled ones by time, then the pending ones.
        rows = sorted(snapshot.shared_amounts, key=lambda r: math.inf if r[2] is None else r[2])
        for address, sats, settled in rows:
            self._hold(address, sats, settled)
        self.next_index = snapshot.next_address_index

    def _hold(self, address: str, sats: int, settled: float | None) -> None:
        """Hold ``sats`` on a shared address: for good while pending (``settled`` None), else
        until AMOUNT_HOLD_SECONDS after it settled."""
        address = canonical_address(address)  # one address, however a stored row wrote it
        held = self.shared_amounts.setdefault(address, {})
        if settled is None:
            held[sats] = math.inf
        else:
            held[sats] = free_at = settled + AMOUNT_HOLD_SECONDS
            heapq.heappush(self._freeing, (free_at, address, sats))

    def _free_up(self, now: float) -> None:
        """Let go of the amounts whose hold has ended."""
        freeing = self._freeing
        while freeing and freeing[0][0] <= now:
            free_at, address, sats = heapq.heappop(freeing)
            held = self.shared_amounts[address]
            if held.get(sats) == free_at:  # not held again since
                del held[sats]

    def _settled(self, record: PaymentRecord) -> None:
        if record.address_index is None:
            settled = record.settled_at
            assert settled is not None
            self._hold(record.address, record.btc_sats, settled)

    @property
    def configured(self) -> bool:
        return self.book is not None or self.shared_address is not None

    async def _save(self, record: PaymentRecord, credit: bool = False) -> None:
        moves = [exchange_credit(record.payment_id, record.account, record.aitbc_units)]

        def fill(batch: WriteBatch) -> None:
            batch.payments[record.payment_id] = record

        try:
            await self.dispatcher.write(fill, moves if credit else [])
        finally:
            self._settling.pop(record.payment_id, None)

    async def check_cap(self, units: int) -> None:
        """409 unless ``units`` more AITBC keep what is issued (``Ledger.issued``) within
        ``MAX_ISSUED``. Pending payments do not count: a wallet is free to make, so fresh
        wallets' unpaid requests could otherwise hold the whole cap; a paid one is credited
        past it (``confirm``). Staged state, read with no await when the check passes:
        race-free. It counts credits still being committed, so a refusal waits until they
        are (``before_refusal``: Unavailable should one fail)."""
        issued = self.dispatcher.ledger.issued()
        if issued + units > MAX_ISSUED:
            await self.dispatcher.before_refusal()
            raise HTTPError(
                409,
                f"the ledger holds at most {format_units(MAX_ISSUED)} AITBC in all; "
                f"{format_units(issued)} AITBC are issued",
            )

    async def check_payer(self, account: str) -> None:
        """409 if ``account`` has MAX_PENDING_PAYMENTS pending: without a limit one payer could
        fill the ledger cap with unpaid requests (and use up xpub address indexes). A refusal
        waits until the payments it counted are committed (``before_refusal``)."""
        if self.pending_by_payer[account] >= self.max_pending:
            await self.dispatcher.before_refusal()
            raise HTTPError(
                409,
                f"you have {self.max_pending} pending payments (MAX_PENDING_PAYMENTS): "
                "pay one or let one expire first",
            )

    def _unpend(self, record: PaymentRecord) -> None:
        left = self.pending_by_payer[record.account] - 1
        if left:
            self.pending_by_payer[record.account] = left
        else:
            del self.pending_by_payer[record.account]

    async def expire_unwatched(self) -> None:
        """Without a watcher, payments expire when someone looks: before a status or the
        market stats is read, a payment requested (the payer's places, a shared address's
        amounts) or confirmed by hand."""
        if not self.watched:
            await self.expire_due()

    async def create(self, principal: Principal, aitbc_units: int, sats: int) -> PaymentRecord:
        await self.expire_unwatched()
        await self.check_payer(principal.account)
        if not self.configured:
            raise HTTPError(503, "the exchange is not configured (BITCOIN_XPUB or BITCOIN_ADDRESS)")
        await self.check_cap(aitbc_units)  # refused before anyone pays
        now = self.clock.now()
        index = None
        if self.book is not None:
            index, self.next_index = self.next_index, self.next_index + 1
            address = self.book.address(index)
        else:
            assert self.shared_address is not None
            address = self.shared_address
            self._free_up(now)
            sats = unique_amount(sats, self.shared_amounts.get(canonical_address(address), {}))
            self._hold(address, sats, None)  # no other pending payment asks it
        record = PaymentRecord(
            payment_id=str(uuid.uuid4()),
            user_id=principal.id,
            account=principal.account,
            aitbc_units=aitbc_units,
            btc_sats=sats,
            address=address,
            address_index=index,
            status="pending",
            created_at=now,
            expires_at=now + self.ttl,
        )
        self.pending[record.payment_id] = record  # holds the address / amount from now on
        self.pending_by_payer[record.account] += 1
        await self._save(record)
        return record

    async def get(self, payment_id: str) -> PaymentRecord | None:
        await self.expire_unwatched()
        record = self.pending.get(payment_id)
        if record is None:  # settled: the stored row (one being settled is stored pending)
            return await self.store.get_payment(payment_id)
        # The watcher's chain facts (tx_hash, confirmations) are in memory before they are
        # saved: answer once they are.
        return await self.dispatcher.committed(record)

    async def confirm(self, payment_id: str, match: Match | None) -> PaymentRecord:
        """Mark confirmed and credit once; a confirmed payment is returned unchanged."""
        await self.expire_unwatched()
        record = self.pending.pop(payment_id, None)
        if record is None:
            if payment_id in self._settling:  # confirmed or expired: answer once it is stored
                await self.dispatcher.before_refusal()
            stored = await self.store.get_payment(payment_id)
            if stored is None:
                raise HTTPError(404, "Payment not found")
            if stored.status != "confirmed":
                raise HTTPError(409, f"payment is {stored.status}")
            return stored
        if match is not None and (match.tx_hash, match.vout) != (record.tx_hash, record.tx_vout):
            if (match.tx_hash, match.vout) in self.claimed:
                self.pending[payment_id] = record
                await self.dispatcher.before_refusal()  # the claim may still be being saved
                raise HTTPError(409, "that output already paid a payment")
        if self.dispatcher.ledger.issued() + record.aitbc_units > MAX_LEDGER:
            # Only payments requested below MAX_ISSUED and paid past it get here: beyond
            # MAX_LEDGER, sums of balances would overflow. It stays pending, its output kept
            # (it does not expire), for an operator to settle; the watcher logs it every poll.
            self.pending[payment_id] = record
            if match is not None:
                await self.seen(payment_id, match)
            await self.dispatcher.before_refusal()
            raise HTTPError(
                409,
                f"crediting {format_units(record.aitbc_units)} AITBC would pass the ledger's "
                f"64-bit limit ({format_units(MAX_LEDGER)} AITBC issued in all); "
                "the payment stays pending",
            )
        confirmed = replace(
            record,
            status="confirmed",
            confirmed_at=self.clock.now(),
            tx_hash=match.tx_hash if match else record.tx_hash,
            tx_vout=match.vout if match else record.tx_vout,
            confirmations=match.confirmations if match else record.confirmations,
        )
        if match is not None:
            self.claimed.add((match.tx_hash, match.vout))
        self.lost.pop(payment_id, None)
        self._unpend(record)
        self._settled(confirmed)
        self._settling[payment_id] = "confirmed"
        await self._save(confirmed, credit=True)
        return confirmed

    async def seen(self, payment_id: str, match: Match) -> None:
        """An output paying it is on its way (not yet confirmed enough): it will not expire."""
        record = self.pending.get(payment_id)
        if record is None:
            return
        self.lost.pop(payment_id, None)
        if (record.tx_hash, record.confirmations) == (match.tx_hash, match.confirmations):
            return
        if record.tx_hash is not None:
            self.claimed.discard((record.tx_hash, record.tx_vout or 0))
        self.claimed.add((match.tx_hash, match.vout))
        updated = replace(
            record, tx_hash=match.tx_hash, tx_vout=match.vout, confirmations=match.confirmations
        )
        self.pending[payment_id] = updated
        await self._save(updated)

    async def lose(self, payment_id: str, tx_hash: str) -> None:
        """The chain API no longer knows the transaction recorded for it (replaced, evicted):
        it waits for a payment again and expires at its deadline (or LOST_GRACE_SECONDS from
        now, whichever is later), keeping the outpoint."""
        record = self.pending.get(payment_id)
        if record is None or record.tx_hash != tx_hash or payment_id in self.lost:
            return
        now = self.clock.now()
        self.lost[payment_id] = now
        log.warning(
            "payment %s: its transaction %s is unknown to the chain API (replaced or evicted); "
            "it waits for a payment again and expires at %d",
            payment_id,
            tx_hash,
            max(record.expires_at, now + LOST_GRACE_SECONDS),
        )
        if record.confirmations:
            updated = replace(record, confirmations=0)
            self.pending[payment_id] = updated
            await self._save(updated)

    async def expire_due(self, now: float | None = None, unread: Collection[str] = ()) -> None:
        """Pending payments past their expiry with no output seen (or one lost for
        LOST_GRACE_SECONDS) become expired, all in one write (one commit each made a read wait
        for as many commits as were overdue). ``now``: the time to judge by (the clock's);
        ``unread``: addresses the watcher could not read, whose payments wait."""
        if now is None:
            now = self.clock.now()
        lost_before = now - LOST_GRACE_SECONDS
        due = [
            r
            for r in self.pending.values()
            if r.expires_at <= now
            and r.address not in unread
            and (r.tx_hash is None or self.lost.get(r.payment_id, now) <= lost_before)
        ]
        if not due:
            return
        expired = [replace(record, status="expired") for record in due]
        for record in expired:
            del self.pending[record.payment_id]
            self._unpend(record)
            self.lost.pop(record.payment_id, None)
            self._settled(record)
            self._settling[record.payment_id] = "expired"

        def fill(batch: WriteBatch) -> None:
            for record in expired:
                batch.payments[record.payment_id] = record

        try:
            await self.dispatcher.write(fill, [])
        finally:
            for record in expired:
                self._settling.pop(record.payment_id, None)
