"""Ring 2: the lean HTTP protocol (web/lean_http.py) answers byte for byte as uvicorn's.

Each case is a list of writes on one connection. It runs twice, on a fresh app with the same
clock and ids: once through ``CoalescingHttpProtocol`` (uvicorn's cycle, every ASGI layer) and
once through ``LeanHttpProtocol``; the bytes written back and whether the connection was
closed must be the same, and the requests the lean protocol should take are really taken.
"""

from __future__ import annotations

import asyncio
import itertools
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import anyio
import orjson
import pytest
from starlette.middleware.gzip import GZipMiddleware
from uvicorn.config import Config
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.server import ServerState

from dispatcher import receipts
from dispatcher.jobs import JobState
from tests.conftest import CLIENT_KEY, MINER_KEY, make_settings
from tests.fakes import FakeClock
from tests.web.test_routing import _tiny_app
from tests.web.test_transport import FakeTransport
from web import rest_jobs, rest_miners
from web.app import create_app
from web.asgi import SocketFastPath
from web.http_protocol import CoalescingHttpProtocol
from web.lean_http import LeanCycle, LeanHttpProtocol, _DefaultLines, endpoint_app
from web.transport import CoalescingWSProtocol

if TYPE_CHECKING:
    from pathlib import Path

DEFAULT_HEADERS = [(b"date", b"Thu, 26 Nov 2026 11:00:00 GMT"), (b"server", b"uvicorn")]


def req(
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    version: str = "1.1",
) -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body is not None and "Transfer-Encoding" not in (headers or {}):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def js(data: Any) -> bytes:
    return orjson.dumps(data)


CLIENT = {"X-Api-Key": CLIENT_KEY}
MINER = {"X-Api-Key": MINER_KEY, "X-Miner-ID": "m1"}
JOB = js({"payload": {"type": "t"}, "constraints": {"gpu": "A100"}})
REGISTER = js({"capabilities": {"gpus": [{"name": "A100"}]}, "concurrency": 1})
POLL = js({"max_wait_seconds": 1})  # answered at once (1 s - 1 s)

LEAN, LAYERED = True, False
PARTIAL = {req("POST", "/v1/jobs", CLIENT, JOB)[:-5]}
# (writes on one connection, whether each request takes the lean path)
SESSION: list[tuple[bytes, list[bool]]] = [
    (req("POST", "/v1/miners/register", MINER, REGISTER), [LEAN]),
    (req("POST", "/v1/miners/heartbeat", MINER, b"{}"), [LEAN]),
    (req("POST", "/v1/miners/heartbeat", {**MINER, "X-Miner-ID": "m2"}, b"{}"), [LEAN]),
    (req("POST", "/v1/miners/poll", MINER, POLL), [LEAN]),  # 204, nothing queued
    (req("POST", "/v1/jobs", CLIENT, JOB), [LEAN]),
    (req("POST", "/v1/jobs", CLIENT, b"{"), [LEAN]),
    (req("POST", "/v1/jobs", CLIENT, b'{"payload": 3}'), [LEAN]),
    (req("POST", "/v1/jobs", CLIENT, b""), [LEAN]),
    (req("POST", "/v1/jobs", CLIENT, b"x" * 2_000_000), [LEAN]),  # 413
    (req("GET", "/v1/jobs/id-1", CLIENT), [LEAN]),
    (req("GET", "/v1/jobs/id%2D1", CLIENT), [LEAN]),
    (req("GET", "/v1/client/jobs/nope/status", CLIENT), [LEAN]),
    (req("GET", "/v1/jobs?limit=0", CLIENT), [LEAN]),
    (req("GET", "/v1/jobs?limit=5&status=queued", CLIENT), [LEAN]),
    (req("GET", "/v1/jobs"), [LEAN]),  # 401 with WWW-Authenticate
    (req("GET", "/v1/jobs", {"Authorization": "Bearer nope"}), [LEAN]),
    (req("GET", "/v1/jobs", MINER), [LEAN]),  # 403
    (req("HEAD", "/v1/jobs", CLIENT), [LAYERED]),
    (req("GET", "/v1/jobs", {**CLIENT, "X-Forwarded-For": "10.1.2.3"}), [LAYERED]),
    (req("PUT", "/v1/jobs", CLIENT), [LAYERED]),  # 405
    (req("GET", "/v1/jobs/", CLIENT), [LAYERED]),  # redirect
    (req("GET", "/v1/nope"), [LAYERED]),  # 404
    (req("GET", "/health/live"), [LAYERED]),
    (req("POST", "/v1/miners/poll", MINER, POLL), [LEAN]),  # 200: the queued job
    (req("POST", "/v1/miners/id-1/result", MINER, js({"result": {"ok": 1}})), [LEAN]),
    (req("POST", "/v1/miners/id-1/result", MINER, js({"result": {"ok": 1}})), [LEAN]),
    (req("POST", "/v1/miners/nope/result", MINER, js({"result": {}})), [LEAN]),
    (req("GET", "/v1/jobs/id-1/result", CLIENT), [LEAN]),
    (req("POST", "/v1/jobs/id-1/cancel", CLIENT), [LEAN]),  # 409
    (
        req("POST", "/v1/miners/id-1/fail", MINER, js({"error_code": "x", "error_message": "y"})),
        [LEAN],
    ),
    # Two requests in one write (pipelined), then one split in the middle of its body.
    (
        req("GET", "/v1/jobs/id-1", CLIENT)
        + req("GET", "/v1/miner/jobs?max_wait_seconds=1", MINER),
        [LEAN, LEAN],
    ),
    (req("POST", "/v1/jobs", CLIENT, JOB)[:-5], [LEAN]),
    (JOB[-5:], []),
    (
        req(
            "POST",
            "/v1/jobs",
            {**CLIENT, "Transfer-Encoding": "chunked"},
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(JOB), JOB),
        ),
        [LEAN],
    ),
    (req("POST", "/v1/miners/heartbeat", {**MINER, "Expect": "100-continue"}, b"{}"), [LEAN]),
    (req("GET", "/v1/jobs", CLIENT, version="1.0"), [LEAN]),  # closes the connection
]
SHORT: dict[str, list[tuple[bytes, list[bool]]]] = {
    "close": [(req("POST", "/v1/jobs", {**CLIENT, "Connection": "close"}, JOB), [LEAN])],
    # A declared body over the limit: answered before it arrives.
    "rate limited": [
        (req("POST", "/v1/miners/heartbeat", MINER, b"{}"), [LEAN]),  # 404: not registered
        (req("POST", "/v1/miners/heartbeat", MINER, b"{}"), [LEAN]),  # 429 with Retry-After
    ],
    "too large": [
        (req("POST", "/v1/jobs", {**CLIENT, "Content-Length": "9999999"}), [LEAN]),
        (b"{" * 1000, []),
    ],
}


