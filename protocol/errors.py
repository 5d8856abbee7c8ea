"""Errors of the protocol layer.

Tree::

    ProtocolError                 never raised directly
    ├── LocalProtocolError        our code misused a session (a bug on this side)
    ├── RemoteProtocolError       the peer sent something invalid; carries ``close_code``
    │   └── UnknownMessageType    a well-formed frame with a ``type`` we do not know (not fatal)
    └── InvalidState              an operation illegal in the session's current state
"""

from __future__ import annotations

from protocol.types import CloseCode

__all__ = [
    "InvalidState",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "UnknownMessageType",
]


class ProtocolError(Exception):
    """Base class of every protocol error."""


class LocalProtocolError(ProtocolError):
    """Our own code used a session in a way the protocol forbids."""


class RemoteProtocolError(ProtocolError):
    """The peer violated the protocol; ``close_code`` says how to end the session."""

    def __init__(self, message: str, *, close_code: CloseCode = CloseCode.INVALID_DATA) -> None:
        super().__init__(message)
        self.message = message
        self.close_code = close_code

    def __str__(self) -> str:
        return f"{self.message} (close {int(self.close_code)})"


class UnknownMessageType(RemoteProtocolError):
    """A frame whose ``type`` is not part of the protocol; answered with an error frame."""

    def __init__(self, msg_type: str, request_id: str | None) -> None:
        super().__init__(f"unknown message type {msg_type!r}", close_code=CloseCode.NORMAL)
        self.msg_type = msg_type
        self.request_id = request_id


class InvalidState(ProtocolError, AssertionError):
    """An operation was attempted in a state that does not allow it."""
