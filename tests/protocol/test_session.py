"""Ring 1: server-side Sans-I/O sessions fed with bytes (protocol/session.py)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from protocol.errors import InvalidState
from protocol.messages import (
    Auth,
    ClientHello,
    Heartbeat,
    Hello,
    JobAccept,
    JobCancelRequest,
    JobSubmit,
    Status,
)
from protocol.session import (
    AWAIT_AUTH,
    AWAIT_HELLO,
    CLOSING,
    DEFAULT_MAX_FRAME,
    OPEN,
    ClientSession,
    MinerSession,
    SessionState,
)
from protocol.types import CloseCode

Session = MinerSession | ClientSession

MINER_HELLO = b'{"type":"hello","protocol":1,"miner_id":"gpu-box-7","capabilities":{"cuda":"12.4"}}'
CLIENT_HELLO = b'{"type":"hello","protocol":1}'
AUTH = b'{"type":"auth","token":"secret"}'
HELLOS = {MinerSession: MINER_HELLO, ClientSession: CLIENT_HELLO}
# A legal post-handshake request of each kind.
REQUESTS = {
    MinerSession: (b'{"type":"job.accept","job_id":"j1"}', JobAccept(job_id="j1")),
    ClientSession: (
        b'{"type":"job.cancel","job_id":"j1","id":"c1"}',
        JobCancelRequest(job_id="j1", id="c1"),
    ),
}
CONTRACT_CLOSE_CODES = {1003, 1007, 1009, 4000, 4002, 4401}

KINDS = [pytest.param(MinerSession, id="miner"), pytest.param(ClientSession, id="client")]


def opened(kind: type[Session], **kwargs: Any) -> Session:
    """A session past the handshake, with its queues drained."""
    session = kind(authenticated=True, **kwargs)
    session.receive_data(HELLOS[kind])
    assert session.state is OPEN
    session.events_received()
    session.data_to_send()
    return session


def sent(session: Session) -> list[dict[str, Any]]:
    return [orjson.loads(frame) for frame in session.data_to_send()]


def assert_closed(session: Session, code: int) -> None:
    assert session.state is CLOSING
    assert session.close_code == code
    assert session.events_received() == []


# ---- handshake ----------------------------------------------------------------------------


def test_miner_hello_opens_session() -> None:
    """An authenticated miner's hello opens the session and is delivered as an event."""
    session = MinerSession(authenticated=True)
    assert session.state is AWAIT_HELLO
    session.receive_data(MINER_HELLO)
    assert session.state is OPEN
    assert session.events_received() == [
        Hello(protocol=1, miner_id="gpu-box-7", capabilities={"cuda": "12.4"})
    ]
    assert session.events_received() == []
    assert session.data_to_send() == []
    assert session.close_code is None


def test_client_hello_opens_session() -> None:
    """An authenticated client's hello opens the session and is delivered as an event."""
    session = ClientSession(authenticated=True)
    session.receive_data(CLIENT_HELLO)
    assert session.state is OPEN
    assert session.events_received() == [ClientHello(protocol=1)]


@pytest.mark.parametrize("kind", KINDS)
def test_auth_frame_then_authenticated_then_hello(kind: type[Session]) -> None:
    """Without header credentials: auth is delivered, authenticated() awaits hello, hello opens."""
    session = kind(authenticated=False)
    assert session.state is AWAIT_AUTH
    session.receive_data(AUTH)
    assert session.events_received() == [Auth(token="secret")]
    assert session.state is AWAIT_AUTH  # only the adapter decides the credential is good
    session.authenticated()
    assert session.state is AWAIT_HELLO
    session.receive_data(HELLOS[kind])
    assert session.state is OPEN
    assert len(session.events_received()) == 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(MINER_HELLO, id="miner-hello"),
        pytest.param(CLIENT_HELLO, id="client-hello"),
        pytest.param(b'{"type":"heartbeat"}', id="heartbeat"),
        pytest.param(b'{"type":"job.accept","job_id":"j"}', id="accept"),
        pytest.param(b'{"type":"job.submit","payload":{}}', id="submit"),
        pytest.param(b'{"type":"bogus","id":"r1"}', id="unknown-type"),
    ],
)
def test_anything_but_auth_first_closes_4401(kind: type[Session], frame: bytes) -> None:
    """Unauthenticated: any well-formed frame other than auth first closes 4401."""
    session = kind(authenticated=False)
    session.receive_data(frame)
    assert_closed(session, CloseCode.NOT_AUTHENTICATED)
    assert session.data_to_send() == []


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("version", [0, 2, 999, -1, 10**7, 2**63 - 1, 2.0])
def test_hello_wrong_protocol_closes_4002(kind: type[Session], version: float) -> None:
    """A hello for any protocol version but 1 closes 4002, however far from 1 (it was 1007,
    a schema violation, outside 0..1,000,000)."""
    session = kind(authenticated=True)
    session.receive_data(orjson.dumps({"type": "hello", "protocol": version}))
    assert_closed(session, CloseCode.UNSUPPORTED_VERSION)
    assert "protocol 1 only" in session.close_reason


