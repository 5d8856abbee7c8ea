"""DDL as SQL text, applied as numbered migrations at start-up.

Rule: a migration is never edited once released; add a new one. ``job_events`` is a
``WITHOUT ROWID`` table (SQLite: its small rows live in the primary-key B-tree, one tree per
insert instead of two; measured +20% jobs/s). ``jobs`` and ``receipts`` keep rowids: their rows
are large, and ``WITHOUT ROWID`` made them slower. The applied version is kept in
``schema_version`` (one row per applied migration) so the same code runs on SQLite and
PostgreSQL; every listed version that has no row is applied, so numbers need not be
contiguous.

PostgreSQL (``storage/postgres.py``) has a list of its own, ``PG_MIGRATIONS``: its first entry
creates the schema as SQLite's migrations 1-5 leave it, in one transaction, and records all five
versions. A later migration is added to both lists, under the same number.
"""

from __future__ import annotations

import re

__all__ = ["MIGRATIONS", "OUR_NAMES", "PG_MIGRATIONS", "SCHEMA_VERSION"]

MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            """CREATE TABLE jobs (
                job_id TEXT PRIMARY KEY,
                client_id TEXT NOT NULL,
                state TEXT NOT NULL,
                payload TEXT NOT NULL,
                constraints TEXT NOT NULL,
                priority INTEGER NOT NULL,
                requested_at DOUBLE PRECISION NOT NULL,
                expires_at DOUBLE PRECISION NOT NULL,
                attempt INTEGER NOT NULL,
                failures INTEGER NOT NULL,
                max_attempts INTEGER NOT NULL,
                seq INTEGER NOT NULL,
                miner_id TEXT,
                assigned_at DOUBLE PRECISION,
                started_at DOUBLE PRECISION,
                finished_at DOUBLE PRECISION,
                result TEXT,
                receipt TEXT,
                error TEXT,
                idempotency_key TEXT
            )""",
            "CREATE INDEX jobs_state ON jobs (state)",
            "CREATE INDEX jobs_client ON jobs (client_id, requested_at)",
            """CREATE UNIQUE INDEX jobs_idempotency ON jobs (client_id, idempotency_key)
               WHERE idempotency_key IS NOT NULL""",
            """CREATE TABLE job_events (
                job_id TEXT NOT NULL,
                seq INTEGER NOT NULL,
                event TEXT NOT NULL,
                state TEXT NOT NULL,
                at DOUBLE PRECISION NOT NULL,
                attempt INTEGER NOT NULL,
                miner_id TEXT,
                data TEXT NOT NULL,
                PRIMARY KEY (job_id, seq)
            ) WITHOUT ROWID""",
            """CREATE TABLE miners (
                miner_id TEXT PRIMARY KEY,
                key_hash TEXT NOT NULL,
                session_id TEXT,
                capabilities TEXT NOT NULL,
                concurrency INTEGER NOT NULL,
                region TEXT,
                last_seen DOUBLE PRECISION NOT NULL
            )""",
            """CREATE TABLE receipts (
                receipt_id TEXT PRIMARY KEY,
                job_id TEXT NOT NULL,
                miner_id TEXT,
                issued_at DOUBLE PRECISION NOT NULL,
                receipt TEXT NOT NULL
            )""",
            "CREATE INDEX receipts_job ON receipts (job_id)",
        ],
    ),
    (
        2,
        [  # the receipt chain (docs/receipts.md): each receipt's place, unique per store
            "ALTER TABLE receipts ADD COLUMN chain_seq INTEGER",
            """CREATE UNIQUE INDEX receipts_chain ON receipts (chain_seq)
               WHERE chain_seq IS NOT NULL""",
        ],
    ),
    # 3: users, sessions, login nonces, the ledger and exchange payments (docs/wallet.md).
    # Independent of migration 2 (receipts): the runner applies every missing version.
    # Amounts are INTEGER units of 1e-8 (never floats); a movement's two legs share a key.
    (
        3,
        [
            """CREATE TABLE users (
                user_id TEXT PRIMARY KEY,
                wallet_address TEXT NOT NULL UNIQUE,
                email TEXT NOT NULL UNIQUE,
                username TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL
            )""",
            """CREATE TABLE user_sessions (
                token_hash TEXT PRIMARY KEY,
                user_id TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                expires_at DOUBLE PRECISION NOT NULL,
                revoked_at DOUBLE PRECISION
            )""",
            """CREATE TABLE login_nonces (
                wallet_address TEXT PRIMARY KEY,
                nonce TEXT NOT NULL,
                expires_at DOUBLE PRECISION NOT NULL
            )""",
            """CREATE TABLE ledger_entries (
                movement_key TEXT NOT NULL,
                leg INTEGER NOT NULL,
                account TEXT NOT NULL,
                amount BIGINT NOT NULL,
                kind TEXT NOT NULL,
                ref TEXT,
                at DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (movement_key, leg)
            )""",
            "CREATE INDEX ledger_account ON ledger_entries (account, at)",
            """CREATE TABLE exchange_payments (
                payment_id TEXT PRIMARY KEY,
                user_id TEXT NOT NULL,
                account TEXT NOT NULL,
                aitbc_units BIGINT NOT NULL,
                btc_sats BIGINT NOT NULL,
                address TEXT NOT NULL,
                address_index INTEGER,
                status TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                expires_at DOUBLE PRECISION NOT NULL,
                confirmed_at DOUBLE PRECISION,
                tx_hash TEXT,
                tx_vout INTEGER,
                confirmations INTEGER NOT NULL
            )""",
            "CREATE INDEX exchange_payments_status ON exchange_payments (status)",
            """CREATE UNIQUE INDEX exchange_payments_outpoint ON exchange_payments
               (tx_hash, tx_vout) WHERE tx_hash IS NOT NULL""",
            "ALTER TABLE jobs ADD COLUMN payment TEXT",
        ],
    ),
    (
        4,
        [  # newest-first lists without sorting the whole table: admin jobs and stats (state
            # filter) and start-up's live jobs read these; clients' lists use jobs_client; the
            # public explorer lists receipts newest first
            "DROP INDEX jobs_state",
            "CREATE INDEX jobs_state ON jobs (state, requested_at)",
            "CREATE INDEX jobs_requested ON jobs (requested_at)",
            "CREATE INDEX receipts_issued ON receipts (issued_at)",
        ],
    ),
    # 5: fewer B-trees written per job (docs/performance.md: WAL pages per job). A job's row
    # names its receipt (``receipt_id``), so its receipts need no ``receipts_job``. The chain
    # place is the receipts table's rowid (``chain_seq INTEGER PRIMARY KEY``): the chain audit,
    # the chain head and the newest-first explorer read the table itself, replacing
    # ``receipts_chain`` and ``receipts_issued``, and the rowid keeps a place unique. Receipts
    # from before the chain (migration 2) are numbered -1, -2, ... newest first, after every
    # chained one. Job lists read newest first in insertion (rowid) order, which every index
    # carries: ``jobs_requested`` goes, ``jobs_state`` and ``jobs_client`` key one column.
    (
        5,
        [
            "ALTER TABLE jobs ADD COLUMN receipt_id TEXT",
            """UPDATE jobs SET receipt_id = (
                   SELECT r.receipt_id FROM receipts AS r WHERE r.job_id = jobs.job_id
                   ORDER BY r.issued_at DESC LIMIT 1)
               WHERE state = 'COMPLETED'""",
            """CREATE TABLE receipts_v5 (
                chain_seq INTEGER PRIMARY KEY,
                receipt_id TEXT NOT NULL UNIQUE,
                job_id TEXT NOT NULL,
                miner_id TEXT,
                issued_at DOUBLE PRECISION NOT NULL,
                receipt TEXT NOT NULL
            )""",
            """INSERT INTO receipts_v5 (chain_seq, receipt_id, job_id, miner_id, issued_at, receipt)
               SELECT chain_seq, receipt_id, job_id, miner_id, issued_at, receipt FROM receipts
               WHERE chain_seq IS NOT NULL""",
            """INSERT INTO receipts_v5 (chain_seq, receipt_id, job_id, miner_id, issued_at, receipt)
               SELECT -ROW_NUMBER() OVER (ORDER BY issued_at DESC, receipt_id),
                      receipt_id, job_id, miner_id, issued_at, receipt
               FROM receipts WHERE chain_seq IS NULL""",
            "DROP TABLE receipts",
            "ALTER TABLE receipts_v5 RENAME TO receipts",
            "DROP INDEX jobs_requested",
            "DROP INDEX jobs_state",
            "CREATE INDEX jobs_state ON jobs (state)",
            "DROP INDEX jobs_client",
            "CREATE INDEX jobs_client ON jobs (client_id)",
        ],
    ),
]

