"""Admin stats/jobs/miners and debug routes (rest-api.md §2.4, §8 item 60), explorer receipts
(§2.7), OpenAPI."""

from __future__ import annotations

import re
import tracemalloc
from typing import TYPE_CHECKING

import pytest
from starlette.routing import Route
from starlette.testclient import TestClient

from tests.conftest import (
    ADMIN_KEY,
    CLIENT_KEY,
    CLIENT_KEY_2,
    MINER_KEY,
    MINER_KEY_2,
    SIGNING_SEED,
    make_settings,
)
from tests.fakes import FakeClock, RecordingStore
from tests.web.rest_harness import Api, answered_after_commit, miner_headers, running_api
from tests.web.wallet_helpers import KEY_A, KEY_B, address_of, bearer, login
from web.app import create_app
from web.auth import key_hash
from web.openapi import documented

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

pytestmark = pytest.mark.anyio


CLIENT_ID = f"client-{key_hash(CLIENT_KEY)[:12]}"


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async with running_api(tmp_path) as a:
        yield a


@pytest.mark.parametrize(
    ("path", "takes"),
    [
        ("/v1/admin/jobs?state=RUNNING", "this route takes none"),
        ("/v1/admin/miners?status=ONLINE", "this route takes none"),
        ("/v1/explorer/receipts?miner=m1", "this route takes job_id, limit, offset"),
        ("/v1/admin/accounts/system:admin?kind=credit", "this route takes limit, offset"),
    ],
)
async def test_a_listing_refuses_a_filter_it_does_not_know(api: Api, path: str, takes: str) -> None:
    """The admin and explorer lists ignored any filter they do not know, and listed every
    item as if it had matched (an operator's ?state=RUNNING got every job): 422 naming it."""
    r = await api.http.get(path, headers={"X-Api-Key": ADMIN_KEY})
    assert r.status_code == 422, r.text
    name = path.partition("?")[2].partition("=")[0]
    assert r.json()["detail"] == f"unknown query parameter {name}; {takes}"


async def test_admin_stats_counts_match(api: Api) -> None:
    """60 [fix]: total/active jobs and online miners match what the test created."""
    await api.register("m1")
    done = await api.submit()
    await api.submit()
    await api.submit()
    assert (await api.poll("m1")).status_code == 200
    await api.result(done["job_id"])
    stats = await api.admin("/v1/admin/stats")
    assert stats["total_jobs"] == 3
    assert stats["active_jobs"] == 2
    assert stats["online_miners"] == 1
    assert stats["avg_miner_job_duration_ms"] >= 0


async def test_the_mean_run_time_reads_no_job_bodies(tmp_path: Path) -> None:
    """/v1/admin/stats and /v1/admin/status read the newest 1000 completed jobs whole, payload
    and result included (up to a request body each), to average their run times: measured,
    107 jobs of about 1.3 MB took 3.3 s on the event loop (every socket and request stalled)
    and 1.3 GB more memory, per call (a dashboard polls these). The store averages them.
    The mean is still the run times' (accept to end) of the newest completed jobs."""
    clock = FakeClock()
    async with running_api(tmp_path, clock=clock) as api:
        await api.register("m1")
        big = list(range(100_000))  # about 600 kB of JSON, several MB once parsed
        for run in (2.0, 3.0):
            job = await api.submit(payload={"type": "t", "input": big})
            await api.poll("m1")
            clock.advance(run)
            assert (await api.result(job["job_id"], result={"output": big})).status_code == 200
        await api.submit()  # queued: no run time
        for path in ("/v1/admin/stats", "/v1/admin/status"):
            await api.admin(path)  # warm up: imports, caches
            tracemalloc.start()
            try:
                body = await api.admin(path)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            miners = body.get("miners", {})
            mean = body.get("avg_miner_job_duration_ms", miners.get("avg_job_duration_ms"))
            assert mean == 2500.0, (path, body)
            assert peak < 1_000_000, (path, peak)


