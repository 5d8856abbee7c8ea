"""The ``JobStore`` contract, run against every store: in-memory, SQLite (on a file) and
PostgreSQL (a fresh database of the test server, tests/postgres.py)."""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import closing
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import pytest

from protocol.amounts import MAX_RECEIPT_UNITS
from protocol.records import EventRecord, JobRecord, MinerRecord
from storage.backends import store_for
from storage.base import JobQuery, JobStore, JobSummary, LedgerEntry, ReceiptRow, WriteBatch
from storage.errors import Conflict, StorageError
from storage.memory import InMemoryJobStore
from storage.postgres import PostgresJobStore
from storage.schema import MIGRATIONS, SCHEMA_VERSION
from storage.sql import FIND_JOBS_PAGE, DatabasesJobStore
from tests.postgres import fetch_rows

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.anyio

T0 = 1_700_000_000.0

StoreFactory = Callable[[], JobStore]


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def factory(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    if request.param == "memory":
        return InMemoryJobStore
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
        return lambda: PostgresJobStore(url)
    return lambda: DatabasesJobStore(sqlite_url(tmp_path))


@pytest.fixture
async def store(factory: StoreFactory) -> AsyncIterator[JobStore]:
    s = factory()
    with anyio.fail_after(10):
        await s.open()
    yield s
    with anyio.fail_after(10):
        await s.close()


def job(job_id: str = "j1", **kw: Any) -> JobRecord:
    fields: dict[str, Any] = {
        "client_id": "client-1",
        "state": "QUEUED",
        "payload": {"prompt": "hello", "n": [1, 2.5, None, True]},
        "constraints": {"models": ["llama"], "gpu": {"memory_mb": 8000}},
        "priority": 0,
        "requested_at": T0,
        "expires_at": T0 + 900,
        "attempt": 0,
        "failures": 0,
        "max_attempts": 3,
        "seq": 1,
    }
    fields.update(kw)
    return JobRecord(job_id=job_id, **fields)


def event(job_id: str, seq: int, kind: str = "queued", **kw: Any) -> EventRecord:
    fields: dict[str, Any] = {"state": "QUEUED", "at": T0 + seq, "attempt": 0}
    fields.update(kw)
    return EventRecord(job_id=job_id, seq=seq, event=kind, **fields)


def miner(miner_id: str = "gpu-1", key_hash: str = "a" * 64, **kw: Any) -> MinerRecord:
    fields: dict[str, Any] = {
        "session_id": "s1",
        "capabilities": {"gpus": [{"name": "A100", "memory_mb": 40000}], "price": 0.5},
        "concurrency": 2,
        "region": "eu-west",
        "last_seen": T0,
    }
    fields.update(kw)
    return MinerRecord(miner_id=miner_id, key_hash=key_hash, **fields)


def receipt_row(
    receipt_id: str,
    job_id: str = "j1",
    issued_at: float = T0,
    chain_seq: int = 1,
    **extra: Any,
) -> ReceiptRow:
    body = {"receipt_id": receipt_id, "job_id": job_id, "chain_seq": chain_seq, **extra}
    return ReceiptRow(
        receipt_id=receipt_id,
        job_id=job_id,
        miner_id="gpu-1",
        issued_at=issued_at,
        receipt=body,
        chain_seq=chain_seq,
    )


def batch(
    jobs: Sequence[JobRecord] = (),
    events: Sequence[EventRecord] = (),
    miners: Sequence[MinerRecord] = (),
    receipts: Sequence[ReceiptRow] = (),
) -> WriteBatch:
    return WriteBatch(
        jobs={j.job_id: j for j in jobs},
        events=list(events),
        miners={m.miner_id: m for m in miners},
        receipts=list(receipts),
    )


async def commit(store: JobStore, b: WriteBatch) -> None:
    with anyio.fail_after(10):
        await store.commit(b)


async def active(store: JobStore) -> tuple[list[JobRecord], list[MinerRecord]]:
    with anyio.fail_after(10):
        return await store.load_active()


# ---- jobs ---------------------------------------------------------------------------------


async def test_job_round_trips_every_field(store: JobStore) -> None:
    """A committed job reads back equal, optional fields and JSON columns included."""
    full = job(
        "j-full",
        state="COMPLETED",
        priority=-3,
        attempt=2,
        failures=1,
        seq=7,
        miner_id="gpu-1",
        assigned_at=T0 + 1.25,
        started_at=T0 + 2.5,
        finished_at=T0 + 3.75,
        result={"text": "héllo ✓", "tokens": 12},
        receipt={"receipt_id": "r1", "signature": "ab"},
        error=None,
        idempotency_key="idem-1",
    )
    bare = job("j-bare")
    await commit(store, batch(jobs=[full, bare]))
    with anyio.fail_after(10):
        assert await store.get_job("j-full") == full
        assert await store.get_job("j-bare") == bare
        assert await store.get_job("nope") is None


async def test_job_upsert_updates_state_but_keeps_payload_and_constraints(store: JobStore) -> None:
    """A later snapshot replaces the state; payload and constraints are written once."""
    await commit(store, batch(jobs=[job()]))
    later = job(
        state="FAILED",
        payload={"prompt": "changed"},
        constraints={},
        attempt=1,
        failures=1,
        seq=3,
        error="boom",
        finished_at=T0 + 5,
    )
    await commit(store, batch(jobs=[later]))
    with anyio.fail_after(10):
        got = await store.get_job("j1")
    assert got == later._replace(payload=job().payload, constraints=job().constraints)


async def test_a_created_job_takes_every_changing_field_of_later_snapshots(
    store: JobStore,
) -> None:
    """Created with its first event, then updated in place: every field that may change does."""
    await commit(store, batch(jobs=[job()], events=[event("j1", 1)]))
    done = job(
        state="COMPLETED",
        attempt=3,
        failures=2,
        seq=9,
        miner_id="gpu-7",
        assigned_at=T0 + 1,
        started_at=T0 + 2,
        finished_at=T0 + 3,
        result={"text": "ok ✓"},
        receipt={"receipt_id": "r9", "price": 1e-05},
        error="late",
    )
    await commit(store, batch(jobs=[done], events=[event("j1", 2, "completed")]))
    with anyio.fail_after(10):
        assert await store.get_job("j1") == done


async def test_a_completion_reads_back_its_receipt_from_every_place(store: JobStore) -> None:
    """The receipt committed with a completion comes back in the job, in the ``completed``
    event's data and in the receipt lists, whatever the store keeps where (the SQL store keeps
    one copy, in ``receipts``)."""
    await commit(store, batch(jobs=[job()], events=[event("j1", 1)]))
    row = receipt_row("r1", chain_seq=1, price=2e-05, text="ok ✓")
    done = job("j1", state="COMPLETED", seq=2, miner_id="gpu-1", receipt=row.receipt)
    completed = event(
        "j1", 2, "completed", state="COMPLETED", data={"result": {"ok": 1}, "receipt": row.receipt}
    )
    other = job("j2", state="COMPLETED", seq=1, receipt={"receipt_id": "own"})
    await commit(
        store,
        batch(jobs=[done, other], events=[completed, event("j2", 1)], receipts=[row]),
    )
    with anyio.fail_after(10):
        assert await store.get_job("j1") == done
        assert await store.get_job("j2") == other  # no receipts row: the job keeps its own
        assert await store.events_after("j1", 0) == [event("j1", 1), completed]
        assert (await store.events_after("j1", 1))[0].data["receipt"] == row.receipt
        assert await store.receipts_for("j1") == [row.receipt]
        listed, total = await store.list_jobs(JobQuery(client_id="client-1", limit=10, offset=0))
    assert total == 2
    assert {j.job_id: j.receipt for j in listed} == {"j1": row.receipt, "j2": other.receipt}


async def test_text_spelling_a_nul_escape_is_ordinary_text(store: JobStore) -> None:
    """A backslash then "u0000" (six characters, allowed: it is no NUL) in a payload, a result
    and a receipt reads back everywhere, found by the queries that read JSON fields: a
    PostgreSQL guard against NUL escapes once hid such jobs from type filters and their
    receipts from replays."""
    text = "print('\\u0000')"
    assert len(text) == 15
    payload = {"type": "echo", "note": text}
    await commit(store, batch(jobs=[job(payload=payload)], events=[event("j1", 1)]))
    row = receipt_row("r1", chain_seq=1, price=0.5, note=text)
    row = replace(row, miner_id="gpu-1")
    done = job(
        "j1", payload=payload, state="COMPLETED", seq=2, miner_id="gpu-1", receipt=row.receipt
    )
    completed = event(
        "j1",
        2,
        "completed",
        state="COMPLETED",
        data={"result": {"text": text}, "receipt": row.receipt},
    )
    await commit(store, batch(jobs=[done], events=[completed], receipts=[row]))
    with anyio.fail_after(10):
        assert (await store.events_after("j1", 1))[0].data["receipt"] == row.receipt
        assert (await store.list_jobs(JobQuery(job_type="echo")))[0] == [done]
        earned = await store.miner_earnings("gpu-1", T0 - 1, T0 + 1, 1)
    assert (earned.completed, earned.billed) == (1, 50_000_000)


async def test_stored_and_unstored_jobs_in_one_batch_are_both_written(store: JobStore) -> None:
    """A batch mixing a job already stored and one never seen (neither with its first event)
    stores both: the SQL store's in-place UPDATE falls back to the upsert when a row is missing.
    """
    await commit(store, batch(jobs=[job("j1")], events=[event("j1", 1)]))
    seen = job("j1", state="RUNNING", miner_id="gpu-1", seq=2)
    unseen = job("j2", state="RUNNING", miner_id="gpu-2", seq=2)
    await commit(store, batch(jobs=[seen, unseen], events=[event("j1", 2, "assigned")]))
    with anyio.fail_after(10):
        assert await store.get_job("j1") == seen
        assert await store.get_job("j2") == unseen


async def test_later_snapshot_in_a_batch_wins(store: JobStore) -> None:
    """Two snapshots of one job in a batch: the last one assigned to the batch is stored."""
    b = WriteBatch()
    b.jobs["j1"] = job(seq=1)
    b.jobs["j1"] = job(seq=2, state="RUNNING", miner_id="gpu-1")
    await commit(store, b)
    with anyio.fail_after(10):
        got = await store.get_job("j1")
    assert got is not None
    assert (got.state, got.seq, got.miner_id) == ("RUNNING", 2, "gpu-1")


async def test_find_job_by_idempotency_key(store: JobStore) -> None:
    """find_job matches (client, key) exactly."""
    keyed = job("j1", idempotency_key="k1")
    other_client = job("j2", client_id="client-2", idempotency_key="k1")
    unkeyed = job("j3")
    await commit(store, batch(jobs=[keyed, other_client, unkeyed]))
    with anyio.fail_after(10):
        assert await store.find_job("client-1", "k1") == keyed
        assert await store.find_job("client-2", "k1") == other_client
        assert await store.find_job("client-1", "k2") is None
        assert await store.find_job("client-3", "k1") is None


async def test_find_jobs_looks_up_many_keys_in_one_call(store: JobStore) -> None:
    """find_jobs gives the job of each (client, key) pair that has one, over any number of
    pairs (more than one query's worth included)."""
    keyed = job("j1", idempotency_key="k1")
    other_client = job("j2", client_id="client-2", idempotency_key="k1")
    await commit(store, batch(jobs=[keyed, other_client, job("j3")]))
    misses = [("client-1", f"missing-{i}") for i in range(FIND_JOBS_PAGE + 1)]
    with anyio.fail_after(10):
        found = await store.find_jobs([*misses, ("client-2", "k1"), ("client-1", "k1")])
        assert found == {("client-1", "k1"): keyed, ("client-2", "k1"): other_client}
        assert await store.find_jobs([("client-3", "k1")]) == {}
        assert await store.find_jobs([]) == {}


async def test_idempotency_key_is_unique_per_client(store: JobStore) -> None:
    """Two jobs of one client with the same key conflict; the batch leaves no trace."""
    await commit(store, batch(jobs=[job("j1", idempotency_key="k1")]))
    with pytest.raises(Conflict):
        await commit(
            store,
            batch(jobs=[job("j2", idempotency_key="k1")], events=[event("j2", 1)]),
        )
    with anyio.fail_after(10):
        assert await store.get_job("j2") is None
        assert await store.events_after("j2", 0) == []
        found = await store.find_job("client-1", "k1")
    assert found is not None
    assert found.job_id == "j1"


async def test_load_active_returns_only_queued_and_running(store: JobStore) -> None:
    """Terminal jobs stay out of the start-up rebuild; every miner is in it."""
    states = ["QUEUED", "RUNNING", "COMPLETED", "FAILED", "CANCELED", "EXPIRED"]
    await commit(
        store,
        batch(jobs=[job(f"j-{s}", state=s) for s in states], miners=[miner("m1"), miner("m2")]),
    )
    jobs, miners = await active(store)
    assert sorted(j.job_id for j in jobs) == ["j-QUEUED", "j-RUNNING"]
    assert sorted(m.miner_id for m in miners) == ["m1", "m2"]


async def test_load_active_gives_jobs_in_the_order_they_were_stored(store: JobStore) -> None:
    """Submission order: the rebuilt queue's tie-break between jobs of the same time."""
    order = ["j-c", "j-a", "j-d", "j-b"]
    for job_id in order[:2]:
        await commit(store, batch(jobs=[job(job_id)], events=[event(job_id, 1)]))
    await commit(
        store, batch(jobs=[job(j) for j in order[2:]], events=[event(j, 1) for j in order[2:]])
    )
    await commit(store, batch(jobs=[job("j-c", state="RUNNING", seq=2)], events=[event("j-c", 2)]))
    jobs, _ = await active(store)
    assert [j.job_id for j in jobs] == order


async def test_load_active_sees_a_job_leave_the_active_set(store: JobStore) -> None:
    """A job that became terminal in a later batch is no longer active."""
    await commit(store, batch(jobs=[job("j1"), job("j2")]))
    await commit(store, batch(jobs=[job("j1", state="CANCELED", seq=2)]))
    jobs, _ = await active(store)
    assert [j.job_id for j in jobs] == ["j2"]


# ---- events -------------------------------------------------------------------------------


async def test_events_after_is_ordered_by_seq(store: JobStore) -> None:
    """Events come back by seq whatever order they were written in, per job."""
    await commit(store, batch(events=[event("j1", 3), event("j1", 1), event("j2", 1)]))
    await commit(store, batch(events=[event("j1", 2, "assigned", state="RUNNING", miner_id="m")]))
    with anyio.fail_after(10):
        got = await store.events_after("j1", 0)
    assert [e.seq for e in got] == [1, 2, 3]
    assert got[1] == event("j1", 2, "assigned", state="RUNNING", miner_id="m")


async def test_events_after_honours_after_and_limit(store: JobStore) -> None:
    """``after`` is exclusive and ``limit`` caps the page."""
    await commit(store, batch(events=[event("j1", s) for s in range(1, 11)]))
    with anyio.fail_after(10):
        assert [e.seq for e in await store.events_after("j1", 4)] == [5, 6, 7, 8, 9, 10]
        assert [e.seq for e in await store.events_after("j1", 4, limit=3)] == [5, 6, 7]
        assert [e.seq for e in await store.events_after("j1", 0, limit=1)] == [1]
        assert await store.events_after("j1", 10) == []
        assert await store.events_after("unknown", 0) == []


async def test_event_data_round_trips(store: JobStore) -> None:
    """The free-form ``data`` of an event is stored as JSON and read back equal."""
    e = event(
        "j1",
        1,
        "completed",
        state="COMPLETED",
        attempt=2,
        miner_id="gpu-1",
        data={"result": {"text": "ok", "list": [1, {"a": None}]}, "receipt": {"sig": "ff"}},
    )
    await commit(store, batch(events=[e]))
    with anyio.fail_after(10):
        assert await store.events_after("j1", 0) == [e]


# ---- miners -------------------------------------------------------------------------------


async def test_miner_upsert_keeps_the_first_key_hash(store: JobStore) -> None:
    """A miner id stays bound to the key that first used it; the rest is updated."""
    await commit(store, batch(miners=[miner(key_hash="a" * 64)]))
    newer = miner(
        key_hash="b" * 64,
        session_id="s2",
        capabilities={"cuda": "12.1"},
        concurrency=4,
        region=None,
        last_seen=T0 + 60,
    )
    await commit(store, batch(miners=[newer]))
    _, miners = await active(store)
    assert miners == [replace(newer, key_hash="a" * 64)]


async def test_job_summaries_are_the_newest_jobs_without_their_bodies(store: JobStore) -> None:
    """job_summaries(n): the newest n jobs, newest first as list_jobs orders them, with their
    ids, state, client, miner, request time and attempt."""
    await commit(store, batch(jobs=[job("j1"), job("j2", requested_at=T0 + 1.5)]))
    await commit(store, batch(jobs=[job("j3", state="RUNNING", miner_id="gpu-1", attempt=2)]))
    with anyio.fail_after(10):
        got = await store.job_summaries(2)
        listed, _ = await store.list_jobs(JobQuery(limit=2, offset=0))
    assert [s.job_id for s in got] == [j.job_id for j in listed] == ["j3", "j2"]
    assert got == [
        JobSummary(
            job_id="j3",
            state="RUNNING",
            client_id="client-1",
            miner_id="gpu-1",
            requested_at=T0,
            attempt=2,
        ),
        JobSummary(
            job_id="j2",
            state="QUEUED",
            client_id="client-1",
            miner_id=None,
            requested_at=T0 + 1.5,
            attempt=0,
        ),
    ]


async def test_mean_run_seconds_of_the_newest_completed_jobs(store: JobStore) -> None:
    """mean_run_seconds(n): finished_at - started_at averaged over the newest n COMPLETED
    jobs (as list_jobs orders them) that have both; other states and jobs without times are
    left out; None when no job counts."""
    with anyio.fail_after(10):
        assert await store.mean_run_seconds(10) is None
    done = {"state": "COMPLETED", "finished_at": T0 + 100}
    await commit(
        store,
        batch(
            jobs=[
                job("old", started_at=T0 + 10, **done),  # 90 s, the oldest
                job("j1", started_at=T0 + 99, **done),  # 1 s
                job("no-start", **done),  # never started: no run time
                job("failed", state="FAILED", started_at=T0, finished_at=T0 + 100),
                job("j2", started_at=T0 + 97, **done),  # 3 s, the newest
            ]
        ),
    )
    with anyio.fail_after(10):
        assert await store.mean_run_seconds(10) == pytest.approx(94 / 3)
        assert await store.mean_run_seconds(3) == pytest.approx(2.0)  # j2, no-start, j1
        assert await store.mean_run_seconds(2) == pytest.approx(3.0)  # j2, no-start


# ---- receipts -----------------------------------------------------------------------------


async def test_receipts_for_gives_the_receipt_the_jobs_row_names(store: JobStore) -> None:
    """receipts_for: the receipt of a completed job's row; nothing for a job without a stored
    receipt, for an unknown job, or for a receipt no job row names."""
    r1, r2 = receipt_row("r1"), receipt_row("r2", "j2", chain_seq=2)
    await commit(
        store,
        batch(
            jobs=[
                job("j1", state="COMPLETED", receipt=r1.receipt),
                job("j2"),  # still queued: r2 is not its receipt (yet)
                job("j4", state="COMPLETED", receipt={"receipt_id": "own"}),
            ],
            events=[event("j1", 1), event("j2", 1), event("j4", 1)],
            receipts=[r1, r2],
        ),
    )
    with anyio.fail_after(10):
        assert await store.receipts_for("j1") == [r1.receipt]
        assert await store.list_receipts("j1", 10, 0) == [r1.receipt]
        assert await store.list_receipts("j1", 10, 1) == []
        assert await store.receipts_for("j2") == []
        assert await store.receipts_for("j3") == []
        assert await store.receipts_for("j4") == []  # its row keeps its own copy, no row here


async def test_receipts_list_newest_first_in_chain_order(store: JobStore) -> None:
    """The explorer's list: highest ``chain_seq`` first, whatever the issue times say."""
    rows = [
        receipt_row("r1", issued_at=T0 + 5, chain_seq=1),
        receipt_row("r2", issued_at=T0 + 5, chain_seq=2),
        receipt_row("r3", issued_at=T0 - 9, chain_seq=3),
    ]
    await commit(store, batch(receipts=rows[:2]))
    await commit(store, batch(receipts=rows[2:]))
    with anyio.fail_after(10):
        assert await store.list_receipts(None, 10, 0) == [r.receipt for r in reversed(rows)]
        assert await store.list_receipts(None, 1, 1) == [rows[1].receipt]
        assert await store.list_receipts(None, 5, 3) == []


async def test_receipt_fields_are_list_receipts_values_at_their_paths(store: JobStore) -> None:
    """list_receipt_fields: list_receipts' page (order, job filter, paging), each receipt as
    its values at the paths asked (None where absent), typed as in the receipt."""
    rows = [
        receipt_row(
            "r1",
            units=1.5,
            price=0.03,
            started_at=1_700_000_000,
            signature={"alg": "Ed25519", "key_id": "k1"},
            metadata={"job_payload": {"p": list(range(50))}, "result": {"o": "é"}},
        ),
        receipt_row("r2", "j2", chain_seq=2, units=2.0, signature="not an object", status="x"),
        # Numbers come back as written: a float stays a float, however large, and exact.
        receipt_row("r3", "j3", chain_seq=3, units=1e16, price=1e300, unit_price=0.1 + 0.2),
    ]
    done = [
        job("j1", state="COMPLETED", receipt=rows[0].receipt),
        job("j3", state="COMPLETED", receipt=rows[2].receipt),
    ]
    await commit(store, batch(jobs=done, receipts=rows))
    paths = [("receipt_id",), ("units",), ("price",), ("started_at",), ("signature", "key_id")]
    with anyio.fail_after(10):
        got = await store.list_receipt_fields(None, 10, 0, paths)
        assert got == [
            ["r3", 1e16, 1e300, None, None],
            ["r2", 2.0, None, None, None],
            ["r1", 1.5, 0.03, 1_700_000_000, "k1"],
        ]
        assert [type(v) for v in got[2][1:4]] == [float, float, int]
        assert (type(got[1][1]), type(got[0][1]), type(got[0][2])) == (float, float, float)
        [[third]] = await store.list_receipt_fields("j3", 10, 0, [("unit_price",)])
        assert third == 0.1 + 0.2  # 0.30000000000000004, not 0.3
        assert await store.list_receipt_fields(None, 1, 2, paths) == [got[2]]
        assert await store.list_receipt_fields("j1", 10, 0, paths) == [got[2]]
        assert await store.list_receipt_fields("j2", 10, 0, paths) == []
        statuses = await store.list_receipt_fields(None, 10, 0, [("status",)])
        assert statuses == [[None], ["x"], [None]]


async def test_duplicate_receipt_id_is_ignored(store: JobStore) -> None:
    """Writing a receipt id again keeps the first receipt and does not fail the batch."""
    await commit(store, batch(receipts=[receipt_row("r1", version=1)]))
    await commit(
        store,
        batch(jobs=[job("j9")], receipts=[receipt_row("r1", version=2)]),
    )
    with anyio.fail_after(10):
        assert await store.list_receipts(None, 10, 0) == [
            {"receipt_id": "r1", "job_id": "j1", "chain_seq": 1, "version": 1}
        ]
        assert await store.get_job("j9") is not None


async def test_receipt_chain_head_and_pages(store: JobStore) -> None:
    """The head is the highest chain_seq; pages come in chain order."""
    with anyio.fail_after(10):
        assert await store.receipt_chain_head() is None
    await commit(
        store,
        batch(receipts=[receipt_row("r1", chain_seq=1), receipt_row("r2", "j2", chain_seq=2)]),
    )
    await commit(store, batch(receipts=[receipt_row("r3", "j3", issued_at=T0 - 5, chain_seq=3)]))
    with anyio.fail_after(10):
        head = await store.receipt_chain_head()
        assert head is not None
        assert head["receipt_id"] == "r3"
        chain = await store.receipt_chain(0, 10)
        assert [(n, r["receipt_id"]) for n, r in chain] == [(1, "r1"), (2, "r2"), (3, "r3")]
        assert [r["receipt_id"] for _, r in await store.receipt_chain(1, 1)] == ["r2"]
        assert await store.receipt_chain(3, 10) == []


async def test_receipt_chain_seq_is_unique_and_a_clash_writes_nothing(store: JobStore) -> None:
    """Two receipts claiming one place in the chain: Conflict, and the batch is invisible."""
    await commit(store, batch(receipts=[receipt_row("r1", chain_seq=1)]))
    with pytest.raises(Conflict):
        await commit(
            store, batch(jobs=[job("j2")], receipts=[receipt_row("r9", "j2", chain_seq=1)])
        )
    with pytest.raises(Conflict):
        await commit(
            store,
            batch(receipts=[receipt_row("r2", chain_seq=2), receipt_row("r3", chain_seq=2)]),
        )
    with anyio.fail_after(10):
        assert await store.get_job("j2") is None
        assert [r["receipt_id"] for _, r in await store.receipt_chain(0, 10)] == ["r1"]
    # the same receipt written again (a replayed batch) is not a clash
    await commit(store, batch(receipts=[receipt_row("r1", chain_seq=1)]))


# ---- atomicity ----------------------------------------------------------------------------


async def test_duplicate_event_conflicts_and_the_batch_is_invisible(store: JobStore) -> None:
    """A batch holding an existing (job_id, seq) raises Conflict and writes nothing at all."""
    await commit(store, batch(jobs=[job("j1")], events=[event("j1", 1)]))
    bad = batch(
        jobs=[job("j1", state="RUNNING", seq=2), job("j2")],
        events=[event("j2", 1), event("j1", 2), event("j1", 1, "requeued")],
        miners=[miner("m-new")],
        receipts=[receipt_row("r-new", job_id="j2")],
    )
    with pytest.raises(Conflict):
        await commit(store, bad)
    with anyio.fail_after(10):
        assert await store.get_job("j1") == job("j1")
        assert await store.get_job("j2") is None
        assert await store.events_after("j1", 0) == [event("j1", 1)]
        assert await store.events_after("j2", 0) == []
        assert await store.receipts_for("j2") == []
    _, miners = await active(store)
    assert miners == []


async def test_duplicate_event_within_one_batch_conflicts(store: JobStore) -> None:
    """The same (job_id, seq) twice in one batch is a conflict too, and nothing is written."""
    with pytest.raises(Conflict):
        await commit(
            store, batch(jobs=[job("j1")], events=[event("j1", 1), event("j1", 1, "assigned")])
        )
    with anyio.fail_after(10):
        assert await store.get_job("j1") is None
        assert await store.events_after("j1", 0) == []


async def test_store_is_usable_after_a_failed_batch(store: JobStore) -> None:
    """A conflict rolls back cleanly: the next batch commits normally."""
    await commit(store, batch(events=[event("j1", 1)]))
    with pytest.raises(Conflict):
        await commit(store, batch(events=[event("j1", 1)]))
    await commit(store, batch(jobs=[job("j1", seq=2)], events=[event("j1", 2)]))
    with anyio.fail_after(10):
        assert [e.seq for e in await store.events_after("j1", 0)] == [1, 2]
        got = await store.get_job("j1")
    assert got is not None
    assert got.seq == 2


async def test_empty_batch_commits(store: JobStore) -> None:
    """An empty batch is a no-op, not an error."""
    await commit(store, WriteBatch())
    assert await active(store) == ([], [])


# ---- lifecycle ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "operation",
    [
        lambda s: s.commit(batch(jobs=[job()])),
        lambda s: s.load_active(),
        lambda s: s.get_job("j1"),
        lambda s: s.find_job("client-1", "k"),
        lambda s: s.find_jobs([("client-1", "k")]),
        lambda s: s.events_after("j1", 0),
        lambda s: s.receipts_for("j1"),
        lambda s: s.receipt_chain_head(),
        lambda s: s.receipt_chain(0, 10),
    ],
    ids=[
        "commit",
        "load_active",
        "get_job",
        "find_job",
        "find_jobs",
        "events_after",
        "receipts_for",
        "chain_head",
        "chain",
    ],
)
async def test_closed_store_raises_storage_error(
    factory: StoreFactory, operation: Callable[[JobStore], Any]
) -> None:
    """After close, every operation raises StorageError."""
    s = factory()
    with anyio.fail_after(10):
        await s.open()
        await s.commit(batch(jobs=[job()]))
        await s.close()
        with pytest.raises(StorageError):
            await operation(s)