NOT_HELLO: list[Any] = [
    pytest.param(MinerSession, AUTH, id="miner-auth"),
    pytest.param(MinerSession, b'{"type":"job.accept","job_id":"j"}', id="miner-accept"),
    pytest.param(MinerSession, b'{"type":"status","draining":true}', id="miner-status"),
    pytest.param(ClientSession, AUTH, id="client-auth"),
    pytest.param(ClientSession, b'{"type":"job.submit","payload":{}}', id="client-submit"),
    pytest.param(ClientSession, b'{"type":"job.cancel","job_id":"j"}', id="client-cancel"),
    pytest.param(ClientSession, b'{"type":"subscribe","job_ids":"all"}', id="client-subscribe"),
]


@pytest.mark.parametrize(("kind", "frame"), NOT_HELLO)
def test_non_hello_first_closes_4000(kind: type[Session], frame: bytes) -> None:
    """After authentication, a legal message other than hello first closes 4000."""
    session = kind(authenticated=True)
    session.receive_data(frame)
    assert_closed(session, CloseCode.PROTOCOL_ERROR)
    assert session.close_reason == "expected hello"


def test_a_heartbeat_before_hello_is_ignored() -> None:
    """protocol.md: a miner's heartbeat frame is legal at any time; before hello it is read
    and dropped (no event, no close), and the hello that follows opens the session."""
    session = MinerSession(authenticated=True)
    session.receive_data(b'{"type":"heartbeat","metrics":{"gpu_util":0.5}}')
    assert session.events_received() == []
    assert session.state is AWAIT_HELLO
    session.receive_data(HELLOS[MinerSession])
    assert session.state is OPEN
    assert [type(m) for m in session.events_received()] == [Hello]


def test_a_heartbeat_before_hello_with_an_id_gets_its_ack() -> None:
    """A request with an id gets exactly one reply (protocol.md, Framing): a heartbeat read and
    dropped before hello was never answered, so a miner counting its unanswered heartbeats (a
    timer started at connect) waited for an ack that never came."""
    session = MinerSession(authenticated=True)
    session.receive_data(b'{"type":"heartbeat","id":"hb-1"}')
    assert session.events_received() == []
    assert sent(session) == [{"type": "ack", "id": "hb-1"}]
    assert session.state is AWAIT_HELLO


@pytest.mark.parametrize("kind", KINDS)
def test_second_hello_closes_4000(kind: type[Session]) -> None:
    """A hello after the handshake closes 4000; the reason names the frame's type (it named
    the class: "clienthello after handshake")."""
    session = opened(kind)
    session.receive_data(HELLOS[kind])
    assert_closed(session, CloseCode.PROTOCOL_ERROR)
    assert session.close_reason == "hello after handshake"


@pytest.mark.parametrize("kind", KINDS)
def test_auth_after_handshake_closes_4000(kind: type[Session]) -> None:
    """An auth frame after the handshake closes 4000."""
    session = opened(kind)
    session.receive_data(AUTH)
    assert_closed(session, CloseCode.PROTOCOL_ERROR)
    assert session.close_reason == "auth after handshake"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("state", [AWAIT_HELLO, OPEN, CLOSING])
def test_authenticated_in_wrong_state_raises(kind: type[Session], state: SessionState) -> None:
    """authenticated() outside AWAIT_AUTH raises InvalidState and changes nothing."""
    session = opened(kind) if state is OPEN else kind(authenticated=True)
    if state is CLOSING:
        session.fail(CloseCode.PROTOCOL_ERROR, "x")
    with pytest.raises(InvalidState, match=state.value):
        session.authenticated()
    assert session.state is state


