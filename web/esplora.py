"""The payment watcher: polls an Esplora-compatible API (``ESPLORA_URL``) for each pending
payment's address and confirms payments whose output has ``BTC_CONFIRMATIONS``.

``poll_once`` is one complete step (tests call it directly, against a local Esplora-shaped
server); ``run`` waits ``ESPLORA_POLL_SECONDS`` on the app's clock, then polls, and repeats.
A failing API is logged and tried again next time: it never stops the coordinator.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import orjson

from dispatcher.errors import DispatchError
from dispatcher.exchange import BLOCK_TIME_SLACK, canonical_address, find_output, is_txid
from storage.errors import StorageError
from web.http import HTTPError

if TYPE_CHECKING:
    from dispatcher.clock import Clock
    from dispatcher.exchange import Match
    from storage.base import PaymentRecord
    from web.exchange import Exchange

__all__ = ["EsploraWatcher"]

log = logging.getLogger("aitbc.coordinator")


CHAIN_PAGE = 25  # confirmed transactions per page of ``/address/:a/txs`` (Esplora's)
MAX_PAGES = 100  # older pages read per address and poll, at most


def _mined(tx: Any, since: float | None = None) -> bool | None:
    """None for an unconfirmed ``tx``; else whether its block's time is at or after ``since``
    (True without ``since`` or a time)."""
    status = tx.get("status") if isinstance(tx, dict) else None
    if not isinstance(status, dict) or status.get("confirmed") is not True:
        return None
    at = status.get("block_time")
    return since is None or not isinstance(at, int) or at >= since


def _lists(txs: Any, txid: str) -> bool:
    return isinstance(txs, list) and any(isinstance(t, dict) and t.get("txid") == txid for t in txs)


def _by_value(txs: Any, address: str) -> dict[int, list[Any]]:
    """The transactions in ``txs`` by each amount they pay ``address`` (one pass)."""
    address = canonical_address(address)
    paying: dict[int, list[Any]] = {}
    for tx in txs if isinstance(txs, list) else []:
        vouts = tx.get("vout") if isinstance(tx, dict) else None
        for out in vouts if isinstance(vouts, list) else []:
            if isinstance(out, dict) and out.get("scriptpubkey_address") == address:
                value = out.get("value")
                if isinstance(value, int) and not isinstance(value, bool):
                    listed = paying.setdefault(value, [])
                    if not listed or listed[-1] is not tx:
                        listed.append(tx)
    return paying


class EsploraWatcher:
    def __init__(self, exchange: Exchange, base_url: str, interval: float, clock: Clock) -> None:
        self.exchange = exchange
        self.base_url = base_url.rstrip("/")
        self.interval = interval
        self.clock = clock
        self.polls = 0
        self.errors = 0

    async def poll_once(self, http: httpx.AsyncClient) -> None:
        """Check every pending payment once, then expire what was due when the poll began (what
        fell due during it may have been paid after its address was read). An address the API
        fails to list holds up its own payments only: they are not expired (they may have been
        paid), and the others are checked as usual."""
        exchange = self.exchange
        began = self.clock.now()
        unread: set[str] = set()
        if exchange.pending:
            tip = int((await self._get(http, "/blocks/tip/height")).text.strip())
            by_address: dict[str, list[str]] = {}
            since: dict[str, float] = {}  # the address's oldest pending payment's request
            for pending in exchange.pending.values():
                by_address.setdefault(pending.address, []).append(pending.payment_id)
                since[pending.address] = min(
                    since.get(pending.address, pending.created_at), pending.created_at
                )
            for address, ids in by_address.items():
                try:
                    txs = await self._txs(http, address, since[address] - BLOCK_TIME_SLACK)
                except (httpx.HTTPError, ValueError) as exc:  # its payments wait: maybe paid
                    self.errors += 1
                    log.warning("payment watcher: %s: %s: %s", address, type(exc).__name__, exc)
                    unread.add(address)
                    continue
                paying = _by_value(txs, address)
                for payment_id in ids:
                    await self._check(http, payment_id, txs, tip, paying)
        await exchange.expire_due(began, unread)
        self.polls += 1

    async def _txs(self, http: httpx.AsyncClient, address: str, since: float) -> Any:
        """The address's transactions: the first answer (unconfirmed ones and the newest
        confirmed), then older confirmed pages while a full page's oldest was mined at or after
        ``since`` (or has no time), at most MAX_PAGES of them."""
        # orjson: nesting past 1024 is a ValueError like any bad answer (the stdlib parser
        # raised RecursionError, which ended the watcher's task and the app's)
        txs = orjson.loads((await self._get(http, f"/address/{address}/txs")).content)
        if not isinstance(txs, list):
            return txs
        page = [t for t in txs if isinstance(t, dict) and _mined(t) is not None]
        for _ in range(MAX_PAGES):
            last = page[-1] if len(page) >= CHAIN_PAGE else None
            if last is None or not is_txid(last.get("txid")) or _mined(last, since) is False:
                break
            older = orjson.loads(
                (await self._get(http, f"/address/{address}/txs/chain/{last['txid']}")).content
            )
            if not isinstance(older, list):
                break
            txs.extend(older)
            # Its entries are not trusted to be transactions: a page of 25 numbers had its
            # last read as one (AttributeError, which took the watcher's task and the app down).
            page = [t for t in older if isinstance(t, dict) and _mined(t) is not None]
        return txs

    async def _check(
        self,
        http: httpx.AsyncClient,
        payment_id: str,
        txs: Any,
        tip: int,
        paying: dict[int, list[Any]],
    ) -> None:
        """Confirm, record or lose one pending payment's output (``txs``: its address's;
        ``paying``: those of them by the amounts they pay it, ``_by_value``)."""
        exchange = self.exchange
        p = exchange.pending.get(payment_id)
        if p is None:
            return
        # A shared address's payment is paid by its exact amount only: it looks at the
        # transactions paying that amount, not at every one the address lists (a flood of
        # requests times a busy address's transactions held the event loop for seconds).
        match = self._find(p, paying.get(p.btc_sats, []) if p.address_index is None else txs, tip)
        if match is None and p.tx_hash is not None and not _lists(txs, p.tx_hash):
            # The address's answer lists its newest transactions only, and a replaced or
            # evicted transaction is in no list: ask for the one seen by its txid.
            try:
                found = await self._lookup(http, p.tx_hash)
            except (httpx.HTTPError, ValueError) as exc:  # this payment waits for the next poll
                self.errors += 1
                log.warning("payment watcher: tx %s: %s: %s", p.tx_hash, type(exc).__name__, exc)
                return
            if not found:
                await exchange.lose(payment_id, p.tx_hash)
                return
            p = exchange.pending.get(payment_id)  # as it is after the wait
            if p is None:
                return
            match = self._find(p, found, tip)
        if match is None:
            return
        if match.confirmations >= exchange.required_confirmations:
            try:
                await exchange.confirm(payment_id, match)
            except HTTPError as exc:  # held (ledger limit): it waits, the poll goes on
                self.errors += 1
                log.warning("payment watcher: payment %s: %s", payment_id, exc.detail)
        else:
            await exchange.seen(payment_id, match)

    async def _lookup(self, http: httpx.AsyncClient, txid: str) -> list[Any]:
        """``[the transaction txid]``, or ``[]`` when the API does not know it (404)."""
        response = await http.get(f"{self.base_url}/tx/{txid}")
        if response.status_code == 404:
            return []
        response.raise_for_status()
        return [orjson.loads(response.content)]

    def _find(self, p: PaymentRecord, txs: Any, tip: int) -> Match | None:
        own = {(p.tx_hash, p.tx_vout or 0)} if p.tx_hash else set()
        # No output in a block older than the request pays it: a shared address's amounts
        # are reused, and an xpub's index may be handed out again (a database restored from
        # a backup, a wallet using the same xpub).
        return find_output(
            txs,
            p.address,
            p.btc_sats,
            exact=p.address_index is None,  # a shared address: the exact amount
            tip_height=tip,
            claimed=self.exchange.claimed - own,
            mined_after=p.created_at - BLOCK_TIME_SLACK,
        )

    async def _get(self, http: httpx.AsyncClient, path: str) -> httpx.Response:
        response = await http.get(self.base_url + path)
        response.raise_for_status()
        return response

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=10.0, trust_env=False) as http:
            while True:
                await self.clock.wait_until(self.clock.now() + self.interval, anyio.Event())
                try:
                    await self.poll_once(http)
                except (httpx.HTTPError, ValueError, HTTPError, DispatchError, StorageError) as exc:
                    # StorageError: a read of the store failed (a dropped connection); its
                    # payments wait for the next poll, as on an API failure.
                    self.errors += 1
                    log.warning("payment watcher: %s: %s", type(exc).__name__, exc)
