"""``aitbc-coordinator serve``: run the coordinator with uvicorn (uvloop, httptools, sansio ws).

``aitbc-coordinator receipts verify|audit`` lives in ``web.cli_receipts``.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path


def _stopped_early(signum: int, frame: object) -> None:
    raise SystemExit(0)


# The command (``aitbc-coordinator``, ``python -m web.cli``) takes SIGINT and SIGTERM before it
# imports the app, which takes seconds on a cold start: a signal then was a KeyboardInterrupt
# traceback (SIGINT) or a kill (SIGTERM); now a clean exit 0, as later. Imported as a library
# (tests, the benchmarks), it leaves the signals alone.
if __name__ == "__main__" or Path(sys.argv[0]).name == "aitbc-coordinator":
    signal.signal(signal.SIGINT, _stopped_early)
    signal.signal(signal.SIGTERM, _stopped_early)

# ruff: noqa: E402 - the imports below come after the signals are taken
import argparse
import importlib.util
import logging
import math
import socket
import ssl
import time
from typing import TYPE_CHECKING, Any

import anyio
import uvicorn
from uvicorn.config import LOG_LEVELS

from storage.backends import check_store, shown_url, sqlite_url, store_for
from storage.errors import StorageError, StoreInUse, StoreUnreachable
from storage.sql import left_beside
from web.app import create_app
from web.asgi import SocketFastPath
from web.cli_backup import add_backup_command, run_backup
from web.cli_receipts import add_receipts_commands, database_file, run_receipts
from web.gctune import tune_gc
from web.keys import (
    KeyFileError,
    key_file,
    materialize_keys,
    signing_key_path,
    unkeyed_roles,
)
from web.openfiles import raise_open_files
from web.settings import Settings, SettingsError, check_rotation, url_host
from web.transport import CoalescingWSProtocol

if TYPE_CHECKING:
    from types import FrameType

    from storage.base import Store

__all__ = ["build_server", "listen_socket", "main", "uvicorn_config"]


SOCKET_CLOSE_GRACE = 2.0  # seconds a shutdown waits for the sockets' close handshakes
FLUSH_GRACE = 10.0  # seconds a shutdown waits for the writer before refusing its waiters


class CoordinatorServer(uvicorn.Server):
    """Closes our sockets with 1001 before uvicorn's own shutdown (which would send 1012)."""

    @property
    def core(self) -> Any:
        app: Any = self.config.app
        return app.state.core

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Stop accepting first: the waits below take up to 12 s, and a peer that reconnected
        # on its 1001 meanwhile was served, then closed with uvicorn's 1012.
        for server in self.servers:
            server.close()
        core = self.core
        core.stopping = True  # a socket accepted before, opening now, is closed with 1001
        core.close_sockets()
        core.dispatcher.end_polls()  # a REST long-poll would hold uvicorn's wait below
        # The connections write their 1001 from their own tasks: give those the time to (and
        # the peers to answer), since uvicorn's shutdown closes any socket still open with 1012.
        with anyio.move_on_after(SOCKET_CLOSE_GRACE):
            while core.connections:  # noqa: ASYNC110 - a connection leaves this set as it ends
                await anyio.sleep(0.01)
        if core.dispatcher.running:
            with anyio.move_on_after(FLUSH_GRACE):
                await core.dispatcher.wait_flushed()
            # A commit slower than that: a REST call still waiting for one is refused now
            # (503), not cancelled by uvicorn's graceful timeout below (a 500).
            core.dispatcher.end_waits()
        await super().shutdown(sockets)
        if self.force_exit:
            # A second SIGINT: uvicorn stopped waiting for requests and skips the app's
            # shutdown, which would leave the writer unflushed and the store open (the loop
            # then cancelled the lifespan: a traceback). The dispatcher still stops in order.
            await self.lifespan.shutdown()


class _Stopped(Exception):
    """Raised by our signal handlers once uvicorn re-raises the signal after its shutdown."""


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stopped(signum)


def build_server(
    settings: Settings, *, log_level: str = "info", store: Store | None = None
) -> CoordinatorServer:
    server = _build_server(settings, log_level, store)

    def stop() -> None:
        server.should_exit = True

    server.core.on_fatal = stop
    return server


