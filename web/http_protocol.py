"""One ``write()`` per HTTP response: uvicorn's httptools protocol on a coalescing transport.

uvicorn writes a response's status line and headers to the transport on
``http.response.start`` and the body on ``http.response.body``: two writes, and uvloop turns
each into a ``send`` syscall (and, on loopback, a wake-up of the reader). Profiled under
``bench.rest`` those writes were the largest single cost of a REST request.
``CoalescingHttpProtocol`` hands uvicorn a ``CoalescingTransport`` (web/transport.py) and
flushes it as soon as the response is complete, so a plain response leaves in one syscall
with no added delay; a streamed response is still flushed at the end of every event-loop
tick. A WebSocket upgrade gets the real transport (the socket protocol coalesces by itself).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from web.transport import CoalescingTransport

if TYPE_CHECKING:
    import asyncio

__all__ = ["CoalescingHttpProtocol"]


class CoalescingHttpProtocol(HttpToolsProtocol):
    _coalescing: CoalescingTransport | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw_transport = transport
        # uvloop's TCPTransport implements the Transport API without subclassing it.
        self._coalescing = CoalescingTransport(transport, self.loop)
        super().connection_made(self._coalescing)  # type: ignore[arg-type]

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
