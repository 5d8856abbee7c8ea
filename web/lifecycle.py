"""The app's lifespan: own the store, rebuild memory from it, serve, then stop in order.

A standby (``STANDBY=on``) yields at once and serves health checks while it waits for the
store's owner lock, then does the same start-up as any coordinator (docs/configuration.md,
"Standby").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio

from dispatcher.clock import SystemClock
from storage.backends import shown_url
from storage.errors import StorageError, StoreInUse, StoreUnreachable
from web.settings import SettingsError, check_rotation
from web.transport import TickFlusher

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from anyio.abc import TaskStatus

    from web.app import Coordinator

__all__ = ["STANDBY_POLL_SECONDS", "lifespan_for"]

log = logging.getLogger("aitbc.coordinator")

# How often a standby tries to take the store's owner lock.
STANDBY_POLL_SECONDS = 0.5


def lifespan_for(core: Coordinator) -> Callable[[Any], Any]:
    """The ``lifespan=`` of ``core``'s app."""

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        stopping = anyio.Event()
        if not core.standby:
            await _start(core)  # outside a task group: a StorageError stays one line
        async with anyio.create_task_group() as tg:
            if core.standby:
                # Serve at once (health, and 503 / close 1001 for the rest) while waiting.
                tg.start_soon(_take_over, core, stopping)
            else:
                await tg.start(_run, core, stopping)
            try:
                yield
            finally:
                if core.standby:
                    tg.cancel_scope.cancel()  # still waiting or restoring: nothing to flush
                stopping.set()

    return lifespan


async def _start(core: Coordinator) -> None:
    """Own the store and rebuild memory from it (the store is closed again if that fails)."""
    await _own_store(core)
    core.dispatcher.flush_writes = TickFlusher.of(asyncio.get_running_loop()).flush_all
    try:
        await core.restore()
    except BaseException:
        await _close(core)
        raise


async def _run(core: Coordinator, stopping: anyio.Event, *, task_status: TaskStatus[None]) -> None:
    """Serve from the started store until ``stopping`` is set; then stop in order and close."""
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(_run_dispatcher, core)
            tg.start_soon(core.ops.run)
            watching = anyio.CancelScope()
            if core.watcher is not None:
                tg.start_soon(_in_scope, watching, core.watcher.run)
            if isinstance(core.clock, SystemClock):
                tg.start_soon(_in_scope, watching, core.clock.watch)
            core.standby = False
            core.ready = True
            task_status.started()
            try:
                await stopping.wait()
            finally:
                watching.cancel()
                core.ready = False
                core.stopping = True
                core.close_sockets()
                core.dispatcher.end_polls()
                core.dispatcher.stop()
                core.ops.stop()
    finally:
        await _close(core)


async def _close(core: Coordinator) -> None:
    # A standby stopped while it restores gets here cancelled: close all the same (its
    # connections, their threads, the owner lock), as ``open`` does when it fails.
    with anyio.CancelScope(shield=True):
        await core.store.close()


async def _own_store(core: Coordinator) -> None:
    """Open the store; a standby waits while another coordinator holds it, and while the
    database server cannot be reached (a server restart ends the holder's lock too)."""
    if not core.standby:
        await core.store.open()
        return
    try:
        await _wait_and_open(core)
    except BaseException:
        # Stopped while waiting: let go of what a poll keeps (a PostgreSQL store's connection).
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await core.store.close()
        raise


async def _wait_and_open(core: Coordinator) -> None:
    where = shown_url(core.settings.database_url)
    waiting = unreachable = early = False
    while True:
        try:
            # Its key is published as valid from the newest previous key's UNTIL: taking over
            # before then (a database freed early) would sign receipts that fail verification.
            check_rotation(core.settings, core.clock.now())
        except SettingsError as exc:
            if not early:
                early = True
                log.warning("standby: taking over only once that UNTIL has come: %s", exc)
            await anyio.sleep(STANDBY_POLL_SECONDS)
            continue
        try:
            if await core.store.owner_free():
                await core.store.open()  # StoreInUse still, if another standby was first
                if waiting:
                    log.info("standby: took over %s", where)
                return
        except StoreInUse:
            pass
        except StoreUnreachable as exc:
            if not unreachable:
                unreachable = waiting = True
                log.warning("standby: %s; still waiting", exc)
            await anyio.sleep(STANDBY_POLL_SECONDS)
            continue
        if not waiting:
            waiting = True
            log.info("standby: %s is in use by another coordinator; waiting for it", where)
        unreachable = False
        await anyio.sleep(STANDBY_POLL_SECONDS)


async def _take_over(core: Coordinator, stopping: anyio.Event) -> None:
    """A standby's start-up: failing to take over stops the process like a dispatcher
    failure (the start-up it stands in for would have failed too)."""
    try:
        await _start(core)
        await _run(core, stopping, task_status=anyio.TASK_STATUS_IGNORED)
    except (StorageError, SettingsError) as exc:
        # The store's refusal (a schema from a newer build, an unreadable file, a lock file
        # it cannot make) is one line, as at any start-up.
        log.error("standby: taking over failed, shutting the coordinator down: %s", exc)
        core.fatal()
    except Exception:
        log.exception("standby: taking over failed; shutting the coordinator down")
        core.fatal()


async def _run_dispatcher(core: Coordinator, *, task_status: TaskStatus[None]) -> None:
    try:
        await core.dispatcher.serve(task_status=task_status)
    except Exception as exc:
        # Never keep serving without a dispatcher: say why, and take the process down. The
        # store failing (a PostgreSQL restart, a full disk) is the store's line(s), as at a
        # start-up: its traceback (an exception group of 60 lines on every server restart)
        # said nothing more and read as a crash; anything else is a bug, with its traceback.
        said = _store_failure(exc)
        if said is None:
            log.exception("dispatcher failed; shutting the coordinator down")
        else:
            log.error("dispatcher failed, shutting the coordinator down: %s", said)
        core.fatal()


def _store_failure(exc: BaseException) -> str | None:
    """What a ``StorageError`` (or a group of nothing else) says, each message once; None for
    any other exception."""
    if isinstance(exc, StorageError):
        return str(exc)
    if isinstance(exc, BaseExceptionGroup):
        said = [_store_failure(e) for e in exc.exceptions]
        if all(s is not None for s in said):
            return "; ".join(dict.fromkeys(s for s in said if s is not None))
    return None


async def _in_scope(scope: anyio.CancelScope, run: Callable[[], Awaitable[None]]) -> None:
    with scope:
        await run()
