"""Admin routes for the ops page (docs/rest-api.md, "Ops"): snapshot, job drill-down, actions.

Each action returns once its change is committed; the page then sees it on the ops socket like
any other change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from protocol.codec import MAX_SEQ
from protocol.receipt_verify import check_receipt
from protocol.types import iso_time
from web.auth import Role
from web.http import Call, Endpoint, HTTPError, Param, json_response

if TYPE_CHECKING:
    from starlette.responses import Response

    from protocol.records import EventRecord
    from web.app import Coordinator

__all__ = ["ENDPOINTS"]

# The most events one drill-down answers; ``next_after`` says where the next page starts.
EVENT_PAGE = 10_000
# ... and the most event data (a miner chooses its progress outputs, up to a frame each: 10,000
# of them were gigabytes, read and answered at once); the first event in any case.
EVENT_BYTES = 4 << 20
_EVENT_CHUNK = 256  # events read from the store at a time


async def snapshot(call: Call) -> Response:
    # Its miner rows are the scheduler's: answered once what they show is committed.
    return json_response(await call.core.dispatcher.committed(call.core.ops.snapshot()))


async def job_detail(call: Call) -> Response:
    core = call.core
    job_id = call.path("job_id")
    rec = await core.dispatcher.get_job(job_id)
    if rec is None:
        raise HTTPError(404, f"job {job_id} not found")
    events, more = await _event_page(core, job_id, call.query["after"], call.query["limit"])
    problems: list[str] = []
    if rec.receipt is None:
        status = "none"
    else:
        # As /v1/receipts/verify checks it: every published key (previous ones too, each in
        # its validity period), the miner's co-signature and the payload/result hashes.
        problems = check_receipt(rec.receipt, core.signing_keys)
        status = "invalid" if problems else "valid"
    body: dict[str, Any] = {
        "job": core.job_view(rec),
        "client_id": rec.client_id,
        "events": [
            {
                "seq": e.seq,
                "event": e.event,
                "state": e.state,
                "at": iso_time(e.at),
                "attempt": e.attempt,
                "miner_id": e.miner_id,
                "data": e.data,
            }
            for e in events
        ],
        "next_after": events[-1].seq if more else None,
        "receipt": rec.receipt,
        "receipt_check": {"status": status, "problems": problems},
    }
    return json_response(body)


async def _event_page(
    core: Coordinator, job_id: str, after: int, limit: int
) -> tuple[list[EventRecord], bool]:
    """The job's stored events after ``after``: at most ``limit`` of them and ``EVENT_BYTES``
    of their data (the first in any case), read a chunk at a time; and whether more follow."""
    events: list[EventRecord] = []
    size = 0
    while True:
        want = min(_EVENT_CHUNK, limit + 1 - len(events))  # one more: is there?
        chunk = await core.store.events_after(job_id, after, want)
        for e in chunk:
            size += len(orjson.dumps(e.data))
            if len(events) == limit or (events and size > EVENT_BYTES):
                return events, True
            events.append(e)
        if len(chunk) < want:
            return events, False
        after = chunk[-1].seq


async def cancel_job(call: Call) -> Response:
    rec = await call.core.dispatcher.admin_cancel(call.path("job_id"))
    return json_response({"job": call.core.job_view(rec)})


async def requeue_job(call: Call) -> Response:
    rec = await call.core.dispatcher.requeue(call.path("job_id"))
    return json_response({"job": call.core.job_view(rec)})


async def drain_miner(call: Call) -> Response:
    draining = (call.body or {}).get("draining")
    draining = True if draining is None else bool(draining)  # null: not given, as validated
    miner_id = call.path("miner_id")
    await call.core.dispatcher.drain_miner(miner_id, draining)
    return json_response({"miner_id": miner_id, "status": "draining" if draining else "active"})


async def disconnect_miner(call: Call) -> Response:
    miner_id = call.path("miner_id")
    await call.core.dispatcher.disconnect_miner(miner_id)
    return json_response({"miner_id": miner_id, "status": "disconnected"})


_auth = {
    401: ("missing or unknown credential", "Error"),
    403: ("credential of another role", "Error"),
}
_unavailable = {503: ("the coordinator is shutting down", "Error")}


def _admin(
    method: str,
    path: str,
    handler: Any,
    summary: str,
    responses: dict[int, tuple[str, str | None]],
    **kw: Any,
) -> Endpoint:
    return Endpoint(
        method,
        (path,),
        handler,
        summary,
        "admin",
        role=Role.ADMIN,
        responses={**responses, **_auth},
        **kw,
    )


ENDPOINTS = [
    _admin(
        "GET",
        "/v1/admin/ops",
        snapshot,
        "Ops snapshot: miners, queue, counters, chart history (as on /v1/admin/ws)",
        {200: ("snapshot", "OpsSnapshot")},
    ),
    _admin(
        "GET",
        "/v1/admin/jobs/{job_id}",
        job_detail,
        "Any job with its stored events and its receipt, checked",
        {
            200: ("the job", "AdminJobDetail"),
            404: ("no such job", "Error"),
            422: ("invalid after or limit, or an unknown query parameter", "Error"),
        },
        strict_query=True,
        query=(
            Param(
                "after",
                {"type": "integer", "minimum": 0, "maximum": MAX_SEQ, "default": 0},
                "only the events with a greater seq (a subscribe's after)",
            ),
            Param(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": EVENT_PAGE, "default": EVENT_PAGE},
                "at most this many events",
            ),
        ),
    ),
    _admin(
        "POST",
        "/v1/admin/jobs/{job_id}/cancel",
        cancel_job,
        "Cancel any client's job (its miner is told to stop)",
        {
            200: ("canceled (committed)", "AdminJobAction"),
            404: ("no such job in the scheduler", "Error"),
            409: ("the job is already finished", "Error"),
            **_unavailable,
        },
    ),
    _admin(
        "POST",
        "/v1/admin/jobs/{job_id}/requeue",
        requeue_job,
        "Take a RUNNING job back from its miner and queue it again (not charged)",
        {
            200: ("requeued (committed); it may already run on another miner", "AdminJobAction"),
            404: ("no such job in the scheduler", "Error"),
            409: ("the job is not RUNNING", "Error"),
            **_unavailable,
        },
    ),
    _admin(
        "POST",
        "/v1/admin/miners/{miner_id:id}/drain",
        drain_miner,
        "Stop offering jobs to a connected miner (running jobs continue), or resume",
        {
            200: ("drain state set", "AdminMinerAction"),
            404: ("miner not connected", "Error"),
        },
        body="DrainRequest",
        body_required=False,
    ),
    _admin(
        "POST",
        "/v1/admin/miners/{miner_id:id}/disconnect",
        disconnect_miner,
        "Close a connected miner's session (started jobs wait resume_grace, others requeue)",
        {
            200: ("closed", "AdminMinerAction"),
            404: ("miner not connected", "Error"),
        },
    ),
]