async def test_the_admin_job_list_reads_no_job_bodies(tmp_path: Path) -> None:
    """/v1/admin/jobs read its 100 jobs whole, payload, result and receipt included (up to a
    request body each), to answer six small fields each: measured, 2.3 s on the event loop
    and 1.4 GB more memory per call with 100 jobs of about 1.3 MB. The store reads only
    those fields."""
    async with running_api(tmp_path, clock=FakeClock()) as api:
        await api.register("m1")
        big = list(range(100_000))  # about 600 kB of JSON, several MB once parsed
        done = await api.submit(payload={"type": "t", "input": big})
        await api.poll("m1")
        assert (await api.result(done["job_id"], result={"output": big})).status_code == 200
        queued = await api.submit(payload={"type": "t", "input": big})
        await api.admin("/v1/admin/jobs")  # warm up: imports, caches
        tracemalloc.start()
        try:
            items = (await api.admin("/v1/admin/jobs"))["items"]
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert items == [
            {
                "job_id": queued["job_id"],
                "state": "QUEUED",
                "client_id": CLIENT_ID,
                "assigned_miner_id": None,
                "requested_at": queued["requested_at"],
                "attempt": 0,
            },
            {
                "job_id": done["job_id"],
                "state": "COMPLETED",
                "client_id": CLIENT_ID,
                "assigned_miner_id": "m1",
                "requested_at": done["requested_at"],
                "attempt": 1,
            },
        ]
        assert peak < 1_000_000, peak


async def test_online_miners_counts_the_production_miners_active_heartbeat(
    tmp_path: Path,
) -> None:
    """§9 [bug] upstream's online_miners ignores miners whose heartbeat says "active" (the
    production miner's status). Here a heartbeat of any status keeps a miner online; one whose
    last call is older than HEARTBEAT_TIMEOUT_SECONDS is not."""
    async with running_api(tmp_path, clock=FakeClock()) as api:
        await api.register("m1")
        await api.register("m2")
        assert (await api.admin("/v1/admin/stats"))["online_miners"] == 2
        api.clock.advance(25)
        body = {"status": "active", "current_jobs": 0}
        r = await api.http.post("/v1/miners/heartbeat", json=body, headers=miner_headers("m1"))
        assert r.status_code == 200
        api.clock.advance(25)  # m2: 50 s since its last call, past the 30 s timeout
        assert (await api.admin("/v1/admin/stats"))["online_miners"] == 1
        miners = {m["miner_id"]: m for m in (await api.admin("/v1/admin/miners"))["items"]}
        assert (miners["m1"]["status"], miners["m2"]["status"]) == ("ONLINE", "OFFLINE")


async def test_admin_status_reports_jobs_miners_host_and_health(tmp_path: Path) -> None:
    """§9 [bug] upstream's /v1/admin/status always answered {"status":"error"}: here it has the
    intended shape, and says degraded while jobs wait with no miner online."""
    async with running_api(tmp_path, clock=FakeClock()) as api:
        await api.register("m1")
        done = await api.submit()
        await api.submit()
        assert (await api.poll("m1")).status_code == 200
        await api.result(done["job_id"])
        status = await api.admin("/v1/admin/status")
        assert status["jobs"] == {"total": 2, "active": 1, "completed": 1, "failed": 0}
        assert {k: status["miners"][k] for k in ("total", "online", "offline")} == {
            "total": 1,
            "online": 1,
            "offline": 0,
        }
        assert status["miners"]["avg_job_duration_ms"] >= 0
        assert status["status"] == "healthy"
        assert status["system"]["cpu"]["count"] >= 1
        assert status["system"]["disk"]["free_gib"] > 0
        api.clock.advance(60)  # m1 silent past HEARTBEAT_TIMEOUT_SECONDS; one job still queued
        status = await api.admin("/v1/admin/status")
        assert (status["miners"]["online"], status["status"]) == (0, "degraded")