async def test_never_opened_store_refuses_commits(factory: StoreFactory) -> None:
    """A store that was never opened cannot commit."""
    with anyio.fail_after(10), pytest.raises(StorageError):
        await factory().commit(batch(jobs=[job()]))


# ---- SQLite only --------------------------------------------------------------------------


async def test_reopen_keeps_data_and_migrations_are_idempotent(database_url: str) -> None:
    """Data survives a reopen (SQLite's file, PostgreSQL's database); migrations run once (one
    schema_version row each: on PostgreSQL its one baseline records them all)."""
    with anyio.fail_after(20):
        first = store_for(database_url)
        await first.open()
        await first.commit(
            batch(
                jobs=[job("j1", idempotency_key="k1")],
                events=[event("j1", 1)],
                miners=[miner()],
                receipts=[receipt_row("r1")],
            )
        )
        await first.close()
        for _ in range(2):
            again = store_for(database_url)
            await again.open()
            assert await again.get_job("j1") == job("j1", idempotency_key="k1")
            assert await again.find_job("client-1", "k1") == job("j1", idempotency_key="k1")
            assert await again.events_after("j1", 0) == [event("j1", 1)]
            assert await again.receipt_chain(0, 5) == [(1, receipt_row("r1").receipt)]
            assert await again.load_active() == ([job("j1", idempotency_key="k1")], [miner()])
            await again.close()
        rows = await fetch_rows(database_url, "SELECT version FROM schema_version")
    assert sorted(rows) == [(version,) for version, _ in MIGRATIONS]
    assert max(rows) == (SCHEMA_VERSION,)


