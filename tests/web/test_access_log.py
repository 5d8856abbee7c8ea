"""``ACCESS_LOG=off`` leaves out uvicorn's line per HTTP request (and only that)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import TYPE_CHECKING

import httpx

from tests.conftest import ADMIN_KEY, CLIENT_KEY, MINER_KEY
from tests.e2e.processes import free_port

if TYPE_CHECKING:
    from pathlib import Path


def serve_and_ask(db: Path, access_log: str) -> str:
    """Start ``serve`` at the default log level, ask ``/health`` once, stop it: its output."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.getcwd(),
        "CLIENT_API_KEYS": CLIENT_KEY,
        "MINER_API_KEYS": MINER_KEY,
        "ADMIN_API_KEYS": ADMIN_KEY,
        "ACCESS_LOG": access_log,
    }
    cmd = [sys.executable, "-m", "web.cli", "serve", "--port", str(port), "--db", str(db)]
    with subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            for line in proc.stdout:  # pytest-timeout bounds a start that never comes
                if "Application startup complete" in line:
                    break
            assert httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False).status_code == 200
        finally:
            proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    return out


def test_access_log_off_leaves_out_the_request_lines_only(tmp_path: Path) -> None:
    request = '"GET /health HTTP/1.1" 200'
    assert request in serve_and_ask(tmp_path / "on.db", "on")
    quiet = serve_and_ask(tmp_path / "off.db", "off")
    assert request not in quiet
    assert "Shutting down" in quiet  # uvicorn's other info lines are still there
