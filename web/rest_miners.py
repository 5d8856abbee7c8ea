"""Miner REST routes: register, heartbeat, long-poll, result, fail (rest-api.md §2.3).

A REST miner is the same scheduler miner as a socket miner, registered with a fixed session id
(``rest:<miner_id>``); its free slots are offered only while one of its polls waits. The
seed-documentation paths (``/v1/miner/…``) are aliases served by the same handlers.
"""

from __future__ import annotations

import math
import uuid
from typing import TYPE_CHECKING, Any

import anyio
import orjson
from starlette.responses import Response

from dispatcher.errors import DispatchError, NotAssigned, UnknownJob, UnknownMiner
from dispatcher.jobs import TERMINAL
from protocol.amounts import UNIT
from protocol.codec import has_control_character
from protocol.types import parse_instant
from web.auth import Role
from web.http import ALREADY_SENT, Call, Endpoint, HTTPError, Param, json_response
from web.rest_jobs import JOB_PAGE, job_page, state_filter
from web.schemas import MAX_ERROR_MESSAGE

if TYPE_CHECKING:
    from collections.abc import Callable

    from protocol.messages import JobAssign
    from protocol.records import JobRecord
    from protocol.types import JSONObject

__all__ = ["CONSTRAINT_DEFAULTS", "ENDPOINTS", "miner_id_for", "poll_deadline"]

# AssignedJob.constraints carries every Constraints key (rest-api.md §2.9), nulls and false
# defaults included; the job's own keys (unknown ones too) override these.
CONSTRAINT_DEFAULTS: dict[str, Any] = {
    "gpu": None,
    "cuda": None,
    "min_vram_gb": None,
    "models": None,
    "region": None,
    "max_price": None,
    "min_reputation": None,
    "bond_required": False,
    "min_bond_amount": None,
    "zk_proof_required": False,
    "tee_attestation_required": False,
    "tee_enclave_id": None,
    "confidential": False,
    "required_enclave_measurement": None,
    "auto_reinvest_pct": None,
}


def miner_id_for(call: Call) -> str:
    """``X-Miner-ID`` when sent, else a stable id derived from the key (never the key).

    An id bound to another key (its first user's) is refused with 403 on every route.
    """
    principal = call.principal
    assert principal is not None
    given = call.request.headers.get("x-miner-id", "")
    if not given.isascii():
        # Header bytes arrive as latin-1 text; an id's UTF-8 bytes are read as UTF-8, so
        # "é" names the same miner as a socket's hello (JSON, UTF-8) does. Decoded before it
        # is stripped: latin-1 "\x85" and "\xa0" are spaces to Python and UTF-8 bytes too.
        try:
            given = given.encode("latin-1").decode("utf-8")
        except UnicodeDecodeError:
            raise HTTPError(422, "X-Miner-ID is not UTF-8 text") from None
    given = given.strip()
    if len(given) > 128:
        raise HTTPError(422, "X-Miner-ID is longer than 128 characters")
    if has_control_character(given):  # as a hello: its ledger account must be readable
        raise HTTPError(422, "X-Miner-ID must not contain control characters")
    miner_id = given or f"miner-{principal.key_hash[:12]}"
    call.core.dispatcher.check_key(miner_id, principal.key_hash)
    return miner_id


def poll_deadline(max_wait: float, cap: float) -> float:
    """Seconds the server may hold a poll: 1 s under the client's wait, never over ``cap``.

    The field clients send 5 s with a 5 s HTTP timeout (rest-api.md §2.3), so answering at
    ``max_wait - 1`` keeps every known client inside its timeout.
    """
    return max(0.0, min(float(max_wait) - 1.0, cap))


async def _not_registered(call: Call) -> HTTPError:
    """The 404 for a miner the scheduler does not know as a REST miner, once the state that
    was decided on is durable (its deregistration, or the socket session that replaced it,
    may still be being committed: ``Dispatcher.before_refusal``)."""
    await call.core.dispatcher.before_refusal()
    return HTTPError(404, "miner not registered")


