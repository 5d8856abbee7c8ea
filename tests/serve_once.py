"""``aitbc-coordinator serve`` as a child process: run once, for tests of how a start fails
(``serve_once``), or started and stopped around a block (``serving``)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tests.conftest import ADMIN_KEY, CLIENT_KEY, MINER_KEY
from tests.e2e.processes import free_port

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping
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


# This process's environment without API keys a developer's shell may set.
_OUTER = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEYS")}
# The test keys as ``serve`` reads them.
KEYS = {"CLIENT_API_KEYS": CLIENT_KEY, "MINER_API_KEYS": MINER_KEY, "ADMIN_API_KEYS": ADMIN_KEY}


@dataclass
class Serving:
    """A ``serve`` child process that started: its port and its output so far (all of it,
    once the ``serving`` block has ended)."""

    proc: subprocess.Popen[str]
    port: int
    lines: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        return "".join(self.lines)


@contextmanager
def serving(
    db: Path, env: Mapping[str, str], *, preexec_fn: Callable[[], None] | None = None
) -> Iterator[Serving]:
    """``serve --port PORT --db DB`` from this checkout with ``env`` (over this process's
    environment), once it has started up; stopped with SIGTERM when the block ends, which
    it must survive with exit 0."""
    port = free_port()
    cmd = [sys.executable, "-m", "web.cli", "serve", "--port", str(port), "--db", str(db)]
    with subprocess.Popen(
        cmd,
        env={**_OUTER, "PYTHONPATH": os.getcwd(), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=preexec_fn,
    ) as proc:
        run = Serving(proc, port)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:  # pytest-timeout bounds a start that never comes
                run.lines.append(line)
                if "Application startup complete" in line:
                    break
            yield run
        finally:
            proc.terminate()
            rest, _ = proc.communicate(timeout=30)
            run.lines.append(rest)
    assert proc.returncode == 0, run.output
