"""Admin routes (rest-api.md §2.4) and the public explorer receipt list (§2.7).

Counts come from committed state (the store); miner liveness from the dispatcher. The explorer
shows only receipt ids, miner, status, billing and times: no job input, output or client
identity, nor their hashes, is public (§9 "Data exposure"). The owner's
``/v1/jobs/{id}/receipts`` has the whole signed receipt.

The debug routes never show a secret: a configured key appears only as the non-secret id the
coordinator already uses for it (``<role>-<sha256(key)[:12]>``), and of the settings only
harmless ones (no database URL, xpub or Esplora URL, which may carry credentials).
"""

from __future__ import annotations

import os
import resource
import shutil
from typing import TYPE_CHECKING, Any

from dispatcher.errors import NotAllowed, UnknownMiner
from protocol.types import iso_time
from web.auth import Principal, Role, key_hash
from web.http import Call, Endpoint, HTTPError, Param, json_response, page_params

if TYPE_CHECKING:
    from starlette.responses import Response

    from protocol.types import JSONObject

__all__ = ["ENDPOINTS", "TEST_MINER_ID", "public_receipt"]

EXPLORER_MAX_OFFSET = 10_000  # the public explorer pages through the newest receipts only
DURATION_SAMPLE = 1000  # completed jobs averaged for avg_miner_job_duration_ms
TEST_MINER_ID = "debug-test-miner"
# The key the test miner is bound to: none. A real key's hash is 64 hex digits, never this, so
# no credential can register, poll or report as the test miner (it never takes a job) and no
# real miner can ever be confused with it (its id stays refused to every key: 403).
_TEST_MINER_KEY_HASH = "debug:no-key"
PUBLIC_RECEIPT_FIELDS = (
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
)


async def _avg_duration_ms(call: Call) -> float:
    # Averaged by the store: reading the jobs would read their payloads and results too.
    mean = await call.core.store.mean_run_seconds(DURATION_SAMPLE)
    return 0.0 if mean is None else round(1000 * mean, 3)


async def _overview(call: Call) -> tuple[dict[str, int], int, int]:
    """Committed job counts by state (the non-zero ones), and the miners known and online
    (answered once what they show is committed)."""
    dispatcher = call.core.dispatcher
    counts = {state: n for state, n in dispatcher.job_counts.by_state.items() if n}
    miners = await dispatcher.committed(dispatcher.rest_miners())
    return counts, len(miners), sum(1 for m in miners if m.online)


def _active(counts: dict[str, int]) -> int:
    return counts.get("QUEUED", 0) + counts.get("RUNNING", 0)


async def stats(call: Call) -> Response:
    counts, _, online = await _overview(call)
    return json_response(
        {
            "total_jobs": sum(counts.values()),
            "active_jobs": _active(counts),
            "online_miners": online,
            "avg_miner_job_duration_ms": await _avg_duration_ms(call),
            "jobs_by_state": counts,
        }
    )


def _system(call: Call) -> JSONObject:
    """The host as this process sees it: load, own memory, the database's disk."""
    load1, load5, load15 = os.getloadavg()
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    folder = call.core.settings.database_path.resolve().parent
    disk = shutil.disk_usage(folder) if folder.is_dir() else None
    return {
        "cpu": {
            "count": os.cpu_count() or 1,
            "load_1m": load1,
            "load_5m": load5,
            "load_15m": load15,
        },
        "mem": {"process_max_rss_mib": round(rss_kib / 1024, 1)},
        "disk": None
        if disk is None
        else {
            "path": str(folder),
            "total_gib": round(disk.total / 2**30, 2),
            "free_gib": round(disk.free / 2**30, 2),
        },
    }


async def status(call: Call) -> Response:
    """Upstream's intended ``/v1/admin/status`` (its own always answered an error, §9)."""
    counts, known, online = await _overview(call)
    # Degraded: work waits and no miner is online to take it.
    healthy = not (counts.get("QUEUED") and not online)
    return json_response(
        {
            "jobs": {
                "total": sum(counts.values()),
                "active": _active(counts),
                "completed": counts.get("COMPLETED", 0),
                "failed": counts.get("FAILED", 0),
            },
            "miners": {
                "total": known,
                "online": online,
                "offline": known - online,
                "avg_job_duration_ms": await _avg_duration_ms(call),
            },
            "system": _system(call),
            "status": "healthy" if healthy else "degraded",
        }
    )


async def jobs(call: Call) -> Response:
    # Summaries: the jobs whole would read their payloads, results and receipts too.
    items = await call.core.store.job_summaries(100)
    return json_response(
        {
            "items": [
                {
                    "job_id": j.job_id,
                    "state": j.state,
                    "client_id": j.client_id,
                    "assigned_miner_id": j.miner_id,
                    "requested_at": iso_time(j.requested_at),
                    "attempt": j.attempt,
                }
                for j in items
            ]
        }
    )


