"""REST miner routes: rest-api.md §8 behaviours 18-53 (miner side), long-poll and restart."""

from __future__ import annotations

import hashlib
import sqlite3
import time
import tracemalloc
from contextlib import asynccontextmanager, closing
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from dispatcher.clock import SystemClock
from protocol.receipts import verify_receipt
from protocol.types import iso_time
from tests.conftest import ADMIN_KEY, CLIENT_KEY, MINER_KEY, MINER_KEY_2
from tests.fakes import FailingStore, FakeClock, RecordingStore
from tests.web.rest_harness import Api, answered_after_commit, miner_headers, running_api

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable
    from pathlib import Path

    import httpx

pytestmark = pytest.mark.anyio


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async with running_api(tmp_path, clock=SystemClock()) as a:
        yield a


async def started(api: Api, miner_id: str = "m1", **caps: Any) -> dict[str, Any]:
    """Register, submit, poll: the job the miner now runs."""
    assert (await api.register(miner_id, capabilities=caps)).status_code == 200
    job = await api.submit()
    r = await api.poll(miner_id)
    assert r.status_code == 200, r.text
    assert r.json()["job_id"] == job["job_id"]
    return job


class Background:
    """A request running as a task; ``response`` is set when it returns."""

    def __init__(self) -> None:
        self.response: httpx.Response | None = None

    async def run(self, coro: Any) -> None:
        self.response = await coro


@asynccontextmanager
async def parked_poll(api: Api, miner_id: str = "m1") -> AsyncIterator[Background]:
    """A 20 s poll of ``miner_id`` waiting in the server while the block runs; its response
    is in the ``Background`` once the block has ended (the poll ended too)."""
    bg = Background()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(bg.run, api.poll(miner_id, 20))
            while api.core.dispatcher.scheduler.miners[miner_id].polls == 0:  # noqa: ASYNC110 - bounded poll
                await anyio.sleep(0.01)
            yield bg


# ---- registration and heartbeat (18-21) ---------------------------------------------------


async def test_register_returns_a_new_session_token_each_time(api: Api) -> None:
    """18: 200 status ok with a session_token; a second call gives a new one."""
    first = (await api.register()).json()
    second = (await api.register()).json()
    assert first["status"] == "ok"
    assert first["session_token"]
    assert second["session_token"] != first["session_token"]
    assert first["miner_id"] == "m1"


async def test_register_without_capabilities_is_422(api: Api) -> None:
    """19: capabilities is required."""
    r = await api.http.post("/v1/miners/register", json={}, headers=miner_headers("m1"))
    assert r.status_code == 422
    assert "capabilities" in r.json()["detail"]


async def test_heartbeat_accepts_extra_keys(api: Api) -> None:
    """20: heartbeat with production-miner keys -> 200 status ok."""
    await api.register()
    r = await api.http.post(
        "/v1/miners/heartbeat",
        json={"status": "active", "current_jobs": 0, "gpu_utilization": 3, "inflight": 7},
        headers=miner_headers("m1"),
    )
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


async def test_heartbeat_of_unregistered_miner_is_404(api: Api) -> None:
    """21: unknown miner id -> 404 miner not registered."""
    r = await api.http.post("/v1/miners/heartbeat", json={}, headers=miner_headers("ghost"))
    assert r.status_code == 404
    assert r.json() == {"detail": "miner not registered"}


async def test_miner_id_is_derived_from_the_key_never_the_key(api: Api) -> None:
    """Without X-Miner-ID the id is derived from the key; the key never appears."""
    body = (await api.register(None)).json()
    assert body["miner_id"].startswith("miner-")
    assert MINER_KEY not in body["miner_id"]
    job = await api.submit()
    assert (await api.poll(None)).status_code == 200
    assert (await api.job(job["job_id"]))["assigned_miner_id"] == body["miner_id"]


async def test_a_utf8_miner_id_header_names_the_same_miner_as_a_socket_hello(api: Api) -> None:
    """Header bytes are latin-1 text to the server; UTF-8 ones are read as UTF-8 ("é" was
    "Ã©", another miner than a socket's hello names). Bytes that are not UTF-8: 422."""
    for name in ("gpu-é-✓", "gpu-à", "gpu-Å", "gpu-ą"):  # the last three end in 0xA0 / 0x85
        headers = {"X-Api-Key": MINER_KEY, "X-Miner-ID": name.encode()}
        r = await api.http.post("/v1/miners/register", json={"capabilities": {}}, headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["miner_id"] == name
    bad = {"X-Api-Key": MINER_KEY, "X-Miner-ID": b"gpu-\xe9"}  # latin-1 é alone
    r = await api.http.post("/v1/miners/register", json={"capabilities": {}}, headers=bad)
    assert r.status_code == 422
    assert r.json() == {"detail": "X-Miner-ID is not UTF-8 text"}


async def test_a_miner_id_header_with_a_control_character_is_422(api: Api) -> None:
    """An X-Miner-ID with a control character (C0 such as a tab, DEL, C1 such as U+0085) named
    a miner whose ledger account the admin route refuses: 422, as for other invalid ids."""
    for name in ("a\tb", "a\x7fb", "a\u0085b", "a\u009fb"):
        headers = {"X-Api-Key": MINER_KEY, "X-Miner-ID": name.encode()}
        r = await api.http.post("/v1/miners/register", json={"capabilities": {}}, headers=headers)
        assert r.status_code == 422, (name, r.text)
        assert r.json() == {"detail": "X-Miner-ID must not contain control characters"}
    assert api.core.dispatcher.scheduler.miners == {}


async def test_miner_id_bound_to_first_key(api: Api) -> None:
    """Another key claiming a registered miner id -> 403."""
    await api.register("m1")
    r = await api.register("m1", key=MINER_KEY_2)
    assert r.status_code == 403


async def test_miner_id_of_another_key_refused_on_every_route(api: Api) -> None:
    """The binding holds beyond register: another key naming m1 cannot heartbeat, poll (take
    m1's jobs), report results or failures for it; the real m1 still can."""
    await api.register("m1")
    job = await api.submit()
    assert (await api.poll("m1")).status_code == 200
    other = miner_headers("m1", MINER_KEY_2)
    job_id = job["job_id"]
    calls = [
        ("/v1/miners/heartbeat", {}),
        ("/v1/miners/poll", {"max_wait_seconds": 1}),
        (f"/v1/miners/{job_id}/result", {"result": {"output": "forged"}}),
        (f"/v1/miners/{job_id}/fail", {"error_code": "x", "error_message": "forged"}),
        ("/v1/miner/result", {"job_id": job_id, "result": {"output": "forged"}}),
    ]
    for path, body in calls:
        r = await api.http.post(path, json=body, headers=other)
        assert r.status_code == 403, (path, r.status_code, r.text)
        assert "bound to another key" in r.json()["detail"]
    assert (await api.job(job_id))["state"] == "RUNNING"
    r = await api.result(job_id, "m1")
    assert r.status_code == 200
    assert r.json()["receipt"]["provider"] == "m1"


# ---- polling and assignment (22-33) -------------------------------------------------------


async def test_poll_with_nothing_queued_is_204_empty_within_max_wait(api: Api) -> None:
    """22: 204 with an empty body, answered before max_wait_seconds (here 2 s -> about 1 s)."""
    await api.register()
    t0 = time.monotonic()
    r = await api.poll(max_wait=2)
    elapsed = time.monotonic() - t0
    assert r.status_code == 204
    assert r.content == b""
    assert elapsed < 2.0


@pytest.mark.parametrize("max_wait", [30, 3600])
async def test_a_long_poll_is_answered_at_its_cap_inside_the_clients_timeout(
    tmp_path: Path, max_wait: int
) -> None:
    """[compat] cli/miner_management.py polls with max_wait_seconds 30 and a 30 s HTTP
    timeout (rest-api.md §2.3): the wait is capped by MAX_POLL_WAIT_SECONDS (25), so its 204
    comes at 25 s, inside that timeout; so does one asking for the most the schema takes."""
    clock = FakeClock()
    async with running_api(tmp_path, clock=clock) as api:
        assert (await api.register()).status_code == 200
        bg = Background()
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(bg.run, api.poll("m1", max_wait))
                await api.settle()
                assert api.core.dispatcher.scheduler.miners["m1"].polls == 1
                clock.advance(24.9)
                await api.settle()
                assert bg.response is None
                clock.advance(0.1)
        assert bg.response is not None
        assert (bg.response.status_code, bg.response.content) == (204, b"")


async def test_waiting_poll_gets_a_job_submitted_afterwards(api: Api) -> None:
    """A poll waiting in the server is answered by a later submit (a real long-poll)."""
    await api.register()
    async with parked_poll(api) as bg:
        job = await api.submit()
    assert bg.response is not None
    assert bg.response.status_code == 200
    assert bg.response.json()["job_id"] == job["job_id"]


async def test_poll_assigns_and_shows_running(api: Api) -> None:
    """23: 200 {job_id, payload, constraints(all keys)}; the job is RUNNING for that miner."""
    await api.register()
    job = await api.submit(payload={"type": "inference", "prompt": "x"})
    r = await api.poll()
    body = r.json()
    assert body["payload"] == {"type": "inference", "prompt": "x"}
    assert body["constraints"]["bond_required"] is False
    assert body["constraints"]["gpu"] is None
    assert "min_bond_amount" in body["constraints"]
    got = await api.job(job["job_id"])
    assert got["state"] == "RUNNING"
    assert got["assigned_miner_id"] == "m1"


async def test_a_null_max_wait_is_the_default(api: Api) -> None:
    """Optional fields may be sent as null (upstream clients do): a null wait is the default
    wait, not a 500."""
    await api.register()
    job = await api.submit()
    r = await api.http.post(
        "/v1/miners/poll", json={"max_wait_seconds": None}, headers=miner_headers("m1")
    )
    assert r.status_code == 200, r.text
    assert r.json()["job_id"] == job["job_id"]


async def test_one_job_two_concurrent_pollers_exactly_one_wins(api: Api) -> None:
    """24: two miners polling concurrently for one job: one 200, one 204."""
    await api.register("m1")
    await api.register("m2")
    a, b = Background(), Background()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.run, api.poll("m1", 2))
            tg.start_soon(b.run, api.poll("m2", 2))
            miners = api.core.dispatcher.scheduler.miners
            while miners["m1"].polls == 0 or miners["m2"].polls == 0:  # noqa: ASYNC110 - bounded poll
                await anyio.sleep(0.01)
            job = await api.submit()
    assert a.response is not None
    assert b.response is not None
    codes = sorted([a.response.status_code, b.response.status_code])
    assert codes == [200, 204]
    got = await api.job(job["job_id"])
    assert got["assigned_miner_id"] in ("m1", "m2")


