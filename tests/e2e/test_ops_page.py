"""The /ops page in a real browser: Playwright driving the machine's Chromium (Debian package).

Locally these tests skip with a message when ``chromium`` is not installed; where browser tests
are mandatory (``CI=true``, or ``OPS_BROWSER_TESTS=required``, which ``.ci/run`` sets) they fail
instead. Playwright's own browser download is never used. Every wait is on a page condition.
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest
from playwright.async_api import Page, Request, async_playwright, expect
from prometheus_client.parser import text_string_to_metric_families

from protocol.messages import Ack, Heartbeat, JobCancel, JobSubmit
from tests.conftest import ADMIN_KEY, CLIENT_KEY, MINER_KEY
from tests.e2e.conftest import start_server
from tests.e2e.manual_miner import ManualMiner, client_session

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from tests.e2e.conftest import Client, RunningServer
    from web.settings import Settings

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WAIT_MS = 10_000
CLIENT = {"X-Api-Key": CLIENT_KEY}


def chromium_or_skip() -> str:
    path = shutil.which("chromium")
    if path is not None:
        return path
    if os.environ.get("CI") == "true" or os.environ.get("OPS_BROWSER_TESTS") == "required":
        pytest.fail("browser tests are required here but `chromium` is not installed")
    pytest.skip("ops page browser tests need Debian's chromium (apt-get install chromium)")


@asynccontextmanager
async def ops_page(server: RunningServer) -> AsyncIterator[Page]:
    """A fresh browser page on /ops; fails the test if the page throws a script error."""
    executable = chromium_or_skip()
    errors: list[str] = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(WAIT_MS)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"http://127.0.0.1:{server.port}/ops")
            yield page
        finally:
            await browser.close()
    assert errors == []


async def sign_in(page: Page, key: str = ADMIN_KEY) -> None:
    await page.fill("#admin-key", key)
    await page.click("#sign-in")


async def submit(client: Client, prompt: str) -> str:
    await client.send(JobSubmit(id=prompt, payload={"prompt": prompt}, constraints={}))
    while True:
        msg = await client.recv()
        if isinstance(msg, Ack) and msg.id == prompt:
            return str(msg.fields["job"]["job_id"])


def job_state(page: Page, job_id: str) -> Any:
    return page.locator(f'#jobs tr[data-job="{job_id}"] td.state')


async def test_sign_in_rejects_wrong_keys_then_goes_live(server: RunningServer) -> None:
    """Unknown key and a client key are refused; the admin key opens the live page."""
    async with ops_page(server) as page:
        await sign_in(page, "not-a-key-at-all")
        await expect(page.locator("#signin-error")).to_have_text("Unknown key.")
        await sign_in(page, CLIENT_KEY)
        await expect(page.locator("#signin-error")).to_have_text("That key is not an admin key.")
        assert await page.evaluate("sessionStorage.getItem('aitbc-admin-key')") is None
        await sign_in(page)
        await expect(page.locator("#conn-status")).to_have_text("live")
        await expect(page.locator("#app")).to_be_visible()
        assert await page.evaluate("sessionStorage.getItem('aitbc-admin-key')") == ADMIN_KEY
        assert await page.evaluate("localStorage.length") == 0
        await page.reload()  # the key survives a reload of the tab (sessionStorage)
        await expect(page.locator("#conn-status")).to_have_text("live")


async def test_miner_appears_and_disappears(server: RunningServer) -> None:
    """A miner row shows up when the miner connects, drains on a confirmed click, goes when it
    leaves; a dismissed confirmation changes nothing."""
    async with ops_page(server) as page:
        await sign_in(page)
        await expect(page.locator("#conn-status")).to_have_text("live")
        row = page.locator('#miners tr[data-miner="gpu-browser"]')
        await expect(row).to_have_count(0)
        async with ManualMiner(server, MINER_KEY, "gpu-browser") as miner:
            await miner.connect()
            await expect(row).to_have_count(1)
            await expect(row).to_contain_text("A100")
            await expect(row).to_contain_text("idle")
            await expect(row.locator("td.load")).to_have_text("—")
            await miner.send(Heartbeat(metrics={"gpu": {"util": 0.73}, "temp_c": 61, "note": "x"}))
            await expect(row.locator("td.load")).to_have_text("gpu.util 0.73 · temp_c 61")
            await expect(page.locator("#kpi-online")).to_have_text("1")
            await row.locator('button[data-action="drain"]').click()
            await expect(page.locator("#confirm-text")).to_contain_text("gpu-browser")
            await page.click("#confirm-yes")
            await expect(row).to_contain_text("draining")
            assert server.core.dispatcher.scheduler.miners["gpu-browser"].draining
            await row.locator('button[data-action="undrain"]').click()
            await page.click("#confirm-no")  # changed its mind: nothing happens
            await expect(page.locator("#confirm")).not_to_be_visible()
            assert server.core.dispatcher.scheduler.miners["gpu-browser"].draining
        await expect(row).to_have_count(0)
        await expect(page.locator("#kpi-online")).to_have_text("0")


async def test_job_moves_through_states_and_metrics_count_it(server: RunningServer) -> None:
    """QUEUED -> RUNNING -> COMPLETED on screen; the drill-down verifies the receipt."""
    async with ops_page(server) as page, client_session(server, CLIENT_KEY) as client:
        await sign_in(page)
        await expect(page.locator("#conn-status")).to_have_text("live")
        job_id = await submit(client, "hello ops")
        await expect(job_state(page, job_id)).to_have_text("QUEUED")
        await expect(page.locator("#queue-queued")).to_have_text("1")
        async with ManualMiner(server, MINER_KEY, "gpu-states") as miner:
            await miner.connect()
            await miner.recv()  # job.assign
            await expect(job_state(page, job_id)).to_have_text("RUNNING")
            await expect(page.locator('#miners tr[data-miner="gpu-states"]')).to_contain_text(
                "busy"
            )
            miner.client.accept(job_id)
            miner.client.result(job_id, {"output": "sopo olleh"}, {"duration_ms": 5})
            await miner.flush()
            await miner.recv()  # the ack with the receipt
            await expect(job_state(page, job_id)).to_have_text("COMPLETED")
            await page.locator(f'#jobs tr[data-job="{job_id}"]').click()
            await expect(page.locator("#d-receipt-badge")).to_have_text("✓ signature verified")
            await expect(page.locator("#d-timeline li")).to_have_count(4)
            await expect(page.locator("#d-result")).to_contain_text("sopo olleh")
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "ops-page.png"), type="png", full_page=True)
        async with httpx.AsyncClient() as http:
            r = await http.get(
                f"http://127.0.0.1:{server.port}/metrics", headers={"X-Api-Key": ADMIN_KEY}
            )
        values = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text)
            for s in family.samples
        }
        assert values["aitbc_jobs", (("state", "COMPLETED"),)] == 1
        assert values["aitbc_job_events_total", (("event", "completed"),)] == 1
        assert values["aitbc_job_submit_to_complete_seconds_count", ()] == 1
        assert values["aitbc_sockets_open", (("role", "admin"),)] == 1


async def test_cancel_from_the_page_reaches_the_miner(server: RunningServer) -> None:
    """Cancel in the drill-down (confirmed) sends job.cancel to the miner; the row follows."""
    async with ops_page(server) as page, client_session(server, CLIENT_KEY) as client:
        await sign_in(page)
        async with ManualMiner(server, MINER_KEY, "gpu-cancel") as miner:
            await miner.connect()
            job_id = await submit(client, "to be canceled")
            await miner.recv()  # job.assign
            await page.locator(f'#jobs tr[data-job="{job_id}"]').click()
            await expect(page.locator("#d-state")).to_have_text("RUNNING")
            await page.click("#d-cancel")
            await expect(page.locator("#confirm-text")).to_contain_text(job_id)
            await page.click("#confirm-yes")
            cancel = await miner.expect(JobCancel)
            assert (cancel.job_id, cancel.reason) == (job_id, "canceled by admin")
            await expect(job_state(page, job_id)).to_have_text("CANCELED")
            await expect(page.locator("#d-state")).to_have_text("CANCELED")
            await expect(page.locator("#d-cancel")).to_be_disabled()


async def test_page_reconnects_after_a_server_restart(settings: Settings) -> None:
    """The server stops and a new one starts on the same port and database: the page comes
    back by itself and shows the job queued before the restart."""
    async with anyio.create_task_group() as tg:
        first, uv = await start_server(settings, tg)
        port = first.port
        async with ops_page(first) as page:
            await sign_in(page)
            await expect(page.locator("#conn-status")).to_have_text("live")
            async with client_session(first, CLIENT_KEY) as client:
                await submit(client, "survives the restart")
            await expect(page.locator("#queue-queued")).to_have_text("1")
            uv.should_exit = True
            with anyio.fail_after(15):
                await first.stopped.wait()
            second, uv2 = await start_server(settings, tg, port=port)
            await expect(page.locator("body")).to_have_attribute("data-snapshots", "2")
            await expect(page.locator("#conn-status")).to_have_text("live")
            await expect(page.locator("#queue-queued")).to_have_text("1")
            assert second.core.ops.watchers
            uv2.should_exit = True


async def test_page_reconnects_after_the_server_drops_it(server: RunningServer) -> None:
    """Sockets closed by a shutdown (1001): the page says so, reconnects and is live again."""
    async with ops_page(server) as page:
        await sign_in(page)
        await expect(page.locator("#conn-status")).to_have_text("live")
        await expect(page.locator("body")).to_have_attribute("data-snapshots", "1")
        server.core.close_sockets()
        await expect(page.locator("body")).to_have_attribute("data-snapshots", "2")
        await expect(page.locator("#conn-status")).to_have_text("live")


async def test_the_times_shown_say_they_are_utc(server: RunningServer) -> None:
    """The page shows UTC times (the API's) with nothing saying so: an operator away from UTC
    read them as local times. Every heading over a time now names the zone."""
    async with ops_page(server) as page, client_session(server, CLIENT_KEY) as client:
        await sign_in(page)
        await expect(page.locator("#conn-status")).to_have_text("live")
        job_id = await submit(client, "what time is it")
        at = server.core.dispatcher.scheduler.jobs[job_id].requested_at
        row_at = page.locator(f'#jobs tr[data-job="{job_id}"] td:nth-child(6)')
        await expect(row_at).to_contain_text(time.strftime("%H:%M:%S.", time.gmtime(at)))
        await expect(page.locator("#jobs-table th").nth(5)).to_contain_text("UTC")
        await expect(page.locator('#miners-table th[data-sort="last_seen"]')).to_contain_text("UTC")
        await expect(page.locator("section:has(#log) h3")).to_contain_text("UTC")
        await page.locator(f'#jobs tr[data-job="{job_id}"]').click()
        await expect(page.locator("h4:has(+ #d-timeline)")).to_contain_text("UTC")


async def test_chart_axis_labels_name_their_gridlines_values(server: RunningServer) -> None:
    """A chart's four gridlines sit at quarters of a 1/2/2.5/5 scale: their labels were
    rounded to one decimal (or none from 10 on), so the throughput chart of a quiet
    coordinator read 0, 0.3, 0.5, 0.8, 1.0 for 0, 0.25, 0.5, 0.75, 1, and 37.5 ms read 38."""
    async with ops_page(server) as page:
        labels = await page.evaluate(
            "import('/ops/assets/charts.js').then((m) => [0, 0.25, 0.625, 1.875, 12.5, 37.5,"
            " 187.5, 1000, 1250, 18750, 250000].map(m.axisLabel))"
        )
        assert labels == [
            "0",
            "0.25",
            "0.625",
            "1.875",
            "12.5",
            "37.5",
            "187.5",
            "1k",
            "1.25k",
            "18.75k",
            "250k",
        ]


async def test_a_link_with_a_malformed_key_is_dropped_from_the_address(
    server: RunningServer,
) -> None:
    """/ops#key=… with a malformed escape (a link cut short when pasted) threw a script error:
    the key stayed in the address bar and the history, and nothing said why the page was not
    signed in. The key leaves the address in any case; the page says the link was bad."""
    async with ops_page(server) as page:
        await page.goto("about:blank")  # a new load, not a move within the page
        await page.goto(f"http://127.0.0.1:{server.port}/ops#key=adm%E0%A4%A")
        await expect(page.locator("#signin-error")).to_contain_text("link")
        assert await page.evaluate("location.hash") == ""
        assert await page.evaluate("sessionStorage.length") == 0
        await page.goto("about:blank")
        await page.goto(f"http://127.0.0.1:{server.port}/ops#key={ADMIN_KEY}")  # as the demo's
        await expect(page.locator("#conn-status")).to_have_text("live")
        assert await page.evaluate("location.hash") == ""


async def test_a_link_opened_in_a_tab_already_on_the_page_signs_in(
    server: RunningServer,
) -> None:
    """The demo's /ops#key=… pasted into a tab already on /ops (signed out, say by a restarted
    demo's new keys) changes only the fragment, with no load: the page ignored it, stayed
    signed out, and left the key in the address bar."""
    async with ops_page(server) as page:
        await expect(page.locator("#signin")).to_be_visible()
        await page.goto(f"http://127.0.0.1:{server.port}/ops#key={ADMIN_KEY}")
        await expect(page.locator("#conn-status")).to_have_text("live")
        assert await page.evaluate("location.hash") == ""
        assert await page.evaluate("sessionStorage.getItem('aitbc-admin-key')") == ADMIN_KEY


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
async def test_the_api_docs_ask_nothing_of_another_host(server: RunningServer, path: str) -> None:
    """/redoc fetched Redocly's logo from https://cdn.redoc.ly at each view (its bundle's footer),
    though the docs pages are served offline: no request leaves the coordinator now."""
    async with ops_page(server) as page:
        sent: list[str] = []  # every request the page made, but those its policy refused

        def failed(request: Request) -> None:
            if request.failure == "csp":
                sent.remove(request.url)

        page.on("request", lambda request: sent.append(request.url))
        page.on("requestfailed", failed)
        await page.goto(f"http://127.0.0.1:{server.port}{path}")
        await expect(page.get_by_text("AITBC Coordinator").first).to_be_visible()  # rendered
        await page.wait_for_load_state("networkidle")  # and what the rendering asked for
        here = (f"http://127.0.0.1:{server.port}/", f"blob:http://127.0.0.1:{server.port}/")
        assert [url for url in sent if not url.startswith((*here, "data:"))] == []


async def test_a_time_from_another_day_shows_its_date(server: RunningServer) -> None:
    """Times showed the time of day only: a polling miner gone quiet three days ago (it stays
    registered) read "last seen 03:04:05", as if that morning. A time of another day (UTC)
    shows its date; today's, the time alone."""
    async with ops_page(server) as page:
        await page.add_init_script(FAKE_OLD_MINER_SOCKET)
        await page.reload()
        await sign_in(page)
        await expect(page.locator("#conn-status")).to_have_text("live")
        row = page.locator('#miners tr[data-miner="m-old"] td:nth-child(7)')
        await expect(row).to_have_text("2020-01-02 03:04:05")
        today = page.locator(f'#jobs tr[data-job="{"c" * 32}"] td:nth-child(6)')
        await expect(today).to_have_text(await page.evaluate("window.nowShown"))


