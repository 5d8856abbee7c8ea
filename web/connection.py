"""The socket pump shared by the miner and client endpoints.

A connection runs a reader that feeds frames to a Sans-I/O session and handles the decoded
messages, and a writer that drains the connection's ``Outbox``. Closing (by the session, the
dispatcher, an overflow or shutdown) is a request: the writer flushes what is queued, sends
the close frame, and the task group ends.

Under uvicorn with our protocol (web/transport.py) frames are written synchronously as they
are queued, and the writer task is only started when that stops working (flow control) or
to close: an idle socket then holds no writer task, and a frame costs no task switch.

Receiving is the mirror image. Once the peer is authenticated (from the ``hello`` on) and the
reader has nothing queued, the protocol hands each text frame to ``_on_text`` synchronously
(web/transport.py, ``ON_TEXT``): the session decodes it and ``handle_now`` acts on each
message on the spot. A message ``handle_now`` declines (it must await the store) goes to
``_pending`` with the rest of its frame, the reader is woken, and until it has awaited
``handle`` for each of them every later frame is queued behind them, as without the fast
path: order is kept, and reading pauses while the reader is behind, as it always did.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections import deque
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from dispatcher.errors import Unavailable
from dispatcher.fanout import Outbox
from protocol.codec import encode, message_type
from protocol.messages import Ack, Error
from protocol.types import CloseCode, ErrorCode
from storage.errors import StorageError
from web.errors import READ_FAILED
from web.transport import ACCEPT_NOW, FLUSH_NOW, ON_TEXT, SEND_NOW, WAKE

if TYPE_CHECKING:
    from collections.abc import Callable

    from anyio.abc import TaskGroup

    from protocol.session import ClientSession, MinerSession
    from web.app import Coordinator
    from web.auth import Principal, Role

__all__ = ["Connection"]

log = logging.getLogger("aitbc.coordinator")
AUTH_TIMEOUT = 5.0
# Frames one socket may hand the dispatcher between two batches performed (each may add a
# write or an answer to the open batch); past it the socket is read no further until the
# batches are committed and performed (backpressure). A peer streaming frames while a commit
# was in flight (progress, heartbeats with an id) grew the open batch without bound.
BATCH_SHARE = 1000
# What a socket's outbox may hold, in characters, at the least (see ``Connection.__init__``).
OUTBOX_CHARS = 64 << 20


class Connection(ABC):
    role: Role
    # Outbox soft/hard limits when an endpoint needs other than the defaults.
    outbox_limits: ClassVar[dict[str, int]] = {}

    def __init__(self, core: Coordinator, websocket: WebSocket) -> None:
        self.core = core
        self.websocket = websocket
        # In characters: 64 Mi, or room for 16 of the largest frames (a completed event holds
        # a result and a receipt that holds it again: about 3 frames' worth).
        chars = max(OUTBOX_CHARS, 16 * core.settings.max_frame_bytes)
        self.outbox = Outbox(self.close, hard_chars=chars, **self.outbox_limits)
        self.principal: Principal | None = None
        self._close: tuple[int, str] | None = None
        self._send_now: Callable[[bytes], bool] | None = None
        self._flush_now: Callable[[], None] | None = None
        self._tasks: TaskGroup | None = None
        self._writer_started = False
        # The receive fast path: the session, and whether the reader waits with nothing to do.
        self._session: MinerSession | ClientSession | None = None
        self._idle = False
        self._pending: deque[Any] | None = None  # made when a message is first deferred
        self._wake: Callable[[], None] | None = None
        # Frames handled since the dispatcher last performed a batch (``BATCH_SHARE``), and
        # whether the message ``_handle_later`` gets next was declined for that.
        self._performed = -1
        self._share = 0
        self._over_share = False

    # -- sink interface -------------------------------------------------------------------

    def send_frame(self, frame: str) -> None:
        self.outbox.put(frame)

    def flush(self) -> None:
        """Write the frames sent so far now rather than at the end of the tick (best effort)."""
        if self._flush_now is not None and self.outbox.direct is not None:
            self._flush_now()

    def send(self, msg: object) -> None:
        self.outbox.put(encode(msg).decode())

    def reply(self, request_id: str | None, **fields: Any) -> None:
        if request_id is not None:
            self.send(Ack(id=request_id, fields=fields))

    def error(self, code: str, message: str, *, request_id: str | None, ref: str | None) -> None:
        self.send(
            Error(
                code=code,
                message=message,
                id=request_id,
                ref=None if request_id is not None else ref,
            )
        )

    def close(self, code: CloseCode | int, reason: str) -> None:
        if self._close is None:
            self._close = (int(code), reason)
        self.outbox.close()
        self._start_writer()

    def _direct(self, frame: str) -> bool:
        """``Outbox.direct``: write now; on refusal the writer task takes over for good."""
        assert self._send_now is not None
        if self._send_now(frame.encode()):
            return True
        self._start_writer()
        return False

    def _start_writer(self) -> None:
        self.outbox.direct = None
        if not self._writer_started and self._tasks is not None:
            if self._wake is not None and asyncio.current_task() is None:
                # A frame handled in the protocol's callback (``_on_text``), outside any task:
                # no task can be started from here. The reader starts the writer when woken.
                # (Tests that feed the protocol from a task take the direct path below.)
                self._wake()
                return
            self._writer_started = True
            self._tasks.start_soon(self._writer, self._tasks.cancel_scope)

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        token = self.core.auth.token_from_headers(self.websocket.headers)
        principal = None if token is None else self.core.auth.from_token(token)
        extensions = self.websocket.scope.get("extensions") or {}
        accept_now = extensions.get(ACCEPT_NOW)
        if accept_now is not None and accept_now():
            # What starlette's accept would have recorded after its receive and send.
            self.websocket.client_state = WebSocketState.CONNECTED
            self.websocket.application_state = WebSocketState.CONNECTED
        else:
            await self.websocket.accept()
        if self.core.standby:
            await self._close_now(CloseCode.GOING_AWAY, "standby: not serving yet")
            return
        if self.core.stopping:
            await self._close_now(CloseCode.GOING_AWAY, "server shutting down")
            return
        if token is not None and principal is None:
            await self._close_now(CloseCode.NOT_AUTHENTICATED, "unknown credential")
            return
        if principal is not None and not principal.acts_as(self.role):
            await self._close_now(CloseCode.FORBIDDEN, self._role_required())
            return
        self.principal = principal
        session = self.make_session(authenticated=principal is not None)
        if principal is not None:
            self.on_authenticated()
        self.core.connections.add(self)
        self.core.sockets[self.role.value] += 1
        self._send_now = extensions.get(SEND_NOW)
        self._flush_now = extensions.get(FLUSH_NOW)
        set_on_text = extensions.get(ON_TEXT)
        if set_on_text is not None and type(self).handle_now is not Connection.handle_now:
            self._session = session
            self._wake = set_on_text(self._on_text)
        try:
            async with anyio.create_task_group() as tg:
                self._tasks = tg
                # Frames queued before now (an ops socket's snapshot, put there when its
                # handshake credential was accepted) go out through the writer: ``direct``
                # only writes while nothing is queued, so they would wait for good.
                if self._send_now is None or self._close is not None or len(self.outbox):
                    self._start_writer()
                else:
                    self.outbox.direct = self._direct
                await self._reader(session)
        finally:
            if set_on_text is not None and self._wake is not None:
                set_on_text(None)
                self._wake = None
            self._idle = False
            self._tasks = None
            self.core.connections.discard(self)
            self.core.sockets[self.role.value] -= 1
            self.outbox.close()
            self.on_closed()

    def _role_required(self) -> str:
        article = "an" if self.role.value[0] in "aeiou" else "a"
        return f"{article} {self.role.value} credential is required"

    async def _close_now(self, code: int, reason: str) -> None:
        try:
            await self.websocket.close(code, reason)
        except (RuntimeError, OSError):
            pass

    async def _reader(self, session: MinerSession | ClientSession) -> None:
        first = True
        fast = self._wake is not None
        while self._close is None:
            if self.outbox.direct is None and not self._writer_started:
                self._start_writer()  # asked for by ``_on_text`` (see ``_start_writer``)
            if first and self.principal is None:
                msg = None
                with anyio.move_on_after(AUTH_TIMEOUT):
                    msg = await self.websocket.receive()
                if msg is None:
                    self.close(CloseCode.NOT_AUTHENTICATED, "authentication timeout")
                    break
            else:
                # Frames that arrive while the reader waits here are handled by ``_on_text``.
                self._idle = fast
                msg = await self.websocket.receive()
                self._idle = False
            first = False
            if msg["type"] == "websocket.disconnect":
                self.outbox.close()
                self._start_writer()
                break
            if WAKE in msg:
                pending = self._pending
                while pending:
                    await self._handle_later(pending.popleft(), session)
                continue
            text = msg.get("text")
            if text is not None:
                session.receive_data(text)
            else:
                session.receive_binary()
            for event in session.events_received():
                if not self._handle_now(event, session):
                    await self._handle_later(event, session)
            self._flush(session)
        self._start_writer()  # if ``_on_text`` closed, it could not start the writer itself
        await anyio.sleep_forever()  # the writer ends the task group after the close frame

    def _on_text(self, data: bytes | str) -> bool:
        """A text frame, straight from the protocol; ``False``: queue it for the reader."""
        if not self._idle or self._close is not None:
            return False
        session = self._session
        assert session is not None
        session.receive_data(data)
        events = session.events_received()
        for i, event in enumerate(events):
            if not self._handle_now(event, session):
                if self._pending is None:
                    self._pending = deque()
                self._pending.extend(events[i:])  # these, then every later frame: the reader
                self._idle = False
                assert self._wake is not None
                self._wake()
                break
        self._flush(session)
        return True

    def signed_in(self) -> bool:
        """Whether the credential still holds; a wallet session logged out or expired since it
        was accepted closes the socket (4401) and answers ``False``: nothing more is done or
        sent for it. API keys always hold."""
        principal = self.principal
        if (
            principal is not None
            and principal.user_id is not None
            and self.core.auth.sessions(principal.key_hash) is None
        ):
            self.close(CloseCode.NOT_AUTHENTICATED, "session logged out or expired")
            return False
        return True

    def _handle_now(self, event: Any, session: MinerSession | ClientSession) -> bool:
        if not self.signed_in():
            return True
        performed = self.core.dispatcher.performed
        if performed != self._performed:
            self._performed, self._share = performed, 0
        elif self._share >= BATCH_SHARE:
            self._over_share = True  # ``_handle_later`` waits for the batches, then handles it
            return False
        self._share += 1
        try:
            return self.handle_now(event, session)
        except Exception:  # a bug must not take other sessions down
            log.exception("internal error in %s connection", self.role.value)
            self.close(CloseCode.INTERNAL_ERROR, "internal error")
            return True

    async def _handle_later(self, event: Any, session: MinerSession | ClientSession) -> None:
        try:
            if self._over_share:
                self._over_share = False
                try:
                    await self.core.dispatcher.barrier()
                except Unavailable:  # the writer has stopped: nothing more is taken
                    self.close(CloseCode.GOING_AWAY, "server shutting down")
                    return
                if self._handle_now(event, session):
                    return
            await self.handle(event, session)
        except StorageError as exc:  # a read failed (a dropped connection, a server restart)
            self.read_failed(event, exc)
        except Exception:  # a bug must not take other sessions down
            log.exception("internal error in %s connection", self.role.value)
            self.close(CloseCode.INTERNAL_ERROR, "internal error")

    def read_failed(self, event: Any, exc: StorageError) -> None:
        """``event`` needed a store read that failed: not a bug, and the peer may retry. Its
        request gets ``error`` ``unavailable`` (REST's 503), after the open batch as any
        refusal; the socket goes on."""
        what = message_type(event) or type(event).__name__
        log.warning("%s socket: %s: the database could not be read: %s", self.role.value, what, exc)
        request_id: str | None = getattr(event, "id", None)
        ref = getattr(event, "job_id", None) or what
        self.core.dispatcher.after_commit(
            lambda: self.error(ErrorCode.UNAVAILABLE, READ_FAILED, request_id=request_id, ref=ref)
        )

    def _flush(self, session: MinerSession | ClientSession) -> None:
        """What the session itself answered (errors), and its close."""
        for frame in session.data_to_send():
            self.outbox.put(frame.decode())
        if session.close_code is not None:
            self.close(session.close_code, session.close_reason)

    async def _writer(self, scope: anyio.CancelScope) -> None:
        ws = self.websocket
        send_now = self._send_now  # falls back to ASGI send frame by frame when refused
        try:
            while True:
                frames = await self.outbox.take()
                for frame in frames:
                    if send_now is None or not send_now(frame.encode()):
                        await ws.send_text(frame)
                if self.outbox.closed and not len(self.outbox):
                    break
            if self._close is not None and ws.application_state is WebSocketState.CONNECTED:
                await ws.close(*self._close)
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the peer is gone; nothing more can be sent
        finally:
            scope.cancel()

    def authenticate(
        self, token: str, session: MinerSession | ClientSession, request_id: str | None = None
    ) -> None:
        """An ``auth`` frame; one with an id is acked once the credential holds (before any
        frame that follows from it: the ops socket's snapshot)."""
        principal = self.core.auth.from_token(token)
        if principal is None:
            self.close(CloseCode.NOT_AUTHENTICATED, "unknown credential")
        elif not principal.acts_as(self.role):
            self.close(CloseCode.FORBIDDEN, self._role_required())
        else:
            self.principal = principal
            session.authenticated()
            self.reply(request_id)
            self.on_authenticated()

    # -- hooks ----------------------------------------------------------------------------

    @abstractmethod
    def make_session(self, *, authenticated: bool) -> MinerSession | ClientSession:
        """The Sans-I/O session for this endpoint."""

    def handle_now(self, event: Any, session: Any) -> bool:
        """Act on one decoded, legal message without awaiting; ``False``: not done, the reader
        must ``await handle(event)`` (nothing may have changed). A subclass that overrides
        this gets the receive fast path."""
        return False

    @abstractmethod
    async def handle(self, event: Any, session: Any) -> None:
        """Act on a message ``handle_now`` declined."""

    def on_authenticated(self) -> None:  # noqa: B027 - an optional hook, empty by default
        """The peer proved its credential (handshake header or first ``auth`` frame)."""

    @abstractmethod
    def on_closed(self) -> None:
        """The socket is gone: release what this connection held."""