async def test_fifo_with_concurrency_two(api: Api) -> None:
    """25: A then B; a miner with concurrency 2 polls twice -> A then B."""
    await api.register(concurrency=2)
    a = await api.submit()
    b = await api.submit()
    assert (await api.poll()).json()["job_id"] == a["job_id"]
    assert (await api.poll()).json()["job_id"] == b["job_id"]


async def test_full_miner_gets_204(api: Api) -> None:
    """26: concurrency 1 holding a job -> 204 although B is queued."""
    await started(api)
    await api.submit()
    assert (await api.poll()).status_code == 204


@pytest.mark.parametrize(
    ("constraints", "good", "bad"),
    [
        ({"region": "eu"}, {"region": "eu"}, {"region": "us"}),
        (
            {"gpu": "RTX 4090"},
            {"capabilities": {"gpus": [{"name": "RTX 4090"}]}},
            {"capabilities": {"gpus": [{"name": "RTX 3090"}]}},
        ),
        (
            {"min_vram_gb": 16},
            {"capabilities": {"gpus": [{"name": "g", "memory_mb": 24576}]}},
            {"capabilities": {"gpus": [{"name": "g", "memory_mb": 8192}]}},
        ),
        (
            {"models": ["a", "b"]},
            {"capabilities": {"models": ["a", "b", "c"]}},
            {"capabilities": {"models": ["a"]}},
        ),
        ({"max_price": 0.05}, {"capabilities": {"price": 0.01}}, {"capabilities": {"price": 0.1}}),
        ({"max_price": 0.05}, {"capabilities": {"price": 0.01}}, {"capabilities": {}}),
    ],
)
async def test_constraints_match(
    api: Api, constraints: dict[str, Any], good: dict[str, Any], bad: dict[str, Any]
) -> None:
    """27-31: region, gpu, min_vram_gb, models, max_price decide who may take the job."""
    bad.setdefault("capabilities", {})
    good.setdefault("capabilities", {})
    await api.register("bad", **bad)
    await api.register("good", **good)
    job = await api.submit(constraints=constraints)
    assert (await api.poll("bad")).status_code == 204
    r = await api.poll("good")
    assert r.status_code == 200
    assert r.json()["job_id"] == job["job_id"]


async def test_unconstrained_job_goes_to_empty_capabilities(api: Api) -> None:
    """32: no constraints -> a miner with empty capabilities takes it."""
    await started(api)


async def test_poll_of_never_registered_miner_is_404(api: Api) -> None:
    """33 [fix]: 404, not 500."""
    r = await api.poll("ghost")
    assert r.status_code == 404
    r = await api.http.get("/v1/miner/jobs?max_wait_seconds=1", headers=miner_headers("ghost"))
    assert r.status_code == 404


# ---- results and receipts (34-45) ---------------------------------------------------------


async def test_result_completes_the_job(api: Api) -> None:
    """34: 200 {status ok, receipt}; the job is COMPLETED with that result."""
    job = await started(api)
    r = await api.result(job["job_id"], result={"output": "x"}, metrics={"duration_ms": 1500})
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["receipt"]["job_id"] == job["job_id"]
    got = await api.job(job["job_id"])
    assert got["state"] == "COMPLETED"
    assert got["result"] == {"output": "x"}


async def test_result_for_unknown_job_is_404(api: Api) -> None:
    """35."""
    await api.register()
    r = await api.result("f" * 32)
    assert r.status_code == 404
    assert r.json() == {"detail": "job not found"}


async def test_result_as_string_is_422(api: Api) -> None:
    """36."""
    job = await started(api)
    r = await api.result(job["job_id"], result="done")
    assert r.status_code == 422


async def test_result_from_non_assignee_is_409(api: Api) -> None:
    """37 [fix]: another miner's result -> 409, the job unchanged."""
    job = await started(api)
    await api.register("m2")
    r = await api.result(job["job_id"], miner_id="m2")
    assert r.status_code == 409
    assert (await api.job(job["job_id"]))["state"] == "RUNNING"


async def test_result_is_idempotent(api: Api) -> None:
    """38 [fix]: the same result twice -> both 200, same receipt, one receipt stored."""
    job = await started(api)
    first = (await api.result(job["job_id"])).json()
    second = (await api.result(job["job_id"])).json()
    assert first["receipt"]["receipt_id"] == second["receipt"]["receipt_id"]
    r = await api.http.get(f"/v1/jobs/{job['job_id']}/receipts", headers={"X-Api-Key": CLIENT_KEY})
    assert len(r.json()["items"]) == 1