async def _register(call: Call, miner_id: str, *, update: bool = False) -> None:
    """Register ``miner_id`` from a ``MinerRegister`` body (``update``: keep its jobs)."""
    assert call.principal is not None
    body = call.body
    region = body.get("region")
    try:
        await call.core.dispatcher.rest_register(
            miner_id=miner_id,
            key_hash=call.principal.key_hash,
            capabilities=body["capabilities"],
            concurrency=body.get("concurrency") or 1,
            region=None if region is None else str(region),
            update=update,
        )
    except UnknownMiner:
        raise await _not_registered(call) from None


async def register(call: Call) -> Response:
    miner_id = miner_id_for(call)
    await _register(call, miner_id)
    return json_response({"status": "ok", "session_token": uuid.uuid4().hex, "miner_id": miner_id})


async def update_capabilities(call: Call) -> Response:
    """Upstream's ``PUT /v1/miners/{miner_id}/capabilities`` (it re-registered the caller,
    whatever the path said, §9): the miner the path names, only by itself, keeping its jobs."""
    miner_id = _own_path(call)
    await _register(call, miner_id, update=True)
    return json_response(
        {
            "miner_id": miner_id,
            "status": "updated",
            "capabilities": call.body["capabilities"],
            "session_token": uuid.uuid4().hex,
        }
    )


async def own_jobs(call: Call) -> Response:
    """Upstream's ``POST /v1/miners/{miner_id}/jobs`` (any miner could list any miner's jobs,
    §9): the jobs this miner holds or ran last, newest first; only by itself. ``min_reward``
    is accepted and ignored, as upstream did."""
    miner_id = _own_path(call)
    state = state_filter(call.query.get("job_status"), "job_status")
    items, total, limit, offset = await job_page(call, miner_id=miner_id, state=state)
    return json_response(
        {"jobs": items, "total": total, "limit": limit, "offset": offset, "miner_id": miner_id}
    )


_NOT_LOAD = frozenset(("inflight",))  # a REST heartbeat's claim about its slots, not load
EARNINGS_HISTORY = 20  # receipts listed in ``earnings_history``, newest first


def _instant(call: Call, name: str) -> float | None:
    text = call.query.get(name)
    if text is None:
        return None
    try:
        return parse_instant(str(text))
    except ValueError:
        raise HTTPError(
            422, f"query parameter {name} must be Unix seconds or an ISO-8601 time"
        ) from None


def _aitbc(units: int) -> float:
    return round(units / UNIT, 8)


async def earnings(call: Call) -> Response:
    """Upstream's ``POST /v1/miners/{miner_id}/earnings`` (sums of the jobs' payment amounts;
    the time range was echoed but not used): here the sums of the receipts the coordinator
    signed for this miner, issued in ``[from_time, to_time)`` when given; only by itself.
    ``paid_earnings`` is what the ledger paid out for those jobs (billing on), the rest is
    pending."""
    miner_id = _own_path(call)
    since, until = _instant(call, "from_time"), _instant(call, "to_time")
    found = await call.core.store.miner_earnings(
        miner_id,
        0.0 if since is None else since,
        math.inf if until is None else until,
        EARNINGS_HISTORY,
    )
    return json_response(
        {
            "miner_id": miner_id,
            "total_earnings": _aitbc(found.billed),
            "pending_earnings": _aitbc(max(0, found.billed - found.paid)),
            "paid_earnings": _aitbc(found.paid),
            "completed_jobs": found.completed,
            "currency": "AITBC",
            "from_time": call.query.get("from_time"),
            "to_time": call.query.get("to_time"),
            "earnings_history": [
                {
                    "job_id": r.get("job_id"),
                    "receipt_id": r.get("receipt_id"),
                    "amount": r.get("price"),
                    "completed_at": r.get("completed_at"),
                }
                for r in found.recent
            ],
        }
    )


