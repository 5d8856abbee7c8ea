"""The ops feed behind ``/v1/admin/ws`` and ``/v1/admin/ops`` (docs/ops.md).

It watches committed job events (``Dispatcher.watchers``: durability before visibility) and
reads miner state from the scheduler when it builds a frame. Every ``TICK`` it compares the
miner rows, the queue summary and the counters with what it last sent and pushes one
``ops.delta`` with the differences, so a watcher gets at most 4 deltas a second however busy the
coordinator is. The scheduler runs ahead of the store by the batches in flight, so a snapshot
or delta is built at once and sent once everything queued so far has committed
(``Dispatcher.after_commit``): a miner whose hello is being committed is not shown before.
Job events go to the watchers as they commit (the live log); progress frames may be coalesced
or dropped under backpressure like on the client socket. Once a second it records a chart
point (throughput, dispatch latency p50/p99, queue depth), HISTORY points back.
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING, Any

import anyio
import orjson

from dispatcher.policy import JobNeeds
from dispatcher.stats import requeue_label
from protocol.types import iso_time

if TYPE_CHECKING:
    from collections.abc import Callable

    from dispatcher.core import Miner
    from dispatcher.fanout import Outbox
    from protocol.records import EventRecord, JobRecord
    from web.app import Coordinator

__all__ = ["HISTORY", "LOAD_FIGURES", "SEEN_STEP", "TICK", "OpsFeed", "load_figures"]

TICK = 0.25
HISTORY = 300  # chart points (one a second): the last five minutes
RECENT_EVENTS = 200  # replayed to a new watcher after its snapshot
# ... while their frames add up to at most this (a completed event carries its result, up to
# a whole frame: 200 of 1 MiB held 200 MiB); the newest is kept in any case.
RECENT_BYTES = 4 << 20
TOP_UNSERVABLE = 10
# Completed/failed counts kept for miners that are gone (for their return), the latest gone
# first: short-lived miner ids (a container each) grew them without bound.
GONE_COUNTS = 10_000
# A row's last_seen moves with each job event naming the miner; with what else it says (a
# heartbeat or status frame, a progress event, a REST call) only once what was shown is this
# old: 10,000 idle miners heartbeating every 10 s cost about 330 rows a second, not 1,000,
# and a miner streaming tokens is not sent again at every tick.
SEEN_STEP = 30.0
LOAD_FIGURES = 8  # numbers shown per miner from what it reports about its load
_LOAD_NAME = 32  # characters of a figure's name
_TERMINAL = frozenset(("COMPLETED", "FAILED", "CANCELED", "EXPIRED"))


class _ActiveJob:
    __slots__ = ("_key", "constraints", "miner_id", "started", "state")

    def __init__(self, constraints: dict[str, Any]) -> None:
        self.constraints = constraints
        self._key: JobNeeds | None = None
        self.state = "QUEUED"
        self.miner_id: str | None = None
        self.started = False

    @property
    def key(self) -> JobNeeds:
        """The class of its constraints for grouping the queue: what matching reads of them
        (``JobNeeds``, one shared instance per shape), never the keys it ignores (a client's
        to choose, as large as a body); made when first asked (most jobs are assigned at once
        and never grouped)."""
        if self._key is None:
            self._key = JobNeeds.parse(self.constraints)
        return self._key


def load_figures(report: object, *, skip: frozenset[str] = frozenset()) -> dict[str, float]:
    """The numbers of a miner's load report (a ``heartbeat`` or ``status`` frame's ``metrics``,
    a REST heartbeat body and its ``metadata``), for the ops page: finite numbers at the top
    level or one object down (named ``outer.inner``), the first ``LOAD_FIGURES`` names in
    order, each name cut to 32 characters. Everything else (text, lists, deeper objects, the
    names in ``skip``) is left out: a miner's report is shown, never trusted."""
    out: dict[str, float] = {}
    if not isinstance(report, dict):
        return out
    for name, value in report.items():
        if name in skip:
            continue
        inner = value.items() if isinstance(value, dict) else ((None, value),)
        for sub, number in inner:
            if isinstance(number, bool) or not isinstance(number, int | float):
                continue
            if isinstance(number, float) and not math.isfinite(number):
                continue
            label = str(name) if sub is None else f"{name}.{sub}"
            out[label[:_LOAD_NAME]] = round(float(number), 4)
    return dict(sorted(out.items())[:LOAD_FIGURES])


