"""Ring 2: matching (rest-api.md §3.3) and the idle-miner / queued-job indexes."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import example, given, settings, strategies as st

from dispatcher import policy
from dispatcher.policy import Capabilities, IdleIndex, JobNeeds, JobQueue, MatchCache, matches

if TYPE_CHECKING:
    from collections.abc import Iterator

CAPS: dict[str, Any] = {
    "gpus": [{"name": "RTX 4090", "memory_mb": 24576}, {"name": "A100", "memory_mb": 81920}],
    "cuda": 12.2,
    "models": ["llama3", "whisper"],
    "price": 0.5,
}


def caps(
    capabilities: dict[str, Any] | None = None, region: str | None = "eu-west"
) -> Capabilities:
    return Capabilities.parse(CAPS if capabilities is None else capabilities, region)


def needs(**constraints: Any) -> JobNeeds:
    return JobNeeds.parse(constraints)


# ---- matches() ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("constraints", "expected"),
    [
        # region: exact equality with the miner's top-level region
        ({"region": "eu-west"}, True),
        ({"region": "eu"}, False),
        ({"region": "EU-WEST"}, False),
        # gpu: exact name equality with some gpus[].name
        ({"gpu": "A100"}, True),
        ({"gpu": "RTX 4090"}, True),
        ({"gpu": "A10"}, False),
        ({"gpu": "a100"}, False),
        # min_vram_gb: some gpus[].memory_mb >= min_vram_gb * 1024
        ({"min_vram_gb": 80}, True),
        ({"min_vram_gb": 80.0001}, False),
        ({"min_vram_gb": "24"}, True),
        ({"min_vram_gb": 81}, False),
        # cuda: constraint is a substring of str(cuda)
        ({"cuda": "12"}, True),
        ({"cuda": "12.2"}, True),
        ({"cuda": ".2"}, True),
        ({"cuda": "12.3"}, False),
        ({"cuda": "11"}, False),
        # models: subset of capabilities.models
        ({"models": []}, True),
        ({"models": ["llama3"]}, True),
        ({"models": ["llama3", "whisper"]}, True),
        ({"models": ["llama3", "sdxl"]}, False),
        # max_price: price must exist and be <= max_price
        ({"max_price": 0.5}, True),
        ({"max_price": 1}, True),
        ({"max_price": 0.49}, False),
        # all at once
        (
            {
                "region": "eu-west",
                "gpu": "A100",
                "min_vram_gb": 40,
                "cuda": "12",
                "models": ["whisper"],
                "max_price": 0.5,
            },
            True,
        ),
        (
            {
                "region": "eu-west",
                "gpu": "A100",
                "min_vram_gb": 40,
                "cuda": "12",
                "models": ["whisper"],
                "max_price": 0.4,
            },
            False,
        ),
        # unconstrained
        ({}, True),
    ],
)
def test_matches_each_constraint(constraints: dict[str, Any], expected: bool) -> None:
    """Each §3.3 constraint against a fixed miner: region, gpu, vram, cuda, models, price."""
    assert matches(needs(**constraints), caps()) is expected


def test_unconstrained_job_matches_empty_capabilities() -> None:
    """A job with no constraints matches a miner that advertises nothing."""
    assert matches(needs(), caps({}, None))


@pytest.mark.parametrize(
    "constraints",
    [
        {"region": "eu-west"},
        {"gpu": "A100"},
        {"min_vram_gb": 1},
        {"cuda": "12"},
        {"models": ["llama3"]},
        {"max_price": 100},
    ],
)
def test_any_constraint_fails_on_empty_capabilities(constraints: dict[str, Any]) -> None:
    """No gpus, no cuda, no models, no price and no region: every constraint fails."""
    assert not matches(needs(**constraints), caps({}, None))


def test_min_vram_boundary_is_memory_mb_times_1024() -> None:
    """min_vram_gb compares against memory_mb / 1024 exactly at the boundary."""
    miner = caps({"gpus": [{"name": "g", "memory_mb": 8192}]})
    assert matches(needs(min_vram_gb=8), miner)
    assert not matches(needs(min_vram_gb=8.001), miner)


def test_unpriced_miner_never_matches_priced_job() -> None:
    """A miner with no price never matches a job that sets max_price."""
    miner = caps({"gpus": [{"name": "g", "memory_mb": 1}]})
    assert miner.price is None
    assert not matches(needs(max_price=1e9), miner)
    assert matches(needs(), miner)


def test_cuda_is_stringified() -> None:
    """cuda may be a number; the constraint is matched against str(cuda)."""
    assert matches(needs(cuda="11.8"), caps({"cuda": 11.8}))
    assert matches(needs(cuda="12"), caps({"cuda": "12.1"}))
    assert not matches(needs(cuda="12"), caps({"cuda": None}))


def test_region_falls_back_to_capabilities_region() -> None:
    """Without a top-level region, capabilities.region is used; the top level wins."""
    assert caps({"region": "us"}, None).region == "us"
    assert caps({"region": "us"}, "eu").region == "eu"
    assert caps({}, None).region is None


def test_capabilities_parse_tolerates_junk() -> None:
    """Malformed gpus/models/price values are ignored instead of raising."""
    parsed = Capabilities.parse(
        {
            "gpus": [
                {"name": "A", "memory_mb": "2048"},
                "junk",
                {"memory_mb": "lots"},
                {"name": None, "memory_mb": True},
                {"name": 7, "memory_mb": [1]},
            ],
            "models": "llama3",
            "price": "cheap",
        },
        None,
    )
    assert parsed.gpu_names == frozenset({"A", "7"})
    assert parsed.vram_mb == 2048.0
    assert parsed.models == frozenset()
    assert parsed.price is None
    assert parsed.unit_price is None
    assert parsed.cuda == ""


def test_capabilities_parse_non_list_gpus_and_numeric_strings() -> None:
    """gpus that is not a list means no gpus; a numeric-string price is a number."""
    parsed = Capabilities.parse({"gpus": {"name": "A"}, "price": "0.25", "models": [1]}, "r")
    assert parsed.gpu_names == frozenset()
    assert parsed.vram_mb == 0.0
    assert parsed.price == 0.25
    assert parsed.unit_price == 0.25
    assert parsed.models == frozenset({"1"})


def test_capabilities_parse_shares_one_instance_per_document_and_region() -> None:
    """Equal documents (in any key order) with the same region parse to one shared, equal
    instance; another region is another class; no capabilities at all is one instance too."""
    first = Capabilities.parse({"cuda": "12.4", "gpus": [{"name": "L4", "memory_mb": 1}]}, "r")
    again = Capabilities.parse({"gpus": [{"memory_mb": 1, "name": "L4"}], "cuda": "12.4"}, "r")
    assert again is first
    assert first == Capabilities._parse(
        {"cuda": "12.4", "gpus": [{"name": "L4", "memory_mb": 1}]}, "r"
    )
    assert hash(again) == hash(
        Capabilities._parse({"cuda": "12.4", "gpus": [{"name": "L4", "memory_mb": 1}]}, "r")
    )
    other = Capabilities.parse({"cuda": "12.4", "gpus": [{"name": "L4", "memory_mb": 1}]}, "s")
    assert other.region == "s"
    assert first.region == "r"
    assert Capabilities.parse({}, None) is Capabilities.parse({}, None)
    assert Capabilities.parse({}, None) == Capabilities._parse({}, None)
    assert Capabilities.parse({}, "r").region == "r"


def test_capabilities_parse_cache_never_conflates_nan_with_null() -> None:
    """orjson writes NaN as ``null``: such documents are parsed each time, never shared."""
    assert Capabilities.parse({"cuda": None}, None).cuda == ""
    assert Capabilities.parse({"cuda": float("nan")}, None).cuda == "nan"
    assert Capabilities.parse({"cuda": None}, None).cuda == ""
    # A price that is not a finite number is no price at all (a receipt cannot carry it).
    assert Capabilities.parse({"price": float("nan")}, None).price is None


def test_capabilities_parse_keeps_no_large_documents() -> None:
    big = {"models": [f"model-{i}" for i in range(1000)]}
    first = Capabilities.parse(big, None)
    assert len(first.models) == 1000
    assert Capabilities.parse(big, None) is not first
    assert Capabilities.parse(big, None) == first


def test_jobneeds_parse() -> None:
    """Constraints are normalised: strings, numbers, model sets; junk numbers are dropped."""
    parsed = JobNeeds.parse(
        {
            "region": "eu",
            "gpu": "A100",
            "min_vram_gb": "16",
            "cuda": 12,
            "models": ["a", "b"],
            "max_price": False,
        }
    )
    assert parsed == JobNeeds(
        region="eu",
        gpu="A100",
        min_vram_gb=16.0,
        cuda="12",
        models=frozenset({"a", "b"}),
        max_price=None,
    )
    assert JobNeeds.parse({"models": "a"}).models == frozenset()
    assert JobNeeds.parse({}) == JobNeeds()


def test_match_cache_memoises_and_clears_at_limit() -> None:
    """MatchCache returns the same verdicts as matches(), and stays within its limit."""
    cache = MatchCache(limit=2)
    a, b, c = needs(gpu="A100"), needs(gpu="nope"), needs()
    miner = caps()
    assert cache(a, miner) is True
    assert cache(b, miner) is False
    assert cache(a, miner) is True  # hit
    assert cache(c, miner) is True  # clears first
    assert len(cache._cache) == 1


# ---- IdleIndex ------------------------------------------------------------------------------


def test_idle_index_oldest_free_first() -> None:
    """pick() returns the matching miner that became free first; add() moves to the back."""
    idle = IdleIndex(MatchCache())
    a100 = caps({"gpus": [{"name": "A100", "memory_mb": 81920}]})
    plain = caps({})
    idle.add("m1", a100)
    idle.add("m2", plain)
    idle.add("m3", a100)
    assert len(idle) == 3
    assert "m2" in idle
    assert idle.pick(needs(), set()) == "m1"
    assert idle.pick(needs(gpu="A100"), set()) == "m1"
    idle.add("m1", a100)  # given work, still free: back of the line
    assert idle.pick(needs(), set()) == "m2"
    assert idle.pick(needs(gpu="A100"), set()) == "m3"


def test_idle_index_exclude() -> None:
    """Excluded miners are skipped; None when every matching miner is excluded."""
    idle = IdleIndex(MatchCache())
    plain = caps({})
    idle.add("m1", plain)
    idle.add("m2", plain)
    assert idle.pick(needs(), {"m1"}) == "m2"
    assert idle.pick(needs(), {"m1", "m2"}) is None
    assert idle.pick(needs(gpu="A100"), set()) is None


def test_idle_index_discard() -> None:
    """discard() removes a miner (and its empty class); unknown ids are ignored."""
    idle = IdleIndex(MatchCache())
    idle.add("m1", caps({}))
    idle.discard("m1")
    idle.discard("m1")
    idle.discard("never")
    assert len(idle) == 0
    assert "m1" not in idle
    assert idle._classes == {}
    assert idle.pick(needs(), set()) is None


def test_idle_index_capability_change_moves_class() -> None:
    """Re-adding a miner with other capabilities moves it to the new class."""
    idle = IdleIndex(MatchCache())
    idle.add("m1", caps({}))
    idle.add("m2", caps({}))
    idle.add("m1", caps())
    assert idle.pick(needs(gpu="A100"), set()) == "m1"
    assert idle.pick(needs(), {"m1"}) == "m2"
    assert len(idle) == 2


# ---- JobQueue -------------------------------------------------------------------------------


class Live:
    """Validity oracle for JobQueue.pick: job_id -> current token; absent = not queued."""

    def __init__(self) -> None:
        self.tokens: dict[str, int] = {}
        self.rejected: set[str] = set()

    def valid(self, job_id: str, token: int) -> bool:
        return self.tokens.get(job_id) == token

    def is_rejected(self, job_id: str) -> bool:
        return job_id in self.rejected


def drain(queue: JobQueue, miner: Capabilities, live: Live) -> list[str]:
    out: list[str] = []
    while (found := queue.pick(miner, live.valid, live.is_rejected)) is not None:
        cls, entry = found
        queue.remove(cls, entry)
        live.tokens.pop(entry[3])
        out.append(entry[3])
    return out


def test_job_queue_priority_then_fifo() -> None:
    """Higher priority first; equal priority in submission order, across classes."""
    queue, live = JobQueue(MatchCache(), lambda needs: True), Live()
    jobs = [
        ("a", 0, needs()),
        ("b", 5, needs(gpu="A100")),
        ("c", 0, needs(gpu="A100")),
        ("d", 5, needs()),
        ("e", -1, needs()),
        ("f", 0, needs()),
    ]
    for order, (job_id, prio, cls) in enumerate(jobs, start=1):
        live.tokens[job_id] = 1
        queue.push(cls, prio, order, 1, job_id)
    assert drain(queue, caps(), live) == ["b", "d", "a", "c", "f", "e"]
    assert queue.classes() == []


def test_job_queue_only_matching_classes() -> None:
    """A miner is only offered jobs whose class it matches."""
    queue, live = JobQueue(MatchCache(), lambda needs: True), Live()
    for order, (job_id, cls) in enumerate([("a", needs(gpu="A100")), ("b", needs())], 1):
        live.tokens[job_id] = 1
        queue.push(cls, 0, order, 1, job_id)
    assert drain(queue, caps({}), live) == ["b"]
    assert queue.classes() == [needs(gpu="A100")]
    assert drain(queue, caps(), live) == ["a"]


def test_job_queue_lazy_deletion() -> None:
    """Stale entries (no longer queued, or re-pushed with a new token) are skipped and dropped."""
    queue, live = JobQueue(MatchCache(), lambda needs: True), Live()
    for order, job_id in enumerate("abc", start=1):
        live.tokens[job_id] = 1
        queue.push(needs(), 0, order, 1, job_id)
    del live.tokens["a"]  # e.g. canceled while queued
    live.tokens["b"] = 2  # re-pushed: the old entry is stale
    queue.push(needs(), 0, 10, 2, "b")
    found = queue.pick(caps(), live.valid, live.is_rejected)
    assert found is not None
    assert found[1] == (0, 3, 1, "c")
    assert len(queue._classes[needs()]) == 2  # the stale "a" head was popped
    assert drain(queue, caps(), live) == ["c", "b"]


def test_job_queue_class_of_only_stale_entries_disappears() -> None:
    """A class whose entries are all stale is removed on the next pick."""
    queue, live = JobQueue(MatchCache(), lambda needs: True), Live()
    queue.push(needs(gpu="A100"), 0, 1, 1, "gone")
    assert queue.pick(caps(), live.valid, live.is_rejected) is None
    assert queue.classes() == []


def test_job_queue_skips_rejected() -> None:
    """Jobs this miner rejected are passed over; a class with only rejected jobs offers none."""
    queue, live = JobQueue(MatchCache(), lambda needs: True), Live()
    for order, (job_id, cls) in enumerate(
        [("a", needs()), ("b", needs()), ("c", needs(gpu="A100"))], start=1
    ):
        live.tokens[job_id] = 1
        queue.push(cls, 0, order, 1, job_id)
    live.rejected = {"a"}
    found = queue.pick(caps(), live.valid, live.is_rejected)
    assert found is not None
    assert found[1][3] == "b"
    queue.remove(*found)  # not the heap head: removed from the middle
    del live.tokens["b"]
    live.rejected = {"a", "c"}
    assert queue.pick(caps(), live.valid, live.is_rejected) is None
    live.rejected = set()
    assert drain(queue, caps(), live) == ["a", "c"]


def test_job_queue_remove_unknown_class_is_noop() -> None:
    """remove() on a class the queue no longer has does nothing."""
    queue = JobQueue(MatchCache(), lambda needs: True)
    queue.remove(needs(gpu="x"), (0, 1, 1, "a"))
    assert queue.classes() == []


def test_parsed_class_caches_keep_right_sized_keys() -> None:
    """The per-shape caches of parsed classes hold up to 4096 keys each; an untrimmed orjson
    key would keep a 4 KiB buffer (protocol.codec.trimmed)."""
    import tracemalloc

    JobNeeds._parsed.clear()
    Capabilities._parsed.clear()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(500):
            JobNeeds.parse({"gpu": f"G{i}", "min_vram_gb": 8})
            Capabilities.parse({"gpus": [{"name": f"G{i}", "memory_mb": 8192}]}, None)
        per_shape = (tracemalloc.get_traced_memory()[0] - before) / 1000
    finally:
        tracemalloc.stop()
        JobNeeds._parsed.clear()
        Capabilities._parsed.clear()
    assert per_shape < 2048  # with the 4 KiB buffers: over 4096


@contextmanager
def _limits(aside_limit: int, slack: int) -> Iterator[None]:
    """The pick's scan threshold and the heads heaps' stale slack (0: rebuilt at once)."""
    saved = policy._ASIDE_LIMIT, policy._STALE_SLACK
    policy._ASIDE_LIMIT, policy._STALE_SLACK = aside_limit, slack
    try:
        yield
    finally:
        policy._ASIDE_LIMIT, policy._STALE_SLACK = saved


# ``_limits``' arguments for the property tests: the scan at once, soon or rarely; the heads
# heaps rebuilt at once or rarely.
_ASIDE_LIMITS = st.sampled_from([0, 2, 32])
_SLACKS = st.sampled_from([0, 1024])


_GPUS = ("A100", "H100", "L4")


# Sequences that reach the rare branches (the scan fallbacks, stale and dormant heads), found
# by a coverage-guided search or written for one branch: ``make coverage`` must not depend on
# the random draw. Steps are "op a b c" as the strategies draw them, separated by ";".
_QUEUE_EXAMPLES = [
    (
        "pick 2 0 1; push 1 1 0; connect 0 0 -1; connect 2 0 1; push 2 1 -1; push 0 3 0; "
        "pick 2 1 1; connect 2 1 -1",
        0,
        1024,
    ),
    (
        "push 2 3 -1; cancel 2 0 0; cancel 0 2 0; cancel 1 0 -1; cancel 2 1 0; push 0 0 0; "
        "reject 0 1 -1; cancel 0 1 0; connect 2 3 1; pick 1 2 1",
        0,
        1024,
    ),
    ("push 0 0 -1; push 0 0 0; pick 0 2 -1", 0, 1024),
    (
        "push 1 0 -1; connect 2 1 0; reject 1 2 -1; connect 1 0 1; push 0 0 0; push 0 1 0; "
        "pick 1 0 0; connect 1 1 1; push 0 0 -1; cancel 1 1 1; pick 1 0 1",
        0,
        0,
    ),
    (
        "push 0 2 1; reject 2 3 -1; connect 0 1 1; pick 0 1 0; push 0 2 0; pick 2 0 -1; "
        "reject 2 1 0; connect 0 2 -1; cancel 1 3 0",
        0,
        1024,
    ),
    (
        "connect 1 2 -1; push 0 1 0; push 1 2 1; push 0 2 0; reject 0 0 -1; push 1 3 -1; "
        "connect 2 0 -1; pick 2 3 -1",
        2,
        0,
    ),
]
_IDLE_EXAMPLES = [
    (
        "add 1 1 1; add 2 0 0; add 3 1 0; refuse 1 1 0; pick 3 0 0; discard 2 1 0; pick 1 1 1; "
        "add 0 0 1; refuse 2 1 1",
        0,
        1024,
    ),
    ("add 3 0 1; add 0 1 0; add 0 1 1; add 2 1 0; pick 0 0 0", 2, 1024),
    # two classes whose longest-waiting miners refused: the second's next miner waited less
    (
        "add 0 0 0; add 1 0 1; add 2 0 0; add 3 0 1; refuse 0 0 0; refuse 1 0 0; pick 0 0 1",
        32,
        1024,
    ),
    # through the scan: a class whose every miner refused offers nothing
    ("add 4 1 0; add 0 0 0; refuse 0 0 0; pick 0 0 0", 0, 1024),
    # the same behind a class that cannot take the job, through the scan
    (
        "add 4 1 0; add 0 0 0; add 1 0 1; add 2 0 0; add 3 0 1; refuse 0 0 0; refuse 1 0 0; "
        "pick 0 0 1",
        0,
        1024,
    ),
]


def _steps(text: str) -> list[tuple[str, int, int, int]]:
    out = []
    for step in text.split(";"):
        op, a, b, c = step.split()
        out.append((op, int(a), int(b), int(c)))
    return out


def _with_examples(examples: list[Any]) -> Any:
    def decorate(test: Any) -> Any:
        for steps, aside_limit, slack in examples:
            test = example(_steps(steps), aside_limit, slack)(test)
        return test

    return decorate


@_with_examples(_QUEUE_EXAMPLES)
@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["push", "pick", "cancel", "reject", "connect"]),
            st.integers(0, 2),  # gpu
            st.integers(0, 3),  # price step: one class per budget
            st.integers(-1, 1),  # priority
        ),
        max_size=120,
    ),
    _ASIDE_LIMITS,
    _SLACKS,
)
def test_job_queue_pick_is_the_best_live_matching_entry(
    steps: list[tuple[str, int, int, int]], aside_limit: int, slack: int
) -> None:
    """Whatever the mix of classes, stale entries, refusals and dormant classes, a pick is the
    least (priority, order) live entry of a class the miner matches that it did not refuse
    (by the heads heap, or by the scan it falls back to after ``aside_limit`` classes)."""
    with _limits(aside_limit, slack):
        _check_picks(steps)


def _check_picks(steps: list[tuple[str, int, int, int]]) -> None:
    known = {caps({"gpus": [{"name": "A100"}], "price": 0.01})}
    match = MatchCache()
    queue, live = JobQueue(match, lambda n: any(match(n, c) for c in known)), Live()
    pushed: dict[str, tuple[Any, tuple[int, int, int, str]]] = {}
    for order, (op, gpu, step, prio) in enumerate(steps, start=1):
        miner = caps({"gpus": [{"name": _GPUS[gpu]}], "price": 0.01 + 0.0005 * step})
        if op == "push":
            job_id = f"j{order}"
            cls = needs(gpu=_GPUS[gpu], max_price=0.01 + 0.0005 * step)
            live.tokens[job_id] = 1
            queue.push(cls, prio, order, 1, job_id)
            pushed[job_id] = (cls, (-prio, order, 1, job_id))
        elif op == "cancel" and live.tokens:
            live.tokens.pop(sorted(live.tokens)[step % len(live.tokens)])
        elif op == "reject" and live.tokens:
            live.rejected.add(sorted(live.tokens)[step % len(live.tokens)])
        elif op == "connect" and miner not in known:
            known.add(miner)
            queue.wake()
        elif op == "pick":  # by a connected miner's class
            miner = sorted(known, key=repr)[(gpu + step) % len(known)]
            expected = min(
                (
                    entry
                    for job_id, (cls, entry) in pushed.items()
                    if live.valid(job_id, 1) and not live.is_rejected(job_id) and match(cls, miner)
                ),
                default=None,
            )
            found = queue.pick(miner, live.valid, live.is_rejected)
            assert (None if found is None else found[1]) == expected
            if found is not None:
                queue.remove(*found)
                live.tokens.pop(found[1][3])


def test_job_queue_wakes_dormant_classes_for_a_new_class_of_miner() -> None:
    """A class no known miner matches goes dormant when a pick steps over it, and comes back
    when a miner that matches it connects."""
    a100, h100 = caps({"gpus": [{"name": "A100"}]}), caps({"gpus": [{"name": "H100"}]})
    known = {a100}
    match = MatchCache()
    queue, live = JobQueue(match, lambda n: any(match(n, c) for c in known)), Live()
    for order, (job_id, gpu) in enumerate([("h", "H100"), ("a", "A100")], start=1):
        live.tokens[job_id] = 1
        queue.push(needs(gpu=gpu), 0, order, 1, job_id)
    assert drain(queue, a100, live) == ["a"]
    assert queue._dormant == {needs(gpu="H100")}
    known.add(h100)
    queue.wake()
    assert drain(queue, h100, live) == ["h"]


@_with_examples(_IDLE_EXAMPLES)
@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["add", "add", "discard", "pick", "refuse"]),
            st.integers(0, 3),  # miner
            st.integers(0, 1),  # gpu
            st.integers(0, 1),  # price step: a class per price
        ),
        max_size=120,
    ),
    _ASIDE_LIMITS,
    _SLACKS,
)
def test_idle_index_pick_is_the_longest_waiting_matching_miner(
    steps: list[tuple[str, int, int, int]], aside_limit: int, slack: int
) -> None:
    """A pick is the matching idle miner, not refused, that has waited longest (by the heads
    heap, or by the scan it falls back to after ``aside_limit`` classes)."""
    with _limits(aside_limit, slack):
        _check_idle(steps)


def _check_idle(steps: list[tuple[str, int, int, int]]) -> None:
    match = MatchCache()
    index = IdleIndex(match)
    waiting: list[tuple[str, Capabilities]] = []  # the reference: oldest first
    exclude: set[str] = set()
    for op, n, gpu, step in steps:
        miner_id = f"m{n}"
        if op == "add":
            c = caps({"gpus": [{"name": _GPUS[gpu]}], "price": 0.01 + 0.0005 * step})
            index.add(miner_id, c)
            waiting = [w for w in waiting if w[0] != miner_id] + [(miner_id, c)]
        elif op == "discard":
            index.discard(miner_id)
            waiting = [w for w in waiting if w[0] != miner_id]
        elif op == "refuse":
            exclude.add(miner_id)
        else:
            job = needs(gpu=_GPUS[gpu], max_price=0.01 + 0.0005 * step)
            expected = next((m for m, c in waiting if m not in exclude and match(job, c)), None)
            assert index.pick(job, exclude) == expected
        assert len(index) == len(waiting)


def test_idle_index_refusals_and_requeued_miners_keep_the_longest_waiting_first() -> None:
    """A class whose longest-waiting miner refused the job offers its next one, which may have
    waited less than another class's; a miner given work and freed again goes to the back."""
    x = caps({"gpus": [{"name": "A100"}], "price": 0.01})
    y = caps({"gpus": [{"name": "A100"}], "price": 0.02})
    job = needs(gpu="A100")
    index = IdleIndex(MatchCache())
    for miner_id, c in [("m0", x), ("m1", y), ("m2", x)]:
        index.add(miner_id, c)
    assert index.pick(job, {"m0"}) == "m1"  # m2 (class x) waited less than m1
    index.discard("m1")
    index.add("m0", x)  # m0 worked and is free again: now the newest
    assert index.pick(job, set()) == "m2"
    index.discard("m2")
    index.add("m1", y)
    assert index.pick(job, set()) == "m0"
    index.discard("m0")
    index.discard("m1")
    index.add("a", x)
    index.add("b", y)
    index.add("c", x)
    index.discard("a")  # x's longest waiting is c now, who waited less than b
    assert index.pick(job, set()) == "b"


