"""Ring 1: durable records, the JobView wire view and shared types (records.py, types.py)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings, strategies as st

from protocol import types
from protocol.records import EventRecord, JobRecord, MinerRecord, job_view
from protocol.types import (
    PROTOCOL_VERSION,
    CloseCode,
    ErrorCode,
    EventKind,
    iso_time,
    parse_instant,
)

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def job(**overrides: object) -> JobRecord:
    fields: dict[str, object] = {
        "job_id": "job-1",
        "client_id": "client-1",
        "state": "QUEUED",
        "payload": {"prompt": "hi"},
        "constraints": {"models": ["llama3"]},
        "priority": 0,
        "requested_at": T0,
        "expires_at": T0 + 900,
        "attempt": 1,
        "failures": 0,
        "max_attempts": 3,
        "seq": 1,
    }
    fields.update(overrides)
    return JobRecord(**fields)  # type: ignore[arg-type]


def test_job_view_of_queued_job() -> None:
    """A fresh job's view has the REST JobView keys, ISO times and nulls for what is unknown."""
    assert job_view(job()) == {
        "job_id": "job-1",
        "state": "QUEUED",
        "assigned_miner_id": None,
        "requested_at": "2023-11-14T22:13:20.000Z",
        "expires_at": "2023-11-14T22:28:20.000Z",
        "error": None,
        "payment_id": None,
        "payment_status": None,
        "payment_amount": None,
        "payload": {"prompt": "hi"},
        "constraints": {"models": ["llama3"]},
        "result": None,
        "receipt_id": None,
        "attempt": 1,
        "priority": 0,
        "started_at": None,
        "finished_at": None,
        "seq": 1,
    }


def test_job_view_of_completed_job() -> None:
    """A finished job shows its miner, result, receipt id and start/finish times."""
    done = job(
        state="COMPLETED",
        miner_id="gpu-box-7",
        assigned_at=T0 + 1,
        started_at=T0 + 1.5,
        finished_at=T0 + 4.25,
        result={"text": "hello"},
        receipt={"receipt_id": "ab" * 16, "signature": {}},
        seq=5,
    )
    view = job_view(done)
    assert view["assigned_miner_id"] == "gpu-box-7"
    assert view["result"] == {"text": "hello"}
    assert view["receipt_id"] == "ab" * 16
    assert view["started_at"] == "2023-11-14T22:13:21.500Z"
    assert view["finished_at"] == "2023-11-14T22:13:24.250Z"
    assert view["seq"] == 5
    assert "servable" not in view


def test_job_view_receipt_without_id() -> None:
    """A receipt object lacking receipt_id gives a null receipt_id rather than an error."""
    assert job_view(job(receipt={}))["receipt_id"] is None


@pytest.mark.parametrize("servable", [True, False])
def test_job_view_servable_flag(servable: bool) -> None:
    """servable is present only when the caller knows it (job.submit acks)."""
    assert job_view(job(), servable=servable)["servable"] is servable


def test_job_view_failed_job_error() -> None:
    """A failed job carries its error string."""
    assert job_view(job(state="FAILED", error="oom"))["error"] == "oom"


def test_records_are_frozen() -> None:
    """Records are immutable snapshots."""
    record = job()
    with pytest.raises(AttributeError):  # NamedTuple: immutable like a frozen dataclass
        record.state = "RUNNING"  # type: ignore[misc]
    event = EventRecord(job_id="j", seq=1, event="queued", state="QUEUED", at=T0, attempt=1)
    assert event.data == {}
    assert event.miner_id is None
    miner = MinerRecord(
        miner_id="m",
        key_hash="h",
        session_id=None,
        capabilities={},
        concurrency=1,
        region=None,
        last_seen=T0,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        miner.concurrency = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("ts", "text"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (1.5, "1970-01-01T00:00:01.500Z"),
        (0.0009, "1970-01-01T00:00:00.000Z"),
        (T0, "2023-11-14T22:13:20.000Z"),
        (T0 + 0.123, "2023-11-14T22:13:20.123Z"),
        (T0 + 0.179, "2023-11-14T22:13:20.179Z"),
        (T0 + 0.9994, "2023-11-14T22:13:20.999Z"),
        (T0 + 0.9999996, "2023-11-14T22:13:21.000Z"),
        (1403423653.179, "2014-06-22T07:54:13.179Z"),
    ],
)
def test_iso_time(ts: float, text: str) -> None:
    """iso_time is ISO-8601 UTC with milliseconds (truncated) and a Z suffix."""
    assert iso_time(ts) == text


