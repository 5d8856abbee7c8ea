"""Bounded per-connection outboxes and the job-event fan-out to subscribers.

Rule 1: publishing never blocks and never grows memory without bound. Each connection has an
``Outbox`` with a soft and a hard limit, in frames and (optionally) in characters. Past the
soft limit, ``progress`` frames for a job replace that job's still-unsent progress frame
(coalescing) or are dropped; every other frame is kept. Past the hard limit the connection is
closed 4429 (too slow). Frames held back
while a job replays (``Subscriber.buffers``) coalesce their progress past the soft limit too.
Rule 2: a frame is encoded once and the same ``str`` is queued for every recipient.
Rule 3: a socket is sent each event of a job once, unless its client asks again for events it
was sent: a replay first takes that job's events still queued unsent out of the outbox
(``Outbox.withdraw``), then queues them again in order (docs/protocol.md, subscribe).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import anyio

from protocol.types import CloseCode

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping
    from typing import Any

__all__ = ["Fanout", "Outbox", "Subscriber"]


def _closed(code: CloseCode, reason: str) -> None:
    """``Outbox._on_overflow`` once closed: never called (a closed outbox takes no frames)."""


class Outbox:
    """Frames waiting to be written to one socket."""

    def __init__(
        self,
        on_overflow: Callable[[CloseCode, str], None],
        *,
        soft_limit: int = 256,
        hard_limit: int = 4096,
        hard_chars: int | None = None,
    ) -> None:
        # Each entry: [frame, job_id, seq]; the job's event ``seq`` (0: not a job event, or
        # one no replay withdraws). Lists, not objects: a put is on every frame's path.
        self._frames: deque[list[Any]] = deque()
        # The characters queued, bounded by ``hard_chars`` (half of it is the soft bound): a
        # frame can be megabytes (a JobView, a result and its receipt), and 4096 of them were
        # held for a peer that read nothing.
        self._chars = 0
        self.hard_chars = hard_chars
        self._progress: dict[str, list[Any]] = {}
        # Made by a ``take`` that waits: an idle socket's outbox (most of them) has none.
        self._wake: anyio.Event | None = None
        self._taken: anyio.Event | None = None  # made by ``drained`` when it waits
        self._on_overflow = on_overflow
        self.soft_limit = soft_limit
        self.hard_limit = hard_limit
        self.closed = False
        self.dropped = 0
        # Set by a connection that can write synchronously: while nothing is queued, ``put``
        # offers the frame to it first; ``False`` (flow control, closing) queues it as usual.
        self.direct: Callable[[str], bool] | None = None

    def __len__(self) -> int:
        return len(self._frames)

    def put(
        self, frame: str, *, job_id: str | None = None, progress: bool = False, seq: int = 0
    ) -> None:
        """Queue a frame; ``progress`` marks a droppable progress frame of ``job_id``; ``seq``
        the job event it carries (``withdraw``)."""
        if self.closed:
            return
        if self.direct is not None and not self._frames and self.direct(frame):
            return
        n = len(self._frames)
        size = len(frame)
        chars = self.hard_chars
        heavy = chars is not None and self._chars + size > chars // 2
        if progress and job_id is not None and (n >= self.soft_limit or heavy):
            pending = self._progress.get(job_id)
            if pending is not None:
                self._chars += size - len(pending[0])
                pending[0] = frame  # coalesce: the newest replaces the unsent one
                pending[2] = seq
                self.dropped += 1
                return
            if n >= self.hard_limit // 2 or heavy:
                self.dropped += 1
                return
        if n >= self.hard_limit or (n and chars is not None and self._chars + size > chars):
            self.closed = True
            self._set_wake()
            self._on_overflow(CloseCode.TOO_SLOW, "outbound queue overflow")
            return
        entry = [frame, job_id, seq]
        self._frames.append(entry)
        self._chars += size
        if job_id is not None:
            if progress:
                self._progress[job_id] = entry
            else:  # a later progress frame must not jump over this one
                self._progress.pop(job_id, None)
        self._set_wake()

    def withdraw(self, after: Mapping[str, int]) -> int:
        """Take the queued, unsent events of each job of ``after`` with a seq past its value
        out of the outbox (a replay queues them again, in order); returns how many. One pass
        whatever the number of jobs (a subscribe names up to 1000). Not drops: they are not
        counted in ``dropped``."""
        frames = self._frames
        if not after or not frames:
            return 0
        # A frame that is no job event (seq 0) or of another job is kept: get() gives its seq.
        kept = deque(e for e in frames if e[2] <= after.get(e[1], e[2]))
        removed = len(frames) - len(kept)
        if removed:
            self._frames = kept
            self._chars = sum(len(e[0]) for e in kept)
            for job_id, seq in after.items():
                pending = self._progress.get(job_id)
                if pending is not None and pending[2] > seq:  # withdrawn: coalesce into none
                    del self._progress[job_id]
            self._set_taken()
        return removed

    def take_nowait(self) -> list[str]:
        frames = [e[0] for e in self._frames]
        self._frames.clear()
        self._chars = 0
        self._progress.clear()
        self._set_taken()
        return frames

    async def take(self) -> list[str]:
        """Wait for at least one frame, then return all queued frames (empty when closed)."""
        while not self._frames and not self.closed:
            self._wake = anyio.Event()
            await self._wake.wait()
        return self.take_nowait()

    def has_room(self, below: int, size: int) -> bool:
        """Whether fewer than ``below`` frames are queued and a frame of ``size`` characters
        leaves half of ``hard_chars`` free (always, into an empty outbox): what a producer that
        must not drop frames (a replay) may add without crowding out live frames."""
        if len(self._frames) >= below:
            return False
        chars = self.hard_chars
        return chars is None or not self._frames or self._chars + size <= chars // 2

    async def drained(self, below: int, size: int = 0) -> None:
        """Wait until ``has_room(below, size)`` (the writer took frames) or the outbox is
        closed: a producer that must not drop frames (a replay) waits for the peer."""
        while not self.has_room(below, size) and not self.closed:
            if self._taken is None:
                self._taken = anyio.Event()
            await self._taken.wait()

    def close(self) -> None:
        self.closed = True
        # A closed outbox takes no more frames: drop the callbacks, which are the owning
        # connection's methods (a reference cycle only the collector would free).
        self.direct = None
        self._on_overflow = _closed
        self._set_wake()
        self._set_taken()

    def _set_wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _set_taken(self) -> None:
        if self._taken is not None:
            self._taken.set()
            self._taken = None


class Subscriber:
    """One client connection's subscriptions: explicit job ids and/or all its own jobs."""

    __slots__ = ("all", "buffers", "client_id", "job_ids", "muted", "outbox")

    def __init__(self, client_id: str, outbox: Outbox) -> None:
        self.client_id = client_id
        self.outbox = outbox
        self.job_ids: set[str] = set()
        self.all = False
        self.muted: set[str] = set()  # jobs unsubscribed by name while following "all"
        # job id -> (last replayed seq, live frames held back while replaying)
        self.buffers: dict[str, list[tuple[int, str, bool]]] = {}

    def deliver(self, job_id: str, seq: int, frame: str, progress: bool) -> None:
        buffer = self.buffers.get(job_id)
        if buffer is None:
            self.outbox.put(frame, job_id=job_id, progress=progress, seq=seq)
        elif progress and len(buffer) >= self.outbox.soft_limit and buffer[-1][2]:
            # Held while the job replays (which may wait for a stalled socket): past the soft
            # limit, progress coalesces as in the outbox, or it would be held without bound.
            buffer[-1] = (seq, frame, progress)
            self.outbox.dropped += 1
        else:
            buffer.append((seq, frame, progress))