async def test_sqlite_upgrade_from_version_1_keeps_receipts_unchained(tmp_path: Path) -> None:
    """A database written before migration 2 upgrades in place; its receipts stay unchained."""
    with closing(sqlite3.connect(tmp_path / "store.db")) as db:
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for sql in MIGRATIONS[0][1]:
            db.execute(sql)
        db.execute("INSERT INTO schema_version (version) VALUES (1)")
        db.execute(
            "INSERT INTO receipts (receipt_id, job_id, miner_id, issued_at, receipt) "
            """VALUES ('old', 'j1', 'gpu-1', 1.0, '{"receipt_id":"old"}')"""
        )
        db.commit()
    with anyio.fail_after(20):
        s = DatabasesJobStore(sqlite_url(tmp_path))
        await s.open()
        try:
            assert await s.list_receipts(None, 5, 0) == [{"receipt_id": "old"}]
            assert await s.receipt_chain_head() is None
            await s.commit(batch(receipts=[receipt_row("r1", chain_seq=1)]))
            assert [r["receipt_id"] for _, r in await s.receipt_chain(0, 5)] == ["r1"]
        finally:
            await s.close()


def _v4_job(db: sqlite3.Connection, job_id: str, state: str, receipt: str | None = None) -> None:
    db.execute(
        "INSERT INTO jobs (job_id, client_id, state, payload, constraints, priority, "
        "requested_at, expires_at, attempt, failures, max_attempts, seq, receipt) "
        "VALUES (?, 'client-1', ?, '{}', '{}', 0, 1.0, 901.0, 1, 0, 3, 1, ?)",
        (job_id, state, receipt),
    )


