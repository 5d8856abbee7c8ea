// The ops page: one admin socket (/v1/admin/ws) for state, the admin REST routes for actions.
// Frames only update state and mark what is dirty; one requestAnimationFrame renders it all.
import { LineChart } from "./charts.js";

const KEY = "aitbc-admin-key";
const PAGE = 50;            // miners per page
const MAX_JOBS = 500;       // jobs kept from the live stream
const MAX_LOG = 2000;       // log entries kept of each kind
const SHOWN_LOG = 100;      // log entries rendered (the newest; the box shows ~16)
const SHOWN_JOBS = 60;      // job rows rendered
const LIST_EVERY = 250;     // ms between redraws of the job list and the log
const HISTORY = 300;        // chart points
// The server sends a chart point every second: this long without a frame, the socket is
// taken for dead (a link gone without a close) and replaced, and the page says it is stale.
const STALE = 5000;         // ms
const LOG_DETAIL = 200;     // characters kept of an entry's error or reason (a line shows fewer)

const $ = (id) => document.getElementById(id);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
// A time (UTC, as the API gives it): today's as the time of day, another day's with its date
// (a polling miner gone quiet stays registered: "last seen 03:04" read as this morning).
const hms = (iso) => {
  if (!iso) return "";
  const s = String(iso), day = s.slice(0, 10);
  return day === new Date().toISOString().slice(0, 10) ? s.slice(11, 23) : `${day} ${s.slice(11, 19)}`;
};
const short = (id) => (id ? String(id).slice(0, 12) : "");

const S = {
  key: null, ws: null, live: false, everLive: false, retry: 0, timer: null, heardAt: 0,
  lost: null,  // why the last socket was lost ({state, text}), shown until the next is live
  miners: new Map(), queue: {}, counters: {}, history: [],
  jobs: new Map(), log: new Map(), logN: 0,
  sort: { key: "miner_id", dir: 1 }, page: 0, filter: "",
  logKinds: new Set(), logText: "", paused: false,
  openJob: null, detail: null, detailTimer: null,
  dirty: new Set(), frame: 0, listAt: 0, listTimer: 0,
};

const charts = {
  throughput: new LineChart($("chart-throughput"), [
    { key: "completed_per_s", label: "completed", color: "#3fb950" },
    { key: "failed_per_s", label: "failed", color: "#f85149" },
  ]),
  latency: new LineChart($("chart-latency"), [
    { key: "dispatch_p50_ms", label: "p50", color: "#58a6ff" },
    { key: "dispatch_p99_ms", label: "p99", color: "#bc8cff" },
  ]),
  queue: new LineChart($("chart-queue"), [
    { key: "queued", label: "queued", color: "#d29922" },
    { key: "running", label: "running", color: "#58a6ff" },
  ]),
};

// ---- rendering (coalesced) ------------------------------------------------------------------

function mark(...parts) {
  for (const p of parts) S.dirty.add(p);
  if (!S.frame) S.frame = requestAnimationFrame(render);
}

function render() {
  S.frame = 0;
  const d = S.dirty;
  S.dirty = new Set();
  if (d.has("miners")) renderMiners();
  if (d.has("queue")) renderQueue();
  if (d.has("kpis")) renderKpis();
  if (d.has("charts")) for (const c of Object.values(charts)) c.draw(S.history);
  if (d.has("detail")) renderDetail();
  if (!d.has("jobs") && !d.has("log")) return;
  // The two lists change with every event: redraw them at most every LIST_EVERY ms.
  const wait = S.listAt + LIST_EVERY - performance.now();
  if (wait > 0) {
    for (const part of ["jobs", "log"]) if (d.has(part)) S.dirty.add(part);
    if (!S.listTimer) S.listTimer = setTimeout(() => { S.listTimer = 0; mark(); }, wait);
    return;
  }
  S.listAt = performance.now();
  if (d.has("jobs")) renderJobs();
  if (d.has("log") && !S.paused) renderLog();
}

// Replace an element's rows only when the markup changed (most deltas touch no visible row).
const shown = new Map();
function setRows(id, html) {
  if (shown.get(id) === html) return;
  shown.set(id, html);
  $(id).innerHTML = html;
}

