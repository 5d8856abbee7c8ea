"""Where the runtime gets time from. The pure core never calls this; the runtime does."""

from __future__ import annotations

import logging
import math
import time
from functools import partial
from typing import TYPE_CHECKING, Protocol

import anyio

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["CLOCK_STEP_SECONDS", "Clock", "SystemClock"]

log = logging.getLogger("aitbc.coordinator")

# How far the wall clock may move against ours before it is logged.
CLOCK_STEP_SECONDS = 1.0


class Clock(Protocol):
    def now(self) -> float:
        """Unix seconds."""

    async def wait_until(self, deadline: float | None, wake: anyio.Event) -> None:
        """Return at ``deadline`` (None: never) or as soon as ``wake`` is set."""


def _steady() -> Callable[[], float]:
    """Seconds that never jump: CLOCK_BOOTTIME where there is one (it counts a suspend, as the
    wall clock does), else the monotonic clock."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    if boottime is None:  # pragma: no cover - not Linux
        return time.monotonic
    return partial(time.clock_gettime, boottime)


class SystemClock:
    """Unix seconds that never jump: the wall clock read once, at start, moved on by a steady
    clock. Every deadline (a job's TTL, an accept timeout, a resume grace, a REST lease) is
    ``now`` plus a duration, so a step of the wall clock (an operator's ``date -s``, NTP
    stepping a VM's clock after a pause) would fire them all early at once, or hold them all
    back, by the step. The steady clock follows NTP's slewing as the wall clock does, so the
    two stay together unless the wall clock is stepped; after a step, ``now`` keeps its own
    count (and the times it stamps, in events and receipts, stay off by the step) until a
    restart reads the wall clock again. ``watch`` logs such a step."""

    def __init__(
        self, wall: Callable[[], float] = time.time, steady: Callable[[], float] | None = None
    ) -> None:
        self._wall = wall
        self._steady = steady if steady is not None else _steady()
        self._offset = wall() - self._steady()
        self._reported = 0.0  # the wall clock's step as last logged

    def now(self) -> float:
        return self._offset + self._steady()

    async def wait_until(self, deadline: float | None, wake: anyio.Event) -> None:
        delay = math.inf if deadline is None else max(0.0, deadline - self.now())
        with anyio.move_on_after(delay):
            await wake.wait()

    def step(self) -> float | None:
        """How far the wall clock is from ``now``, when that moved by over
        ``CLOCK_STEP_SECONDS`` since it was last reported (else None)."""
        step = self._wall() - self.now()
        if abs(step - self._reported) <= CLOCK_STEP_SECONDS:
            return None
        self._reported = step
        return step

    async def watch(self, interval: float = 10.0) -> None:
        """Log every step of the wall clock (checked each ``interval``), until cancelled."""
        while True:
            await anyio.sleep(interval)
            step = self.step()
            if step is not None:
                log.warning(
                    "the system clock is %+.1f s from the coordinator's: it was set or stepped "
                    "while the coordinator ran; deadlines keep to the steady clock, and the "
                    "times stamped on events and receipts stay off by that much until a restart",
                    step,
                )
