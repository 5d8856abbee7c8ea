"""Ring 2: the ops feed's queue summary, kept up to date per event (web/ops_feed.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from hypothesis import given, settings, strategies as st

from dispatcher.fanout import Outbox
from protocol.records import EventRecord, JobRecord
from tests.conftest import ADMIN_KEY
from tests.fakes import FakeClock, RecordingOutbox, RecordingStore
from tests.web.rest_harness import miner_headers, running_api
from web import ops_feed
from web.ops_feed import LOAD_FIGURES, RECENT_BYTES, RECENT_EVENTS, OpsFeed, load_figures

CONSTRAINTS = [{"gpu": "A100"}, {"gpu": "H100", "region": "eu"}, {"gpu": "none"}]
# model state -> {event kind: state after it}; "new" is a job not submitted yet
MOVES: dict[str, dict[str, str]] = {
    "new": {"queued": "QUEUED"},
    "QUEUED": {"assigned": "RUNNING", "canceled": "CANCELED", "expired": "EXPIRED"},
    "RUNNING": {
        "started": "RUNNING",
        "progress": "RUNNING",
        "requeued": "QUEUED",
        "completed": "COMPLETED",
        "failed": "FAILED",
        "canceled": "CANCELED",
        "expired": "EXPIRED",
    },
}
if TYPE_CHECKING:
    from pathlib import Path

KINDS = sorted({kind for moves in MOVES.values() for kind in moves})


def summary_by_walking(feed: OpsFeed) -> dict[str, Any]:
    """The summary as a walk over every active job computes it (the definition)."""
    queued = assigned = running = 0
    groups: dict[bytes, list[Any]] = {}
    for entry in feed.active.values():
        if entry.state == "QUEUED":
            queued += 1
            groups.setdefault(entry.key, [entry.constraints, 0])[1] += 1
        elif entry.started:
            running += 1
        else:
            assigned += 1
    unservable = sorted(
        ({"constraints": c, "count": n} for c, n in groups.values() if c["gpu"] == "none"),
        key=lambda u: -int(u["count"]),
    )
    return {
        "queued": queued,
        "assigned": assigned,
        "running": running,
        "unservable": sum(u["count"] for u in unservable),
        "unservable_groups": unservable,
    }


def make_feed() -> OpsFeed:
    scheduler = SimpleNamespace(jobs={}, is_servable=lambda c: c["gpu"] != "none")
    dispatcher = SimpleNamespace(watchers=[], scheduler=scheduler, clock=FakeClock())
    return OpsFeed(SimpleNamespace(dispatcher=dispatcher))  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.sampled_from(KINDS), st.booleans()), max_size=80))
def test_queue_summary_kept_per_event_equals_a_walk_over_every_active_job(
    steps: list[tuple[int, str, bool]],
) -> None:
    feed = make_feed()
    model: dict[int, str] = {}
    attempts: dict[int, int] = {}
    for n, kind, look in steps:
        state = MOVES.get(model.get(n, "new"), {}).get(kind)
        if state is None:
            continue  # not a move the scheduler makes from this job's state
        model[n] = state
        if kind == "assigned":
            attempts[n] = attempts.get(n, 0) + 1
        job = JobRecord(
            job_id=f"j{n}",
            client_id="c",
            state=state,
            payload={},
            constraints=CONSTRAINTS[n % 3],
            priority=0,
            requested_at=0.0,
            expires_at=900.0,
            attempt=attempts.get(n, 0),
            failures=0,
            max_attempts=3,
            seq=1,
        )
        miner = None if state == "QUEUED" else "m1"
        event = EventRecord(f"j{n}", 1, kind, state, 1.0, attempts.get(n, 0), miner, {})
        feed.on_event(job, event, "{}")
        if look:  # the summary is asked for at any moment, as the clock and watchers do
            assert feed._queue() == summary_by_walking(feed)
    assert feed._queue() == summary_by_walking(feed)


def test_recent_events_for_new_watchers_are_bounded_in_bytes() -> None:
    """The events replayed to a new watcher were the last 200 frames, whole: 200 completed
    events of 1 MiB results held 200 MiB. Now also at most RECENT_BYTES of them (the newest
    kept in any case), and still at most RECENT_EVENTS."""
    feed = make_feed()
    job = JobRecord("j1", "c", "COMPLETED", {}, {}, 0, 0.0, 900.0, 1, 0, 3, 4)
    event = EventRecord("j1", 4, "completed", "COMPLETED", 1.0, 1, "m1", {})
    big = "r" * (1 << 20)
    for n in range(20):
        feed.on_event(job, event, big + str(n))
    assert sum(map(len, feed.recent)) <= RECENT_BYTES
    assert list(feed.recent)[-1] == big + "19"
    feed.on_event(job, event, "x" * (RECENT_BYTES + 1))
    assert len(feed.recent) == 1
    for n in range(RECENT_EVENTS + 5):
        feed.on_event(job, event, str(n))
    assert list(feed.recent) == [str(n) for n in range(5, RECENT_EVENTS + 5)]


def test_load_figures_keep_only_finite_numbers_one_level_deep() -> None:
    report = {
        "gpu": {"util": 0.7312345, "name": "A100", "deep": {"x": 1}},
        "temp_c": 61,
        "ok": True,
        "nan": float("nan"),
        "inf": float("inf"),
        "list": [1, 2],
        "inflight": 3,
        "x" * 40: 1.5,
    }
    assert load_figures(report, skip=frozenset({"inflight"})) == {
        "gpu.util": 0.7312,
        "temp_c": 61.0,
        "x" * 32: 1.5,
    }
    many = {f"k{i:02d}": i for i in range(20)}
    assert list(load_figures(many)) == [f"k{i:02d}" for i in range(LOAD_FIGURES)]
    assert load_figures("busy") == {}
    assert load_figures(None) == {}


@pytest.mark.anyio
async def test_rest_heartbeat_numbers_reach_the_miners_row_in_the_next_delta(
    tmp_path: Path,
) -> None:
    """A REST heartbeat's numbers (``metadata``'s too; not ``inflight``) are the miner's load
    figures: its row changes, so the next delta sends it; the same figures again send
    nothing, and a gone miner's figures are forgotten even while nobody watches."""
    clock = FakeClock()
    async with running_api(tmp_path, clock) as api:
        assert (await api.register("m1")).status_code == 200
        ops = api.core.ops
        ops._delta(clock.now())
        clock.advance(5)
        body = {"status": "active", "inflight": 3, "current_jobs": 1, "metadata": {"util": 0.5}}
        r = await api.http.post("/v1/miners/heartbeat", json=body, headers=miner_headers("m1"))
        assert r.status_code == 200
        delta = ops._delta(clock.now())
        [row] = delta["miners"]
        assert row["load"] == {"current_jobs": 1.0, "metadata.util": 0.5}
        clock.advance(5)
        await api.http.post("/v1/miners/heartbeat", json=body, headers=miner_headers("m1"))
        assert "miners" not in ops._delta(clock.now())  # the same figures: not sent again
        body["metadata"] = {"util": 0.9}
        await api.http.post("/v1/miners/heartbeat", json=body, headers=miner_headers("m1"))
        assert ops._delta(clock.now())["miners"][0]["load"]["metadata.util"] == 0.9
        assert not ops.watchers
        await api.http.delete("/v1/miners/m1", headers=miner_headers("m1"))
        ops.tick(clock.now())
        assert "m1" not in ops._load