def _v4_receipt(db: sqlite3.Connection, rid: str, job_id: str, at: float, n: int | None) -> None:
    body = {"receipt_id": rid, **({} if n is None else {"chain_seq": n})}
    db.execute(
        "INSERT INTO receipts (receipt_id, job_id, miner_id, issued_at, receipt, chain_seq) "
        "VALUES (?, ?, 'gpu-1', ?, ?, ?)",
        (rid, job_id, at, json.dumps(body), n),
    )


async def test_sqlite_upgrade_to_version_5_finds_every_receipt_without_the_old_indexes(
    tmp_path: Path,
) -> None:
    """Migration 5 on a database of version 4: jobs name their receipts, the chain is the
    receipts table's order (receipts from before the chain follow it, newest first), and the
    four indexes it replaces are gone."""
    with closing(sqlite3.connect(tmp_path / "store.db")) as db:
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for version, statements in MIGRATIONS[:4]:
            for sql in statements:
                db.execute(sql)
            db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
        assert [v for v, _ in MIGRATIONS[:4]] == [1, 2, 3, 4]
        _v4_receipt(db, "old-1", "j0", 1.0, None)
        _v4_receipt(db, "old-2", "jx", 2.0, None)
        _v4_receipt(db, "r2", "j2", 4.0, 2)
        _v4_receipt(db, "r1", "j1", 3.0, 1)
        _v4_job(db, "j0", "COMPLETED")  # its receipt is in receipts (unchained)
        _v4_job(db, "j1", "COMPLETED")
        _v4_job(db, "j2", "COMPLETED", receipt='{"receipt_id":"r2","copy":true}')
        _v4_job(db, "j3", "QUEUED")
        db.commit()
    with anyio.fail_after(20):
        s = DatabasesJobStore(sqlite_url(tmp_path))
        await s.open()
        try:
            got = {j: await s.get_job(j) for j in ("j0", "j1", "j2", "j3")}
            assert {j: r.receipt if r else None for j, r in got.items()} == {
                "j0": {"receipt_id": "old-1"},
                "j1": {"receipt_id": "r1", "chain_seq": 1},
                "j2": {"receipt_id": "r2", "copy": True},  # the row's own copy wins, as before
                "j3": None,
            }
            assert await s.receipts_for("j0") == [{"receipt_id": "old-1"}]
            assert await s.receipts_for("j2") == [{"receipt_id": "r2", "chain_seq": 2}]
            assert await s.receipts_for("j3") == []
            head = await s.receipt_chain_head()
            assert head == {"receipt_id": "r2", "chain_seq": 2}
            assert [(n, r["receipt_id"]) for n, r in await s.receipt_chain(0, 9)] == [
                (1, "r1"),
                (2, "r2"),
            ]
            explorer = [r["receipt_id"] for r in await s.list_receipts(None, 9, 0)]
            assert explorer == ["r2", "r1", "old-2", "old-1"]
            await s.commit(batch(receipts=[receipt_row("r3", "j9", chain_seq=3)]))
            assert [n for n, _ in await s.receipt_chain(1, 9)] == [2, 3]
            with pytest.raises(Conflict):  # a place in the chain is still unique
                await s.commit(batch(receipts=[receipt_row("r4", "j9", chain_seq=2)]))
            jobs, total = await s.list_jobs(JobQuery(client_id="client-1", limit=9, offset=0))
            assert ([j.job_id for j in jobs], total) == (["j3", "j2", "j1", "j0"], 4)
        finally:
            await s.close()
    with closing(sqlite3.connect(tmp_path / "store.db")) as db:
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert not names & {"receipts_job", "receipts_chain", "receipts_issued", "jobs_requested"}
    assert {"jobs_state", "jobs_client"} <= names