def _connect(
    cls: type[CoalescingHttpProtocol], app: Any, state: ServerState | None = None
) -> tuple[CoalescingHttpProtocol, FakeTransport, ServerState]:
    """A connection to ``app`` served by ``cls`` (a new server unless ``state`` is given)."""
    config = Config(app=app, ws=CoalescingWSProtocol, lifespan="off", log_level="warning")
    config.load()
    if state is None:
        state = ServerState()
        state.default_headers = list(DEFAULT_HEADERS)
    proto = cls(config=config, server_state=state, app_state={})
    transport = FakeTransport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    return proto, transport, state


async def _run(
    cls: type[CoalescingHttpProtocol], app: Any, writes: list[bytes]
) -> list[tuple[bytes, bool, list[bool]]]:
    """Each write's answer: the bytes written back, whether the connection was closed, and
    for each request started, whether it ran in a ``LeanCycle``. A write in ``PARTIAL`` leaves
    its request waiting for the next one."""
    proto, transport, state = _connect(cls, app)
    started: list[bool] = []
    start = proto._start_asgi_task

    def record(cycle: Any, app: Any) -> None:
        started.append(isinstance(cycle, LeanCycle))
        start(cycle, app)

    proto._start_asgi_task = record  # type: ignore[method-assign]
    out = []
    for data in writes:
        before = len(transport.writes)
        started.clear()
        proto.data_received(data)
        if data in PARTIAL:
            await asyncio.sleep(0)
        while data not in PARTIAL and state.tasks:
            # A pipelined request's task starts when the one before it completes.
            await asyncio.gather(*state.tasks, return_exceptions=True)
        out.append((b"".join(transport.writes[before:]), transport.closing, list(started)))
    proto.connection_lost(None)
    return out


async def _session(
    cls: type[CoalescingHttpProtocol], tmp: Path, writes: list[bytes], **settings: Any
) -> Any:
    ids = itertools.count(1)
    tokens = itertools.count(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rest_jobs, "new_id", lambda: f"id-{next(ids)}")
        mp.setattr(receipts, "new_id", lambda: f"receipt-{next(ids)}")
        token = SimpleNamespace(uuid4=lambda: SimpleNamespace(hex=f"t{next(tokens)}"))
        mp.setattr(rest_miners, "uuid", token)
        if settings.pop("tiny", False):
            return await _run(cls, SocketFastPath(_tiny_app(tmp)), writes)
        db = f"sqlite:///{tmp}/{cls.__name__}.db"
        app = create_app(make_settings(tmp, database_url=db, **settings), clock=FakeClock())
        async with app.router.lifespan_context(app):
            return await _run(cls, SocketFastPath(app), writes)