function sortValue(m, key) {
  const v = m[key];
  if (Array.isArray(v)) return v.join(",");
  return v ?? "";
}

// A miner's last load report (heartbeat or status metrics): "name value" pairs.
function loadText(load) {
  const pairs = Object.entries(load || {});
  return pairs.length ? pairs.map(([k, v]) => `${k} ${v}`).join(" · ") : "—";
}

function renderMiners() {
  const f = S.filter.toLowerCase();
  let rows = [...S.miners.values()];
  if (f) {
    rows = rows.filter((m) => [m.miner_id, m.region, m.state, m.transport, ...(m.gpus || []), ...(m.models || [])]
      .some((x) => String(x ?? "").toLowerCase().includes(f)));
  }
  const { key, dir } = S.sort;
  rows.sort((a, b) => {
    const x = sortValue(a, key), y = sortValue(b, key);
    return (x < y ? -1 : x > y ? 1 : 0) * dir || (a.miner_id < b.miner_id ? -1 : 1);
  });
  const pages = Math.max(1, Math.ceil(rows.length / PAGE));
  S.page = Math.min(S.page, pages - 1);
  const page = rows.slice(S.page * PAGE, S.page * PAGE + PAGE);
  $("miner-count").textContent = `${rows.length} of ${S.miners.size}`;
  $("miners-page").textContent = `${S.page + 1}/${pages}`;
  setRows("miners", page.map((m) => `<tr data-miner="${esc(m.miner_id)}">
    <td title="${esc(m.transport)}">${esc(m.miner_id)}</td><td>${esc(m.region ?? "—")}</td>
    <td title="${esc(m.vram_mb)} MiB">${esc((m.gpus || []).join(", ") || "—")}</td>
    <td>${esc((m.models || []).join(", ") || "—")}</td>
    <td>${esc(m.slots_used)}/${esc(m.slots_total)}</td>
    <td><span class="st st-${esc(m.state)}">${esc(m.state)}</span></td>
    <td>${esc(hms(m.last_seen))}</td><td>${esc(m.completed)}</td><td>${esc(m.failed)}</td>
    <td>${m.success_rate == null ? "—" : esc((100 * m.success_rate).toFixed(1)) + "%"}</td>
    <td class="load">${esc(loadText(m.load))}</td>
    <td>${m.state === "away" ? "" : `<button data-action="${m.state === "draining" ? "undrain" : "drain"}">${m.state === "draining" ? "Undrain" : "Drain"}</button>
      <button data-action="disconnect" class="danger">Disconnect</button>`}</td></tr>`).join(""));
  for (const th of document.querySelectorAll("#miners-table th[data-sort]")) {
    th.classList.toggle("asc", th.dataset.sort === key && dir > 0);
    th.classList.toggle("desc", th.dataset.sort === key && dir < 0);
  }
}

function renderQueue() {
  const q = S.queue;
  for (const k of ["queued", "assigned", "running", "unservable"]) $(`queue-${k}`).textContent = q[k] ?? 0;
  $("unservable").innerHTML = (q.unservable_groups || []).map((g) =>
    `<tr><td><code>${esc(JSON.stringify(g.constraints))}</code></td><td>${esc(g.count)}</td></tr>`).join("")
    || `<tr><td class="muted" colspan="2">none</td></tr>`;
}

function renderKpis() {
  let online = 0, busy = 0, used = 0, total = 0;
  for (const m of S.miners.values()) {
    if (m.state === "away" || m.state === "offline") continue;
    online++; used += m.slots_used; total += m.slots_total;
    if (m.slots_used > 0) busy++;  // a draining miner still running its jobs too (as /metrics)
  }
  const c = S.counters, ev = c.events || {}, so = c.sockets || {};
  $("kpi-online").textContent = online;
  $("kpi-busy").textContent = busy;
  $("kpi-slots").textContent = `${used}/${total}`;
  $("kpi-completed").textContent = ev.completed ?? 0;
  $("kpi-failed").textContent = ev.failed ?? 0;
  $("kpi-sockets").textContent = Object.values(so).reduce((a, b) => a + b, 0);
  $("kpi-dropped").textContent = c.progress_dropped ?? 0;
}

