"""``Outbox`` backpressure (coalescing, dropping, overflow) and ``Fanout`` routing."""

from __future__ import annotations

import json

import anyio
import pytest

from dispatcher.fanout import Fanout, Outbox, Subscriber
from protocol.types import CloseCode

pytestmark = pytest.mark.anyio

SOFT, HARD = 4, 16


def frame(job_id: str, seq: int, event: str = "progress") -> str:
    return json.dumps({"type": "job.event", "job_id": job_id, "seq": seq, "event": event})


def seqs(frames: list[str]) -> list[tuple[str, int]]:
    return [(f["job_id"], f["seq"]) for f in map(json.loads, frames)]


class Box:
    """An ``Outbox`` with small limits whose overflow callback is recorded."""

    def __init__(self, soft: int = SOFT, hard: int = HARD) -> None:
        self.overflows: list[tuple[CloseCode, str]] = []
        self.outbox = Outbox(
            lambda code, reason: self.overflows.append((code, reason)),
            soft_limit=soft,
            hard_limit=hard,
        )

    def fill(self, n: int, job_id: str = "filler") -> None:
        for i in range(n):
            self.outbox.put(frame(job_id, i + 1, "queued"), job_id=job_id)


# ---- Outbox -------------------------------------------------------------------------------


async def test_frames_below_the_soft_limit_are_all_kept() -> None:
    """Below the soft limit every frame, progress included, is queued in order."""
    box = Box()
    for seq in (1, 2, 3):
        box.outbox.put(frame("j", seq), job_id="j", progress=True)
    assert seqs(box.outbox.take_nowait()) == [("j", 1), ("j", 2), ("j", 3)]
    assert box.outbox.dropped == 0


async def test_progress_past_the_soft_limit_replaces_the_unsent_progress() -> None:
    """Past the soft limit a job's newest progress frame takes the place of its unsent one."""
    box = Box()
    box.fill(SOFT - 1)
    box.outbox.put(frame("j", 1), job_id="j", progress=True)  # reaches the soft limit
    box.outbox.put(frame("j", 2), job_id="j", progress=True)
    box.outbox.put(frame("j", 3), job_id="j", progress=True)
    assert len(box.outbox) == SOFT
    assert box.outbox.dropped == 2
    assert seqs(box.outbox.take_nowait())[-1] == ("j", 3)


async def test_coalescing_is_per_job() -> None:
    """Progress of another job does not replace this job's frame."""
    box = Box()
    box.fill(SOFT - 2)
    box.outbox.put(frame("a", 1), job_id="a", progress=True)
    box.outbox.put(frame("b", 1), job_id="b", progress=True)
    box.outbox.put(frame("a", 2), job_id="a", progress=True)
    box.outbox.put(frame("b", 2), job_id="b", progress=True)
    assert seqs(box.outbox.take_nowait())[-2:] == [("a", 2), ("b", 2)]


async def test_progress_never_jumps_over_a_non_progress_frame_of_its_job() -> None:
    """A progress frame queued before a state event is not replaced by a later progress."""
    box = Box()
    box.fill(SOFT - 2)
    box.outbox.put(frame("j", 1), job_id="j", progress=True)
    box.outbox.put(frame("j", 2, "requeued"), job_id="j")
    box.outbox.put(frame("j", 3), job_id="j", progress=True)
    out = seqs(box.outbox.take_nowait())
    assert out[-3:] == [("j", 1), ("j", 2), ("j", 3)]
    assert box.outbox.dropped == 0