@pytest.mark.anyio
async def test_gpu_memory_summing_past_64_bits_is_shown_capped_not_fatal(tmp_path: Path) -> None:
    """GPU ``memory_mb`` values each within 64 bits but summing past them made the miner's row
    unwritable (orjson writes no wider int): GET /v1/admin/ops answered 500, and with the ops
    page open the feed's next delta raised in its task, which stopped the coordinator; any
    miner key could (found by the REST hunt). A row's ``vram_mb`` now adds the non-negative
    integers, capped at 2**53 - 1 (what the page's JavaScript reads exactly)."""
    clock = FakeClock()
    async with running_api(tmp_path, clock) as api:
        ops = api.core.ops
        watcher = RecordingOutbox()
        ops.add(watcher)
        wide = [{"name": "a", "memory_mb": 2**64 - 1}] * 2 + [{"name": "b", "memory_mb": -(2**63)}]
        assert (await api.register("m1", capabilities={"gpus": wide})).status_code == 200
        assert (await api.register("m2", capabilities={"gpus": wide[2:]})).status_code == 200
        clock.advance(1)
        ops.tick(clock.now())
        await api.core.dispatcher.barrier()  # a delta is sent once what it shows is durable
        [delta] = [f for _, f in watcher.log if f["type"] == "ops.delta"]
        assert {m["miner_id"]: m["vram_mb"] for m in delta["miners"]} == {"m1": 2**53 - 1, "m2": 0}
        r = await api.http.get("/v1/admin/ops", headers={"X-Api-Key": ADMIN_KEY})
        assert r.status_code == 200, r.text
        assert not api.core.failed