async def test_result_and_receipt_reads_after_completion(api: Api) -> None:
    """39-42: /result 200; /receipt == /receipts[-1]; fields; signature verifies; tamper fails."""
    job = await started(api)
    await api.result(job["job_id"], metrics={"duration_ms": 1500})
    h = {"X-Api-Key": CLIENT_KEY}
    res = (await api.http.get(f"/v1/jobs/{job['job_id']}/result", headers=h)).json()
    receipt = (await api.http.get(f"/v1/jobs/{job['job_id']}/receipt", headers=h)).json()
    items = (await api.http.get(f"/v1/jobs/{job['job_id']}/receipts", headers=h)).json()["items"]
    assert res["receipt"] == receipt == items[-1]
    assert res["result"] == {"output": "x"}
    assert receipt["version"] == "1.0"
    assert receipt["provider"] == "m1"
    assert receipt["status"] == "COMPLETED"
    assert receipt["unit_type"] == "gpu_seconds"
    assert receipt["unit_price"] == 0.02
    assert receipt["started_at"] <= receipt["completed_at"]
    assert receipt["metadata"]["job_payload"] == job["payload"]
    assert receipt["signature"]["alg"] == "Ed25519"
    assert receipt["signature"]["key_id"] == api.core.signer.key_id
    assert verify_receipt(receipt, pinned_key_ids=frozenset({api.core.signer.key_id})) == []
    assert verify_receipt({**receipt, "units": receipt["units"] + 1}) != []


async def test_miner_claimed_units_do_not_bill(api: Api) -> None:
    """43-44 [ours]: units and price come from server-observed time, not miner metrics."""
    job = await started(api)
    r = await api.result(job["job_id"], metrics={"units": 4, "unit_price": 0.5, "price": 99})
    receipt = r.json()["receipt"]
    assert receipt["units"] < 4
    assert receipt["price"] == round(receipt["units"] * receipt["unit_price"], 6)
    assert receipt["metadata"]["metrics"]["units"] == 4


async def test_slot_is_free_after_a_result(api: Api) -> None:
    """45: after a result the next poll gets the next job."""
    job = await started(api)
    nxt = await api.submit()
    await api.result(job["job_id"])
    assert (await api.poll()).json()["job_id"] == nxt["job_id"]


# ---- failure, cancel (46-51) --------------------------------------------------------------


async def test_fail_route(api: Api) -> None:
    """46: /fail -> 200; FAILED with the message; missing error_code 422; unknown job 404."""
    job = await started(api)
    path = f"/v1/miners/{job['job_id']}/fail"
    r = await api.http.post(path, json={"error_message": "boom"}, headers=miner_headers("m1"))
    assert r.status_code == 422
    body = {"error_code": "E1", "error_message": "boom"}
    r = await api.http.post(path, json=body, headers=miner_headers("m1"))
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}
    got = await api.job(job["job_id"])
    assert got["state"] == "FAILED"
    assert got["error"] == "boom"
    r = await api.http.post(
        "/v1/miners/" + "e" * 32 + "/fail", json=body, headers=miner_headers("m1")
    )
    assert r.status_code == 404


async def test_slot_is_free_after_fail(api: Api) -> None:
    """47 [fix]: after /fail the next poll gets the next job."""
    job = await started(api)
    nxt = await api.submit()
    await api.http.post(
        f"/v1/miners/{job['job_id']}/fail",
        json={"error_code": "E", "error_message": "x"},
        headers=miner_headers("m1"),
    )
    assert (await api.poll()).json()["job_id"] == nxt["job_id"]


async def test_failed_status_in_result_fails_the_job(api: Api) -> None:
    """48 [fix]: result.status == failed -> FAILED, not COMPLETED."""
    job = await started(api)
    r = await api.result(job["job_id"], result={"status": "failed", "error": "x"})
    assert r.status_code == 200
    got = await api.job(job["job_id"])
    assert got["state"] == "FAILED"
    assert got["error"] == "x"


@pytest.mark.parametrize(
    ("error", "stored"),
    [
        ("e" * 70_000, "e" * 65_536),
        ({"kind": "oom", "gb": 80}, '{"kind":"oom","gb":80}'),
    ],
)
async def test_a_failed_results_error_is_stored_as_fail_takes_it(
    api: Api, error: object, stored: str
) -> None:
    """A `result.status == "failed"` report's error is text as `/fail`'s: one longer than
    `/fail` takes (65,536 characters) is cut to that (it was stored whole, up to the body
    limit), anything but text is stored as JSON (it was Python's repr), and the same report
    again is still its retry."""
    job = await started(api)
    for _ in range(2):
        r = await api.result(job["job_id"], result={"status": "failed", "error": error})
        assert r.status_code == 200
    assert (await api.job(job["job_id"]))["error"] == stored


async def test_a_repeated_failure_report_is_answered_as_the_first(api: Api) -> None:
    """[ours] results are idempotent (the production miner retries a POST whose answer it
    lost): a failure reported again, through /result or /fail, gets the same 200; another
    report for the failed job is still a 409."""
    job = await started(api)
    for _ in range(2):
        r = await api.result(job["job_id"], result={"status": "failed", "error": "x"})
        assert (r.status_code, r.json()) == (200, {"status": "ok", "receipt": None})
    r = await api.result(job["job_id"], result={"status": "failed", "error": "other"})
    assert (r.status_code, r.json()) == (409, {"detail": "job is FAILED"})
    r = await api.result(job["job_id"], result={"status": "completed"})
    assert r.status_code == 409
    second = await api.submit()
    assert (await api.poll()).json()["job_id"] == second["job_id"]
    path = f"/v1/miners/{second['job_id']}/fail"
    body = {"error_code": "E1", "error_message": "boom"}
    for _ in range(2):
        r = await api.http.post(path, json=body, headers=miner_headers("m1"))
        assert (r.status_code, r.json()) == (200, {"status": "ok"})
    assert (await api.job(second["job_id"]))["state"] == "FAILED"


async def test_a_retryable_failure_queues_the_job_again(tmp_path: Path) -> None:
    """[ours] RUNNING -> QUEUED on a retryable failure while attempts remain (charged one),
    then FAILED once they are used up (3 by default). The failing miner gets the job back
    only after the reject pause (5 s, then 10 s): another miner would get it first."""
    clock = FakeClock()
    async with running_api(tmp_path, clock=clock) as api:
        job = await started(api)
        path = f"/v1/miners/{job['job_id']}/fail"
        body = {"error_code": "OOM", "error_message": "out of memory", "retryable": True}
        for pause in (5.0, 10.0):
            r = await api.http.post(path, json=body, headers=miner_headers("m1"))
            assert r.status_code == 200
            got = await api.job(job["job_id"])
            assert (got["state"], got["assigned_miner_id"]) == ("QUEUED", None)
            assert (await api.poll()).status_code == 204  # paused for m1
            clock.advance(pause)
            assert (await api.poll()).json()["job_id"] == job["job_id"]
        r = await api.http.post(path, json=body, headers=miner_headers("m1"))
        assert r.status_code == 200
        got = await api.job(job["job_id"])
        assert got["state"] == "FAILED"
        assert got["error"] == "max attempts reached (3): OOM: out of memory"


async def test_upstream_secondary_fail_and_complete_routes_work(api: Api) -> None:
    """§9 [bug] upstream's /v1/miners/{m}/jobs/{j}/fail always answered 500 and /complete 500
    after committing. Here they do what /fail and /result do, for the miner the path names
    (another miner's name is 403); /complete's output is the result, and a receipt the miner
    sends is ignored: the coordinator signs its own."""
    job = await started(api)
    path = f"/v1/miners/m1/jobs/{job['job_id']}/complete"
    body = {"output": {"text": "done"}, "receipt": {"forged": True}}
    r = await api.http.post(
        f"/v1/miners/m2/jobs/{job['job_id']}/complete", json=body, headers=miner_headers("m1")
    )
    assert r.status_code == 403
    r = await api.http.post(path, json=body, headers=miner_headers("m1"))
    assert r.status_code == 200, r.text
    receipt = r.json()["receipt"]
    assert verify_receipt(receipt) == []
    assert "forged" not in receipt
    assert receipt["metadata"]["result"] == {"text": "done"}
    assert (await api.job(job["job_id"]))["state"] == "COMPLETED"
    r = await api.http.post(path, json=body, headers=miner_headers("m1"))  # a retry: same
    assert r.json()["receipt"] == receipt
    second = await api.submit()
    assert (await api.poll()).json()["job_id"] == second["job_id"]
    fail = {"error_code": "E1", "error_message": "boom"}
    r = await api.http.post(
        f"/v1/miners/m1/jobs/{second['job_id']}/fail", json=fail, headers=miner_headers("m1")
    )
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    got = await api.job(second["job_id"])
    assert (got["state"], got["error"]) == ("FAILED", "boom")


