"""``aitbc-coordinator serve`` run once as a child process, for tests of how a start fails."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path


def serve_once(
    db: Path, env: dict[str, str], *, max_file_bytes: int | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``serve --port 0 --db DB`` from this checkout with ``env``, until it exits.
    ``max_file_bytes``: a write that would grow a file past it fails (EFBIG, an I/O error as
    on a full disk) instead of killing the process (SIGXFSZ)."""

    def limit_files() -> None:
        if max_file_bytes is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, resource.RLIM_INFINITY))

    return subprocess.run(
        [sys.executable, "-m", "web.cli", "serve", "--port", "0", "--db", str(db)],
        env={**env, "PYTHONPATH": os.getcwd()},
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit_files,
        check=False,
    )