class Fanout:
    """Routes committed job events to the subscribers of the job and of its client."""

    def __init__(self) -> None:
        self._by_job: dict[str, set[Subscriber]] = {}
        self._by_client: dict[str, set[Subscriber]] = {}
        # Every subscriber that followed something and has not left: its drops count while it
        # is open, also once it follows nothing (the total must never go down).
        self._members: set[Subscriber] = set()
        self._dropped_before = 0

    def subscribe(self, sub: Subscriber, job_ids: Iterable[str]) -> None:
        self._members.add(sub)
        for job_id in job_ids:
            sub.job_ids.add(job_id)
            sub.muted.discard(job_id)
            self._by_job.setdefault(job_id, set()).add(sub)

    def subscribe_all(self, sub: Subscriber) -> None:
        self._members.add(sub)
        sub.all = True
        self._by_client.setdefault(sub.client_id, set()).add(sub)

    def unsubscribe(
        self,
        sub: Subscriber,
        job_ids: Iterable[str] | None = None,
        *,
        live: Callable[[str], bool] | None = None,
    ) -> None:
        """Drop the given subscriptions, or all of them (``None``). ``live(job_id)``: whether
        the job can still have events (only those need muting while following "all")."""
        targets = list(sub.job_ids) if job_ids is None else list(job_ids)
        if job_ids is not None and sub.all:
            # Else the client route would still deliver them.
            sub.muted.update(targets if live is None else filter(live, targets))
        for job_id in targets:
            sub.job_ids.discard(job_id)
            subs = self._by_job.get(job_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._by_job[job_id]
        if job_ids is None:  # the subscriber is leaving: keep its drop count in the total
            self._members.discard(sub)
            self._dropped_before += sub.outbox.dropped
            sub.outbox.dropped = 0
        if job_ids is None and sub.all:
            sub.all = False
            sub.muted.clear()
            subs = self._by_client.get(sub.client_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._by_client[sub.client_id]

    def publish(self, client_id: str, job_id: str, seq: int, frame: str, progress: bool) -> None:
        for sub in self._by_job.get(job_id, ()):
            sub.deliver(job_id, seq, frame, progress)
        for sub in self._by_client.get(client_id, ()):
            if job_id not in sub.job_ids and job_id not in sub.muted:
                sub.deliver(job_id, seq, frame, progress)

    def forget_job(self, job_id: str, client_id: str | None = None) -> None:
        """A terminal job's live subscriptions end (replay stays available from the store);
        the sockets of its client that follow "all" no longer need to mute it."""
        for sub in self._by_job.pop(job_id, ()):
            sub.job_ids.discard(job_id)
        if client_id is not None:
            for sub in self._by_client.get(client_id, ()):
                sub.muted.discard(job_id)

    @property
    def progress_dropped(self) -> int:
        """Progress frames coalesced or dropped under backpressure, since start."""
        return self._dropped_before + sum(sub.outbox.dropped for sub in self._members)

    def _subscribers(self) -> set[Subscriber]:
        return {s for subs in (*self._by_job.values(), *self._by_client.values()) for s in subs}

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers())
