"""``/metrics``: Prometheus text format, read from the dispatcher's tallies when scraped.

Nothing here runs on the dispatch path: the dispatcher keeps plain counters and bucket arrays
(``dispatcher.stats``) and this collector turns them into metric families at scrape time. Jobs
by state are the dispatcher's ``JobCounts``: the store's counts at start-up, moved by every
committed event since (no query per scrape). An admin key is required unless
``METRICS_PUBLIC=on``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from dispatcher.stats import REQUEUE_REASONS
from protocol.types import EventKind
from storage.sql import DatabasesJobStore
from web.auth import Role
from web.http import Call, Endpoint, HTTPError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from prometheus_client.metrics_core import Metric

    from dispatcher.stats import Histogram
    from web.app import Coordinator

__all__ = ["ENDPOINTS", "CoordinatorCollector"]

JOB_STATES = ("QUEUED", "RUNNING", "COMPLETED", "FAILED", "CANCELED", "EXPIRED")


def _histogram(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    buckets = [("+Inf" if b == float("inf") else repr(float(b)), n) for b, n in h.cumulative()]
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=h.sum)


class CoordinatorCollector:
    """A prometheus_client collector over one app's Coordinator."""

    def __init__(self, core: Coordinator) -> None:
        self.core = core

    def collect(self) -> Iterator[Metric]:
        core = self.core
        yield GaugeMetricFamily(
            "aitbc_standby",
            "1 while this coordinator is a standby waiting for the database",
            value=int(core.standby),
        )
        yield GaugeMetricFamily(
            "aitbc_ready", "1 while it serves (/health/ready is 200)", value=int(core.serving)
        )
        if core.standby:
            return  # the rest would describe a dispatcher that has restored nothing yet
        d = core.dispatcher
        stats = d.statistics()
        jobs = GaugeMetricFamily("aitbc_jobs", "Jobs by state (committed)", labels=["state"])
        counts = d.job_counts.by_state  # kept from committed events: no query per scrape
        for state in JOB_STATES:
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs
        events = CounterMetricFamily(
            "aitbc_job_events", "Committed job events since start, by kind", labels=["event"]
        )
        for kind in EventKind:
            events.add_metric([kind.value], d.tally.events.get(kind.value, 0))
        yield events
        yield _histogram(
            "aitbc_job_submit_to_assign_seconds",
            "Time from submit to the first assignment",
            d.tally.assign_latency,
        )
        yield _histogram(
            "aitbc_job_submit_to_complete_seconds",
            "Time from submit to completion",
            d.tally.complete_latency,
        )
        requeues = CounterMetricFamily(
            "aitbc_job_requeues", "Jobs put back in the queue, by reason", labels=["reason"]
        )
        for reason in REQUEUE_REASONS:
            requeues.add_metric([reason], d.tally.requeues.get(reason, 0))
        yield requeues
        if core.commit_stalled() is None:  # else answered without waiting: see ``metrics``
            yield from self._miners()
        sockets = GaugeMetricFamily("aitbc_sockets_open", "Open WebSockets", labels=["role"])
        for role in Role:  # counted as connections open and close: no walk over them
            sockets.add_metric([role.value], self.core.sockets[role.value])
        yield sockets
        yield _histogram("aitbc_writer_batch_size", "Writes per group commit", d.batch_sizes)
        yield _histogram(
            "aitbc_writer_commit_seconds", "Duration of one group commit", d.commit_seconds
        )
        yield GaugeMetricFamily(
            "aitbc_writer_pending", "Writes waiting for the next commit", value=stats.pending_writes
        )
        store = d.store
        if isinstance(store, DatabasesJobStore):
            yield GaugeMetricFamily(
                "aitbc_store_wal_frames",
                "Frames in the SQLite WAL at the last checkpoint",
                value=store.wal_frames,
            )
            yield CounterMetricFamily(
                "aitbc_store_wal_restarts",
                "Checkpoints that held commits so that the WAL would restart",
                value=store.wal_restarts,
            )
            yield CounterMetricFamily(
                "aitbc_store_lock_waits",
                "Commits that waited for another process's write lock on the database",
                value=store.lock_waits,
            )
        yield CounterMetricFamily(
            "aitbc_jobs_deleted",
            "Ended jobs deleted with their events since start (JOB_RETENTION_DAYS)",
            value=d.jobs_deleted,
        )
        yield CounterMetricFamily(
            "aitbc_progress_dropped",
            "Progress events coalesced or dropped under backpressure (client and ops sockets)",
            value=stats.progress_dropped + self.core.ops.progress_dropped,
        )

    def _miners(self) -> Iterator[Metric]:
        """The scheduler's miners: in-memory state that runs ahead of the store by the batches
        in flight (a miner whose hello is being committed)."""
        miners = self.core.dispatcher.rest_miners()
        yield GaugeMetricFamily(
            "aitbc_miners_online", "Miners online", value=sum(1 for m in miners if m.online)
        )
        yield GaugeMetricFamily(
            "aitbc_miners_busy",
            "Online miners running at least one job",
            value=sum(1 for m in miners if m.online and m.inflight),
        )
        # Of the online miners, as the ops page's header: a polling miner gone quiet stays
        # registered (until it deregisters), and its slots are no capacity.
        slots = GaugeMetricFamily("aitbc_miner_slots", "Slots of online miners", labels=["use"])
        slots.add_metric(["used"], sum(m.inflight for m in miners if m.online))
        slots.add_metric(["total"], sum(m.concurrency for m in miners if m.online))
        yield slots


def registry_for(core: Coordinator) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CoordinatorCollector(core))
    return registry


async def metrics(call: Call) -> Response:
    core = call.core
    if not core.settings.metrics_public:
        token = core.auth.token_from_headers(call.request.headers)
        principal = None if token is None else core.auth.from_token(token)
        if principal is None:
            if token is None:
                detail = "Authentication required"
            else:
                detail = core.auth.unknown_detail(call.request.headers)
            raise HTTPError(401, detail, {"WWW-Authenticate": "Bearer"})
        if not principal.acts_as(Role.ADMIN):
            raise HTTPError(403, "Forbidden")
    stalled = not core.standby and core.commit_stalled() is not None
    body = generate_latest(core.metrics)
    if not core.standby and not stalled:
        # Miners and slots are the scheduler's: answered once committed. While a commit
        # hangs, waiting would hide the stall from the scraper (its timeout, not aitbc_ready
        # 0): the body leaves those series out and everything else in it is committed.
        body = await core.dispatcher.committed(body)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


ENDPOINTS = [
    Endpoint(
        "GET",
        ("/metrics",),
        metrics,
        "Prometheus metrics",
        "ops",
        description="Prometheus text format (docs/ops.md#metrics). Needs an admin key unless "
        "METRICS_PUBLIC=on. A standby answers it too, with aitbc_standby 1 and aitbc_ready 0 "
        "only. While a commit has been under way for over 10 s (aitbc_ready 0) it answers "
        "without waiting for it and without the miner series.",
        responses={
            200: ("Prometheus text exposition format", None),
            401: ("missing or unknown credential (METRICS_PUBLIC=off)", "Error"),
            403: ("credential of another role (METRICS_PUBLIC=off)", "Error"),
            503: ("the coordinator is stopping: a commit failed", "Error"),
        },
        standby=True,
        optional_auth=True,
    ),
]
