"""``ACCESS_LOG=off`` leaves out uvicorn's line per HTTP request (and only that)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx

from tests.serve_once import KEYS, serving

if TYPE_CHECKING:
    from pathlib import Path


def serve_and_ask(db: Path, access_log: str) -> str:
    """Start ``serve`` at the default log level, ask ``/health`` once, stop it: its output."""
    with serving(db, {**KEYS, "ACCESS_LOG": access_log}) as run:
        health = httpx.get(f"http://127.0.0.1:{run.port}/health", trust_env=False)
        assert health.status_code == 200
    return run.output


def test_access_log_off_leaves_out_the_request_lines_only(tmp_path: Path) -> None:
    request = '"GET /health HTTP/1.1" 200'
    assert request in serve_and_ask(tmp_path / "on.db", "on")
    quiet = serve_and_ask(tmp_path / "off.db", "off")
    assert request not in quiet
    assert "Shutting down" in quiet  # uvicorn's other info lines are still there