FAKE_OLD_MINER_SOCKET = """
window.WebSocket = class {
  constructor() { setTimeout(() => this.onopen(), 0); }
  close() {}
  send() {
    const now = new Date().toISOString();
    window.nowShown = now.slice(11, 23);
    const miner = { miner_id: "m-old", transport: "rest", region: null, gpus: [], vram_mb: 0,
      models: [], slots_used: 0, slots_total: 1, state: "offline",
      last_seen: "2020-01-02T03:04:05.678Z", completed: 0, failed: 0, success_rate: null,
      load: {} };
    this.onmessage({ data: JSON.stringify({ type: "snapshot", miners: [miner], queue: {},
      counters: {}, history: [] }) });
    this.onmessage({ data: JSON.stringify({ type: "job.event", job_id: "c".repeat(32), seq: 1,
      event: "queued", state: "QUEUED", at: now, attempt: 0, miner_id: null }) });
  }
};
"""


RECORD_STATUS = """
addEventListener("DOMContentLoaded", () => {
  window.statuses = [];
  const el = document.getElementById("conn-status");
  new MutationObserver(() => window.statuses.push(el.textContent))
    .observe(el, { childList: true, characterData: true, subtree: true });
});
"""


async def test_a_silent_connection_is_shown_stale_and_replaced(server: RunningServer) -> None:
    """The server sends a chart point every second: when nothing arrived for 5 s (a link gone
    dead without a close, a proxy holding the socket open) the page kept saying "live" over
    numbers that no longer moved, for good. It now says the data is stale and reconnects."""
    async with ops_page(server) as page:
        await page.add_init_script(RECORD_STATUS)
        await page.reload()
        await sign_in(page)
        await expect(page.locator("#conn-status")).to_have_text("live")
        await expect(page.locator("body")).to_have_attribute("data-snapshots", "1")
        feed = server.core.ops
        silenced = set(feed.watchers)
        feed.watchers.clear()  # the socket stays open, and nothing more reaches the page
        await expect(page.locator("body")).to_have_attribute(
            "data-snapshots", "2", timeout=2 * WAIT_MS
        )
        await expect(page.locator("#conn-status")).to_have_text("live")
        statuses = await page.evaluate("window.statuses")
        lost = statuses[statuses.index("live") + 1 : -1]
        assert lost
        assert all(text.startswith("stale: no data for 5 s; re") for text in lost), lost
        assert feed.watchers
        assert not feed.watchers & silenced
        await admin_sockets_become(server, 1)  # the silent one was closed


