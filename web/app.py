"""Composition root: ``create_app(settings)`` wires store, scheduler, dispatcher and routes."""

from __future__ import annotations

import logging
import platform
from typing import TYPE_CHECKING, Any

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute

from dispatcher.clock import Clock, SystemClock
from dispatcher.core import Scheduler, SchedulerConfig
from dispatcher.exchange import AMOUNT_HOLD_SECONDS
from dispatcher.ledger import Ledger
from dispatcher.receipts import ReceiptSigner
from dispatcher.runtime import Dispatcher
from protocol.receipts import load_signing_key
from protocol.records import JobRecord, job_view
from protocol.types import CloseCode, JSONObject
from storage.backends import store_for
from web import (
    metrics,
    rest_admin,
    rest_exchange,
    rest_jobs,
    rest_ledger,
    rest_miners,
    rest_ops,
    rest_receipts,
    rest_users,
)
from web.auth import Authenticator, Role
from web.docs import docs_routes
from web.esplora import EsploraWatcher
from web.exchange import Exchange
from web.http import RateLimiter, http_exception, internal_error, routes_for, unknown_socket
from web.lifecycle import lifespan_for
from web.openapi import openapi_document, openapi_endpoint
from web.ops_feed import OpsFeed
from web.ops_page import ops_routes
from web.routing import CoordinatorApp
from web.settings import SettingsError
from web.wallet_auth import WalletAuth
from web.ws_client import client_endpoint
from web.ws_miner import miner_endpoint
from web.ws_ops import ops_endpoint

if TYPE_CHECKING:
    from collections.abc import Callable

    from starlette.applications import Starlette
    from starlette.requests import Request

    from protocol.receipt_verify import TrustedKey
    from storage.base import Store
    from web.settings import Settings

__all__ = ["Coordinator", "create_app"]

log = logging.getLogger("aitbc.coordinator")

VERSION = "0.1.0"
# A commit under way for longer than this turns /health/ready 503 until it ends (docs/ops.md).
COMMIT_STALL_SECONDS = 10.0


class Coordinator:
    """Everything a request handler needs, built once per app."""

    def __init__(self, settings: Settings, store: Store, clock: Clock) -> None:
        if settings.receipt_signing_key_hex is None:
            raise ValueError("RECEIPT_SIGNING_KEY_HEX must be resolved before create_app")
        self.settings = settings
        self.store = store
        self.auth = Authenticator(settings)
        self.signer = ReceiptSigner(load_signing_key(settings.receipt_signing_key_hex))
        self.signing_keys = rest_receipts.signing_keys(settings)
        self.signing_keys_document = rest_receipts.signing_keys_document(settings)
        config = SchedulerConfig(
            default_ttl=settings.job_ttl_seconds,
            max_attempts=settings.max_attempts,
            accept_timeout=settings.accept_timeout_seconds,
            resume_grace=settings.resume_grace_seconds,
            # How long a dead socket may go unnoticed: uvicorn pings every interval and closes
            # a peer silent for the timeout after that.
            revoke_window=settings.heartbeat_interval_seconds + settings.heartbeat_timeout_seconds,
            rest_lease=settings.rest_job_lease_seconds,
            terminal_retention_bytes=settings.terminal_retention_bytes,
            max_progress_bytes=settings.max_progress_bytes,
        )
        self.dispatcher = Dispatcher(store, Scheduler(config, self.signer), clock)
        self.dispatcher.rest_online_window = settings.heartbeat_timeout_seconds
        self.dispatcher.max_assign_bytes = settings.max_frame_bytes
        self.dispatcher.max_ids_per_key = settings.max_miner_ids_per_key
        self.dispatcher.max_active_jobs = settings.max_active_jobs_per_client
        self.dispatcher.max_active_bytes = settings.max_active_bytes_per_client
        if settings.job_retention_days > 0:
            self.dispatcher.retention = settings.job_retention_days * 86400
        self.clock = clock
        self.wallet = WalletAuth(
            self.dispatcher,
            clock,
            settings.session_ttl_hours * 3600,
            settings.admin_wallet_addresses,
        )
        self.auth.sessions = self.wallet.lookup
        self.exchange = Exchange(settings, self.dispatcher, store, clock)
        self.watcher = None
        if settings.esplora_url is not None:
            self.watcher = EsploraWatcher(
                self.exchange, settings.esplora_url, settings.esplora_poll_seconds, clock
            )
        self.rate_limiter = RateLimiter(settings.rate_limit_per_minute)
        self.connections: set[Any] = set()
        self.sockets = {role.value: 0 for role in Role}  # open connections by role
        self.ready = False
        self.failed = False
        self.commit_stall_seconds = COMMIT_STALL_SECONDS
        # Shutting down: a socket that opens from now on is closed with 1001 at once.
        self.stopping = False
        # Waiting for another coordinator to let go of the store (STANDBY): every request but
        # the health checks is refused until this one has taken over and rebuilt its memory.
        self.standby = settings.standby
        # Called when the dispatcher dies; the CLI's server uses it to exit (status 1).
        self.on_fatal: Callable[[], None] = lambda: None
        self.ops = OpsFeed(self)
        self.metrics = metrics.registry_for(self)

    async def restore(self) -> None:
        """Bring memory back from the opened store: the receipt chain head, the wallet, then the
        scheduler (in that order: restored jobs may hold reservations)."""
        head = await self.store.receipt_chain_head()
        _check_chain_key(head, self.signing_keys)
        self.signer.resume(head)
        await self.load_wallet()
        await self.dispatcher.restore()

    async def load_wallet(self) -> None:
        """Users, sessions, nonces and balances into memory (before the dispatcher restores)."""
        now = self.clock.now()
        snapshot = await self.store.load_wallet(now, settled_since=now - AMOUNT_HOLD_SECONDS)
        self.wallet.load(snapshot)
        self.exchange.load(snapshot)
        self.dispatcher.ledger = Ledger(snapshot.balances)
        self.dispatcher.settle_payments = self.settings.billing

    @property
    def serving(self) -> bool:
        """Ready to serve (``/health/ready`` 200): taken over, started, not failed, and no
        commit hanging (``commit_stalled``)."""
        return (
            self.ready
            and self.dispatcher.running
            and not self.failed
            and self.commit_stalled() is None
        )

    def commit_stalled(self) -> float | None:
        """How long the writer's commit under way has taken, once that is over
        ``commit_stall_seconds`` (else None). Nothing this coordinator does is answered while
        it hangs (every change waits for it), e.g. on a PostgreSQL lock another session holds
        (``LOCK TABLE``, ``VACUUM FULL``): readiness says so, so that a load balancer can turn
        to another node and an operator sees it."""
        running = self.dispatcher.commit_running_for()
        return running if running > self.commit_stall_seconds else None

    def fatal(self) -> None:
        """The dispatcher stopped on an error: refuse work, close sockets, stop the server."""
        self.failed = True
        self.ready = False
        self.close_sockets(CloseCode.INTERNAL_ERROR, "coordinator failure")
        self.on_fatal()

    def job_view(self, rec: JobRecord) -> JSONObject:
        """The JobView both APIs answer with, including whether any known miner can serve it."""
        return job_view(rec, servable=self.dispatcher.is_servable(rec.constraints))

    def close_sockets(
        self, code: CloseCode = CloseCode.GOING_AWAY, reason: str = "server shutting down"
    ) -> None:
        for conn in list(self.connections):
            conn.close(code, reason)