function renderJobs() {
  const want = $("jobs-state").value;
  const rows = [];
  for (const j of [...S.jobs.values()].reverse()) {
    if (want && j.state !== want) continue;
    rows.push(`<tr data-job="${esc(j.job_id)}"><td><code>${esc(short(j.job_id))}</code></td>
      <td class="state"><span class="st st-${esc(j.state)}">${esc(j.state)}</span></td>
      <td>${esc(j.event)}</td><td>${esc(j.miner_id ?? "—")}</td><td>${esc(j.attempt)}</td><td>${esc(hms(j.at))}</td></tr>`);
    if (rows.length >= SHOWN_JOBS) break;
  }
  setRows("jobs", rows.join(""));
}

function logDetail(e) {
  const d = e.data || e;
  if (d.error) return d.error;
  if (d.reason) return d.reason;
  if (typeof d.progress === "number") return `${Math.round(100 * d.progress)}%`;
  return "";
}

// What the log shows and filters on, kept instead of the frame: a completed event carries its
// result (up to a whole frame), and 2,000 of them would hold gigabytes. Of an error or a reason
// (a miner's text, up to 64 KiB) the start: 2,000 whole failures held 128 MiB.
function logEntry(f) {
  let detail = String(logDetail(f));
  // Copied, never a slice: V8's slice of a long string keeps the whole string alive.
  if (detail.length > LOG_DETAIL) detail = Array.from(detail.slice(0, LOG_DETAIL)).join("") + "…";
  return { n: ++S.logN, job_id: f.job_id, event: f.event, state: f.state, miner_id: f.miner_id, at: f.at, detail };
}

// The newest entries of the kinds shown, merged newest first from their rings.
function renderLog() {
  const text = S.logText.toLowerCase();
  const out = [];
  const rings = [...S.logKinds].map((k) => S.log.get(k)).filter(Boolean);
  const next = rings.map((r) => r.length - 1);
  while (out.length < SHOWN_LOG) {
    let best = -1;
    for (let r = 0; r < rings.length; r++) {
      if (next[r] >= 0 && (best < 0 || rings[r][next[r]].n > rings[best][next[best]].n)) best = r;
    }
    if (best < 0) break;
    const e = rings[best][next[best]--];
    if (text && !(`${e.job_id} ${e.miner_id ?? ""}`.toLowerCase().includes(text))) continue;
    out.push(`<li class="ev-${esc(e.event)}" data-job="${esc(e.job_id)}" data-event="${esc(e.event)}">${esc(hms(e.at))} <b>${esc(e.event.padEnd(9))}</b> ${esc(short(e.job_id))} ${esc(e.state)} ${esc(e.miner_id ?? "")} ${esc(e.detail)}</li>`);
  }
  setRows("log", out.join(""));
}

function renderDetail() {
  const d = S.detail;
  if (!d) return;
  const j = d.job;
  $("d-job").textContent = j.job_id;
  const st = $("d-state");
  st.textContent = j.state;
  st.className = `badge st st-${j.state}`;
  $("d-attempt").textContent = j.attempt;
  $("d-miner").textContent = j.assigned_miner_id ?? "—";
  $("d-client").textContent = d.client_id;
  $("d-error").textContent = j.error ?? "";
  $("d-cancel").disabled = !(j.state === "QUEUED" || j.state === "RUNNING");
  $("d-requeue").disabled = j.state !== "RUNNING";
  $("d-timeline").innerHTML = d.events.map((e) => `<li data-event="${esc(e.event)}">${esc(hms(e.at))} <b>${esc(e.event)}</b> → ${esc(e.state)} (attempt ${esc(e.attempt)}${e.miner_id ? ", " + esc(e.miner_id) : ""}) ${esc(logDetail(e))}</li>`).join("")
    + (d.next_after == null ? "" : `<li>… the events after seq ${esc(d.next_after)} are not shown (GET /v1/admin/jobs/${esc(j.job_id)}?after=${esc(d.next_after)})</li>`);
  $("d-payload").textContent = JSON.stringify(j.payload, null, 2);
  $("d-result").textContent = j.result == null ? "—" : JSON.stringify(j.result, null, 2);
  $("d-receipt").textContent = d.receipt == null ? "—" : JSON.stringify(d.receipt, null, 2);
  const badge = $("d-receipt-badge");
  const check = d.receipt_check;
  badge.className = `badge ${check.status}`;
  badge.textContent = check.status === "valid" ? "✓ signature verified" : check.status === "invalid" ? "✗ " + check.problems.join("; ") : "no receipt";
}

