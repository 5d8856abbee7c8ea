"""``/v1/miners/ws``: WebSocket <-> protocol.MinerSession <-> Dispatcher (docs/protocol.md)."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

from dispatcher.errors import DispatchError, NotAllowed, NotAssigned, Unavailable, UnknownJob
from protocol.messages import (
    Auth,
    Heartbeat,
    Hello,
    JobAccept,
    JobFail,
    JobProgress,
    JobReject,
    JobResult,
    MinerToServer,
    Status,
    Welcome,
)
from protocol.receipt_verify import result_attestation
from protocol.session import MinerSession
from protocol.types import PROTOCOL_VERSION, CloseCode, ErrorCode
from web.auth import Role
from web.connection import Connection
from web.errors import error_code_for
from web.rest_miners import failure_message

if TYPE_CHECKING:
    from starlette.websockets import WebSocket

    from dispatcher.core import ResumeInfo
    from dispatcher.jobs import Job
    from protocol.records import JobRecord
    from protocol.types import JSONObject

__all__ = ["MinerConnection", "miner_endpoint"]


class MinerConnection(Connection):
    role = Role.MINER

    def __init__(self, core: Any, websocket: WebSocket) -> None:
        super().__init__(core, websocket)
        self.miner_id: str | None = None
        self.session_id: str | None = None
        self.result_key: str | None = None  # registered in hello: results may be co-signed

    def make_session(self, *, authenticated: bool) -> MinerSession:
        return MinerSession(
            authenticated=authenticated, max_frame=self.core.settings.max_frame_bytes
        )

    def handle_now(self, msg: MinerToServer, session: MinerSession) -> bool:
        dispatcher = self.core.dispatcher
        if self.session_id is not None and not self._current():
            # Replaced by a newer session of this miner id, whose hello is being committed:
            # this socket is closed 4409 then. Its frames meanwhile must not act as the miner
            # (a drain, a reject, a concurrency change of the session that took over).
            session.stop_reading()
            return True
        match msg:  # the two messages of every job first (one isinstance per case)
            case JobResult():
                return self._result_now(msg)
            case JobAccept():
                self._call(msg.id, msg.job_id, "accept", msg.job_id, attempt=msg.attempt)
            case Auth():
                self.authenticate(msg.token, session, msg.id)
            case Hello():
                self._hello(msg, session)
            case JobReject():
                self._call(
                    msg.id, msg.job_id, "reject", msg.job_id, msg.reason, attempt=msg.attempt
                )
            case JobProgress():
                self._call(
                    msg.id,
                    msg.job_id,
                    "progress",
                    msg.job_id,
                    attempt=msg.attempt,
                    progress=msg.progress,
                    message=msg.message,
                    output=msg.output,
                )
            case JobFail():
                self._call(
                    msg.id,
                    msg.job_id,
                    "fail",
                    msg.job_id,
                    error_code=msg.error_code,
                    error_message=msg.error_message,
                    retryable=msg.retryable,
                    attempt=msg.attempt,
                )
            case Status():
                self._call(
                    msg.id,
                    "status",
                    "set_status",
                    concurrency=msg.concurrency,
                    draining=msg.draining,
                )
                self._load(msg.metrics)
            case Heartbeat():
                self._load(msg.metrics)
                if msg.id is not None:
                    dispatcher.after_commit(lambda: self.reply(msg.id))
        return True

    def _current(self) -> bool:
        """Whether this socket's session is still its miner's."""
        assert self.miner_id is not None
        miner = self.core.dispatcher.scheduler.miners.get(self.miner_id)
        return miner is not None and miner.session_id == self.session_id

    def _load(self, metrics: JSONObject | None) -> None:
        """A ``heartbeat`` or ``status``: the miner was heard, and its metrics are load
        figures, for the ops page."""
        if self.miner_id is not None:
            self.core.ops.heard(self.miner_id)
            if metrics is not None:
                self.core.ops.on_load(self.miner_id, metrics)

    async def handle(self, msg: MinerToServer, session: MinerSession) -> None:
        """Only a result ``handle_now`` declined: for a job no longer in memory."""
        assert isinstance(msg, JobResult)
        await self._stored_result(msg)

    def _hello(self, msg: Hello, session: MinerSession) -> None:
        assert self.principal is not None
        miner_id = msg.miner_id or f"miner-{self.principal.key_hash[:12]}"
        session_id = secrets.token_hex(16)
        core = self.core

        def welcome(info: ResumeInfo) -> None:
            self.send(
                Welcome(
                    protocol=PROTOCOL_VERSION,
                    session_id=session_id,
                    miner_id=miner_id,
                    heartbeat_interval=core.settings.heartbeat_interval_seconds,
                    heartbeat_timeout=core.settings.heartbeat_timeout_seconds,
                    resumed=info.resumed,
                    revoked=info.revoked,
                    id=msg.id,
                )
            )

        try:
            core.dispatcher.miner_hello(
                miner_id=miner_id,
                key_hash=self.principal.key_hash,
                session_id=session_id,
                sink=self,
                capabilities=msg.capabilities,
                concurrency=msg.concurrency,
                region=msg.region,
                resume_session=msg.resume_session,
                then=welcome,
            )
        except NotAllowed as exc:
            # The id may be bound by a hello still being committed: refused once everything
            # queued so far is durable (a refusal must not reveal uncommitted state), and
            # nothing more is read meanwhile.
            session.stop_reading()
            reason = str(exc)
            core.dispatcher.after_commit(lambda: self.close(CloseCode.FORBIDDEN, reason))
            return
        except Unavailable:
            self.close(CloseCode.GOING_AWAY, "server shutting down")
            return
        self.miner_id, self.session_id = miner_id, session_id
        self.result_key = msg.result_key

    def _call(
        self, request_id: str | None, ref: str | None, method: str, *args: Any, **kwargs: Any
    ) -> None:
        dispatcher = self.core.dispatcher
        assert self.miner_id is not None
        try:
            dispatcher.miner_call(method, self.miner_id, *args, **kwargs)
        except DispatchError as exc:
            # Answer after the open batch commits: a refusal must not reveal uncommitted state.
            code, text = error_code_for(exc), str(exc)
            dispatcher.after_commit(
                lambda: self.error(code, text, request_id=request_id, ref=ref or method)
            )
            return
        if request_id is not None:  # without an id, success is silent
            dispatcher.after_commit(lambda: self.reply(request_id))

    def _result_now(self, msg: JobResult) -> bool:
        """``False`` when the job is not in memory (a late retry): ``_stored_result`` answers."""
        dispatcher = self.core.dispatcher
        assert self.miner_id is not None
        if msg.result.get("status") == "failed":
            return self._failed_now(msg)

        def done(rec: JobRecord) -> None:
            self.reply(msg.id, job_id=rec.job_id, receipt=rec.receipt)

        attestation = None
        if msg.result_sig is not None:
            if self.result_key is not None:
                attestation = result_attestation(
                    self.result_key, msg.job_id, msg.result, msg.result_sig
                )
            if attestation is None:
                text = (
                    "result_sig does not verify with the result_key of this session's hello"
                    if self.result_key is not None
                    else "result_sig needs a result_key in this session's hello"
                )
                dispatcher.after_commit(
                    lambda: self.error(
                        ErrorCode.INVALID.value, text, request_id=msg.id, ref=msg.job_id
                    )
                )
                return True
        try:
            dispatcher.miner_result(
                self.miner_id,
                msg.job_id,
                msg.result,
                msg.metrics,
                msg.attempt,
                done,
                attestation,
                msg.size,
            )
        except UnknownJob:
            return False
        except DispatchError as exc:
            self._refuse(msg, exc)
        return True

    def _failed_now(self, msg: JobResult) -> bool:
        """A result whose ``status`` is "failed" fails the job, as REST's ``/result`` takes it
        (rest-api.md [ours]): FAILED with the result's ``error``, no receipt; the ack's
        ``receipt`` is null. ``False`` when the job is not in memory (``_stored_result``)."""
        dispatcher = self.core.dispatcher
        assert self.miner_id is not None
        message = failure_message(msg.result.get("error"))
        try:
            dispatcher.miner_call(
                "fail",
                self.miner_id,
                msg.job_id,
                error_code="failed",
                error_message=message,
                retryable=False,
                attempt=msg.attempt,
            )
        except UnknownJob:
            return False
        except NotAssigned as exc:
            job = dispatcher.scheduler.job(msg.job_id)
            if job is None or not self._failed_so(job, message, msg.attempt):
                self._refuse(msg, exc)
                return True
        except DispatchError as exc:
            self._refuse(msg, exc)
            return True
        dispatcher.after_commit(lambda: self.reply(msg.id, job_id=msg.job_id, receipt=None))
        return True

    def _failed_so(self, job: Job | JobRecord, message: str, attempt: int | None) -> bool:
        """Whether ``job`` ended with this miner's failure report ``message`` (of ``attempt``,
        when named): a repeat of it (its ack was lost) is answered as the first one was."""
        return (
            job.state == "FAILED"
            and job.miner_id == self.miner_id
            and job.error == message
            and attempt in (None, job.attempt)
        )

    async def _stored_result(self, msg: JobResult) -> None:
        """A retry for a job that left memory long ago: answer from the store."""
        dispatcher = self.core.dispatcher
        assert self.miner_id is not None
        if msg.result.get("status") == "failed":
            rec = await dispatcher.get_job(msg.job_id)
            if rec is None:
                self._refuse(msg, UnknownJob(msg.job_id))
            elif self._failed_so(rec, failure_message(msg.result.get("error")), msg.attempt):
                dispatcher.after_commit(lambda: self.reply(msg.id, job_id=msg.job_id, receipt=None))
            else:
                self._refuse(msg, NotAssigned(msg.job_id, self.miner_id))
            return
        try:
            receipt = await dispatcher.stored_receipt(self.miner_id, msg.job_id, msg.attempt)
        except UnknownJob as exc:
            self._refuse(msg, exc)
            return
        if receipt is None:
            self._refuse(msg, NotAssigned(msg.job_id, self.miner_id))
            return
        dispatcher.after_commit(lambda: self.reply(msg.id, job_id=msg.job_id, receipt=receipt))

    def _refuse(self, msg: JobResult, err: DispatchError) -> None:
        code = error_code_for(err)
        self.core.dispatcher.after_commit(
            lambda: self.error(code, str(err), request_id=msg.id, ref=msg.job_id)
        )

    def on_closed(self) -> None:
        if self.miner_id is not None and self.session_id is not None:
            self.core.dispatcher.miner_gone(self.miner_id, self.session_id)


async def miner_endpoint(websocket: WebSocket) -> None:
    await MinerConnection(websocket.app.state.core, websocket).run()