async def test_result_after_cancel_is_409(api: Api) -> None:
    """51 [fix]: cancel while RUNNING, then result -> 409; the job stays CANCELED."""
    job = await started(api)
    r = await api.http.post(f"/v1/jobs/{job['job_id']}/cancel", headers={"X-Api-Key": CLIENT_KEY})
    assert r.json()["state"] == "CANCELED"
    r = await api.result(job["job_id"])
    assert r.status_code == 409
    assert (await api.job(job["job_id"]))["state"] == "CANCELED"


@pytest.mark.parametrize("report", ["result", "fail"])
async def test_a_report_refused_by_a_cancel_not_yet_durable_waits_for_it(
    tmp_path: Path, report: str
) -> None:
    """A result or failure refused because the job was just canceled is answered once the
    cancel is committed (the 409 went out at once: a crash before the commit left the job
    running on a miner that had dropped it, until its lease ran out)."""
    store = RecordingStore()
    async with running_api(tmp_path, clock=FakeClock(), store=store) as api:
        job = await started(api)
        fail = {"error_code": "E1", "error_message": "boom"}
        refused = (
            api.result(job["job_id"])
            if report == "result"
            else api.http.post(
                f"/v1/miners/m1/jobs/{job['job_id']}/fail", json=fail, headers=miner_headers("m1")
            )
        )
        answers = await answered_after_commit(
            api, store, ("cancel", api.cancel(job["job_id"])), (report, refused)
        )
        assert answers == [("cancel", 200), (report, 409)]


@pytest.mark.parametrize("report", ["result", "fail"])
async def test_a_report_refused_by_a_cancel_whose_commit_failed_is_unavailable(
    tmp_path: Path, report: str
) -> None:
    """A result or failure refused because of a cancel whose commit failed was answered 409
    (the writer had stopped, so the refusal did not wait): the miner dropped a job the store
    still has running on it, and the client had been told 503. Like every call after a failed
    commit it is now 503, and says nothing of the cancel."""
    store = FailingStore()
    async with running_api(tmp_path, clock=FakeClock(), store=store) as api:
        job = await started(api)
        store.fail = True
        assert (await api.cancel(job["job_id"])).status_code == 503
        fail = {"error_code": "E1", "error_message": "boom"}
        r = (
            await api.result(job["job_id"])
            if report == "result"
            else await api.http.post(
                f"/v1/miners/m1/jobs/{job['job_id']}/fail", json=fail, headers=miner_headers("m1")
            )
        )
        assert r.status_code == 503, r.text


async def test_expired_job_seen_expired_and_never_polled(api: Api) -> None:
    """52: ttl 1 s -> EXPIRED 'job expired' once past; no poll returns it."""
    job = await api.submit(ttl_seconds=1)
    with anyio.fail_after(5):
        while (got := await api.job(job["job_id"]))["state"] != "EXPIRED":  # noqa: ASYNC110 - bounded poll
            await anyio.sleep(0.05)
    assert got["error"] == "job expired"
    await api.register()
    assert (await api.poll(max_wait=1)).status_code == 204


async def test_lease_expiry_requeues_a_silent_miners_job(tmp_path: Path) -> None:
    """53 [fix]: a job whose REST miner stays silent past the lease is requeued (attempt+1)."""
    async with running_api(tmp_path, clock=SystemClock(), rest_job_lease_seconds=1.0) as api:
        job = await started(api)
        with anyio.fail_after(5):
            while (got := await api.job(job["job_id"]))["state"] != "QUEUED":  # noqa: ASYNC110 - bounded poll
                await anyio.sleep(0.05)
        assert got["attempt"] == 1
        r = await api.poll("m1")
        assert r.json()["attempt"] == 2


async def test_seed_doc_aliases(api: Api) -> None:
    """§2.8: /v1/miner/register, heartbeat, GET jobs, POST result with job_id in the body."""
    h = miner_headers("m1")
    assert (
        await api.http.post("/v1/miner/register", json={"capabilities": {}}, headers=h)
    ).status_code == 200
    assert (await api.http.post("/v1/miner/heartbeat", json={}, headers=h)).status_code == 200
    job = await api.submit()
    r = await api.http.get("/v1/miner/jobs?max_wait_seconds=1", headers=h)
    assert r.json()["job_id"] == job["job_id"]
    r = await api.http.post(
        "/v1/miner/result", json={"job_id": job["job_id"], "result": {"ok": 1}}, headers=h
    )
    assert r.status_code == 200
    assert r.json()["receipt"]["job_id"] == job["job_id"]


async def test_head_of_the_get_poll_takes_no_job(api: Api) -> None:
    """HEAD /v1/miner/jobs is refused (405, Allow: GET): as the HEAD Starlette adds to every
    GET route it ran the poll, assigned a queued job, and the server dropped the body that
    named it, so the job sat RUNNING for a miner that never saw it until its lease ended."""
    h = miner_headers("m1")
    await api.register()
    job = await api.submit()
    r = await api.http.head("/v1/miner/jobs?max_wait_seconds=1", headers=h)
    assert r.status_code == 405
    assert r.headers["allow"] == "GET"
    got = await api.job(job["job_id"])
    assert got["state"] == "QUEUED"
    r = await api.http.get("/v1/miner/jobs?max_wait_seconds=1", headers=h)
    assert r.json()["job_id"] == job["job_id"]


async def test_rest_miner_survives_a_restart(tmp_path: Path) -> None:
    """A miner registered before a restart can poll after it without registering again."""
    async with running_api(tmp_path, clock=SystemClock()) as api:
        job = await started(api)
    async with running_api(tmp_path, clock=SystemClock()) as api:
        assert (await api.job(job["job_id"]))["state"] == "RUNNING"
        assert (await api.result(job["job_id"])).status_code == 200
        nxt = await api.submit()
        assert (await api.poll()).json()["job_id"] == nxt["job_id"]