@pytest.mark.anyio
async def test_a_rows_gpu_names_and_models_are_bounded(tmp_path: Path) -> None:
    """A miner's row carried its GPU names and models whole: 4 GPUs named with 200,000
    characters and 2 models of 100,000 made a 1 MB row, sent to every watcher with each of its
    job events (found by the ops hunt). A row shows the first 16 of each, cut to 64
    characters; matching still reads them whole."""
    async with running_api(tmp_path, FakeClock()) as api:
        caps = {
            "gpus": [{"name": "G" * 20_000, "memory_mb": 1}] * 20,
            "models": ["x" * 10_000] * 40,
        }
        assert (await api.register("m1", capabilities=caps)).status_code == 200
        r = await api.http.get("/v1/admin/ops", headers={"X-Api-Key": ADMIN_KEY})
        [row] = r.json()["miners"]
        assert row["gpus"] == ["G" * 64] * 16
        assert row["models"] == ["x" * 64] * 16
        assert row["vram_mb"] == 20
        assert len(r.content) < 10_000


@pytest.mark.anyio
async def test_miners_gone_before_a_watcher_opens_are_forgotten(tmp_path: Path) -> None:
    """Miners come and go, and so do ops pages: a miner gone just before the first watcher
    opens leaves nothing behind. That watcher took the pending miner changes without looking
    at them, so the last activity and load figures of each such miner stayed for good."""
    clock = FakeClock()
    async with running_api(tmp_path, clock) as api:
        ops = api.core.ops
        ops.stop()  # ticks only when this test says so
        for i in range(10):
            miner_id = f"m{i}"
            assert (await api.register(miner_id)).status_code == 200
            body = {"status": "active", "metadata": {"util": 0.5}}
            await api.http.post("/v1/miners/heartbeat", json=body, headers=miner_headers(miner_id))
            watcher = Outbox(lambda code, reason: None)
            ops.add(watcher)
            clock.advance(1)
            ops.tick(clock.now())  # its row is sent: last activity and load are kept for it
            ops.discard(watcher)
            await api.http.delete(f"/v1/miners/{miner_id}", headers=miner_headers(miner_id))
            later = Outbox(lambda code, reason: None)
            ops.add(later)  # before the next tick
            ops.discard(later)
            ops.tick(clock.now())
        assert (ops._seen, ops._load, ops._sent_miners) == ({}, {}, {})