async def test_a_page_dropped_for_reading_too_slowly_says_why(server: RunningServer) -> None:
    """A page that falls too far behind is closed 4429 ("outbound queue overflow") and starts
    again from a new snapshot, its log emptied: the page said "disconnected (4429)", a number
    nobody could read, for a quarter of a second. It names the reason until it is live."""
    async with ops_page(server) as page:
        await page.add_init_script(RECORD_STATUS)
        await page.reload()
        await sign_in(page)
        await expect(page.locator("#conn-status")).to_have_text("live")
        [conn] = [c for c in server.core.connections if c.role.value == "admin"]
        conn.close(4429, "outbound queue overflow")
        await expect(page.locator("body")).to_have_attribute("data-snapshots", "2")
        await expect(page.locator("#conn-status")).to_have_text("live")
        statuses = await page.evaluate("window.statuses")
        lost = statuses[statuses.index("live") + 1 : -1]
        assert lost
        assert all("4429 outbound queue overflow" in text for text in lost), lost


async def test_requeue_sort_and_filters(server: RunningServer) -> None:
    """Requeue moves a job to another miner; the miner table sorts and filters; the log filters."""
    async with ops_page(server) as page, client_session(server, CLIENT_KEY) as client:
        await sign_in(page)
        async with (
            ManualMiner(server, MINER_KEY, "zz-first") as first,
            ManualMiner(server, MINER_KEY, "aa-second") as second,
        ):
            await first.connect()
            job_id = await submit(client, "move me")
            await first.recv()  # job.assign
            await second.connect()
            rows = page.locator("#miners tr")
            await expect(rows).to_have_count(2)
            await expect(rows.first).to_have_attribute("data-miner", "aa-second")
            await page.click('#miners-table th[data-sort="miner_id"]')  # descending now
            await expect(rows.first).to_have_attribute("data-miner", "zz-first")
            await page.fill("#miner-filter", "aa-")
            await expect(rows).to_have_count(1)
            await page.fill("#miner-filter", "")
            await page.locator(f'#jobs tr[data-job="{job_id}"]').click()
            await expect(page.locator("#d-requeue")).to_be_enabled()
            await page.click("#d-requeue")
            await page.click("#confirm-yes")
            cancel = await first.expect(JobCancel)
            assert cancel.reason == "requeued by admin"
            moved = await second.recv()
            assert getattr(moved, "job_id", None) == job_id
            await expect(page.locator("#d-timeline li")).to_have_count(
                4
            )  # queued, assigned, requeued, assigned
            await expect(page.locator("#d-miner")).to_have_text("aa-second")
            log = page.locator(f'#log li[data-job="{job_id}"]')
            await expect(log.and_(page.locator('[data-event="requeued"]'))).to_have_count(1)
            await page.locator('#log-filters input[value="requeued"]').uncheck()
            await expect(log.and_(page.locator('[data-event="requeued"]'))).to_have_count(0)
            await page.fill("#log-text", "no-such-job")
            await expect(log).to_have_count(0)