# ---- open session -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_open_session_delivers_requests(kind: type[Session]) -> None:
    """In OPEN, legal requests come out of events_received() in order, nothing is sent."""
    session = opened(kind)
    frame, msg = REQUESTS[kind]
    session.receive_data(frame)
    session.receive_data(frame.decode())
    assert session.events_received() == [msg, msg]
    assert session.data_to_send() == []
    assert session.state is OPEN


def test_miner_session_delivers_each_miner_message() -> None:
    """A miner's status and heartbeat are legal at any time after hello."""
    session = opened(MinerSession)
    session.receive_data(b'{"type":"status","draining":true}')
    session.receive_data(b'{"type":"heartbeat","metrics":{"gpu":1}}')
    assert session.events_received() == [Status(draining=True), Heartbeat(metrics={"gpu": 1})]


def test_client_session_delivers_submit() -> None:
    """A client's job.submit after hello is delivered with its request id."""
    session = opened(ClientSession)
    session.receive_data(b'{"type":"job.submit","id":"c1","payload":{"prompt":"hi"}}')
    assert session.events_received() == [JobSubmit(payload={"prompt": "hi"}, id="c1")]


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_type_gets_error_frame_and_stays_open(kind: type[Session]) -> None:
    """Unknown type: an unknown_type error frame with the request id; the session stays OPEN."""
    session = opened(kind)
    session.receive_data(b'{"type":"job.teleport","id":"r7","job_id":"j"}')
    assert session.state is OPEN
    assert session.close_code is None
    assert session.events_received() == []
    [error] = sent(session)
    assert error == {
        "type": "error",
        "id": "r7",
        "code": "unknown_type",
        "message": "unknown message type 'job.teleport'",
        "ref": "job.teleport",
    }
    frame, msg = REQUESTS[kind]
    session.receive_data(frame)
    assert session.events_received() == [msg]


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_type_without_id_has_ref_only(kind: type[Session]) -> None:
    """Without a request id the unknown_type error names the type in ref and has no id."""
    session = opened(kind)
    session.receive_data(b'{"type":"bogus"}')
    [error] = sent(session)
    assert "id" not in error
    assert error["ref"] == "bogus"
    assert error["code"] == "unknown_type"


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_type_before_hello_is_not_fatal(kind: type[Session]) -> None:
    """Authenticated but before hello, an unknown type is answered and hello still works."""
    session = kind(authenticated=True)
    session.receive_data(b'{"type":"bogus","id":"r1"}')
    assert session.state is AWAIT_HELLO
    assert [e["code"] for e in sent(session)] == ["unknown_type"]
    session.receive_data(HELLOS[kind])
    assert session.state is OPEN


# ---- fatal framing errors -----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("authenticated", [True, False])
@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(b"{", id="truncated"),
        pytest.param(b"", id="empty"),
        pytest.param("not json", id="text"),
        pytest.param(b"\xff", id="not-utf8"),
        pytest.param(b"[1,2]", id="array"),
        pytest.param(b'"hello"', id="string"),
        pytest.param(b"null", id="null"),
        pytest.param(b'{"no":"type"}', id="no-type"),
        pytest.param(b'{"type":"hello","protocol":"1"}', id="bad-field"),
        pytest.param(b'{"type":"auth","token":1}', id="bad-auth"),
        pytest.param(orjson.dumps({"type": "bogus", "id": "x" * 65}), id="long-id"),
    ],
)
def test_malformed_frame_closes_1007(
    kind: type[Session], authenticated: bool, frame: bytes
) -> None:
    """Malformed JSON, a non-object or an invalid field closes 1007 and records the error."""
    session = kind(authenticated=authenticated)
    session.receive_data(frame)
    assert_closed(session, CloseCode.INVALID_DATA)
    assert session.error is not None
    assert session.error.close_code == CloseCode.INVALID_DATA
    assert session.close_reason == session.error.message
    assert session.data_to_send() == []


@pytest.mark.parametrize("kind", KINDS)
def test_malformed_frame_in_open_session_closes_1007(kind: type[Session]) -> None:
    """One bad frame in an open session closes it and drops events not yet collected."""
    session = opened(kind)
    frame, _ = REQUESTS[kind]
    session.receive_data(frame)
    session.receive_data(b"{]")
    assert_closed(session, CloseCode.INVALID_DATA)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("authenticated", [True, False])