async def deregister(call: Call) -> Response:
    """Upstream's ``DELETE /v1/miners/{miner_id}`` (any miner key could deregister any miner,
    and a deregistered miner could still poll, §9): only by itself; its jobs go back to the
    queue and it must register again before it polls."""
    miner_id = _own_path(call)
    try:
        await call.core.dispatcher.rest_deregister(miner_id)
    except UnknownMiner:
        raise await _not_registered(call) from None
    return json_response({"miner_id": miner_id, "status": "deregistered"})


async def _registered(call: Call) -> str:
    miner_id = miner_id_for(call)
    try:
        call.core.dispatcher.rest_heartbeat(miner_id)
    except UnknownMiner:
        raise await _not_registered(call) from None
    return miner_id


async def heartbeat(call: Call) -> Response:
    miner_id = await _registered(call)  # ``inflight`` is never trusted: slots come from leases
    # Its numbers (``metadata``'s too) are load figures for the ops page, nothing more.
    call.core.ops.on_load(miner_id, call.body or {}, skip=_NOT_LOAD)
    return json_response({"status": "ok"})


def _assigned(msg: JobAssign) -> JSONObject:
    return {
        "job_id": msg.job_id,
        "payload": msg.payload,
        "constraints": {**CONSTRAINT_DEFAULTS, **msg.constraints},
        "attempt": msg.attempt,
        "expires_at": msg.expires_at,
    }


async def _poll(call: Call, max_wait: Any) -> Response:
    miner_id = await _registered(call)
    wait = poll_deadline(max_wait, call.core.settings.max_poll_wait_seconds)
    responder = call.responder
    answered = False

    def answer(msg: JobAssign) -> bool:
        # Called by the batch that committed the assignment: the 200 leaves right there,
        # before this task is even scheduled again (the latency a waiting miner sees). A
        # miner that hung up gets nothing: the dispatcher puts the job back in the queue.
        nonlocal answered
        assert responder is not None
        if responder.disconnected:
            return False
        answered = responder.write(json_response(_assigned(msg)))
        return True

    try:
        if responder is not None:
            msg = await call.core.dispatcher.rest_poll(miner_id, wait, answer, responder.on_hangup)
        else:
            msg = await _poll_watching(call, miner_id, wait)
    except UnknownMiner:
        raise await _not_registered(call) from None
    if msg is None:
        return Response(status_code=204)
    return ALREADY_SENT if answered else json_response(_assigned(msg))


async def _poll_watching(call: Call, miner_id: str, wait: float) -> JobAssign | None:
    """``rest_poll`` where no ``Responder`` tells of a hang-up (a request uvicorn serves
    through the ASGI layers: behind a proxy, say): a second task waits on ``receive``, which
    says ``http.disconnect`` when the client goes away."""
    hangups: list[Callable[[], None]] = []

    async def watch() -> None:
        while (await call.request.receive())["type"] != "http.disconnect":
            pass
        for hangup in hangups:
            hangup()

    msg: JobAssign | None = None
    failure: DispatchError | None = None
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(watch)
        try:  # raised out of the task group, it would come wrapped in an ExceptionGroup
            msg = await call.core.dispatcher.rest_poll(miner_id, wait, None, hangups.append)
        except DispatchError as exc:
            failure = exc
        tasks.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return msg


async def poll(call: Call) -> Response:
    max_wait = call.body.get("max_wait_seconds")  # a null is the default, as when left out
    return await _poll(call, 15 if max_wait is None else max_wait)


async def poll_get(call: Call) -> Response:
    return await _poll(call, call.query["max_wait_seconds"])


async def _refused_as(call: Call, job_id: str) -> JobRecord:
    """The job a report was refused for, once the state the refusal was decided on is durable
    (``Dispatcher.before_refusal``); 404 when there is none."""
    await call.core.dispatcher.before_refusal()
    rec = await call.core.dispatcher.get_job(job_id)
    if rec is None:
        raise HTTPError(404, "job not found")
    return rec


