"""examples/ws_miner.py against a scripted coordinator: what it sends again after a resume."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Self

import anyio
import orjson
import pytest
from websockets.exceptions import ConnectionClosedError

import examples.ws_miner
from examples.ws_miner import MinerOptions, SimulatedMiner

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from types import TracebackType

pytestmark = pytest.mark.anyio

JOB = "0" * 32
DROP = b"drop"  # the connection breaks here (no close frame)


class Connection:
    """One scripted miner socket: ``answer`` gives the frames for each frame the miner sends."""

    def __init__(self, answer: Callable[[dict[str, Any]], list[bytes]]) -> None:
        self.answer = answer
        self.sent: list[dict[str, Any]] = []
        self._in, self._out = anyio.create_memory_object_stream[bytes](100)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._in.close()
        self._out.close()

    async def send(self, text: str) -> None:
        frame = orjson.loads(text)
        self.sent.append(frame)
        for out in self.answer(frame):
            self._in.send_nowait(out)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._frames()

    async def _frames(self) -> AsyncIterator[bytes]:
        async for frame in self._out:
            if frame == DROP:
                raise ConnectionClosedError(None, None)
            yield frame


class Coordinator:
    """``connect`` for the example: each call is the next scripted connection."""

    def __init__(self, *connections: Connection) -> None:
        self.connections = list(connections)
        self.used: list[Connection] = []

    def __call__(self, url: str, **kwargs: Any) -> Connection:
        conn = self.connections.pop(0)
        self.used.append(conn)
        return conn


def welcome(session: str) -> bytes:
    frame = {"type": "welcome", "protocol": 1, "session_id": session, "miner_id": "m"}
    return orjson.dumps({**frame, "heartbeat_interval": 10, "heartbeat_timeout": 30})


async def test_a_result_whose_ack_was_lost_with_the_connection_gets_its_receipt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The connection broke after the miner sent its result and before the ack came: the
    coordinator took it (the job completed, so the resume lists it neither in ``resumed`` nor
    in ``revoked``), and the miner dropped it unsent, never learning its receipt (with
    ``max_jobs`` it ran for ever). It sends it again; the ack brings the same receipt."""
    receipt = {"receipt_id": "r1", "job_id": JOB}

    def first(frame: dict[str, Any]) -> list[bytes]:
        if frame["type"] == "hello":
            assign = {"type": "job.assign", "job_id": JOB, "attempt": 1, "payload": {}}
            assign |= {"constraints": {}, "expires_at": "2026-11-28T00:00:00.000Z"}
            return [welcome("s1"), orjson.dumps(assign)]
        return [DROP] if frame["type"] == "job.result" else []

    def second(frame: dict[str, Any]) -> list[bytes]:
        if frame["type"] == "hello":
            assert frame["resume"] == {"session_id": "s1"}
            return [welcome("s2")]
        if frame["type"] == "job.result":
            return [
                orjson.dumps({"type": "ack", "id": frame["id"], "job_id": JOB, "receipt": receipt})
            ]
        return []

    coordinator = Coordinator(Connection(first), Connection(second))
    monkeypatch.setattr(examples.ws_miner, "connect", coordinator)
    opts = MinerOptions(key="k", delay=0, chunks=1, load_interval=0, max_jobs=1)
    miner = SimulatedMiner(opts, log=lambda line: None)
    with anyio.fail_after(5):
        await miner.run()
    assert miner.receipts == {JOB: receipt}
    assert [f["type"] for f in coordinator.used[1].sent] == ["hello", "job.result"]


def test_a_url_that_is_not_a_websocket_url_ends_the_miner_with_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--url http://…`` ended in an InvalidURI traceback (the client example's rule: one line)."""
    url = "http://127.0.0.1:8000/v1/miners/ws"
    assert examples.ws_miner.main(["--key", "k", "--url", url, "--load-interval", "0"]) == 1
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    assert f"{url} isn't a valid URI: scheme isn't ws or wss: check --url" in out.out + out.err


