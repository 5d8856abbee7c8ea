"""The runtime's clock: Unix seconds that a step of the wall clock does not move."""

from __future__ import annotations

import logging

import anyio
import anyio.lowlevel
import pytest

from dispatcher.clock import CLOCK_STEP_SECONDS, SystemClock


class Dial:
    """A clock the test sets."""

    def __init__(self, value: float) -> None:
        self.value = value

    def __call__(self) -> float:
        return self.value


def test_now_starts_at_the_wall_clock_and_moves_with_the_steady_one_only() -> None:
    wall, steady = Dial(1_800_000_000.0), Dial(50.0)
    clock = SystemClock(wall=wall, steady=steady)
    assert clock.now() == 1_800_000_000.0
    steady.value += 2.5
    wall.value += 2.5
    assert clock.now() == 1_800_000_002.5
    # An operator's ``date -s`` an hour ahead, or back: every deadline (``now`` plus a TTL, an
    # accept timeout, a lease) would have fired at once, or been held back an hour.
    wall.value += 3600
    assert clock.now() == 1_800_000_002.5
    wall.value -= 7200
    steady.value += 1
    assert clock.now() == 1_800_000_003.5


def test_the_default_clock_is_close_to_the_wall_clock() -> None:
    import time

    assert abs(SystemClock().now() - time.time()) < 1.0


def test_a_step_of_the_wall_clock_is_reported_once_per_step() -> None:
    wall, steady = Dial(1_800_000_000.0), Dial(0.0)
    clock = SystemClock(wall=wall, steady=steady)
    wall.value += CLOCK_STEP_SECONDS  # within the bound: slewing, not a step
    assert clock.step() is None
    wall.value += 120
    assert clock.step() == pytest.approx(121.0)
    assert clock.step() is None  # said already
    wall.value += 0.5
    assert clock.step() is None
    wall.value -= 121.5  # set back: reported again
    assert clock.step() == pytest.approx(0.0)


@pytest.mark.anyio
async def test_watch_logs_a_step(caplog: pytest.LogCaptureFixture) -> None:
    wall, steady = Dial(1_800_000_000.0), Dial(0.0)
    clock = SystemClock(wall=wall, steady=steady)
    wall.value -= 300
    with caplog.at_level(logging.WARNING, logger="aitbc.coordinator"):
        async with anyio.create_task_group() as tg:
            tg.start_soon(clock.watch, 0.0)
            with anyio.fail_after(5):
                while not caplog.records:
                    await anyio.lowlevel.checkpoint()
            tg.cancel_scope.cancel()
    [record] = caplog.records
    assert record.levelname == "WARNING"
    assert record.getMessage().startswith("the system clock is -300.0 s from the coordinator's")


@pytest.mark.anyio
async def test_wait_until_returns_at_a_due_deadline_or_when_woken() -> None:
    clock = SystemClock()
    with anyio.fail_after(5):
        await clock.wait_until(clock.now() - 1, anyio.Event())
        wake = anyio.Event()
        wake.set()
        await clock.wait_until(None, wake)
