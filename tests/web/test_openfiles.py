"""``serve`` raises its open-file limit (each socket is a file) and warns when it stays low."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from typing import TYPE_CHECKING

from tests.serve_once import KEYS, serving
from web.openfiles import LOW_OPEN_FILES

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

RAISE = "from web.openfiles import raise_open_files as r; print(r())"


def limited(soft: int, hard: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return apply


def run_python(code: str, soft: int, hard: int) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": os.getcwd()},
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=limited(soft, hard),
        check=True,
    )
    return done.stdout.strip()


def test_the_soft_limit_is_raised_to_the_hard_one() -> None:
    assert run_python(RAISE, 256, 8192) == "(8192, None)"


def test_a_low_hard_limit_is_kept_and_warned_of() -> None:
    out = run_python(RAISE, 100, 200)
    assert out.startswith("(200, 'the open-file limit is 200 (its hard limit)")
    assert run_python(RAISE, LOW_OPEN_FILES, LOW_OPEN_FILES) == f"({LOW_OPEN_FILES}, None)"


def test_serve_runs_with_the_raised_limit_and_prints_the_warning(tmp_path: Path) -> None:
    """At the soft limit the event loop drops connections without an answer or a log line:
    ``serve`` runs with the hard limit, and says so at start when that is low."""
    for (soft, hard), warned in [((64, 300), True), ((64, LOW_OPEN_FILES), False)]:
        with serving(tmp_path / f"{hard}.db", KEYS, preexec_fn=limited(soft, hard)) as run:
            assert resource.prlimit(run.proc.pid, resource.RLIMIT_NOFILE) == (hard, hard)
        warning = "aitbc-coordinator: warning: the open-file limit is 300 (its hard limit)"
        assert any(line.startswith(warning) for line in run.lines) == warned, run.lines