async def test_admin_jobs_and_miners(api: Api) -> None:
    """/v1/admin/jobs lists newest first; /v1/admin/miners shows inflight and liveness."""
    await api.register("m1", concurrency=2, region="eu")
    job = await api.submit()
    await api.poll("m1")
    jobs = (await api.admin("/v1/admin/jobs"))["items"]
    assert jobs[0]["job_id"] == job["job_id"]
    assert jobs[0]["assigned_miner_id"] == "m1"
    miners = (await api.admin("/v1/admin/miners"))["items"]
    assert miners == [
        {
            "miner_id": "m1",
            "status": "ONLINE",
            "inflight": 1,
            "concurrency": 2,
            "region": "eu",
            "last_heartbeat": miners[0]["last_heartbeat"],
            "transport": "rest",
            "jobs_completed": 0,
            "jobs_failed": 0,
            "average_job_duration_ms": None,
            "last_receipt_id": None,
        }
    ]


async def test_admin_miners_has_upstreams_job_counts(tmp_path: Path) -> None:
    """Upstream's admin miner rows carry jobs_completed, jobs_failed, average_job_duration_ms
    and last_receipt_id (rest-api.md §2.4); ours had none of them, so a tool reading them got
    nothing. They count since the coordinator started, as the ops page's rows do."""
    async with running_api(tmp_path, clock=FakeClock()) as api:
        await api.register("m1", concurrency=3)
        jobs = [await api.submit() for _ in range(3)]
        for _ in jobs:
            assert (await api.poll("m1")).status_code == 200
        api.clock.advance(2)
        first = (await api.result(jobs[0]["job_id"])).json()["receipt"]
        api.clock.advance(2)
        last = (await api.result(jobs[1]["job_id"])).json()["receipt"]
        body = {"error_code": "E1", "error_message": "boom"}
        r = await api.http.post(
            f"/v1/miners/{jobs[2]['job_id']}/fail", json=body, headers=miner_headers("m1")
        )
        assert r.status_code == 200, r.text
        [row] = (await api.admin("/v1/admin/miners"))["items"]
    assert first["receipt_id"] != last["receipt_id"]
    assert (row["jobs_completed"], row["jobs_failed"]) == (2, 1)
    assert row["average_job_duration_ms"] == 3000.0  # runs of 2 s and 4 s
    assert row["last_receipt_id"] == last["receipt_id"]


async def test_admin_needs_the_admin_key(api: Api) -> None:
    """A client key on an admin route -> 403."""
    r = await api.http.get("/v1/admin/stats", headers={"X-Api-Key": CLIENT_KEY})
    assert r.status_code == 403


DEBUG_ROUTES = [
    ("GET", "/v1/admin/test-key"),
    ("GET", "/v1/admin/debug-settings"),
    ("POST", "/v1/admin/debug/create-test-miner"),
    ("DELETE", "/v1/admin/debug/test-miner"),
]
TEST_MINER = "debug-test-miner"


@pytest.mark.parametrize(("method", "path"), DEBUG_ROUTES)
@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, 401),
        ({"X-Api-Key": "not-a-configured-key"}, 401),
        ({"X-Api-Key": CLIENT_KEY}, 403),
        ({"X-Api-Key": MINER_KEY}, 403),
        ({"Authorization": f"Bearer {MINER_KEY}"}, 403),
    ],
    ids=["none", "unknown", "client", "miner", "miner-bearer"],
)
async def test_debug_routes_need_an_admin_key(
    api: Api, method: str, path: str, headers: dict[str, str], code: int
) -> None:
    """Upstream's test-key answered 401 to any key not in ADMIN_API_KEYS: here the usual role
    check, on all three debug routes (and a refused call creates no test miner)."""
    r = await api.http.request(method, path, headers=headers)
    assert r.status_code == code, r.text
    assert set(r.json()) == {"detail"}
    assert (await api.admin("/v1/admin/miners"))["items"] == []