@pytest.mark.anyio
async def test_ops_watchers_see_a_miner_once_its_registration_is_committed(
    tmp_path: Path,
) -> None:
    """The miner rows are the scheduler's, which runs ahead of the store: a delta built while
    a registration was being committed, and a new watcher's snapshot, showed the miner at once
    (a failed commit then stops the coordinator, and that miner never existed). Both are built
    at once and sent once that commit is done; the snapshot still comes first."""
    store = RecordingStore()
    clock = FakeClock()
    async with running_api(tmp_path, clock, store=store) as api:
        ops = api.core.ops
        ops.stop()  # ticks only when this test says so
        watcher = RecordingOutbox(name="watcher")
        ops.add(watcher)
        ops.tick(clock.now())
        await api.core.dispatcher.barrier()
        log = watcher.log
        log.clear()
        store.block_commits()
        async with anyio.create_task_group() as tg:
            tg.start_soon(api.register, "m1")
            await api.settle()
            clock.advance(0.25)
            ops.tick(clock.now())
            later = RecordingOutbox(log, name="later")
            ops.add(later)
            clock.advance(0.25)
            ops.tick(clock.now())
            await api.settle()
            assert log == []
            store.release_commits()
        await api.core.dispatcher.barrier()
        frames = [(name, f) for name, f in log if f["type"] != "job.event"]
        kinds = [(name, f["type"]) for name, f in frames]
        # The tick after a watcher's arrival sends the queue and counters again (to everyone).
        assert kinds[:2] == [("watcher", "ops.delta"), ("later", "snapshot")]
        assert sorted(kinds[2:]) == [("later", "ops.delta"), ("watcher", "ops.delta")]
        (_, delta), (_, snapshot) = frames[:2]
        assert [m["miner_id"] for m in delta["miners"]] == ["m1"]
        assert [m["miner_id"] for m in snapshot["miners"]] == ["m1"]
        assert all("miners" not in f for _, f in frames[2:])