async def admin_sockets_become(server: RunningServer, n: int) -> None:
    """Wait (5 s at most) until the server has ``n`` ops sockets open."""
    with anyio.fail_after(5):
        while server.core.sockets["admin"] != n:  # noqa: ASYNC110 - a count, no event to wait on
            await anyio.sleep(0.01)


async def test_a_sign_in_sent_twice_opens_one_socket(server: RunningServer) -> None:
    """A sign-in submitted again before the first socket is live (a double click, Enter
    twice) replaces that socket: the first one stayed open, fed every frame into the page a
    second time (each event twice in the log) and outlived Sign out."""
    async with ops_page(server) as page:
        await page.fill("#admin-key", ADMIN_KEY)
        await page.evaluate(
            "() => { const f = document.getElementById('signin-form');"
            " f.requestSubmit(); f.requestSubmit(); }"
        )
        await expect(page.locator("#conn-status")).to_have_text("live")
        await admin_sockets_become(server, 1)  # the first one closes
        await page.click("#sign-out")
        await admin_sockets_become(server, 0)


async def test_the_drill_down_never_shows_the_previous_jobs_fields(
    server: RunningServer,
) -> None:
    """Opening another job (or an unknown id) clears the drill-down until its answer comes:
    the previous job's state, actions, payload, result and verified receipt stayed under the
    new job's id, for good when that id was unknown."""
    async with ops_page(server) as page, client_session(server, CLIENT_KEY) as client:
        await sign_in(page)
        async with ManualMiner(server, MINER_KEY, "gpu-detail") as miner:
            await miner.connect()
            job_id = await submit(client, "shown once")
            await miner.recv()  # job.assign
            await page.locator(f'#jobs tr[data-job="{job_id}"]').click()
            await expect(page.locator("#d-state")).to_have_text("RUNNING")
            await expect(page.locator("#d-payload")).to_contain_text("shown once")
            await expect(page.locator("#d-cancel")).to_be_enabled()
        await page.fill("#job-open", "f" * 32)
        await page.press("#job-open", "Enter")
        await expect(page.locator("#d-error")).to_contain_text("not found")
        await expect(page.locator("#d-job")).to_have_text("f" * 32)
        for field in ("#d-state", "#d-payload", "#d-result", "#d-receipt", "#d-timeline"):
            await expect(page.locator(field)).to_have_text("")
        await expect(page.locator("#d-cancel")).to_be_disabled()
        await expect(page.locator("#d-requeue")).to_be_disabled()