def test_a_refused_job_at_the_front_costs_the_refusing_miner_no_scan_and_no_disorder() -> None:
    """After refusing the oldest job, a miner drains the rest oldest first (entries are taken
    from the middle of the class's heap), and the refused job is still first for others."""
    queue, live = JobQueue(MatchCache(), lambda needs: True), Live()
    for order in range(1, 201):
        live.tokens[f"j{order}"] = 1
        queue.push(needs(), order % 3, order, 1, f"j{order}")  # priorities interleave
    expected = sorted(
        (f"j{o}" for o in range(1, 201)), key=lambda j: (-(int(j[1:]) % 3), int(j[1:]))
    )
    live.rejected = {expected[0]}
    assert drain(queue, caps(), live) == expected[1:]
    live.rejected = set()
    assert drain(queue, caps(), live) == expected[:1]


def test_parse_caches_are_bounded_and_skip_what_orjson_cannot_write() -> None:
    """Both parse caches start over at 4,096 shapes; constraints orjson cannot serialize (an
    integer beyond 64 bits) are parsed every time, never cached."""
    for i in range(4097):
        Capabilities.parse({"gpus": [{"name": f"g{i}"}]}, None)
        JobNeeds.parse({"gpu": f"g{i}"})
    assert 0 < len(Capabilities._parsed) <= 4096
    assert 0 < len(JobNeeds._parsed) <= 4096
    huge = {"gpu": "A100", "min_vram_gb": 2**70}
    assert JobNeeds.parse(huge) == JobNeeds._parse(huge)
    assert JobNeeds.parse(huge) is not JobNeeds.parse(huge)


