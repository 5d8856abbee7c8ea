"""bench/dispatch.py's latency bookkeeping and table (the ceiling reuses both)."""

from __future__ import annotations

import asyncio
from itertools import count
from typing import TYPE_CHECKING, Any

import orjson
import pytest

from bench.dispatch import LeanClient, LeanMiner, Trace, latencies, render
from bench.rawws import parse_frames

if TYPE_CHECKING:
    from collections.abc import Iterator


def test_latencies_map_job_ids_to_submit_ids_or_use_the_submit_id() -> None:
    trace = Trace(
        sent={"s1": 1.000, "s2": 2.000},
        job_of={"job-a": "s1"},  # s2 was never acked: its job id is its submit id (ceiling)
        assigned={"job-a": 1.001, "s2": 2.004},
        completed={"job-a": 1.010},
    )
    assign_ms, complete_ms = latencies(trace)
    assert assign_ms == pytest.approx([1.0, 4.0])
    assert complete_ms == pytest.approx([10.0])


def run(jobs_per_s: float) -> dict[str, float]:
    return {
        "jobs_per_s": jobs_per_s,
        "server_cpu_us_per_job": 100.0,
        "loadgen_cpu_pct": 50.0,
        "assign_p50_ms": 1.0,
        "assign_p99_ms": 2.0,
        "complete_p50_ms": 3.0,
        "complete_p99_ms": 4.0,
    }


def test_render_adds_the_fraction_of_each_ceiling() -> None:
    results = {"100 in flight, 1 miner": [run(2000), run(3000), run(4000)]}
    ceiling = {
        "100 in flight, no persistence": [run(10_000)],
        "100 in flight, group-committed SQLite": [run(6_000)],
        "1 in flight, no persistence (unloaded)": [run(500)],
    }
    text = render(results, ceiling)
    assert "| 100 in flight, 1 miner | 3000 (2000-4000) | 100 (100-100) | 50 (50-50) |" in text
    assert "0.30 x “100 in flight, no persistence”" in text
    assert "0.50 x “100 in flight, group-committed SQLite”" in text
    assert "unloaded”" not in text
    assert "fraction" not in render(results, None)


class FakeTransport:
    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        self.written += data

    def frames(self) -> list[dict[str, Any]]:
        return [orjson.loads(p) for _, p in parse_frames(self.written)]


def server_text(msg: dict[str, Any]) -> bytes:
    payload = orjson.dumps(msg)
    assert len(payload) < 126
    return bytes([0x81, len(payload)]) + payload


UPGRADED = b"HTTP/1.1 101 Switching Protocols\r\n\r\n"


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_lean_client_keeps_inflight_jobs_outstanding_until_done(
    loop: asyncio.AbstractEventLoop,
) -> None:
    trace, done = Trace(), loop.create_future()
    client = LeanClient("ws://127.0.0.1:1/v1/jobs/ws", 3, 2, trace, count(), done)
    transport = FakeTransport()
    client.connection_made(transport)  # type: ignore[arg-type]
    assert transport.written.startswith(b"GET /v1/jobs/ws HTTP/1.1\r\n")
    transport.written.clear()
    client.data_received(UPGRADED)
    assert transport.frames() == [{"type": "hello", "protocol": 1}]
    client.data_received(server_text({"type": "welcome", "protocol": 1}))
    submits = transport.frames()
    assert [m["id"] for m in submits] == ["s0", "s1"]
    assert submits[0]["constraints"] == {"gpu": "A100"}
    client.data_received(server_text({"type": "ack", "id": "s0", "job": {"job_id": "j0"}}))
    assert trace.job_of == {"j0": "s0"}
    transport.written.clear()
    client.data_received(server_text({"type": "job.event", "job_id": "j0", "event": "completed"}))
    assert [m["id"] for m in transport.frames()] == ["s2"]
    client.data_received(server_text({"type": "job.event", "job_id": "s1", "event": "started"}))
    client.data_received(server_text({"type": "job.event", "job_id": "s1", "event": "completed"}))
    assert not done.done()
    client.data_received(server_text({"type": "job.event", "job_id": "s2", "event": "completed"}))
    assert done.done()
    assert set(trace.completed) == {"j0", "s1", "s2"}


@pytest.mark.parametrize("accept", [True, False])
def test_lean_miner_answers_each_assign_at_once(
    loop: asyncio.AbstractEventLoop, accept: bool
) -> None:
    trace, ready = Trace(), loop.create_future()
    miner = LeanMiner("ws://127.0.0.1:1/v1/miners/ws", 7, 100, trace, ready, accept)
    transport = FakeTransport()
    miner.connection_made(transport)  # type: ignore[arg-type]
    transport.written.clear()
    miner.data_received(UPGRADED)
    (hello,) = transport.frames()
    assert hello["miner_id"] == "bench-7"
    assert hello["concurrency"] == 100
    miner.data_received(server_text({"type": "welcome", "protocol": 1}))
    assert ready.done()
    miner.data_received(server_text({"type": "job.assign", "job_id": "j1", "attempt": 2}))
    kinds = [(m["type"], m["job_id"], m["attempt"]) for m in transport.frames()]
    expected = [("job.result", "j1", 2)]
    assert kinds == ([("job.accept", "j1", 2), *expected] if accept else expected)
    assert "j1" in trace.assigned


def test_lean_client_fails_fast_on_an_error_or_a_lost_socket(
    loop: asyncio.AbstractEventLoop,
) -> None:
    done = loop.create_future()
    client = LeanClient("ws://127.0.0.1:1/v1/jobs/ws", 1, 1, Trace(), count(), done)
    client.connection_made(FakeTransport())  # type: ignore[arg-type]
    client.data_received(UPGRADED + server_text({"type": "error", "code": "x"}))
    with pytest.raises(RuntimeError, match="client got"):
        done.result()
    lost = loop.create_future()
    client = LeanClient("ws://127.0.0.1:1/v1/jobs/ws", 1, 1, Trace(), count(), lost)
    client.connection_made(FakeTransport())  # type: ignore[arg-type]
    client.connection_lost(None)
    with pytest.raises(RuntimeError, match="closed before"):
        lost.result()