async def test_the_live_log_keeps_no_results(server: RunningServer) -> None:
    """The log keeps 2,000 events, and a completed event carries its result (up to a whole
    frame, 1 MiB by default): it kept the frames whole, so 2,000 large results held about
    2 GB in the tab. It now keeps what it shows of an event."""
    base = f"http://127.0.0.1:{server.port}"
    miner = {"X-Api-Key": MINER_KEY, "X-Miner-ID": "m-big"}
    result = {"output": "x" * 900_000}
    async with ops_page(server) as page, httpx.AsyncClient(base_url=base, timeout=10) as http:
        await sign_in(page)
        await expect(page.locator("#conn-status")).to_have_text("live")
        cdp = await page.context.new_cdp_session(page)

        async def heap() -> int:
            await cdp.send("HeapProfiler.collectGarbage")
            return int((await cdp.send("Runtime.getHeapUsage"))["usedSize"])

        before = await heap()
        r = await http.post("/v1/miners/register", json={"capabilities": {}}, headers=miner)
        assert r.status_code == 200, r.text
        for n in range(30):
            r = await http.post("/v1/jobs", json={"payload": {"n": n}}, headers=CLIENT)
            assert r.status_code == 201, r.text
            job_id = r.json()["job_id"]
            r = await http.post("/v1/miners/poll", json={"max_wait_seconds": 2}, headers=miner)
            assert r.status_code == 200, r.text
            r = await http.post(
                f"/v1/miners/{job_id}/result", json={"result": result}, headers=miner
            )
            assert r.status_code == 200, r.text
        await expect(job_state(page, job_id)).to_have_text("COMPLETED")
        await expect(page.locator(f'#log li[data-job="{job_id}"]').first).to_be_visible()
        assert await heap() - before < 10_000_000  # 30 results of 0.9 MB: 27 MB kept before