async def _compare(session: list[tuple[bytes, list[bool]]], tmp: Path, **settings: Any) -> set[int]:
    """Runs ``session`` on both protocols, checks the answers are equal; their statuses."""
    writes = [data for data, _ in session]
    layered = await _session(CoalescingHttpProtocol, tmp, writes, **settings)
    lean = await _session(LeanHttpProtocol, tmp, writes, **settings)
    statuses = set()
    for (data, expected), (a, a_closed, a_cycles), (b, b_closed, b_cycles) in zip(
        session, layered, lean, strict=True
    ):
        what = data[:60]
        assert a == b, what
        assert a_closed == b_closed, what
        assert not any(a_cycles), what
        assert b_cycles == expected, what
        statuses.update(int(line[9:12]) for line in b.split(b"\r\n") if line.startswith(b"HTTP/1."))
    return statuses


@pytest.mark.anyio
async def test_the_lean_protocol_answers_a_session_byte_for_byte_as_uvicorns(
    tmp_path: Path,
) -> None:
    statuses = await _compare(SESSION, tmp_path)
    # The session covers the answers that matter.
    assert {100, 200, 201, 204, 307, 401, 403, 404, 405, 409, 413, 422} <= statuses


@pytest.mark.anyio
@pytest.mark.parametrize("name", list(SHORT))
async def test_the_lean_protocol_closes_and_refuses_as_uvicorn_does(
    tmp_path: Path, name: str
) -> None:
    settings = {"rate_limit_per_minute": 1} if name == "rate limited" else {}
    expected = {"close": {201}, "rate limited": {404, 429}, "too large": {413}}[name]
    assert await _compare(SHORT[name], tmp_path, **settings) == expected


@pytest.mark.anyio
async def test_exceptions_reach_the_apps_handlers_on_the_lean_path_too(tmp_path: Path) -> None:
    session = [(req("GET", "/teapot"), [LEAN]), (req("GET", "/boom"), [LEAN])]
    assert await _compare(session, tmp_path, tiny=True) == {418, 500}


@pytest.mark.anyio
async def test_only_layers_that_pass_requests_through_are_skipped(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path))
    config = Config(app=SocketFastPath(app), lifespan="off", log_level="warning")
    config.load()
    assert endpoint_app(config.loaded_app) is app
    assert endpoint_app(ProxyHeadersMiddleware(GZipMiddleware(app))) is None
    config = Config(app=app, lifespan="off", root_path="/api", log_level="warning")
    config.load()
    proto = LeanHttpProtocol(config=config, server_state=ServerState(), app_state={})
    assert proto._endpoints is None  # a root_path: every request the layered way


async def _parked_pickup(
    cls: type[CoalescingHttpProtocol], tmp: Path, *, hang_up: bool | str = False
) -> tuple[bytes, bool, Any]:
    """A miner's long-poll parks (and its client hangs up, with ``hang_up``), then a client's
    submit on another connection is assigned to it: the miner connection's bytes, whether the
    poll's answer had been written by the time the batch that committed the assignment was
    performed, and the job as the scheduler holds it once everything settled."""
    ids = itertools.count(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rest_jobs, "new_id", lambda: f"id-{next(ids)}")
        mp.setattr(rest_miners, "uuid", SimpleNamespace(uuid4=lambda: SimpleNamespace(hex="t")))
        db = f"sqlite:///{tmp}/{cls.__name__}{hang_up}.db"
        app = create_app(make_settings(tmp, database_url=db), clock=FakeClock())
        async with app.router.lifespan_context(app):
            miner, miner_out, state = _connect(cls, SocketFastPath(app))
            client, _, _ = _connect(cls, SocketFastPath(app), state)
            miner.data_received(req("POST", "/v1/miners/register", MINER, REGISTER))
            await asyncio.gather(*state.tasks)
            dispatcher = app.state.core.dispatcher
            miner.data_received(req("POST", "/v1/miners/poll", MINER, js({"max_wait_seconds": 20})))
            for _ in range(100):  # until the poll waits on the server
                if dispatcher.scheduler.miners["m1"].polls:
                    break
                await asyncio.sleep(0)
            assert dispatcher.scheduler.miners["m1"].polls == 1
            if hang_up == "unheard":  # marked gone, the close itself not processed yet
                miner.cycle.disconnected = True
            elif hang_up:
                miner.connection_lost(None)
                with anyio.fail_after(5):  # the poll ends now, not at its 20 s deadline
                    await asyncio.gather(*state.tasks)
                assert dispatcher.scheduler.miners["m1"].polls == 0  # withdrawn
            answered_in_batch: list[bool] = []
            perform = dispatcher._perform

            def watched(actions: Any) -> None:
                perform(actions)
                answered_in_batch.append(b"id-1" in b"".join(miner_out.writes))

            mp.setattr(dispatcher, "_perform", watched)
            client.data_received(req("POST", "/v1/jobs", CLIENT, JOB))
            await asyncio.gather(*state.tasks)
            await dispatcher.wait_flushed()
            if hang_up is not True:
                miner.connection_lost(None)
            client.connection_lost(None)
            job = dispatcher.scheduler.jobs["id-1"]
            return b"".join(miner_out.writes), answered_in_batch[0], job


