"""The ASGI callable uvicorn serves: socket endpoints straight away, the rest via Starlette.

A WebSocket connection lives for hours, and every layer it was routed through stays suspended
on its stack for as long: Starlette's error and exception middleware, its router, the route,
the session wrapper. ``SocketFastPath`` looks the path up in a dict of the app's static
``WebSocketRoute``s and calls the endpoint directly; measured with ``bench.sockets``, about
5 KiB less per idle socket and fewer calls per handshake. HTTP requests, lifespan and any
other WebSocket path go through the Starlette app unchanged (tests drive that app directly,
so both paths are exercised), except that a start-up failing on a ``StorageError`` (a damaged
database, an unreachable server) is reported as its one line instead of Starlette's traceback.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from storage.errors import StorageError
from web.settings import SettingsError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from starlette.applications import Starlette
    from starlette.types import Message, Receive, Scope, Send

__all__ = ["SocketFastPath"]


class SocketFastPath:
    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.state = app.state
        self.sockets: dict[str, Callable[[WebSocket], Awaitable[None]]] = {
            route.path: route.endpoint
            for route in app.routes
            if isinstance(route, WebSocketRoute) and "{" not in route.path
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            endpoint = self.sockets.get(scope["path"])
            if endpoint is not None:
                scope["app"] = self.app  # what ``websocket.app`` reads
                await endpoint(WebSocket(scope, receive, send))
                return
        if scope["type"] == "lifespan":
            send = _storage_failure_in_one_line(send)
        await self.app(scope, receive, send)


def _storage_failure_in_one_line(send: Send) -> Send:
    """``send`` for the lifespan: Starlette reports a failed start-up with the traceback of the
    exception it is handling, which uvicorn logs; the own line of a ``StorageError`` (or of a
    ``SettingsError``: keys that do not match the database) says it all."""

    async def lifespan_send(message: Message) -> None:
        if message["type"] == "lifespan.startup.failed":
            exc = sys.exc_info()[1]  # Starlette sends this while it handles the exception
            if isinstance(exc, StorageError | SettingsError):
                message = {**message, "message": f"cannot start: {exc}"}
        await send(message)

    return lifespan_send
