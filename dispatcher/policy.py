"""Matching policy and the two indexes that make dispatch O(classes), not O(miners).

Rule 1: ``matches`` implements rest-api.md §3.3 (region, gpu, min_vram_gb, cuda, models,
max_price); reputation and bonds are not part of it.
Rule 2: miners with the same matching-relevant capabilities form one *class*; jobs with the
same constraints form one class. A job looks only at the heads of idle-miner classes, a freed
miner only at the heads of job classes, and class-pair verdicts are memoised. No operation
scans all miners or all jobs.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from operator import attrgetter
from typing import TYPE_CHECKING, Any, ClassVar

from protocol.codec import dumps_sorted, trimmed
from protocol.types import finite_number

if TYPE_CHECKING:
    from collections.abc import Callable

    from protocol.types import JSONObject

__all__ = ["Capabilities", "IdleIndex", "JobNeeds", "JobQueue", "MatchCache", "matches"]


# The compared fields of each class, as one getter returning their tuple (built on first use).
_COMPARED: dict[type, Callable[[Any], tuple[Any, ...]]] = {}


def _field_hash(value: Capabilities | JobNeeds) -> int:
    get = _COMPARED.get(type(value))
    if get is None:
        names = [f.name for f in fields(value) if f.compare]
        get = _COMPARED[type(value)] = attrgetter(*names)  # several names: a tuple
    return hash(get(value))


@dataclass(frozen=True, slots=True)
class Capabilities:
    """The matching-relevant part of a miner's advertised capabilities (hashable)."""

    region: str | None
    gpu_names: frozenset[str]
    vram_mb: float
    cuda: str
    models: frozenset[str]
    price: float | None
    # Both classes key the matching indexes and memos, hashed several times per job: the
    # hash of the fields is computed once.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", _field_hash(self))

    def __hash__(self) -> int:
        return self._hash

    # Parsed classes by their sorted JSON and region, as for ``JobNeeds``: a fleet's miners
    # mostly advertise a few shapes, and every hello parses one. Only small documents are
    # kept (a hello may carry up to a frame of them), and none with a ``null``: orjson writes
    # NaN and infinities (which no JSON input holds, but a caller's dict may) as ``null`` too.
    _parsed: ClassVar[dict[tuple[bytes, str | None], Capabilities]] = {}
    _MAX_KEPT: ClassVar[int] = 2048

    @classmethod
    def parse(cls, capabilities: JSONObject, region: str | None) -> Capabilities:
        if not capabilities and region is None:
            return _NO_CAPABILITIES
        key = (dumps_sorted(capabilities), region)
        caps = cls._parsed.get(key)  # never holds a key with ``null`` (see above)
        if caps is None:
            caps = cls._parse(capabilities, region)
            if 0 < len(key[0]) <= cls._MAX_KEPT and b"null" not in key[0]:  # empty: no JSON
                if len(cls._parsed) >= 4096:
                    cls._parsed.clear()
                cls._parsed[trimmed(key[0]), region] = caps
        return caps

    @classmethod
    def _parse(cls, capabilities: JSONObject, region: str | None) -> Capabilities:
        gpus = capabilities.get("gpus")
        gpus = [g for g in gpus if isinstance(g, dict)] if isinstance(gpus, list) else []
        names = frozenset(str(g["name"]) for g in gpus if g.get("name") is not None)
        vram = max((finite_number(g.get("memory_mb")) or 0.0 for g in gpus), default=0.0)
        models = capabilities.get("models")
        models = frozenset(str(m) for m in models) if isinstance(models, list) else frozenset()
        cuda = capabilities.get("cuda")
        return cls(
            region=region if region is not None else _opt_str(capabilities.get("region")),
            gpu_names=names,
            vram_mb=vram,
            cuda="" if cuda is None else str(cuda),
            models=models,
            price=finite_number(capabilities.get("price")),
        )

    @property
    def unit_price(self) -> float | None:
        return self.price


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


_NO_CAPABILITIES = Capabilities._parse({}, None)  # a miner's before its hello, and ``{}``'s