def test_binary_frame_closes_1003(kind: type[Session], authenticated: bool) -> None:
    """A binary frame closes 1003 in any state."""
    session = kind(authenticated=authenticated)
    session.receive_binary()
    assert_closed(session, CloseCode.UNSUPPORTED_DATA)
    assert session.error is None


@pytest.mark.parametrize("kind", KINDS)
def test_binary_after_closing_keeps_first_code(kind: type[Session]) -> None:
    """A binary frame after the session is CLOSING does not change the close code."""
    session = opened(kind)
    session.receive_data(b"{")
    session.receive_binary()
    assert session.close_code == CloseCode.INVALID_DATA


@pytest.mark.parametrize("kind", KINDS)
def test_oversize_frame_closes_1009(kind: type[Session]) -> None:
    """A frame longer than max_frame closes 1009 before it is parsed; max_frame itself is fine."""
    frame = b'{"type":"hello","protocol":1}'
    at_limit = kind(authenticated=True, max_frame=len(frame))
    at_limit.receive_data(frame)
    assert at_limit.state is OPEN
    over = kind(authenticated=True, max_frame=len(frame) - 1)
    over.receive_data(frame)
    assert_closed(over, CloseCode.TOO_BIG)
    assert over.close_reason == "frame too big"


@pytest.mark.parametrize("kind", KINDS)
def test_default_frame_limit_is_one_mib(kind: type[Session]) -> None:
    """The default limit is 1 MiB; a bigger frame closes 1009 even if it is not JSON."""
    session = opened(kind)
    assert session.max_frame == DEFAULT_MAX_FRAME == 1024 * 1024
    session.receive_data(b" " * (DEFAULT_MAX_FRAME + 1))
    assert_closed(session, CloseCode.TOO_BIG)


# ---- CLOSING ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_input_and_output_ignored_after_closing(kind: type[Session]) -> None:
    """Once CLOSING, input is ignored, nothing more is queued and the first close code wins."""
    session = opened(kind)
    session.send_error("invalid", "queued before the close")
    session.receive_binary()
    frame, _ = REQUESTS[kind]
    session.receive_data(frame)
    session.receive_data(b"{")
    session.receive_data(b"x" * (DEFAULT_MAX_FRAME + 1))
    session.send_error("invalid", "after")
    session.send_frame(b"{}")
    session.fail(CloseCode.NORMAL, "again")
    assert_closed(session, CloseCode.UNSUPPORTED_DATA)
    assert session.close_reason == "binary frames are not supported"
    assert [e["message"] for e in sent(session)] == ["queued before the close"]


@pytest.mark.parametrize("kind", KINDS)
def test_stop_reading_ignores_input_without_a_close_code(kind: type[Session]) -> None:
    """``stop_reading``: the adapter closes later itself; nothing more is read meanwhile, and
    the session asks for no close of its own."""
    session = opened(kind)
    frame, _ = REQUESTS[kind]
    session.receive_data(frame)
    session.stop_reading()
    session.receive_data(frame)
    session.receive_binary()
    assert session.state is CLOSING
    assert session.close_code is None
    assert session.events_received() == []


def test_close_reason_is_truncated_to_rfc_limit() -> None:
    """A long close reason is cut to at most 120 UTF-8 bytes without splitting a character."""
    session = MinerSession(authenticated=True)
    session.fail(CloseCode.PROTOCOL_ERROR, "é" * 100)
    assert session.close_reason == "é" * 60
    other = MinerSession(authenticated=True)
    other.fail(CloseCode.PROTOCOL_ERROR, "a" + "é" * 100)
    assert other.close_reason == "a" + "é" * 59
    assert len(other.close_reason.encode()) <= 120


# ---- output -------------------------------------------------------------------------------


def test_send_encodes_and_send_frame_passes_bytes_through() -> None:
    """send() encodes a message, send_frame() queues bytes as-is, data_to_send() drains."""
    session = opened(MinerSession)
    session.send(Status(draining=True))
    session.send_frame(b'{"type":"job.event"}')
    session.send_error("not_assigned", "no", id="m1", ref="j1")
    assert session.data_to_send() == [
        b'{"type":"status","draining":true}',
        b'{"type":"job.event"}',
        b'{"type":"error","code":"not_assigned","message":"no","id":"m1","ref":"j1"}',
    ]
    assert session.data_to_send() == []