def _not_held(rec: JobRecord, miner_id: str, attempt: int | None) -> HTTPError:
    """The 409 for a result or failure from a miner that does not hold the job (or not as the
    attempt it names)."""
    if rec.state in TERMINAL:
        return HTTPError(409, f"job is {rec.state}")
    if attempt is not None and rec.miner_id == miner_id and rec.attempt != attempt:
        return HTTPError(409, f"attempt {attempt} is over: the job runs as attempt {rec.attempt}")
    return HTTPError(409, "job is not assigned to this miner")


def failure_message(error: object) -> str:
    """The error of a ``result.status == "failed"`` report as stored: text as given, anything
    else as JSON, cut to what ``/fail`` takes (65,536 characters), so that a report of any
    size is taken, and the same report again compares equal (a retry)."""
    if error is None:
        return "job failed"
    text = error if isinstance(error, str) else orjson.dumps(error).decode()
    return text[:MAX_ERROR_MESSAGE]


async def _submit_result(
    call: Call, job_id: str, result: JSONObject, metrics: JSONObject, attempt: int | None = None
) -> Response:
    miner_id = miner_id_for(call)
    dispatcher = call.core.dispatcher
    if result.get("status") == "failed":  # the production miner reports failures here
        message = failure_message(result.get("error"))
        await _fail(call, job_id, "failed", message, attempt=attempt)
        return json_response({"status": "ok", "receipt": None})
    try:
        rec = await dispatcher.rest_result(miner_id, job_id, result, metrics, call.size, attempt)
    except UnknownJob:
        # Not in memory: a retry of a result accepted long ago (of the attempt it names, as
        # in memory), or a job that ended otherwise.
        try:
            receipt = await dispatcher.stored_receipt(miner_id, job_id, attempt)
        except UnknownJob:
            raise HTTPError(404, "job not found") from None
        if receipt is None:
            raise _not_held(await _refused_as(call, job_id), miner_id, attempt) from None
        return json_response({"status": "ok", "receipt": receipt})
    except NotAssigned:
        raise _not_held(await _refused_as(call, job_id), miner_id, attempt) from None
    return json_response({"status": "ok", "receipt": rec.receipt})


async def _submit_body(call: Call, job_id: str) -> Response:
    """A ``JobResultSubmit`` body's result for ``job_id``."""
    body = call.body
    return await _submit_result(
        call, job_id, body["result"], body.get("metrics") or {}, body.get("attempt")
    )


async def result_by_path(call: Call) -> Response:
    return await _submit_body(call, call.path("job_id"))


async def result_by_body(call: Call) -> Response:
    job_id = call.body.get("job_id")
    if not isinstance(job_id, str) or not job_id:
        raise HTTPError(422, "body.job_id is required")
    return await _submit_body(call, job_id)


async def _fail(
    call: Call,
    job_id: str,
    code: str,
    message: str,
    *,
    retryable: bool = False,
    attempt: int | None = None,
) -> None:
    """Report a failure of a job this miner holds; a repeat of the report that already failed
    it (a retry after a lost answer; of that attempt, when it names one, as for a result) is
    answered as the first one was."""
    miner_id = miner_id_for(call)
    try:
        await call.core.dispatcher.rest_fail(
            miner_id, job_id, code, message, retryable=retryable, attempt=attempt
        )
    except (UnknownJob, NotAssigned):
        rec = await _refused_as(call, job_id)
        if (
            rec.state == "FAILED"
            and rec.miner_id == miner_id
            and rec.error == message
            and attempt in (None, rec.attempt)
        ):
            return
        raise _not_held(rec, miner_id, attempt) from None


async def fail(call: Call) -> Response:
    if "miner_id" in call.request.path_params:  # upstream's /v1/miners/{m}/jobs/{j}/fail
        _own_path(call)
    body = call.body
    await _fail(
        call,
        call.path("job_id"),
        body["error_code"],
        body["error_message"],
        retryable=bool(body.get("retryable")),
        attempt=body.get("attempt"),
    )
    return json_response({"status": "ok"})


def _own_path(call: Call) -> str:
    """The upstream routes that name the miner in the path: only that miner may use them."""
    miner_id = miner_id_for(call)
    if call.path("miner_id") != miner_id:
        raise HTTPError(403, "the path names another miner")
    return miner_id


