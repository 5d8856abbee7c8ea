"""The socket pump shared by the miner and client endpoints.

A connection runs a reader that feeds frames to a Sans-I/O session and handles the decoded
messages, and a writer that drains the connection's ``Outbox``. Closing (by the session, the
dispatcher, an overflow or shutdown) is a request: the writer flushes what is queued, sends
the close frame, and the task group ends.

Under uvicorn with our protocol (web/transport.py) frames are written synchronously as they
are queued, and the writer task is only started when that stops working (flow control) or
to close: an idle socket then holds no writer task, and a frame costs no task switch.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from dispatcher.fanout import Outbox
from protocol.codec import encode
from protocol.messages import Ack, Error
from protocol.types import CloseCode
from web.transport import SEND_NOW

if TYPE_CHECKING:
    from collections.abc import Callable

    from anyio.abc import TaskGroup

    from protocol.session import ClientSession, MinerSession
    from web.app import Coordinator
    from web.auth import Principal, Role

__all__ = ["Connection"]

log = logging.getLogger("aitbc.coordinator")
AUTH_TIMEOUT = 5.0


class Connection(ABC):
    role: Role
    # Outbox soft/hard limits when an endpoint needs other than the defaults.
    outbox_limits: ClassVar[dict[str, int]] = {}

    def __init__(self, core: Coordinator, websocket: WebSocket) -> None:
        self.core = core
        self.websocket = websocket
        self.outbox = Outbox(self.close, **self.outbox_limits)
        self.principal: Principal | None = None
        self._close: tuple[int, str] | None = None
        self._scope = anyio.CancelScope()
        self._send_now: Callable[[bytes], bool] | None = None
        self._tasks: TaskGroup | None = None
        self._writer_started = False

    # -- sink interface -------------------------------------------------------------------

    def send_frame(self, frame: str) -> None:
        self.outbox.put(frame)

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
            self._writer_started = True
            self._tasks.start_soon(self._writer, self._tasks.cancel_scope)

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        token = self.core.auth.token_from_headers(self.websocket.headers)
        principal = None if token is None else self.core.auth.from_token(token)
        await self.websocket.accept()
        if token is not None and principal is None:
            await self._close_now(CloseCode.NOT_AUTHENTICATED, "unknown credential")
            return
        if principal is not None and principal.role is not self.role:
            await self._close_now(
                CloseCode.FORBIDDEN, f"a {self.role.value} credential is required"
            )
            return
        self.principal = principal
        session = self.make_session(authenticated=principal is not None)
        if principal is not None:
            self.on_authenticated()
        self.core.connections.add(self)
        self._send_now = self.websocket.scope.get("extensions", {}).get(SEND_NOW)
        try:
            with self._scope:
                async with anyio.create_task_group() as tg:
                    self._tasks = tg
                    if self._send_now is None or self._close is not None:
                        self._start_writer()
                    else:
                        self.outbox.direct = self._direct
                    await self._reader(session)
        finally:
            self._tasks = None
            self.core.connections.discard(self)
            self.outbox.close()
            self.on_closed()

    async def _close_now(self, code: int, reason: str) -> None:
        try:
            await self.websocket.close(code, reason)
        except (RuntimeError, OSError):
            pass

    async def _reader(self, session: MinerSession | ClientSession) -> None:
        first = True
        while self._close is None:
            if first and self.principal is None:
                msg = None
                with anyio.move_on_after(AUTH_TIMEOUT):
                    msg = await self.websocket.receive()
                if msg is None:
                    self.close(CloseCode.NOT_AUTHENTICATED, "authentication timeout")
                    break
            else:
                msg = await self.websocket.receive()
            first = False
            if msg["type"] == "websocket.disconnect":
                self.outbox.close()
                self._start_writer()
                break
            text = msg.get("text")
            if text is not None:
                session.receive_data(text)
            else:
                session.receive_binary()
            for event in session.events_received():
                try:
                    await self.handle(event, session)
                except Exception:  # a bug must not take other sessions down
                    log.exception("internal error in %s connection", self.role.value)
                    self.close(CloseCode.INTERNAL_ERROR, "internal error")
            for frame in session.data_to_send():
                self.outbox.put(frame.decode())
            if session.close_code is not None:
                self.close(session.close_code, session.close_reason)
        await anyio.sleep_forever()  # the writer ends the task group after the close frame

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

    def authenticate(self, token: str, session: MinerSession | ClientSession) -> None:
        principal = self.core.auth.from_token(token)
        if principal is None:
            self.close(CloseCode.NOT_AUTHENTICATED, "unknown credential")
        elif principal.role is not self.role:
            self.close(CloseCode.FORBIDDEN, f"a {self.role.value} credential is required")
        else:
            self.principal = principal
            session.authenticated()
            self.on_authenticated()

    # -- hooks ----------------------------------------------------------------------------

    @abstractmethod
    def make_session(self, *, authenticated: bool) -> MinerSession | ClientSession:
        """The Sans-I/O session for this endpoint."""

    @abstractmethod
    async def handle(self, event: Any, session: Any) -> None:
        """Act on one decoded, legal message."""

    def on_authenticated(self) -> None:  # noqa: B027 - an optional hook, empty by default
        """The peer proved its credential (handshake header or first ``auth`` frame)."""

    @abstractmethod
    def on_closed(self) -> None:
        """The socket is gone: release what this connection held."""