def test_large_constraints_are_parsed_every_time_never_kept() -> None:
    """A client chooses its constraints, unknown keys included: a large document is not kept
    as a cache key (4,096 of a frame each would be gigabytes), only its parsed class."""
    JobNeeds._parsed.clear()
    junk = {"gpu": "A100", "note": "x" * 100_000}
    needs = JobNeeds.parse(junk)
    assert needs == JobNeeds.parse({"gpu": "A100"})
    assert JobNeeds._parsed  # the small one is kept
    assert all(len(key) <= 2048 for key in JobNeeds._parsed)


def test_job_queue_scan_pops_stale_heads_and_weighs_refused_ones() -> None:
    """The scan (a class it cannot take is first in line): a class's run of stale heads is
    popped; a refused head is replaced by the class's next acceptable job, which only wins when
    it is better than the best so far; a class with nothing acceptable offers nothing."""
    a100 = caps({"gpus": [{"name": "A100"}], "price": 0.01})
    known = {a100, caps({"gpus": [{"name": "H100"}], "price": 0.01})}
    match = MatchCache()
    queue, live = JobQueue(match, lambda n: any(match(n, c) for c in known)), Live()
    plain, cheap, budget = needs(gpu="A100"), needs(gpu="A100", max_price=1), needs(max_price=2)
    for order, (job_id, cls) in enumerate(
        [
            ("h1", needs(gpu="H100")),
            ("a1", plain),
            ("a2", plain),
            ("b1", cheap),
            ("c1", budget),
            ("a3", plain),
            ("b2", cheap),
        ],
        start=1,
    ):
        live.tokens[job_id] = 1
        queue.push(cls, 0, order, 1, job_id)
    del live.tokens["a1"], live.tokens["a2"]  # canceled: stale heads of their class
    live.rejected |= {"b1", "c1"}  # this miner refused them
    with _limits(0, 1024):
        found = queue.pick(a100, live.valid, live.is_rejected)
    assert found is not None
    assert (found[0], found[1][3]) == (plain, "a3")