async def complete(call: Call) -> Response:
    """Upstream's ``/v1/miners/{miner_id}/jobs/{job_id}/complete`` (500 after committing there,
    §9): ``output`` is the result; a receipt the miner sends is ignored, the server signs its
    own, as on ``/result``."""
    _own_path(call)
    return await _submit_result(call, call.path("job_id"), call.body["output"], {})


_auth = {
    401: ("missing or unknown credential", "Error"),
    403: ("credential of another role, or a miner id bound to another key", "Error"),
}
_unregistered = (404, ("miner not registered", "Error"))
_result_errors = (
    (404, ("job not found", "Error")),
    (409, ("not this miner's job, or the job already ended", "Error")),
    (422, ("invalid body", "Error")),
)


def _r(*pairs: tuple[int, tuple[str, str | None]]) -> dict[int, tuple[str, str | None]]:
    return {**dict(pairs), **_auth}


_poll_responses = _r(
    (200, ("a job, already RUNNING for this miner", "AssignedJob")),
    (204, ("no job within the wait (empty body)", None)),
    _unregistered,
    (422, ("invalid body", "Error")),
)
_POLL_DESCRIPTION = (
    "Long-poll: the server holds the request until a matching job is assigned to this miner, "
    "answering at the latest max(0, max_wait_seconds - 1) s (capped by MAX_POLL_WAIT_SECONDS), "
    "or at once (204) when the coordinator begins to shut down; a poll after that is 503. "
    "At most the miner's concurrency polls wait: a further one ends the oldest waiting (204)."
)

_TIME = "receipts issued from this time: Unix seconds or ISO-8601"
_own = (403, ("another role's key, or the path names another miner", "Error"))