@pytest.mark.parametrize(("synchronous", "level"), [("NORMAL", 1), ("FULL", 2)])
async def test_sqlite_pragmas_wal_and_synchronous(
    tmp_path: Path, synchronous: str, level: int
) -> None:
    """Both connections run in WAL mode with the configured synchronous level."""
    s = DatabasesJobStore(sqlite_url(tmp_path), synchronous=synchronous)
    with anyio.fail_after(10):
        await s.open()
        try:
            for raw in (s._raw, s._reader.raw_connection):  # type: ignore[union-attr]
                async with raw.execute("PRAGMA journal_mode") as cur:
                    assert (await cur.fetchone())[0] == "wal"
                async with raw.execute("PRAGMA synchronous") as cur:
                    assert (await cur.fetchone())[0] == level
        finally:
            await s.close()


@pytest.mark.parametrize(
    ("url", "synchronous"),
    [("postgresql://localhost/db", "NORMAL"), ("sqlite:///x.db", "OFF")],
)
def test_sqlite_store_refuses_unsupported_configuration(url: str, synchronous: str) -> None:
    """Only SQLite URLs and the NORMAL/FULL synchronous levels are accepted."""
    with pytest.raises(StorageError):
        DatabasesJobStore(url, synchronous=synchronous)


async def test_sqlite_reader_and_writer_are_separate_connections(tmp_path: Path) -> None:
    """Reads and checkpoints run on connections of their own, not the writer's (databases
    shares one connection per task, so the store opens three Database objects)."""
    store = DatabasesJobStore(sqlite_url(tmp_path))
    await store.open()
    try:
        assert store._reader is not None
        assert store._checkpointer is not None
        connections = {
            id(store._raw),
            id(store._reader.raw_connection),
            id(store._checkpointer.raw_connection),
        }
        assert len(connections) == 3
        async with anyio.create_task_group() as tg:  # commits while checkpoints run
            tg.start_soon(store.maintain, 0.001)
            for n in range(50):
                await store.commit(batch(jobs=[job(f"j{n}")], events=[event(f"j{n}", 1)]))
                await anyio.lowlevel.checkpoint()
            tg.cancel_scope.cancel()
        assert len((await store.load_active())[0]) == 50
    finally:
        await store.close()


