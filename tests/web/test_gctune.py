"""Ring 2: the server's garbage-collector settings."""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING

import pytest

from web.gctune import GC_THRESHOLDS, tune_gc

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture
def restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restore_gc")
def test_tune_gc_freezes_start_up_objects_and_raises_thresholds() -> None:
    gc.unfreeze()
    tune_gc()
    assert gc.get_threshold() == GC_THRESHOLDS
    assert gc.get_freeze_count() > 0
    assert GC_THRESHOLDS[0] > 700  # CPython's default young threshold