def _build_server(settings: Settings, log_level: str, store: Store | None) -> CoordinatorServer:
    app = SocketFastPath(create_app(settings, store=store))
    return CoordinatorServer(uvicorn_config(app, settings, log_level=log_level))


def _http_protocol() -> Any:
    if importlib.util.find_spec("httptools") is None:
        return "h11"
    from web.lean_http import LeanHttpProtocol  # imports httptools

    return LeanHttpProtocol


def uvicorn_config(app: Any, settings: Settings, *, log_level: str = "info") -> uvicorn.Config:
    """How we run uvicorn (bench/ceiling.py serves its bare app with the same settings)."""
    return uvicorn.Config(
        app,
        host=settings.api_host,
        port=settings.api_port,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http=_http_protocol(),
        ws=CoalescingWSProtocol,
        ws_max_size=settings.max_frame_bytes,
        ws_ping_interval=settings.heartbeat_interval_seconds,
        ws_ping_timeout=settings.heartbeat_timeout_seconds,
        ws_per_message_deflate=False,
        lifespan="on",
        log_level=log_level,
        access_log=settings.access_log,
        ssl_certfile=settings.tls_cert_file,
        ssl_keyfile=settings.tls_key_file,
        timeout_graceful_shutdown=10,
    )


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound as uvicorn binds it, but before anything starts: a port in
    use is then one line and exit 1, not an app that starts up and shuts down again."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _listen_or_say(command: str, host: str, port: int) -> socket.socket | None:
    """``listen_socket``, or None after one line on stderr saying why it cannot bind."""
    try:
        return listen_socket(host, port)
    except OSError as exc:
        print(f"{command}: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        return None


def _overridden(args: argparse.Namespace) -> set[str]:
    """The variables ``serve``'s options given override (``_with_arguments``)."""
    given = {"API_HOST": args.host, "API_PORT": args.port, "DATABASE_URL": args.db}
    return {name for name, value in given.items() if value or value == 0}


def _with_arguments(settings: Settings, args: argparse.Namespace) -> Settings:
    """``serve``'s options over the environment's settings."""
    changes: dict[str, object] = {}
    if args.host:
        changes["api_host"] = args.host
    if args.port is not None:
        changes["api_port"] = args.port
    if args.db:
        changes["database_url"] = sqlite_url(args.db)
    if args.standby:
        changes["standby"] = True
    return settings.with_(**changes)


def _claimed_store_or_say(settings: Settings) -> Store | None:
    """The store to serve, its owner lock taken where the backend can take it before opening;
    None after one line on stderr. Refuses a second coordinator on the same database (a
    standby waits for it instead), or a file that is not one we can run on, before anything
    is written beside it."""
    try:
        store = store_for(settings.database_url, synchronous=settings.sqlite_synchronous)
        try:
            _check_store_waiting(settings)
            store.claim()
        except StoreInUse:
            if not settings.standby:
                raise
    except StorageError as exc:
        print(f"aitbc-coordinator: {exc}", file=sys.stderr)
        return None
    return store


def _left_without_database(settings: Settings) -> list[Path]:
    """When the SQLite database does not exist, the files a start on it left beside it (its
    owner lock, SQLite's shared-memory index, generated keys); else none, and none for a
    standby (its database is the one another coordinator holds). Read before the claim and
    the keys create files there. (A WAL left without its database stops the start instead:
    ``storage.sql.refuse_orphaned_wal``.)"""
    if settings.is_postgres or settings.standby:
        return []
    db = settings.database_path
    if db.exists():
        return []
    keys = (key_file(settings, ".keys.json"), signing_key_path(settings))
    return [*left_beside(db), *(path for path in keys if path.exists())]


def _say_database_missing(settings: Settings, left: list[Path]) -> None:
    """One line on stderr: the database was deleted or moved (or a first start stopped before
    creating it). The start goes on, on a new, empty database; an operator who sees the line
    may still stop it and put the file back. Nothing when ``left`` is empty."""
    if not left:
        return
    print(
        f"aitbc-coordinator: warning: the database {settings.database_path} does not exist, but "
        f"{', '.join(str(path) for path in left)} from an earlier start on it "
        f"{'is' if len(left) == 1 else 'are'} beside it: starting on a new, empty database, "
        "without the jobs, receipts and balances of any earlier one (the receipt chain starts "
        "again at chain_seq 1); if it was deleted or moved by mistake, stop the coordinator "
        "and put it back (docs/ops.md)",
        file=sys.stderr,
        flush=True,
    )


DATABASE_RETRY_SECONDS = 0.5  # between tries of a database server that cannot be reached yet


def _check_store_waiting(settings: Settings) -> None:
    """``check_store``; a PostgreSQL server that cannot be connected to for now (down, starting
    up, restarting) is tried again for up to ``DATABASE_WAIT_SECONDS``, with one line saying
    so. A coordinator stops when its server restarts, and its supervisor starts it again at
    once: each start that failed at once counted against the supervisor's limits (systemd gives
    up after five in 10 s, Kubernetes backs off up to five minutes), so a restart of a few
    seconds kept the coordinator down long after the server was back."""
    deadline = time.monotonic() + settings.database_wait_seconds
    said = False
    while True:
        try:
            check_store(settings.database_url)
            return
        except StoreUnreachable as exc:
            if exc.lasting or time.monotonic() + DATABASE_RETRY_SECONDS > deadline:
                raise
            if not said:
                said = True
                wait = f"{settings.database_wait_seconds:g}"
                print(f"aitbc-coordinator: {exc}; trying again for {wait} s", file=sys.stderr)
        time.sleep(DATABASE_RETRY_SECONDS)


def configure_logging(level: str) -> None:
    """Log to stderr at ``level`` (a uvicorn level name). The databases library logs one
    "Connected to database" line per connection at info, four identical lines at every start:
    those only from debug on."""
    logging.basicConfig(level=LOG_LEVELS[level], format="%(levelname)s %(name)s %(message)s")
    chosen = LOG_LEVELS[level]
    logging.getLogger("databases").setLevel(
        chosen if chosen <= logging.DEBUG else max(chosen, logging.WARNING)
    )


def _port(text: str) -> int:
    """An ``argparse`` type: a TCP port, 0 (any free port) to 65535, in ASCII digits (``int()``
    also took "+80", "8_000" and other scripts' digits, as API_PORT once did)."""
    digits = text.strip()
    if not (digits.isascii() and digits.removeprefix("-").isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number")
    port = int(digits)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not between 0 and 65535")
    return port


def _tls_or_say(settings: Settings) -> bool:
    """Whether TLS_CERT_FILE and TLS_KEY_FILE (if set) load: else one line saying why (uvicorn
    would read them only once the app had started, and die with a traceback)."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return True
    try:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file, password="")
    except ssl.SSLError as exc:  # before OSError, its base: a file that is no key or cert
        why = exc.reason or str(exc)
    except OSError as exc:
        why = exc.strerror or str(exc)
    else:
        return True
    print(
        f"aitbc-coordinator: invalid setting: TLS_CERT_FILE/TLS_KEY_FILE: {why} "
        f"({settings.tls_cert_file}, {settings.tls_key_file})",
        file=sys.stderr,
    )
    return False


def _warn(settings: Settings) -> None:
    """Start-up warnings: roles without a key, a low open-file limit (raised first)."""
    _, low = raise_open_files()
    for warning in [*unkeyed_roles(settings), *([low] if low is not None else [])]:
        print(f"aitbc-coordinator: warning: {warning}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aitbc-coordinator")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the coordinator")
    serve.add_argument("--host", help="listen address (API_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=_port, help="listen port (API_PORT, default 8000)")
    serve.add_argument(
        "--db", type=database_file, help="SQLite database file (overrides DATABASE_URL)"
    )
    serve.add_argument(
        "--standby",
        action="store_true",
        help="wait for the coordinator holding the database to stop, then take over (STANDBY)",
    )
    serve.add_argument(
        "--log-level", default="info", type=str.lower, choices=LOG_LEVELS, help="default info"
    )
    demo = sub.add_parser("demo", help="a demo: temporary database, simulated miners and load")
    demo.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    demo.add_argument("--port", type=_port, default=8000, help="default 8000; 0 picks a free port")
    demo.add_argument("--miners", type=int, default=12, help="simulated miners (default 12)")
    demo.add_argument(
        "--rate", type=float, default=4.0, help="jobs submitted per second (default 4)"
    )
    demo.add_argument("--duration", type=float, default=0.0, help="seconds (0: until Ctrl-C)")
    add_receipts_commands(sub)
    add_backup_command(sub)
    args = parser.parse_args(argv)
    other = {"demo": _demo, "receipts": run_receipts, "backup": run_backup}.get(args.command)
    if other is not None:
        return other(args)

    try:
        settings = Settings.from_env(without=_overridden(args))
    except SettingsError as exc:
        print(f"aitbc-coordinator: invalid setting: {exc}", file=sys.stderr)
        return 2
    settings = _with_arguments(settings, args)
    if not settings.standby:  # a standby signs only once it takes over, maybe after UNTIL
        try:
            check_rotation(settings, time.time())
        except SettingsError as exc:
            print(f"aitbc-coordinator: invalid setting: {exc}", file=sys.stderr)
            return 2
    if not _tls_or_say(settings):
        return 2
    left = _left_without_database(settings)  # before the claim and the keys create files
    store = _claimed_store_or_say(settings)
    if store is None:
        return 1
    listener = _listen_or_say("aitbc-coordinator", settings.api_host, settings.api_port)
    if listener is None:
        return 1
    try:
        settings, lines = materialize_keys(settings)
    except KeyFileError as exc:
        listener.close()
        print(f"aitbc-coordinator: {exc}", file=sys.stderr)
        return 2
    _say_database_missing(settings, left)  # once nothing refused the start
    for line in lines:
        print(line, flush=True)
    _warn(settings)
    configure_logging(args.log_level)
    print(
        f"AITBC coordinator on {'https' if settings.tls_cert_file else 'http'}://"
        f"{url_host(settings.api_host)}:{listener.getsockname()[1]} "
        f"(database {shown_url(settings.database_url)})"
        + (" as a standby: it takes over when the database is free" if settings.standby else ""),
        flush=True,
    )
    # uvicorn handles SIGINT/SIGTERM (graceful shutdown), then re-raises the signal with the
    # handlers it found installed: ours turn that into a clean exit 0.
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    server = None
    try:
        # A signal while the app is built (before uvicorn takes the signals): a clean stop.
        server = build_server(settings, log_level=args.log_level, store=store)
        tune_gc()
        server.run(sockets=[listener])
    except (_Stopped, KeyboardInterrupt):
        pass
    finally:
        listener.close()  # also when uvicorn exits on a failed start-up (SystemExit)
    if server is not None and server.core.failed:
        # A standby that failed to take over is still one (the flag goes when it has).
        what = "its take-over failed" if server.core.standby else "a dispatcher failure"
        print(f"aitbc-coordinator: stopped after {what} (see the log)", file=sys.stderr)
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    from web.demo import run_demo  # imports the examples' simulated peers

    if args.miners < 0 or not 0 < args.rate < math.inf:
        print("aitbc-coordinator demo: --miners must be >= 0 and --rate > 0", file=sys.stderr)
        return 2
    if not args.duration >= 0:  # nan too: it ran until Ctrl-C, as 0 does
        print(
            "aitbc-coordinator demo: --duration must be >= 0 seconds (0: until Ctrl-C)",
            file=sys.stderr,
        )
        return 2
    listener = _listen_or_say("aitbc-coordinator demo", args.host, args.port)
    if listener is None:
        return 1
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    # The signal reaches the server's task inside the demo's task group, which wraps it.
    try:
        run_demo(
            host=args.host,
            port=args.port,
            miners=args.miners,
            rate=args.rate,
            duration=args.duration,
            listener=listener,
        )
    except* (_Stopped, KeyboardInterrupt):
        pass
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
