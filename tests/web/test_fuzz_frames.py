"""Fuzzing both sockets in process: bad frames end in a contract close code, never a crash.

Each example opens one socket and sends frames one at a time, drawn up front from a mix of
garbage (text, non-objects, binary, oversized frames, random objects) and plausible messages.
Job ids in plausible messages are ``@ref<n>`` placeholders resolved to ids the server has
mentioned on that socket, so the fuzz also reaches accept, progress, result, cancel and
subscribe on live jobs. After every frame a probe request is sent and the test reads until its
reply (the session is alive) or the close frame (its code must be one the contract gives to
bad input).
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.conftest import CLIENT_KEY, MINER_KEY, make_settings
from web.app import create_app

if TYPE_CHECKING:
    from collections.abc import Iterator

    from starlette.testclient import WebSocketTestSession

from starlette.testclient import TestClient

ALLOWED_CLOSE_CODES = {1003, 1007, 1009, 4000, 4002, 4401, 4403}
MAX_FRAME = 2048
MINER_PATH, CLIENT_PATH = "/v1/miners/ws", "/v1/jobs/ws"
REF = "@ref"

MINER_TYPES = (
    "auth",
    "hello",
    "job.accept",
    "job.reject",
    "job.progress",
    "job.result",
    "job.fail",
    "status",
    "heartbeat",
)
CLIENT_TYPES = ("auth", "hello", "job.submit", "subscribe", "unsubscribe", "job.cancel")
FIELDS = (
    "id",
    "type",
    "protocol",
    "token",
    "miner_id",
    "capabilities",
    "concurrency",
    "region",
    "resume",
    "job_id",
    "attempt",
    "reason",
    "progress",
    "message",
    "output",
    "result",
    "metrics",
    "error_code",
    "error_message",
    "retryable",
    "draining",
    "payload",
    "constraints",
    "ttl_seconds",
    "priority",
    "idempotency_key",
    "job_ids",
    "after",
)

# ---- strategies ---------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(["all", "gpu-1", "A100", "0" * 32, "1", ""])
)
keys = st.sampled_from(FIELDS) | st.text(max_size=8)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)
small_objects = st.dictionaries(st.text(max_size=6), scalars, max_size=3)
capabilities = st.one_of(
    st.just({}),
    st.just({"gpus": [{"name": "A100", "memory_mb": 40960}], "models": ["llama"], "price": 1}),
    json_values,
)
constraints = st.one_of(
    st.just({}),
    st.just({"gpu": "A100"}),
    st.just({"models": ["llama"], "max_price": 2}),
    st.just({"region": "mars"}),
    json_values,
)


def _message(kind: str, job_ids: st.SearchStrategy[str]) -> st.SearchStrategy[dict[str, Any]]:
    """A message of ``kind`` with plausible (mostly valid) fields."""
    attempt = {"attempt": st.integers(0, 4)}
    fd = st.fixed_dictionaries
    templates: dict[str, st.SearchStrategy[dict[str, Any]]] = {
        "auth": fd({"token": st.sampled_from([CLIENT_KEY, MINER_KEY, "not-a-key-at-all"])}),
        "hello": fd(
            {"protocol": st.sampled_from([1, 1, 1, 2])},
            optional={
                "miner_id": st.sampled_from(["gpu-1", "gpu-2", "x" * 129]),
                "capabilities": capabilities,
                "concurrency": st.integers(0, 3),
                "region": st.sampled_from(["eu-west", "mars"]),
                "resume": fd({"session_id": st.text(max_size=8)}),
            },
        ),
        "job.accept": fd({"job_id": job_ids}, optional=attempt),
        "job.reject": fd({"job_id": job_ids}, optional={"reason": st.text(max_size=8), **attempt}),
        "job.progress": fd(
            {"job_id": job_ids},
            optional={
                "progress": st.floats(-0.5, 1.5),
                "message": st.text(max_size=8),
                "output": st.text(max_size=8),
                **attempt,
            },
        ),
        "job.result": fd(
            {"job_id": job_ids, "result": small_objects},
            optional={"metrics": small_objects, **attempt},
        ),
        "job.fail": fd(
            {
                "job_id": job_ids,
                "error_code": st.text(max_size=6),
                "error_message": st.text(max_size=6),
            },
            optional={"retryable": st.booleans(), **attempt},
        ),
        "status": fd({}, optional={"concurrency": st.integers(0, 4), "draining": st.booleans()}),
        "heartbeat": fd({}, optional={"metrics": small_objects}),
        "job.submit": fd(
            {"payload": small_objects},
            optional={
                "constraints": constraints,
                "ttl_seconds": st.integers(0, 100),
                "priority": st.integers(-5, 5),
                "idempotency_key": st.sampled_from(["k1", "k2"]),
            },
        ),
        "subscribe": fd(
            {"job_ids": st.just("all") | st.lists(job_ids, max_size=3)},
            optional={"after": st.dictionaries(job_ids, st.integers(-1, 4), max_size=2)},
        ),
        "unsubscribe": fd({"job_ids": st.just("all") | st.lists(job_ids, max_size=3)}),
        "job.cancel": fd({"job_id": job_ids}),
    }
    return st.builds(
        lambda body, request_id, extra: {
            **extra,
            "type": kind,
            **body,
            **({} if request_id is None else {"id": request_id}),
        },
        templates[kind],
        st.sampled_from([None, "r1", "x" * 65]) | st.text(max_size=6),
        st.sampled_from([{}, {}, {}, {"unknown": 1}])
        | st.dictionaries(keys, json_values, max_size=2),
    )


def frames(types: tuple[str, ...]) -> st.SearchStrategy[Any]:
    """A frame to send: bytes, text, or a JSON object whose ``@ref<n>`` strings name job ids."""
    job_ids = st.integers(0, 7).map(lambda i: f"{REF}{i}") | st.sampled_from(
        ["0" * 32, "j", "", "x" * 200]
    )
    plausible = st.sampled_from(types).flatmap(lambda kind: _message(kind, job_ids))
    garbage_objects = st.builds(
        lambda t, fields: {"type": t, **fields},
        st.sampled_from(types) | st.text(max_size=12) | json_values,
        st.dictionaries(keys, json_values, max_size=6),
    )
    return st.one_of(
        *[plausible] * 6,
        garbage_objects,
        json_values.map(json.dumps),
        st.text(max_size=40),
        st.integers(MAX_FRAME + 1, MAX_FRAME * 2).map(lambda n: json.dumps({"type": "x" * n})),
        st.binary(max_size=16),
    )


def sessions(types: tuple[str, ...]) -> st.SearchStrategy[tuple[bool, list[Any]]]:
    """(say hello first?, frames): drawn up front, independent of what the server answers."""
    return st.tuples(
        st.sampled_from([True, True, True, False]), st.lists(frames(types), min_size=1, max_size=8)
    )


def resolve(value: Any, known: list[str]) -> Any:
    """Replace ``@ref<n>`` strings with the n-th job id the server mentioned (cycling)."""
    if isinstance(value, str) and value.startswith(REF) and value[len(REF) :].isdigit():
        return known[int(value[len(REF) :]) % len(known)] if known else "0" * 32
    if isinstance(value, dict):
        return {resolve(k, known): resolve(v, known) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, known) for v in value]
    return value


# ---- the peer -----------------------------------------------------------------------------


class Peer:
    """One fuzzed socket: sends frames, syncs with probes, remembers job ids it has seen."""

    def __init__(self, ws: WebSocketTestSession, path: str) -> None:
        self.ws = ws
        self.path = path
        self.welcomed = False
        self.known: list[str] = []
        self.close_code: int | None = None

    def send(self, frame: Any) -> None:
        if isinstance(frame, bytes):
            self.ws.send_bytes(frame)
        elif isinstance(frame, str):
            self.ws.send_text(frame)
        else:
            self.ws.send_text(json.dumps(resolve(frame, self.known)))

    def _probe(self, probe_id: str) -> dict[str, Any]:
        if not self.welcomed:
            return {"type": probe_id, "id": probe_id}  # unknown type: an immediate error
        if self.path == MINER_PATH:  # acked once everything before it is committed
            return {"type": "heartbeat", "id": probe_id}
        return {"type": "job.cancel", "id": probe_id, "job_id": probe_id}  # not_found, same

    def sync(self) -> bool:
        """Send a probe and read up to its reply; False once the server closed the socket."""
        probe_id = f"probe-{uuid.uuid4().hex}"
        self.ws.send_text(json.dumps(self._probe(probe_id)))
        while True:
            msg = self.ws.receive()
            if msg["type"] == "websocket.close":
                self.close_code = msg["code"]
                return False
            reply = json.loads(msg["text"])
            assert isinstance(reply, dict)
            assert reply["type"] in (
                "welcome",
                "ack",
                "error",
                "job.event",
                "job.assign",
                "job.cancel",
            )
            self._learn(reply)
            if reply.get("id") == probe_id:
                assert reply["type"] in ("ack", "error")
                return True

    def _learn(self, reply: dict[str, Any]) -> None:
        if reply["type"] == "welcome":
            self.welcomed = True
        job = reply.get("job")
        for job_id in (reply.get("job_id"), job.get("job_id") if isinstance(job, dict) else None):
            if isinstance(job_id, str) and job_id not in self.known:
                self.known.append(job_id)


def fuzz_session(c: TestClient, path: str, key: str, session: tuple[bool, list[Any]]) -> int | None:
    """Play one drawn session; the close code, or None when the socket stayed open."""
    hello_first, sent = session
    with c.websocket_connect(path, headers={"X-Api-Key": key}) as ws:
        peer = Peer(ws, path)
        for frame in ([{"type": "hello", "protocol": 1}] if hello_first else []) + sent:
            peer.send(frame)
            if not peer.sync():
                return peer.close_code
    return None


# ---- fixtures -----------------------------------------------------------------------------


class ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def errors() -> Iterator[ErrorLog]:
    handler = ErrorLog()
    logger = logging.getLogger("aitbc.coordinator")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, errors: ErrorLog) -> Iterator[TestClient]:
    app = create_app(make_settings(tmp_path_factory.mktemp("fuzz"), max_frame_bytes=MAX_FRAME))
    with TestClient(app) as c:
        yield c


def assert_still_serving(c: TestClient) -> None:
    """A fresh client can say hello and submit a job; a fresh miner is welcomed."""
    with c.websocket_connect(CLIENT_PATH, headers={"X-Api-Key": CLIENT_KEY}) as ws:
        ws.send_json({"type": "hello", "protocol": 1})
        assert ws.receive_json()["type"] == "welcome"
        ws.send_json({"type": "job.submit", "id": "after-fuzz", "payload": {"prompt": "ok"}})
        ack = ws.receive_json()
        assert (ack["type"], ack["id"], ack["job"]["state"]) == ("ack", "after-fuzz", "QUEUED")
    with c.websocket_connect(MINER_PATH, headers={"X-Api-Key": MINER_KEY}) as ws:
        ws.send_json({"type": "hello", "protocol": 1, "miner_id": "follow-up"})
        assert ws.receive_json()["type"] == "welcome"


# ---- tests --------------------------------------------------------------------------------

FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(session=sessions(MINER_TYPES))
def test_miner_socket_survives_arbitrary_frames(
    client: TestClient, errors: ErrorLog, session: tuple[bool, list[Any]]
) -> None:
    """Arbitrary frames on /v1/miners/ws: a contract close code or a live session, no crash."""
    code = fuzz_session(client, MINER_PATH, MINER_KEY, session)
    assert code is None or code in ALLOWED_CLOSE_CODES
    assert errors.records == []
    assert_still_serving(client)


@FUZZ
@given(session=sessions(CLIENT_TYPES))
def test_client_socket_survives_arbitrary_frames(
    client: TestClient, errors: ErrorLog, session: tuple[bool, list[Any]]
) -> None:
    """Arbitrary frames on /v1/jobs/ws: a contract close code or a live session, no crash."""
    code = fuzz_session(client, CLIENT_PATH, CLIENT_KEY, session)
    assert code is None or code in ALLOWED_CLOSE_CODES
    assert errors.records == []
    assert_still_serving(client)


@pytest.mark.parametrize(("path", "key"), [(MINER_PATH, MINER_KEY), (CLIENT_PATH, CLIENT_KEY)])
@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", 1007),
        ("[1, 2]", 1007),
        (b"\x00binary", 1003),
        (json.dumps({"type": "x" * (MAX_FRAME + 1)}), 1009),
        (json.dumps({"type": "hello", "protocol": 2}), 4002),
        (json.dumps({"type": "auth", "token": "before-hello"}), 4000),
    ],
)
def test_each_bad_frame_kind_gets_its_close_code(
    client: TestClient, path: str, key: str, frame: str | bytes, code: int
) -> None:
    """The close codes the fuzz accepts are the ones the contract gives each kind of frame."""
    with client.websocket_connect(path, headers={"X-Api-Key": key}) as ws:
        peer = Peer(ws, path)
        peer.send(frame)
        assert not peer.sync()
    assert peer.close_code == code


@pytest.mark.parametrize(("path", "key"), [(MINER_PATH, MINER_KEY), (CLIENT_PATH, CLIENT_KEY)])
def test_a_second_hello_is_a_protocol_error(client: TestClient, path: str, key: str) -> None:
    """hello after the handshake closes the socket with 4000."""
    with client.websocket_connect(path, headers={"X-Api-Key": key}) as ws:
        peer = Peer(ws, path)
        peer.send(json.dumps({"type": "hello", "protocol": 1, "miner_id": "gpu-hello"}))
        assert peer.sync()
        peer.send(json.dumps({"type": "hello", "protocol": 1, "miner_id": "gpu-hello"}))
        assert not peer.sync()
    assert peer.close_code == 4000