async def test_list_jobs_without_the_total_gives_the_same_page(store: JobStore) -> None:
    """``with_total=False``: the same jobs, newest first; the total is only the page's size."""
    jobs = [
        job(f"j{i}", requested_at=T0 + i, state="COMPLETED" if i % 2 else "QUEUED")
        for i in range(5)
    ]
    await commit(store, batch(jobs=jobs, events=[event(j.job_id, 1) for j in jobs]))
    with anyio.fail_after(10):
        for state in (None, "COMPLETED"):
            query = JobQuery(state=state, limit=2, offset=0)
            full, total = await store.list_jobs(query)
            page, size = await store.list_jobs(replace(query, with_total=False))
            assert page == full
            assert [j.job_id for j in page] == (["j4", "j3"] if state is None else ["j3", "j1"])
            assert (total, size) == (5 if state is None else 2, 2)


async def test_list_jobs_ends_a_page_at_max_chars(store: JobStore) -> None:
    """``max_chars``: the page ends before the job that would take its jobs' payload,
    constraints, result and error text past it (the first job always comes): a page of 500
    jobs near the body limit was read whole, gigabytes for one call. The total is unchanged."""
    blob = "x" * 1000
    jobs = [
        job(f"j{i}", requested_at=T0 + i, payload={"b": blob}, constraints={}) for i in range(5)
    ]
    await commit(store, batch(jobs=jobs, events=[event(j.job_id, 1) for j in jobs]))
    with anyio.fail_after(10):
        page, total = await store.list_jobs(JobQuery(limit=5, offset=0, max_chars=2500))
        assert ([j.job_id for j in page], total) == (["j4", "j3"], 5)
        assert page[0] == jobs[4]
        page, total = await store.list_jobs(JobQuery(limit=5, offset=2, max_chars=2500))
        assert ([j.job_id for j in page], total) == (["j2", "j1"], 5)
        page, _ = await store.list_jobs(JobQuery(limit=5, offset=0, max_chars=10))
        assert [j.job_id for j in page] == ["j4"]  # the first job whatever its size
        page, _ = await store.list_jobs(JobQuery(limit=3, offset=0, max_chars=10**6))
        assert [j.job_id for j in page] == ["j4", "j3", "j2"]
        query = JobQuery(limit=5, offset=0, max_chars=2500, with_total=False)
        assert [j.job_id for j in (await store.list_jobs(query))[0]] == ["j4", "j3"]