@dataclass(frozen=True, slots=True)
class JobNeeds:
    """The matching-relevant part of a job's constraints (hashable)."""

    region: str | None = None
    gpu: str | None = None
    min_vram_gb: float | None = None
    cuda: str | None = None
    models: frozenset[str] = frozenset()
    max_price: float | None = None
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", _field_hash(self))

    def __hash__(self) -> int:
        return self._hash

    # Parsed classes by their constraints' sorted JSON: jobs mostly repeat a few shapes, and
    # one shared instance per shape also makes the MatchCache's keys cheap to compare.
    _parsed: ClassVar[dict[bytes, JobNeeds]] = {}

    @classmethod
    def parse(cls, constraints: JSONObject) -> JobNeeds:
        if not constraints:
            return _ANY
        key = dumps_sorted(constraints)
        needs = cls._parsed.get(key)
        if needs is None:
            needs = cls._parse(constraints)
            # Empty when orjson cannot represent it; and only small documents are kept, as for
            # capabilities: a client chooses its constraints, unknown keys included, and 4,096
            # kept keys of a frame each would be gigabytes. Others are parsed every time.
            if 0 < len(key) <= Capabilities._MAX_KEPT:
                if len(cls._parsed) >= 4096:
                    cls._parsed.clear()
                cls._parsed[trimmed(key)] = needs
        return needs

    @classmethod
    def _parse(cls, constraints: JSONObject) -> JobNeeds:
        models = constraints.get("models")
        return cls(
            region=_opt_str(constraints.get("region")),
            gpu=_opt_str(constraints.get("gpu")),
            min_vram_gb=finite_number(constraints.get("min_vram_gb")),
            cuda=_opt_str(constraints.get("cuda")),
            models=frozenset(str(m) for m in models) if isinstance(models, list) else frozenset(),
            max_price=finite_number(constraints.get("max_price")),
        )


_ANY = JobNeeds()


def matches(needs: JobNeeds, caps: Capabilities) -> bool:
    """True when a miner with ``caps`` satisfies every constraint of ``needs`` (§3.3)."""
    if needs.region is not None and caps.region != needs.region:
        return False
    if needs.gpu is not None and needs.gpu not in caps.gpu_names:
        return False
    if needs.min_vram_gb is not None and caps.vram_mb < needs.min_vram_gb * 1024:
        return False
    if needs.cuda is not None and needs.cuda not in caps.cuda:
        return False
    if not needs.models <= caps.models:
        return False
    return needs.max_price is None or (caps.price is not None and caps.price <= needs.max_price)


class MatchCache:
    """Memoised ``matches`` per (job class, miner class) pair, bounded."""

    def __init__(self, limit: int = 100_000) -> None:
        self._cache: dict[tuple[JobNeeds, Capabilities], bool] = {}
        self._limit = limit

    def __call__(self, needs: JobNeeds, caps: Capabilities) -> bool:
        key = (needs, caps)
        hit = self._cache.get(key)
        if hit is None:
            if len(self._cache) >= self._limit:
                self._cache.clear()
            hit = self._cache[key] = matches(needs, caps)
        return hit


class IdleIndex:
    """Miners with at least one free slot, grouped by capability class, oldest-free first.

    A heap holds each class's longest-waiting miner (its stamp), so a pick visits classes
    oldest first and stops at the first one that can take the job: miners that advertise
    their own price make a class each, and a pick that looked at every idle class cost
    milliseconds per job with thousands of idle miners.
    """

    def __init__(self, match: MatchCache) -> None:
        self._match = match
        self._classes: dict[Capabilities, OrderedDict[str, int]] = {}
        self._where: dict[str, Capabilities] = {}
        self._stamp = 0
        # (stamp of a class's first member, class), plus stale pairs (that member has left,
        # or the class is gone) dropped when they come to the top. Stamps are unique.
        self._heads: list[tuple[int, Capabilities]] = []

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, miner_id: str) -> bool:
        return miner_id in self._where

    def add(self, miner_id: str, caps: Capabilities) -> None:
        """Insert, or move to the back (it was just given work or just freed)."""
        self.discard(miner_id)
        self._stamp += 1
        members = self._classes.get(caps)
        if members is None:
            members = self._classes[caps] = OrderedDict()
            heapq.heappush(self._heads, (self._stamp, caps))
        members[miner_id] = self._stamp
        self._where[miner_id] = caps
        if len(self._heads) > 2 * len(self._classes) + _STALE_SLACK:  # mostly stale pairs
            self._heads = [(next(iter(m.values())), c) for c, m in self._classes.items()]
            heapq.heapify(self._heads)

    def discard(self, miner_id: str) -> None:
        caps = self._where.pop(miner_id, None)
        if caps is not None:
            members = self._classes[caps]
            first = next(iter(members)) == miner_id
            del members[miner_id]
            if not members:
                del self._classes[caps]
            elif first:  # the next one has waited longest now
                heapq.heappush(self._heads, (next(iter(members.values())), caps))

    def pick(self, needs: JobNeeds, exclude: set[str]) -> str | None:
        """The matching miner that has waited longest; None when no idle miner matches."""
        heads, classes = self._heads, self._classes
        aside: list[tuple[int, Capabilities]] = []  # classes that cannot take it, put back
        best: tuple[int, str] | None = None
        while heads and (best is None or heads[0][0] < best[0]):
            stamp, caps = heads[0]
            members = classes.get(caps)
            if members is None or next(iter(members.values())) != stamp:
                heapq.heappop(heads)  # stale
                continue
            if not self._match(needs, caps):
                if len(aside) == _ASIDE_LIMIT:
                    for pair in aside:
                        heapq.heappush(heads, pair)
                    return self._scan(needs, exclude)
                aside.append(heapq.heappop(heads))
                continue
            if not exclude:
                best = (stamp, next(iter(members)))
                break
            aside.append(heapq.heappop(heads))  # its first member may have refused the job
            for miner_id, member_stamp in members.items():
                if miner_id not in exclude:
                    if best is None or member_stamp < best[0]:
                        best = (member_stamp, miner_id)
                    break
        for pair in aside:
            heapq.heappush(heads, pair)
        return None if best is None else best[1]

    def _scan(self, needs: JobNeeds, exclude: set[str]) -> str | None:
        """``pick`` by one pass over the idle classes (many of them cannot take the job)."""
        best: tuple[int, str] | None = None
        for caps, members in self._classes.items():
            if best is not None and next(iter(members.values())) > best[0]:
                continue
            if not self._match(needs, caps):
                continue
            for miner_id, stamp in members.items():
                if miner_id not in exclude:
                    if best is None or stamp < best[0]:
                        best = (stamp, miner_id)
                    break
        return None if best is None else best[1]


