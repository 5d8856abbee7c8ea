"""Is the ops page responsive with 1,000 miners and ~500 job events/s? Measured in Chromium.

The coordinator runs in process on a temporary database. 1,000 miners are attached to the
dispatcher directly (``miner_hello`` with an in-memory sink instead of a socket, so the load
generator costs little); a driver submits jobs and walks each one through accept, two progress
events and a result: six committed events per job, every one of them on the ops stream. The page
is opened in the machine's Chromium (Playwright); for ``--seconds`` it counts animation frames, long
tasks (> 50 ms) and the renderer's main-thread time (script, style, layout). The machine's load
average is reported too: the page shares the CPU with the coordinator and the driver.

    python -m bench.ops_page [--miners 1000] [--events 500] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import anyio
from playwright.async_api import async_playwright, expect

from dispatcher.core import JobSpec
from web.cli import build_server
from web.demo import demo_settings

ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
EVENTS_PER_JOB = 6  # queued, assigned, started, progress x2, completed

PROBE = """
window.__probe = {frames: 0, long: 0, longMs: 0};
const tick = () => { window.__probe.frames++; requestAnimationFrame(tick); };
requestAnimationFrame(tick);
new PerformanceObserver((list) => {
  for (const e of list.getEntries()) { window.__probe.long++; window.__probe.longMs += e.duration; }
}).observe({type: "longtask", buffered: false});
"""


MAIN_THREAD = ("TaskDuration", "ScriptDuration", "LayoutDuration", "RecalcStyleDuration")


async def main_thread(cdp: Any) -> dict[str, float]:
    """Seconds the renderer's main thread spent so far, by kind (Chrome's Performance domain)."""
    metrics = (await cdp.send("Performance.getMetrics"))["metrics"]
    return {m["name"]: m["value"] for m in metrics if m["name"] in MAIN_THREAD}


class Sink:
    """A miner "socket" that queues the job ids pushed to it."""

    def __init__(self, miner_id: str, assigned: deque[tuple[str, str]]) -> None:
        self.miner_id = miner_id
        self.assigned = assigned

    def send_frame(self, frame: str) -> None:
        msg = json.loads(frame)
        if msg["type"] == "job.assign":
            self.assigned.append((self.miner_id, msg["job_id"]))

    def flush(self) -> None:
        pass

    def close(self, code: Any, reason: str) -> None:
        pass


async def drive(core: Any, miners: int, jobs_per_s: float, stop: anyio.Event) -> None:
    d = core.dispatcher
    assigned: deque[tuple[str, str]] = deque()
    for i in range(miners):
        mid = f"gpu-{i:04d}"
        d.miner_hello(
            miner_id=mid, key_hash="k" * 64, session_id=f"s-{mid}", sink=Sink(mid, assigned),
            capabilities={"gpus": [{"name": ("A100", "H100", "L4")[i % 3], "memory_mb": 81920}],
                          "models": ["llama3"]},
            concurrency=2, region=("eu-west", "us-east", "ap-south")[i % 3],
            resume_session=None, then=lambda info: None,
        )  # fmt: skip
    period = 1.0 / jobs_per_s
    next_at = time.monotonic()
    while not stop.is_set():
        spec = JobSpec(
            job_id=uuid.uuid4().hex, client_id="bench", payload={"prompt": "x"}, constraints={}
        )
        await d.submit(spec, lambda rec, existed: None)
        while assigned:
            mid, job_id = assigned.popleft()
            d.miner_call("accept", mid, job_id)
            for p in (0.5, 1.0):
                d.miner_call("progress", mid, job_id, progress=p)
            d.miner_result(mid, job_id, {"output": "y"}, {}, None, lambda rec: None)
        next_at += period
        await anyio.sleep(max(0.0, next_at - time.monotonic()))


async def main_async(miners: int, events: float, seconds: float) -> dict[str, Any]:
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("needs chromium (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        settings = demo_settings(Path(tmp), "127.0.0.1", 0)
        server = build_server(settings, log_level="warning")
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve)
            while not server.started:  # noqa: ASYNC110 - uvicorn exposes readiness as a flag
                await anyio.sleep(0.02)
            port = server.servers[0].sockets[0].getsockname()[1]
            core = server.core
            tg.start_soon(drive, core, miners, events / EVENTS_PER_JOB, stop)
            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=chromium, args=ARGS)
                page = await browser.new_page(viewport={"width": 1440, "height": 1100})
                key = settings.admin_api_keys[0]
                await page.goto(f"http://127.0.0.1:{port}/ops#key={key}")
                await expect(page.locator("#conn-status")).to_have_text("live", timeout=20_000)
                await expect(page.locator("#miner-count")).to_have_text(
                    f"{miners} of {miners}", timeout=20_000
                )
                cdp = await page.context.new_cdp_session(page)
                await cdp.send("Performance.enable")
                before = await main_thread(cdp)
                await page.evaluate(PROBE)
                start_events = sum(core.dispatcher.tally.events.values())
                await anyio.sleep(seconds)
                probe = await page.evaluate("window.__probe")
                after = await main_thread(cdp)
                done_events = sum(core.dispatcher.tally.events.values()) - start_events
                shown = await page.evaluate("document.querySelectorAll('#log li').length")
                await browser.close()
            stop.set()
            server.should_exit = True
    return {
        "miners": miners,
        "events_per_s": round(done_events / seconds, 1),
        "fps": round(probe["frames"] / seconds, 1),
        "long_tasks": probe["long"],
        "long_task_ms": round(probe["longMs"], 1),
        "log_rows_shown": shown,
        "main_thread_s": {k: round(after[k] - before[k], 2) for k in MAIN_THREAD},
        "load_average": round(os.getloadavg()[0], 2),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--miners", type=int, default=1000)
    p.add_argument("--events", type=float, default=500.0, help="target job events per second")
    p.add_argument("--seconds", type=float, default=10.0)
    a = p.parse_args()
    print(json.dumps(anyio.run(main_async, a.miners, a.events, a.seconds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