async def test_list_jobs_by_miner(store: JobStore) -> None:
    """``miner_id``: the jobs whose current or last miner it is, newest first, with the state
    filter on top."""
    jobs = [
        job("j0", state="COMPLETED", miner_id="gpu-1", seq=2),
        job("j1", state="RUNNING", miner_id="gpu-2", seq=2),
        job("j2", state="RUNNING", miner_id="gpu-1", seq=2),
        job("j3"),
    ]
    await commit(store, batch(jobs=jobs, events=[event(j.job_id, 1) for j in jobs]))
    with anyio.fail_after(10):
        found, total = await store.list_jobs(JobQuery(miner_id="gpu-1", limit=10, offset=0))
        assert ([j.job_id for j in found], total) == (["j2", "j0"], 2)
        query = JobQuery(miner_id="gpu-1", state="COMPLETED", limit=10, offset=0)
        found, total = await store.list_jobs(query)
        assert ([j.job_id for j in found], total) == (["j0"], 1)


async def test_miner_earnings_sum_its_receipts_in_the_window(store: JobStore) -> None:
    """A miner's receipts issued in [since, until): count, prices summed exactly in units of
    1e-8, the job payments the ledger made for those jobs only, the newest first."""

    def row(n: int, miner: str, at: float, price: Any) -> ReceiptRow:
        r = receipt_row(f"r{n}", f"j{n}", issued_at=at, chain_seq=n, price=price)
        return replace(r, miner_id=miner)

    def paid(n: int, amount: int) -> list[LedgerEntry]:
        legs = ((0, f"escrow:j{n}", -amount), (1, "miner:gpu-1", amount))
        return [
            LedgerEntry(
                movement_key=f"job:j{n}:pay",
                leg=leg,
                account=account,
                amount=units,
                kind="job_payment",
                ref=f"j{n}",
                at=T0,
            )
            for leg, account, units in legs
        ]

    rows = [
        row(1, "gpu-1", T0, 0.1),
        row(2, "gpu-1", T0 + 10, 0.000003),
        row(3, "gpu-2", T0 + 10, 5.0),
        row(4, "gpu-1", T0 + 20, 0.2),  # outside [T0, T0 + 20)
        row(5, "gpu-1", T0 + 5, None),  # no price: counts 0
    ]
    b = batch(receipts=rows)
    b.entries = [*paid(1, 7_000_000), *paid(3, 1), *paid(4, 2)]
    await commit(store, b)
    with anyio.fail_after(10):
        got = await store.miner_earnings("gpu-1", T0, T0 + 20, 2)
    assert (got.completed, got.billed, got.paid) == (3, 10_000_300, 7_000_000)
    # Only their RECENT_FIELDS (a whole receipt holds the job's payload and result); r5 has
    # no price, and these test receipts no completed_at.
    assert got.recent == [
        {"receipt_id": "r5", "job_id": "j5"},
        {"receipt_id": "r2", "job_id": "j2", "price": 0.000003},
    ]
    with anyio.fail_after(10):
        none = await store.miner_earnings("gpu-9", T0, T0 + 20, 2)
    assert (none.completed, none.billed, none.paid, none.recent) == (0, 0, 0, [])
    # A miner may advertise any finite price: each receipt counts at most 1e18 units, and the
    # sum neither overflows nor loses a unit (SQLite's TOTAL is a float, exact up to 2**53),
    # the largest float too (a receipt's price saturates there; times 1e8 it is infinite).
    # And what the ledger paid for them is summed exactly past 64 bits.
    b = batch(receipts=[row(6, "gpu-3", T0, 1e300), row(7, "gpu-3", T0, sys.float_info.max)])
    b.entries = [*paid(6, 5 * 10**18), *paid(7, 5 * 10**18)]
    await commit(store, b)
    with anyio.fail_after(10):
        huge = await store.miner_earnings("gpu-3", T0, T0 + 20, 0)
    assert (huge.completed, huge.billed, huge.paid) == (2, 2 * MAX_RECEIPT_UNITS, 10**19)


async def test_sqlite_newest_first_lists_read_an_index_not_a_sort_of_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lists of all clients' jobs (admin jobs; admin stats' newest COMPLETED) and of all
    receipts (the public explorer) walk a table (rowid order) or an index in order: a million
    rows would otherwise be sorted per request (about a second here)."""
    store = DatabasesJobStore(sqlite_url(tmp_path))
    seen: list[tuple[str, dict[str, Any]]] = []
    with anyio.fail_after(20):
        await store.open()
        fetch = store._fetch

        async def recording(sql: str, values: dict[str, Any] | None = None, **kw: Any) -> Any:
            seen.append((sql, values or {}))
            return await fetch(sql, values, **kw)

        monkeypatch.setattr(store, "_fetch", recording)
        try:
            for state in (None, "COMPLETED"):
                query = JobQuery(state=state, limit=100, offset=0, with_total=False)
                await store.list_jobs(query)
            assert len(seen) == 2  # no COUNT without the total
            await store.list_receipts(None, 50, 0)  # the public explorer's list
        finally:
            await store.close()
    with closing(sqlite3.connect(tmp_path / "store.db")) as db:
        for sql, values in seen:
            # The outer query's steps (a job's receipt is a correlated subquery of its own): a
            # walk of the table in rowid order, or of the state index, never a sort.
            plan = [r[3] for r in db.execute(f"EXPLAIN QUERY PLAN {sql}", values) if r[1] == 0]
            walks = ("SCAN jobs", "SEARCH jobs USING INDEX jobs_state (state=?)", "SCAN receipts")
            assert [s for s in plan if not s.startswith("CORRELATED")] in [[w] for w in walks]
            assert not any("TEMP B-TREE" in step for step in plan), plan


async def test_sqlite_rows_with_nulls_in_the_statement_match_the_general_statements(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fresh inserts and plain updates (their NULLs written in the SQL, not bound) store the
    rows, rowids included, that the general upsert and update store."""
    import storage.sql as sql

    batches = [
        # all fresh (a submit, assigned or not), then a batch with an idempotency key in it
        batch(jobs=[job("a"), job("b", state="RUNNING", attempt=1, miner_id="m", assigned_at=T0)]),
        batch(jobs=[job("c"), job("d", idempotency_key="k"), job("e")]),
        # plain updates (the receipt is in ``receipts``), then one with an error among them
        batch(
            jobs=[
                job("a", state="COMPLETED", seq=3, result={"ok": 1}, finished_at=T0 + 1),
                job("b", state="RUNNING", seq=2, started_at=T0 + 1),
            ],
            receipts=[receipt_row("r1", "a")],
        ),
        batch(jobs=[job("c", state="FAILED", seq=2, error="boom"), job("e", seq=2)]),
    ]

    async def rows(name: str) -> list[list[Any]]:
        """The jobs table after each batch."""
        store = DatabasesJobStore(f"sqlite:///{tmp_path / name}")
        await store.open()
        out = []
        for n, b in enumerate(batches):
            created = {j.job_id for j in b.jobs.values() if j.seq == 1}
            b.events[:] = [event(job_id, 1) for job_id in created] if n < 2 else []
            await commit(store, b)
            with closing(sqlite3.connect(tmp_path / name)) as db:
                out.append(db.execute("SELECT rowid, * FROM jobs ORDER BY rowid").fetchall())
        await store.close()
        return out

    shortcut = await rows("shortcut.db")
    monkeypatch.setattr(sql, "_fresh_row", lambda j: None)
    monkeypatch.setattr(sql, "_plain", lambda update: None)
    assert shortcut == await rows("general.db")
    assert [r[1] for r in shortcut[-1]] == ["a", "b", "c", "d", "e"]


