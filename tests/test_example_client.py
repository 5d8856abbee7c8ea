"""examples/ws_client.py against a scripted coordinator: the order of frames the contract allows
(docs/protocol.md, client socket), each event shown once and in order."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Self

import anyio
import orjson
import pytest
from websockets.exceptions import InvalidMessage

import examples.ws_client
import examples.ws_miner
from examples.connection import Refused
from examples.ws_client import follow_job
from protocol.messages import JobSubmit

if TYPE_CHECKING:
    import argparse
    from collections.abc import AsyncIterator, Callable
    from types import TracebackType

pytestmark = pytest.mark.anyio

JOB = "0" * 32


def event(seq: int, kind: str, **data: Any) -> bytes:
    state = {"queued": "QUEUED", "completed": "COMPLETED"}.get(kind, "RUNNING")
    frame = {"type": "job.event", "job_id": JOB, "seq": seq, "event": kind, "state": state}
    return orjson.dumps({**frame, "at": "2026-11-28T00:00:00.000Z", "attempt": 1, **data})


class Scripted:
    """A client socket whose coordinator answers each frame sent with the frames ``answer``
    gives for it (by the frame's type)."""

    def __init__(self, answer: Callable[[dict[str, Any]], list[bytes]]) -> None:
        self.answer = answer
        self.received: list[bytes] = []
        self.sent: list[dict[str, Any]] = []
        self.close_code: int | None = None  # the coordinator ends the connection: 1000
        self.close_reason = ""

    def __call__(self, url: str, **kwargs: Any) -> Self:
        return self

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        pass

    async def send(self, text: str) -> None:
        frame = orjson.loads(text)
        self.sent.append(frame)
        self.received += self.answer(frame)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._frames()

    async def _frames(self) -> AsyncIterator[bytes]:
        while self.received:
            yield self.received.pop(0)
        self.close_code = 1000


async def test_a_duplicate_submits_live_events_before_its_replay_are_not_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A resubmit whose first ack was lost is answered as a duplicate, and the socket follows the
    job from that ack: a live event can come before the replay the client then asks for. The
    client showed it and dropped the replayed events before it as seen (1-3 lost)."""

    def answer(frame: dict[str, Any]) -> list[bytes]:
        if frame["type"] == "hello":
            return [b'{"type":"welcome","protocol":1,"client_id":"c"}']
        if frame["type"] == "job.submit":
            ack = {"type": "ack", "id": frame["id"], "job": {"job_id": JOB}, "duplicate": True}
            return [orjson.dumps(ack), event(4, "progress", output="live, sent with the ack")]
        assert frame == {"type": "subscribe", "id": "resub", "job_ids": [JOB], "after": {JOB: 0}}
        replay = [event(1, "queued"), event(2, "assigned"), event(3, "started")]
        return [
            b'{"type":"ack","id":"resub"}',
            *replay,
            event(4, "progress"),
            event(5, "completed"),
        ]

    socket = Scripted(answer)
    monkeypatch.setattr(examples.ws_client, "connect", socket)
    submit = JobSubmit(id="submit", payload={}, idempotency_key="k")
    events = await follow_job("ws://coordinator", "key", submit, out=lambda line: None)
    assert [(e.seq, e.event) for e in events] == [
        (1, "queued"),
        (2, "assigned"),
        (3, "started"),
        (4, "progress"),
        (5, "completed"),
    ]


async def test_a_gap_in_the_live_stream_is_filled_by_a_replay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A progress event dropped under backpressure leaves a gap: the client asks for a replay
    after the last event it showed, once, and shows what it brings in order."""

    def answer(frame: dict[str, Any]) -> list[bytes]:
        if frame["type"] == "hello":
            return [b'{"type":"welcome","protocol":1,"client_id":"c"}']
        if frame["type"] == "job.submit":
            ack = {"type": "ack", "id": frame["id"], "job": {"job_id": JOB}, "duplicate": False}
            # 2 was dropped; 4 was on its way before the coordinator read the subscribe.
            return [
                orjson.dumps(ack),
                event(1, "queued"),
                event(3, "progress"),
                event(4, "progress"),
            ]
        assert frame["after"] == {JOB: 1}
        replay = [event(2, "progress"), event(3, "progress"), event(4, "progress")]
        return [b'{"type":"ack","id":"resub"}', *replay, event(5, "completed")]

    socket = Scripted(answer)
    monkeypatch.setattr(examples.ws_client, "connect", socket)
    submit = JobSubmit(id="submit", payload={}, idempotency_key="k")
    events = await follow_job("ws://coordinator", "key", submit, out=lambda line: None)
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert [f["type"] for f in socket.sent] == ["hello", "job.submit", "subscribe"]


async def test_a_frame_of_a_type_the_client_does_not_know_is_skipped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A newer coordinator may send a type this client does not know: it goes on (it raised,
    ending the example)."""

    def answer(frame: dict[str, Any]) -> list[bytes]:
        if frame["type"] == "hello":
            return [b'{"type":"welcome","protocol":1,"client_id":"c"}']
        ack = {"type": "ack", "id": frame["id"], "job": {"job_id": JOB}, "duplicate": False}
        return [
            orjson.dumps(ack),
            b'{"type":"quota.notice","left":3}',
            event(1, "queued"),
            event(2, "completed"),
        ]

    monkeypatch.setattr(examples.ws_client, "connect", Scripted(answer))
    submit = JobSubmit(id="submit", payload={}, idempotency_key="k")
    events = await follow_job("ws://coordinator", "key", submit, out=lambda line: None)
    assert [e.seq for e in events] == [1, 2]


@pytest.mark.parametrize(
    ("error", "why"),
    [
        ({"code": "invalid", "message": "constraints.gpu: too long"}, "job.submit refused"),
        ({"code": "payment_required", "message": "balance 0"}, "job.submit refused"),
    ],
)
async def test_a_submit_answered_with_an_error_ends_the_client(
    monkeypatch: pytest.MonkeyPatch, error: dict[str, str], why: str
) -> None:
    """It printed the error and then waited for ever for events of a job that was never made."""

    def answer(frame: dict[str, Any]) -> list[bytes]:
        if frame["type"] == "hello":
            return [b'{"type":"welcome","protocol":1,"client_id":"c"}']
        return [orjson.dumps({"type": "error", "id": frame["id"], **error})]

    monkeypatch.setattr(examples.ws_client, "connect", Scripted(answer))
    submit = JobSubmit(id="submit", payload={}, idempotency_key="k")
    with anyio.fail_after(5), pytest.raises(Refused) as refused:
        await follow_job("ws://coordinator", "key", submit, out=lambda line: None)
    assert str(refused.value) == f"{why}: {error['code']}: {error['message']}"


async def test_a_submit_the_store_could_not_take_is_sent_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``unavailable`` (the store could not be read) passes: the same submit, with its
    idempotency key, goes again on a new connection."""
    submits = 0

    def answer(frame: dict[str, Any]) -> list[bytes]:
        nonlocal submits
        if frame["type"] == "hello":
            return [b'{"type":"welcome","protocol":1,"client_id":"c"}']
        submits += 1
        if submits == 1:
            error = {"type": "error", "id": frame["id"], "code": "unavailable", "message": "x"}
            return [orjson.dumps(error)]
        ack = {"type": "ack", "id": frame["id"], "job": {"job_id": JOB}, "duplicate": False}
        return [orjson.dumps(ack), event(1, "queued"), event(2, "completed")]

    socket = Scripted(answer)
    monkeypatch.setattr(examples.ws_client, "connect", socket)
    submit = JobSubmit(id="submit", payload={}, idempotency_key="k")
    with anyio.fail_after(5):
        events = await follow_job(
            "ws://coordinator", "key", submit, out=lambda line: None, retry_after=0
        )
    assert [e.seq for e in events] == [1, 2]
    assert [f["idempotency_key"] for f in socket.sent if f["type"] == "job.submit"] == ["k", "k"]


async def test_a_followed_job_the_coordinator_no_longer_has_ends_the_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a reconnect the re-subscribe found no job (deleted by retention): it waited for
    ever."""
    connections = 0

    def answer(frame: dict[str, Any]) -> list[bytes]:
        if frame["type"] == "hello":
            return [b'{"type":"welcome","protocol":1,"client_id":"c"}']
        if frame["type"] == "job.submit":
            ack = {"type": "ack", "id": frame["id"], "job": {"job_id": JOB}, "duplicate": False}
            return [orjson.dumps(ack), event(1, "queued")]  # then the connection ends
        missing = {"type": "error", "code": "not_found", "message": f"job {JOB} not found"}
        return [orjson.dumps({**missing, "ref": JOB}), b'{"type":"ack","id":"resub"}']

    def connect(url: str, **kwargs: Any) -> Scripted:
        nonlocal connections
        connections += 1
        return Scripted(answer)

    monkeypatch.setattr(examples.ws_client, "connect", connect)
    submit = JobSubmit(id="submit", payload={}, idempotency_key="k")
    with anyio.fail_after(5), pytest.raises(Refused) as refused:
        await follow_job("ws://coordinator", "key", submit, out=lambda line: None, retry_after=0)
    assert str(refused.value) == f"job {JOB} is gone: job {JOB} not found"
    assert connections == 2


class OpenScripted(Scripted):
    """A ``Scripted`` socket the coordinator keeps open once it has sent what it answered, as
    a real one does: the client must not count on the connection ending to get unstuck."""

    async def _frames(self) -> AsyncIterator[bytes]:
        while True:
            while self.received:
                yield self.received.pop(0)
            await anyio.sleep_forever()


async def test_a_resubscribe_the_store_could_not_answer_is_sent_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a reconnect, the re-subscribe got ``error`` ``unavailable`` (the store could not be
    read; the socket stays open and follows nothing): the client printed it and waited for ever.
    It tries again on a new connection and shows each event once."""
    connections = 0

    def answer(frame: dict[str, Any]) -> list[bytes]:
        if frame["type"] == "hello":
            return [b'{"type":"welcome","protocol":1,"client_id":"c"}']
        if frame["type"] == "job.submit":  # then the first connection ends
            ack = {"type": "ack", "id": frame["id"], "job": {"job_id": JOB}, "duplicate": False}
            return [orjson.dumps(ack), event(1, "queued")]
        assert frame == {"type": "subscribe", "id": "resub", "job_ids": [JOB], "after": {JOB: 1}}
        if connections == 2:
            error = {"type": "error", "id": frame["id"], "code": "unavailable", "message": "x"}
            return [orjson.dumps(error)]
        return [b'{"type":"ack","id":"resub"}', event(2, "started"), event(3, "completed")]

    def connect(url: str, **kwargs: Any) -> Scripted:
        nonlocal connections
        connections += 1
        return Scripted(answer) if connections == 1 else OpenScripted(answer)

    lines: list[str] = []
    monkeypatch.setattr(examples.ws_client, "connect", connect)
    submit = JobSubmit(id="submit", payload={}, idempotency_key="k")
    with anyio.fail_after(5):
        events = await follow_job(
            "ws://coordinator", "key", submit, out=lines.append, retry_after=0
        )
    assert [e.seq for e in events] == [1, 2, 3]
    assert connections == 3
    assert "error unavailable: x" in lines


async def test_attempts_that_bring_nothing_wait_longer_each_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A store that stays unreadable: each new attempt waits twice as long as the one before, up
    to ``MAX_RETRY_AFTER`` (it tried twice a second for as long as it lasted); an attempt that
    brings something starts over."""
    submits = 0

    def answer(frame: dict[str, Any]) -> list[bytes]:
        nonlocal submits
        if frame["type"] == "hello":
            return [b'{"type":"welcome","protocol":1,"client_id":"c"}']
        if frame["type"] == "subscribe":
            return [b'{"type":"ack","id":"resub"}', event(2, "completed")]
        submits += 1
        if submits < 8:
            error = {"type": "error", "id": frame["id"], "code": "unavailable", "message": "x"}
            return [orjson.dumps(error)]
        ack = {"type": "ack", "id": frame["id"], "job": {"job_id": JOB}, "duplicate": False}
        return [orjson.dumps(ack), event(1, "queued")]  # then the connection ends

    waits: list[float] = []

    async def sleep(delay: float) -> None:
        waits.append(delay)

    monkeypatch.setattr(examples.ws_client, "connect", Scripted(answer))
    monkeypatch.setattr(anyio, "sleep", sleep)  # the client's waits, and only those here
    submit = JobSubmit(id="submit", payload={}, idempotency_key="k")
    with anyio.fail_after(5):
        events = await follow_job("ws://coordinator", "key", submit, out=lambda line: None)
    assert [e.seq for e in events] == [1, 2]
    assert waits == [0.5, 1, 2, 4, 8, 15, 15, 0.5]


@pytest.mark.parametrize("code", ["invalid", "conflict"])
async def test_a_resubscribe_refused_otherwise_ends_the_client(
    monkeypatch: pytest.MonkeyPatch, code: str
) -> None:
    """A re-subscribe answered with another error changed nothing, and would be answered so
    again: the client stops and says why (it waited for ever)."""

    def answer(frame: dict[str, Any]) -> list[bytes]:
        if frame["type"] == "hello":
            return [b'{"type":"welcome","protocol":1,"client_id":"c"}']
        if frame["type"] == "job.submit":
            ack = {"type": "ack", "id": frame["id"], "job": {"job_id": JOB}, "duplicate": True}
            return [orjson.dumps(ack)]
        return [orjson.dumps({"type": "error", "id": frame["id"], "code": code, "message": "no"})]

    monkeypatch.setattr(examples.ws_client, "connect", OpenScripted(answer))
    submit = JobSubmit(id="submit", payload={}, idempotency_key="k")
    with anyio.fail_after(5), pytest.raises(Refused) as refused:
        await follow_job("ws://coordinator", "key", submit, out=lambda line: None)
    assert str(refused.value) == f"subscribe to job {JOB} refused: {code}: no"


def test_a_url_that_is_not_a_websocket_url_ends_the_client_with_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--url http://…`` (or a typo in the scheme) ended in an InvalidURI traceback."""
    url = "http://127.0.0.1:8000/v1/jobs/ws"
    assert examples.ws_client.main(["--key", "k", "--url", url]) == 1
    err = capsys.readouterr().err
    assert err == f"{url} isn't a valid URI: scheme isn't ws or wss: check --url\n"


async def test_a_handshake_the_coordinator_broke_off_is_tried_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A coordinator going away during the opening handshake (its connection closed before the
    HTTP answer: ``InvalidMessage``) ended the client with a traceback; it is a lost connection
    like any other."""
    attempts = 0

    def answer(frame: dict[str, Any]) -> list[bytes]:
        if frame["type"] == "hello":
            return [b'{"type":"welcome","protocol":1,"client_id":"c"}']
        ack = {"type": "ack", "id": frame["id"], "job": {"job_id": JOB}, "duplicate": False}
        return [orjson.dumps(ack), event(1, "queued"), event(2, "completed")]

    def connect(url: str, **kwargs: Any) -> Scripted:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise InvalidMessage("did not receive a valid HTTP response")
        return Scripted(answer)

    lines: list[str] = []
    monkeypatch.setattr(examples.ws_client, "connect", connect)
    submit = JobSubmit(id="submit", payload={}, idempotency_key="k")
    with anyio.fail_after(5):
        events = await follow_job("ws://c", "key", submit, out=lines.append, retry_after=0)
    assert [e.seq for e in events] == [1, 2]
    assert lines[0] == (
        "connection to ws://c lost (did not receive a valid HTTP response); reconnecting"
    )


@pytest.mark.parametrize("frame", [b"not json", b"[]", b'{"type":"job.event","job_id":1}'])
async def test_a_frame_the_client_cannot_read_ends_it_with_one_line(
    monkeypatch: pytest.MonkeyPatch, frame: bytes
) -> None:
    """A server that is not the coordinator's client socket (or a broken one) sent a frame that
    is not a server message: the client ended with a RemoteProtocolError traceback."""

    def answer(sent: dict[str, Any]) -> list[bytes]:
        return [frame] if sent["type"] == "hello" else []

    monkeypatch.setattr(examples.ws_client, "connect", OpenScripted(answer))
    submit = JobSubmit(id="submit", payload={}, idempotency_key="k")
    with anyio.fail_after(5), pytest.raises(Refused) as refused:
        await follow_job("ws://c", "key", submit, out=lambda line: None)
    assert str(refused.value).startswith("ws://c sent a frame this client cannot read (")
    assert str(refused.value).endswith("): is it the coordinator's client socket (…/v1/jobs/ws)?")


def test_an_interrupt_ends_the_client_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C while it follows a job printed a KeyboardInterrupt traceback."""

    async def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(examples.ws_client, "follow_job", interrupted)
    assert examples.ws_client.main(["--key", "k"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


async def test_events_the_coordinator_lost_are_dropped_and_its_new_ones_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The coordinator came back without the job's last events (a power cut took its last
    commits): its ack says the log ends at seq 1 (``behind``), and the job's next events are
    numbered from there again. The client took them for events already shown, dropped them, and
    waited for ever; it drops what it showed past that seq, says so, and shows them."""
    connections = 0

    def answer(frame: dict[str, Any]) -> list[bytes]:
        if frame["type"] == "hello":
            return [b'{"type":"welcome","protocol":1,"client_id":"c"}']
        if frame["type"] == "job.submit":  # then the first connection ends
            ack = {"type": "ack", "id": frame["id"], "job": {"job_id": JOB}, "duplicate": False}
            return [orjson.dumps(ack), event(1, "queued"), event(2, "assigned")]
        assert frame["after"] == {JOB: 2}
        ack = {"type": "ack", "id": "resub", "missing": [], "behind": {JOB: 1}}
        return [orjson.dumps(ack), event(2, "canceled", error="gone")]

    def connect(url: str, **kwargs: Any) -> Scripted:
        nonlocal connections
        connections += 1
        return Scripted(answer) if connections == 1 else OpenScripted(answer)

    lines: list[str] = []
    monkeypatch.setattr(examples.ws_client, "connect", connect)
    submit = JobSubmit(id="submit", payload={}, idempotency_key="k")
    with anyio.fail_after(5):
        events = await follow_job("ws://c", "key", submit, out=lines.append, retry_after=0)
    assert [(e.seq, e.event) for e in events] == [(1, "queued"), (2, "canceled")]
    assert f"job {JOB}: the coordinator lost events 2-2 shown above; following it from 1" in lines


@pytest.mark.parametrize("option", ["--prompt", "--model", "--gpu", "--region", "--key", "--url"])
def test_an_argument_that_is_not_utf8_is_a_usage_error(
    option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A byte that is not UTF-8 in an argument (a Latin-1 terminal: Python hands it over as a
    lone surrogate) ended in a TypeError traceback from the encoder, after connecting."""
    argv = ["--key", "k", "--url", "ws://127.0.0.1:9/v1/jobs/ws", option, "caf\udce9"]
    with pytest.raises(SystemExit) as exited:
        examples.ws_client.main(argv)
    assert exited.value.code == 2
    assert capsys.readouterr().err.endswith(f"error: {option} is not valid UTF-8\n")


async def test_a_job_no_miner_can_serve_is_said_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ack's JobView says ``servable: false`` (no known miner matches its constraints): the
    client showed only ``#1 queued`` and then nothing until the job expired (15 minutes by
    default), leaving the user to guess why."""

    def answer(frame: dict[str, Any]) -> list[bytes]:
        if frame["type"] == "hello":
            return [b'{"type":"welcome","protocol":1,"client_id":"c"}']
        job = {"job_id": JOB, "servable": False, "constraints": {"gpu": "H100"}}
        job["expires_at"] = "2026-11-28T00:15:00.000Z"
        ack = {"type": "ack", "id": frame["id"], "job": job, "duplicate": False}
        return [orjson.dumps(ack), event(1, "queued"), event(2, "expired", error="ttl")]

    lines: list[str] = []
    monkeypatch.setattr(examples.ws_client, "connect", Scripted(answer))
    submit = JobSubmit(id="submit", payload={}, constraints={"gpu": "H100"})
    with anyio.fail_after(5):
        await follow_job("ws://c", "key", submit, out=lines.append)
    assert lines[:2] == [
        f"submitted {JOB}",
        'no miner the coordinator knows can serve its constraints {"gpu": "H100"}: it waits '
        "for one until 2026-11-28T00:15:00.000Z",
    ]


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ws://127.0.0.1:99999/v1/jobs/ws", "Port out of range 0-65535"),
        ("ws://127.0.0.1:abc/v1/jobs/ws", "Port could not be cast to integer value as 'abc'"),
        ("ws://[::1/v1/jobs/ws", "Invalid IPv6 URL"),
    ],
)
def test_a_url_whose_port_or_address_cannot_be_read_ends_the_client_with_one_line(
    url: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A port out of range or not a number, or a broken IPv6 address, in ``--url`` ended in a
    ValueError traceback from urllib, where a wrong scheme was one line."""
    assert examples.ws_client.main(["--key", "k", "--url", url]) == 1
    assert capsys.readouterr().err == f"{url} isn't a valid URI: {why}: check --url\n"


@pytest.mark.parametrize("example", ["ws_client", "ws_miner"])
def test_every_option_of_the_examples_says_what_it_is(
    example: str,
    argument_parsers: list[argparse.ArgumentParser],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--help`` listed ``--ttl TTL``, ``--gpu GPU``, ``--price PRICE``, … with no word on
    what they do or in which unit (seconds? a constraint or a capability?)."""
    module = examples.ws_client if example == "ws_client" else examples.ws_miner
    with pytest.raises(SystemExit):
        module.main(["--help"])
    capsys.readouterr()
    assert [a.option_strings for a in argument_parsers[0]._actions if not a.help] == []
