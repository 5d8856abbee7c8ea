"""Real sockets: uvicorn serving the app on a socket the test bound to 127.0.0.1:0."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from websockets.asyncio.client import ClientConnection, connect

from protocol.codec import decode_server_to_client, encode
from protocol.messages import ClientHello, ClientWelcome, JobEvent, ServerToClient
from tests.conftest import CLIENT_KEY, make_settings
from web.cli import build_server

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from storage.base import Store
    from web.settings import Settings

pytestmark = pytest.mark.e2e


@dataclass
class RunningServer:
    settings: Settings
    port: int
    app: Any
    stopped: anyio.Event

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    @property
    def core(self) -> Any:
        return self.app.state.core


async def start_server(
    settings: Settings, tg: anyio.abc.TaskGroup, *, port: int = 0, store: Store | None = None
) -> tuple[RunningServer, Any]:
    """Serve on 127.0.0.1:``port`` (0: any free port; ``store``: this one, not the settings');
    ``RunningServer.stopped`` is set when the server has shut down and closed its socket."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(512)
    server = build_server(settings, log_level="warning", store=store)
    server.config.lifespan = "on"
    stopped = anyio.Event()

    async def serve() -> None:
        try:
            await server.serve([sock])
        finally:
            sock.close()
            stopped.set()

    tg.start_soon(serve)
    with anyio.fail_after(10):
        while not server.started:  # noqa: ASYNC110 - uvicorn exposes readiness only as a flag
            await anyio.sleep(0.005)
    return RunningServer(settings, sock.getsockname()[1], server.config.app, stopped), server


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``both_backends`` run once on SQLite and once on PostgreSQL."""
    if "settings" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
        "both_backends"
    ):
        metafunc.parametrize("settings", ["sqlite", "postgres"], indirect=True)


@pytest.fixture
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """The server's settings: on SQLite, or on PostgreSQL for the ``both_backends`` run."""
    if getattr(request, "param", "sqlite") == "postgres":
        return make_settings(tmp_path, database_url=request.getfixturevalue("postgres_url"))
    return make_settings(tmp_path)


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[RunningServer]:
    async with anyio.create_task_group() as tg:
        running, uv = await start_server(settings, tg)
        yield running
        uv.should_exit = True


class Client:
    """A test client on /v1/jobs/ws that records every frame it receives."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.welcome: ClientWelcome | None = None

    async def send(self, msg: object) -> None:
        await self.ws.send(encode(msg).decode())

    async def recv(self, timeout: float = 5.0) -> ServerToClient:  # noqa: ASYNC109
        with anyio.fail_after(timeout):
            return decode_server_to_client(await self.ws.recv())

    async def events_until(
        self,
        job_id: str,
        last: str,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> list[JobEvent]:
        events: list[JobEvent] = []
        with anyio.fail_after(timeout):
            while True:
                msg = await self.recv(timeout)
                if isinstance(msg, JobEvent) and msg.job_id == job_id:
                    events.append(msg)
                    if msg.event == last:
                        return events


async def open_client(server: RunningServer, key: str = CLIENT_KEY) -> tuple[Client, Any]:
    cm = connect(server.url("/v1/jobs/ws"), additional_headers={"X-Api-Key": key})
    ws = await cm.__aenter__()
    client = Client(ws)
    await client.send(ClientHello(protocol=1))
    welcome = await client.recv()
    assert isinstance(welcome, ClientWelcome)
    client.welcome = welcome
    return client, cm