def test_iso_time_within_and_across_seconds() -> None:
    """Consecutive calls in the same second and then the next second both format correctly."""
    assert [iso_time(T0 + d) for d in (0.001, 0.5, 0.999, 1.0, 0.002)] == [
        "2023-11-14T22:13:20.001Z",
        "2023-11-14T22:13:20.500Z",
        "2023-11-14T22:13:20.999Z",
        "2023-11-14T22:13:21.000Z",
        "2023-11-14T22:13:20.002Z",
    ]


@settings(max_examples=300)
@given(
    ts=st.floats(min_value=0, max_value=4e9)
    | st.integers(0, 4 * 10**12).map(lambda ms: ms / 1000)
    | st.integers(0, 4 * 10**15).map(lambda us: us / 1_000_000)
)
def test_iso_time_matches_datetime(ts: float) -> None:
    """iso_time agrees with datetime's own formatting (microseconds rounded, then truncated)."""
    expected = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    assert iso_time(ts) == expected


def test_contract_constants() -> None:
    """Close codes, error codes and event kinds carry exactly the contract's wire values."""
    assert PROTOCOL_VERSION == 1
    codes = "1000 1001 1003 1007 1009 1011 4000 4002 4401 4403 4408 4409 4429"
    assert {int(c) for c in CloseCode} == {int(c) for c in codes.split()}
    assert ErrorCode.UNKNOWN_TYPE == "unknown_type"
    assert ErrorCode.NOT_ASSIGNED == "not_assigned"
    kinds = "queued assigned started progress requeued completed failed canceled expired"
    assert [str(k) for k in EventKind] == kinds.split()


@pytest.mark.parametrize(
    ("state", "status"),
    [
        ("QUEUED", "reserved"),
        ("RUNNING", "reserved"),
        ("COMPLETED", "released"),
        ("FAILED", "refunded"),
        ("CANCELED", "refunded"),
        ("EXPIRED", "refunded"),
    ],
)
def test_job_view_of_a_paid_job_shows_its_reservation(state: str, status: str) -> None:
    """A billed job shows its payment id, the amount as an 8-place string, and the status
    that its state implies (the ledger moves with the state change)."""
    pay = {"payment_id": "p-1", "account": "client:c", "amount": 150_000_000, "currency": "AITBC"}
    view = job_view(job(state=state, payment=pay))
    assert view["payment_id"] == "p-1"
    assert view["payment_status"] == status
    assert view["payment_amount"] == "1.50000000"


def test_iso_time_cache_is_bounded() -> None:
    """The cache of formatted instants starts over at 4,096; every answer stays right."""
    for i in range(4100):
        ts = T0 + i / 1000
        assert (
            iso_time(ts)
            == datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        )
    assert len(types._iso_texts) <= 4096


@pytest.mark.parametrize(
    ("text", "unix"),
    [
        ("1767139200", 1767139200),
        ("1767139200.5", 1767139200.5),  # time.time() as text
        ("-5", -5),
        ("2026-01-31T00:00:00Z", 1769817600),
        ("2026-01-31T01:00:00+01:00", 1769817600),
        ("2026-01-31T00:00:00", 1769817600),  # no offset: UTC
    ],
)
def test_parse_instant(text: str, unix: float) -> None:
    assert parse_instant(text) == unix


@pytest.mark.parametrize("text", ["yesterday", "", "nan", "inf", "-Infinity", "2026-13-01"])
def test_parse_instant_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError, match="is not Unix seconds or an ISO-8601 time"):
        parse_instant(text)