// ---- the socket -----------------------------------------------------------------------------

function setStatus(state, text) {
  const el = $("conn-status");
  el.dataset.state = state;
  el.textContent = text;
}

// Once the socket is lost (closed, or silent for STALE ms): say so, retry with backoff.
function retryLater(state, text) {
  S.ws = null;
  S.live = false;
  S.lost = { state, text };
  const wait = Math.min(5000, 250 * 2 ** S.retry++);
  setStatus(state, `${text}; retrying in ${(wait / 1000).toFixed(1)} s`);
  S.timer = setTimeout(connect, wait);
}

// A socket can die without a close (a network change, a sleeping laptop, a proxy holding it
// open): checked every second, the browser fires no event for it.
function watchdog() {
  const ws = S.ws;
  if (!ws || !S.live || performance.now() - S.heardAt < STALE) return;
  retryLater("stale", `stale: no data for ${STALE / 1000} s`);
  ws.close(1000);  // onclose: no longer S.ws, ignored
}

function connect() {
  clearTimeout(S.timer);
  // One socket at a time: a sign-in sent again before the first socket is live replaces it.
  const old = S.ws;
  S.ws = null;
  if (old) old.close(1000);
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${proto}//${location.host}/v1/admin/ws`);
  S.ws = ws;
  S.live = false;
  S.heardAt = performance.now();
  if (S.lost) setStatus(S.lost.state, `${S.lost.text}; reconnecting…`);
  else setStatus(S.everLive ? "reconnecting" : "connecting", S.everLive ? "reconnecting…" : "connecting…");
  ws.onopen = () => ws.send(JSON.stringify({ type: "auth", token: S.key }));
  ws.onmessage = (m) => {
    if (S.ws !== ws) return;
    S.heardAt = performance.now();
    onFrame(JSON.parse(m.data));
  };
  ws.onclose = (ev) => {
    if (S.ws !== ws) return;
    S.ws = null;
    S.live = false;
    if (ev.code === 4401 || ev.code === 4403) {
      signOut(ev.code === 4401 ? "Unknown key." : "That key is not an admin key.");
      return;
    }
    if (!S.key) return;
    // The reason, when the server gave one: 4429 "outbound queue overflow" (the page fell
    // behind), 1001 (the server is stopping)...
    retryLater("reconnecting", `disconnected (${ev.code}${ev.reason ? " " + ev.reason : ""})`);
  };
}