@pytest.mark.anyio
async def test_counts_of_gone_miners_are_kept_for_the_latest_few_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A miner's completed/failed counts were kept for every miner id ever seen, so short-lived
    miner ids (a container each) grew the feed without bound. A gone miner's counts are kept
    for its return, for the latest GONE_COUNTS gone miners only."""
    monkeypatch.setattr(ops_feed, "GONE_COUNTS", 3)
    clock = FakeClock()
    async with running_api(tmp_path, clock) as api:
        ops = api.core.ops
        ops.stop()  # ticks only when this test says so
        for i in range(10):
            miner_id = f"m{i}"
            assert (await api.register(miner_id)).status_code == 200
            job = await api.submit()
            assert (await api.poll(miner_id)).status_code == 200
            assert (await api.result(job["job_id"], miner_id)).status_code == 200
            r = await api.http.delete(f"/v1/miners/{miner_id}", headers=miner_headers(miner_id))
            assert r.status_code == 200, r.text
            clock.advance(1)
            ops.tick(clock.now())
        assert sorted(ops._done) == ["m7", "m8", "m9"]
        for miner_id in ("m0", "m9"):  # one forgotten, one back in time
            assert (await api.register(miner_id)).status_code == 200
        clock.advance(1)
        ops.tick(clock.now())
        rows = {m["miner_id"]: m["completed"] for m in ops.snapshot()["miners"]}
        assert rows == {"m0": 0, "m9": 1}
        for i in range(4, 8):  # m9 is back: not among the gone ones to forget
            assert (await api.register(f"n{i}")).status_code == 200
            job = await api.submit()
            assert (await api.poll(f"n{i}")).status_code == 200
            assert (await api.result(job["job_id"], f"n{i}")).status_code == 200
            await api.http.delete(f"/v1/miners/n{i}", headers=miner_headers(f"n{i}"))
            clock.advance(1)
            ops.tick(clock.now())
        assert sorted(ops._done) == ["m9", "n5", "n6", "n7"]


@pytest.mark.anyio
async def test_a_rest_miners_calls_move_its_last_seen_every_30_seconds(tmp_path: Path) -> None:
    """A row's last_seen moved only with job events: an idle miner heartbeating for hours
    looked long gone. Its calls move it too, once what was shown is SEEN_STEP old, so idle
    miners cost a row each per SEEN_STEP, not one per heartbeat; a snapshot agrees."""
    clock = FakeClock()
    async with running_api(tmp_path, clock) as api:
        ops = api.core.ops
        ops.stop()  # ticks only when this test says so
        assert (await api.register("m1")).status_code == 200
        r = await api.http.post("/v1/miners/heartbeat", json={}, headers=miner_headers("m1"))
        assert r.status_code == 200, r.text  # its load figures: none
        watcher = RecordingOutbox()
        ops.add(watcher)
        await api.core.dispatcher.barrier()  # snapshots and deltas follow commits
        [snapshot] = [f for _, f in watcher.log if f["type"] == "snapshot"]
        first = snapshot["miners"][0]["last_seen"]

        async def heartbeat_then_rows() -> list[dict[str, Any]]:
            watcher.log.clear()
            r = await api.http.post("/v1/miners/heartbeat", json={}, headers=miner_headers("m1"))
            assert r.status_code == 200, r.text
            clock.advance(1)
            ops.tick(clock.now())
            await api.core.dispatcher.barrier()
            return [
                m for _, f in watcher.log if f["type"] == "ops.delta" for m in f.get("miners", [])
            ]

        clock.advance(10)
        assert await heartbeat_then_rows() == []  # 10 s after what was shown: not yet
        clock.advance(ops_feed.SEEN_STEP)
        [row] = await heartbeat_then_rows()
        assert row["last_seen"] > first
        assert row == ops.snapshot()["miners"][0]
        ops.discard(watcher)


@pytest.mark.anyio
async def test_a_streaming_miners_row_is_not_sent_at_every_tick(tmp_path: Path) -> None:
    """Each progress event moved its miner's last_seen, so the row of every miner streaming
    tokens was sent again at every tick (4 a second each) with nothing else changed. Progress
    moves it as heartbeats do: once the time shown is SEEN_STEP old."""
    clock = FakeClock()
    async with running_api(tmp_path, clock) as api:
        ops = api.core.ops
        ops.stop()  # ticks only when this test says so
        assert (await api.register("m1")).status_code == 200
        job = await api.submit()
        assert (await api.poll("m1")).status_code == 200
        watcher = RecordingOutbox()
        ops.add(watcher)
        ops.tick(clock.now())
        await api.core.dispatcher.barrier()  # snapshots and deltas follow commits

        async def stream_then_rows() -> list[dict[str, Any]]:
            watcher.log.clear()
            api.core.dispatcher.miner_call("progress", "m1", job["job_id"], output="tok ")
            await api.core.dispatcher.barrier()
            clock.advance(0.25)
            ops.tick(clock.now())
            await api.core.dispatcher.barrier()
            deltas = [f for _, f in watcher.log if f["type"] == "ops.delta"]
            return [m for f in deltas for m in f.get("miners", [])]

        for _ in range(4):
            clock.advance(1)
            assert await stream_then_rows() == []
        clock.advance(ops_feed.SEEN_STEP)
        [row] = await stream_then_rows()
        assert row == ops.snapshot()["miners"][0]
        ops.discard(watcher)


@pytest.mark.anyio
async def test_a_retryable_failure_counts_against_the_miner_that_failed(tmp_path: Path) -> None:
    """A retryable failure queues the job again: its requeued event names no miner, so the
    failing miner's row counted nothing, and a miner failing every job retryably showed no
    failures at all (success rate: none, or 100 % beside its few completions)."""
    async with running_api(tmp_path) as api:
        ops = api.core.ops
        assert (await api.register("m1")).status_code == 200
        job = await api.submit()
        assert (await api.poll("m1")).status_code == 200
        body = {"error_code": "OOM", "error_message": "out of memory", "retryable": True}
        r = await api.http.post(
            f"/v1/miners/{job['job_id']}/fail", json=body, headers=miner_headers("m1")
        )
        assert r.status_code == 200, r.text
        assert (await api.job(job["job_id"]))["state"] == "QUEUED"
        admin = {"X-Api-Key": ADMIN_KEY}
        r = await api.http.post(f"/v1/admin/jobs/{job['job_id']}/cancel", headers=admin)
        assert r.status_code == 200, r.text  # an operator's requeue or cancel is no failure
        [row] = ops.snapshot()["miners"]
        assert (row["completed"], row["failed"], row["success_rate"]) == (0, 1, 0.0)


@pytest.mark.anyio
async def test_an_idle_coordinator_still_sends_a_delta_every_second(tmp_path: Path) -> None:
    """The page takes 5 s without a frame for a dead link (docs/ops.md): with nothing
    changing, each second's chart point still makes a delta, and only that."""
    clock = FakeClock()
    async with running_api(tmp_path, clock) as api:
        ops = api.core.ops
        ops.stop()  # ticks only when this test says so
        watcher = RecordingOutbox()
        ops.add(watcher)
        ops.tick(clock.now())
        await api.core.dispatcher.barrier()
        for _ in range(5):
            watcher.log.clear()
            for _ in range(4):
                clock.advance(ops_feed.TICK)
                ops.tick(clock.now())
            await api.core.dispatcher.barrier()
            [delta] = [f for _, f in watcher.log]
            assert delta["type"] == "ops.delta"
            assert set(delta) == {"type", "at", "points"}
        ops.discard(watcher)


