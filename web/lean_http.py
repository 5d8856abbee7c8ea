"""Endpoint-table requests served without the ASGI layers around them.

Profiled under ``bench.rest``, a REST request spent about as much server CPU in the layers
around our endpoint wrapper (web/http.py) as in it: uvicorn's ``ProxyHeadersMiddleware``,
``SocketFastPath`` (web/asgi.py), ``CoordinatorApp.__call__`` (web/routing.py), Starlette's
``Response.__call__`` with its two ASGI ``send`` messages, and uvicorn formatting the
access-log arguments for a logger that drops them. ``LeanHttpProtocol`` (the coalescing
protocol of web/http_protocol.py) takes a shorter way for the requests ``CoordinatorApp``
routes to an endpoint route itself:

- uvicorn parses the request as before. When its headers are complete, the request is not an
  upgrade or a HEAD, carries no ``X-Forwarded-*`` header, the server has no ``root_path`` or
  concurrency limit, the app uvicorn serves is a ``CoordinatorApp`` behind layers known to pass
  such a request through unchanged (``ProxyHeadersMiddleware``: it only reads the forwarded
  headers; ``SocketFastPath``: it only serves WebSocket paths), and
  ``CoordinatorApp.endpoint_for`` has its route, the request runs in a ``LeanCycle``;
- a ``LeanCycle`` is uvicorn's request cycle (same task, body reading, ``receive``, ``send``,
  error handling, keep-alive and pipelining) running ``CoordinatorApp.serve`` on a scope
  built as the skipped layers would build it;
- a plain ``Response`` (no background task, no ``Connection`` or ``Transfer-Encoding``
  header, a ``Content-Length`` equal to its body's length, or none on an empty 204/304) is
  written as the bytes uvicorn's ``send`` writes for it, in one write (the server's default
  headers, checked and rendered once per list); any other response, and every answer of the
  app's exception handlers, goes through ASGI ``send`` as before.

Anything else goes uvicorn's way unchanged. tests/web/test_lean_http.py sends the same
requests to both protocols and compares the bytes that come back.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import httptools
from starlette.responses import Response
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    RequestResponseCycle,
)
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from web.asgi import SocketFastPath
from web.http_protocol import CoalescingHttpProtocol
from web.routing import CoordinatorApp
from web.transport import CoalescingTransport

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from starlette.types import Receive, Scope, Send

    from web.http import EndpointRoute

__all__ = ["LeanCycle", "LeanHttpProtocol", "endpoint_app"]

# Layers that hand an HTTP request without X-Forwarded-* headers on unchanged.
_PASS_THROUGH: tuple[type, ...] = (ProxyHeadersMiddleware, SocketFastPath)
_FORWARDED = (b"x-forwarded-for", b"x-forwarded-proto")
_UNSAFE = (b"connection", b"transfer-encoding")


def endpoint_app(app: Any) -> CoordinatorApp | None:
    """The ``CoordinatorApp`` at the end of a chain of pass-through layers, else None."""
    while not isinstance(app, CoordinatorApp):
        if type(app) not in _PASS_THROUGH:
            return None
        app = app.app
    return app


class LeanHttpProtocol(CoalescingHttpProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._endpoints: CoordinatorApp | None = None
        if not self.root_path and self.limit_concurrency is None:
            self._endpoints = endpoint_app(self.app)
        # The cycle whose handler waits for this connection to close (``LeanCycle.on_hangup``)
        # and what to call then. uvicorn marks only its newest cycle disconnected, and with
        # pipelining that is not the one still running.
        self.hangup: tuple[LeanCycle, Callable[[], None]] | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        hangup, self.hangup = self.hangup, None
        if hangup is not None:
            cycle, callback = hangup
            if not cycle.response_complete:
                cycle.disconnected = True  # its answer, if any, is dropped as uvicorn drops it
                callback()

    def on_headers_complete(self) -> None:
        app = self._endpoints
        parser = self.parser
        if app is None or parser.should_upgrade():
            super().on_headers_complete()
            return
        method = parser.get_method().decode("ascii")
        if method == "HEAD":
            super().on_headers_complete()
            return
        for name, _ in self.headers:
            if name in _FORWARDED:
                super().on_headers_complete()
                return
        parsed_url = httptools.parse_url(self.url)
        raw_path = parsed_url.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = unquote(path)
        hit = app.endpoint_for(method, path)
        if hit is None:
            super().on_headers_complete()
            return
        http_version = parser.get_http_version()
        scope = self.scope
        scope["method"] = method
        if http_version != "1.1":
            scope["http_version"] = http_version
        scope["path"] = path
        scope["raw_path"] = raw_path
        scope["query_string"] = parsed_url.query or b""
        route, params = hit
        app.enter(scope, route, params)  # type: ignore[arg-type]

        existing_cycle = self.cycle
        self.cycle = LeanCycle(
            scope=scope,
            transport=self.transport,
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=self.expect_100_continue,
            keep_alive=http_version != "1.0" and parser.should_keep_alive(),
            on_response=self.on_response_complete,
        )
        self.cycle.app, self.cycle.route, self.cycle.owner = app, route, self
        if existing_cycle is None or existing_cycle.response_complete:
            self._start_asgi_task(self.cycle, app)  # type: ignore[arg-type]
        else:  # pipelined: queued as uvicorn queues it
            self.flow.pause_reading()
            self.pipeline.appendleft((self.cycle, app))  # type: ignore[arg-type]


class LeanCycle(RequestResponseCycle):
    """uvicorn's request cycle for a request routed to ``route`` of ``app`` (already entered
    into the scope): runs the endpoint directly and writes a plain response itself.

    ``run_asgi`` and ``_serve`` return their callee's coroutine rather than awaiting it: no
    frames of their own for every resumption of the request's task to pass through."""

    app: CoordinatorApp  # set with ``route`` and ``owner`` right after uvicorn's constructor
    route: EndpointRoute
    owner: LeanHttpProtocol

    def run_asgi(self, app: Any) -> Coroutine[Any, Any, None]:
        # uvicorn's wrapper (500 on an exception before the response started, and so on).
        return super().run_asgi(self._serve)  # type: ignore[arg-type]

    def _serve(self, scope: Scope, receive: Receive, send: Send) -> Coroutine[Any, Any, None]:
        return self.app.serve(self.route, scope, receive, send, self)

    def write(self, response: Response) -> bool:
        """Send ``response`` as uvicorn's ``send`` sends Starlette's two messages for it, in
        one write; False, having done nothing, when only the ASGI path may send it."""
        if type(response).__call__ is not Response.__call__ or response.background is not None:
            return False
        if self.response_started or self.disconnected or self.flow.write_paused:
            return False
        body = response.body
        if not isinstance(body, bytes):
            return False
        content = self._head(response.status_code, response.raw_headers, body)
        if content is None:
            return False
        self.response_started = True
        self.waiting_for_100_continue = False
        scope = self.scope
        if self.access_log and self.access_logger.isEnabledFor(logging.INFO):
            self.access_logger.info(
                '%s - "%s %s HTTP/%s" %d',
                get_client_addr(scope),
                scope["method"],
                get_path_with_query_string(scope),
                scope["http_version"],
                response.status_code,
            )
        if not self.keep_alive:
            content.append(b"connection: close\r\n")
        content += (b"\r\n", body)
        transport = self.transport
        if isinstance(transport, CoalescingTransport):
            transport.write_now(b"".join(content))  # on_response would flush it anyway
        else:
            transport.write(b"".join(content))
        self.chunked_encoding = False
        self.expected_content_length = 0
        self.response_complete = True
        self.message_event.set()
        if not self.keep_alive:
            self.transport.close()
        self.on_response()
        return True

    def on_hangup(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` if the connection closes before this cycle's response is
        written (``Responder``)."""
        if self.disconnected or self.transport.is_closing():
            callback()
        else:
            self.owner.hangup = (self, callback)

    def _head(
        self, status: int, raw_headers: list[tuple[bytes, bytes]], body: bytes
    ) -> list[bytes] | None:
        """The status line and header lines uvicorn writes, when it would write them for a
        body of exactly ``body`` (no chunking, no error); else None."""
        status_line = STATUS_LINE.get(status)
        if status_line is None:
            return None  # uvicorn raises: its error path answers
        defaults = _DEFAULT_LINES(self.default_headers)
        if defaults is None:
            return None  # uvicorn checks them itself
        content = [status_line, *defaults]
        length = None
        for name, value in raw_headers:
            if HEADER_RE.search(name) or HEADER_VALUE_RE.search(value):
                return None  # uvicorn raises: its error path answers
            name = name.lower()
            if name == b"content-length":
                if length is not None:
                    return None
                length = value
            elif name in _UNSAFE:
                return None
            content += (name, b": ", value, b"\r\n")
        if length is None:
            if body or status not in (204, 304):
                return None  # uvicorn would send it chunked
        elif not length.isdigit() or int(length) != len(body):
            return None  # uvicorn raises: its error path answers
        return content


def _plain_lines(headers: list[tuple[bytes, bytes]]) -> list[bytes] | None:
    """The lines uvicorn writes for ``headers``, when none is invalid or a framing header
    (``content-length``, ``connection``, ``transfer-encoding``); else None."""
    lines: list[bytes] = []
    for name, value in headers:
        if HEADER_RE.search(name) or HEADER_VALUE_RE.search(value):
            return None
        name = name.lower()
        if name == b"content-length" or name in _UNSAFE:
            return None
        lines += (name, b": ", value, b"\r\n")
    return lines


class _DefaultLines:
    """``_plain_lines`` of the server's default headers (``server``, ``date``, ``--header``),
    rendered once per list: uvicorn replaces the list when the date changes, once a second."""

    def __init__(self) -> None:
        self._headers: list[tuple[bytes, bytes]] | None = None
        self._lines: list[bytes] | None = None

    def __call__(self, headers: list[tuple[bytes, bytes]]) -> list[bytes] | None:
        if headers is not self._headers:
            self._headers, self._lines = headers, _plain_lines(headers)
        return self._lines


_DEFAULT_LINES = _DefaultLines()