async def test_a_stored_miner_id_with_a_control_character_still_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ids with control characters are refused now, but a store from before holds some: they
    are read back at start-up as they are (the admin list shows them; nothing checks them)."""
    with monkeypatch.context() as before_the_fix:
        before_the_fix.setattr("web.rest_miners.has_control_character", lambda _: False)
        async with running_api(tmp_path, clock=SystemClock()) as api:
            job = await started(api, "a\tb")
    async with running_api(tmp_path, clock=SystemClock()) as api:
        assert (await api.job(job["job_id"]))["assigned_miner_id"] == "a\tb"
        miners = (await api.admin("/v1/admin/miners"))["items"]
        assert [m["miner_id"] for m in miners] == ["a\tb"]


# ---- upstream's secondary routes: PUT …/capabilities, DELETE (rest-api.md §2.3) ------------


async def test_capabilities_update_keeps_the_running_job_and_matches_anew(api: Api) -> None:
    """PUT …/capabilities changes the miner in place: the job it runs stays its own (unlike a
    re-register, a restart), and jobs needing the new capability now reach it."""
    job = await started(api)
    caps = {"gpus": [{"name": "A100", "memory_gb": 80}]}
    r = await api.http.put(
        "/v1/miners/m1/capabilities",
        json={"capabilities": caps, "concurrency": 2},
        headers=miner_headers("m1"),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert {k: body[k] for k in ("miner_id", "status", "capabilities")} == {
        "miner_id": "m1",
        "status": "updated",
        "capabilities": caps,
    }
    assert body["session_token"]
    got = await api.job(job["job_id"])
    assert (got["state"], got["assigned_miner_id"]) == ("RUNNING", "m1")
    gpu_job = await api.submit(constraints={"gpu": "A100"})
    r = await api.poll("m1")  # concurrency 2: a second slot, for a job only an A100 can run
    assert r.status_code == 200, r.text
    assert r.json()["job_id"] == gpu_job["job_id"]
    assert (await api.result(job["job_id"])).status_code == 200


async def test_capabilities_update_refusals(api: Api) -> None:
    await api.register("m1")
    put = api.http.put
    body = {"capabilities": {}}
    r = await put("/v1/miners/m2/capabilities", json=body, headers=miner_headers("m1"))
    assert r.status_code == 403  # the path names another miner
    r = await put("/v1/miners/m2/capabilities", json=body, headers=miner_headers("m2"))
    assert r.status_code == 404  # never registered: register first
    r = await put("/v1/miners/m1/capabilities", json={}, headers=miner_headers("m1"))
    assert r.status_code == 422


async def test_deregister_requeues_its_job_and_stops_its_polls(api: Api) -> None:
    """DELETE: the job goes to the next miner, the miner's late result is refused, its polls
    are 404 until it registers again (upstream let a deregistered miner poll on)."""
    job = await started(api)
    r = await api.http.delete("/v1/miners/m1", headers=miner_headers("m1"))
    assert r.status_code == 200, r.text
    assert r.json() == {"miner_id": "m1", "status": "deregistered"}
    got = await api.job(job["job_id"])
    assert (got["state"], got["assigned_miner_id"]) == ("QUEUED", None)
    assert (await api.poll("m1")).status_code == 404
    assert (await api.result(job["job_id"], "m1")).status_code in (404, 409)
    assert (await api.http.delete("/v1/miners/m1", headers=miner_headers("m1"))).status_code == 404
    await api.register("m2")
    r = await api.poll("m2")
    assert (r.json()["job_id"], r.json()["attempt"]) == (job["job_id"], 2)


async def test_deregister_ends_a_waiting_poll(api: Api) -> None:
    await api.register()
    async with parked_poll(api) as bg:
        r = await api.http.delete("/v1/miners/m1", headers=miner_headers("m1"))
        assert r.status_code == 200
    assert bg.response is not None
    assert bg.response.status_code == 204


async def test_calls_of_unregistered_miner_ids_leave_nothing_in_memory(api: Api) -> None:
    """Results and failures under ids no REST miner holds (made up, or deregistered while a
    poll waited) are refused and leave no liveness entry: each such id stayed in memory for
    the life of the process, so a miner key could grow it without bound."""
    d = api.core.dispatcher
    body = {"error_code": "E1", "error_message": "boom"}
    for i in range(20):
        assert (await api.result("e" * 32, f"ghost-{i}")).status_code == 404
        path = "/v1/miners/" + "e" * 32 + "/fail"
        r = await api.http.post(path, json=body, headers=miner_headers(f"ghost-{i}"))
        assert r.status_code == 404
    assert d._rest_seen == {}
    await api.register("m1")
    async with parked_poll(api) as bg:
        r = await api.http.delete("/v1/miners/m1", headers=miner_headers("m1"))
        assert r.status_code == 200
    assert bg.response is not None
    assert bg.response.status_code == 204
    assert d._rest_seen == {}


async def test_an_operator_disconnect_ends_a_rest_miners_polls_and_leaves_no_slot(
    api: Api,
) -> None:
    """POST /v1/admin/miners/{id}/disconnect of a polling miner that holds a job: its waiting
    poll ends at once (204), and once it registers again (within the resume grace) queued
    jobs wait for its next polls. Before, the poll waited out its deadline and still counted
    as waiting after the registration, so a job was assigned to no poll, handed back ("poll
    gone") and cost an attempt number (found by a hunt)."""
    await api.register("m1", concurrency=2)
    first = await api.submit()
    assert (await api.poll("m1")).status_code == 200
    admin = {"X-Api-Key": ADMIN_KEY}
    async with parked_poll(api) as bg:
        r = await api.http.post("/v1/admin/miners/m1/disconnect", headers=admin)
        assert r.status_code == 200, r.text
    assert bg.response is not None
    assert bg.response.status_code == 204
    assert (await api.register("m1", concurrency=2)).status_code == 200
    job = await api.submit()
    await api.settle()
    got = await api.job(job["job_id"])
    assert (got["state"], got["attempt"]) == ("QUEUED", 0)
    # Both slots poll: the first job (requeued by the restart) on its second attempt, and
    # this one on its first: neither went to an empty slot in between.
    polls = [(await api.poll("m1")).json() for _ in "ab"]
    taken = {p["job_id"]: p["attempt"] for p in polls}
    assert taken == {first["job_id"]: 2, job["job_id"]: 1}


async def test_deregister_only_by_the_miner_itself(api: Api) -> None:
    await api.register("m1")
    await api.register("m2", key=MINER_KEY_2)
    r = await api.http.delete("/v1/miners/m1", headers=miner_headers("m2", MINER_KEY_2))
    assert r.status_code == 403  # the path names another miner
    r = await api.http.delete("/v1/miners/m1", headers=miner_headers("m1", MINER_KEY_2))
    assert r.status_code == 403  # m1 is bound to another key
    assert (await api.poll("m1")).status_code == 204  # still registered


async def test_deregistered_miner_stays_gone_after_a_restart(tmp_path: Path) -> None:
    async with running_api(tmp_path, clock=SystemClock()) as api:
        await api.register("m1")
        assert (
            await api.http.delete("/v1/miners/m1", headers=miner_headers("m1"))
        ).status_code == 200
    async with running_api(tmp_path, clock=SystemClock()) as api:
        assert (await api.poll("m1")).status_code == 404
        assert (await api.register("m1", key=MINER_KEY_2)).status_code == 403  # still bound
        assert (await api.register("m1")).status_code == 200
        assert (await api.poll("m1")).status_code == 204


async def test_a_miner_key_is_rotated_as_docs_ops_md_says(tmp_path: Path) -> None:
    """A miner id stays bound to the key that first used it, so a rotated key got 403 for it
    for good, and no document said what to do. The documented procedure (docs/ops.md: the
    coordinator stopped, the miners row's key_hash set to the new key's SHA-256) moves the id,
    its account and its history to the new key; the old key is refused from then on."""
    async with running_api(tmp_path, clock=SystemClock()) as api:
        assert (await api.register("gpu-1")).status_code == 200
    with closing(sqlite3.connect(tmp_path / "coordinator.db")) as db, db:
        db.execute(
            "UPDATE miners SET key_hash = ? WHERE miner_id = ?",
            (hashlib.sha256(MINER_KEY_2.encode()).hexdigest(), "gpu-1"),
        )
    async with running_api(tmp_path, clock=SystemClock()) as api:
        assert (await api.register("gpu-1", key=MINER_KEY_2)).status_code == 200
        assert (await api.poll("gpu-1", key=MINER_KEY_2)).status_code == 204
        assert (await api.register("gpu-1")).status_code == 403


async def test_own_jobs_lists_this_miners_jobs_newest_first(api: Api) -> None:
    """POST /v1/miners/{id}/jobs: only the jobs the miner holds or ran, filtered by state and
    type; only the miner itself may list them (upstream: any miner key, any miner)."""
    done = await started(api, "m1")
    assert (await api.result(done["job_id"], "m1")).status_code == 200
    running = await started(api, "m1")
    await started(api, "m2")
    h = miner_headers("m1")
    r = await api.http.post("/v1/miners/m1/jobs?min_reward=5", headers=h)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [j["job_id"] for j in body["jobs"]] == [running["job_id"], done["job_id"]]
    assert (body["total"], body["limit"], body["offset"], body["miner_id"]) == (2, 20, 0, "m1")
    r = await api.http.post("/v1/miners/m1/jobs?job_status=completed&limit=1", headers=h)
    assert [j["state"] for j in r.json()["jobs"]] == ["COMPLETED"]
    r = await api.http.post("/v1/miners/m1/jobs?job_type=other", headers=h)
    assert r.json()["total"] == 0
    r = await api.http.post("/v1/miners/m1/jobs?job_status=bogus", headers=h)
    assert r.status_code == 422
    assert "job_status" in r.json()["detail"]
    for bad in ("abc", "nan", "inf"):
        r = await api.http.post(f"/v1/miners/m1/jobs?min_reward={bad}", headers=h)
        assert r.status_code == 422
        assert r.json()["detail"] == "query parameter min_reward must be a finite number"
    assert (await api.http.post("/v1/miners/m2/jobs", headers=h)).status_code == 403
    # A filter of another name (the client list's status) was ignored: every job was listed.
    r = await api.http.post("/v1/miners/m1/jobs?status=completed", headers=h)
    assert r.status_code == 422
    assert r.json()["detail"] == (
        "unknown query parameter status; this route takes limit, offset, job_type, "
        "job_status, min_reward"
    )


async def test_earnings_of_prices_near_the_float_maximum_stay_finite(tmp_path: Path) -> None:
    """A miner advertising 1e308 gets receipts priced at the largest float; after two of them
    the sums must stay numbers (an infinite sum is written as null), as must the history."""
    clock = FakeClock()
    async with running_api(tmp_path, clock) as api:
        for _ in range(2):
            job = await started(api, "m1", price=1e308)
            clock.advance(10)
            assert (await api.result(job["job_id"], "m1")).status_code == 200
        r = await api.http.post("/v1/miners/m1/earnings", headers=miner_headers("m1"))
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["total_earnings"] == got["pending_earnings"] == 2 * 10**10  # 1e18 units each
        assert got["paid_earnings"] == 0.0
        assert [e["amount"] for e in got["earnings_history"]] == [1.7976931348623157e308] * 2


async def test_earnings_window_and_refusals(tmp_path: Path) -> None:
    """from_time/to_time (Unix seconds or ISO-8601) bound the receipts counted; upstream
    echoed them and summed everything. Only the miner itself may ask."""
    clock = FakeClock()
    async with running_api(tmp_path, clock) as api:
        first = await started(api, "m1", price=0.5)
        clock.advance(2)
        assert (await api.result(first["job_id"], "m1")).status_code == 200  # price 1.0
        clock.advance(100)
        second = await api.submit()
        assert (await api.poll("m1")).json()["job_id"] == second["job_id"]
        clock.advance(4)
        assert (await api.result(second["job_id"], "m1")).status_code == 200  # price 2.0
        split = int(clock.now()) - 50
        h = miner_headers("m1")

        async def earned(query: str) -> Any:
            r = await api.http.post(f"/v1/miners/m1/earnings{query}", headers=h)
            assert r.status_code == 200, r.text
            return r.json()

        everything = await earned("")
        assert (everything["total_earnings"], everything["completed_jobs"]) == (3.0, 2)
        assert everything["pending_earnings"] == 3.0  # billing off: nothing is paid out
        iso = iso_time(split).replace(".000Z", "Z")
        late = await earned(f"?from_time={iso}")
        assert (late["total_earnings"], late["completed_jobs"], late["from_time"]) == (2.0, 1, iso)
        early = await earned(f"?to_time={split}.5")  # fractional Unix seconds too
        assert [e["job_id"] for e in early["earnings_history"]] == [first["job_id"]]
        r = await api.http.post("/v1/miners/m1/earnings?from_time=yesterday", headers=h)
        assert r.status_code == 422
        assert "from_time" in r.json()["detail"]
        assert (await api.http.post("/v1/miners/m2/earnings", headers=h)).status_code == 403


async def test_earnings_read_no_receipt_bodies(tmp_path: Path) -> None:
    """/v1/miners/{id}/earnings read its 20 newest receipts whole, the jobs' payloads and
    results in their metadata included (up to a request body each), to list four fields of
    each: measured, 0.7 s on the event loop and 330 MB more memory per call with receipts of
    about 1.3 MB. The store reads only those fields."""
    clock = FakeClock()
    async with running_api(tmp_path, clock) as api:
        big = list(range(100_000))  # about 600 kB of JSON, several MB once parsed
        await api.register("m1", capabilities={"price": 0.5})
        for _ in range(2):
            job = await api.submit(payload={"type": "t", "input": big})
            assert (await api.poll("m1")).json()["job_id"] == job["job_id"]
            clock.advance(2)
            assert (await api.result(job["job_id"], result={"output": big})).status_code == 200
        h = miner_headers("m1")
        await api.http.post("/v1/miners/m1/earnings", headers=h)  # warm up: imports, caches
        tracemalloc.start()
        try:
            r = await api.http.post("/v1/miners/m1/earnings", headers=h)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert r.status_code == 200, r.text
        [newest, _] = r.json()["earnings_history"]
        receipt = (await api.job(job["job_id"]))["receipt_id"]
        assert newest == {
            "job_id": job["job_id"],
            "receipt_id": receipt,
            "amount": 1.0,
            "completed_at": int(clock.now()),
        }
        assert peak < 1_000_000, peak


async def test_a_poll_ended_by_deregistration_leaves_a_new_registrations_poll_alone(
    api: Api,
) -> None:
    """The miner deregisters, registers again and polls before the deregistration commits:
    the old poll, ending afterwards, must not withdraw the new poll's slot (which would leave
    it waiting with no job ever offered)."""
    await api.register("m1")
    d = api.core.dispatcher
    key = d._bindings["m1"]
    results: dict[str, Any] = {}

    async def run(name: str, coro: Any) -> None:
        results[name] = await coro

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "old", d.rest_poll("m1", 20))
            while d.scheduler.miners["m1"].polls == 0:  # noqa: ASYNC110 - bounded poll
                await anyio.sleep(0.01)
            # All three run up to their commit wait before the writer's next batch.
            tg.start_soon(run, "delete", d.rest_deregister("m1"))
            tg.start_soon(
                run,
                "register",
                d.rest_register(
                    miner_id="m1", key_hash=key, capabilities={}, concurrency=1, region=None
                ),
            )
            tg.start_soon(run, "new", d.rest_poll("m1", 20))
            while "old" not in results:  # noqa: ASYNC110 - bounded poll
                await anyio.sleep(0.01)
            await api.settle()
            assert d.scheduler.miners["m1"].polls == 1
            job = await api.submit()
    assert results["old"] is None
    assert results["new"].job_id == job["job_id"]