async def test_test_key_accepts_an_admin_key(api: Api) -> None:
    for headers in ({"X-Api-Key": ADMIN_KEY}, {"Authorization": f"Bearer {ADMIN_KEY}"}):
        r = await api.http.get("/v1/admin/test-key", headers=headers)
        assert r.status_code == 200, r.text
        assert r.json() == {
            "status": "ok",
            "role": "admin",
            "key_id": f"admin-{key_hash(ADMIN_KEY)[:12]}",
        }
        assert ADMIN_KEY not in r.text


def key_id(role: str, key: str) -> str:
    return f"{role}-{key_hash(key)[:12]}"


async def test_debug_settings_masks_every_key_and_leaks_no_secret(tmp_path: Path) -> None:
    """A key list is its count and the keys' ids (the id a client key's jobs carry); a few
    harmless settings; no key, signing seed or database path appears anywhere in the body."""
    second_admin = "admin-second-key-zzzzzzz"
    async with running_api(
        tmp_path,
        admin_api_keys=(ADMIN_KEY, second_admin),
        job_ttl_seconds=120.0,
        heartbeat_interval_seconds=4.0,
        heartbeat_timeout_seconds=12.0,
        billing=True,
        environment="staging",
    ) as api:
        r = await api.http.get("/v1/admin/debug-settings", headers={"X-Api-Key": second_admin})
        assert r.status_code == 200, r.text
        secrets = (CLIENT_KEY, CLIENT_KEY_2, MINER_KEY, MINER_KEY_2, ADMIN_KEY, second_admin)
        for secret in (*secrets, SIGNING_SEED, SIGNING_SEED.upper(), str(tmp_path)):
            assert secret not in r.text, secret
        body = r.json()
        assert body.pop("client_api_keys") == {
            "count": 2,
            "ids": [key_id("client", CLIENT_KEY), key_id("client", CLIENT_KEY_2)],
        }
        assert body.pop("miner_api_keys") == {
            "count": 2,
            "ids": [key_id("miner", MINER_KEY), key_id("miner", MINER_KEY_2)],
        }
        assert body.pop("admin_api_keys") == {
            "count": 2,
            "ids": [key_id("admin", ADMIN_KEY), key_id("admin", second_admin)],
        }
        await api.submit()  # the id shown for CLIENT_KEY is the client id its jobs carry
        [job] = (await api.admin("/v1/admin/jobs"))["items"]
        assert job["client_id"] == key_id("client", CLIENT_KEY)
        published = (await api.http.get("/v1/receipts/signing-keys")).text
        assert body.pop("receipt_key_id") in published
        assert body == {
            "database": "sqlite",
            "environment": "staging",
            "job_ttl_seconds": 120.0,
            "heartbeat_interval_seconds": 4.0,
            "heartbeat_timeout_seconds": 12.0,
            "max_attempts": 3,
            "billing": True,
            "exchange_configured": False,
        }


async def test_create_test_miner_registers_then_refreshes_bound_to_no_key(tmp_path: Path) -> None:
    """Registered as /v1/miners/register would (listed, online, stored); again: "updated",
    also after a restart. Bound to no configured key: no miner key can register it or act
    for it (403), so a real miner is never confused with it."""
    create = "/v1/admin/debug/create-test-miner"
    admin = {"X-Api-Key": ADMIN_KEY}
    async with running_api(tmp_path) as api:
        r = await api.http.post(create, headers=admin)
        assert r.status_code == 200, r.text
        assert r.json() == {"miner_id": TEST_MINER, "status": "created"}
        [listed] = (await api.admin("/v1/admin/miners"))["items"]
        assert (listed["miner_id"], listed["status"], listed["transport"]) == (
            TEST_MINER,
            "ONLINE",
            "rest",
        )
        [stored] = (await api.core.store.load_active())[1]
        assert stored.miner_id == TEST_MINER
        assert stored.capabilities["gpus"]
        keys = (CLIENT_KEY, CLIENT_KEY_2, MINER_KEY, MINER_KEY_2, ADMIN_KEY)
        assert stored.key_hash not in {key_hash(k) for k in keys}
        r = await api.http.post(create, headers=admin, json={"ignored": True})
        assert r.json() == {"miner_id": TEST_MINER, "status": "updated"}
        for key in (MINER_KEY, MINER_KEY_2):
            assert (await api.register(TEST_MINER, key=key)).status_code == 403
            assert (await api.poll(TEST_MINER, key=key)).status_code == 403
    async with running_api(tmp_path) as api:
        r = await api.http.post(create, headers=admin)
        assert r.json() == {"miner_id": TEST_MINER, "status": "updated"}
        assert (await api.register(TEST_MINER)).status_code == 403