@pytest.mark.anyio
async def test_a_parked_long_poll_is_answered_by_the_batch_that_commits_its_job(
    tmp_path: Path,
) -> None:
    layered, layered_in_batch, _ = await _parked_pickup(CoalescingHttpProtocol, tmp_path)
    lean, lean_in_batch, job = await _parked_pickup(LeanHttpProtocol, tmp_path)
    assert lean == layered  # the same bytes, whoever writes them
    assert lean.count(b"HTTP/1.1 200") == 2  # register, then the poll with the job
    assert b'"job_id":"id-1"' in lean
    assert lean_in_batch  # written by the batch: no wait for the poll's task to run
    assert not layered_in_batch  # the ASGI path answers from the poll's task, later
    assert (job.state, job.miner_id, job.attempt) == (JobState.RUNNING, "m1", 1)


@pytest.mark.anyio
@pytest.mark.parametrize("cls", [LeanHttpProtocol, CoalescingHttpProtocol])
async def test_a_long_poll_whose_miner_hung_up_is_withdrawn_at_once(
    tmp_path: Path, cls: type[CoalescingHttpProtocol]
) -> None:
    # The lean path hears it from the connection, the ASGI path from ``receive``: either way
    # the poll stops counting as a waiting miner, so the next job is never offered to it.
    out, _, job = await _parked_pickup(cls, tmp_path, hang_up=True)
    assert b"id-1" not in out  # nothing was written to the closed connection
    # Never assigned (attempt 0): not offered to the gone miner and handed back.
    assert (job.state, job.miner_id, job.attempt, job.failures) == (JobState.QUEUED, None, 0, 0)


@pytest.mark.anyio
async def test_a_job_assigned_to_a_long_poll_whose_miner_just_hung_up_goes_back_to_the_queue(
    tmp_path: Path,
) -> None:
    # The assignment was made before the hang-up was heard (the connection is marked
    # disconnected, the close not yet processed): the batch that commits it finds nobody to
    # answer and hands the job back, not charged (attempt 1 was the gone miner's). The next
    # poll of any miner gets it (attempt 2 is its fencing token), instead of it waiting on a
    # gone miner until its lease runs out.
    out, _, job = await _parked_pickup(LeanHttpProtocol, tmp_path, hang_up="unheard")
    assert b"id-1" not in out
    assert (job.state, job.miner_id, job.attempt, job.failures) == (JobState.QUEUED, None, 1, 0)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "extra", [(b"connection", b"close"), (b"x-bad", b"a\nb")], ids=["framing", "invalid"]
)
async def test_default_headers_the_lean_path_cannot_write_go_uvicorns_way(
    tmp_path: Path, extra: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server header (``--header``) uvicorn acts on or refuses: every answer through ASGI
    # ``send`` (an invalid one fails uvicorn's 500 too: nothing is written, the connection
    # closes).
    monkeypatch.setitem(globals(), "DEFAULT_HEADERS", [*DEFAULT_HEADERS, extra])
    session = [(req("GET", "/v1/jobs", CLIENT), [LEAN])]  # either closes the connection
    assert await _compare(session, tmp_path) == ({200} if extra[0] == b"connection" else set())


def test_default_header_lines_are_rendered_once_per_list() -> None:
    lines = _DefaultLines()
    headers = list(DEFAULT_HEADERS)
    first = lines(headers)
    assert first == [
        b"date",
        b": ",
        DEFAULT_HEADERS[0][1],
        b"\r\n",
        b"server",
        b": ",
        b"uvicorn",
        b"\r\n",
    ]
    assert lines(headers) is first
    assert lines([(b"Server", b"x")]) == [b"server", b": ", b"x", b"\r\n"]
    assert lines([(b"Connection", b"close")]) is None