async def test_sqlite_table_scans_never_hold_up_indexed_reads(tmp_path: Path) -> None:
    """A miner's job list and earnings, a job-type filter and the exchange's totals walk whole
    tables: they run on a connection of their own, so a job read answers while one is stuck."""
    s = DatabasesJobStore(sqlite_url(tmp_path))
    with anyio.fail_after(10):
        await s.open()
    try:
        await commit(s, batch(jobs=[job("j1", miner_id="gpu-1")], events=[event("j1", 1)]))
        scanner = s._scanner
        assert scanner is not None
        gate, entered = anyio.Event(), anyio.Event()
        fetch_all = scanner.fetch_all

        async def stuck(*args: Any, **kwargs: Any) -> Any:
            entered.set()
            await gate.wait()
            return await fetch_all(*args, **kwargs)

        scanner.fetch_all = stuck  # type: ignore[method-assign]
        scans = [
            lambda: s.list_jobs(JobQuery(miner_id="gpu-1", limit=5, offset=0)),
            lambda: s.list_jobs(JobQuery(client_id="client-1", job_type="x", limit=5, offset=0)),
            lambda: s.miner_earnings("gpu-1", 0.0, 1e12, 5),
            lambda: s.payment_stats(0.0),
        ]
        for scan in scans:
            gate, entered = anyio.Event(), anyio.Event()
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(scan)
                    await entered.wait()  # the scan waits on its own connection...
                    assert (await s.get_job("j1")) is not None  # ...the reader answers
                    gate.set()
    finally:
        with anyio.fail_after(10):
            await s.close()


async def test_job_type_matches_a_string_type_only(store: JobStore) -> None:
    """``job_type`` is text and matches a payload whose ``type`` is that string, on every store
    (PostgreSQL's ``->>`` spells any JSON value as text: ``?job_type=5`` also listed a job whose
    type is the number 5, and ``true`` one whose type is true; the others never did)."""
    types: list[Any] = ["5", 5, 5.0, True, "true", None, {"a": 1}, [1]]
    jobs = [job(f"j{n}", payload={"type": t}) for n, t in enumerate(types)]
    await commit(store, batch(jobs=jobs, events=[event(j.job_id, 1) for j in jobs]))
    for wanted, ids in (("5", ["j0"]), ("true", ["j4"]), ("5.0", []), ('{"a": 1}', [])):
        with anyio.fail_after(10):
            found, total = await store.list_jobs(JobQuery(job_type=wanted))
        assert ([j.job_id for j in found], total) == (ids, len(ids)), wanted


# ---- retention (JOB_RETENTION_DAYS) -------------------------------------------------------


async def test_jobs_after_walks_the_jobs_in_the_order_they_were_stored(store: JobStore) -> None:
    """jobs_after: a page of jobs after a place, oldest first, with their state and times;
    a job updated later keeps its place."""
    await commit(store, batch(jobs=[job("b"), job("a")], events=[event("b", 1), event("a", 1)]))
    await commit(store, batch(jobs=[job("c", requested_at=T0 + 5)], events=[event("c", 1)]))
    done = job("b", state="COMPLETED", seq=2, finished_at=T0 + 9)
    await commit(store, batch(jobs=[done], events=[event("b", 2, "completed")]))
    with anyio.fail_after(10):
        everything = await store.jobs_after(0, 10)
        assert [(j.job_id, j.state, j.requested_at, j.finished_at) for j in everything] == [
            ("b", "COMPLETED", T0, T0 + 9),
            ("a", "QUEUED", T0, None),
            ("c", "QUEUED", T0 + 5, None),
        ]
        places = [j.rowid for j in everything]
        assert places == sorted(places)
        assert [j.job_id for j in await store.jobs_after(places[0], 1)] == ["a"]
        assert await store.jobs_after(places[-1], 10) == []


async def test_a_pruned_job_goes_with_its_events_and_its_receipt_stays(store: JobStore) -> None:
    """A batch's ``pruned`` jobs are deleted with their events; their receipts stay (the
    chain), other jobs are untouched, and a pruned job's idempotency key is free again."""
    r1 = receipt_row("r1")
    await commit(
        store,
        batch(
            jobs=[
                job("j1", state="COMPLETED", receipt=r1.receipt, idempotency_key="k"),
                job("j2"),
            ],
            events=[event("j1", 1), event("j1", 2, "completed"), event("j2", 1)],
            receipts=[r1],
        ),
    )
    await commit(store, WriteBatch(pruned=["j1", "never-stored"]))
    with anyio.fail_after(10):
        assert await store.get_job("j1") is None
        assert await store.events_after("j1", 0) == []
        assert await store.find_job("client-1", "k") is None
        assert [j.job_id for j in await store.jobs_after(0, 10)] == ["j2"]
        assert [e.seq for e in await store.events_after("j2", 0)] == [1]
        assert await store.list_receipts(None, 10, 0) == [r1.receipt]
        assert (await store.count_jobs()).get("COMPLETED", 0) == 0
    again = job("j3", idempotency_key="k")
    await commit(store, batch(jobs=[again], events=[event("j3", 1)]))
    with anyio.fail_after(10):
        found = await store.find_job("client-1", "k")
    assert found is not None
    assert found.job_id == "j3"