def _check_chain_key(head: JSONObject | None, keys: tuple[TrustedKey, ...]) -> None:
    """``SettingsError`` unless a published key vouches for the chain's newest receipt: a new
    signing key without the old one in RECEIPT_PREVIOUS_KEYS (or a database moved without its
    generated key file), or the old one listed with an UNTIL before its last receipt, made
    stored receipts fail verification."""
    if head is None:
        return
    signature = head.get("signature")
    key_id = signature.get("key_id") if isinstance(signature, dict) else None
    at = head.get("completed_at")
    if not isinstance(key_id, str):
        return
    mine = [k for k in keys if k.key_id == key_id]
    if any(k.covers(at) for k in mine):
        return
    why = (
        f"whose validity in RECEIPT_PREVIOUS_KEYS ends before {at}"
        if mine
        else "which is neither the current signing key nor a previous one"
    )
    raise SettingsError(
        f"RECEIPT_PREVIOUS_KEYS: the newest receipt in the database (chain_seq "
        f"{head.get('chain_seq')}) was signed by {key_id}, {why}: list it as {key_id}@/{at} "
        "(UNTIL: when it stopped signing), or set RECEIPT_SIGNING_KEY_HEX back to it; else "
        "every receipt it signed would fail verification"
    )


def create_app(
    settings: Settings, *, store: Store | None = None, clock: Clock | None = None
) -> Starlette:
    store = store or store_for(settings.database_url, synchronous=settings.sqlite_synchronous)
    core = Coordinator(settings, store, clock or SystemClock())
    lifespan = lifespan_for(core)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "status": "ok",
                "version": VERSION,
                "env": settings.environment,
                "python_version": platform.python_version(),
            }
        )

    async def live(request: Request) -> JSONResponse:
        return JSONResponse({"status": "alive"})

    async def ready(request: Request) -> JSONResponse:
        if core.standby and not core.failed:
            return JSONResponse({"status": "standby", "database": "in use"}, status_code=503)
        if core.serving:
            return JSONResponse({"status": "ready", "database": "connected"})
        stalled = None if core.failed else core.commit_stalled()
        if stalled is not None:
            return JSONResponse(
                {"status": "not ready", "database": "commit stalled", "commit_seconds": stalled},
                status_code=503,
            )
        return JSONResponse({"status": "not ready", "database": "unknown"}, status_code=503)

    endpoints = (
        rest_jobs.ENDPOINTS
        + rest_miners.ENDPOINTS
        + rest_admin.ENDPOINTS
        + rest_receipts.ENDPOINTS
        + rest_ops.ENDPOINTS
        + metrics.ENDPOINTS
        + rest_users.ENDPOINTS
        + rest_ledger.ENDPOINTS
        + rest_exchange.ENDPOINTS
    )
    app = CoordinatorApp(
        routes=[
            Route("/health", health),
            Route("/health/live", live),
            Route("/health/ready", ready),
            Route("/openapi.json", openapi_endpoint(openapi_document(endpoints, VERSION))),
            *docs_routes("AITBC Coordinator"),
            WebSocketRoute("/v1/miners/ws", miner_endpoint),
            WebSocketRoute("/v1/jobs/ws", client_endpoint),
            WebSocketRoute("/v1/admin/ws", ops_endpoint),
            *ops_routes(),
            *routes_for(endpoints),
            WebSocketRoute("/{path:path}", unknown_socket),  # last: any other socket path
        ],
        exception_handlers={HTTPException: http_exception, Exception: internal_error},
        lifespan=lifespan,
    )
    app.state.core = core
    return app
