"""A report an instrumented server (a ``BENCH_SERVER_SCRIPT`` wrapper) writes when it exits.

The harness stops the server with SIGTERM, a clean exit, so ``atexit`` runs.
"""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["write_at_exit"]


def write_at_exit(report: Callable[[], str], env_var: str) -> None:
    """At exit, write ``report()`` to the file named by ``env_var``, else to stderr."""

    def write() -> None:
        out = os.environ.get(env_var)
        if out:
            Path(out).write_text(report())
        else:
            sys.stderr.write(report())

    atexit.register(write)
