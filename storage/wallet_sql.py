"""SQL of the wallet tables: users, sessions, login nonces, ledger entries, payments.

Used by the SQL stores only: ``statements`` run inside the group-commit transaction (so a job's
ledger entries commit with its state change), the rest turn rows into records. Ledger entries
are plain INSERTs: a movement key written twice is a ``Conflict`` that rolls the whole batch
back, never a silent double count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from storage.base import (
    LedgerEntry,
    NonceRecord,
    PaymentRecord,
    SessionRecord,
    UserRecord,
    WalletSnapshot,
)

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

    from storage.base import WriteBatch

__all__ = [
    "entry",
    "exact_sum",
    "payment",
    "snapshot",
    "snapshot_queries",
    "split_sum",
    "statements",
]

_INSERT_ENTRY = (
    "INSERT INTO ledger_entries (movement_key, leg, account, amount, kind, ref, at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_USER = (
    "INSERT INTO users (user_id, wallet_address, email, username, created_at) "
    "VALUES (?, ?, ?, ?, ?)"
)
_UPSERT_SESSION = (
    "INSERT INTO user_sessions (token_hash, user_id, created_at, expires_at, revoked_at) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (token_hash) DO UPDATE SET "
    "revoked_at = excluded.revoked_at"
)
_UPSERT_NONCE = (
    "INSERT INTO login_nonces (wallet_address, nonce, expires_at) VALUES (?, ?, ?) "
    "ON CONFLICT (wallet_address) DO UPDATE SET nonce = excluded.nonce, "
    "expires_at = excluded.expires_at"
)
_DELETE_NONCE = "DELETE FROM login_nonces WHERE wallet_address = ?"
_PAYMENT_COLUMNS = (
    "payment_id",
    "user_id",
    "account",
    "aitbc_units",
    "btc_sats",
    "address",
    "address_index",
    "status",
    "created_at",
    "expires_at",
    "confirmed_at",
    "tx_hash",
    "tx_vout",
    "confirmations",
)
_UPSERT_PAYMENT = (
    f"INSERT INTO exchange_payments ({', '.join(_PAYMENT_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(_PAYMENT_COLUMNS))}) ON CONFLICT (payment_id) DO UPDATE SET "
    + ", ".join(
        f"{c} = excluded.{c}"
        for c in ("status", "confirmed_at", "tx_hash", "tx_vout", "confirmations")
    )
)


# An amount is at most 1e18 units but a sum of them is not bounded, and SQLite's SUM of integers
# fails past 64 bits ("integer overflow": at start-up, the coordinator could not load its
# balances). Sums are taken in two parts that cannot overflow, an amount's billions and its
# remainder (``/`` truncates towards zero in SQLite and PostgreSQL alike; no ``%``, which the
# ``databases`` driver takes for a placeholder), and put back together in Python by ``exact_sum``.
_PART = 1_000_000_000


def _rest(expr: str) -> str:
    return f"({expr}) - ({expr}) / {_PART} * {_PART}"


def split_sum(expr: str, name: str) -> str:
    """SQL for the two parts of ``SUM(expr)``, as columns ``<name>_high`` and ``<name>_low``."""
    return (
        f"COALESCE(SUM(({expr}) / {_PART}), 0) AS {name}_high, "
        f"COALESCE(SUM({_rest(expr)}), 0) AS {name}_low"
    )


def exact_sum(m: Mapping[str, Any], name: str) -> int:
    """The sum ``split_sum`` read as ``name``."""
    return int(m[f"{name}_high"]) * _PART + int(m[f"{name}_low"])


def statements(batch: WriteBatch) -> Iterator[tuple[str, list[tuple[Any, ...]]]]:
    """The wallet part of a batch: each statement with its rows (``?`` placeholders), in the
    order the writer runs them inside the batch's transaction."""
    if batch.users:
        yield (
            _INSERT_USER,
            [(u.user_id, u.wallet_address, u.email, u.username, u.created_at) for u in batch.users],
        )
    if batch.sessions:
        yield (
            _UPSERT_SESSION,
            [
                (s.token_hash, s.user_id, s.created_at, s.expires_at, s.revoked_at)
                for s in batch.sessions.values()
            ],
        )
    if batch.nonces:  # an address appears once in a batch: deletes and upserts never clash
        gone = [(address,) for address, nonce in batch.nonces.items() if nonce is None]
        if gone:
            yield _DELETE_NONCE, gone
        new = [(a, n.nonce, n.expires_at) for a, n in batch.nonces.items() if n is not None]
        if new:
            yield _UPSERT_NONCE, new
    if batch.payments:
        yield (
            _UPSERT_PAYMENT,
            [tuple(getattr(p, c) for c in _PAYMENT_COLUMNS) for p in batch.payments.values()],
        )
    if batch.entries:
        yield (
            _INSERT_ENTRY,
            [
                (e.movement_key, e.leg, e.account, e.amount, e.kind, e.ref, e.at)
                for e in batch.entries
            ],
        )


