"""What the examples make of a lost or refused connection: try again, or stop with one line.

A dropped connection, a coordinator going away (1001), a standby not serving yet, a slow
reader closed 4429: another attempt (or the next ``--url``) can succeed. A wrong key (4401),
a key of the wrong role (4403), a frame the coordinator refuses (1003, 1007, 1009, 4000), a
protocol version it does not speak (4002), a newer session for the same miner id (4409), an
HTTP 4xx answer to the upgrade (a URL that is not a socket endpoint), a ``wss://`` server whose
certificate is not trusted, or a URL that is not a ``ws://`` or ``wss://`` one would be refused
the same way every time: the examples stop on those and say why, instead of reconnecting for
ever. So they do when a server takes the socket but sends no ``welcome`` in time (10 s from
the hello; not the coordinator's socket: ``no_welcome``).
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.uri import parse_uri

from protocol.types import CloseCode

if TYPE_CHECKING:
    import argparse

__all__ = ["LOST", "Refused", "check_utf8", "describe", "no_welcome", "refusal", "url_refusal"]

# What ``connect`` and a connection raise when the attempt failed: ``refusal`` tells those to
# give up on from those to try again. ``InvalidHandshake`` also stands for a coordinator that
# went away during the opening handshake (``InvalidMessage``: no HTTP answer).
LOST = (ConnectionClosed, InvalidHandshake, InvalidURI, OSError, TimeoutError)

_WHY: dict[int, str] = {
    CloseCode.NOT_AUTHENTICATED: "the key is not known to the coordinator: check --key",
    CloseCode.FORBIDDEN: "the key is not allowed on this socket: check --key and --url",
    CloseCode.UNSUPPORTED_DATA: "the coordinator refuses this example's frames",
    CloseCode.INVALID_DATA: "the coordinator refuses this example's frames",
    CloseCode.TOO_BIG: "a frame was larger than the coordinator takes",
    CloseCode.PROTOCOL_ERROR: "the coordinator refuses this example's frames",
    CloseCode.UNSUPPORTED_VERSION: "the coordinator does not speak this example's protocol",
    CloseCode.REPLACED: "a newer session with the same miner id took over",
}


class Refused(Exception):
    """The coordinator refused in a way another attempt would not change (``str()``: why)."""


def describe(exc: BaseException) -> str:
    """A short line for a lost or failed connection, e.g. ``closed 4429 (too slow)``."""
    if isinstance(exc, ConnectionClosed):
        close = exc.rcvd or exc.sent
        if close is None:
            return "closed without a close frame"
        return f"closed {close.code}" + (f" ({close.reason})" if close.reason else "")
    if isinstance(exc, InvalidStatus):
        return f"HTTP {exc.response.status_code} to the WebSocket upgrade"
    return str(exc) or type(exc).__name__


def refusal(exc: BaseException, url: str) -> Refused | None:
    """The refusal ``exc`` stands for, or None when trying again might succeed."""
    if isinstance(exc, ConnectionClosed) and exc.rcvd is not None and exc.rcvd.code in _WHY:
        return Refused(f"{url} refused: {describe(exc)}: {_WHY[exc.rcvd.code]}")
    if isinstance(exc, InvalidURI):
        return Refused(f"{exc}: check --url")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return Refused(
            f"{url}: its certificate is not trusted ({exc.verify_message}): trust it "
            "(SSL_CERT_FILE=its-certificate.pem) or check --url"
        )
    if isinstance(exc, InvalidStatus) and 400 <= exc.response.status_code < 500:
        why = "not a socket endpoint of the coordinator? (…/v1/jobs/ws or …/v1/miners/ws)"
        return Refused(f"{url} refused: {describe(exc)}: {why}")
    return None


def no_welcome(url: str, seconds: float, socket: str) -> Refused:
    """The refusal of a server at ``url`` that took the socket but sent no welcome within
    ``seconds`` of the hello; ``socket`` names the one it should have been."""
    return Refused(
        f"{url} sent no welcome within {seconds:g} s of the hello: "
        f"is it the coordinator's {socket}?"
    )


def url_refusal(url: str) -> Refused | None:
    """The refusal of a ``--url`` that names no socket at all, before any attempt, or None.

    ``connect`` raises ``InvalidURI`` for a scheme other than ws/wss (``refusal`` turns that into
    a ``Refused``), but urllib's ``ValueError`` for a port out of range or not a number, or a
    broken IPv6 address: a traceback, from the examples' task groups."""
    try:
        parse_uri(url)
    except InvalidURI as exc:
        return Refused(f"{exc}: check --url")
    except ValueError as exc:
        return Refused(f"{url} isn't a valid URI: {exc}: check --url")
    return None


def check_utf8(parser: argparse.ArgumentParser, args: argparse.Namespace, *options: str) -> None:
    """A usage error (exit 2) naming the first of ``options`` whose value holds a byte that is
    not UTF-8 (Python gives it as a lone surrogate): it could not be sent, and failed later
    with a traceback."""
    for option in options:
        value = getattr(args, option)
        for text in value if isinstance(value, list) else [value or ""]:
            try:
                text.encode()
            except UnicodeEncodeError:
                parser.error(f"--{option.replace('_', '-')} is not valid UTF-8")