function onFrame(f) {
  switch (f.type) {
    case "snapshot":
      S.live = S.everLive = true;
      S.retry = 0;
      S.lost = null;
      document.body.dataset.snapshots = String(Number(document.body.dataset.snapshots || 0) + 1);
      S.miners = new Map(f.miners.map((m) => [m.miner_id, m]));
      S.queue = f.queue;
      S.counters = f.counters;
      S.history = f.history.slice(-HISTORY);
      S.jobs.clear();
      S.log = new Map();
      $("signin").hidden = true;
      $("app").hidden = false;
      $("kpis").hidden = false;
      $("sign-out").hidden = false;
      setStatus("live", "live");
      mark("miners", "queue", "kpis", "charts", "jobs", "log");
      if (S.openJob) loadDetail();
      break;
    case "ops.delta":
      if (f.miners) for (const m of f.miners) S.miners.set(m.miner_id, m);
      if (f.removed) for (const id of f.removed) S.miners.delete(id);
      if (f.miners || f.removed) mark("miners", "kpis");
      if (f.queue) { S.queue = f.queue; mark("queue"); }
      if (f.counters) { S.counters = f.counters; mark("kpis"); }
      if (f.points) {
        S.history.push(...f.points);
        if (S.history.length > HISTORY) S.history.splice(0, S.history.length - HISTORY);
        mark("charts");
      }
      break;
    case "job.event": {
      // Moved to the end (newest). Its miner is the event's: none once requeued or canceled.
      S.jobs.delete(f.job_id);
      S.jobs.set(f.job_id, { job_id: f.job_id, state: f.state, event: f.event, miner_id: f.miner_id, attempt: f.attempt, at: f.at });
      if (S.jobs.size > MAX_JOBS) S.jobs.delete(S.jobs.keys().next().value);
      // A ring per kind: hidden kinds (progress, by default) never push the others out.
      let ring = S.log.get(f.event);
      if (!ring) S.log.set(f.event, (ring = []));
      ring.push(logEntry(f));
      if (ring.length > MAX_LOG) ring.splice(0, ring.length - MAX_LOG);
      mark("jobs", "log");
      if (f.job_id === S.openJob && f.event !== "progress") scheduleDetail();
      break;
    }
    default:
      break;
  }
}

function signIn(key) {
  S.key = key;
  sessionStorage.setItem(KEY, key);
  $("signin-error").textContent = "";
  S.retry = 0;
  connect();
}

function signOut(message) {
  sessionStorage.removeItem(KEY);
  S.key = null;
  S.everLive = false;
  S.lost = null;
  clearTimeout(S.timer);
  const ws = S.ws;
  S.ws = null;
  if (ws) ws.close(1000);
  $("app").hidden = true;
  $("kpis").hidden = true;
  $("sign-out").hidden = true;
  $("drawer").hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = message || "";
  setStatus("offline", "signed out");
}

// ---- REST: drill-down and actions -----------------------------------------------------------