SCHEMA_VERSION = MIGRATIONS[-1][0]


def _for_postgres(sql: str) -> str:
    """SQLite DDL for PostgreSQL: INTEGER is 32 bits there, so BIGINT (SQLite's INTEGER is 64),
    and every table has a heap (no ``WITHOUT ROWID``)."""
    return sql.replace(" INTEGER", " BIGINT").replace(" WITHOUT ROWID", "")


# What PostgreSQL's baseline takes as it is from released migrations no later one changed:
# migration 1's idempotency index, event log and miners, and migration 3's wallet tables (its
# other statement adds a column to ``jobs``).
_UNCHANGED_SINCE_1 = [
    sql
    for sql in dict(MIGRATIONS)[1]
    if sql.startswith(
        ("CREATE UNIQUE INDEX jobs_idempotency", "CREATE TABLE job_events", "CREATE TABLE miners")
    )
]
_WALLET_TABLES = [sql for sql in dict(MIGRATIONS)[3] if not sql.startswith("ALTER TABLE jobs")]

# PostgreSQL: (versions recorded, statements). Every integer is BIGINT (SQLite's INTEGER is 64
# bits); ``jobs.rowid`` is a column here, the insertion order that newest-first job lists read
# (SQLite's implicit rowid), so the shared reads name it the same way; indexes end in it.
PG_MIGRATIONS: list[tuple[tuple[int, ...], list[str]]] = [
    (
        (1, 2, 3, 4, 5),
        [
            """CREATE TABLE jobs (
                rowid BIGSERIAL NOT NULL UNIQUE,
                job_id TEXT PRIMARY KEY,
                client_id TEXT NOT NULL,
                state TEXT NOT NULL,
                payload TEXT NOT NULL,
                constraints TEXT NOT NULL,
                priority BIGINT NOT NULL,
                requested_at DOUBLE PRECISION NOT NULL,
                expires_at DOUBLE PRECISION NOT NULL,
                attempt BIGINT NOT NULL,
                failures BIGINT NOT NULL,
                max_attempts BIGINT NOT NULL,
                seq BIGINT NOT NULL,
                miner_id TEXT,
                assigned_at DOUBLE PRECISION,
                started_at DOUBLE PRECISION,
                finished_at DOUBLE PRECISION,
                result TEXT,
                receipt TEXT,
                error TEXT,
                idempotency_key TEXT,
                payment TEXT,
                receipt_id TEXT
            )""",
            "CREATE INDEX jobs_state ON jobs (state, rowid)",
            "CREATE INDEX jobs_client ON jobs (client_id, rowid)",
            *map(_for_postgres, _UNCHANGED_SINCE_1),
            """CREATE TABLE receipts (
                chain_seq BIGINT PRIMARY KEY,
                receipt_id TEXT NOT NULL UNIQUE,
                job_id TEXT NOT NULL,
                miner_id TEXT,
                issued_at DOUBLE PRECISION NOT NULL,
                receipt TEXT NOT NULL
            )""",
            *map(_for_postgres, _WALLET_TABLES),
        ],
    ),
]

# The tables and indexes the migrations create: a database that records no migration yet has one
# of them is another program's (migration 1 would fail on it, midway through start-up).
OUR_NAMES = frozenset(
    re.findall(
        r"CREATE (?:UNIQUE )?(?:TABLE|INDEX) (\w+)",
        "\n".join(sql for _, statements in MIGRATIONS + PG_MIGRATIONS for sql in statements),
    )
)