def test_job_queue_heads_rebuilt_when_mostly_stale() -> None:
    """Each better job pushed to a class leaves a stale pair in the heads heap; past the slack
    the heap is rebuilt from the classes, and picks still come best first."""
    a100 = caps({"gpus": [{"name": "A100"}]})
    match = MatchCache()
    queue, live = JobQueue(match, lambda n: match(n, a100)), Live()
    with _limits(32, 0):
        for order in range(1, 5):
            live.tokens[f"j{order}"] = 1
            queue.push(needs(), order, order, 1, f"j{order}")  # each outranks the last
        assert len(queue._heads) <= 2
        assert drain(queue, a100, live) == ["j4", "j3", "j2", "j1"]


def test_removing_a_dormant_classs_head_keeps_it_dormant() -> None:
    """A job removed from the front of a class no known miner can run (it waits dormant) does
    not bring the class back: only a new class of miner does."""
    a100, h100 = caps({"gpus": [{"name": "A100"}]}), caps({"gpus": [{"name": "H100"}]})
    known = {a100}
    match = MatchCache()
    queue, live = JobQueue(match, lambda n: any(match(n, c) for c in known)), Live()
    for order, job_id in enumerate(["h1", "h2"], start=1):
        live.tokens[job_id] = 1
        queue.push(needs(gpu="H100"), 0, order, 1, job_id)
    assert queue.pick(a100, live.valid, live.is_rejected) is None
    assert queue._dormant == {needs(gpu="H100")}
    queue.remove(needs(gpu="H100"), (0, 1, 1, "h1"))
    del live.tokens["h1"]
    assert queue._dormant == {needs(gpu="H100")}
    assert all(n != needs(gpu="H100") for _, n in queue._heads)
    known.add(h100)
    queue.wake()
    assert drain(queue, h100, live) == ["h2"]