async def test_the_test_miner_can_be_removed_and_stays_removed(tmp_path: Path) -> None:
    """DELETE /v1/admin/debug/test-miner: gone from the lists and the known classes (a job
    only it could run is no longer servable), also after a restart; a second DELETE is 404."""
    admin = {"X-Api-Key": ADMIN_KEY}
    remove = "/v1/admin/debug/test-miner"
    async with running_api(tmp_path) as api:
        await api.http.post("/v1/admin/debug/create-test-miner", headers=admin)
        assert (await api.submit(constraints={"models": ["debug-model"]}))["servable"] is True
        r = await api.http.delete(remove, headers=admin)
        assert r.status_code == 200, r.text
        assert r.json() == {"miner_id": TEST_MINER, "status": "deregistered"}
        assert (await api.admin("/v1/admin/miners"))["items"] == []
        assert (await api.submit(constraints={"models": ["debug-model"]}))["servable"] is False
        assert (await api.http.delete(remove, headers=admin)).status_code == 404
    async with running_api(tmp_path) as api:
        assert (await api.admin("/v1/admin/miners"))["items"] == []


async def test_a_second_removal_of_the_test_miner_waits_for_the_first(tmp_path: Path) -> None:
    """A DELETE of the test miner while another's deregistration was still being committed
    was 404 "not registered" at once (a failed commit then stops the coordinator, and the
    restarted one still has it registered). The 404 now follows the commit."""
    store = RecordingStore()
    admin = {"X-Api-Key": ADMIN_KEY}
    remove = "/v1/admin/debug/test-miner"
    async with running_api(tmp_path, FakeClock(), store=store) as api:
        r = await api.http.post("/v1/admin/debug/create-test-miner", headers=admin)
        assert r.status_code == 200, r.text
        answers = await answered_after_commit(
            api,
            store,
            ("first", api.http.delete(remove, headers=admin)),
            ("second", api.http.delete(remove, headers=admin)),
        )
        assert sorted(answers) == [("first", 200), ("second", 404)]


async def test_create_test_miner_refuses_an_id_a_real_miner_holds(api: Api) -> None:
    """A miner that registered as debug-test-miner keeps it: 409, and it still polls."""
    assert (await api.register(TEST_MINER)).status_code == 200
    r = await api.http.post("/v1/admin/debug/create-test-miner", headers={"X-Api-Key": ADMIN_KEY})
    assert r.status_code == 409, r.text
    assert "real miner" in r.json()["detail"]
    assert (await api.poll(TEST_MINER)).status_code == 204
    r = await api.http.delete("/v1/admin/debug/test-miner", headers={"X-Api-Key": ADMIN_KEY})
    assert r.status_code == 404  # the real miner keeps its registration
    assert (await api.poll(TEST_MINER)).status_code == 204


