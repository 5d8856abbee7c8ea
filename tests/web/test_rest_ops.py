"""Admin ops routes (drill-down, actions, snapshot), /metrics and the /ops page, in process."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dispatcher.fanout import Outbox
from protocol.receipt_verify import TrustedKey
from protocol.receipts import key_id_for, load_signing_key
from tests.conftest import ADMIN_KEY, CLIENT_KEY, MINER_KEY
from tests.fakes import FakeClock
from tests.web.rest_harness import Api, miner_headers, running_api

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

pytestmark = pytest.mark.anyio
ADMIN = {"X-Api-Key": ADMIN_KEY}
CLIENT = {"X-Api-Key": CLIENT_KEY}
OLD_SEED = "22" * 32  # the signing key before a rotation


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async with running_api(tmp_path) as a:
        yield a


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, keyed by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


async def test_job_detail_has_events_and_a_verified_receipt(api: Api) -> None:
    """GET /v1/admin/jobs/{id}: any client's job, its stored events, receipt 'valid'."""
    await api.register("m1")
    job = await api.submit()
    assert (await api.poll("m1")).status_code == 200
    assert (await api.result(job["job_id"])).status_code == 200
    detail = await api.admin(f"/v1/admin/jobs/{job['job_id']}")
    assert detail["job"]["state"] == "COMPLETED"
    assert detail["client_id"].startswith("client-")
    assert [e["event"] for e in detail["events"]] == ["queued", "assigned", "started", "completed"]
    assert detail["receipt_check"] == {"status": "valid", "problems": []}
    assert detail["receipt"]["job_id"] == job["job_id"]


async def test_job_detail_pages_through_a_log_longer_than_one_answer(api: Api) -> None:
    """A streamed job's log can outgrow one answer (10,000 events): the answer says where the
    next page starts (next_after, a subscribe's after), and ?after&limit page through the
    rest. The view stopped at the 10,000th event silently: the job's end was never shown."""
    await api.register("m1")
    job = await api.submit()
    assert (await api.poll("m1")).status_code == 200
    for _ in range(10_000):
        api.core.dispatcher.miner_call("progress", "m1", job["job_id"], output="tok ")
    assert (await api.result(job["job_id"])).status_code == 200
    at = f"/v1/admin/jobs/{job['job_id']}"
    first = await api.admin(at)
    assert (len(first["events"]), first["next_after"]) == (10_000, 10_000)
    rest = await api.admin(f"{at}?after=10000")
    assert [e["seq"] for e in rest["events"]] == [10_001, 10_002, 10_003, 10_004]
    assert (rest["events"][-1]["event"], rest["next_after"]) == ("completed", None)
    page = await api.admin(f"{at}?after=1&limit=2")
    assert ([e["seq"] for e in page["events"]], page["next_after"]) == ([2, 3], 3)
    assert (await api.admin(f"{at}?after=10004"))["events"] == []
    for bad in ("after=-1", "limit=0", "limit=10001", "after=x"):
        r = await api.http.get(f"{at}?{bad}", headers=ADMIN)
        assert r.status_code == 422, bad


async def test_job_detail_checks_receipts_against_every_published_key(tmp_path: Path) -> None:
    """After a key rotation (docs/receipts.md), receipts signed with the previous key are
    'valid' in the drill-down as they are at /v1/receipts/verify; it checked the current key
    only and called every older receipt invalid (found by a hunt)."""
    async with running_api(tmp_path, receipt_signing_key_hex=OLD_SEED) as api:
        await api.register("m1")
        job = await api.submit()
        assert (await api.poll("m1")).status_code == 200
        assert (await api.result(job["job_id"])).status_code == 200
    old = load_signing_key(OLD_SEED).public_key()
    until = int(time.time()) + 1
    previous = (TrustedKey(key_id=key_id_for(old), valid_until=until),)
    async with running_api(tmp_path, receipt_previous_keys=previous) as api:
        detail = await api.admin(f"/v1/admin/jobs/{job['job_id']}")
        assert detail["receipt_check"] == {"status": "valid", "problems": []}
        r = await api.http.post("/v1/receipts/verify", json=detail["receipt"])
        assert r.json()["valid"] is True


async def test_job_detail_flags_a_tampered_receipt_and_unknown_jobs(api: Api) -> None:
    """A receipt that no longer matches its signature is 'invalid'; unknown job -> 404."""
    await api.register("m1")
    job = await api.submit()
    await api.poll("m1")
    await api.result(job["job_id"])
    d = api.core.dispatcher
    rec = d._visible[job["job_id"]]
    d._visible[job["job_id"]] = rec._replace(receipt={**rec.receipt, "units": 999})
    detail = await api.admin(f"/v1/admin/jobs/{job['job_id']}")
    assert detail["receipt_check"]["status"] == "invalid"
    assert detail["receipt_check"]["problems"]
    pending = await api.submit()
    assert (await api.admin(f"/v1/admin/jobs/{pending['job_id']}"))["receipt_check"] == {
        "status": "none",
        "problems": [],
    }
    r = await api.http.get("/v1/admin/jobs/" + "0" * 32, headers=ADMIN)
    assert (r.status_code, r.json()) == (404, {"detail": f"job {'0' * 32} not found"})