async def test_a_result_the_store_could_not_take_is_sent_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A result answered ``unavailable`` (the coordinator could not read its database: a job no
    longer in memory) was taken as settled: never sent again, its receipt never came, and with
    ``max_jobs`` the miner ran for ever. It goes again, after a pause, until it is answered."""
    receipt = {"receipt_id": "r1", "job_id": JOB}
    results = 0

    def answer(frame: dict[str, Any]) -> list[bytes]:
        nonlocal results
        if frame["type"] == "hello":
            assign = {"type": "job.assign", "job_id": JOB, "attempt": 1, "payload": {}}
            assign |= {"constraints": {}, "expires_at": "2026-11-28T00:00:00.000Z"}
            return [welcome("s1"), orjson.dumps(assign)]
        if frame["type"] != "job.result":
            return []
        results += 1
        if results < 3:
            error = {"type": "error", "id": frame["id"], "code": "unavailable", "message": "x"}
            return [orjson.dumps(error)]
        return [orjson.dumps({"type": "ack", "id": frame["id"], "job_id": JOB, "receipt": receipt})]

    coordinator = Coordinator(Connection(answer))
    monkeypatch.setattr(examples.ws_miner, "connect", coordinator)
    opts = MinerOptions(key="k", delay=0, chunks=1, load_interval=0, max_jobs=1, retry_after=0)
    miner = SimulatedMiner(opts, log=lambda line: None)
    with anyio.fail_after(5):
        await miner.run()
    assert miner.receipts == {JOB: receipt}
    sent = [f for f in coordinator.used[0].sent if f["type"] == "job.result"]
    assert len(sent) == 3
    assert len({f["id"] for f in sent}) == 1  # the same request each time


async def test_a_frame_the_miner_cannot_read_ends_it_with_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server that is not the coordinator's miner socket sent a frame that is not a server
    message: the miner ended with a RemoteProtocolError traceback (in an exception group)."""

    def answer(frame: dict[str, Any]) -> list[bytes]:
        return [b"<html>not a coordinator</html>"] if frame["type"] == "hello" else []

    monkeypatch.setattr(examples.ws_miner, "connect", Coordinator(Connection(answer)))
    lines: list[str] = []
    miner = SimulatedMiner(MinerOptions(key="k", load_interval=0), log=lines.append)
    with anyio.fail_after(5):
        await miner.run()
    assert miner.refused is not None
    assert lines == [
        "ws://127.0.0.1:8000/v1/miners/ws sent a frame this miner cannot read (malformed JSON "
        "(close 1007)): is it the coordinator's miner socket (…/v1/miners/ws)?"
    ]


@pytest.mark.parametrize("option", ["--gpu", "--models", "--region", "--miner-id", "--key"])
def test_an_argument_that_is_not_utf8_is_a_usage_error(
    option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A byte that is not UTF-8 in an argument (Python hands it over as a lone surrogate) ended
    in a TypeError traceback from the encoder once connected, as in the client example."""
    argv = ["--key", "k", "--url", "ws://127.0.0.1:9/v1/miners/ws", option, "caf\udce9"]
    with pytest.raises(SystemExit) as exited:
        examples.ws_miner.main(argv)
    assert exited.value.code == 2
    assert capsys.readouterr().err.endswith(f"error: {option} is not valid UTF-8\n")


@pytest.mark.parametrize("seed", ["zz", "abcd", "00" * 33])
def test_a_sign_results_seed_that_is_no_seed_is_a_usage_error(
    seed: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--sign-results`` with a mistyped seed ended in a ValueError traceback."""
    with pytest.raises(SystemExit) as exited:
        examples.ws_miner.main(["--key", "k", "--sign-results", seed])
    assert exited.value.code == 2
    assert capsys.readouterr().err.endswith(
        "error: --sign-results must be an Ed25519 seed: 64 hex digits (32 bytes)\n"
    )


@pytest.mark.parametrize(
    "url", ["ws://127.0.0.1:99999/v1/miners/ws", "ws://127.0.0.1:abc/x", "ws://[::1/x"]
)
def test_a_url_whose_port_or_address_cannot_be_read_ends_the_miner_with_one_line(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """As the client: a ValueError traceback (in an exception group) from urllib, for the first
    ``--url`` or a standby's."""
    argv = ["--key", "k", "--url", "ws://127.0.0.1:9/v1/miners/ws", "--url", url]
    assert examples.ws_miner.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{url} isn't a valid URI: ")
    assert err.endswith(": check --url\n")
    assert len(err.splitlines()) == 1


async def test_the_miner_says_which_jobs_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """It said nothing of the jobs it ran: a new user saw "welcome as m" and then silence, and
    could not tell a miner at work from one no job reached. One line when a job is assigned,
    one when its receipt comes."""
    receipt = {"receipt_id": "r1", "job_id": JOB}

    def answer(frame: dict[str, Any]) -> list[bytes]:
        if frame["type"] == "hello":
            assign = {"type": "job.assign", "job_id": JOB, "attempt": 2, "payload": {}}
            assign |= {"constraints": {}, "expires_at": "2026-11-28T00:00:00.000Z"}
            return [welcome("s1"), orjson.dumps(assign)]
        if frame["type"] != "job.result":
            return []
        return [orjson.dumps({"type": "ack", "id": frame["id"], "job_id": JOB, "receipt": receipt})]

    monkeypatch.setattr(examples.ws_miner, "connect", Coordinator(Connection(answer)))
    lines: list[str] = []
    opts = MinerOptions(key="k", delay=0, chunks=1, load_interval=0, max_jobs=1)
    with anyio.fail_after(5):
        await SimulatedMiner(opts, log=lines.append).run()
    assert lines[1:] == [f"job {JOB} assigned (attempt 2)", f"job {JOB} completed (receipt r1)"]