# When a payment settled: its confirmation, or its deadline for an expired one (NULL: pending).
_SETTLED = "CASE WHEN status = 'pending' THEN NULL ELSE COALESCE(confirmed_at, expires_at) END"


def snapshot_queries(
    now: float, settled_since: float | None = None
) -> dict[str, tuple[str, dict[str, Any]]]:
    shared = f"SELECT address, btc_sats, {_SETTLED} AS settled FROM exchange_payments"
    shared_values: dict[str, Any] = {}
    if settled_since is None:
        shared += " WHERE address_index IS NULL"
    else:
        shared += (
            " WHERE address_index IS NULL AND (status = 'pending' OR "
            "COALESCE(confirmed_at, expires_at) >= :since)"
        )
        shared_values["since"] = settled_since
    return {
        "users": ("SELECT * FROM users", {}),
        "sessions": (
            "SELECT * FROM user_sessions WHERE revoked_at IS NULL AND expires_at > :now",
            {"now": now},
        ),
        "nonces": ("SELECT * FROM login_nonces", {}),  # expired too: the wallet drops them
        "balances": (  # zero when both parts are: the rest is sorted out in ``snapshot``
            f"SELECT account, {split_sum('amount', 'balance')} FROM ledger_entries "
            f"GROUP BY account HAVING SUM(amount / {_PART}) != 0 OR SUM({_rest('amount')}) != 0",
            {},
        ),
        "payments": ("SELECT * FROM exchange_payments WHERE status = 'pending'", {}),
        "outpoints": (
            "SELECT tx_hash, tx_vout FROM exchange_payments WHERE tx_hash IS NOT NULL",
            {},
        ),
        "shared": (shared, shared_values),
        "index": (
            "SELECT COALESCE(MAX(address_index), -1) + 1 AS n FROM exchange_payments",
            {},
        ),
    }


def snapshot(now: float, rows: dict[str, Sequence[Any]]) -> WalletSnapshot:
    return WalletSnapshot(
        users=[UserRecord(**dict(r._mapping)) for r in rows["users"]],
        sessions=[SessionRecord(**dict(r._mapping)) for r in rows["sessions"]],
        nonces=[NonceRecord(**dict(r._mapping)) for r in rows["nonces"]],
        balances={
            account: balance
            for account, balance in (
                (r._mapping["account"], exact_sum(r._mapping, "balance")) for r in rows["balances"]
            )
            if balance
        },
        payments=[payment(r._mapping) for r in rows["payments"]],
        next_address_index=int(rows["index"][0]._mapping["n"]),
        outpoints=[(r._mapping["tx_hash"], r._mapping["tx_vout"]) for r in rows["outpoints"]],
        shared_amounts=[
            (r._mapping["address"], r._mapping["btc_sats"], r._mapping["settled"])
            for r in rows["shared"]
        ],
    )


def entry(m: Mapping[str, Any]) -> LedgerEntry:
    return LedgerEntry(**dict(m))


def payment(m: Mapping[str, Any]) -> PaymentRecord:
    return PaymentRecord(**dict(m))
