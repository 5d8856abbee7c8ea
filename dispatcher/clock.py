"""Where the runtime gets time from. The pure core never calls this; the runtime does."""

from __future__ import annotations

import math
import time
from typing import Protocol

import anyio

__all__ = ["Clock", "SystemClock"]


class Clock(Protocol):
    def now(self) -> float:
        """Unix seconds."""

    async def wait_until(self, deadline: float | None, wake: anyio.Event) -> None:
        """Return at ``deadline`` (None: never) or as soon as ``wake`` is set."""


class SystemClock:
    def now(self) -> float:
        return time.time()

    async def wait_until(self, deadline: float | None, wake: anyio.Event) -> None:
        delay = math.inf if deadline is None else max(0.0, deadline - time.time())
        with anyio.move_on_after(delay):
            await wake.wait()