async def miners(call: Call) -> Response:
    totals = call.core.ops.miner_totals  # since the start, as the ops page counts them
    items: list[dict[str, Any]] = []
    for m in await call.core.dispatcher.committed(call.core.dispatcher.rest_miners()):
        completed, failed, mean_ms, last_receipt = totals(m.miner_id)
        items.append(
            {
                "miner_id": m.miner_id,
                "status": "ONLINE" if m.online else "OFFLINE",
                "inflight": m.inflight,
                "concurrency": m.concurrency,
                "region": m.region,
                "last_heartbeat": None if m.last_seen is None else iso_time(m.last_seen),
                "transport": m.transport,
                "jobs_completed": completed,
                "jobs_failed": failed,
                "average_job_duration_ms": mean_ms,
                "last_receipt_id": last_receipt,
            }
        )
    items.sort(key=lambda m: str(m["miner_id"]))
    return json_response({"items": items})


async def key_check(call: Call) -> Response:
    """Upstream's only use of ADMIN_API_KEYS; here the role check in front of it did the work."""
    assert call.principal is not None
    return json_response({"status": "ok", "role": Role.ADMIN.value, "key_id": call.principal.id})


def _key_ids(role: Role, keys: tuple[str, ...]) -> JSONObject:
    """A key list masked: how many keys, and the id each is known by (never a key's text)."""
    return {"count": len(keys), "ids": [Principal(role, key_hash(k)).id for k in keys]}


async def debug_settings(call: Call) -> Response:
    s = call.core.settings
    return json_response(
        {
            "client_api_keys": _key_ids(Role.CLIENT, s.client_api_keys),
            "miner_api_keys": _key_ids(Role.MINER, s.miner_api_keys),
            "admin_api_keys": _key_ids(Role.ADMIN, s.admin_api_keys),
            "receipt_key_id": call.core.signer.key_id,  # the public key's id, as published
            "database": s.database_url.partition(":")[0],  # the kind only, never the URL
            "environment": s.environment,
            "job_ttl_seconds": s.job_ttl_seconds,
            "heartbeat_interval_seconds": s.heartbeat_interval_seconds,
            "heartbeat_timeout_seconds": s.heartbeat_timeout_seconds,
            "max_attempts": s.max_attempts,
            "billing": s.billing,
            "exchange_configured": call.core.exchange.configured,
        }
    )


async def create_test_miner(call: Call) -> Response:
    """Register (again: refresh) the REST miner ``debug-test-miner``, as ``/v1/miners/register``
    would; it is bound to no key, so it shows in the lists but never polls or takes a job."""
    existed = TEST_MINER_ID in call.core.dispatcher.scheduler.miners
    try:
        await call.core.dispatcher.rest_register(
            miner_id=TEST_MINER_ID,
            key_hash=_TEST_MINER_KEY_HASH,
            capabilities={
                "gpus": [{"name": "debug-gpu", "memory_mb": 1024}],
                "models": ["debug-model"],
                "debug": True,
            },
            concurrency=1,
            region=None,
        )
    except NotAllowed:
        await call.core.dispatcher.before_refusal()  # the binding may not be durable yet
        detail = f"miner id {TEST_MINER_ID!r} is held by a real miner (bound to its key)"
        raise HTTPError(409, detail) from None
    return json_response({"miner_id": TEST_MINER_ID, "status": "updated" if existed else "created"})


async def remove_test_miner(call: Call) -> Response:
    """Deregister ``debug-test-miner`` (no key can: it is bound to none). While registered it
    is a known class of miner, so jobs only it could run are reported servable."""
    dispatcher = call.core.dispatcher
    try:
        if dispatcher.bound_key(TEST_MINER_ID) != _TEST_MINER_KEY_HASH:
            raise UnknownMiner(TEST_MINER_ID)
        await dispatcher.rest_deregister(TEST_MINER_ID)
    except UnknownMiner:
        # Decided on memory: another removal, or a real miner's binding of the id, may still
        # be being committed.
        await dispatcher.before_refusal()
        raise HTTPError(404, f"no {TEST_MINER_ID} is registered") from None
    return json_response({"miner_id": TEST_MINER_ID, "status": "deregistered"})


def public_receipt(receipt: JSONObject) -> JSONObject:
    """Only ids, miner, status, billing and times: an allow-list, so a new receipt field is
    private until listed here (no payload, result, client, nor their hashes)."""
    return {k: receipt[k] for k in PUBLIC_RECEIPT_FIELDS if k in receipt}


# What the explorer reads of each receipt: the public fields and the signing key's id (the
# store picks them out; a whole receipt holds the job's payload and result).
_EXPLORER_PATHS = (*((k,) for k in PUBLIC_RECEIPT_FIELDS), ("signature", "key_id"))