# A row's total GPU memory is at most what the page's JavaScript reads exactly. The miner's
# own figures are each within 64 bits (input is), but their sum need not be, and orjson
# writes no wider int: a row it cannot write failed the snapshot (500) and, with the page
# open, the feed's tick, which stopped the coordinator.
_MAX_VRAM_MB = 2**53 - 1


def _vram_mb(gpus: list[Any]) -> int:
    """The sum of the GPUs' ``memory_mb`` that are non-negative integers, capped."""
    total = 0
    for g in gpus:
        mb = g.get("memory_mb") if isinstance(g, dict) else None
        if isinstance(mb, int) and mb > 0:
            total += mb
    return min(total, _MAX_VRAM_MB)


# A row shows at most this many GPU names and models, each cut to this many characters: what a
# miner advertises is its own (a REST registration of 4 GPUs named with 200,000 characters made
# a 1 MB row, sent again to every watcher with each of its job events). Matching reads it all.
_ROW_ITEMS = 16
_ROW_TEXT = 64


def _shown_names(values: list[Any]) -> list[str]:
    return [str(v)[:_ROW_TEXT] for v in values[:_ROW_ITEMS]]


def _needs_shown(needs: JobNeeds) -> dict[str, Any]:
    """A queue class as the page shows it: the constraints matching reads that it sets."""
    shown: dict[str, Any] = {}
    for name in ("gpu", "min_vram_gb", "cuda", "models", "region", "max_price"):
        value = getattr(needs, name)
        if isinstance(value, frozenset):
            if value:
                shown[name] = sorted(value)
        elif value is not None:
            shown[name] = value
    return shown


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _count_end(done: list[Any], kind: str, job: JobRecord) -> None:
    """A job that completed or failed, in its miner's ``OpsFeed._done`` entry (with a
    completed one's run time and receipt)."""
    done[kind == "failed"] += 1
    if kind != "completed":
        return
    if job.started_at is not None and job.finished_at is not None:
        done[2] += 1
        done[3] += max(0.0, job.finished_at - job.started_at)
    if job.receipt is not None:
        done[4] = job.receipt.get("receipt_id")


