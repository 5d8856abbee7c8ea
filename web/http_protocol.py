"""One ``write()`` per HTTP response: uvicorn's httptools protocol on a coalescing transport.

uvicorn writes a response's status line and headers to the transport on
``http.response.start`` and the body on ``http.response.body``: two writes, and uvloop turns
each into a ``send`` syscall (and, on loopback, a wake-up of the reader). Profiled under
``bench.rest`` those writes were the largest single cost of a REST request.
``CoalescingHttpProtocol`` hands uvicorn a ``CoalescingTransport`` (web/transport.py) and
flushes it as soon as the response is complete, so a plain response leaves in one syscall
with no added delay; a streamed response is still flushed at the end of every event-loop
tick. A WebSocket upgrade gets the real transport (the socket protocol coalesces by itself).

A miner or client socket opens with a plain upgrade request (``web.wire.plain_upgrade``) as
the connection's first read. ``httptools`` would parse it with a Python callback per header
into an HTTP scope, and uvicorn would rebuild the request's bytes for the WebSocket protocol
to parse again; instead such a first read goes straight to ``CoalescingWSProtocol``'s lean
handshake, parsed once. Anything else (another first read, or a request in several reads)
goes through ``httptools`` as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from uvicorn.logging import TRACE_LOG_LEVEL
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from web.transport import CoalescingTransport, CoalescingWSProtocol
from web.wire import plain_upgrade

if TYPE_CHECKING:
    import asyncio

__all__ = ["MAX_HEAD_BYTES", "CoalescingHttpProtocol"]

# The most a request line and its headers may take, give or take one read. httptools puts no
# bound on them: 16 MiB of headers were read, kept and served, before any credential was seen.
MAX_HEAD_BYTES = 64 * 1024
_HEAD_TOO_LARGE = f"request line and headers over {MAX_HEAD_BYTES} bytes".encode()


class CoalescingHttpProtocol(HttpToolsProtocol):
    _coalescing: CoalescingTransport | None = None
    _first = False  # nothing has been read yet
    # The request being read: the cycle that was current when it began (its head is complete
    # once uvicorn has made it one of its own), and the bytes read since that read (-1: none).
    _head_of: object = None
    _head_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._first = True
        self._raw_transport = transport
        # uvloop's TCPTransport implements the Transport API without subclassing it.
        self._coalescing = CoalescingTransport(transport, self.loop)
        super().connection_made(self._coalescing)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        if self._first:
            self._first = False
            if self._upgrade_now(data):
                return
        super().data_received(data)
        if self.cycle is not self._head_of or self.parser is None or self.transport.is_closing():
            return  # no head being read (a request is served, or upgraded), or answered
        if self._head_bytes < 0:
            self._head_bytes = 0  # the read it began in, which may end another request: not counted
        else:
            self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES:
            self._send_431()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_of, self._head_bytes = self.cycle, -1

    def _send_431(self) -> None:
        """``send_400_response``'s answer, as 431 (a client's mistake: nothing is logged)."""
        content = [STATUS_LINE[431]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content += [
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: %d\r\n" % len(_HEAD_TOO_LARGE),
            b"connection: close\r\n\r\n",
            _HEAD_TOO_LARGE,
        ]
        self.transport.write(b"".join(content))
        self.transport.close()

    def _upgrade_now(self, data: bytes) -> bool:
        """``handle_websocket_upgrade`` for a plain upgrade request, without ``httptools``."""
        ws_class = self.ws_protocol_class
        if (
            ws_class is None
            or not issubclass(ws_class, CoalescingWSProtocol)
            or self.logger.level <= TRACE_LOG_LEVEL  # uvicorn traces the upgrade
        ):
            return False
        request = plain_upgrade(data)
        if request is None:
            return False
        self.connections.discard(self)
        self.transport = self._raw_transport
        self._coalescing = None  # nothing was written to it
        protocol = ws_class(
            config=self.config, server_state=self.server_state, app_state=self.app_state
        )
        protocol.connection_made(self._raw_transport)
        protocol.lean_upgrade(request)
        self._raw_transport.set_protocol(protocol)
        self._drop_parser()
        return True

    def _drop_parser(self) -> None:
        """Once upgraded: the parser and this protocol reference each other, a cycle only
        the garbage collector would free (as ``connection_lost`` does, which never comes)."""
        self.parser = None  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        # The cycle holds this protocol (its ``on_response``), which holds the cycle: a
        # reference cycle only the collector would free, kept until its oldest generation ran.
        self.cycle = None  # type: ignore[assignment]
        self._head_of = None  # the same cycle
        self.pipeline.clear()  # requests that will never run: their cycles hold it as well

    def on_response_complete(self) -> None:
        if self._coalescing is not None:
            self._coalescing.flush()
        super().on_response_complete()

    def handle_websocket_upgrade(self) -> None:
        if self._coalescing is not None:
            self._coalescing.flush()
            self.transport = self._raw_transport
            self._coalescing = None
        super().handle_websocket_upgrade()
        self._drop_parser()  # the parser's last call has returned: it raised the upgrade