async def explorer_receipts(call: Call) -> Response:
    q = call.query
    job_id = q.get("job_id") or None
    rows = await call.core.store.list_receipt_fields(
        job_id, q["limit"], q["offset"], _EXPLORER_PATHS
    )
    items: list[dict[str, Any]] = []
    for *values, key_id in rows:
        # The public fields the receipt has (as before: none of them is ever null).
        r = {k: v for k, v in zip(PUBLIC_RECEIPT_FIELDS, values, strict=True) if v is not None}
        completed = r.get("completed_at")
        items.append(
            {
                "receiptId": r.get("receipt_id"),
                "jobId": r.get("job_id"),
                "miner": r.get("provider"),
                "coordinator": key_id,
                "issuedAt": iso_time(completed) if isinstance(completed, int | float) else None,
                "status": r.get("status"),
                "payload": public_receipt(r),
            }
        )
    return json_response({"jobId": job_id or "all", "items": items})


_auth = {
    401: ("missing or unknown credential", "Error"),
    403: ("credential of another role", "Error"),
}


ENDPOINTS = [
    Endpoint(
        "GET",
        ("/v1/admin/stats",),
        stats,
        "Job and miner counts",
        "admin",
        role=Role.ADMIN,
        responses={200: ("counts (committed state)", "AdminStats"), **_auth},
    ),
    Endpoint(
        "GET",
        ("/v1/admin/status",),
        status,
        "Jobs, miners, host; healthy or degraded",
        "admin",
        role=Role.ADMIN,
        description="`degraded` while jobs are queued and no miner is online.",
        responses={200: ("status (committed state)", "AdminStatus"), **_auth},
    ),
    Endpoint(
        "GET",
        ("/v1/admin/jobs",),
        jobs,
        "The newest 100 jobs",
        "admin",
        role=Role.ADMIN,
        strict_query=True,
        responses={
            200: ("jobs, newest first", "AdminJobList"),
            422: ("a query parameter (it takes none)", "Error"),
            **_auth,
        },
    ),
    Endpoint(
        "GET",
        ("/v1/admin/miners",),
        miners,
        "Known miners and their liveness",
        "admin",
        role=Role.ADMIN,
        strict_query=True,
        responses={
            200: ("miners", "AdminMinerList"),
            422: ("a query parameter (it takes none)", "Error"),
            **_auth,
        },
    ),
    Endpoint(
        "GET",
        ("/v1/admin/test-key",),
        key_check,
        "Check an admin key",
        "admin",
        role=Role.ADMIN,
        responses={200: ("the key is an admin key", "AdminKeyCheck"), **_auth},
    ),
    Endpoint(
        "GET",
        ("/v1/admin/debug-settings",),
        debug_settings,
        "Configured key lists (masked) and harmless settings",
        "admin",
        role=Role.ADMIN,
        description="A key list is `{count, ids}`: each key's non-secret id "
        "(`<role>-<sha256(key)[:12]>`, the client id or derived miner id it appears as "
        "elsewhere), never any character of the key. No database URL, signing key, xpub or "
        "Esplora URL.",
        responses={200: ("masked keys and settings", "AdminDebugSettings"), **_auth},
    ),
    Endpoint(
        "POST",
        ("/v1/admin/debug/create-test-miner",),
        create_test_miner,
        "Register (or refresh) the REST miner debug-test-miner",
        "admin",
        role=Role.ADMIN,
        description="Registered as `POST /v1/miners/register` would, with fixed capabilities, "
        "but bound to no key: no credential can poll or report as it (it never takes a job), "
        "and any key that tries to register the id gets 403. No body.",
        responses={
            200: ("created, or updated when it existed", "TestMiner"),
            409: ("a real miner already holds the id", "Error"),
            **_auth,
        },
    ),
    Endpoint(
        "DELETE",
        ("/v1/admin/debug/test-miner",),
        remove_test_miner,
        "Deregister the REST miner debug-test-miner",
        "admin",
        role=Role.ADMIN,
        description="The only way to remove it (no key is its own). A real miner that holds "
        "the id is left alone (404).",
        responses={
            200: ("deregistered", "MinerDeregistered"),
            404: ("no debug-test-miner is registered", "Error"),
            **_auth,
        },
    ),
    Endpoint(
        "GET",
        ("/v1/explorer/receipts",),
        explorer_receipts,
        "Public receipt list (no job input/output, no client identity)",
        "explorer",
        query=(
            Param("job_id", {"type": "string", "maxLength": 128}, "only this job's receipts"),
            # Public and not rate limited: a deep offset made the database step over every
            # receipt before it (each with a job's payload and result) per request.
            *page_params(default=50, maximum=200, max_offset=EXPLORER_MAX_OFFSET),
        ),
        strict_query=True,
        responses={
            200: ("receipts, newest first", "ExplorerReceipts"),
            422: ("invalid query parameter", "Error"),
        },
    ),
]