async def test_a_rest_miner_disconnected_by_an_operator_is_back_at_its_next_call(api: Api) -> None:
    """The production miner registers only at start-up: after an operator's disconnect its
    next poll reconnects it and resumes the job it still runs, as a socket miner's reconnect
    does (every call got 404 until it registered again, i.e. until someone restarted it)."""
    await api.register("m1", concurrency=2)
    held = await api.submit()
    assert (await api.poll("m1")).json()["job_id"] == held["job_id"]
    r = await api.http.post("/v1/admin/miners/m1/disconnect", headers={"X-Api-Key": ADMIN_KEY})
    assert r.status_code == 200, r.text
    # Its result comes first (the production miner runs a job, then posts it): accepted, on
    # the job's first attempt.
    assert (await api.result(held["job_id"], "m1")).status_code == 200
    done = await api.job(held["job_id"])
    assert (done["state"], done["attempt"]) == ("COMPLETED", 1)
    queued = await api.submit()
    polled = await api.poll("m1")
    assert polled.status_code == 200, polled.text
    assert (polled.json()["job_id"], polled.json()["attempt"]) == (queued["job_id"], 1)
    # Once back it is disconnected like any connected miner.
    r = await api.http.post("/v1/admin/miners/m1/disconnect", headers={"X-Api-Key": ADMIN_KEY})
    assert r.status_code == 200, r.text
    heartbeat = await api.http.post("/v1/miners/heartbeat", json={}, headers=miner_headers("m1"))
    assert heartbeat.status_code == 200, heartbeat.text