async function api(method, path, body) {
  const res = await fetch(path, {
    method,
    headers: { "X-Api-Key": S.key, ...(body ? { "Content-Type": "application/json" } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(data.detail || `HTTP ${res.status}`);
  return data;
}

function toast(text) {
  const t = $("toast");
  t.textContent = text;
  t.hidden = false;
  clearTimeout(t._timer);
  t._timer = setTimeout(() => { t.hidden = true; }, 4000);
}

function confirmAction(text) {
  const dlg = $("confirm");
  $("confirm-text").textContent = text;
  dlg.returnValue = "";
  dlg.showModal();
  return new Promise((resolve) => dlg.addEventListener("close", () => resolve(dlg.returnValue === "ok"), { once: true }));
}

async function act(text, method, path, body) {
  if (!(await confirmAction(text))) return;
  try {
    await api(method, path, body);
    toast(`done: ${text}`);
  } catch (err) {
    toast(`failed: ${err.message}`);
  }
}

function openJob(id) {
  S.openJob = id;
  S.detail = null;
  $("drawer").hidden = false;
  // Nothing of the previous job stays on show (nor its actions) until this one's answer.
  for (const f of ["d-state", "d-attempt", "d-miner", "d-client", "d-error", "d-payload", "d-result", "d-receipt", "d-receipt-badge"]) $(f).textContent = "";
  $("d-state").className = $("d-receipt-badge").className = "badge";
  $("d-timeline").innerHTML = "";
  $("d-cancel").disabled = $("d-requeue").disabled = true;
  $("d-job").textContent = id;
  loadDetail();
}

async function loadDetail() {
  const id = S.openJob;
  if (!id) return;
  try {
    const d = await api("GET", `/v1/admin/jobs/${encodeURIComponent(id)}`);
    if (S.openJob !== id) return;
    S.detail = d;
    mark("detail");
  } catch (err) {
    if (S.openJob === id) $("d-error").textContent = err.message;
  }
}

function scheduleDetail() {
  if (S.detailTimer) return;
  S.detailTimer = setTimeout(() => { S.detailTimer = null; loadDetail(); }, 150);
}

// ---- wiring ---------------------------------------------------------------------------------

function wire() {
  $("signin-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("admin-key").value.trim();
    if (key) signIn(key);
  });
  $("sign-out").addEventListener("click", () => signOut(""));
  $("miner-filter").addEventListener("input", (e) => { S.filter = e.target.value; S.page = 0; mark("miners"); });
  $("miners-prev").addEventListener("click", () => { S.page = Math.max(0, S.page - 1); mark("miners"); });
  $("miners-next").addEventListener("click", () => { S.page += 1; mark("miners"); });
  for (const th of document.querySelectorAll("#miners-table th[data-sort]")) {
    th.addEventListener("click", () => {
      const key = th.dataset.sort;
      S.sort = { key, dir: S.sort.key === key ? -S.sort.dir : 1 };
      mark("miners");
    });
  }
  $("miners").addEventListener("click", (e) => {
    const btn = e.target.closest("button[data-action]");
    if (!btn) return;
    const id = btn.closest("tr").dataset.miner;
    const path = `/v1/admin/miners/${encodeURIComponent(id)}`;
    if (btn.dataset.action === "drain") act(`Drain miner ${id}? It finishes its jobs and gets no new ones.`, "POST", `${path}/drain`, { draining: true });
    else if (btn.dataset.action === "undrain") act(`Offer jobs to miner ${id} again?`, "POST", `${path}/drain`, { draining: false });
    else act(`Disconnect miner ${id}? Its started jobs wait for it to resume.`, "POST", `${path}/disconnect`);
  });
  for (const box of document.querySelectorAll("#log-filters input[type=checkbox]")) {
    if (box.checked) S.logKinds.add(box.value);
    box.addEventListener("change", () => {
      if (box.checked) S.logKinds.add(box.value); else S.logKinds.delete(box.value);
      mark("log");
    });
  }
  $("log-text").addEventListener("input", (e) => { S.logText = e.target.value; mark("log"); });
  $("log-pause").addEventListener("click", (e) => {
    S.paused = !S.paused;
    e.target.textContent = S.paused ? "Resume" : "Pause";
    mark("log");
  });
  $("jobs-state").addEventListener("change", () => mark("jobs"));
  $("job-open").addEventListener("keydown", (e) => { if (e.key === "Enter" && e.target.value.trim()) openJob(e.target.value.trim()); });
  for (const el of [$("jobs"), $("log")]) {
    el.addEventListener("click", (e) => {
      const row = e.target.closest("[data-job]");
      if (row) openJob(row.dataset.job);
    });
  }
  $("d-close").addEventListener("click", () => { S.openJob = null; $("drawer").hidden = true; });
  $("d-cancel").addEventListener("click", () => {
    const id = S.openJob;
    act(`Cancel job ${id}? Its miner is told to stop.`, "POST", `/v1/admin/jobs/${encodeURIComponent(id)}/cancel`);
  });
  $("d-requeue").addEventListener("click", () => {
    const id = S.openJob;
    act(`Requeue job ${id}? It is taken from its miner and queued again.`, "POST", `/v1/admin/jobs/${encodeURIComponent(id)}/requeue`);
  });
  window.addEventListener("resize", () => mark("charts"));
}

wire();
setInterval(watchdog, 1000);
// `aitbc-coordinator demo` prints /ops#key=…: keep the key in this tab only, drop it from the URL.
function keyFromAddress() {
  const fromUrl = location.hash.match(/^#key=(.+)$/);
  if (!fromUrl) return null;
  history.replaceState(null, "", location.pathname);  // out of the address first, whatever follows
  try {
    return decodeURIComponent(fromUrl[1]);
  } catch {
    $("signin-error").textContent = "That link's key is malformed (cut short?): sign in with the key.";
    return null;
  }
}
const linked = keyFromAddress();
if (linked) sessionStorage.setItem(KEY, linked);
const saved = sessionStorage.getItem(KEY);
if (saved) signIn(saved);
// Such a link opened in a tab already on the page (a restarted demo's, with its new key) only
// changes the fragment: no load. The page ignored it, and the key stayed in the address bar.
window.addEventListener("hashchange", () => {
  const key = keyFromAddress();
  if (key) signIn(key);
});
