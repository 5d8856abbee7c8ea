"""``/v1/jobs/ws``: submit jobs and follow them live (docs/protocol.md, client socket)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import anyio

from dispatcher.core import JobSpec
from dispatcher.errors import (
    DispatchError,
    InvalidTransition,
    PaymentRequired,
    TooLarge,
    TooManyJobs,
    Unavailable,
    UnknownJob,
)
from dispatcher.fanout import Subscriber
from dispatcher.ids import new_id
from protocol.messages import (
    Auth,
    ClientHello,
    ClientToServer,
    ClientWelcome,
    JobCancelRequest,
    JobSubmit,
    Subscribe,
    Unsubscribe,
)
from protocol.schema import constraints_refusal
from protocol.session import ClientSession
from protocol.types import PROTOCOL_VERSION, CloseCode, ErrorCode
from storage.errors import StorageError
from web.auth import Role
from web.billing import job_payment
from web.connection import Connection
from web.errors import READ_FAILED, error_code_for

if TYPE_CHECKING:
    from collections.abc import Callable, Collection

    from starlette.websockets import WebSocket

    from protocol.records import JobRecord


__all__ = ["MAX_SUBSCRIBE_JOBS", "ClientConnection", "client_endpoint"]

# Jobs one subscribe may name (in ``job_ids``, or in ``after`` with "all"): each is read from
# the store, and each unknown one answered with an error frame. Below the outbox's hard limit,
# so that those errors cannot overflow the socket's own outbox (4429).
MAX_SUBSCRIBE_JOBS = 1000

log = logging.getLogger("aitbc.coordinator")


class ClientConnection(Connection):
    role = Role.CLIENT

    def __init__(self, core: Any, websocket: WebSocket) -> None:
        super().__init__(core, websocket)
        self.subscriber: Subscriber | None = None
        # Submits handled and not yet answered (ack or error). At ``max_pending_submits`` the
        # next one waits, and the socket is read no further meanwhile (backpressure): a client
        # pipelining submits without end grew the open batch, and memory, without bound, and
        # every other peer's commit waited behind its batch.
        self._unanswered = 0
        self._room: anyio.Event | None = None

    def make_session(self, *, authenticated: bool) -> ClientSession:
        return ClientSession(
            authenticated=authenticated, max_frame=self.core.settings.max_frame_bytes
        )

    def handle_now(self, msg: ClientToServer, session: ClientSession) -> bool:
        match msg:  # the message of every job first (one isinstance per case)
            case JobSubmit():
                if self._unanswered >= self.core.settings.max_pending_submits:
                    return False  # ``handle`` waits for an answer to go out first
                self._submit(msg)
            case Auth():
                self.authenticate(msg.token, session, msg.id)
            case ClientHello():
                assert self.principal is not None
                self.subscriber = Subscriber(self.principal.id, self.outbox)
                self.send(
                    ClientWelcome(protocol=PROTOCOL_VERSION, client_id=self.principal.id, id=msg.id)
                )
            case Unsubscribe():
                assert self.subscriber is not None
                job_ids = None if msg.job_ids == "all" else msg.job_ids
                self.core.dispatcher.unsubscribe(self.subscriber, job_ids)
                self.reply(msg.id)
            case JobCancelRequest():
                return self._cancel_now(msg)
            case Subscribe() if len(_named(msg)) > MAX_SUBSCRIBE_JOBS:
                text = f"a subscribe may name at most {MAX_SUBSCRIBE_JOBS} jobs; split it"
                self.error(ErrorCode.INVALID, text, request_id=msg.id, ref="subscribe")
            case _:
                return False  # a subscribe or a cancel of a job not in memory: they read the store
        return True

    async def handle(self, msg: ClientToServer, session: ClientSession) -> None:
        """What ``handle_now`` declined."""
        match msg:
            case JobSubmit():
                limit = self.core.settings.max_pending_submits
                while self._unanswered >= limit and not self.outbox.closed:
                    self._room = anyio.Event()
                    await self._room.wait()
                if not self.outbox.closed:  # else nobody would read its answer: not taken
                    self._submit(msg)
            case Subscribe():
                await self._subscribe(msg)
            case JobCancelRequest():
                await self._cancel_stored(msg)

    def _submit(self, msg: JobSubmit) -> None:
        """Queue the job now; one whose idempotency key must be looked up in the store is
        queued once it has been (``submit_soon``), while this socket's later frames are
        handled (its later submits wait behind it: a client's jobs are queued in order)."""
        spec = self._spec(msg)
        if spec is not None:
            self._unanswered += 1
            try:
                self.core.dispatcher.submit_soon(
                    spec, self._committed(msg), lambda exc: self._refused(msg, exc)
                )
            except (Unavailable, PaymentRequired, TooLarge, TooManyJobs) as exc:
                self._refused(msg, exc)

    def _spec(self, msg: JobSubmit) -> JobSpec | None:
        """The scheduler's spec of a submit, or None after answering constraints that break
        their schema (REST's 422, by the same validator) or a bad payment."""
        assert self.subscriber is not None
        assert self.principal is not None
        refusal = constraints_refusal(msg.constraints)
        if refusal is not None:
            self.error(ErrorCode.INVALID, refusal, request_id=msg.id, ref="job.submit")
            return None
        try:
            payment = job_payment(
                self.core.settings, self.principal, msg.payment_amount, msg.payment_currency
            )
        except ValueError as exc:
            self.error(ErrorCode.INVALID, str(exc), request_id=msg.id, ref="job.submit")
            return None
        return JobSpec(
            job_id=new_id(),
            client_id=self.subscriber.client_id,
            payload=msg.payload,
            constraints=msg.constraints,
            ttl_seconds=msg.ttl_seconds,
            priority=msg.priority,
            idempotency_key=msg.idempotency_key,
            payment=payment,
            size=msg.size,
        )

    def _committed(self, msg: JobSubmit) -> Callable[[JobRecord, bool], None]:
        """The submit's answer once durable; live events of the job follow it."""
        sub = self.subscriber
        assert sub is not None
        dispatcher = self.core.dispatcher

        def committed(rec: JobRecord, existed: bool) -> None:
            self._answered()
            if self.outbox.closed:
                return  # the client left while its job was being committed
            if rec.state not in ("COMPLETED", "FAILED", "CANCELED", "EXPIRED"):
                dispatcher.fanout.subscribe(sub, [rec.job_id])
            self.reply(msg.id, job=self.core.job_view(rec), duplicate=existed)

        return committed

    def _refused(self, msg: JobSubmit, exc: Exception) -> None:
        if isinstance(exc, Unavailable):
            self._answered()
            self.close(CloseCode.GOING_AWAY, "server shutting down")
            return
        if isinstance(exc, DispatchError):
            code, text = error_code_for(exc), str(exc)
        else:  # a StorageError: the key's lookup failed (a dropped connection, say)
            log.warning("job.submit: the database could not be read: %s", exc)
            code, text = ErrorCode.UNAVAILABLE, READ_FAILED

        def answer() -> None:
            self._answered()
            self.error(code, text, request_id=msg.id, ref="job.submit")

        self.core.dispatcher.after_commit(answer)

    def _answered(self) -> None:
        """A submit's answer goes out: one more may be taken (see ``_unanswered``)."""
        self._unanswered -= 1
        room, self._room = self._room, None
        if room is not None:
            room.set()

    async def _subscribe(self, msg: Subscribe) -> None:
        sub = self.subscriber
        assert sub is not None
        ids = list(_named(msg))

        answered = False

        def answer(missing: list[str], behind: dict[str, int]) -> None:
            nonlocal answered
            answered = True
            for job_id in missing:
                self.error(
                    ErrorCode.NOT_FOUND, f"job {job_id} not found", request_id=None, ref=job_id
                )
            # The contract answers first, then replays each job's stored events, then goes live.
            if behind:
                self.reply(msg.id, missing=missing, behind=behind)
            else:
                self.reply(msg.id, missing=missing)

        try:
            await self.core.dispatcher.subscribe(
                sub, ids, msg.after, follow_all=msg.job_ids == "all", answer=answer
            )
        except Unavailable:  # a commit failed: the coordinator is stopping
            self.close(CloseCode.GOING_AWAY, "server shutting down")
        except StorageError as exc:
            if not answered:
                raise  # nothing followed yet: ``unavailable``, as for any failed read
            # Answered, then a replay failed: the socket would follow with a gap the client
            # cannot see. It reconnects and subscribes with ``after``, as after any drop.
            log.warning("client socket: subscribe: the database could not be read: %s", exc)
            self.close(CloseCode.INTERNAL_ERROR, READ_FAILED)

    def _cancel_now(self, msg: JobCancelRequest) -> bool:
        """``False`` when the job is not in memory: ``_cancel_stored`` answers."""
        sub = self.subscriber
        assert sub is not None
        dispatcher = self.core.dispatcher
        try:
            dispatcher.cancel(
                sub.client_id,
                msg.job_id,
                lambda rec: self.reply(msg.id, job=self.core.job_view(rec)),
            )
            return True
        except InvalidTransition as exc:
            code, text = ErrorCode.NOT_CANCELABLE, str(exc)
        except UnknownJob:
            return False
        except Unavailable:
            self.close(CloseCode.GOING_AWAY, "server shutting down")
            return True
        dispatcher.after_commit(lambda: self.error(code, text, request_id=msg.id, ref=msg.job_id))
        return True

    async def _cancel_stored(self, msg: JobCancelRequest) -> None:
        sub = self.subscriber
        assert sub is not None
        dispatcher = self.core.dispatcher
        rec = await dispatcher.get_job(msg.job_id)
        if rec is not None and rec.client_id == sub.client_id:
            code, text = ErrorCode.NOT_CANCELABLE, f"job {msg.job_id} is {rec.state}"
        else:
            code, text = ErrorCode.NOT_FOUND, f"job {msg.job_id} not found"
        dispatcher.after_commit(lambda: self.error(code, text, request_id=msg.id, ref=msg.job_id))

    def on_closed(self) -> None:
        if self.subscriber is not None:
            self.core.dispatcher.fanout.unsubscribe(self.subscriber)


def _named(msg: Subscribe) -> Collection[str]:
    """The jobs a subscribe names: ``job_ids``, or with "all" those in ``after``."""
    return msg.after if msg.job_ids == "all" else msg.job_ids


async def client_endpoint(websocket: WebSocket) -> None:
    await ClientConnection(websocket.app.state.core, websocket).run()