async def test_a_rest_miner_back_while_its_disconnect_commits_stays_back(tmp_path: Path) -> None:
    """A heartbeat that arrives while the operator's disconnect is being committed brings the
    miner back at once; the disconnect's close, performed after that commit, must not end the
    new session (it dropped its sink: every later poll was 404 until the miner registered
    again, and a job assigned to it meanwhile reached nobody)."""
    store = RecordingStore()
    async with running_api(tmp_path, clock=FakeClock(), store=store) as api:
        held = await started(api, "m1")
        answers: dict[str, int] = {}

        async def answer(name: str, request: Awaitable[httpx.Response]) -> None:
            answers[name] = (await request).status_code

        store.block_commits()
        submit = api.http.post("/v1/jobs", json={"payload": {}}, headers={"X-Api-Key": CLIENT_KEY})
        disconnect = api.http.post(
            "/v1/admin/miners/m1/disconnect", headers={"X-Api-Key": ADMIN_KEY}
        )
        heartbeat = api.http.post("/v1/miners/heartbeat", json={}, headers=miner_headers("m1"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(answer, "submit", submit)  # another client's: a commit in flight
            await api.settle()
            tg.start_soon(answer, "disconnect", disconnect)
            await api.settle()  # its close waits for the batch in flight
            tg.start_soon(answer, "heartbeat", heartbeat)
            await api.settle()
            store.release_commits()
        assert answers == {"submit": 201, "disconnect": 200, "heartbeat": 200}
        assert (await api.result(held["job_id"], "m1")).status_code == 200
        polled = await api.poll("m1")  # the job submitted above
        assert polled.status_code == 200, polled.text


async def test_a_rest_miner_back_after_an_operators_disconnect_keeps_its_job(
    tmp_path: Path,
) -> None:
    """Back within the resume grace (here by a heartbeat), it resumes the job it runs: the
    grace passing does not requeue it."""
    clock = FakeClock()
    async with running_api(tmp_path, clock) as api:
        held = await started(api, "m1")
        r = await api.http.post("/v1/admin/miners/m1/disconnect", headers={"X-Api-Key": ADMIN_KEY})
        assert r.status_code == 200, r.text
        h = miner_headers("m1")
        assert (await api.http.post("/v1/miners/heartbeat", json={}, headers=h)).status_code == 200
        clock.advance(api.core.settings.resume_grace_seconds + 1)
        await api.settle()
        job = await api.job(held["job_id"])
        assert (job["state"], job["attempt"]) == ("RUNNING", 1)
        assert (await api.result(held["job_id"], "m1")).status_code == 200


@pytest.mark.parametrize("slash", ["/", "%2F"])
async def test_a_miner_id_with_a_slash_reaches_its_own_path_routes(api: Api, slash: str) -> None:
    """An id such as "rack-2/gpu-1" named in the path, as sent ("/") or percent-encoded
    ("%2F", which the server decodes before routing), reaches the routes that name the miner:
    upstream's "{miner_id}" stops at the first "/", so they answered 404."""
    miner = "rack-2/gpu-1"
    at = "/v1/miners/" + miner.replace("/", slash)
    h = miner_headers(miner)
    job = await started(api, miner)
    r = await api.http.put(f"{at}/capabilities", json={"capabilities": {}}, headers=h)
    assert (r.status_code, r.json()["miner_id"]) == (200, miner), r.text
    r = await api.http.post(f"{at}/jobs", headers=h)
    assert (r.status_code, r.json()["miner_id"], r.json()["total"]) == (200, miner, 1), r.text
    r = await api.http.post(f"{at}/jobs/{job['job_id']}/complete", json={"output": {}}, headers=h)
    assert r.status_code == 200, r.text
    r = await api.http.post(f"{at}/earnings", headers=h)
    assert (r.status_code, r.json()["completed_jobs"]) == (200, 1), r.text
    second = await api.submit()
    assert (await api.poll(miner)).json()["job_id"] == second["job_id"]
    fail = {"error_code": "E1", "error_message": "boom"}
    r = await api.http.post(f"{at}/jobs/{second['job_id']}/fail", json=fail, headers=h)
    assert r.status_code == 200, r.text
    r = await api.http.post(f"{at}/jobs", headers=miner_headers("rack-2"))
    assert r.status_code == 403  # "rack-2" is another miner: the path names all of the id
    r = await api.http.delete(at, headers=h)
    assert r.json() == {"miner_id": miner, "status": "deregistered"}


async def test_a_trailing_slash_on_a_miner_route_redirects_as_on_every_other_route(
    api: Api,
) -> None:
    """``POST /v1/miners/register/`` (a trailing slash) was 405 "Method Not Allowed" with
    ``Allow: DELETE``: ``DELETE /v1/miners/{miner_id}`` takes any rest of the path as an id,
    and that partial match stopped the router before the redirect every other route's
    trailing slash gets (a 307 to the route without it, as upstream answers; a client that
    follows redirects, as the production miner's ``requests`` does, then reaches it)."""
    job = await started(api)
    h = miner_headers("m1")
    for method, path in [
        ("POST", "/v1/miners/register/"),
        ("POST", "/v1/miners/heartbeat/"),
        ("POST", "/v1/miners/poll/"),
        ("POST", f"/v1/miners/{job['job_id']}/result/"),
        ("POST", f"/v1/miners/{job['job_id']}/fail/"),
        ("POST", "/v1/miners/m1/jobs/"),
        ("POST", "/v1/miners/m1/earnings/"),
        ("PUT", "/v1/miners/m1/capabilities/"),
        ("POST", "/v1/jobs/"),  # as before: the other routes' trailing slash
    ]:
        r = await api.http.request(method, path, headers=h)
        assert r.status_code == 307, (method, path, r.status_code, r.text)
        assert r.headers["location"] == "http://test" + path.rstrip("/")
    followed = await api.http.post(
        "/v1/miners/register/", json={"capabilities": {}}, headers=h, follow_redirects=True
    )
    assert followed.status_code == 200, followed.text
    assert followed.json()["miner_id"] == "m1"
    # A path that means something as it is sent is not redirected: here the id "m1/".
    r = await api.http.delete("/v1/miners/m1/", headers=h)
    assert r.status_code == 403, r.text


async def test_rest_jobs_count_their_bodies_against_the_retention_bytes(api: Api) -> None:
    """A job's payload and result count as the bodies that brought them: what
    TERMINAL_RETENTION_BYTES bounds once it ends."""
    assert (await api.register("m1")).status_code == 200
    job = await api.submit(payload={"image": "p" * 50_000})
    assert (await api.poll("m1")).json()["job_id"] == job["job_id"]
    assert (await api.result(job["job_id"], result={"image": "r" * 80_000})).status_code == 200
    assert 130_000 < api.core.dispatcher.scheduler._terminal[job["job_id"]] < 130_500


@pytest.mark.parametrize("report", ["result", "fail"])
async def test_a_report_naming_an_earlier_attempt_is_refused(tmp_path: Path, report: str) -> None:
    """A REST miner whose lease ran out and that polled the same job again (attempt 2) had its
    late report of attempt 1 taken for attempt 2's (REST bodies named no attempt: fenced by
    the miner id only). A body may now name the attempt its poll answer gave; an earlier one is
    refused 409 and changes nothing, and the current one is taken. Without it, as upstream."""
    clock = FakeClock()
    async with running_api(tmp_path, clock=clock, rest_job_lease_seconds=10.0) as api:
        job = await started(api)
        clock.advance(11)
        await api.settle()
        assert (await api.job(job["job_id"]))["state"] == "QUEUED"
        r = await api.poll("m1")
        assert (r.json()["job_id"], r.json()["attempt"]) == (job["job_id"], 2)

        async def send(attempt: int) -> httpx.Response:
            if report == "result":
                return await api.result(job["job_id"], attempt=attempt)
            body = {"error_code": "E1", "error_message": "boom", "attempt": attempt}
            return await api.http.post(
                f"/v1/miners/m1/jobs/{job['job_id']}/fail", json=body, headers=miner_headers("m1")
            )

        r = await send(1)
        assert r.status_code == 409, r.text
        assert r.json()["detail"] == "attempt 1 is over: the job runs as attempt 2"
        assert (await api.job(job["job_id"]))["state"] == "RUNNING"
        assert (await send(2)).status_code == 200
        ended = await api.job(job["job_id"])
        assert (ended["state"], ended["attempt"]) == (
            "COMPLETED" if report == "result" else "FAILED",
            2,
        )


@pytest.mark.parametrize("call", ["heartbeat", "poll", "update"])
async def test_a_miner_refused_as_unregistered_is_answered_after_its_deregistration_commits(
    tmp_path: Path, call: str
) -> None:
    """A REST miner's call while its deregistration was being committed was answered 404 "miner
    not registered" at once (a failed commit then stops the coordinator, and the miner is
    still registered after the restart). It is answered once that commit is done."""
    store = RecordingStore()
    async with running_api(tmp_path, clock=FakeClock(), store=store) as api:
        assert (await api.register("m1")).status_code == 200
        headers = miner_headers("m1")
        requests = {
            "heartbeat": lambda: api.http.post("/v1/miners/heartbeat", json={}, headers=headers),
            "poll": lambda: api.poll("m1"),
            "update": lambda: api.http.put(
                "/v1/miners/m1/capabilities", json={"capabilities": {}}, headers=headers
            ),
        }
        answers = await answered_after_commit(
            api,
            store,
            ("deregister", api.http.delete("/v1/miners/m1", headers=headers)),
            (call, requests[call]()),
        )
        assert answers == [("deregister", 200), (call, 404)]


async def test_a_late_result_of_an_earlier_attempt_is_refused_after_the_job_left_memory(
    tmp_path: Path,
) -> None:
    """The attempt a result names was checked while the ended job was still in memory (409)
    but not once it had left it (the stored receipt's path): the same late result of attempt
    1 then got 200 with attempt 2's receipt. It is refused either way."""
    clock = FakeClock()
    settings: dict[str, Any] = {"rest_job_lease_seconds": 10.0, "terminal_retention_bytes": 1}
    async with running_api(tmp_path, clock=clock, **settings) as api:
        job = await started(api)
        clock.advance(11)
        await api.settle()
        assert (await api.poll("m1")).json()["attempt"] == 2
        done = await api.result(job["job_id"], attempt=2)
        assert done.status_code == 200, done.text
        late = await api.result(job["job_id"], attempt=1)
        assert (late.status_code, late.json()["detail"]) == (409, "job is COMPLETED")
        other = await started(api)  # another job ends: the first one leaves memory
        assert (await api.result(other["job_id"])).status_code == 200
        assert job["job_id"] not in api.core.dispatcher.scheduler.jobs
        late = await api.result(job["job_id"], attempt=1)
        assert (late.status_code, late.json()["detail"]) == (409, "job is COMPLETED"), late.text
        again = await api.result(job["job_id"], attempt=2)  # the accepted one's retry
        assert again.json()["receipt"] == done.json()["receipt"]
        assert (await api.result(job["job_id"])).json()["receipt"] == done.json()["receipt"]


@pytest.mark.parametrize("route", ["/v1/miners/{job}/fail", "/v1/miners/{job}/result"])
async def test_a_repeated_failure_report_of_an_earlier_attempt_is_refused(
    tmp_path: Path, route: str
) -> None:
    """A failure report that repeats the one that failed the job is answered 200 as the first
    was (a retry after a lost answer), but the attempt it named was not compared: attempt 1's
    late report, with the message attempt 2 failed with, got 200 although attempt 1 was over
    (found by the input hunt; a late result of attempt 1 is a 409). It is refused 409, in
    memory and once the job left it; the report of attempt 2 is still answered 200."""
    clock = FakeClock()
    settings: dict[str, Any] = {"rest_job_lease_seconds": 10.0, "terminal_retention_bytes": 1}
    async with running_api(tmp_path, clock=clock, **settings) as api:
        job = await started(api)
        clock.advance(11)
        await api.settle()
        assert (await api.poll("m1")).json()["attempt"] == 2

        async def report(attempt: int | None) -> httpx.Response:
            path = route.format(job=job["job_id"])
            if route.endswith("/fail"):
                body: dict[str, Any] = {"error_code": "E1", "error_message": "boom"}
            else:
                body = {"result": {"status": "failed", "error": "boom"}}
            if attempt is not None:
                body["attempt"] = attempt
            return await api.http.post(path, json=body, headers=miner_headers("m1"))

        assert (await report(2)).status_code == 200
        for left_memory in (False, True):
            if left_memory:
                other = await started(api)  # another job ends: the first one leaves memory
                assert (await api.result(other["job_id"])).status_code == 200
                assert job["job_id"] not in api.core.dispatcher.scheduler.jobs
            late = await report(1)
            assert (late.status_code, late.json()) == (409, {"detail": "job is FAILED"})
            assert (await report(2)).status_code == 200  # the accepted report's retry
            assert (await report(None)).status_code == 200
        failed = await api.job(job["job_id"])
        assert (failed["state"], failed["attempt"], failed["error"]) == ("FAILED", 2, "boom")


async def test_a_report_may_name_an_attempt_past_a_million(api: Api) -> None:
    """Every assignment is an attempt number (rejects, accept timeouts and polls gone too): a
    long-lived job can pass 1,000,000, and a REST miner naming the attempt its poll answer gave
    was refused 422 (found by the input hunt). Bounded as the socket bounds it (2**62)."""
    assert (await api.register("m1")).status_code == 200
    job = await api.submit()
    api.core.dispatcher.scheduler.jobs[job["job_id"]].attempt = 1_000_000
    polled = (await api.poll("m1")).json()
    assert (polled["job_id"], polled["attempt"]) == (job["job_id"], 1_000_001)
    r = await api.result(job["job_id"], attempt=1_000_001)
    assert r.status_code == 200, r.text
    assert r.json()["receipt"]["attempt"] == 1_000_001
    r = await api.result(job["job_id"], attempt=2**62 + 1)
    assert r.status_code == 422


async def test_a_miner_has_at_most_concurrency_polls_parked_the_newest_win(api: Api) -> None:
    """Each poll a miner sent waited its whole time (up to 25 s) however many it had parked:
    one miner id held any number of requests, tasks and sockets, of which at most
    ``concurrency`` could ever be given a job. Past ``concurrency`` the oldest parked poll now
    ends at once (204, as if its wait had run out) and the newest waits: a miner whose
    connection was dropped on the way keeps being served by its new poll."""
    assert (await api.register("m1", concurrency=2)).status_code == 200
    scheduler = api.core.dispatcher.scheduler
    polls = [Background() for _ in range(4)]
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for n, bg in enumerate(polls):
                tg.start_soon(bg.run, api.poll("m1", 20))
                while scheduler.miners["m1"].polls < min(n + 1, 2):  # noqa: ASYNC110 - bounded poll
                    await anyio.sleep(0.01)
            while polls[1].response is None:  # noqa: ASYNC110 - bounded poll
                await anyio.sleep(0.01)
            ended = [bg.response.status_code for bg in polls[:2] if bg.response is not None]
            parked = scheduler.miners["m1"].polls
            job = await api.submit()
            while polls[2].response is None:  # noqa: ASYNC110 - bounded poll
                await anyio.sleep(0.01)
            # Deregistering ends the poll still parked (204).
            r = await api.http.delete("/v1/miners/m1", headers=miner_headers("m1"))
            assert r.status_code == 200
    assert ended == [204, 204]
    assert parked == 2
    answered = [bg.response for bg in polls[2:]]
    assert [r.status_code for r in answered if r is not None] == [200, 204]
    assert polls[2].response is not None
    assert polls[2].response.json()["job_id"] == job["job_id"]
