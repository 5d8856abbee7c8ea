"""``aitbc-coordinator demo``: the server, simulated miners of several kinds and a client load."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

import anyio
import httpx
import pytest

from web.demo import CHECKOUT, demo_settings, serve_demo

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


async def test_demo_prints_the_ops_url_and_work_flows(tmp_path: Path) -> None:
    """The printed /ops URL carries the admin key; miners of every kind connect, jobs complete."""
    lines: list[str] = []
    stop = anyio.Event()
    settings = demo_settings(tmp_path, "127.0.0.1", 0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(serve_demo, settings, 8, 20.0, 0.0, lines.append, stop)
        with anyio.fail_after(25):
            while not any("#key=" in line for line in lines):  # noqa: ASYNC110 - printed once up
                await anyio.sleep(0.02)
            url = next(
                re.search(r"http://\S+/ops#key=\S+", line) for line in lines if "#key=" in line
            )
            assert url is not None
            base, key = url.group(0).split("/ops#key=")
            assert key == settings.admin_api_keys[0]
            async with httpx.AsyncClient(base_url=base, headers={"X-Api-Key": key}) as http:
                while True:
                    snap = (await http.get("/v1/admin/ops")).json()
                    kinds = {m["miner_id"].split("-")[0] for m in snap["miners"]}
                    if kinds >= {"a100", "h100", "4090", "l4"} and snap["counters"]["events"].get(
                        "completed", 0
                    ):
                        break
                    await anyio.sleep(0.1)
                assert (await http.get("/ops")).status_code == 200
        stop.set()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
async def test_the_demo_stops_on_ctrl_c_with_exit_0(signum: signal.Signals) -> None:
    """``make demo`` runs until Ctrl-C (docs/ops.md): that stops it, exit 0, no traceback.
    The signal reached uvicorn's server task inside the demo's
    task group, which wrapped the handler's exception in an exception group: a traceback and
    exit 1."""
    proc = await anyio.open_process(
        [sys.executable, "-m", "web.cli", "demo", "--port", "0", "--miners", "1", "--rate", "1"],
        cwd=CHECKOUT,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    out = ""
    with anyio.fail_after(30):
        async for chunk in proc.stdout:
            out += chunk.decode()
            if "Ctrl-C stops the demo" in out:
                break
    assert re.search(r"http://\S+/ops#key=", out), out
    proc.send_signal(signum)
    with anyio.fail_after(30):
        code = await proc.wait()
        err = b"".join([chunk async for chunk in proc.stderr]).decode()
    assert "Traceback" not in err, err[-3000:]
    assert code == 0, err
