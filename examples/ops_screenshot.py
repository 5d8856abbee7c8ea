"""Take the README's screenshot of the ops page: the demo for a while, then Chromium.

    python examples/ops_screenshot.py [--seconds 45] [--out docs/ops-page.png]

Uses the machine's ``chromium`` through Playwright (no browser download).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import anyio
from playwright.async_api import async_playwright, expect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from web.demo import demo_settings, serve_demo

ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


async def shoot(seconds: float, out: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("needs chromium (apt-get install chromium)")
    lines: list[str] = []
    printed = anyio.Event()
    stop = anyio.Event()

    def show(line: str) -> None:
        lines.append(line)
        printed.set()

    with tempfile.TemporaryDirectory() as tmp:
        settings = demo_settings(Path(tmp), "127.0.0.1", 0)
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve_demo, settings, 16, 6.0, 0.0, show, stop)
            await printed.wait()  # the demo prints all its lines at once
            url = next(line.split()[-1] for line in lines if "#key=" in line)
            await anyio.sleep(seconds)  # let the charts fill
            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=chromium, args=ARGS)
                page = await browser.new_page(viewport={"width": 1440, "height": 1100})
                await page.goto(url)
                await expect(page.locator("#conn-status")).to_have_text("live")
                await anyio.sleep(3)  # a few deltas and log lines
                await page.screenshot(path=str(out), type="png")
                await browser.close()
            stop.set()
    print(f"wrote {out}")


def main() -> int:
    p = argparse.ArgumentParser(description="screenshot of the ops page under the demo load")
    p.add_argument("--seconds", type=float, default=45.0)
    p.add_argument("--out", type=Path, default=Path("docs/ops-page.png"))
    a = p.parse_args()
    anyio.run(shoot, a.seconds, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
