"""The four field clients of rest-api.md §7, replayed request by request against the app."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from dispatcher.clock import SystemClock
from tests.conftest import CLIENT_KEY, MINER_KEY
from tests.web.rest_harness import Api, running_api

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    import httpx

pytestmark = pytest.mark.anyio

TERMINAL = {"COMPLETED", "FAILED", "CANCELED", "EXPIRED"}


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async with running_api(tmp_path, clock=SystemClock()) as a:
        yield a


class FieldClient:
    """One field program: its fixed headers and its per-call timeout (enforced, not just passed)."""

    def __init__(self, api: Api, headers: dict[str, str], timeout: float) -> None:
        self.http = api.http
        self.headers = headers
        self.timeout = timeout

    async def send(self, request: httpx.Request) -> httpx.Response:
        """Send a prepared request; fail if the server takes longer than the client would wait."""
        with anyio.fail_after(self.timeout):
            return await self.http.send(request)

    async def call(
        self, method: str, path: str, *, json: Any = None, auth: bool = True
    ) -> httpx.Response:
        """A JSON call as the client sends it (``auth=False``: a public call without the key)."""
        request = self.http.build_request(
            method,
            path,
            json=json,
            headers=self.headers if auth else {},
            timeout=self.timeout,
        )
        return await self.send(request)


def simple_client(api: Api) -> FieldClient:
    """cli/examples/client.py: httpx, X-Api-Key client key, 5 s timeout."""
    return FieldClient(api, {"X-Api-Key": CLIENT_KEY}, 5.0)


def simple_miner(api: Api) -> FieldClient:
    """cli/examples/miner.py: httpx, X-Api-Key miner key, never X-Miner-ID, 5 s timeout."""
    return FieldClient(api, {"X-Api-Key": MINER_KEY}, 5.0)


def production_miner(api: Api, miner_id: str = "prod-1") -> FieldClient:
    """production_miner.py: requests, X-Api-Key + X-Miner-ID, 10 s timeout on polls."""
    return FieldClient(api, {"X-Api-Key": MINER_KEY, "X-Miner-ID": miner_id}, 10.0)


def cli_client(api: Api) -> FieldClient:
    """The aitbc CLI: Authorization Bearer client key."""
    return FieldClient(api, {"Authorization": f"Bearer {CLIENT_KEY}"}, 30.0)


PROD_REGISTER: dict[str, Any] = {
    "capabilities": {
        "gpus": [
            {
                "name": "RTX 4090",
                "memory_mb": 24576,
                "architecture": "ada",
                "consumer_grade": True,
                "edge_optimized": False,
            }
        ],
        "cuda": "12.2",
        "models": ["llama3"],
        "price": 0.01,
        "region": "eu",
        "platform": "linux",
        "supported_tasks": ["inference"],
        "max_concurrent_jobs": 1,
    },
    "concurrency": 1,
    "region": "eu",
}


async def prod_start(api: Api, miner: FieldClient) -> str:
    """Health, register, heartbeat, poll as the daemon does; the id of the job it now runs."""
    health = await miner.call("GET", "/health", auth=False)
    assert health.status_code == 200
    assert isinstance(health.json(), dict)
    assert health.json()
    r = await miner.call("POST", "/v1/miners/register", json=PROD_REGISTER)
    assert r.status_code == 200, r.text
    assert r.json()["session_token"]
    hb = {"status": "active", "current_jobs": 0, "gpu_utilization": 0, "memory_used": 0}
    r = await miner.call("POST", "/v1/miners/heartbeat", json=hb)
    assert r.status_code == 200, r.text
    job = await api.submit(payload={"type": "inference", "parameters": {"prompt": "p"}})
    r = await miner.call("POST", "/v1/miners/poll", json={"max_wait_seconds": 5})
    assert r.status_code == 200, r.text
    assert r.json()["job_id"] == job["job_id"]
    job_id: str = job["job_id"]
    return job_id


# ---- 1. simple client script --------------------------------------------------------------


async def test_simple_client_script(api: Api) -> None:
    """Submit 201, read the job fields, read its public receipts once a miner completed it."""
    client = simple_client(api)
    body = {"payload": {"type": "inference", "parameters": {"prompt": "hi"}}, "ttl_seconds": 60}
    r = await client.call("POST", "/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    job_id = r.json()["job_id"]
    r = await client.call("GET", f"/v1/jobs/{job_id}")
    assert r.status_code == 200
    view = r.json()
    assert view["job_id"] == job_id
    assert view["state"] == "QUEUED"
    assert view["assigned_miner_id"] is None
    assert view["requested_at"]
    assert view["expires_at"]

    assert (await api.register("m1")).status_code == 200
    assert (await api.poll("m1")).json()["job_id"] == job_id
    r = await api.result(job_id, "m1", metrics={"duration_ms": 1500})
    assert r.status_code == 200

    r = await client.call("GET", f"/v1/jobs/{job_id}")
    assert r.json()["state"] == "COMPLETED"
    assert r.json()["assigned_miner_id"] == "m1"
    r = await client.call("GET", f"/v1/explorer/receipts?limit=10&job_id={job_id}", auth=False)
    assert r.status_code == 200, r.text
    [item] = r.json()["items"]
    assert item["status"] == "COMPLETED"
    assert item["payload"]["units"] > 0
    assert item["payload"]["unit_type"] == "gpu_seconds"


# ---- 2. simple miner script ---------------------------------------------------------------


async def test_simple_miner_script(api: Api) -> None:
    """Register/heartbeat with ?miner_id=, empty poll in time, job poll, result with a receipt."""
    miner = simple_miner(api)
    assert "x-miner-id" not in {k.lower() for k in miner.headers}
    caps = {"gpu": {"model": "RTX", "memory_gb": 8, "cuda_version": "12"}, "compute": {}}
    r = await miner.call(
        "POST", "/v1/miners/register?miner_id=simple-1", json={"capabilities": caps}
    )
    assert r.status_code == 200, r.text
    registered = r.json()["miner_id"]
    assert MINER_KEY not in registered
    hb = {"status": "ONLINE", "inflight": 0, "metadata": {"gpu": "RTX"}}
    r = await miner.call("POST", "/v1/miners/heartbeat?miner_id=simple-1", json=hb)
    assert r.status_code == 200, r.text

    t0 = time.monotonic()
    r = await miner.call("POST", "/v1/miners/poll", json={"max_wait_seconds": 5})
    assert r.status_code == 204
    assert r.content == b""
    assert time.monotonic() - t0 < 4.5

    job = await api.submit(payload={"type": "inference", "parameters": {"prompt": "hi"}})
    r = await miner.call("POST", "/v1/miners/poll", json={"max_wait_seconds": 5})
    assert r.status_code == 200, r.text
    assert r.json()["job_id"] == job["job_id"]
    assert (await api.job(job["job_id"]))["assigned_miner_id"] == registered

    body = {
        "result": {
            "status": "completed",
            "output": "x",
            "execution_time_ms": 2000,
            "miner_id": "simple-1",
        },
        "metrics": {"compute_time": 2.0, "energy_used": 0.1, "aitbc_earned": 10.0},
    }
    r = await miner.call("POST", f"/v1/miners/{job['job_id']}/result", json=body)
    assert r.status_code == 200, r.text
    receipt = r.json()["receipt"]
    assert receipt["job_id"] == job["job_id"]
    assert receipt["provider"] == registered
    got = await api.job(job["job_id"])
    assert got["state"] == "COMPLETED"
    assert got["result"]["output"] == "x"


# ---- 3. production miner daemon -----------------------------------------------------------


async def test_production_miner_completes_and_retries_idempotently(api: Api) -> None:
    """Health, register, active heartbeat, poll, result; a retried POST gives the same receipt."""
    miner = production_miner(api)
    job_id = await prod_start(api, miner)
    body = {
        "result": {"status": "completed", "output": {"text": "done"}, "execution_time": 1.2},
        "metrics": {"gpu_utilization": 80, "duration_ms": 1200},
    }
    first = await miner.call("POST", f"/v1/miners/{job_id}/result", json=body)
    assert first.status_code == 200, first.text
    retry = await miner.call("POST", f"/v1/miners/{job_id}/result", json=body)
    assert retry.status_code == 200, retry.text
    assert first.json()["receipt"]["receipt_id"] == retry.json()["receipt"]["receipt_id"]
    assert first.json()["receipt"]["provider"] == "prod-1"
    got = await api.job(job_id)
    assert got["state"] == "COMPLETED"
    assert got["assigned_miner_id"] == "prod-1"
    r = await api.http.get(f"/v1/jobs/{job_id}/receipts", headers={"X-Api-Key": CLIENT_KEY})
    assert len(r.json()["items"]) == 1


async def test_production_miner_reports_failure_on_result(api: Api) -> None:
    """{"result":{"status":"failed","error":"boom"}} ends the job FAILED, and the slot is free."""
    miner = production_miner(api)
    job_id = await prod_start(api, miner)
    r = await miner.call(
        "POST",
        f"/v1/miners/{job_id}/result",
        json={"result": {"status": "failed", "error": "boom"}},
    )
    assert r.status_code == 200, r.text
    assert r.json()
    got = await api.job(job_id)
    assert got["state"] == "FAILED"
    assert got["error"] == "boom"
    nxt = await api.submit()
    r = await miner.call("POST", "/v1/miners/poll", json={"max_wait_seconds": 5})
    assert r.status_code == 200
    assert r.json()["job_id"] == nxt["job_id"]


# ---- 4. command-line client ---------------------------------------------------------------


async def test_cli_submit_wait_result_list(api: Api) -> None:
    """Bearer submit; --wait polls the job to a terminal state; /result 425 then 200; list."""
    cli = cli_client(api)
    assert (await cli.call("GET", "/health", auth=False)).status_code == 200
    r = await cli.call(
        "POST",
        "/v1/jobs",
        json={"payload": {"type": "inference", "prompt": "hi"}, "ttl_seconds": 900},
    )
    assert r.status_code == 201, r.text
    job_id = r.json()["job_id"]
    assert (await cli.call("GET", f"/v1/jobs/{job_id}/result")).status_code == 425

    seen: list[dict[str, Any]] = []

    async def wait_for_terminal() -> None:
        while True:
            r = await cli.call("GET", f"/v1/jobs/{job_id}")
            assert r.status_code == 200
            seen.append(r.json())
            if r.json()["state"] in TERMINAL:
                return
            await anyio.sleep(0.02)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_for_terminal)
            assert (await api.register("m1")).status_code == 200
            assert (await api.poll("m1")).json()["job_id"] == job_id
            assert (await cli.call("GET", f"/v1/jobs/{job_id}/result")).status_code == 425
            assert (await api.result(job_id, "m1", result={"output": "ok"})).status_code == 200

    final = seen[-1]
    assert final["state"] == "COMPLETED"
    assert all(view["payment_id"] is None for view in seen)
    r = await cli.call("GET", f"/v1/jobs/{job_id}/result")
    assert r.status_code == 200
    assert r.json()["result"] == {"output": "ok"}
    assert r.json()["receipt"]["job_id"] == job_id

    await api.submit()  # a queued job of the same client, which the filter must leave out
    r = await cli.call("GET", "/v1/jobs?limit=5&status=completed")
    assert r.status_code == 200
    items = r.json()["items"]
    assert [i["job_id"] for i in items] == [job_id]
    assert all(i["state"] == "COMPLETED" for i in items)


async def test_cli_cancel_without_body_or_content_type(api: Api) -> None:
    """POST /cancel with no body and no Content-Type on a queued job -> 200 CANCELED."""
    cli = cli_client(api)
    r = await cli.call("POST", "/v1/jobs", json={"payload": {"type": "inference"}})
    job_id = r.json()["job_id"]
    request = api.http.build_request(
        "POST", f"/v1/jobs/{job_id}/cancel", headers=cli.headers, timeout=cli.timeout
    )
    assert "content-type" not in request.headers
    assert request.content == b""
    r = await cli.send(request)
    assert r.status_code == 200, r.text
    view = r.json()
    assert view["state"] == "CANCELED"
    assert view["error"] == "canceled by client"
    assert view["assigned_miner_id"] is None
    await api.register("m1")
    assert (await api.poll("m1", max_wait=1)).status_code == 204