async def test_explorer_receipts_are_public_and_private(api: Api) -> None:
    """Public list: ids, miner, status, units, price, times; never payload/result/client."""
    await api.register("m1")
    job = await api.submit(payload={"prompt": "secret prompt"})
    await api.poll("m1")
    await api.result(job["job_id"], result={"output": "secret output"})
    r = await api.http.get(f"/v1/explorer/receipts?job_id={job['job_id']}")
    assert r.status_code == 200
    body = r.json()
    assert body["jobId"] == job["job_id"]
    [item] = body["items"]
    assert item["jobId"] == job["job_id"]
    assert item["miner"] == "m1"
    assert item["status"] == "COMPLETED"
    payload = item["payload"]
    assert set(payload) == {
        "version",
        "receipt_id",
        "job_id",
        "provider",
        "status",
        "units",
        "unit_type",
        "unit_price",
        "price",
        "started_at",
        "completed_at",
    }
    assert "secret" not in r.text
    assert "client" not in r.text
    owner = await api.http.get(
        f"/v1/jobs/{job['job_id']}/receipts", headers={"X-Api-Key": CLIENT_KEY}
    )
    [full] = owner.json()["items"]
    assert full["metadata"]["job_payload"] == {"prompt": "secret prompt"}
    assert full["metadata"]["result"] == {"output": "secret output"}
    for private in ("client", "payload_hash", "result_hash", "prev_hash", "signature"):
        assert private in full
        assert full[private] not in payload.values()
    everything = (await api.http.get("/v1/explorer/receipts")).json()
    assert everything["jobId"] == "all"
    assert (await api.http.get("/v1/explorer/receipts?limit=201")).status_code == 422


async def test_the_public_explorers_offset_is_bounded(tmp_path: Path) -> None:
    """``GET /v1/explorer/receipts?offset=999999999`` (public, without a credential, so never
    rate limited) made the database step over every receipt before it, each holding a job's
    payload and result, on the connection every read shares: one request cost a walk of the
    whole receipts table. The offset is at most 10,000 (422 above); a job's receipt is still
    found by its job_id."""
    async with running_api(tmp_path) as api:
        r = await api.http.get("/v1/explorer/receipts?offset=10001")
        assert (r.status_code, r.json()) == (
            422,
            {"detail": "query parameter offset must be at most 10000"},
        )
        r = await api.http.get("/v1/explorer/receipts?offset=10000")
        assert (r.status_code, r.json()["items"]) == (200, [])


async def test_the_public_explorer_reads_only_the_public_fields(api: Api) -> None:
    """The unauthenticated explorer read every listed receipt whole, the job's payload and
    result in its metadata included (up to a request body each), to answer a dozen small
    fields: measured, a page of 100 receipts of about 1.3 MB each blocked the event loop for
    0.75 s and took 500 MB more memory per request, for anyone who asks, as often as they
    ask. The store reads only the fields the explorer shows."""
    await api.register("m1")
    big = list(range(100_000))  # about 600 kB of JSON, several MB once parsed
    for _ in range(2):
        job = await api.submit(payload={"type": "t", "input": big})
        await api.poll("m1")
        assert (await api.result(job["job_id"], result={"output": big})).status_code == 200
    for query in ("", f"?job_id={job['job_id']}"):
        await api.http.get(f"/v1/explorer/receipts{query}")  # warm up: imports, caches
        tracemalloc.start()
        try:
            r = await api.http.get(f"/v1/explorer/receipts{query}")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert r.status_code == 200, r.text
        assert r.json()["items"][0]["jobId"] == job["job_id"]
        assert r.json()["items"][0]["payload"]["units"] >= 0
        assert peak < 1_000_000, (query, peak)


def test_openapi_documents_every_route(tmp_path: Path) -> None:
    """Every HTTP route of the app is in /openapi.json with its methods; security schemes."""
    app = create_app(make_settings(tmp_path))
    with TestClient(app) as c:
        doc = c.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    assert set(doc["components"]["securitySchemes"]) == {"ApiKeyHeader", "Bearer", "SessionToken"}
    for route in app.routes:
        if not isinstance(route, Route):
            continue  # websockets
        path = documented(route.path)  # without a convertor: {miner_id:id} is {miner_id}
        assert path in doc["paths"], route.path
        methods = {m.lower() for m in route.methods or ()} - {"head"}
        assert methods <= set(doc["paths"][path]), route.path
        for method in methods:
            op = doc["paths"][path][method]
            assert op["responses"]
            assert op["tags"]
            for name in re.findall(r"{([^}]+)}", path):
                assert any(p["name"] == name and p["in"] == "path" for p in op["parameters"])
    submit = doc["paths"]["/v1/jobs"]["post"]
    assert submit["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JobCreate"
    }
    assert "204" in doc["paths"]["/v1/miners/poll"]["post"]["responses"]


