"""Ring 2: SocketFastPath sends socket paths straight to their endpoint, the rest to Starlette."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient

from web.asgi import SocketFastPath

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.types import ASGIApp, Receive, Scope, Send
    from starlette.websockets import WebSocket

SEEN: list[str] = []


class Recorder:
    """Middleware: records every path that went through Starlette's stack."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            SEEN.append(scope["path"])
        await self.app(scope, receive, send)


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    text = await websocket.receive_text()
    await websocket.send_text(f"{websocket.app.state.name}:{text}")
    await websocket.close()


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hi")


def make_app() -> Starlette:
    app = Starlette(
        routes=[
            Route("/hello", hello),
            WebSocketRoute("/ws", echo),
            WebSocketRoute("/ws/{name}", echo),
        ],
        middleware=[Middleware(Recorder)],
    )
    app.state.name = "app"
    return app


def test_static_socket_routes_skip_starlette_and_see_the_app() -> None:
    SEEN.clear()
    fast = SocketFastPath(make_app())
    assert set(fast.sockets) == {"/ws"}  # templated paths are left to the router
    with TestClient(fast) as client:
        with client.websocket_connect("/ws") as ws:
            ws.send_text("ping")
            assert ws.receive_text() == "app:ping"
        with client.websocket_connect("/ws/x") as ws:
            ws.send_text("pong")
            assert ws.receive_text() == "app:pong"
        assert client.get("/hello").text == "hi"
    assert SEEN == ["/ws/x", "/hello"]
