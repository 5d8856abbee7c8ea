"""The wallet half of the store contract (users, sessions, nonces, ledger, payments), run
against both stores; and the migration runner on a database that lacks a middle version."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from protocol.records import JobRecord
from storage.base import (
    LedgerEntry,
    NonceRecord,
    PaymentRecord,
    SessionRecord,
    Store,
    UserRecord,
    WriteBatch,
)
from storage.errors import Conflict
from storage.memory import InMemoryJobStore
from storage.postgres import PostgresJobStore
from storage.schema import MIGRATIONS
from storage.sql import DatabasesJobStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

pytestmark = pytest.mark.anyio
T0 = 1_700_000_000.0


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def factory(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    if request.param == "memory":
        return InMemoryJobStore
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
        return lambda: PostgresJobStore(url)
    return lambda: DatabasesJobStore(f"sqlite:///{tmp_path / 'w.db'}")


@pytest.fixture
async def store(factory: Callable[[], Store]) -> AsyncIterator[Store]:
    s = factory()
    with anyio.fail_after(10):
        await s.open()
    yield s
    with anyio.fail_after(10):
        await s.close()


def user(n: int = 1, **kw: Any) -> UserRecord:
    fields: dict[str, Any] = {
        "user_id": f"u{n}",
        "wallet_address": "0x" + f"{n:02x}" * 20,
        "email": f"u{n}@x.org",
        "username": f"user{n}",
        "created_at": T0,
    }
    return UserRecord(**{**fields, **kw})


def movement(key: str, src: str, dst: str, amount: int, at: float = T0) -> list[LedgerEntry]:
    return [
        LedgerEntry(movement_key=key, leg=0, account=src, amount=-amount, kind="k", ref=key, at=at),
        LedgerEntry(movement_key=key, leg=1, account=dst, amount=amount, kind="k", ref=key, at=at),
    ]


def payment(pid: str = "p1", **kw: Any) -> PaymentRecord:
    fields: dict[str, Any] = {
        "payment_id": pid,
        "user_id": "u1",
        "account": "wallet:0x01",
        "aitbc_units": 10**12,
        "btc_sats": 10**7,
        "address": "bc1qexample",
        "address_index": 0,
        "status": "pending",
        "created_at": T0,
        "expires_at": T0 + 3600,
    }
    return PaymentRecord(**{**fields, **kw})


async def test_wallet_rows_round_trip(store: Store) -> None:
    """Users, live sessions, every nonce (expired too), balances and pending payments come
    back."""
    live = SessionRecord(token_hash="h1", user_id="u1", created_at=T0, expires_at=T0 + 60)
    old = SessionRecord(token_hash="h2", user_id="u1", created_at=T0, expires_at=T0 + 1)
    batch = WriteBatch(
        users=[user(1), user(2)],
        sessions={"h1": live, "h2": old},
        nonces={
            "0xa": NonceRecord(wallet_address="0xa", nonce="n", expires_at=T0 + 300),
            "0xb": NonceRecord(wallet_address="0xb", nonce="n", expires_at=T0 - 1),
        },
        entries=movement("m1", "exchange:btc", "wallet:a", 500)
        + movement("m2", "wallet:a", "escrow:j", 200),
        payments={"p1": payment("p1", address_index=4), "p2": payment("p2", status="expired")},
    )
    await store.commit(batch)
    snap = await store.load_wallet(T0 + 10)
    assert sorted(u.user_id for u in snap.users) == ["u1", "u2"]
    assert snap.users[0] in (user(1), user(2))
    assert snap.sessions == [live]
    assert sorted(n.wallet_address for n in snap.nonces) == ["0xa", "0xb"]  # expired too
    assert snap.balances == {"exchange:btc": -500, "wallet:a": 300, "escrow:j": 200}
    assert snap.payments == [payment("p1", address_index=4)]
    assert snap.next_address_index == 5
    assert await store.get_payment("p2") == payment("p2", status="expired")
    assert await store.get_payment("nope") is None


async def test_shared_amounts_of_pending_and_recently_settled_payments(store: Store) -> None:
    """A shared address's amounts come back with when their payment settled (confirmed_at, or
    expires_at once expired; None while pending), those settled before ``settled_since`` left
    out; xpub payments never."""
    shared = {"address_index": None, "address": "bc1qshared"}
    await store.commit(
        WriteBatch(
            payments={
                "open": payment("open", btc_sats=1, **shared),
                "paid": payment(
                    "paid", btc_sats=2, status="confirmed", confirmed_at=T0 + 9, **shared
                ),
                "gone": payment("gone", btc_sats=3, status="expired", **shared),
                "xpub": payment("xpub", btc_sats=4),
            }
        )
    )
    everything = {("bc1qshared", 1, None), ("bc1qshared", 2, T0 + 9), ("bc1qshared", 3, T0 + 3600)}
    assert set((await store.load_wallet(T0)).shared_amounts) == everything
    recent = (await store.load_wallet(T0, settled_since=T0 + 10)).shared_amounts
    assert set(recent) == everything - {("bc1qshared", 2, T0 + 9)}
    late = (await store.load_wallet(T0, settled_since=T0 + 3601)).shared_amounts
    assert late == [("bc1qshared", 1, None)]


async def test_balances_past_64_bits_load_exactly(store: Store) -> None:
    """An amount is at most 1e18 units, but a balance is any number of them: ten of the largest
    admin credits sum past 64 bits, and the coordinator must still start (SQLite's SUM of
    integers failed with "integer overflow", so every start-up failed)."""
    big = 999_999_999_900_000_000
    for n in range(10):
        await store.commit(WriteBatch(entries=movement(f"m{n}", "system:admin", "wallet:a", big)))
    await store.commit(WriteBatch(entries=movement("back", "wallet:a", "wallet:b", 3)))
    snap = await store.load_wallet(T0)
    assert snap.balances == {"system:admin": -10 * big, "wallet:a": 10 * big - 3, "wallet:b": 3}


async def test_revocation_nonce_deletion_and_payment_update(store: Store) -> None:
    s = SessionRecord(token_hash="h1", user_id="u1", created_at=T0, expires_at=T0 + 60)
    await store.commit(
        WriteBatch(
            sessions={"h1": s},
            nonces={"0xa": NonceRecord(wallet_address="0xa", nonce="n", expires_at=T0 + 300)},
            payments={"p1": payment()},
        )
    )
    done = payment(status="confirmed", confirmed_at=T0 + 5, tx_hash="t", tx_vout=1)
    await store.commit(
        WriteBatch(
            sessions={"h1": replace(s, revoked_at=T0 + 1)},
            nonces={"0xa": None},
            payments={"p1": replace(done, aitbc_units=1)},  # amounts are written once
        )
    )
    snap = await store.load_wallet(T0)
    assert (snap.sessions, snap.nonces, snap.payments) == ([], [], [])
    assert await store.get_payment("p1") == done


async def test_ledger_entries_of_an_account_newest_first(store: Store) -> None:
    await store.commit(WriteBatch(entries=movement("a", "system:admin", "wallet:x", 5, T0)))
    await store.commit(WriteBatch(entries=movement("b", "wallet:x", "escrow:j", 2, T0 + 1)))
    entries, total = await store.ledger_entries("wallet:x", 10, 0)
    assert total == 2
    assert [(e.movement_key, e.amount) for e in entries] == [("b", -2), ("a", 5)]
    page, total = await store.ledger_entries("wallet:x", 1, 1)
    assert ([e.movement_key for e in page], total) == (["a"], 2)


@pytest.mark.parametrize(
    "second",
    [
        WriteBatch(entries=movement("m1", "exchange:btc", "wallet:b", 1)),
        WriteBatch(users=[user(9, wallet_address="0x" + "01" * 20)]),
        WriteBatch(users=[user(9, email="u1@x.org")]),
        WriteBatch(payments={"p2": payment("p2", tx_hash="t", tx_vout=0)}),
    ],
    ids=["movement-key", "wallet", "email", "outpoint"],
)
async def test_uniqueness_conflicts_roll_the_batch_back(store: Store, second: WriteBatch) -> None:
    """A movement key, wallet, email or paid output used twice: Conflict, nothing written."""
    await store.commit(
        WriteBatch(
            entries=movement("m1", "exchange:btc", "wallet:a", 1),
            users=[user(1)],
            payments={"p1": payment("p1", tx_hash="t", tx_vout=0)},
        )
    )
    second.jobs["j9"] = JobRecord(
        "j9", "c", "QUEUED", {}, {}, 0, T0, T0 + 9, 0, 0, 3, 1, payment={"amount": 1}
    )
    with pytest.raises(Conflict):
        await store.commit(second)
    assert await store.get_job("j9") is None
    snap = await store.load_wallet(T0)
    assert snap.balances == {"exchange:btc": -1, "wallet:a": 1}
    assert len(snap.users) == 1


async def test_payment_stats_count_all_and_sum_the_recently_confirmed(store: Store) -> None:
    """Totals count every payment; the sums take only those confirmed at or after ``since``
    (a payment confirmed by a later batch counts from its confirmation)."""
    empty = await store.payment_stats(T0)
    assert (empty.total, empty.pending, empty.confirmed_units, empty.confirmed_sats) == (0, 0, 0, 0)
    confirmed = {"status": "confirmed", "tx_vout": 0}
    await store.commit(
        WriteBatch(
            payments={
                "p1": payment("p1"),
                "p2": payment("p2", status="expired"),
                "old": payment("old", **confirmed, confirmed_at=T0 - 1, tx_hash="t0"),
                "edge": payment(
                    "edge", **confirmed, confirmed_at=T0, tx_hash="t1", aitbc_units=7, btc_sats=3
                ),
                "p3": payment("p3", aitbc_units=11, btc_sats=5),
            }
        )
    )
    await store.commit(
        WriteBatch(
            payments={
                "p3": payment(
                    "p3", **confirmed, confirmed_at=T0 + 9, tx_hash="t2", aitbc_units=11, btc_sats=5
                )
            }
        )
    )
    stats = await store.payment_stats(T0)
    assert (stats.total, stats.pending) == (5, 1)
    assert (stats.confirmed_units, stats.confirmed_sats) == (7 + 11, 3 + 5)
    later = await store.payment_stats(T0 + 10)
    assert (later.total, later.pending, later.confirmed_units, later.confirmed_sats) == (5, 1, 0, 0)


async def test_a_jobs_payment_is_written_once(store: Store) -> None:
    pay = {"payment_id": "p", "account": "client:c", "amount": 5, "currency": "AITBC"}
    rec = JobRecord("j1", "c", "QUEUED", {}, {}, 0, T0, T0 + 9, 0, 0, 3, 1, payment=pay)
    await store.commit(WriteBatch(jobs={"j1": rec}))
    await store.commit(WriteBatch(jobs={"j1": rec._replace(state="CANCELED", payment=None)}))
    got = await store.get_job("j1")
    assert got is not None
    assert (got.state, got.payment) == ("CANCELED", pay)


async def test_migrations_apply_every_missing_version(tmp_path: Path) -> None:
    """A database that has versions 1 and 3 but not 2 (or any gap) gets only the missing one."""
    url = f"sqlite:///{tmp_path / 'm.db'}"
    first = DatabasesJobStore(url)
    await first.open()
    await first.close()
    with closing(sqlite3.connect(tmp_path / "m.db")) as db:
        rows = sorted(v for (v,) in db.execute("SELECT version FROM schema_version"))
    assert rows == sorted(v for v, _ in MIGRATIONS)
    again = DatabasesJobStore(url)
    await again.open()  # nothing left to apply: no duplicate table errors
    await again.close()


async def test_payment_stats_sum_past_64_bits(store: Store) -> None:
    """A payment asks at most 21,000,000 BTC, but a day's confirmed payments are any number of
    them: at a small BTC_TO_AITBC_RATE, 4,400 confirmed payments of the most sum past 2**63 - 1
    satoshis (while their AITBC stay far within the ledger's cap), and SQLite's SUM raised
    "integer overflow": every /v1/exchange/market-stats answered 500."""
    most = 21_000_000 * 10**8
    n = 4400
    assert n * most > 2**63 - 1
    confirmed = {"status": "confirmed", "confirmed_at": T0 + 1, "btc_sats": most}
    await store.commit(
        WriteBatch(
            payments={
                f"p{i}": payment(f"p{i}", **confirmed, tx_hash=f"t{i}", tx_vout=0) for i in range(n)
            }
        )
    )
    stats = await store.payment_stats(T0)
    assert (stats.total, stats.pending) == (n, 0)
    assert (stats.confirmed_units, stats.confirmed_sats) == (n * 10**12, n * most)