async def test_a_draining_miner_with_a_job_counts_as_busy(server: RunningServer) -> None:
    """The header's busy miners are the online ones holding a job, as aitbc_miners_busy
    counts them: a draining miner still running its jobs was left out."""
    async with ops_page(server) as page, client_session(server, CLIENT_KEY) as client:
        await sign_in(page)
        async with ManualMiner(server, MINER_KEY, "gpu-drains") as miner:
            await miner.connect()
            await submit(client, "still running")
            await miner.recv()  # job.assign
            await expect(page.locator("#kpi-busy")).to_have_text("1")
            async with httpx.AsyncClient() as http:
                r = await http.post(
                    f"http://127.0.0.1:{server.port}/v1/admin/miners/gpu-drains/drain",
                    headers={"X-Api-Key": ADMIN_KEY},
                )
            assert r.status_code == 200, r.text
            row = page.locator('#miners tr[data-miner="gpu-drains"]')
            await expect(row).to_contain_text("draining")
            await expect(page.locator("#kpi-busy")).to_have_text("1")
            await expect(page.locator("#kpi-slots")).to_have_text("1/1")


async def test_a_requeued_job_shows_no_miner(server: RunningServer) -> None:
    """A requeued (or canceled) job's event names no miner: the job list kept showing the
    miner it was taken from, while the drill-down said none."""
    async with ops_page(server) as page, client_session(server, CLIENT_KEY) as client:
        await sign_in(page)
        async with ManualMiner(server, MINER_KEY, "gpu-taken-from") as miner:
            await miner.connect()
            job_id = await submit(client, "taken back")
            await miner.recv()  # job.assign
            miner_cell = page.locator(f'#jobs tr[data-job="{job_id}"] td:nth-child(4)')
            await expect(miner_cell).to_have_text("gpu-taken-from")
            admin = {"X-Api-Key": ADMIN_KEY}
            base = f"http://127.0.0.1:{server.port}/v1/admin"
            async with httpx.AsyncClient(base_url=base, headers=admin) as http:
                r = await http.post("/miners/gpu-taken-from/drain")  # not offered it again
                assert r.status_code == 200, r.text
                r = await http.post(f"/jobs/{job_id}/requeue")
                assert r.status_code == 200, r.text
            await expect(job_state(page, job_id)).to_have_text("QUEUED")
            await expect(miner_cell).to_have_text("—")