def test_job_queue_compact_keeps_only_live_entries_and_their_dormancy() -> None:
    """compact() drops stale entries everywhere, also in dormant classes no pick looks at; a
    class left empty goes (dormant or not), and a dormant class with live jobs stays dormant."""
    a100, h100 = caps({"gpus": [{"name": "A100"}]}), caps({"gpus": [{"name": "H100"}]})
    known = {a100}
    match = MatchCache()
    queue, live = JobQueue(match, lambda n: any(match(n, c) for c in known)), Live()
    jobs = [("h1", "H100"), ("h2", "H100"), ("x1", "X"), ("a1", "A100"), ("a2", "A100")]
    jobs += [("b1", "B")]
    for order, (job_id, gpu) in enumerate(jobs, start=1):
        live.tokens[job_id] = 1
        queue.push(needs(gpu=gpu), 0, order, 1, job_id)
    assert queue.pick(a100, live.valid, live.is_rejected) is not None
    assert queue._dormant == {needs(gpu="H100"), needs(gpu="X")}  # B was not reached
    for job_id in ("h1", "x1", "a1", "b1"):  # canceled or expired while queued
        del live.tokens[job_id]
    queue.compact(live.valid)
    assert sorted(queue.classes(), key=str) == [needs(gpu="A100"), needs(gpu="H100")]
    assert [e[3] for heap in queue._classes.values() for e in heap] == ["h2", "a2"]
    assert queue._dormant == {needs(gpu="H100")}
    assert drain(queue, a100, live) == ["a2"]
    known.add(h100)
    queue.wake()
    assert drain(queue, h100, live) == ["h2"]


def test_remove_of_an_entry_not_in_the_heap_changes_nothing() -> None:
    heap = [(0, 1, 1, "a"), (0, 2, 1, "b"), (0, 3, 1, "c")]
    policy._remove(heap, (0, 9, 1, "z"))
    assert heap == [(0, 1, 1, "a"), (0, 2, 1, "b"), (0, 3, 1, "c")]