ENDPOINTS = [
    Endpoint(
        "POST",
        ("/v1/miners/register", "/v1/miner/register"),
        register,
        "Register or update a polling miner",
        "miners",
        role=Role.MINER,
        body="MinerRegister",
        responses=_r(
            (200, ("registered", "MinerRegistered")),
            (422, ("invalid body (capabilities is required)", "Error")),
        ),
        description="The miner id is X-Miner-ID, else derived from the key; it is bound to "
        "the first key that used it, for good. A key binds at most MAX_MINER_IDS_PER_KEY ids: "
        "a new one past that is 403. The ?miner_id= query parameter is ignored.",
    ),
    Endpoint(
        "POST",
        ("/v1/miners/heartbeat", "/v1/miner/heartbeat"),
        heartbeat,
        "Miner heartbeat",
        "miners",
        role=Role.MINER,
        body="MinerHeartbeat",
        body_required=False,
        responses=_r((200, ("alive", "Ok")), _unregistered),
    ),
    Endpoint(
        "POST",
        ("/v1/miners/poll",),
        poll,
        "Wait for the next job",
        "miners",
        role=Role.MINER,
        body="PollRequest",
        responses=_poll_responses,
        description=_POLL_DESCRIPTION,
    ),
    Endpoint(
        "GET",
        ("/v1/miner/jobs",),
        poll_get,
        "Wait for the next job (seed-doc alias of POST /v1/miners/poll)",
        "miners",
        role=Role.MINER,
        head=False,  # a HEAD would take a job and drop the answer that names it
        query=(
            Param(
                "max_wait_seconds",
                {"type": "integer", "minimum": 0, "maximum": 3600, "default": 15},
            ),
        ),
        responses=_poll_responses,
        description=_POLL_DESCRIPTION,
    ),
    Endpoint(
        "POST",
        ("/v1/miners/{job_id}/result",),
        result_by_path,
        "Submit a job result",
        "miners",
        role=Role.MINER,
        body="JobResultSubmit",
        responses=_r((200, ("accepted; the signed receipt", "ResultAccepted")), *_result_errors),
        description='Idempotent for the assignee. result.status == "failed" fails the job.',
    ),
    Endpoint(
        "POST",
        ("/v1/miner/result",),
        result_by_body,
        "Submit a job result (seed-doc alias; job_id in the body)",
        "miners",
        role=Role.MINER,
        body="JobResultSubmit",
        responses=_r((200, ("accepted; the signed receipt", "ResultAccepted")), *_result_errors),
    ),
    Endpoint(
        "POST",
        # The second path is upstream's secondary route (always 500 there, §9).
        ("/v1/miners/{job_id}/fail", "/v1/miners/{miner_id:id}/jobs/{job_id}/fail"),
        fail,
        "Report a job failure",
        "miners",
        role=Role.MINER,
        body="JobFailSubmit",
        responses=_r(
            (200, ("the job is FAILED; the slot is free", "Ok")),
            *_result_errors,
            _own,
        ),
    ),
    Endpoint(
        "POST",
        ("/v1/miners/{miner_id:id}/jobs/{job_id}/complete",),
        complete,
        "Complete a job (upstream's secondary route; output is the result)",
        "miners",
        role=Role.MINER,
        body="JobComplete",
        responses=_r(
            (200, ("accepted; the signed receipt", "ResultAccepted")),
            *_result_errors,
            _own,
        ),
        description="A receipt in the body is ignored: the coordinator signs its own.",
    ),
    Endpoint(
        "PUT",
        ("/v1/miners/{miner_id:id}/capabilities",),
        update_capabilities,
        "Update a registered miner's capabilities",
        "miners",
        role=Role.MINER,
        body="MinerRegister",
        responses=_r(
            (200, ("updated; the jobs it holds stay with it", "MinerUpdated")),
            _unregistered,
            (422, ("invalid body (capabilities is required)", "Error")),
            _own,
        ),
        description="Only the miner the path names (X-Miner-ID, else the key's id) may call "
        "it. Unlike POST /v1/miners/register, which restarts the miner, it keeps its jobs.",
    ),
    Endpoint(
        "DELETE",
        ("/v1/miners/{miner_id:id}",),
        deregister,
        "Deregister a polling miner",
        "miners",
        role=Role.MINER,
        responses=_r((200, ("deregistered", "MinerDeregistered")), _unregistered, _own),
        description="Only the miner the path names may call it. Its jobs go back to the "
        "queue, not charged against their attempts, its waiting polls end with 204, "
        "and it must register again before it polls. The id stays bound to its key.",
    ),
    Endpoint(
        "POST",
        ("/v1/miners/{miner_id:id}/jobs",),
        own_jobs,
        "List this miner's jobs, newest first",
        "miners",
        role=Role.MINER,
        query=(
            *JOB_PAGE,
            Param("job_status", {"type": "string", "maxLength": 16}, "job state"),
            Param("min_reward", {"type": "number"}, "accepted and ignored (as upstream)"),
        ),
        strict_query=True,
        responses=_r(
            (200, ("a page of jobs; total counts every match", "MinerJobList")),
            (422, ("invalid query parameter", "Error")),
            _own,
        ),
        description="Only the miner the path names may call it. A job is listed under the "
        "miner that holds it or ran it last (a job requeued elsewhere moves to its new miner).",
    ),
    Endpoint(
        "POST",
        ("/v1/miners/{miner_id:id}/earnings",),
        earnings,
        "This miner's earnings, from its signed receipts",
        "miners",
        role=Role.MINER,
        query=(
            Param("from_time", {"type": "string", "maxLength": 64}, _TIME),
            Param("to_time", {"type": "string", "maxLength": 64}, _TIME + " (excluded)"),
        ),
        responses=_r(
            (200, ("sums over the miner's receipts", "MinerEarnings")),
            (422, ("a time that is neither Unix seconds nor ISO-8601", "Error")),
            _own,
        ),
        description="Only the miner the path names may call it. total_earnings sums the "
        "prices of the receipts issued for its jobs (in AITBC); paid_earnings is what the "
        "ledger paid out for them (BILLING=on), pending_earnings the rest; earnings_history "
        f"lists the newest {EARNINGS_HISTORY} receipts.",
    ),
]
