"""``aitbc-coordinator demo``: the coordinator on a temporary database, with simulated miners of
several kinds and a client load (``examples/demo_load.py``), until Ctrl-C or ``--duration``.

It prints the ops page URL with the admin key in the fragment (``#key=…``): the page moves it to
sessionStorage and removes it from the address bar. The simulated peers are the examples' code,
so the demo runs from a source checkout.
"""

from __future__ import annotations

import importlib
import importlib.util
import secrets
import shutil
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from web.cli import build_server
from web.settings import Settings, url_host

if TYPE_CHECKING:
    import socket
    from collections.abc import Callable

__all__ = ["demo_settings", "run_demo", "serve_demo"]

CHECKOUT = Path(__file__).resolve().parent.parent


def demo_settings(directory: Path, host: str, port: int) -> Settings:
    """Fresh keys and signing seed, a database in ``directory``; otherwise the defaults."""
    return Settings(
        database_url=f"sqlite:///{directory / 'demo.db'}",
        api_host=host,
        api_port=port,
        client_api_keys=(f"client-{secrets.token_urlsafe(18)}",),
        miner_api_keys=(f"miner-{secrets.token_urlsafe(18)}",),
        admin_api_keys=(f"admin-{secrets.token_urlsafe(18)}",),
        receipt_signing_key_hex=secrets.token_hex(32),
        environment="demo",
        heartbeat_interval_seconds=5,
        heartbeat_timeout_seconds=15,
        resume_grace_seconds=5,
    )


def _load_module() -> Any:
    if not (CHECKOUT / "examples" / "demo_load.py").exists():
        raise SystemExit("aitbc-coordinator demo: run it from a source checkout (examples/)")
    if str(CHECKOUT) not in sys.path:
        sys.path.insert(0, str(CHECKOUT))
    return importlib.import_module("examples.demo_load")


async def serve_demo(
    settings: Settings,
    miners: int,
    rate: float,
    duration: float,
    out: Callable[[str], None],
    stop: anyio.Event | None = None,
    listener: socket.socket | None = None,
) -> None:
    """Serve with simulated peers until ``stop`` is set, ``duration`` passes, or a signal.
    ``listener``: a socket already bound to the settings' address (``listen_socket``)."""
    load = _load_module()
    server = build_server(settings, log_level="warning")
    async with anyio.create_task_group() as tg:

        async def serve() -> None:
            await server.serve(sockets=None if listener is None else [listener])
            tg.cancel_scope.cancel()

        tg.start_soon(serve)
        with anyio.fail_after(30):
            while not server.started:  # noqa: ASYNC110 - uvicorn exposes readiness as a flag
                await anyio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        base = f"http://{url_host(settings.api_host)}:{port}"
        admin = settings.admin_api_keys[0]
        out(f"AITBC coordinator demo on {base} ({miners} simulated miners, {rate:g} jobs/s)")
        out(f"Ops page:  {base}/ops#key={admin}")
        out(f"Admin key: {admin}")
        out(f"Client key: {settings.client_api_keys[0]}")
        out(f"Miner key:  {settings.miner_api_keys[0]}")
        out(f"Metrics:   curl -H 'X-Api-Key: {admin}' {base}/metrics")
        out("Ctrl-C stops the demo and deletes its database.")
        peers = anyio.CancelScope()

        async def run_peers() -> None:
            with peers:
                await load.run_load(
                    f"ws://{url_host(settings.api_host)}:{port}",
                    miner_key=settings.miner_api_keys[0],
                    client_key=settings.client_api_keys[0],
                    miners=miners,
                    rate=rate,
                )

        tg.start_soon(run_peers)
        if stop is not None:
            await stop.wait()
        elif duration > 0:
            await anyio.sleep(duration)
        else:
            return  # until a signal stops the server
        peers.cancel()
        server.should_exit = True


def run_demo(
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    miners: int = 12,
    rate: float = 4.0,
    duration: float = 0.0,
    out: Callable[[str], None] = print,
    listener: socket.socket | None = None,
) -> None:
    """Run the demo until the server stops (signal, or ``duration`` seconds when > 0)."""
    directory = Path(tempfile.mkdtemp(prefix="aitbc-demo-"))
    try:
        settings = demo_settings(directory, host, port)
        uvloop = importlib.util.find_spec("uvloop") is not None
        anyio.run(
            partial(serve_demo, listener=listener),
            settings,
            miners,
            rate,
            duration,
            out,
            backend_options={"use_uvloop": uvloop},
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