# (-priority, order, token, job_id): higher priority first, then submission order (FIFO).
_Entry = tuple[int, int, int, str]
# Classes a pick may set aside (ones the freed miner cannot take) before it scans instead.
_ASIDE_LIMIT = 32
# Stale (head, class) pairs a heads heap may hold beyond two per class before it is rebuilt.
_STALE_SLACK = 1024


def _first_acceptable(heap: list[_Entry], valid: Any, rejected: Any) -> _Entry | None:
    """The least live entry of ``heap`` the miner did not refuse, by a best-first walk of the
    heap's tree from its root: it looks only at entries less than the answer and their
    children, not at the whole class (a refused job at the front of a long queue)."""
    frontier = [(heap[0], 0)]
    size = len(heap)
    while frontier:
        entry, i = heapq.heappop(frontier)
        if valid(entry[3], entry[2]) and not rejected(entry[3]):
            return entry
        for child in (2 * i + 1, 2 * i + 2):
            if child < size:
                heapq.heappush(frontier, (heap[child], child))
    return None


def _remove(heap: list[_Entry], entry: _Entry) -> None:
    """Remove ``entry`` from ``heap``: found by a walk that skips every subtree whose root is
    greater (so it looks at the entries less than it, as ``_first_acceptable`` did), then
    replaced by the last entry, sifted into place (heapq's own sift steps, the standard
    recipe)."""
    stack = [0]
    while stack:
        i = stack.pop()
        if heap[i] == entry:
            last = heap.pop()
            if i < len(heap):
                heap[i] = last
                heapq._siftup(heap, i)  # type: ignore[attr-defined]
                heapq._siftdown(heap, 0, i)  # type: ignore[attr-defined]
            return
        if heap[i] < entry:
            stack.extend(child for child in (2 * i + 1, 2 * i + 2) if child < len(heap))