# ---- fuzz ---------------------------------------------------------------------------------

TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=6,
)
# Values that make decoders go deeper (valid-looking shapes), mixed with arbitrary JSON.
NEAR_VALID = st.sampled_from(
    [0, 1, 2, 1024, 1025, -1, 0.5, 1.5, True, False, "", "j1", "all", ["j1"], [""], {}]
) | st.sampled_from([{"j1": 1}, {"session_id": "s"}, "x" * 65, "x" * 129])
FIELD_VALUES = NEAR_VALID | JSON_VALUES
KNOWN_TYPES = (
    "auth hello job.accept job.reject job.progress job.result job.fail status heartbeat"
    " job.submit subscribe unsubscribe job.cancel ack error welcome job.assign job.event bogus"
).split()
FIELD_NAMES = (
    "id token protocol miner_id capabilities concurrency region resume job_id reason progress"
    " message output result metrics error_code error_message retryable draining payload"
    " constraints ttl_seconds priority idempotency_key job_ids after code ref attempt"
).split()
TYPED_OBJECTS = st.builds(
    lambda msg_type, fields: {**fields, "type": msg_type},
    st.sampled_from(KNOWN_TYPES) | TEXT,
    st.dictionaries(st.sampled_from(FIELD_NAMES), FIELD_VALUES, max_size=6),
)
ANY_OBJECTS = st.dictionaries(TEXT, JSON_VALUES, max_size=5)
FRAMES = (
    st.binary(max_size=64)
    | st.text(max_size=64)
    | TYPED_OBJECTS.map(orjson.dumps)
    | ANY_OBJECTS.map(orjson.dumps)
    | JSON_VALUES.map(orjson.dumps)
    | TYPED_OBJECTS.map(lambda d: orjson.dumps(d).decode())
)
STARTS = st.sampled_from(["unauthenticated", "authenticated", "authenticated-then-auth", "open"])


def start(kind: type[Session], how: str) -> Session:
    if how == "open":
        return opened(kind)
    session = kind(authenticated=how != "unauthenticated", max_frame=4096)
    if how == "authenticated-then-auth":
        session = kind(authenticated=False, max_frame=4096)
        session.receive_data(AUTH)
        session.events_received()
        session.authenticated()
    return session


def check_invariant(session: Session, before: SessionState) -> None:
    if session.state is CLOSING:
        assert session.close_code in CONTRACT_CLOSE_CODES
    else:
        assert session.close_code is None
        assert session.state in {AWAIT_AUTH, AWAIT_HELLO, OPEN}
        # The handshake only moves forward.
        order = [AWAIT_AUTH, AWAIT_HELLO, OPEN]
        assert order.index(session.state) >= order.index(before)
    for frame in session.data_to_send():
        reply = orjson.loads(frame)
        assert reply["type"] == "error"
        assert reply["code"] == "unknown_type"


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(how=STARTS, frames=st.lists(FRAMES, min_size=1, max_size=6), binary_at=st.integers(-1, 8))
def test_fuzz_frames_never_raise(
    kind: type[Session], how: str, frames: list[bytes | str], binary_at: int
) -> None:
    """Arbitrary frames never raise out of receive_data; the session stays in a contract state."""
    session = start(kind, how)
    for n, frame in enumerate(frames):
        before = session.state
        code = session.close_code
        if n == binary_at:
            session.receive_binary()
        else:
            session.receive_data(frame)
        check_invariant(session, before)
        if before is CLOSING:
            assert session.state is CLOSING
            assert session.close_code == code
        for event in session.events_received():
            assert session.state is not CLOSING
            assert not isinstance(event, str | bytes)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=300, deadline=None)
@given(frame=TYPED_OBJECTS)
def test_fuzz_typed_objects_in_open_session(kind: type[Session], frame: dict[str, Any]) -> None:
    """A random object with a plausible type either is admitted, answered, or closes legally."""
    session = opened(kind)
    session.receive_data(orjson.dumps(frame))
    check_invariant(session, OPEN)
    events = session.events_received()
    assert len(events) <= 1
    if events:
        assert session.state is OPEN