def test_rest_miner_and_socket_miner_share_one_queue(tmp_path: Path) -> None:
    """A socket miner and a REST miner take jobs from the same queue; each job runs once."""
    with TestClient(create_app(make_settings(tmp_path))) as c:
        h = {"X-Api-Key": CLIENT_KEY}
        assert (
            c.post(
                "/v1/miners/register", json={"capabilities": {}}, headers=miner_headers("rest-1")
            ).status_code
            == 200
        )
        first = c.post("/v1/jobs", json={"payload": {"n": 1}}, headers=h).json()
        with c.websocket_connect(
            "/v1/miners/ws", headers={"X-Api-Key": "miner-key-aaaaaaaaaaaaa"}
        ) as ws:
            ws.send_json({"type": "hello", "protocol": 1, "miner_id": "ws-1"})
            assert ws.receive_json()["type"] == "welcome"
            pushed = ws.receive_json()
            assert pushed["type"] == "job.assign"
            assert pushed["job_id"] == first["job_id"]
            second = c.post("/v1/jobs", json={"payload": {"n": 2}}, headers=h).json()
            r = c.post(
                "/v1/miners/poll", json={"max_wait_seconds": 1}, headers=miner_headers("rest-1")
            )
            assert r.status_code == 200
            assert r.json()["job_id"] == second["job_id"]
        stats = c.get("/v1/admin/stats", headers={"X-Api-Key": ADMIN_KEY}).json()
        assert stats["total_jobs"] == 2


async def test_a_wallet_in_admin_wallet_addresses_is_an_admin_and_still_a_client(
    tmp_path: Path,
) -> None:
    """ADMIN_WALLET_ADDRESSES: that wallet's session opens the admin routes (and /metrics)
    and keeps its client routes; another wallet's session gets 403 on admin routes."""
    admin_wallet = address_of(KEY_A)
    async with running_api(tmp_path, admin_wallet_addresses=frozenset({admin_wallet})) as api:
        admin_user = await login(api.http, KEY_A)
        plain_user = await login(api.http, KEY_B)
        admin, plain = bearer(admin_user["session_token"]), bearer(plain_user["session_token"])
        for path in ("/v1/admin/stats", "/v1/admin/miners", "/v1/admin/test-key", "/metrics"):
            assert (await api.http.get(path, headers=admin)).status_code == 200, path
            assert (await api.http.get(path, headers=plain)).status_code == 403, path
        r = await api.http.post("/v1/jobs", json={"payload": {"x": 1}}, headers=admin)
        assert r.status_code == 201, r.text
        other = f"/v1/users/{plain_user['user_id']}/balance"
        assert (await api.http.get(other, headers=admin)).status_code in (200, 404)
        assert (await api.http.get(other, headers=plain)).status_code in (200, 404)
        mine = f"/v1/users/{admin_user['user_id']}/balance"
        assert (await api.http.get(mine, headers=plain)).status_code == 403


@pytest.mark.parametrize(
    "path", ["/v1/admin/miners", "/v1/admin/stats", "/v1/admin/status", "/v1/admin/ops", "/metrics"]
)
async def test_a_read_showing_miners_waits_for_their_commit(tmp_path: Path, path: str) -> None:
    """The miner lists and counts are the scheduler's, which runs ahead of the store: a read
    while a registration was being committed showed the miner at once (a failed commit then
    stops the coordinator, and the miner never existed). It is answered after that commit."""
    store = RecordingStore()
    async with running_api(tmp_path, clock=FakeClock(), store=store) as api:
        read = api.http.get(path, headers={"X-Api-Key": ADMIN_KEY})
        answers = await answered_after_commit(
            api, store, ("register", api.register("m1")), ("read", read)
        )
        assert answers == [("register", 200), ("read", 200)]