class JobQueue:
    """Queued jobs grouped by constraint class; a heap per class with lazy deletion, and a
    heap of the classes by their heads, so that a freed miner's pick visits classes best head
    first and stops at the first one it can take: jobs with per-job constraints (a budget in
    ``max_price``, say) make a class each, and a pick that looked at every class cost
    milliseconds per job with thousands of them.

    A class no known miner can take (``servable`` says so) is set dormant when a pick meets
    it: its head leaves ``_heads`` until ``wake`` (a new class of miner is known), so picks do
    not step over a backlog nobody can run.

    ``valid(job_id, token)`` tells whether an entry is still live (the job is QUEUED and was
    not re-pushed since); the owner passes it in so the queue keeps no job state itself.
    """

    def __init__(self, match: MatchCache, servable: Callable[[JobNeeds], bool]) -> None:
        self._match = match
        self._servable = servable
        self._dormant: set[JobNeeds] = set()
        self._classes: dict[JobNeeds, list[_Entry]] = {}
        # (head, class) for the current head of every class, plus stale pairs (the class's
        # head has changed since, or the class is gone) dropped when they come to the top.
        # Entries are unique, so a pair never compares its JobNeeds.
        self._heads: list[tuple[_Entry, JobNeeds]] = []

    def push(self, needs: JobNeeds, priority: int, order: int, token: int, job_id: str) -> None:
        entry = (-priority, order, token, job_id)
        heap = self._classes.get(needs)
        if heap is None:
            self._classes[needs] = [entry]
        else:
            heapq.heappush(heap, entry)
            if heap[0] is not entry or needs in self._dormant:
                return
        heapq.heappush(self._heads, (entry, needs))
        if len(self._heads) > 2 * len(self._classes) + _STALE_SLACK:  # mostly stale pairs
            self._heads = [(h[0], n) for n, h in self._classes.items() if n not in self._dormant]
            heapq.heapify(self._heads)

    def wake(self) -> None:
        """A new class of miner is known: dormant classes may match it."""
        for needs in self._dormant:  # each has entries: _pop_head forgets an emptied class
            heapq.heappush(self._heads, (self._classes[needs][0], needs))
        self._dormant.clear()

    def classes(self) -> list[JobNeeds]:
        return list(self._classes)

    def pick(self, caps: Capabilities, valid: Any, rejected: Any) -> tuple[JobNeeds, _Entry] | None:
        """Best live entry any class matching ``caps`` offers, without removing it.

        Args:
            caps: the freed miner's class.
            valid: ``(job_id, token) -> bool``.
            rejected: ``job_id -> bool``, true when this miner already refused the job.
        """
        heads, classes = self._heads, self._classes
        aside: list[tuple[_Entry, JobNeeds]] = []  # pairs this miner cannot take, put back
        best: _Entry | None = None
        best_needs: JobNeeds | None = None
        while heads and (best is None or heads[0][0] < best):
            entry, needs = heads[0]
            heap = classes.get(needs)
            if heap is None or heap[0] is not entry:
                heapq.heappop(heads)  # stale
            elif not self._match(needs, caps):
                if not self._servable(needs):
                    heapq.heappop(heads)
                    self._dormant.add(needs)
                    continue
                if len(aside) == _ASIDE_LIMIT:  # many classes ahead it cannot take: scan
                    for pair in aside:
                        heapq.heappush(heads, pair)
                    return self._scan(caps, valid, rejected)
                aside.append(heapq.heappop(heads))
            elif not valid(entry[3], entry[2]):
                heapq.heappop(heads)
                self._pop_head(needs, heap)
            elif rejected(entry[3]):
                aside.append(heapq.heappop(heads))
                found = _first_acceptable(heap, valid, rejected)
                if found is not None and (best is None or found < best):
                    best, best_needs = found, needs
            else:  # nothing after it in ``heads`` is better
                best, best_needs = entry, needs
                break
        for pair in aside:
            heapq.heappush(heads, pair)
        return None if best is None or best_needs is None else (best_needs, best)

    def _scan(
        self, caps: Capabilities, valid: Any, rejected: Any
    ) -> tuple[JobNeeds, _Entry] | None:
        """``pick`` by one pass over the classes, for when many classes ahead in ``_heads``
        are ones this miner cannot take (say, a backlog no connected miner matches, a class
        per job). A class whose head cannot beat the best found so far costs one comparison.
        """
        best: _Entry | None = None
        best_needs: JobNeeds | None = None
        dormant = self._dormant
        for needs, heap in list(self._classes.items()):
            if (best is not None and heap[0] > best) or needs in dormant:
                continue
            if not self._match(needs, caps):
                continue
            while not valid(heap[0][3], heap[0][2]):
                self._pop_head(needs, heap)
                if not heap:
                    break
            if not heap:
                continue
            entry = heap[0]
            if rejected(entry[3]):
                found = _first_acceptable(heap, valid, rejected)
                if found is None:
                    continue
                entry = found
            if best is None or entry < best:
                best, best_needs = entry, needs
        return None if best is None or best_needs is None else (best_needs, best)

    def compact(self, valid: Callable[[str, int], bool]) -> None:
        """Drop every entry that is no longer live (``valid``). A pick drops a stale entry only
        once it is the head of its class, and no pick looks at a class no miner matches: the
        entries of the jobs that ended there (canceled, expired) would stay for good."""
        classes: dict[JobNeeds, list[_Entry]] = {}
        for needs, heap in self._classes.items():
            live = [entry for entry in heap if valid(entry[3], entry[2])]
            if live:
                heapq.heapify(live)
                classes[needs] = live
        self._classes = classes
        self._dormant = {needs for needs in self._dormant if needs in classes}
        self._heads = [(h[0], n) for n, h in classes.items() if n not in self._dormant]
        heapq.heapify(self._heads)

    def remove(self, needs: JobNeeds, entry: _Entry) -> None:
        heap = self._classes.get(needs)
        if heap is None:
            return
        if heap[0] == entry:
            self._pop_head(needs, heap)
        else:  # an entry below a head the miner refused
            _remove(heap, entry)

    def _pop_head(self, needs: JobNeeds, heap: list[_Entry]) -> None:
        """Drop a class's head; the next entry becomes its head (the old pair goes stale)."""
        heapq.heappop(heap)
        if not heap:
            del self._classes[needs]
            self._dormant.discard(needs)
        elif needs not in self._dormant:
            heapq.heappush(self._heads, (heap[0], needs))