async def test_hidden_progress_events_never_push_other_events_out_of_the_log(
    server: RunningServer,
) -> None:
    """The log kept the last 2,000 events of every kind together, progress (hidden by
    default) too: a streaming job's tokens pushed every other event out of it, and it showed
    nothing. It now keeps the last 2,000 of each kind. The page's socket is a stand-in
    (installed before the page's script runs) that answers the sign-in with a snapshot, one
    queued event and 2,100 progress events."""
    async with ops_page(server) as page:
        await page.add_init_script(FAKE_OPS_SOCKET)
        await page.reload()
        await sign_in(page)
        await expect(page.locator("#conn-status")).to_have_text("live")
        await page.locator('#log-filters input[value="progress"]').check()
        await expect(page.locator(f'#log li[data-job="{"b" * 32}"]').first).to_be_visible()
        await expect(page.locator("#log li")).to_have_count(100)  # the newest: progress
        await page.locator('#log-filters input[value="progress"]').uncheck()
        await expect(page.locator(f'#log li[data-job="{"a" * 32}"]')).to_have_count(1)


async def test_the_live_log_keeps_a_line_of_each_error_not_the_whole_text(
    server: RunningServer,
) -> None:
    """A miner's error message may be 64 KiB (and a requeue's reason, a max-attempts failure
    quote it): the log kept each whole for its 2,000 entries of a kind, about 128 MiB of
    failures alone, and wrote 100 of them into the page at each redraw for a line that shows
    a few words. It keeps the first 200 characters. The socket is a stand-in sending 2,000
    failed events, each with 64 KiB of error."""
    async with ops_page(server) as page:
        await page.add_init_script(FAKE_FAILING_SOCKET)
        await page.reload()
        cdp = await page.context.new_cdp_session(page)

        async def heap() -> int:
            await cdp.send("HeapProfiler.collectGarbage")
            return int((await cdp.send("Runtime.getHeapUsage"))["usedSize"])

        before = await heap()
        await sign_in(page)
        await expect(page.locator("#conn-status")).to_have_text("live")
        line = page.locator(f'#log li[data-job="{"f" * 28}1999"]')
        await expect(line).to_contain_text("E" * 150)
        assert await heap() - before < 20_000_000  # about 128 MiB before
        assert len(await line.text_content() or "") < 400


