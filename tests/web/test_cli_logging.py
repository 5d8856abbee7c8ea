"""`aitbc-coordinator serve --log-level`: what the start logs."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import pytest

from web.cli import configure_logging

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture
def databases_logger() -> Iterator[logging.Logger]:
    logger = logging.getLogger("databases")
    level = logger.level
    yield logger
    logger.setLevel(level)


@pytest.mark.parametrize(
    ("level", "shown"),
    [("info", False), ("warning", False), ("debug", True), ("trace", True)],
)
def test_connection_lines_show_only_from_debug_on(
    databases_logger: logging.Logger, level: str, shown: bool
) -> None:
    configure_logging(level)
    assert databases_logger.isEnabledFor(logging.INFO) is shown
    assert databases_logger.isEnabledFor(logging.WARNING)


def test_error_level_keeps_the_libraries_quiet_too(databases_logger: logging.Logger) -> None:
    configure_logging("error")
    assert not databases_logger.isEnabledFor(logging.WARNING)
    assert databases_logger.isEnabledFor(logging.ERROR)
