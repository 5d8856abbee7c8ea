"""Client REST routes: submit, read, list, result, cancel, receipts (rest-api.md §2.2).

The seed-documentation paths (``/v1/client/jobs…``) are aliases served by the same handlers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio.lowlevel

from dispatcher.core import JobSpec
from dispatcher.errors import InvalidTransition, PaymentRequired, TooManyJobs, UnknownJob
from dispatcher.ids import new_id
from storage.base import JobQuery
from web.auth import Role
from web.billing import job_payment
from web.http import Call, Endpoint, HTTPError, Param, json_response, page_params

if TYPE_CHECKING:
    from starlette.responses import Response

    from protocol.records import JobRecord
    from protocol.types import JSONObject

__all__ = ["ENDPOINTS", "JOB_PAGE", "job_page", "owned_job", "state_filter"]

TERMINAL = {"COMPLETED", "FAILED", "CANCELED", "EXPIRED"}
STATES = ["QUEUED", "RUNNING", "COMPLETED", "FAILED", "CANCELED", "EXPIRED"]
MAX_JOB_PAGE = 500  # GET /v1/jobs: the largest page
# A job page ends before the job that would take its payloads, constraints, results and errors
# past this many characters (the first job comes whatever its size): 500 jobs near the body
# limit were read, decoded and encoded whole, about 4.6 GB of memory for one call.
PAGE_CHARS = 8 << 20
# The query parameters of a job list (``job_page``), besides its state filter.
JOB_PAGE = (
    *page_params(default=20, maximum=MAX_JOB_PAGE, clamp=True),
    Param("job_type", {"type": "string", "maxLength": 128}, "matches payload.type"),
)


async def owned_job(call: Call, job_id: str) -> JobRecord:
    """The caller's job, or 404 (another client's job is indistinguishable from none)."""
    rec = await call.core.dispatcher.get_job(job_id)
    if rec is None or rec.client_id != call.caller_id:
        raise HTTPError(404, "job not found")
    return rec


def _payment(call: Call) -> JSONObject | None:
    """With BILLING=on, a positive ``payment_amount`` is reserved from the caller's account
    (docs/wallet.md). With billing off the fields are ignored and ``payment_id`` stays null."""
    assert call.principal is not None
    try:
        return job_payment(
            call.core.settings,
            call.principal,
            call.body.get("payment_amount"),
            call.body.get("payment_currency"),
        )
    except ValueError as exc:
        raise HTTPError(422, str(exc)) from None


async def submit(call: Call) -> Response:
    body = call.body
    ttl = body.get("ttl_seconds")
    spec = JobSpec(
        job_id=new_id(),
        client_id=call.caller_id,
        payload=body["payload"],
        constraints=body.get("constraints") or {},
        ttl_seconds=None if ttl is None else max(1, ttl),
        priority=body.get("priority") or 0,
        idempotency_key=body.get("idempotency_key"),
        payment=_payment(call),
        size=call.size,
    )
    try:
        rec, existed = await call.core.dispatcher.submit_wait(spec)
    except (PaymentRequired, TooManyJobs):
        # The balance, or the live jobs, it saw may count uncommitted work.
        await call.core.dispatcher.barrier()
        raise
    # The commit that made the job durable may also have assigned it to a waiting long-poll
    # (woken just after us): let that poll answer first, it is the latency miners wait on.
    await anyio.lowlevel.checkpoint()
    return json_response(call.core.job_view(rec), 200 if existed else 201)


async def get_job(call: Call) -> Response:
    return json_response(call.core.job_view(await owned_job(call, call.path("job_id"))))


def state_filter(value: object, name: str) -> str | None:
    """A job state from query parameter ``name``, case-insensitive (422 for anything else)."""
    if value is None:
        return None
    state = str(value).upper()
    if state not in STATES:
        raise HTTPError(422, f"query parameter {name} must be one of {', '.join(STATES)}")
    return state


async def job_page(
    call: Call, *, client_id: str | None = None, miner_id: str | None = None, state: str | None
) -> tuple[list[JSONObject], int, int, int]:
    """A page of the matching jobs (and the query's ``job_type``), newest first: (views,
    total, limit, offset). Upstream has no cap on ``limit`` and the CLI passes the user's
    through: a larger one is read as the largest page rather than refused. A page that
    ``PAGE_CHARS`` ends early says so in its ``limit`` (its length): ``offset + limit`` is
    the next page, as for any other."""
    q = call.query
    limit, offset = min(q["limit"], MAX_JOB_PAGE), q["offset"]
    query = JobQuery(
        client_id=client_id,
        miner_id=miner_id,
        state=state,
        job_type=q.get("job_type"),
        limit=limit,
        offset=offset,
        max_chars=PAGE_CHARS,
    )
    items, total = await call.core.store.list_jobs(query)
    if 0 < len(items) < limit and offset + len(items) < total:
        limit = len(items)
    return [call.core.job_view(r) for r in items], total, limit, offset


async def list_jobs(call: Call) -> Response:
    q = call.query
    if q.get("status") is not None and q.get("state") is not None:
        raise HTTPError(422, "query parameters status and state are the same filter: give one")
    name = "status" if q.get("status") is not None else "state"
    state = state_filter(q.get(name), name)
    items, total, limit, offset = await job_page(call, client_id=call.caller_id, state=state)
    return json_response({"items": items, "total": total, "limit": limit, "offset": offset})


async def get_result(call: Call) -> Response:
    rec = await owned_job(call, call.path("job_id"))
    if rec.state not in TERMINAL:
        raise HTTPError(425, "job not ready")
    return json_response({"result": rec.result, "receipt": rec.receipt})


async def cancel(call: Call) -> Response:
    job_id = call.path("job_id")
    try:
        rec = await call.core.dispatcher.cancel_wait(call.caller_id, job_id)
    except UnknownJob:
        await owned_job(call, job_id)  # 404 unless it is ours and simply no longer live
        raise HTTPError(409, "job not cancelable") from None
    except InvalidTransition:
        await call.core.dispatcher.before_refusal()
        raise HTTPError(409, "job not cancelable") from None
    return json_response(call.core.job_view(rec))


async def get_receipt(call: Call) -> Response:
    rec = await owned_job(call, call.path("job_id"))
    if rec.receipt is None:
        raise HTTPError(404, "receipt not available")
    return json_response(rec.receipt)


async def list_receipts(call: Call) -> Response:
    job_id = call.path("job_id")
    await owned_job(call, job_id)
    return json_response({"items": await call.core.store.receipts_for(job_id)})


_JOB = {"type": "string", "maxLength": 128}
_not_found = (404, ("job not found (or deleted: JOB_RETENTION_DAYS)", "Error"))
_auth = {
    401: ("missing or unknown credential", "Error"),
    403: ("credential of another role", "Error"),
}


def _r(*pairs: tuple[int, tuple[str, str | None]]) -> dict[int, tuple[str, str | None]]:
    return {**dict(pairs), **_auth}


ENDPOINTS = [
    Endpoint(
        "POST",
        ("/v1/jobs", "/v1/client/jobs"),
        submit,
        "Submit a job",
        "jobs",
        role=Role.CLIENT,
        body="JobCreate",
        responses=_r(
            (201, ("queued (durably stored)", "JobView")),
            (200, ("an earlier job with the same idempotency_key", "JobView")),
            (402, ("BILLING=on: the balance does not cover payment_amount", "Error")),
            (
                413,
                (
                    "body too large, or a job whose job.assign frame would be over "
                    "WS_MAX_FRAME_BYTES",
                    "Error",
                ),
            ),
            (422, ("invalid body", "Error")),
            (
                429,
                (
                    "the client's queued and running jobs would pass "
                    "MAX_ACTIVE_JOBS_PER_CLIENT or MAX_ACTIVE_BYTES_PER_CLIENT",
                    "Error",
                ),
            ),
        ),
    ),
    Endpoint(
        "GET",
        # Upstream declared /v1/jobs/history after /v1/jobs/{job_id}, which shadowed it (404
        # "job not found", rest-api.md §9): here it is the same list, reachable.
        ("/v1/jobs", "/v1/jobs/history"),
        list_jobs,
        "List your jobs, newest first",
        "jobs",
        role=Role.CLIENT,
        description="A page ends early, before the job that would take its payloads, "
        f"constraints, results and errors past {PAGE_CHARS >> 20} Mi characters (never before "
        "its first job): "
        "its `limit` is then its length, so `offset + limit` is the next page.",
        query=(
            *JOB_PAGE,
            Param("status", {"type": "string", "maxLength": 16}, "job state, case-insensitive"),
            Param("state", {"type": "string", "maxLength": 16}, "the same filter as status"),
        ),
        strict_query=True,
        responses=_r(
            (200, ("a page of jobs; total counts every match", "JobList")),
            (422, ("invalid query parameter", "Error")),
        ),
    ),
    Endpoint(
        "GET",
        ("/v1/jobs/{job_id}", "/v1/client/jobs/{job_id}/status"),
        get_job,
        "Get a job",
        "jobs",
        role=Role.CLIENT,
        responses=_r((200, ("the job", "JobView")), _not_found),
    ),
    Endpoint(
        "GET",
        ("/v1/jobs/{job_id}/result",),
        get_result,
        "Result and receipt",
        "jobs",
        role=Role.CLIENT,
        responses=_r(
            (200, ("the job ended (result/receipt null when none)", "JobResult")),
            (425, ("the job has not ended", "Error")),
            _not_found,
        ),
    ),
    Endpoint(
        "POST",
        ("/v1/jobs/{job_id}/cancel",),
        cancel,
        "Cancel a job (no body)",
        "jobs",
        role=Role.CLIENT,
        responses=_r(
            (200, ("canceled; a running miner is told", "JobView")),
            (409, ("job not cancelable", "Error")),
            _not_found,
        ),
    ),
    Endpoint(
        "GET",
        ("/v1/jobs/{job_id}/receipt",),
        get_receipt,
        "Latest receipt",
        "receipts",
        role=Role.CLIENT,
        responses=_r(
            (200, ("the signed receipt", "Receipt")),
            (404, ("job not found / receipt not available", "Error")),
        ),
    ),
    Endpoint(
        "GET",
        ("/v1/jobs/{job_id}/receipts", "/v1/client/jobs/{job_id}/receipts"),
        list_receipts,
        "All receipts of a job",
        "receipts",
        role=Role.CLIENT,
        responses=_r((200, ("receipts", "ReceiptList")), _not_found),
    ),
]