class OpsFeed:
    def __init__(self, core: Coordinator) -> None:
        self.core = core
        self.watchers: set[Outbox] = set()
        # Watchers signed in with a wallet session: outbox -> ``signed_in``, checked before
        # anything more is sent to them (the session may have been logged out or expired).
        self._sessions: dict[Outbox, Callable[[], bool]] = {}
        self.active: dict[str, _ActiveJob] = {}
        self.recent: deque[str] = deque()
        self._recent_bytes = 0
        self.points: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        # miner id -> [completed, failed, timed runs, their seconds, the last receipt id]
        self._done: dict[str, list[Any]] = {}
        self._gone: dict[str, None] = {}  # gone miners with counts in _done, oldest first
        self._seen: dict[str, float] = {}  # miner id -> its row's last_seen (SEEN_STEP)
        self._load: dict[str, dict[str, float]] = {}  # miner id -> its last load figures
        self._latencies: list[float] = []  # submit -> first assignment, since the last point
        self._last_point: float | None = None
        self._point_totals = (0, 0)
        # The queue summary, kept up to date by on_event (never a walk over every active job:
        # with a backlog of a million jobs that walk took 0.4 s, every TICK while watched).
        # QUEUED jobs are grouped by constraint class only once they are asked for: most are
        # assigned in the same batch and never need their class.
        self._queued = self._assigned = self._running = 0
        self._ungrouped: dict[str, _ActiveJob] = {}  # QUEUED, not yet counted in a group
        self._groups: dict[JobNeeds, list[Any]] = {}  # class -> [shown, QUEUED jobs]
        self._sent_miners: dict[str, tuple[Any, ...]] = {}
        self._event_miners: set[str] = set()  # named by job events since the last delta
        self._sent_queue: dict[str, Any] = {}
        self._sent_counters: dict[str, Any] = {}
        self._new_points: list[dict[str, Any]] = []
        self._scope: anyio.CancelScope | None = None
        self._stopped = False
        self._dropped_before = 0  # progress frames dropped for watchers that left
        self._joining: set[Outbox] = set()  # added; their snapshot waits for its commit
        core.dispatcher.watchers.append(self.on_event)

    # ---- input ------------------------------------------------------------------------------

    def seed(self) -> None:
        """After a restart: the active jobs the scheduler restored from the store."""
        for job in self.core.dispatcher.scheduler.jobs.values():
            if job.state not in _TERMINAL and job.job_id not in self.active:
                entry = self.active[job.job_id] = _ActiveJob(job.constraints)
                entry.state, entry.miner_id, entry.started = job.state, job.miner_id, job.accepted
                self._count(job.job_id, entry)

    def on_load(self, miner_id: str, report: object, *, skip: frozenset[str] = frozenset()) -> None:
        """A connected miner reported its load (``load_figures``): shown in its row from the
        next delta on when the figures changed. Not state: nothing is stored."""
        if miner_id not in self.core.dispatcher.scheduler.miners:
            return
        figures = load_figures(report, skip=skip)
        if self._load.get(miner_id) != figures:
            self._load[miner_id] = figures
            self._event_miners.add(miner_id)

    def miner_totals(self, miner_id: str) -> tuple[int, int, float | None, str | None]:
        """Since the coordinator started, as the miner's row counts them: jobs completed and
        failed, the mean run of the completed ones in ms (None before any), the last receipt
        id (upstream's admin miner fields)."""
        done = self._done.get(miner_id)
        if done is None:
            return 0, 0, None, None
        mean = None if done[2] == 0 else round(1000 * done[3] / done[2], 3)
        return done[0], done[1], mean, done[4]

    def heard(self, miner_id: str) -> None:
        """A connected miner said something (a ``heartbeat`` or ``status`` frame)."""
        if miner_id in self.core.dispatcher.scheduler.miners:
            self._heard_at(miner_id, self.core.dispatcher.clock.now())

    def _heard_at(self, miner_id: str, at: float) -> None:
        """Move the row's last_seen to ``at`` once what it shows is ``SEEN_STEP`` older (a
        row not shown yet starts at its first showing)."""
        seen = self._seen.get(miner_id)
        if seen is not None and at - seen >= SEEN_STEP:
            self._seen[miner_id] = at
            self._event_miners.add(miner_id)

    def _rest_heard(self) -> None:
        """The REST miners' last calls (kept by the dispatcher) as ``heard``."""
        miners = self.core.dispatcher.scheduler.miners
        for miner_id, at in self.core.dispatcher.rest_last_calls():
            if miner_id in miners:
                self._heard_at(miner_id, at)

    def on_event(self, job: JobRecord, e: EventRecord, frame: str) -> None:
        """A committed job event (``Dispatcher.watchers``); cheap: it runs per event."""
        # Unpacked: a NamedTuple's fields read by name each take the interpreter's slow path.
        job_id, _, kind, state, at, attempt, miner_id, _ = e
        if kind == "progress":  # as a heartbeat: a streaming miner's row is not sent per tick
            if miner_id is not None:
                self._heard_at(miner_id, at)
            self._send(frame, job_id, progress=True)
            return
        if state in _TERMINAL:
            gone = self.active.pop(job_id, None)
            if gone is not None:
                self._uncount(job_id, gone)
        else:
            entry = self.active.get(job_id)
            if entry is None:
                entry = self.active[job_id] = _ActiveJob(job.constraints)
            else:
                self._uncount(job_id, entry)
                # A retryable failure: its event names no miner, the entry the one that failed.
                if kind == "requeued" and entry.miner_id is not None:
                    if requeue_label(e.data) == "retryable_failure":
                        self._done.setdefault(entry.miner_id, [0, 0, 0, 0.0, None])[1] += 1
                        self._event_miners.add(entry.miner_id)
            entry.state = state
            entry.miner_id = miner_id
            entry.started = kind == "started" or (kind != "assigned" and entry.started)
            if kind == "requeued":
                entry.started = False
            self._count(job_id, entry)
        if miner_id is not None:
            self._seen[miner_id] = at
            self._event_miners.add(miner_id)
            if kind == "completed" or kind == "failed":
                _count_end(self._done.setdefault(miner_id, [0, 0, 0, 0.0, None]), kind, job)
        if kind == "assigned" and attempt == 1:  # submit -> pushed (after the commit)
            self._latencies.append(max(0.0, self.core.dispatcher.clock.now() - job.requested_at))
        self._keep_recent(frame)
        self._send(frame, job_id)

    def _send(self, frame: str, job_id: str | None = None, *, progress: bool = False) -> None:
        """Put ``frame`` in every watcher's outbox (after the wallet sessions' check)."""
        if self._sessions:
            self._check_sessions()
        for outbox in self.watchers:
            outbox.put(frame, job_id=job_id, progress=progress)

    def _keep_recent(self, frame: str) -> None:
        """Keep ``frame`` for new watchers: the last RECENT_EVENTS within RECENT_BYTES."""
        recent = self.recent
        recent.append(frame)
        self._recent_bytes += len(frame)
        while len(recent) > RECENT_EVENTS or (
            self._recent_bytes > RECENT_BYTES and len(recent) > 1
        ):
            self._recent_bytes -= len(recent.popleft())

    def _count(self, job_id: str, entry: _ActiveJob) -> None:
        """Add an active job to the summary: QUEUED, else running once started, else assigned
        (pushed, not accepted yet). ``_uncount`` takes it out again, before it changes."""
        if entry.state == "QUEUED":
            self._queued += 1
            self._ungrouped[job_id] = entry
        elif entry.started:
            self._running += 1
        else:
            self._assigned += 1

    def _uncount(self, job_id: str, entry: _ActiveJob) -> None:
        if entry.state == "QUEUED":
            self._queued -= 1
            if self._ungrouped.pop(job_id, None) is None:  # it was counted in its group
                group = self._groups[entry.key]
                group[1] -= 1
                if not group[1]:
                    del self._groups[entry.key]
        elif entry.started:
            self._running -= 1
        else:
            self._assigned -= 1

    # ---- watchers ---------------------------------------------------------------------------

    def add(self, outbox: Outbox, *, signed_in: Callable[[], bool] | None = None) -> None:
        """A new watcher: its snapshot, then the recent events, then live deltas and events.
        The snapshot is taken now and sent once what it shows is committed; the recent events
        are those published by then, and live ones follow. ``signed_in``: a wallet session's
        check, asked before each later event or delta; once it answers ``False`` (it closed
        the socket) the watcher is sent nothing more."""
        # Deltas are kept only while watched: the first watcher starts from this snapshot.
        first = not self.watchers and not self._joining
        if first:
            self._forget_gone()
        snapshot = orjson.dumps({"type": "snapshot", **self.snapshot()}).decode()
        miners = self.core.dispatcher.scheduler.miners
        if first:
            self._sent_miners = {mid: self._signature(mid, m) for mid, m in miners.items()}
        else:
            # This snapshot is newer than what the others were last sent: whatever differs may
            # change back before the next delta, which must then still say so to this watcher.
            # Such rows are marked unknown (sent again, or removed), and so are the queue and
            # the counters, for a first watcher too (what was last sent is older still): the
            # next delta carries them (a changed miner is in its list).
            sent = self._sent_miners
            for mid, m in miners.items():
                if sent.get(mid) != self._signature(mid, m):
                    sent[mid] = ()
        self._sent_queue = {}
        self._sent_counters = {}
        self._joining.add(outbox)
        if signed_in is not None:
            self._sessions[outbox] = signed_in
        self.core.dispatcher.after_commit(lambda: self._join(outbox, snapshot))

    def _join(self, outbox: Outbox, snapshot: str) -> None:
        """``add``, once its snapshot is durable (nothing when the watcher left meanwhile)."""
        if outbox not in self._joining:
            return
        self._joining.discard(outbox)
        outbox.put(snapshot)
        for frame in self.recent:
            outbox.put(frame)
        self.watchers.add(outbox)

    def _check_sessions(self) -> None:
        for outbox, signed_in in list(self._sessions.items()):
            if not signed_in():
                self.discard(outbox)

    def discard(self, outbox: Outbox) -> None:
        self._joining.discard(outbox)
        self._sessions.pop(outbox, None)
        if outbox in self.watchers:  # keep its drop count in the total
            self.watchers.discard(outbox)
            self._dropped_before += outbox.dropped
            outbox.dropped = 0

    @property
    def progress_dropped(self) -> int:
        """Progress frames coalesced or dropped for the watchers under backpressure, since
        start (``Fanout.progress_dropped`` counts the client sockets')."""
        return self._dropped_before + sum(outbox.dropped for outbox in self.watchers)

    # ---- state ------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        self._rest_heard()  # what the next delta then sends the others too
        now = self.core.dispatcher.clock.now()
        miners = self.core.dispatcher.scheduler.miners
        return {
            "at": iso_time(now),
            "miners": [self._row(m, now) for m in miners.values()],
            "queue": self._queue(),
            "counters": self._counters(),
            "history": list(self.points),
            "tick_seconds": TICK,
        }

    def _row(self, m: Miner, now: float) -> dict[str, Any]:
        caps = m.capabilities
        gpus = caps.get("gpus")
        gpu_list = gpus if isinstance(gpus, list) else []
        models = caps.get("models")
        done = self._done.get(m.miner_id, (0, 0))
        finished = done[0] + done[1]
        if not m.connected:
            state = "away"  # disconnected, its started jobs wait for a resume
        elif self._offline(m):
            state = "offline"
        elif m.draining:
            state = "draining"
        elif m.jobs:
            state = "busy"
        else:
            state = "idle"
        seen = self._seen.get(m.miner_id)
        if seen is None:  # first shown: a REST miner was last heard at its last call
            call = self.core.dispatcher.rest_last_call(m.miner_id) if m.rest else None
            seen = self._seen[m.miner_id] = now if call is None else call
        return {
            "miner_id": m.miner_id,
            "transport": "rest" if m.rest else "websocket",
            "region": m.region,
            "gpus": _shown_names([g.get("name", "?") for g in gpu_list if isinstance(g, dict)]),
            "vram_mb": _vram_mb(gpu_list),
            "models": _shown_names(models) if isinstance(models, list) else [],
            "slots_used": len(m.jobs),
            "slots_total": m.concurrency,
            "state": state,
            "last_seen": iso_time(seen),
            "completed": done[0],
            "failed": done[1],
            "success_rate": None if finished == 0 else round(done[0] / finished, 4),
            "load": self._load.get(m.miner_id, {}),
        }

    def _queue(self) -> dict[str, Any]:
        scheduler = self.core.dispatcher.scheduler
        groups = self._groups
        for entry in self._ungrouped.values():  # still QUEUED since the last summary
            key = entry.key
            group = groups.get(key)
            if group is None:
                groups[key] = [_needs_shown(key), 1]
            else:
                group[1] += 1
        self._ungrouped.clear()
        unservable = [
            {"constraints": c, "count": n}
            for c, n in groups.values()
            if not scheduler.is_servable(c)
        ]
        unservable.sort(key=lambda u: -int(u["count"]))
        return {
            "queued": self._queued,
            "assigned": self._assigned,
            "running": self._running,
            "unservable": sum(int(u["count"]) for u in unservable),
            "unservable_groups": unservable[:TOP_UNSERVABLE],
        }

    def _counters(self) -> dict[str, Any]:
        d = self.core.dispatcher
        stats = d.writer_statistics()
        stats["progress_dropped"] += self.progress_dropped  # the watchers' too, as in /metrics
        return {
            "events": {str(k): n for k, n in d.tally.events.items()},  # keys may be StrEnums
            "requeues": dict(d.tally.requeues),
            **stats,
            "sockets": dict(self.core.sockets),
        }

    # ---- the clock --------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Record a chart point when a second has passed; send watchers what changed."""
        point = False
        if self._last_point is None:
            self._last_point = now
        elif now - self._last_point >= 1.0:
            self._add_point(now)
            point = True
        if not self.watchers and not self._joining:
            self._new_points.clear()
            self._forget_gone()  # a new watcher starts from a snapshot
            return
        if point:
            self._rest_silences()
        delta = self._delta(now)
        if delta:
            frame = orjson.dumps({"type": "ops.delta", "at": iso_time(now), **delta}).decode()
            self.core.dispatcher.after_commit(lambda: self._send(frame))

    def _add_point(self, now: float) -> None:
        assert self._last_point is not None
        events = self.core.dispatcher.tally.events
        totals = (events.get("completed", 0), events.get("failed", 0))
        span = now - self._last_point
        lat = sorted(self._latencies)
        self._latencies = []
        queue = self._queue()
        point = {
            "t": iso_time(now),
            "completed_per_s": round((totals[0] - self._point_totals[0]) / span, 3),
            "failed_per_s": round((totals[1] - self._point_totals[1]) / span, 3),
            "dispatch_p50_ms": None if not lat else round(1000 * _percentile(lat, 0.5), 3),
            "dispatch_p99_ms": None if not lat else round(1000 * _percentile(lat, 0.99), 3),
            "queued": queue["queued"],
            "running": queue["assigned"] + queue["running"],
        }
        self._point_totals = totals
        self._last_point = now
        self.points.append(point)
        self._new_points.append(point)

    def _changed_miners(self) -> set[str]:
        """The miners that may have changed since the last call: the scheduler's, and those
        named by job events (their counts and last-seen times are kept here)."""
        changed = self.core.dispatcher.scheduler.take_changed_miners()
        changed |= self._event_miners
        self._event_miners = set()
        return changed

    def _forget_gone(self) -> None:
        """Take the changed miners (no delta will name them) and forget what was kept for the
        rows of those that are gone (taken unlooked-at by a first watcher, they stayed)."""
        miners = self.core.dispatcher.scheduler.miners
        for miner_id in self._changed_miners():
            if miner_id not in miners:
                self._forget(miner_id)
            else:
                self._gone.pop(miner_id, None)

    def _forget(self, miner_id: str) -> None:
        """A miner is gone: what its row showed goes, but its counts, kept for its return
        among the latest ``GONE_COUNTS`` gone miners'."""
        self._sent_miners.pop(miner_id, None)
        self._seen.pop(miner_id, None)
        self._load.pop(miner_id, None)
        if miner_id in self._done:
            gone = self._gone
            gone.pop(miner_id, None)
            gone[miner_id] = None
            while len(gone) > GONE_COUNTS:
                oldest = next(iter(gone))
                del gone[oldest]
                del self._done[oldest]

    def _offline(self, m: Miner) -> bool:
        """A REST miner that holds no job, has no poll waiting and made no call within the
        heartbeat timeout (``Dispatcher.rest_online``): registered, but gone quiet."""
        if not m.rest or m.jobs or not m.connected:
            return False
        d = self.core.dispatcher
        return not d.rest_online(m, d.clock.now())

    def _rest_silences(self) -> None:
        """Once a second while watched: the REST miners that went offline, or came back, by
        the clock alone (their calls and the end of a poll name no miner) are looked at in the
        next delta. A walk over the REST miners only, ``_offline`` spelt out (it is per miner:
        about 1 µs each instead of 3, measured under load)."""
        d = self.core.dispatcher
        miners = d.scheduler.miners
        sent = self._sent_miners
        since = d.clock.now() - d.rest_online_window
        for miner_id, seen in d.rest_last_calls():
            row = sent.get(miner_id)
            m = miners.get(miner_id)  # an operator's disconnect drops it, keeping its last call
            if m is not None:
                self._heard_at(miner_id, seen)
            if row and m is not None:
                offline = m.rest and m.connected and not m.jobs and not m.polls and seen < since
                if row[-1] != offline:
                    self._event_miners.add(miner_id)

    def _signature(self, miner_id: str, m: Miner) -> tuple[Any, ...]:
        """What a miner's row shows (``_row``), compared to know whether to send it again."""
        done = self._done.get(miner_id)
        return (
            m.session_id,
            # A REST miner keeps its session when it changes its capabilities or registers
            # again: compared too (the miner's own object, held: equal unless replaced).
            m.capabilities,
            m.region,
            m.rest,
            m.connected,
            m.draining,
            len(m.jobs),
            m.concurrency,
            None if done is None else tuple(done),
            self._seen.get(miner_id),
            self._load.get(miner_id),
            self._offline(m),  # last: read by _rest_silences
        )

    def _delta(self, now: float) -> dict[str, Any]:
        """What changed since the last delta: only the miners that may have changed are looked
        at (with 10,000 miners, a walk over all of them every tick was most of the feed's cost)."""
        delta: dict[str, Any] = {}
        miners = self.core.dispatcher.scheduler.miners
        changed = []
        removed = []
        for miner_id in sorted(self._changed_miners()):
            m = miners.get(miner_id)
            if m is None:
                if self._sent_miners.get(miner_id) is not None:
                    removed.append(miner_id)
                self._forget(miner_id)
                continue
            self._gone.pop(miner_id, None)
            sig = self._signature(miner_id, m)
            if self._sent_miners.get(miner_id) != sig:
                changed.append(self._row(m, now))
                self._sent_miners[miner_id] = self._signature(miner_id, m)  # _row set its seen
        if changed:
            delta["miners"] = changed
        if removed:
            delta["removed"] = removed
        queue = self._queue()
        if queue != self._sent_queue:
            delta["queue"] = self._sent_queue = queue
        counters = self._counters()
        if counters != self._sent_counters:
            delta["counters"] = self._sent_counters = counters
        if self._new_points:
            delta["points"] = self._new_points
            self._new_points = []
        return delta

    async def run(self) -> None:
        """Seed from the restored scheduler, then tick every ``TICK`` seconds until ``stop``."""
        self.seed()
        if self._stopped:
            return
        with anyio.CancelScope() as self._scope:
            while True:
                await anyio.sleep(TICK)
                self.tick(self.core.dispatcher.clock.now())

    def stop(self) -> None:
        self._stopped = True
        if self._scope is not None:
            self._scope.cancel()