@pytest.mark.anyio
async def test_a_failure_coded_like_a_coordinators_reason_still_counts_for_its_miner(
    tmp_path: Path,
) -> None:
    """A retryable failure with the code "rejected" (a model's content filter, say) made a
    requeued event whose reason read like a miner's reject: the miner's row counted no failure
    and /metrics counted a reject. The event names the error code; the failure counts."""
    async with running_api(tmp_path) as api:
        assert (await api.register("m1")).status_code == 200
        job = await api.submit()
        assert (await api.poll("m1")).status_code == 200
        body = {"error_code": "rejected", "error_message": "content filter", "retryable": True}
        r = await api.http.post(
            f"/v1/miners/{job['job_id']}/fail", json=body, headers=miner_headers("m1")
        )
        assert r.status_code == 200, r.text
        [row] = api.core.ops.snapshot()["miners"]
        assert (row["completed"], row["failed"]) == (0, 1)
        assert dict(api.core.dispatcher.tally.requeues) == {"retryable_failure": 1}
        r = await api.http.get(f"/v1/admin/jobs/{job['job_id']}", headers={"X-Api-Key": ADMIN_KEY})
        assert r.json()["events"][-1]["data"] == {
            "reason": "rejected: content filter",
            "error_code": "rejected",
        }


def test_a_miner_reconnecting_before_it_accepted_is_no_failure_of_its_own() -> None:
    """A miner whose socket is replaced before it accepted its job has the job queued again
    ("miner reconnected before accepting", not charged): that was counted as the miner's
    failure on its row (and as a retryable failure in /metrics)."""
    feed = make_feed()

    def event(kind: str, state: str, miner: str | None, data: dict[str, Any]) -> None:
        job = JobRecord(
            job_id="j1",
            client_id="c",
            state=state,
            payload={},
            constraints={},
            priority=0,
            requested_at=0.0,
            expires_at=900.0,
            attempt=1,
            failures=0,
            max_attempts=3,
            seq=1,
        )
        feed.on_event(job, EventRecord("j1", 1, kind, state, 1.0, 1, miner, data), "{}")

    event("queued", "QUEUED", None, {})
    event("assigned", "RUNNING", "m1", {})
    event("requeued", "QUEUED", None, {"reason": "miner reconnected before accepting"})
    assert feed._done.get("m1", [0, 0]) == [0, 0]