async def test_progress_past_half_the_hard_limit_is_dropped() -> None:
    """With no progress of its own to replace, progress is dropped past hard_limit / 2."""
    box = Box()
    box.fill(HARD // 2)
    box.outbox.put(frame("j", 1), job_id="j", progress=True)
    assert len(box.outbox) == HARD // 2
    assert box.outbox.dropped == 1
    assert box.overflows == []
    assert not box.outbox.closed


async def test_progress_between_soft_and_half_hard_is_queued() -> None:
    """Between the soft limit and hard_limit / 2 a first progress frame is still queued."""
    box = Box()
    box.fill(SOFT)
    box.outbox.put(frame("j", 1), job_id="j", progress=True)
    assert len(box.outbox) == SOFT + 1
    assert box.outbox.dropped == 0


async def test_non_progress_frames_are_kept_up_to_the_hard_limit() -> None:
    """State events are never dropped below the hard limit."""
    box = Box()
    box.fill(HARD)
    assert len(box.outbox) == HARD
    assert box.overflows == []
    assert box.outbox.dropped == 0


async def test_overflow_past_the_hard_limit_closes_with_4429() -> None:
    """One frame past the hard limit calls on_overflow(4429) and closes the outbox."""
    box = Box()
    box.fill(HARD)
    box.outbox.put(frame("j", 1, "queued"), job_id="j")
    assert box.overflows == [(CloseCode.TOO_SLOW, "outbound queue overflow")]
    assert box.overflows[0][0] == 4429
    assert box.outbox.closed
    box.outbox.put(frame("j", 2, "queued"), job_id="j")  # ignored once closed
    assert len(box.overflows) == 1
    assert len(box.outbox) == HARD


async def test_the_characters_queued_are_bounded_too() -> None:
    """The limits counted frames only, and a frame can be megabytes (a JobView with its
    payload, a completed event with a result and a receipt holding it again): 4096 of them were
    held for a peer that read nothing. Past ``hard_chars`` the outbox overflows (4429) as past
    the hard limit, past half of it progress is coalesced or dropped, and a single frame larger
    than the bound still goes out."""
    overflows: list[tuple[CloseCode, str]] = []
    outbox = Outbox(lambda code, reason: overflows.append((code, reason)), hard_chars=1000)
    outbox.put("x" * 5000)  # alone: taken whole
    assert outbox.take_nowait() == ["x" * 5000]
    outbox.put("a" * 400, job_id="j")
    outbox.put("p" * 200, job_id="j", progress=True)  # 600 > 500: dropped
    assert (len(outbox), outbox.dropped) == (1, 1)
    outbox.put("b" * 400, job_id="j")
    assert overflows == []
    outbox.put("c" * 400, job_id="j")  # 1200 > 1000
    assert overflows == [(CloseCode.TOO_SLOW, "outbound queue overflow")]
    assert outbox.closed


async def test_take_returns_everything_queued() -> None:
    """take() hands over every queued frame at once and empties the outbox."""
    box = Box()
    box.fill(5)
    with anyio.fail_after(5):
        got = await box.outbox.take()
    assert [s for _, s in seqs(got)] == [1, 2, 3, 4, 5]
    assert len(box.outbox) == 0


async def test_take_waits_for_a_frame() -> None:
    """take() blocks until something is put, then returns it."""
    box = Box()
    got: list[list[str]] = []

    async def taker() -> None:
        got.append(await box.outbox.take())

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(taker)
            await anyio.wait_all_tasks_blocked()
            assert got == []
            box.outbox.put(frame("j", 1, "queued"))
    assert [seqs(g) for g in got] == [[("j", 1)]]


async def test_take_returns_empty_once_closed() -> None:
    """close() wakes a waiting take(), which returns no frames."""
    box = Box()
    got: list[list[str]] = []

    async def taker() -> None:
        got.append(await box.outbox.take())

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(taker)
            await anyio.wait_all_tasks_blocked()
            box.outbox.close()
    assert got == [[]]


async def test_take_resets_coalescing() -> None:
    """After a take(), a new progress frame is queued, not merged into a sent one."""
    box = Box(soft=1, hard=16)
    box.outbox.put(frame("j", 1), job_id="j", progress=True)
    assert len(box.outbox.take_nowait()) == 1
    box.fill(1)
    box.outbox.put(frame("j", 2), job_id="j", progress=True)
    assert seqs(box.outbox.take_nowait()) == [("filler", 1), ("j", 2)]


@pytest.mark.parametrize("end", ["take", "close"])
async def test_drained_waits_until_the_frames_are_taken_or_the_outbox_closes(end: str) -> None:
    """drained(n) returns at once below n queued frames, else once a take or close happens."""
    box = Box()
    box.fill(3)
    waited: list[int] = []

    async def replay() -> None:
        await box.outbox.drained(4)  # 3 queued: returns at once
        box.fill(1)
        await box.outbox.drained(4)
        waited.append(len(box.outbox))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(replay)
            await anyio.wait_all_tasks_blocked()
            assert waited == []
            if end == "take":
                assert len(box.outbox.take_nowait()) == 4
            else:
                box.outbox.close()
    assert waited == [0 if end == "take" else 4]


@pytest.mark.parametrize(
    ("queued", "size", "room"),
    [
        ([], 1_000, True),  # an empty outbox takes any frame (``put`` never overflows on it)
        (["x" * 400], 100, True),  # half of ``hard_chars`` (500) reached, not passed
        (["x" * 400], 101, False),
        (["x"] * 3, 1, False),  # ``below`` frames queued
    ],
)
def test_has_room_counts_frames_and_characters(queued: list[str], size: int, room: bool) -> None:
    """A producer that must not drop frames (a replay) adds one only while fewer than ``below``
    are queued and it leaves half of ``hard_chars`` free for live frames."""
    outbox = Outbox(lambda code, reason: None, hard_chars=1_000)
    for frame in queued:
        outbox.put(frame)
    assert outbox.has_room(3, size) is room
    assert Outbox(lambda code, reason: None).has_room(1, 10**9)  # no character bound


async def test_drained_waits_for_room_for_a_large_frame() -> None:
    """drained(n, size) also waits while a frame of ``size`` would fill half of the characters."""
    outbox = Outbox(lambda code, reason: None, hard_chars=1_000)
    outbox.put("x" * 300)
    waited: list[int] = []

    async def replay() -> None:
        await outbox.drained(10, 300)
        waited.append(len(outbox))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(replay)
            await anyio.wait_all_tasks_blocked()
            assert waited == []
            outbox.take_nowait()
    assert waited == [0]


async def test_withdraw_takes_jobs_unsent_events_past_a_seq_out() -> None:
    """withdraw({job: after}) removes each job's queued events with a greater seq, and nothing
    else (other jobs, frames that are no job event); the characters queued follow."""
    outbox = Outbox(lambda code, reason: None, hard_chars=10_000)
    outbox.put('{"type":"ack"}')
    for seq in (1, 2, 3):
        for job_id in "jkl":
            outbox.put(frame(job_id, seq, "queued"), job_id=job_id, seq=seq)
    assert outbox.withdraw({"j": 1, "l": 2}) == 3
    assert outbox.withdraw({"j": 1}) == 0
    assert outbox.withdraw({"nope": 0}) == 0
    assert outbox.withdraw({}) == 0
    assert outbox.dropped == 0  # not drops: a replay queues them again
    kept = outbox.take_nowait()
    assert kept[0] == '{"type":"ack"}'
    assert seqs(kept[1:]) == [("j", 1), ("k", 1), ("l", 1), ("k", 2), ("l", 2), ("k", 3)]
    assert outbox.withdraw({"j": 0}) == 0  # nothing queued
    assert outbox.has_room(1, 5_000)  # the characters of what was withdrawn are free again


async def test_withdraw_follows_a_coalesced_progress_frame() -> None:
    """A progress frame that replaced an unsent one carries the newer seq: withdrawn past an
    ``after`` the older one was not past; and the job's progress no longer coalesces into a
    frame that is gone (it would be lost with it)."""
    box = Box()
    box.fill(SOFT - 1)
    box.outbox.put(frame("j", 1), job_id="j", progress=True, seq=1)  # reaches the soft limit
    box.outbox.put(frame("j", 2), job_id="j", progress=True, seq=2)  # replaces seq 1
    box.outbox.put(frame("k", 1), job_id="k", progress=True, seq=1)
    assert box.outbox.withdraw({"j": 1, "k": 1}) == 1
    box.outbox.put(frame("j", 3), job_id="j", progress=True, seq=3)
    box.outbox.put(frame("k", 2), job_id="k", progress=True, seq=2)  # replaces k's seq 1
    assert seqs(box.outbox.take_nowait())[SOFT - 1 :] == [("k", 2), ("j", 3)]


async def test_withdraw_wakes_a_producer_waiting_for_room() -> None:
    """Withdrawn frames make room, as a take does: ``drained`` returns."""
    box = Box()
    for seq in (1, 2, 3):
        box.outbox.put(frame("j", seq), job_id="j", seq=seq)
    waited: list[int] = []

    async def replay() -> None:
        await box.outbox.drained(3)
        waited.append(len(box.outbox))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(replay)
            await anyio.wait_all_tasks_blocked()
            assert waited == []
            assert box.outbox.withdraw({"j": 2}) == 1
    assert waited == [2]


# ---- Fanout -------------------------------------------------------------------------------


def sub(client_id: str = "c1") -> Subscriber:
    return Subscriber(client_id, Outbox(lambda code, reason: None))


def got(s: Subscriber) -> list[tuple[str, int]]:
    return seqs(s.outbox.take_nowait())


async def test_publish_routes_by_job() -> None:
    """A job subscriber gets that job's events only."""
    fanout, a, b = Fanout(), sub(), sub()
    fanout.subscribe(a, ["j1"])
    fanout.subscribe(b, ["j2"])
    fanout.publish("c1", "j1", 1, frame("j1", 1, "queued"), False)
    fanout.publish("c1", "j2", 1, frame("j2", 1, "queued"), False)
    assert got(a) == [("j1", 1)]
    assert got(b) == [("j2", 1)]


async def test_publish_routes_all_of_a_clients_jobs() -> None:
    """An "all" subscriber gets every job of its client, none of other clients."""
    fanout, mine, theirs = Fanout(), sub("c1"), sub("c2")
    fanout.subscribe_all(mine)
    fanout.subscribe_all(theirs)
    fanout.publish("c1", "j1", 1, frame("j1", 1, "queued"), False)
    fanout.publish("c1", "j9", 1, frame("j9", 1, "queued"), False)
    fanout.publish("c2", "k1", 1, frame("k1", 1, "queued"), False)
    assert got(mine) == [("j1", 1), ("j9", 1)]
    assert got(theirs) == [("k1", 1)]


async def test_job_and_all_subscription_deliver_once() -> None:
    """Subscribed to a job and to "all": each event arrives once."""
    fanout, s = Fanout(), sub()
    fanout.subscribe(s, ["j1"])
    fanout.subscribe_all(s)
    fanout.publish("c1", "j1", 1, frame("j1", 1, "queued"), False)
    assert got(s) == [("j1", 1)]
    assert fanout.subscriber_count == 1


async def test_unsubscribe_some_jobs() -> None:
    """Unsubscribing named jobs stops only those."""
    fanout, s = Fanout(), sub()
    fanout.subscribe(s, ["j1", "j2"])
    fanout.unsubscribe(s, ["j1", "unknown"])
    fanout.publish("c1", "j1", 1, frame("j1", 1, "queued"), False)
    fanout.publish("c1", "j2", 1, frame("j2", 1, "queued"), False)
    assert got(s) == [("j2", 1)]
    assert s.job_ids == {"j2"}


async def test_unsubscribing_a_job_while_following_all_stops_it() -> None:
    """Following "all", unsubscribing named jobs stops those (it was acked but changed
    nothing); the rest of the client's jobs still arrive, and naming a job again resumes it."""
    fanout, s = Fanout(), sub()
    fanout.subscribe_all(s)
    fanout.subscribe(s, ["j1"])
    fanout.unsubscribe(s, ["j1", "j2"])
    for job_id in ("j1", "j2", "j3"):
        fanout.publish("c1", job_id, 1, frame(job_id, 1, "queued"), False)
    assert got(s) == [("j3", 1)]
    fanout.subscribe(s, ["j2"])
    fanout.publish("c1", "j2", 2, frame("j2", 2, "assigned"), False)
    assert got(s) == [("j2", 2)]
    fanout.unsubscribe(s)
    fanout.subscribe_all(s)  # a new "all" starts with nothing muted
    fanout.publish("c1", "j1", 2, frame("j1", 2, "assigned"), False)
    assert got(s) == [("j1", 2)]


async def test_unsubscribe_everything() -> None:
    """unsubscribe(sub) drops job and "all" subscriptions; nothing is left behind."""
    fanout, s, other = Fanout(), sub(), sub()
    fanout.subscribe(s, ["j1"])
    fanout.subscribe_all(s)
    fanout.subscribe_all(other)
    fanout.unsubscribe(s)
    fanout.publish("c1", "j1", 1, frame("j1", 1, "queued"), False)
    assert got(s) == []
    assert got(other) == [("j1", 1)]
    assert not s.all
    assert s.job_ids == set()
    assert fanout.subscriber_count == 1
    fanout.unsubscribe(other)
    assert fanout.subscriber_count == 0


async def test_forget_job_ends_job_subscriptions_but_not_all() -> None:
    """forget_job drops a terminal job's subscribers; "all" subscriptions carry on."""
    fanout, by_job, by_client = Fanout(), sub(), sub()
    fanout.subscribe(by_job, ["j1"])
    fanout.subscribe_all(by_client)
    fanout.forget_job("j1")
    fanout.forget_job("never-subscribed")
    assert by_job.job_ids == set()
    fanout.publish("c1", "j1", 2, frame("j1", 2, "canceled"), False)
    assert got(by_job) == []
    assert got(by_client) == [("j1", 2)]


async def test_events_are_held_while_a_replay_buffer_is_open() -> None:
    """A subscriber with a replay buffer for a job collects live frames there instead."""
    fanout, s = Fanout(), sub()
    fanout.subscribe(s, ["j1"])
    held: list[tuple[int, str, bool]] = []
    s.buffers["j1"] = held
    fanout.publish("c1", "j1", 3, frame("j1", 3), True)
    assert got(s) == []
    assert [(seq, progress) for seq, _, progress in held] == [(3, True)]


async def test_the_same_frame_object_reaches_every_subscriber() -> None:
    """A frame is encoded once: every outbox queues the very same string."""
    fanout, a, b = Fanout(), sub(), sub()
    fanout.subscribe(a, ["j1"])
    fanout.subscribe_all(b)
    text = frame("j1", 1, "queued")
    fanout.publish("c1", "j1", 1, text, False)
    assert a.outbox.take_nowait()[0] is text
    assert b.outbox.take_nowait()[0] is text


def test_progress_drops_are_counted_for_live_and_departed_subscribers() -> None:
    """statistics: drops in a live outbox count, and stay counted after the subscriber leaves."""
    fanout = Fanout()
    outbox = Outbox(lambda code, reason: None, soft_limit=1, hard_limit=100)
    sub = Subscriber("c1", outbox)
    fanout.subscribe(sub, ["j1"])
    for seq in range(1, 5):  # at the soft limit, each new progress replaces the unsent one
        fanout.publish("c1", "j1", seq, f"p{seq}", True)
    assert outbox.take_nowait() == ["p4"]
    assert fanout.progress_dropped == 3
    fanout.unsubscribe(sub)
    assert fanout.progress_dropped == 3


@pytest.mark.parametrize("ends", ["forget_job", "unsubscribe"])
def test_progress_drops_stay_counted_while_a_subscriber_follows_nothing(ends: str) -> None:
    """A socket whose jobs all ended (or that unsubscribed them) but is still open keeps its
    drops in the total: they left the count until the socket closed, so the counter went down
    and then up again (a Prometheus counter reset)."""
    fanout = Fanout()
    outbox = Outbox(lambda code, reason: None, soft_limit=1, hard_limit=100)
    sub = Subscriber("c1", outbox)
    fanout.subscribe(sub, ["j1"])
    for seq in range(1, 5):
        fanout.publish("c1", "j1", seq, f"p{seq}", True)
    assert fanout.progress_dropped == 3
    if ends == "forget_job":
        fanout.forget_job("j1", "c1")
    else:
        fanout.unsubscribe(sub, ["j1"])
    assert (fanout.subscriber_count, fanout.progress_dropped) == (0, 3)
    fanout.unsubscribe(sub)  # the socket closes
    assert fanout.progress_dropped == 3