async def test_cancel_and_requeue_actions(api: Api) -> None:
    """Admin cancel ends any client's job; requeue needs RUNNING (409 otherwise)."""
    await api.register("m1")
    running = await api.submit()
    await api.poll("m1")
    r = await api.http.post(f"/v1/admin/jobs/{running['job_id']}/requeue", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["job"]["state"] == "QUEUED"  # m1 is not offered it again
    r = await api.http.post(f"/v1/admin/jobs/{running['job_id']}/requeue", headers=ADMIN)
    assert r.status_code == 409
    r = await api.http.post(f"/v1/admin/jobs/{running['job_id']}/cancel", headers=ADMIN)
    assert (r.status_code, r.json()["job"]["state"]) == (200, "CANCELED")
    assert (await api.job(running["job_id"]))["state"] == "CANCELED"
    r = await api.http.post(f"/v1/admin/jobs/{running['job_id']}/cancel", headers=ADMIN)
    assert r.status_code == 409
    r = await api.http.post("/v1/admin/jobs/nope/cancel", headers=ADMIN)
    assert r.status_code == 404
    r = await api.http.post(
        f"/v1/admin/jobs/{running['job_id']}/cancel", headers={"X-Api-Key": CLIENT_KEY}
    )
    assert r.status_code == 403


async def test_drain_and_disconnect_miner(api: Api) -> None:
    """Drain stops offers (and undrain resumes them); disconnect forgets an idle miner."""
    await api.register("m1")
    r = await api.http.post("/v1/admin/miners/m1/drain", headers=ADMIN)
    assert r.json() == {"miner_id": "m1", "status": "draining"}
    await api.submit()
    assert (await api.poll("m1", max_wait=1)).status_code == 204
    r = await api.http.post("/v1/admin/miners/m1/drain", json={"draining": False}, headers=ADMIN)
    assert r.json() == {"miner_id": "m1", "status": "active"}
    assert (await api.poll("m1")).status_code == 200
    r = await api.http.post("/v1/admin/miners/m9/drain", headers=ADMIN)
    assert r.status_code == 404
    r = await api.http.post("/v1/admin/miners/m1/drain", json={"draining": 1}, headers=ADMIN)
    assert r.status_code == 422
    r = await api.http.post("/v1/admin/miners/m1/disconnect", headers=ADMIN)
    assert r.json() == {"miner_id": "m1", "status": "disconnected"}
    r = await api.http.post("/v1/admin/miners/m1/disconnect", headers=ADMIN)
    assert r.status_code == 404


async def test_a_null_draining_is_the_default(api: Api) -> None:
    """The schema reads an optional field's null as not given (upstream clients send nulls),
    so {"draining": null} is a drain, as {} is; it resumed the miner (bool(None))."""
    await api.register("m1")
    for body in ({}, {"draining": None}):
        r = await api.http.post("/v1/admin/miners/m1/drain", json=body, headers=ADMIN)
        assert r.json() == {"miner_id": "m1", "status": "draining"}, body


async def test_drain_and_disconnect_reach_a_miner_id_with_a_slash(api: Api) -> None:
    """The ops page sends "rack-2/gpu-1" as encodeURIComponent does ("%2F"); the server
    decodes it before routing, so "{miner_id}" (which stops at "/") answered 404."""
    await api.register("rack-2/gpu-1")
    r = await api.http.post("/v1/admin/miners/rack-2%2Fgpu-1/drain", headers=ADMIN)
    assert r.json() == {"miner_id": "rack-2/gpu-1", "status": "draining"}
    r = await api.http.post("/v1/admin/miners/rack-2/gpu-1/disconnect", headers=ADMIN)
    assert r.json() == {"miner_id": "rack-2/gpu-1", "status": "disconnected"}


async def test_snapshot_shows_miners_queue_and_unservable(api: Api) -> None:
    """GET /v1/admin/ops: miner rows, queue counts and the 'no miner can serve' groups."""
    await api.register("m1", capabilities={"gpus": [{"name": "A100", "memory_mb": 40960}]})
    await api.submit(constraints={"gpu": "H200"})
    await api.submit(constraints={"gpu": "H200"})
    await api.submit()
    await api.poll("m1")
    snap = await api.admin("/v1/admin/ops")
    (row,) = snap["miners"]
    assert row["miner_id"] == "m1"
    assert (row["gpus"], row["vram_mb"], row["slots_used"], row["state"]) == (
        ["A100"],
        40960,
        1,
        "busy",
    )
    assert snap["queue"]["queued"] == 2
    assert snap["queue"]["running"] == 1
    assert snap["queue"]["unservable"] == 2
    assert snap["queue"]["unservable_groups"] == [{"constraints": {"gpu": "H200"}, "count": 2}]


async def test_feed_deltas_carry_only_changes(api: Api) -> None:
    """A watcher gets the snapshot, then one ops.delta per tick with what changed."""
    feed = api.core.ops
    feed.stop()  # this test is the clock
    frames: list[Any] = []

    class Sink:
        dropped = 0  # an Outbox's drop count: this one keeps every frame

        def put(self, frame: str, **_: Any) -> None:
            frames.append(orjson.loads(frame))

    sink: Any = Sink()
    committed = api.core.dispatcher.barrier  # frames are sent once what they show is durable
    feed.add(sink)
    await committed()
    assert frames[0]["type"] == "snapshot"
    feed.tick(1000.0)  # the first delta brings the feed's own baseline
    await committed()
    frames.clear()
    feed.tick(1000.1)
    await committed()
    assert frames == []  # nothing changed
    await api.register("m1")
    job = await api.submit()
    feed.tick(1000.5)
    await committed()
    assert [f["type"] for f in frames] == ["job.event", "ops.delta"]
    delta = frames[-1]
    assert [m["miner_id"] for m in delta["miners"]] == ["m1"]
    assert delta["queue"]["queued"] == 1
    assert "points" not in delta
    frames.clear()
    await api.poll("m1")
    await api.result(job["job_id"])
    feed.tick(1001.0)
    await committed()
    events = [f["event"] for f in frames if f["type"] == "job.event"]
    assert events == ["assigned", "started", "completed"]
    delta = frames[-1]
    assert delta["miners"][0]["completed"] == 1
    assert delta["miners"][0]["success_rate"] == 1.0
    (point,) = delta["points"]
    assert point["completed_per_s"] == 1.0
    assert point["dispatch_p50_ms"] is not None
    frames.clear()
    await api.http.post("/v1/admin/miners/m1/disconnect", headers=ADMIN)
    feed.tick(1001.25)
    await committed()
    assert frames[-1]["removed"] == ["m1"]
    feed.discard(sink)


class Watcher:
    """An ops watcher (an Outbox's ``put``) that applies every frame as the page does."""

    dropped = 0  # an Outbox's drop count: this one keeps every frame

    def __init__(self) -> None:
        self.miners: dict[str, Any] = {}
        self.queue: dict[str, Any] = {}
        self.counters: dict[str, Any] = {}

    def put(self, frame: str, **_: Any) -> None:
        f = orjson.loads(frame)
        if f["type"] in ("snapshot", "ops.delta"):
            self.miners.update({m["miner_id"]: m for m in f.get("miners", [])})
            for gone in f.get("removed", []):
                self.miners.pop(gone, None)
            self.queue = f.get("queue", self.queue)
            self.counters = f.get("counters", self.counters)

    def check(self, snapshot: dict[str, Any]) -> None:
        assert self.miners == {m["miner_id"]: m for m in snapshot["miners"]}
        assert self.queue == snapshot["queue"]
        assert self.counters == snapshot["counters"]


async def test_a_watcher_that_applies_every_delta_sees_what_a_fresh_snapshot_shows(
    api: Api,
) -> None:
    """Deltas look only at the miners that changed (the scheduler's and the job events'
    list), yet after every step a watcher's table equals a fresh snapshot's."""
    feed = api.core.ops
    feed.stop()  # this test is the clock
    sink: Any = Watcher()
    table = sink.miners

    async def drain(miner_id: str, draining: bool) -> None:
        r = await api.http.post(
            f"/v1/admin/miners/{miner_id}/drain", json={"draining": draining}, headers=ADMIN
        )
        assert r.status_code == 200, r.text

    async def disconnect(miner_id: str) -> None:
        r = await api.http.post(f"/v1/admin/miners/{miner_id}/disconnect", headers=ADMIN)
        assert r.status_code == 200, r.text

    jobs: list[str] = []

    async def run(miner_id: str) -> None:
        jobs.append((await api.submit())["job_id"])
        assert (await api.poll(miner_id)).status_code == 200
        assert (await api.result(jobs[-1], miner_id)).status_code == 200

    async def hold(miner_id: str) -> None:
        jobs.append((await api.submit())["job_id"])
        assert (await api.poll(miner_id)).status_code == 200

    await api.register("m1")
    feed.add(sink)
    steps = [
        lambda: api.register("m2"),
        lambda: api.register("m3"),
        lambda: run("m1"),
        lambda: hold("m2"),
        lambda: drain("m3", True),
        lambda: run("m1"),
        lambda: drain("m3", False),
        lambda: disconnect("m3"),
        lambda: api.result(jobs[1], "m2"),
        lambda: api.register("m3"),
        lambda: disconnect("m1"),
    ]
    t = 1000.0
    for n, step in enumerate(steps):
        await step()
        t += 0.25
        feed.tick(t)
        await api.core.dispatcher.barrier()  # a delta is sent once what it shows is durable
        fresh = {m["miner_id"]: m for m in feed.snapshot()["miners"]}
        assert table == fresh, f"after step {n}"
    assert sorted(table) == ["m2", "m3"]
    assert table["m2"]["completed"] == 1
    feed.discard(sink)


async def test_metrics_require_admin_and_match_the_jobs_run(api: Api) -> None:
    """/metrics parses as Prometheus text and its counters match the jobs of this test."""
    r = await api.http.get("/metrics")
    assert (r.status_code, r.json()) == (401, {"detail": "Authentication required"})
    r = await api.http.get("/metrics", headers={"X-Api-Key": MINER_KEY})
    assert r.status_code == 403
    await api.register("m1")
    done = [await api.submit() for _ in range(3)]
    for job in done:
        await api.poll("m1")
        await api.result(job["job_id"])
    canceled = await api.submit()
    await api.http.post(f"/v1/admin/jobs/{canceled['job_id']}/cancel", headers=ADMIN)
    await api.submit()
    r = await api.http.get("/metrics", headers=ADMIN)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    s = samples(r.text)
    assert s["aitbc_jobs", (("state", "COMPLETED"),)] == 3
    assert s["aitbc_jobs", (("state", "CANCELED"),)] == 1
    assert s["aitbc_jobs", (("state", "QUEUED"),)] == 1
    assert s["aitbc_job_events_total", (("event", "queued"),)] == 5
    assert s["aitbc_job_events_total", (("event", "completed"),)] == 3
    assert s["aitbc_job_submit_to_assign_seconds_count", ()] == 3
    assert s["aitbc_job_submit_to_complete_seconds_count", ()] == 3
    assert s["aitbc_job_submit_to_complete_seconds_bucket", (("le", "+Inf"),)] == 3
    assert s["aitbc_job_requeues_total", (("reason", "admin"),)] == 0
    assert s["aitbc_miners_online", ()] == 1
    assert s["aitbc_miners_busy", ()] == 0
    assert s["aitbc_writer_batch_size_count", ()] >= 1
    assert s["aitbc_writer_commit_seconds_count", ()] == s["aitbc_writer_batch_size_count", ()]
    assert s["aitbc_progress_dropped_total", ()] == 0
    assert s["aitbc_jobs_deleted_total", ()] == 0
    assert s["aitbc_sockets_open", (("role", "miner"),)] == 0
    store = api.core.dispatcher.store
    assert s["aitbc_store_wal_frames", ()] == store.wal_frames
    assert s["aitbc_store_wal_restarts_total", ()] == store.wal_restarts == 0
    assert s["aitbc_store_lock_waits_total", ()] == store.lock_waits == 0


async def test_progress_dropped_for_an_ops_watcher_is_counted(api: Api) -> None:
    """Progress frames an ops watcher's full outbox coalesced or dropped are counted in
    /metrics and in the ops counters, also after it left, like a client socket's (they were
    counted nowhere)."""
    feed = api.core.ops
    feed.stop()  # this test is the clock
    watcher = Outbox(lambda code, reason: None, soft_limit=2, hard_limit=8)
    feed.add(watcher)  # never drained: a stalled page
    await api.register("m1")
    job_id = (await api.submit())["job_id"]
    assert (await api.poll("m1")).status_code == 200
    for n in range(20):
        api.core.dispatcher.miner_call("progress", "m1", job_id, progress=n / 20)
    await api.core.dispatcher.wait_flushed()
    dropped = watcher.dropped
    assert dropped > 0

    async def counted() -> tuple[float, int]:
        r = await api.http.get("/metrics", headers=ADMIN)
        return samples(r.text)["aitbc_progress_dropped_total", ()], feed.snapshot()["counters"][
            "progress_dropped"
        ]

    assert await counted() == (dropped, dropped)
    feed.discard(watcher)
    assert await counted() == (dropped, dropped)


async def test_metrics_public_switch(tmp_path: Path) -> None:
    """METRICS_PUBLIC=on: /metrics answers without a credential."""
    async with running_api(tmp_path, metrics_public=True) as api:
        r = await api.http.get("/metrics")
        assert r.status_code == 200
        assert "aitbc_jobs" in r.text


async def test_ops_page_and_assets_are_served_offline(api: Api) -> None:
    """/ops is HTML with a strict CSP; every asset it names is served by the app."""
    r = await api.http.get("/ops")
    assert r.status_code == 200
    assert "default-src 'self'" in r.headers["content-security-policy"]
    html = r.text
    assert "http://" not in html
    assert "https://" not in html
    assert '<script type="module" src="/ops/assets/app.js">' in html
    assert '"/ops/assets/ops.css"' in html
    for asset in ("/ops/assets/app.js", "/ops/assets/charts.js", "/ops/assets/ops.css"):
        a = await api.http.get(asset)
        assert a.status_code == 200, asset
        assert "https://" not in a.text
    assert (await api.http.get("/ops/assets/missing.js")).status_code == 404


async def test_job_counts_agree_with_the_store_and_survive_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/metrics and /v1/admin/stats count jobs in memory, from committed events, seeded from
    the store at start-up (never a scan of the jobs table per scrape): after every kind of
    ending and a restart they equal a count of the jobs table."""

    def jobs_by_state(text: str) -> dict[str, int]:
        found = {k[1][0][1]: int(v) for k, v in samples(text).items() if k[0] == "aitbc_jobs"}
        return {state: n for state, n in found.items() if n}

    async with running_api(tmp_path) as api:
        count_jobs = api.core.store.count_jobs
        monkeypatch.setattr(api.core.store, "count_jobs", None)  # start-up only
        await api.register("m1")
        for _ in range(2):
            job = await api.submit()
            await api.poll("m1")
            await api.result(job["job_id"])
        failed = await api.submit()
        await api.poll("m1")
        r = await api.http.post(
            f"/v1/miners/{failed['job_id']}/fail",
            json={"error_code": "oom", "error_message": "out of memory"},
            headers={"X-Api-Key": MINER_KEY, "X-Miner-ID": "m1"},
        )
        assert r.status_code == 200, r.text
        canceled = await api.submit()
        await api.http.post(f"/v1/admin/jobs/{canceled['job_id']}/cancel", headers=ADMIN)
        running = await api.submit()
        await api.poll("m1")  # RUNNING on m1 when the coordinator stops
        await api.submit()  # QUEUED
        await api.core.dispatcher.wait_flushed()
        stored = await count_jobs()
        assert stored == {"COMPLETED": 2, "FAILED": 1, "CANCELED": 1, "RUNNING": 1, "QUEUED": 1}
        r = await api.http.get("/metrics", headers=ADMIN)
        assert jobs_by_state(r.text) == stored
        stats = await api.admin("/v1/admin/stats")
        assert (stats["jobs_by_state"], stats["total_jobs"], stats["active_jobs"]) == (
            stored,
            6,
            2,
        )
    async with running_api(tmp_path) as api:  # the same database; m1 is restored
        r = await api.result(running["job_id"])  # the restored job finishes
        assert r.status_code == 200, r.text
        await api.core.dispatcher.wait_flushed()
        stored = await api.core.store.count_jobs()
        assert stored == {"COMPLETED": 3, "FAILED": 1, "CANCELED": 1, "QUEUED": 1}
        r = await api.http.get("/metrics", headers=ADMIN)
        assert jobs_by_state(r.text) == stored
        assert (await api.admin("/v1/admin/stats"))["jobs_by_state"] == stored


def skip_deltas(ws: Any) -> None:
    """Read ``ops.delta`` frames until another frame (a failure) or the close (raises)."""
    for _ in range(1000):
        frame = ws.receive_json()
        assert frame["type"] == "ops.delta", frame


@pytest.mark.parametrize("end", ["logout", "expiry"])
def test_an_admin_wallets_ops_socket_dies_with_its_session(tmp_path: Path, end: str) -> None:
    """An ops socket opened with an admin wallet's session token is closed 4401 once the
    session is logged out or expires, before it is sent anything more. The ops socket takes
    no messages, so the check made at a socket's next message never came: it kept streaming
    every client's jobs, payloads and results after logout (found by the ops hunt)."""
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    from tests.conftest import make_settings
    from tests.web.wallet_helpers import KEY_A, address_of, bearer, sign
    from web.app import create_app

    clock = FakeClock()
    wallet = address_of(KEY_A)
    settings = make_settings(
        tmp_path, session_ttl_hours=1.0, admin_wallet_addresses=frozenset({wallet})
    )
    with TestClient(create_app(settings, clock=clock)) as c:
        nonce = c.post("/v1/auth/nonce", json={"wallet_address": wallet}).json()["nonce"]
        body = {"wallet_address": wallet, "nonce": nonce, "signature": sign(KEY_A, wallet, nonce)}
        token = c.post("/v1/login", json=body).json()["session_token"]
        with c.websocket_connect("/v1/admin/ws", headers=bearer(token)) as ws:
            assert ws.receive_json()["type"] == "snapshot"
            if end == "logout":
                assert c.post("/v1/logout", headers=bearer(token)).status_code == 200
            else:
                clock.advance(3601)
            r = c.post("/v1/jobs", json={"payload": {"secret": 1}}, headers=CLIENT)
            assert r.status_code == 201, r.text
            with pytest.raises(WebSocketDisconnect) as info:
                skip_deltas(ws)  # they may come first; the job's event must not
            assert info.value.code == 4401


async def test_a_rest_miners_new_capabilities_reach_its_row(api: Api) -> None:
    """A REST miner that changes its GPUs, models or region (PUT …/capabilities, or a new
    registration) keeps its session: its row was not sent again, as what a row shows of its
    capabilities was not compared, so the page kept the old GPUs, models and region."""
    feed = api.core.ops
    feed.stop()  # this test is the clock
    sink: Any = Watcher()
    table = sink.miners

    a100 = {"gpus": [{"name": "A100", "memory_mb": 81920}], "models": ["llama"]}
    h100 = {"gpus": [{"name": "H100", "memory_mb": 81920}], "models": ["mistral"]}
    await api.register("m1", capabilities=a100, region="eu")
    feed.add(sink)
    await api.core.dispatcher.barrier()  # snapshots and deltas follow commits
    assert (table["m1"]["gpus"], table["m1"]["region"]) == (["A100"], "eu")
    r = await api.http.put(
        "/v1/miners/m1/capabilities",
        json={"capabilities": h100, "region": "us"},
        headers=miner_headers("m1"),
    )
    assert r.status_code == 200, r.text
    feed.tick(1000.0)
    await api.core.dispatcher.barrier()  # snapshots and deltas follow commits
    assert table["m1"] == feed.snapshot()["miners"][0]
    assert (table["m1"]["gpus"], table["m1"]["models"], table["m1"]["region"]) == (
        ["H100"],
        ["mistral"],
        "us",
    )
    await api.register("m1", capabilities=a100, region="ap")  # registers again
    feed.tick(1000.25)
    await api.core.dispatcher.barrier()  # snapshots and deltas follow commits
    assert (table["m1"]["gpus"], table["m1"]["region"]) == (["A100"], "ap")
    feed.discard(sink)


async def test_a_page_opened_between_two_deltas_sees_what_changes_back(api: Api) -> None:
    """A watcher gets a snapshot newer than the last delta. What then changed back before the
    next delta (a job queued and canceled, a miner come and gone) was compared with what the
    others (or the last watcher, gone since) had been sent, found unchanged and never sent:
    the new page kept the job in its queue and the miner in its table for good."""
    feed = api.core.ops
    feed.stop()  # this test is the clock
    gone, first, second = Watcher(), Watcher(), Watcher()
    feed.add(gone)  # type: ignore[arg-type]
    await api.core.dispatcher.barrier()  # snapshots and deltas follow commits
    feed.tick(999.0)
    await api.core.dispatcher.barrier()  # snapshots and deltas follow commits
    feed.discard(gone)  # type: ignore[arg-type]
    job = await api.submit()
    feed.tick(999.5)  # unwatched: no delta
    await api.core.dispatcher.barrier()  # snapshots and deltas follow commits
    feed.add(first)  # type: ignore[arg-type]
    await api.core.dispatcher.barrier()  # snapshots and deltas follow commits
    assert first.queue["queued"] == 1
    assert (await api.cancel(job["job_id"])).status_code == 200
    feed.tick(1000.0)
    await api.core.dispatcher.barrier()  # snapshots and deltas follow commits
    first.check(feed.snapshot())
    job = await api.submit()
    assert (await api.register("m2")).status_code == 200
    feed.add(second)  # type: ignore[arg-type]
    await api.core.dispatcher.barrier()  # snapshots and deltas follow commits
    assert (second.queue["queued"], sorted(second.miners)) == (1, ["m2"])
    assert (await api.cancel(job["job_id"])).status_code == 200
    r = await api.http.delete("/v1/miners/m2", headers=miner_headers("m2"))
    assert r.status_code == 200, r.text
    feed.tick(1000.25)
    await api.core.dispatcher.barrier()  # snapshots and deltas follow commits
    for watcher in (first, second):
        watcher.check(feed.snapshot())
    feed.discard(first)  # type: ignore[arg-type]
    feed.discard(second)  # type: ignore[arg-type]


async def test_ops_assets_are_revalidated(api: Api) -> None:
    """The page's scripts and styles say no-cache (revalidated: a 304 while unchanged), as
    the page itself does. They said nothing, so a browser could keep using them for a while
    on its own (a tenth of their age): after an upgrade, the old app.js with the new page."""
    for asset in ("/ops/assets/app.js", "/ops/assets/charts.js", "/ops/assets/ops.css"):
        r = await api.http.get(asset)
        assert r.headers.get("cache-control") == "no-cache", asset
        again = await api.http.get(asset, headers={"If-None-Match": r.headers["etag"]})
        assert (again.status_code, again.headers.get("cache-control")) == (304, "no-cache")


async def test_a_rest_miner_that_stopped_calling_is_offline_on_the_page(tmp_path: Path) -> None:
    """A polling miner that makes no call for HEARTBEAT_TIMEOUT_SECONDS (it crashed, or the
    coordinator restored it from the database) and holds no job is offline, as /metrics and
    /v1/admin/status count it. REST miners stay registered until they deregister, so the page
    showed every one that ever registered as idle and online, its slots free, for good."""
    clock = FakeClock()
    async with running_api(tmp_path, clock, heartbeat_timeout_seconds=30.0) as api:
        feed = api.core.ops
        feed.stop()  # this test is the clock
        watcher = Watcher()
        await api.register("m1")
        await api.register("m2")
        feed.add(watcher)  # type: ignore[arg-type]
        await api.core.dispatcher.barrier()  # snapshots and deltas follow commits
        assert {m["state"] for m in watcher.miners.values()} == {"idle"}
        job = await api.submit()
        assert (await api.poll("m2")).status_code == 200  # m2 runs it, silent meanwhile
        clock.advance(31)
        feed.tick(clock.now())
        await api.core.dispatcher.barrier()  # snapshots and deltas follow commits
        feed.tick(clock.now() + 1)
        await api.core.dispatcher.barrier()  # snapshots and deltas follow commits
        watcher.check(feed.snapshot())
        assert (watcher.miners["m1"]["state"], watcher.miners["m2"]["state"]) == (
            "offline",
            "busy",
        )
        r = await api.http.get("/metrics", headers=ADMIN)
        assert samples(r.text)["aitbc_miners_online", ()] == 1  # m2, running its job
        r = await api.http.post("/v1/miners/heartbeat", json={}, headers=miner_headers("m1"))
        assert r.status_code == 200, r.text
        feed.tick(clock.now() + 2)
        await api.core.dispatcher.barrier()  # snapshots and deltas follow commits
        watcher.check(feed.snapshot())
        assert watcher.miners["m1"]["state"] == "idle"
        assert (await api.result(job["job_id"], "m2")).status_code == 200
        # Dropped by an operator's disconnect (its last call is kept): the walk skips it.
        r = await api.http.post("/v1/admin/miners/m1/disconnect", headers=ADMIN)
        assert r.status_code == 200, r.text
        feed.tick(clock.now() + 3)
        await api.core.dispatcher.barrier()  # snapshots and deltas follow commits
        watcher.check(feed.snapshot())
        assert sorted(watcher.miners) == ["m2"]
        feed.discard(watcher)  # type: ignore[arg-type]


async def test_unservable_groups_show_what_matching_reads(api: Api) -> None:
    """Queued jobs no miner can serve are grouped by what matching reads of their
    constraints. They were grouped and shown by the constraints whole, and unknown keys are
    kept: a client's jobs each with its own large unknown key (up to a whole body) were ten
    groups of a megabyte, sent in every delta whose queue counts changed (four a second) to
    each ops page, and held in the queue of a page that fell behind."""
    feed = api.core.ops
    feed.stop()  # this test is the clock
    await api.register("m1")  # serves jobs without constraints
    watcher = Watcher()
    feed.add(watcher)  # type: ignore[arg-type]
    await api.core.dispatcher.barrier()  # snapshots and deltas follow commits
    for n in range(10):
        junk = {f"note{n}": "x" * 90_000, "min_reputation": n}
        await api.submit(constraints={"gpu": "H200", "models": ["b", "a"], **junk})
    await api.submit(constraints={"region": "mars"})
    sizes: list[int] = []
    real_put = watcher.put

    def put(frame: str, **kw: Any) -> None:
        sizes.append(len(frame))
        real_put(frame, **kw)

    watcher.put = put  # type: ignore[method-assign]
    feed.tick(1000.0)
    await api.core.dispatcher.barrier()  # snapshots and deltas follow commits
    await api.submit()  # the counts change: the queue goes out again
    feed.tick(1000.25)
    await api.core.dispatcher.barrier()  # snapshots and deltas follow commits
    assert watcher.queue["unservable_groups"] == [
        {"constraints": {"gpu": "H200", "models": ["a", "b"]}, "count": 10},
        {"constraints": {"region": "mars"}, "count": 1},
    ]
    assert watcher.queue["unservable"] == 11
    assert max(sizes) < 5_000
    watcher.check(feed.snapshot())
    feed.discard(watcher)  # type: ignore[arg-type]


async def test_job_detail_pages_stay_within_a_few_megabytes(api: Api) -> None:
    """A page of the drill-down held up to 10,000 events whatever their size, and a miner
    chooses its progress outputs (up to a frame each): the ops page's first request for
    such a job read and answered gigabytes at once. A page now also stops at EVENT_BYTES of
    event data (the first event in any case); next_after pages through the rest."""
    EVENT_BYTES = 4 << 20  # web.rest_ops.EVENT_BYTES
    await api.register("m1")
    job = await api.submit()
    assert (await api.poll("m1")).status_code == 200
    chunk = "y" * (EVENT_BYTES // 4)
    for _ in range(10):
        api.core.dispatcher.miner_call("progress", "m1", job["job_id"], output=chunk)
    assert (await api.result(job["job_id"])).status_code == 200
    at = f"/v1/admin/jobs/{job['job_id']}"
    seqs: list[int] = []
    after = 0
    while after is not None:
        r = await api.http.get(f"{at}?after={after}", headers=ADMIN)
        assert r.status_code == 200, r.text
        assert len(r.content) < EVENT_BYTES + (EVENT_BYTES // 4) + 100_000
        page = r.json()
        seqs += [e["seq"] for e in page["events"]]
        after = page["next_after"]
    assert seqs == list(range(1, 15))  # queued, assigned, started, 10 progress, completed
    r = await api.http.get(f"{at}?after=3&limit=1", headers=ADMIN)
    assert ([e["seq"] for e in r.json()["events"]], r.json()["next_after"]) == ([4], 4)


async def test_a_silent_rest_miner_running_a_job_counts_online_everywhere(tmp_path: Path) -> None:
    """A polling miner running a job need not call until its result (its lease, 600 s by
    default, keeps the job): after HEARTBEAT_TIMEOUT_SECONDS the page showed it busy, online
    in its header, while /metrics counted no miner online or busy, /v1/admin/miners said
    OFFLINE and /v1/admin/status "degraded" for the next queued job. All count it online, as
    the page does, until it holds no job."""
    clock = FakeClock()
    async with running_api(tmp_path, clock, heartbeat_timeout_seconds=30.0) as api:
        await api.register("m1")
        job = await api.submit()
        assert (await api.poll("m1")).status_code == 200
        await api.submit()  # waits for a free slot
        clock.advance(31)
        [row] = api.core.ops.snapshot()["miners"]
        assert row["state"] == "busy"
        r = await api.http.get("/metrics", headers=ADMIN)
        values = samples(r.text)
        assert (values["aitbc_miners_online", ()], values["aitbc_miners_busy", ()]) == (1, 1)
        r = await api.http.get("/v1/admin/miners", headers=ADMIN)
        assert r.json()["items"][0]["status"] == "ONLINE"
        r = await api.http.get("/v1/admin/status", headers=ADMIN)
        assert (r.json()["miners"]["online"], r.json()["status"]) == (1, "healthy")
        r = await api.http.get("/v1/admin/stats", headers=ADMIN)
        assert r.json()["online_miners"] == 1
        assert (await api.result(job["job_id"], "m1")).status_code == 200
        clock.advance(31)  # holds no job, called 31 s ago: offline everywhere
        [row] = api.core.ops.snapshot()["miners"]
        r = await api.http.get("/metrics", headers=ADMIN)
        values = samples(r.text)
        assert (row["state"], values["aitbc_miners_online", ()]) == ("offline", 0)


async def test_slots_count_the_miners_online_only(tmp_path: Path) -> None:
    """A polling miner stays registered until it deregisters: one gone quiet (crashed, or
    restored from the database) kept its slots in aitbc_miner_slots{use="total"} for good,
    capacity nobody could use, while the page's header counts the online miners' slots. Both
    count the online miners' now."""
    clock = FakeClock()
    async with running_api(tmp_path, clock, heartbeat_timeout_seconds=30.0) as api:
        await api.register("quiet")
        clock.advance(31)
        await api.register("alive")
        r = await api.http.get("/metrics", headers=ADMIN)
        values = samples(r.text)
        used, total = (values["aitbc_miner_slots", (("use", u),)] for u in ("used", "total"))
        rows = [m for m in api.core.ops.snapshot()["miners"] if m["state"] != "offline"]
        assert [m["miner_id"] for m in rows] == ["alive"]
        assert (used, total) == (0, rows[0]["slots_total"])