FAKE_FAILING_SOCKET = """
window.WebSocket = class {
  constructor() { setTimeout(() => this.onopen(), 0); }
  close() {}
  send() {
    const at = "2026-01-01T00:00:00.000Z";
    const error = "E".repeat(65536);
    this.onmessage({ data: JSON.stringify({ type: "snapshot", miners: [], queue: {},
      counters: {}, history: [] }) });
    for (let n = 0; n < 2000; n++) {
      const job_id = "f".repeat(28) + String(n).padStart(4, "0");
      this.onmessage({ data: JSON.stringify({ type: "job.event", job_id, seq: 3,
        event: "failed", state: "FAILED", at, attempt: 1, miner_id: "m1", error }) });
    }
  }
};
"""


FAKE_OPS_SOCKET = """
window.WebSocket = class {
  constructor() { setTimeout(() => this.onopen(), 0); }
  close() {}
  send() {
    const at = "2026-01-01T00:00:00.000Z";
    const event = (job_id, kind, seq) => ({ type: "job.event", job_id, seq, event: kind,
      state: kind === "queued" ? "QUEUED" : "RUNNING", at, attempt: 1,
      miner_id: kind === "queued" ? null : "m1", progress: 0.5 });
    const frames = [{ type: "snapshot", miners: [], queue: {}, counters: {}, history: [] },
      event("a".repeat(32), "queued", 1)];
    for (let n = 0; n < 2100; n++) frames.push(event("b".repeat(32), "progress", n + 2));
    for (const f of frames) this.onmessage({ data: JSON.stringify(f) });
  }
};
"""
