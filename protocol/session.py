"""Server-side Sans-I/O sessions for miner and client sockets (docs/protocol.md).

Rule 1: no I/O, no clock. Frames go in through ``receive_data``; decoded, *legal* messages come
out of ``events_received``; bytes to write come out of ``data_to_send``; when the session must
end, ``close_code`` is set and the state is ``CLOSING``.
Rule 2: bad peer input never raises out of ``receive_data``. It becomes an error frame (not
fatal) or a close code (fatal), exactly as the contract's table says.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from protocol.codec import decode_client_frame, decode_miner_frame, encode
from protocol.errors import InvalidState, RemoteProtocolError, UnknownMessageType
from protocol.messages import (
    Ack,
    Auth,
    ClientHello,
    ClientToServer,
    Error,
    Heartbeat,
    Hello,
    MinerToServer,
)
from protocol.types import PROTOCOL_VERSION, CloseCode, ErrorCode

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "AWAIT_AUTH",
    "AWAIT_HELLO",
    "CLOSING",
    "DEFAULT_MAX_FRAME",
    "OPEN",
    "ClientSession",
    "MinerSession",
    "SessionState",
]

DEFAULT_MAX_FRAME = 1024 * 1024


class SessionState(Enum):
    AWAIT_AUTH = "await_auth"
    AWAIT_HELLO = "await_hello"
    OPEN = "open"
    CLOSING = "closing"


AWAIT_AUTH = SessionState.AWAIT_AUTH
AWAIT_HELLO = SessionState.AWAIT_HELLO
OPEN = SessionState.OPEN
CLOSING = SessionState.CLOSING

M = TypeVar("M")


class _Session(Generic[M]):
    """Shared framing rules; subclasses supply the decoder and the hello type."""

    _decode: Callable[[bytes | str], M]
    _hello_type: type
    _handshake_types: tuple[type, ...]  # (Auth, the hello type): refused once OPEN
    _ignored_before_hello: tuple[type, ...] = ()  # legal at any time, meaningless before hello

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._handshake_types = (Auth, cls._hello_type)

    def __init__(self, *, authenticated: bool, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.state = AWAIT_HELLO if authenticated else AWAIT_AUTH
        self.max_frame = max_frame
        self.close_code: CloseCode | None = None
        self.close_reason = ""
        self.error: RemoteProtocolError | None = None
        self._events: list[M] = []
        self._out: list[bytes] = []

    # -- input ------------------------------------------------------------------------------

    def receive_data(self, data: str | bytes) -> None:
        """Feed one text frame."""
        if self.state is CLOSING:
            return
        if len(data) > self.max_frame:
            self.fail(CloseCode.TOO_BIG, "frame too big")
            return
        try:
            msg = type(self)._decode(data)
        except UnknownMessageType as exc:
            if self.state is AWAIT_AUTH:  # "anything else first -> close 4401"
                self.fail(CloseCode.NOT_AUTHENTICATED, "authenticate first")
                return
            self.send_error(
                ErrorCode.UNKNOWN_TYPE, str(exc.message), id=exc.request_id, ref=exc.msg_type
            )
            return
        except RemoteProtocolError as exc:
            self.error = exc
            self.fail(exc.close_code, exc.message)
            return
        self._admit(msg)

    def receive_binary(self) -> None:
        """A binary frame arrived: the contract closes with 1003."""
        if self.state is not CLOSING:
            self.fail(CloseCode.UNSUPPORTED_DATA, "binary frames are not supported")

    def _admit(self, msg: M) -> None:
        state = self.state
        if state is OPEN:  # the steady state first: every message after the handshake
            if isinstance(msg, self._handshake_types):
                kind = "auth" if isinstance(msg, Auth) else "hello"  # the frame's type, as sent
                self.fail(CloseCode.PROTOCOL_ERROR, f"{kind} after handshake")
            else:
                self._events.append(msg)
        elif state is AWAIT_AUTH:
            if isinstance(msg, Auth):
                self._events.append(msg)
            else:
                self.fail(CloseCode.NOT_AUTHENTICATED, "authenticate first")
        elif isinstance(msg, self._ignored_before_hello):
            # AWAIT_HELLO: e.g. a miner's heartbeat sent before its hello. Nothing to act on,
            # but a request with an id gets its one reply.
            request_id = getattr(msg, "id", None)
            if request_id is not None:
                self.send(Ack(id=request_id))
        elif not isinstance(msg, self._hello_type):  # AWAIT_HELLO (CLOSING reads nothing)
            self.fail(CloseCode.PROTOCOL_ERROR, "expected hello")
        elif getattr(msg, "protocol", None) != PROTOCOL_VERSION:
            self.fail(CloseCode.UNSUPPORTED_VERSION, f"protocol {PROTOCOL_VERSION} only")
        else:
            self.state = OPEN
            self._events.append(msg)

    def authenticated(self) -> None:
        """The adapter accepted the credential of an ``auth`` frame."""
        if self.state is not AWAIT_AUTH:
            raise InvalidState(f"authenticated() in state {self.state.value}")
        self.state = AWAIT_HELLO

    # -- output -----------------------------------------------------------------------------

    def events_received(self) -> list[M]:
        events, self._events = self._events, []
        return events

    def send(self, msg: object) -> None:
        self.send_frame(encode(msg))

    def send_frame(self, frame: bytes) -> None:
        """Queue an already-encoded frame (events are encoded once for every recipient)."""
        if self.state is CLOSING:
            return
        self._out.append(frame)

    def send_error(
        self, code: str, message: str, *, id: str | None = None, ref: str | None = None
    ) -> None:
        self.send(Error(code=code, message=message, id=id, ref=ref))

    def data_to_send(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    def stop_reading(self) -> None:
        """Read no further input: the adapter refused the session and closes it itself, later
        (a refusal that must wait for a commit). Unlike ``fail``, no close code is set."""
        self.state = CLOSING
        self._events.clear()

    def fail(self, code: CloseCode, reason: str) -> None:
        """End the session: no further input is read, the adapter closes with ``code``."""
        if self.state is CLOSING:
            return
        self.state = CLOSING
        self.close_code = code
        # Close reasons are limited to 123 bytes by RFC 6455.
        self.close_reason = reason.encode()[:120].decode(errors="ignore")
        self._events.clear()


class MinerSession(_Session[MinerToServer]):
    """The server's view of one miner socket."""

    _decode = staticmethod(decode_miner_frame)
    _hello_type = Hello
    # protocol.md: a heartbeat frame is legal at any time; before hello it says nothing yet.
    _ignored_before_hello = (Heartbeat,)


class ClientSession(_Session[ClientToServer]):
    """The server's view of one client (submitter / subscriber) socket."""

    _decode = staticmethod(decode_client_frame)
    _hello_type = ClientHello
