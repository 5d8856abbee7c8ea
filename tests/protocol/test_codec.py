"""Ring 1: the codec as tables of wire frames <-> dataclasses (protocol/codec.py)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import given, strategies as st

from protocol import codec
from protocol.codec import (
    MAX_ATTEMPT,
    MAX_ID_LENGTH,
    assign_fits,
    decode_client_frame,
    decode_miner_frame,
    decode_server_to_client,
    decode_server_to_miner,
    dumps,
    encode,
    encode_assign,
    encode_event,
    has_control_character,
    loads,
)
from protocol.errors import (
    InvalidState,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    UnknownMessageType,
)
from protocol.messages import (
    Ack,
    Auth,
    ClientHello,
    ClientWelcome,
    Error,
    Heartbeat,
    Hello,
    JobAccept,
    JobAssign,
    JobCancel,
    JobCancelRequest,
    JobEvent,
    JobFail,
    JobProgress,
    JobReject,
    JobResult,
    JobSubmit,
    Status,
    Subscribe,
    Unsubscribe,
    Welcome,
)
from protocol.types import CloseCode

Decoder = Callable[[bytes | str], Any]

CAPS = {"gpus": [{"name": "RTX 4090", "memory_mb": 24564}], "cuda": "12.4", "models": ["llama3"]}
RECEIPT = {"receipt_id": "ab" * 16, "signature": {"alg": "Ed25519", "key_id": "k", "sig": "s"}}

RESULT_KEY = (
    "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"  # an Ed25519 key id: 43 base64url characters
)
RESULT_SIG = "Ab-_" * 21 + "AA"  # 86 base64url characters

# (canonical wire object, dataclass): decode(wire) == msg and encode(msg) == wire, as JSON.
MINER_TO_SERVER: list[Any] = [
    pytest.param({"type": "auth", "token": "tok"}, Auth(token="tok"), id="auth"),
    pytest.param(
        {"type": "auth", "token": "tok", "id": "a1"}, Auth(token="tok", id="a1"), id="auth-id"
    ),
    pytest.param(
        {"type": "hello", "protocol": 1, "capabilities": {}, "concurrency": 1},
        Hello(protocol=1, miner_id=None, capabilities={}),
        id="hello-minimal",
    ),
    pytest.param(
        {
            "type": "hello",
            "protocol": 1,
            "capabilities": CAPS,
            "concurrency": 2,
            "miner_id": "gpu-box-7",
            "region": "eu-west",
            "id": "h1",
            "resume": {"session_id": "sess-1"},
            "result_key": RESULT_KEY,
        },
        Hello(
            protocol=1,
            miner_id="gpu-box-7",
            capabilities=CAPS,
            concurrency=2,
            region="eu-west",
            resume_session="sess-1",
            result_key=RESULT_KEY,
            id="h1",
        ),
        id="hello-full",
    ),
    pytest.param({"type": "job.accept", "job_id": "j1"}, JobAccept(job_id="j1"), id="accept"),
    pytest.param(
        {"type": "job.accept", "job_id": "j1", "attempt": 2, "id": "a1"},
        JobAccept(job_id="j1", attempt=2, id="a1"),
        id="accept-attempt",
    ),
    pytest.param(
        {"type": "job.reject", "job_id": "j1", "reason": "busy", "attempt": 1, "id": "r1"},
        JobReject(job_id="j1", reason="busy", attempt=1, id="r1"),
        id="reject",
    ),
    pytest.param(
        {"type": "job.reject", "job_id": "j1", "reason": ""},
        JobReject(job_id="j1"),
        id="reject-bare",
    ),
    pytest.param(
        {"type": "job.progress", "job_id": "j1"}, JobProgress(job_id="j1"), id="progress-bare"
    ),
    pytest.param(
        {
            "type": "job.progress",
            "job_id": "j1",
            "progress": 0.5,
            "message": "m",
            "output": "tok",
            "attempt": 3,
        },
        JobProgress(job_id="j1", progress=0.5, message="m", output="tok", attempt=3),
        id="progress-full",
    ),
    pytest.param(
        {
            "type": "job.result",
            "job_id": "j1",
            "result": {"text": "hi"},
            "metrics": {"units": 2},
            "attempt": 1,
            "id": "m1",
        },
        JobResult(job_id="j1", result={"text": "hi"}, metrics={"units": 2}, attempt=1, id="m1"),
        id="result",
    ),
    pytest.param(
        {
            "type": "job.result",
            "job_id": "j1",
            "result": {},
            "metrics": {},
            "result_sig": RESULT_SIG,
        },
        JobResult(job_id="j1", result={}, result_sig=RESULT_SIG),
        id="result-signed",
    ),
    pytest.param(
        {
            "type": "job.fail",
            "job_id": "j1",
            "error_code": "oom",
            "error_message": "x",
            "retryable": True,
        },
        JobFail(job_id="j1", error_code="oom", error_message="x", retryable=True),
        id="fail",
    ),
    pytest.param(
        {
            "type": "job.fail",
            "job_id": "j1",
            "error_code": "e",
            "error_message": "",
            "retryable": False,
            "attempt": 0,
        },
        JobFail(job_id="j1", error_code="e", error_message="", attempt=0),
        id="fail-attempt-zero",
    ),
    pytest.param({"type": "status"}, Status(), id="status-empty"),
    pytest.param(
        {"type": "status", "concurrency": 4, "draining": True, "metrics": {"gpu": 0.9}, "id": "s1"},
        Status(concurrency=4, draining=True, metrics={"gpu": 0.9}, id="s1"),
        id="status-full",
    ),
    pytest.param({"type": "heartbeat"}, Heartbeat(), id="heartbeat"),
    pytest.param(
        {"type": "heartbeat", "metrics": {"load": 1}},
        Heartbeat(metrics={"load": 1}),
        id="heartbeat-metrics",
    ),
]

CLIENT_TO_SERVER: list[Any] = [
    pytest.param({"type": "auth", "token": "tok"}, Auth(token="tok"), id="auth"),
    pytest.param({"type": "hello", "protocol": 1}, ClientHello(protocol=1), id="hello"),
    pytest.param(
        {"type": "hello", "protocol": 1, "id": "h"}, ClientHello(protocol=1, id="h"), id="hello-id"
    ),
    pytest.param(
        {"type": "job.submit", "payload": {"prompt": "hi"}, "constraints": {}, "priority": 0},
        JobSubmit(payload={"prompt": "hi"}),
        id="submit-minimal",
    ),
    pytest.param(
        {
            "type": "job.submit",
            "id": "c1",
            "payload": {"prompt": "hi"},
            "constraints": {"models": ["llama3"]},
            "ttl_seconds": 60,
            "priority": -5,
            "idempotency_key": "k1",
            "payment_amount": "1.5",
            "payment_currency": "AITBC",
        },
        JobSubmit(
            payload={"prompt": "hi"},
            constraints={"models": ["llama3"]},
            ttl_seconds=60,
            priority=-5,
            idempotency_key="k1",
            payment_amount="1.5",
            payment_currency="AITBC",
            id="c1",
        ),
        id="submit-full",
    ),
    pytest.param(
        {"type": "subscribe", "job_ids": ["a", "b"], "after": {}},
        Subscribe(job_ids=("a", "b")),
        id="subscribe-list",
    ),
    pytest.param(
        {"type": "subscribe", "job_ids": "all", "after": {"a": 3}, "id": "s1"},
        Subscribe(job_ids="all", after={"a": 3}, id="s1"),
        id="subscribe-all-after",
    ),
    pytest.param(
        {"type": "unsubscribe", "job_ids": ["a"], "id": "u1"},
        Unsubscribe(job_ids=("a",), id="u1"),
        id="unsubscribe",
    ),
    pytest.param(
        {"type": "unsubscribe", "job_ids": "all"}, Unsubscribe(job_ids="all"), id="unsubscribe-all"
    ),
    pytest.param(
        {"type": "job.cancel", "job_id": "j1", "id": "x"},
        JobCancelRequest(job_id="j1", id="x"),
        id="cancel",
    ),
]

SERVER_TO_MINER: list[Any] = [
    pytest.param(
        {
            "type": "welcome",
            "protocol": 1,
            "session_id": "sess-1",
            "miner_id": "gpu-box-7",
            "heartbeat_interval": 10.0,
            "heartbeat_timeout": 30.0,
            "resumed": ["j1"],
            "revoked": ["j2", "j3"],
        },
        Welcome(
            protocol=1,
            session_id="sess-1",
            miner_id="gpu-box-7",
            heartbeat_interval=10.0,
            heartbeat_timeout=30.0,
            resumed=("j1",),
            revoked=("j2", "j3"),
        ),
        id="welcome",
    ),
    pytest.param(
        {
            "type": "job.assign",
            "job_id": "j1",
            "attempt": 1,
            "payload": {"prompt": "hi"},
            "constraints": {"gpu": "RTX"},
            "expires_at": "2025-01-01T00:00:00.000Z",
            "accept_timeout": 10.0,
        },
        JobAssign(
            job_id="j1",
            attempt=1,
            payload={"prompt": "hi"},
            constraints={"gpu": "RTX"},
            expires_at="2025-01-01T00:00:00.000Z",
            accept_timeout=10.0,
        ),
        id="assign",
    ),
    pytest.param(
        {"type": "job.cancel", "job_id": "j1", "reason": "client"},
        JobCancel(job_id="j1", reason="client"),
        id="cancel",
    ),
    pytest.param({"type": "ack", "id": "m1"}, Ack(id="m1"), id="ack"),
    pytest.param(
        {"type": "ack", "id": "m1", "receipt": RECEIPT},
        Ack(id="m1", fields={"receipt": RECEIPT}),
        id="ack-receipt",
    ),
    pytest.param(
        {"type": "error", "code": "not_assigned", "message": "no", "id": "m2"},
        Error(code="not_assigned", message="no", id="m2"),
        id="error-id",
    ),
    pytest.param(
        {"type": "error", "code": "unknown_type", "message": "no", "ref": "bogus"},
        Error(code="unknown_type", message="no", ref="bogus"),
        id="error-ref",
    ),
]

SERVER_TO_CLIENT: list[Any] = [
    pytest.param(
        {"type": "welcome", "protocol": 1, "client_id": "c-1"},
        ClientWelcome(protocol=1, client_id="c-1"),
        id="welcome",
    ),
    pytest.param(
        {
            "type": "job.event",
            "job_id": "j1",
            "seq": 3,
            "event": "started",
            "state": "RUNNING",
            "at": "2025-01-01T00:00:00.000Z",
            "attempt": 1,
            "miner_id": "gpu-box-7",
        },
        JobEvent(
            job_id="j1",
            seq=3,
            event="started",
            state="RUNNING",
            at="2025-01-01T00:00:00.000Z",
            attempt=1,
            miner_id="gpu-box-7",
        ),
        id="event-started",
    ),
    pytest.param(
        {
            "type": "job.event",
            "job_id": "j1",
            "seq": 1,
            "event": "completed",
            "state": "COMPLETED",
            "at": "2025-01-01T00:00:00.000Z",
            "attempt": 1,
            "miner_id": None,
            "result": {"text": "hi"},
            "receipt": RECEIPT,
        },
        JobEvent(
            job_id="j1",
            seq=1,
            event="completed",
            state="COMPLETED",
            at="2025-01-01T00:00:00.000Z",
            attempt=1,
            data={"result": {"text": "hi"}, "receipt": RECEIPT},
        ),
        id="event-completed-data",
    ),
    pytest.param(
        {"type": "ack", "id": "c1", "job": {"job_id": "j1", "state": "QUEUED"}},
        Ack(id="c1", fields={"job": {"job_id": "j1", "state": "QUEUED"}}),
        id="ack-job",
    ),
    pytest.param(
        {"type": "error", "code": "not_found", "message": "no such job", "id": "c2", "ref": "j9"},
        Error(code="not_found", message="no such job", id="c2", ref="j9"),
        id="error",
    ),
]

DIRECTIONS = [
    pytest.param(decode_miner_frame, MINER_TO_SERVER, id="miner"),
    pytest.param(decode_client_frame, CLIENT_TO_SERVER, id="client"),
    pytest.param(decode_server_to_miner, SERVER_TO_MINER, id="server-to-miner"),
    pytest.param(decode_server_to_client, SERVER_TO_CLIENT, id="server-to-client"),
]


def _round_trip_cases() -> list[Any]:
    cases = []
    for direction in DIRECTIONS:
        decoder, table = direction.values
        for row in table:
            wire, msg = row.values
            cases.append(pytest.param(decoder, wire, msg, id=f"{direction.id}-{row.id}"))
    return cases


ROUND_TRIP = _round_trip_cases()


@pytest.mark.parametrize(("decoder", "wire", "msg"), ROUND_TRIP)
def test_decode_wire_bytes(decoder: Decoder, wire: dict[str, Any], msg: object) -> None:
    """Canonical wire bytes decode to exactly the expected dataclass."""
    assert decoder(orjson.dumps(wire)) == msg


@pytest.mark.parametrize(("decoder", "wire", "msg"), ROUND_TRIP)
def test_decode_accepts_text(decoder: Decoder, wire: dict[str, Any], msg: object) -> None:
    """A text (str) frame decodes exactly like its UTF-8 bytes."""
    assert decoder(orjson.dumps(wire).decode()) == msg


@pytest.mark.parametrize(("decoder", "wire", "msg"), ROUND_TRIP)
def test_encode_gives_wire_object(decoder: Decoder, wire: dict[str, Any], msg: object) -> None:
    """encode() produces the canonical wire object (None fields left out, extras merged)."""
    frame = encode(msg)
    assert isinstance(frame, bytes)
    assert orjson.loads(frame) == wire


@pytest.mark.parametrize(("decoder", "wire", "msg"), ROUND_TRIP)
def test_encode_then_decode_is_identity(
    decoder: Decoder, wire: dict[str, Any], msg: object
) -> None:
    """decode(encode(msg)) == msg for every message of every direction."""
    assert decoder(encode(msg)) == msg


# Lenient inputs: defaults are filled in, nulls mean "absent", unknown fields are ignored.
LENIENT: list[Any] = [
    pytest.param(
        decode_miner_frame,
        {"type": "hello", "protocol": 1, "future_field": [1, 2]},
        Hello(protocol=1, miner_id=None, capabilities={}, concurrency=1),
        id="hello-defaults-unknown-field",
    ),
    pytest.param(
        decode_miner_frame,
        {"type": "hello", "protocol": 1, "miner_id": None, "capabilities": None, "resume": None},
        Hello(protocol=1, miner_id=None, capabilities={}),
        id="hello-nulls",
    ),
    pytest.param(
        decode_miner_frame,
        {"type": "hello", "protocol": 1, "resume": {}},
        Hello(protocol=1, miner_id=None, capabilities={}),
        id="hello-empty-resume",
    ),
    pytest.param(
        decode_miner_frame,
        {"type": "job.reject", "job_id": "j", "reason": None},
        JobReject(job_id="j", reason=""),
        id="reject-null-reason",
    ),
    pytest.param(
        decode_miner_frame,
        {"type": "job.progress", "job_id": "j", "progress": 1},
        JobProgress(job_id="j", progress=1.0),
        id="progress-int",
    ),
    pytest.param(
        decode_miner_frame,
        {"type": "job.progress", "job_id": "j", "progress": 0},
        JobProgress(job_id="j", progress=0.0),
        id="progress-zero",
    ),
    pytest.param(
        decode_miner_frame,
        {"type": "job.result", "job_id": "j", "result": {}},
        JobResult(job_id="j", result={}),
        id="result-no-metrics",
    ),
    pytest.param(
        decode_miner_frame,
        {"type": "job.fail", "job_id": "j", "error_code": "e", "error_message": ""},
        JobFail(job_id="j", error_code="e", error_message=""),
        id="fail-default-retryable",
    ),
    pytest.param(
        decode_miner_frame,
        {"type": "status", "concurrency": None, "draining": False},
        Status(draining=False),
        id="status-false",
    ),
    pytest.param(
        decode_miner_frame,
        {"type": "heartbeat", "id": "x" * MAX_ID_LENGTH},
        Heartbeat(id="x" * MAX_ID_LENGTH),
        id="id-at-limit",
    ),
    pytest.param(
        decode_miner_frame,
        {"type": "heartbeat", "id": None},
        Heartbeat(),
        id="id-null",
    ),
    pytest.param(
        decode_miner_frame,
        {"type": "job.accept", "job_id": "j" * 128},
        JobAccept(job_id="j" * 128),
        id="job-id-at-limit",
    ),
    pytest.param(
        decode_client_frame,
        {"type": "job.submit", "payload": {}, "priority": None, "ttl_seconds": None},
        JobSubmit(payload={}),
        id="submit-nulls",
    ),
    pytest.param(
        decode_client_frame,
        {"type": "subscribe", "job_ids": []},
        Subscribe(job_ids=()),
        id="subscribe-empty",
    ),
    pytest.param(
        decode_client_frame,
        {"type": "subscribe", "job_ids": ["a"], "after": {"a": 0}},
        Subscribe(job_ids=("a",), after={"a": 0}),
        id="subscribe-after-zero",
    ),
    pytest.param(
        decode_server_to_miner,
        {"type": "welcome", "protocol": 1, "session_id": "s", "miner_id": "m"},
        Welcome(
            protocol=1,
            session_id="s",
            miner_id="m",
            heartbeat_interval=10.0,
            heartbeat_timeout=30.0,
        ),
        id="welcome-defaults",
    ),
    pytest.param(
        decode_server_to_miner,
        {
            "type": "welcome",
            "protocol": 1,
            "session_id": "s",
            "miner_id": "m",
            "heartbeat_interval": 5,
            "heartbeat_timeout": None,
            "resumed": None,
            "revoked": [],
        },
        Welcome(
            protocol=1, session_id="s", miner_id="m", heartbeat_interval=5.0, heartbeat_timeout=30.0
        ),
        id="welcome-int-and-nulls",
    ),
    pytest.param(
        decode_server_to_miner,
        {"type": "job.assign", "job_id": "j", "attempt": 0, "expires_at": "t"},
        JobAssign(
            job_id="j", attempt=0, payload={}, constraints={}, expires_at="t", accept_timeout=10.0
        ),
        id="assign-defaults",
    ),
    pytest.param(
        decode_server_to_client,
        {
            "type": "job.event",
            "job_id": "j",
            "seq": 1,
            "event": "queued",
            "state": "QUEUED",
            "at": "t",
        },
        JobEvent(job_id="j", seq=1, event="queued", state="QUEUED", at="t", attempt=0),
        id="event-default-attempt",
    ),
    pytest.param(
        decode_server_to_client,
        {"type": "error", "code": "c", "message": "m", "ref": None},
        Error(code="c", message="m"),
        id="error-null-ref",
    ),
]


@pytest.mark.parametrize(("decoder", "wire", "msg"), LENIENT)
def test_decode_lenient_input(decoder: Decoder, wire: dict[str, Any], msg: object) -> None:
    """Omitted or null optional fields take their defaults; unknown fields are ignored."""
    assert decoder(orjson.dumps(wire)) == msg


def test_same_type_name_decodes_per_direction() -> None:
    """'hello' and 'job.cancel' mean different messages in different directions."""
    hello = b'{"type":"hello","protocol":1}'
    assert isinstance(decode_miner_frame(hello), Hello)
    assert isinstance(decode_client_frame(hello), ClientHello)
    cancel = b'{"type":"job.cancel","job_id":"j","reason":"r"}'
    assert decode_client_frame(cancel) == JobCancelRequest(job_id="j")
    assert decode_server_to_miner(cancel) == JobCancel(job_id="j", reason="r")


def _obj(**fields: Any) -> dict[str, Any]:
    return fields


ASSIGN = _obj(type="job.assign", job_id="j", attempt=1, expires_at="t")
WELCOME = _obj(type="welcome", protocol=1, session_id="s", miner_id="m")
EVENT = _obj(type="job.event", job_id="j", seq=1, event="queued", state="QUEUED", at="t")
LONG_ID = "x" * (MAX_ID_LENGTH + 1)

# Frames whose fields are invalid: every one is a RemoteProtocolError that closes with 1007.
INVALID: list[Any] = [
    # the frame envelope
    pytest.param(decode_miner_frame, _obj(type=1), id="type-not-string"),
    pytest.param(decode_miner_frame, _obj(job_id="j"), id="type-missing"),
    pytest.param(decode_miner_frame, _obj(type=None), id="type-null"),
    pytest.param(decode_miner_frame, _obj(type="heartbeat", id=LONG_ID), id="miner-id-too-long"),
    pytest.param(
        decode_client_frame, _obj(type="hello", protocol=1, id=LONG_ID), id="client-id-too-long"
    ),
    pytest.param(decode_server_to_miner, _obj(type="ack", id=LONG_ID), id="s2m-id-too-long"),
    pytest.param(decode_server_to_client, _obj(type="ack", id=LONG_ID), id="s2c-id-too-long"),
    pytest.param(decode_miner_frame, _obj(type="nope", id=LONG_ID), id="unknown-type-long-id"),
    pytest.param(decode_miner_frame, _obj(type="heartbeat", id=5), id="id-not-string"),
    pytest.param(decode_miner_frame, _obj(type="heartbeat", id=["a"]), id="id-list"),
    # strings
    pytest.param(decode_miner_frame, _obj(type="auth"), id="auth-no-token"),
    pytest.param(decode_miner_frame, _obj(type="auth", token=5), id="auth-token-int"),
    pytest.param(
        decode_client_frame, _obj(type="auth", token="t" * 4097), id="auth-token-too-long"
    ),
    pytest.param(decode_miner_frame, _obj(type="hello", protocol=1, miner_id=7), id="miner-id-int"),
    pytest.param(
        decode_miner_frame, _obj(type="hello", protocol=1, miner_id="m" * 129), id="miner-id-long"
    ),
    # control characters (C0, DEL, C1): refused as the admin account route refuses them
    pytest.param(
        decode_miner_frame, _obj(type="hello", protocol=1, miner_id="a\nb"), id="miner-id-newline"
    ),
    pytest.param(
        decode_miner_frame, _obj(type="hello", protocol=1, miner_id="a\x7f"), id="miner-id-del"
    ),
    pytest.param(
        decode_miner_frame, _obj(type="hello", protocol=1, miner_id="a\x85b"), id="miner-id-c1"
    ),
    pytest.param(
        decode_miner_frame, _obj(type="hello", protocol=1, region=["eu"]), id="region-list"
    ),
    pytest.param(
        decode_miner_frame, _obj(type="hello", protocol=1, resume="sess"), id="resume-not-object"
    ),
    pytest.param(
        decode_miner_frame, _obj(type="hello", protocol=1, result_key=7), id="result-key-int"
    ),
    pytest.param(
        decode_miner_frame,
        _obj(type="hello", protocol=1, result_key=RESULT_KEY[:-1]),
        id="result-key-short",
    ),
    pytest.param(
        decode_miner_frame,
        _obj(type="hello", protocol=1, result_key="d75a980182b10ab7d54bfed3c964073a"),
        id="result-key-hex",
    ),
    pytest.param(
        decode_miner_frame,
        _obj(type="job.result", job_id="j", result={}, result_sig=RESULT_SIG + "A"),
        id="result-sig-long",
    ),
    pytest.param(
        decode_miner_frame,
        _obj(type="job.result", job_id="j", result={}, result_sig="+" * 86),
        id="result-sig-not-base64url",
    ),
    pytest.param(
        decode_miner_frame,
        _obj(type="hello", protocol=1, resume={"session_id": 3}),
        id="resume-session-int",
    ),
    pytest.param(
        decode_miner_frame, _obj(type="job.progress", job_id="j", message=1), id="message-int"
    ),
    pytest.param(
        decode_miner_frame,
        _obj(type="job.progress", job_id="j", output="o" * (64 * 1024 + 1)),
        id="output-long",
    ),
    pytest.param(
        decode_miner_frame,
        _obj(type="job.fail", job_id="j", error_code="e" * 257, error_message="m"),
        id="error-code-long",
    ),
    pytest.param(
        decode_miner_frame, _obj(type="job.fail", job_id="j", error_code="e"), id="fail-no-message"
    ),
    pytest.param(
        decode_miner_frame, _obj(type="job.reject", job_id="j", reason=5), id="reject-reason-int"
    ),
    # fencing tokens (attempt) on miner job messages
    pytest.param(
        decode_miner_frame, _obj(type="job.accept", job_id="j", attempt=-1), id="accept-attempt-neg"
    ),
    pytest.param(
        decode_miner_frame,
        _obj(type="job.reject", job_id="j", attempt="1"),
        id="reject-attempt-str",
    ),
    pytest.param(
        decode_miner_frame,
        _obj(type="job.progress", job_id="j", attempt=True),
        id="progress-attempt-bool",
    ),
    pytest.param(
        decode_miner_frame,
        _obj(type="job.result", job_id="j", result={}, attempt=1.5),
        id="result-attempt-float",
    ),
    pytest.param(
        decode_miner_frame,
        _obj(type="job.fail", job_id="j", error_code="e", error_message="m", attempt=2**62 + 1),
        id="fail-attempt-huge",
    ),
    pytest.param(
        decode_server_to_miner, {**ASSIGN, "attempt": 2**62 + 1}, id="assign-attempt-huge"
    ),
    pytest.param(decode_server_to_client, {**EVENT, "attempt": 2**62 + 1}, id="event-attempt-huge"),
    # job ids
    pytest.param(decode_miner_frame, _obj(type="job.accept"), id="job-id-missing"),
    pytest.param(decode_miner_frame, _obj(type="job.accept", job_id=""), id="job-id-empty"),
    pytest.param(decode_miner_frame, _obj(type="job.accept", job_id="j" * 129), id="job-id-long"),
    pytest.param(decode_miner_frame, _obj(type="job.accept", job_id=12), id="job-id-int"),
    pytest.param(decode_client_frame, _obj(type="job.cancel", job_id=""), id="cancel-job-id-empty"),
    # integers
    pytest.param(decode_miner_frame, _obj(type="hello"), id="protocol-missing"),
    pytest.param(decode_miner_frame, _obj(type="hello", protocol="1"), id="protocol-string"),
    pytest.param(decode_miner_frame, _obj(type="hello", protocol=True), id="protocol-bool"),
    pytest.param(decode_miner_frame, _obj(type="hello", protocol=1.5), id="protocol-fraction"),
    pytest.param(decode_client_frame, _obj(type="hello", protocol=2**63), id="protocol-over-64"),
    pytest.param(
        decode_client_frame, b'{"type":"hello","protocol":%d}' % 10**30, id="protocol-bignum"
    ),
    pytest.param(
        decode_miner_frame, _obj(type="hello", protocol=1, concurrency=0), id="concurrency-zero"
    ),
    pytest.param(
        decode_miner_frame, _obj(type="hello", protocol=1, concurrency=1025), id="concurrency-1025"
    ),
    pytest.param(
        decode_miner_frame, _obj(type="status", concurrency=0), id="status-concurrency-zero"
    ),
    pytest.param(
        decode_miner_frame, _obj(type="status", concurrency="2"), id="status-concurrency-string"
    ),
    pytest.param(
        decode_client_frame, _obj(type="job.submit", payload={}, ttl_seconds=-0.5), id="ttl-frac"
    ),
    pytest.param(
        decode_client_frame,
        _obj(type="job.submit", payload={}, ttl_seconds=7 * 86400 + 1),
        id="ttl-too-long",
    ),
    pytest.param(
        decode_client_frame, _obj(type="job.submit", payload={}, priority=1001), id="priority-high"
    ),
    pytest.param(
        decode_client_frame,
        _obj(type="job.submit", payload={}, payment_currency=1),
        id="currency-int",
    ),
    pytest.param(
        decode_client_frame,
        _obj(type="job.submit", payload={}, payment_currency="A" * 17),
        id="currency-long",
    ),
    pytest.param(
        decode_client_frame, _obj(type="job.submit", payload={}, priority=False), id="priority-bool"
    ),
    pytest.param(decode_server_to_miner, {**ASSIGN, "attempt": -1}, id="attempt-negative"),
    pytest.param(decode_server_to_miner, {**ASSIGN, "attempt": None}, id="attempt-null"),
    pytest.param(decode_server_to_client, {**EVENT, "seq": 0}, id="seq-zero"),
    pytest.param(decode_server_to_client, {**EVENT, "attempt": "1"}, id="event-attempt-string"),
    # numbers
    pytest.param(
        decode_miner_frame, _obj(type="job.progress", job_id="j", progress=1.5), id="progress-high"
    ),
    pytest.param(
        decode_miner_frame, _obj(type="job.progress", job_id="j", progress=-0.1), id="progress-low"
    ),
    pytest.param(
        decode_miner_frame, _obj(type="job.progress", job_id="j", progress="0.5"), id="progress-str"
    ),
    pytest.param(
        decode_miner_frame, _obj(type="job.progress", job_id="j", progress=True), id="progress-bool"
    ),
    pytest.param(
        decode_server_to_miner, {**WELCOME, "heartbeat_interval": "10"}, id="interval-string"
    ),
    pytest.param(
        decode_server_to_miner, {**WELCOME, "heartbeat_interval": "nan"}, id="interval-nan-string"
    ),
    pytest.param(decode_server_to_miner, {**WELCOME, "heartbeat_timeout": True}, id="timeout-bool"),
    pytest.param(
        decode_server_to_miner, {**WELCOME, "heartbeat_timeout": -1}, id="timeout-negative"
    ),
    pytest.param(decode_server_to_miner, {**WELCOME, "heartbeat_timeout": 1e10}, id="timeout-huge"),
    pytest.param(
        decode_server_to_miner, {**ASSIGN, "accept_timeout": "10"}, id="accept-timeout-string"
    ),
    pytest.param(
        decode_server_to_miner, {**ASSIGN, "accept_timeout": [10]}, id="accept-timeout-list"
    ),
    # booleans
    pytest.param(
        decode_miner_frame,
        _obj(type="job.fail", job_id="j", error_code="e", error_message="m", retryable="yes"),
        id="retryable-string",
    ),
    pytest.param(
        decode_miner_frame,
        _obj(type="job.fail", job_id="j", error_code="e", error_message="m", retryable=None),
        id="retryable-null",
    ),
    pytest.param(decode_miner_frame, _obj(type="status", draining=1), id="draining-int"),
    # objects
    pytest.param(
        decode_miner_frame, _obj(type="hello", protocol=1, capabilities=[]), id="capabilities-list"
    ),
    pytest.param(decode_miner_frame, _obj(type="job.result", job_id="j"), id="result-missing"),
    pytest.param(
        decode_miner_frame, _obj(type="job.result", job_id="j", result=None), id="result-null"
    ),
    pytest.param(
        decode_miner_frame, _obj(type="job.result", job_id="j", result="ok"), id="result-string"
    ),
    pytest.param(
        decode_miner_frame,
        _obj(type="job.result", job_id="j", result={}, metrics=[]),
        id="metrics-list",
    ),
    pytest.param(decode_miner_frame, _obj(type="status", metrics="x"), id="status-metrics-string"),
    pytest.param(
        decode_miner_frame, _obj(type="heartbeat", metrics=[1]), id="heartbeat-metrics-list"
    ),
    pytest.param(decode_client_frame, _obj(type="job.submit"), id="payload-missing"),
    pytest.param(decode_client_frame, _obj(type="job.submit", payload=[]), id="payload-list"),
    pytest.param(
        decode_client_frame,
        _obj(type="job.submit", payload={}, constraints="x"),
        id="constraints-str",
    ),
    pytest.param(decode_server_to_miner, {**ASSIGN, "payload": "x"}, id="assign-payload-string"),
    # job id lists
    pytest.param(decode_client_frame, _obj(type="subscribe"), id="job-ids-missing"),
    pytest.param(decode_client_frame, _obj(type="subscribe", job_ids="some"), id="job-ids-string"),
    pytest.param(
        decode_client_frame, _obj(type="subscribe", job_ids={"a": 1}), id="job-ids-object"
    ),
    pytest.param(
        decode_client_frame, _obj(type="subscribe", job_ids=["a"] * 10_001), id="job-ids-too-many"
    ),
    pytest.param(decode_client_frame, _obj(type="subscribe", job_ids=[1]), id="job-ids-int"),
    pytest.param(
        decode_client_frame, _obj(type="subscribe", job_ids=[""]), id="job-ids-empty-string"
    ),
    pytest.param(
        decode_client_frame, _obj(type="unsubscribe", job_ids=["j" * 129]), id="unsub-job-id-long"
    ),
    pytest.param(
        decode_client_frame, _obj(type="subscribe", job_ids="all", after=[]), id="after-list"
    ),
    pytest.param(
        decode_client_frame, _obj(type="subscribe", job_ids="all", after={"a": -1}), id="after-neg"
    ),
    pytest.param(
        decode_client_frame,
        _obj(type="subscribe", job_ids="all", after={"a": True}),
        id="after-bool",
    ),
    pytest.param(
        decode_client_frame, _obj(type="subscribe", job_ids="all", after={"a": "1"}), id="after-str"
    ),
    pytest.param(
        decode_client_frame,
        _obj(type="subscribe", job_ids="all", after={"a": 1.5}),
        id="after-float",
    ),
    pytest.param(decode_server_to_miner, {**WELCOME, "resumed": "abc"}, id="resumed-string"),
    pytest.param(decode_server_to_miner, {**WELCOME, "resumed": [1]}, id="resumed-int"),
    pytest.param(decode_server_to_miner, {**WELCOME, "revoked": [""]}, id="revoked-empty-id"),
    pytest.param(decode_server_to_miner, {**WELCOME, "revoked": {"j": 1}}, id="revoked-object"),
    # server frames
    pytest.param(
        decode_server_to_miner,
        _obj(type="welcome", protocol=1, miner_id="m"),
        id="welcome-no-session",
    ),
    pytest.param(
        decode_server_to_miner,
        _obj(type="job.assign", job_id="j", attempt=1),
        id="assign-no-expiry",
    ),
    pytest.param(
        decode_server_to_miner, _obj(type="job.cancel", job_id="j"), id="cancel-no-reason"
    ),
    pytest.param(decode_server_to_miner, _obj(type="ack"), id="ack-without-id"),
    pytest.param(decode_server_to_client, _obj(type="ack", receipt={}), id="client-ack-without-id"),
    pytest.param(decode_server_to_miner, _obj(type="error", message="m"), id="error-no-code"),
    pytest.param(decode_server_to_client, _obj(type="error", code="c"), id="error-no-message"),
    pytest.param(
        decode_server_to_client,
        _obj(type="error", code="c", message="m", ref=1),
        id="error-ref-int",
    ),
    pytest.param(
        decode_server_to_client, _obj(type="welcome", protocol=1), id="client-welcome-no-id"
    ),
    pytest.param(decode_server_to_client, {**EVENT, "miner_id": 5}, id="event-miner-id-int"),
    pytest.param(decode_server_to_client, {**EVENT, "job_id": ""}, id="event-job-id-empty"),
    pytest.param(
        decode_client_frame,
        _obj(type="job.submit", payload={}, idempotency_key=""),
        id="submit-idempotency-key-empty",
    ),
]


@pytest.mark.parametrize(("decoder", "frame"), INVALID)
def test_invalid_fields_close_1007(decoder: Decoder, frame: dict[str, Any] | bytes) -> None:
    """Every invalid field is a fatal RemoteProtocolError with close code 1007."""
    data = frame if isinstance(frame, bytes) else orjson.dumps(frame)
    with pytest.raises(RemoteProtocolError) as info:
        decoder(data)
    assert not isinstance(info.value, UnknownMessageType)
    assert info.value.close_code == CloseCode.INVALID_DATA == 1007


@given(st.text(max_size=128))
def test_a_hello_miner_id_is_any_text_without_control_characters(miner_id: str) -> None:
    """The id a hello names, stripped as REST strips X-Miner-ID, is accepted exactly when the
    admin account route would take its ``miner:`` account (no C0, DEL or C1 character): else
    1007, naming the field (NUL is refused in any string before that). A blank one is none."""
    data = orjson.dumps(_obj(type="hello", protocol=1, miner_id=miner_id))
    stripped = miner_id.strip()
    if "\x00" in miner_id or any(c <= "\x1f" or "\x7f" <= c <= "\x9f" for c in stripped):
        with pytest.raises(RemoteProtocolError, match=r"'miner_id' must not contain control|NUL"):
            decode_miner_frame(data)
    else:
        assert not has_control_character(stripped)
        assert decode_miner_frame(data).miner_id == (stripped or None)


@pytest.mark.parametrize(
    ("given", "read"), [(" gpu-1 ", "gpu-1"), ("\u00a0gpu\t", "gpu"), ("   ", None), ("", None)]
)
def test_a_hello_miner_id_is_stripped_as_rest_strips_x_miner_id(
    given: str, read: str | None
) -> None:
    """Spaces around the id are not part of it (REST's X-Miner-ID could never name such a
    miner); a blank id is none, so the miner gets its key's derived id."""
    data = orjson.dumps(_obj(type="hello", protocol=1, miner_id=given))
    assert decode_miner_frame(data).miner_id == read


MALFORMED: list[Any] = [
    pytest.param(b"", id="empty"),
    pytest.param(b"{", id="truncated"),
    pytest.param(b"{'type': 'hello'}", id="single-quotes"),
    pytest.param(b'{"type":"heartbeat"} x', id="trailing-garbage"),
    pytest.param(b"\xff\xfe", id="not-utf8"),
    pytest.param("\ud800", id="lone-surrogate"),
    pytest.param(b"[NaN]", id="nan"),
    pytest.param(b'{"type":"heartbeat","metrics":{"x":1e400}}', id="infinity"),
]

NOT_OBJECT: list[Any] = [
    pytest.param(b"[]", id="array"),
    pytest.param(b'"hello"', id="string"),
    pytest.param(b"1", id="number"),
    pytest.param(b"null", id="null"),
    pytest.param(b"true", id="bool"),
    pytest.param(b'[{"type":"heartbeat"}]', id="wrapped-object"),
]

ALL_DECODERS = [
    pytest.param(decode_miner_frame, id="miner"),
    pytest.param(decode_client_frame, id="client"),
    pytest.param(decode_server_to_miner, id="server-to-miner"),
    pytest.param(decode_server_to_client, id="server-to-client"),
]


@pytest.mark.parametrize("decoder", ALL_DECODERS)
@pytest.mark.parametrize("data", MALFORMED + NOT_OBJECT)
def test_malformed_or_non_object_closes_1007(decoder: Decoder, data: bytes | str) -> None:
    """Malformed JSON and non-object frames are fatal with close code 1007 in every direction."""
    with pytest.raises(RemoteProtocolError) as info:
        decoder(data)
    assert info.value.close_code == CloseCode.INVALID_DATA


UNKNOWN: list[Any] = [
    pytest.param(decode_miner_frame, "job.submit", id="miner-sends-submit"),
    pytest.param(decode_miner_frame, "ack", id="miner-sends-ack"),
    pytest.param(decode_miner_frame, "welcome", id="miner-sends-welcome"),
    pytest.param(decode_client_frame, "job.accept", id="client-sends-accept"),
    pytest.param(decode_client_frame, "heartbeat", id="client-sends-heartbeat"),
    pytest.param(decode_server_to_miner, "job.event", id="server-sends-miner-event"),
    pytest.param(decode_server_to_miner, "hello", id="server-sends-miner-hello"),
    pytest.param(decode_server_to_client, "job.assign", id="server-sends-client-assign"),
    pytest.param(decode_server_to_client, "", id="empty-type"),
    pytest.param(decode_client_frame, "HELLO", id="case-sensitive"),
]


@pytest.mark.parametrize(("decoder", "msg_type"), UNKNOWN)
def test_unknown_type_is_not_fatal(decoder: Decoder, msg_type: str) -> None:
    """A well-formed frame with a type this direction lacks raises UnknownMessageType."""
    with pytest.raises(UnknownMessageType) as info:
        decoder(orjson.dumps({"type": msg_type, "id": "r9", "protocol": 1}))
    assert info.value.msg_type == msg_type
    assert info.value.request_id == "r9"
    assert info.value.close_code == CloseCode.NORMAL
    assert isinstance(info.value, RemoteProtocolError)


def test_unknown_type_without_id_and_long_name() -> None:
    """UnknownMessageType has no request id when none was sent and truncates the type to 64."""
    with pytest.raises(UnknownMessageType) as info:
        decode_miner_frame(orjson.dumps({"type": "t" * 500}))
    assert info.value.request_id is None
    assert info.value.msg_type == "t" * 64


def test_decoder_crash_becomes_1007(monkeypatch: pytest.MonkeyPatch) -> None:
    """A TypeError/ValueError inside a per-type decoder is still a 1007, never a raw crash."""

    def broken(d: dict[str, Any], i: str | None, n: int) -> object:
        return float(d["x"])

    monkeypatch.setitem(codec._MINER, "broken", broken)
    with pytest.raises(RemoteProtocolError, match="invalid broken frame") as info:
        decode_miner_frame(b'{"type":"broken","x":"abc"}')
    assert info.value.close_code == CloseCode.INVALID_DATA
    assert isinstance(info.value.__cause__, ValueError)


def test_encode_event_matches_job_event() -> None:
    """encode_event (the hot path) writes the same object as encode(JobEvent)."""
    event = JobEvent(
        job_id="j",
        seq=2,
        event="progress",
        state="RUNNING",
        at="t",
        attempt=1,
        data={"progress": 0.5},
    )
    direct = encode_event("j", 2, "progress", "RUNNING", "t", 1, None, {"progress": 0.5})
    assert direct == encode(event)
    assert orjson.loads(direct) == {
        "type": "job.event",
        "job_id": "j",
        "seq": 2,
        "event": "progress",
        "state": "RUNNING",
        "at": "t",
        "attempt": 1,
        "miner_id": None,
        "progress": 0.5,
    }


def test_encode_assign_matches_job_assign() -> None:
    """encode_assign (the dispatcher's hot path) writes the bytes encode(JobAssign) writes."""
    msg = JobAssign(
        job_id="j",
        attempt=2,
        payload={"prompt": "hi", "n": [1, 2]},
        constraints={"gpu": "A100"},
        expires_at="2025-01-01T00:00:00.000Z",
        accept_timeout=10.0,
    )
    direct = encode_assign(
        "j", 2, {"prompt": "hi", "n": [1, 2]}, {"gpu": "A100"}, "2025-01-01T00:00:00.000Z", 10.0
    )
    assert direct == encode(msg)


@given(
    payload=st.dictionaries(
        st.text(max_size=4),
        st.integers(-(2**63), 2**63)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=40),
        max_size=20,
    ),
    attempt=st.integers(1, 10**9),
    accept_timeout=st.floats(0.01, 3600),
)
def test_assign_fits_says_whether_the_assign_frame_fits(
    payload: dict[str, Any], attempt: int, accept_timeout: float
) -> None:
    """Whatever the attempt and the accept timeout, a job said to fit is pushed in at most
    ``limit`` bytes; one said not to would be over it, or within the 40 bytes the attempt's
    digits and the accept timeout may take at most."""
    constraints = {"gpu": "A100"}
    frame = encode_assign(
        "0" * 32, attempt, payload, constraints, "2026-11-26T03:00:00.123Z", accept_timeout
    )
    assert not assign_fits(payload, constraints, len(frame) - 1, read=0)
    assert assign_fits(payload, constraints, len(frame) + 40, read=0)


def test_assign_fits_trusts_a_small_frame_and_encodes_a_large_one() -> None:
    """Read from a frame far below the limit, a job fits without being encoded (its numbers
    may be written up to 4.5 times longer: 1e15 as 1000000000000000.0); otherwise, or when the
    frame's length is unknown (0), it is encoded and measured."""
    numbers = {"xs": [1e15] * 100}  # sent as 1e15: 5 bytes an item, 19 as written again
    sent = len(b'{"xs":[]}') + 5 * 100 - 1
    assert assign_fits(numbers, {}, 10_000, read=sent)
    assert not assign_fits(numbers, {}, 2048, read=sent)
    assert not assign_fits(numbers, {}, 2048, read=0)
    assert assign_fits({}, {}, 1024, read=0)
    assert assign_fits({}, {}, 1024, read=10)


def test_encode_unknown_object_raises() -> None:
    """encode() of something that is not a protocol message is a LocalProtocolError (our bug)."""
    with pytest.raises(LocalProtocolError):
        encode(object())


def test_dumps_and_loads() -> None:
    """dumps gives compact orjson bytes; loads accepts bytes and str and rejects junk with 1007."""
    assert dumps({"a": [1, None]}) == b'{"a":[1,null]}'
    assert loads(b'{"a":1}') == {"a": 1}
    assert loads('{"a":1}') == {"a": 1}
    with pytest.raises(RemoteProtocolError, match="malformed JSON") as info:
        loads("{")
    assert info.value.close_code == CloseCode.INVALID_DATA


def test_error_classes() -> None:
    """The error tree: messages carry their close code; InvalidState is also an AssertionError."""
    err = RemoteProtocolError("bad")
    assert str(err) == "bad (close 1007)"
    assert err.message == "bad"
    assert RemoteProtocolError("big", close_code=CloseCode.TOO_BIG).close_code == 1009
    assert issubclass(LocalProtocolError, ProtocolError)
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert issubclass(InvalidState, ProtocolError)
    assert issubclass(InvalidState, AssertionError)
    unknown = UnknownMessageType("x", "r")
    assert str(unknown) == "unknown message type 'x' (close 1000)"


@pytest.mark.parametrize(
    ("value", "decoded"), [("1.5", "1.5"), (2, "2"), (0.1, "0.1"), (None, None)]
)
def test_job_submit_payment_amount_is_kept_as_decimal_text(value: object, decoded: object) -> None:
    frame = {"type": "job.submit", "payload": {}, "payment_amount": value}
    msg = decode_client_frame(orjson.dumps(frame))
    assert isinstance(msg, JobSubmit)
    assert msg.payment_amount == decoded


@pytest.mark.parametrize("value", [True, [1], {"a": 1}, "1" * 33])
def test_job_submit_refuses_a_malformed_payment_amount(value: object) -> None:
    frame = {"type": "job.submit", "payload": {}, "payment_amount": value}
    with pytest.raises(RemoteProtocolError, match="payment_amount"):
        decode_client_frame(orjson.dumps(frame))


def _kept_bytes(make: Callable[[int], object], n: int = 2000) -> float:
    """Traced bytes per object of ``n`` objects made by ``make`` and kept alive."""
    import tracemalloc

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [make(i) for i in range(n)]
        per_object = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    assert len(kept) == n
    return per_object


def test_trimmed_keeps_the_bytes_without_orjsons_spare_buffer() -> None:
    """orjson's output holds a buffer of at least 4 KiB however short the JSON; what is kept
    for long (cache keys, a waiting job's class) is ``trimmed`` to its size first."""
    data = orjson.dumps({"gpu": "A100"})
    assert codec.trimmed(data) == data
    assert _kept_bytes(lambda i: orjson.dumps({"i": i})) > 2048  # what trimming is for
    assert _kept_bytes(lambda i: codec.trimmed(orjson.dumps({"i": i}))) < 256


def test_message_type_names_contract_messages_only() -> None:
    assert codec.message_type(JobSubmit(id="1", payload={})) == "job.submit"
    assert codec.message_type(object()) is None


# ---- NUL: refused in every string of a frame (PostgreSQL cannot store it) -------------------


@pytest.mark.parametrize(
    "frame",
    [
        b'{"type": "hello", "protocol": 1, "miner_id": "a\\u0000b"}',
        b'{"type": "hello", "protocol": 1, "region": "\\u0000"}',
        b'{"type": "hello", "protocol": 1, "capabilities": {"gpus": [{"name": "A\\u0000"}]}}',
        b'{"type": "hello", "protocol": 1, "capabilities": {"k\\u0000": 1}}',
        '{"type": "hello", "protocol": 1, "region": "\\u0000"}',  # text, as websockets gives
    ],
)
def test_a_string_with_nul_anywhere_in_a_frame_is_refused(frame: bytes | str) -> None:
    with pytest.raises(RemoteProtocolError, match=r"NUL \(\\u0000\)"):
        codec.decode_miner_frame(frame)


def test_an_escaped_backslash_before_u0000_is_not_a_nul() -> None:
    """The text ``\\u0000`` (a backslash, then "u0000") is an ordinary string."""
    hello = codec.decode_miner_frame(b'{"type": "hello", "protocol": 1, "region": "\\\\u0000"}')
    assert hello.region == "\\u0000"  # type: ignore[union-attr]


def test_contains_nul_walks_keys_values_and_lists() -> None:
    assert not codec.contains_nul({"a": [1, "b", {"c": None}], "d": 2.5})
    assert codec.contains_nul({"a": [1, {"c": "x\x00"}]})
    assert codec.contains_nul({"a\x00": 1})
    assert codec.contains_nul(["\x00"])
    assert not codec.may_contain_nul(b'{"a": "b"}')
    assert codec.may_contain_nul('{"a": "\\u0000"}')


def test_after_beyond_the_stores_integers_is_refused() -> None:
    frame = {"type": "subscribe", "id": "s", "job_ids": ["j"], "after": {"j": 2**62 + 1}}
    with pytest.raises(RemoteProtocolError, match="from 0 to 2"):
        codec.decode_client_frame(orjson.dumps(frame))
    frame["after"] = {"j": 2**62}
    assert codec.decode_client_frame(orjson.dumps(frame)).after == {"j": 2**62}  # type: ignore[union-attr]


# ---- nesting: deeper than the stores can write back is refused -----------------------------


def _nested(levels: int) -> str:
    """A heartbeat frame whose ``note`` nests so that the frame is ``levels`` deep."""
    return '{"type": "heartbeat", "note": ' + "[" * (levels - 1) + "]" * (levels - 1) + "}"


def test_a_frame_nested_deeper_than_max_depth_is_refused() -> None:
    codec.decode_miner_frame(_nested(codec.MAX_DEPTH))
    with pytest.raises(RemoteProtocolError, match="more than 64 levels"):
        codec.decode_miner_frame(_nested(codec.MAX_DEPTH + 1))
    with pytest.raises(RemoteProtocolError, match="more than 64 levels"):
        codec.decode_miner_frame(_nested(1000))  # orjson reads it; no store could write it


def test_frames_from_the_server_may_nest_deeper_than_what_it_takes() -> None:
    """The server's frames wrap what it took a few levels deeper (an ack's JobView holds the
    payload, a receipt's metadata holds it too): a peer's decoder refused them as
    input to a store (MAX_DEPTH), so a payload a client could submit made every miner built on
    MinerClient raise at its result's ack. The limit is the server's, for its input only."""
    deep: Any = {}
    for _ in range(codec.MAX_DEPTH):
        deep = {"a": deep}
    ack = {"type": "ack", "id": "m1", "job_id": "j", "receipt": {"payload": deep}}
    assert codec.decode_server_to_miner(orjson.dumps(ack)) == Ack(
        id="m1", fields={"job_id": "j", "receipt": {"payload": deep}}
    )
    event = {**EVENT, "receipt": {"payload": deep}}
    assert codec.decode_server_to_client(orjson.dumps(event)).data["receipt"]["payload"] == deep  # type: ignore[union-attr]
    with pytest.raises(RemoteProtocolError, match="more than 64 levels"):
        codec.decode_miner_frame(orjson.dumps({"type": "heartbeat", "metrics": deep}))


def test_too_deep_counts_objects_and_lists_and_skips_flat_input() -> None:
    deep: Any = "x"
    for n in range(codec.MAX_DEPTH + 1):
        deep = {"k": deep} if n % 2 else [deep]
    text = orjson.dumps(deep)
    assert codec.too_deep(text, deep)
    assert codec.too_deep(text.decode(), deep)
    wide = [[1], {"a": [2]}] * 100  # many brackets, shallow: walked, not refused
    assert not codec.too_deep(orjson.dumps(wide), wide)
    assert codec.input_refusal(orjson.dumps(wide), wide) is None


# ---- integers past 64 bits: orjson reads them as floats, so they would come back changed ---


@pytest.mark.parametrize(
    ("frame", "where"),
    [
        (b'{"type":"job.submit","id":"s","payload":{"n":18446744073709551616}}', "payload.n"),
        (
            b'{"type":"job.submit","id":"s","payload":{"a":[1,{"b":-9223372036854775809}]}}',
            "payload.a[1].b",
        ),
        (
            '{"type":"job.submit","id":"s","payload":{},"constraints":{"x":' + "9" * 300 + "}}",
            "constraints.x",
        ),  # text, as websockets gives (orjson: "infinity" from 309 digits)
    ],
)
def test_an_integer_orjson_would_read_as_a_float_is_refused_naming_where(
    frame: bytes | str, where: str
) -> None:
    with pytest.raises(RemoteProtocolError, match=rf"^invalid frame: {re.escape(where)} is an"):
        codec.decode_client_frame(frame)


def test_integers_orjson_keeps_and_long_digit_strings_pass() -> None:
    """-2**63 to 2**64 - 1 are integers to orjson and round-trip; digits in a string are text."""
    payload = {"lo": -(2**63), "hi": 2**64 - 1, "s": "1" * 40, "f": 1.5e300}
    frame = orjson.dumps({"type": "job.submit", "id": "s", "payload": payload})
    msg = codec.decode_client_frame(frame)
    assert msg.payload == payload  # type: ignore[union-attr]
    assert orjson.loads(orjson.dumps(msg.payload)) == payload  # type: ignore[union-attr]
    assert codec.input_refusal(b"[" + b"1" * 30 + b".5]", [1e29]) is None  # a float: as sent


def test_a_submit_or_result_knows_its_frame_length_and_never_sends_it() -> None:
    """``size`` (what the scheduler counts a job's payload or result as) is the length of the
    frame decoded; ``encode`` leaves it out, and equality ignores it."""
    frame = b'{"type":"job.submit","payload":{"prompt":"hi"}}'
    submit = decode_client_frame(frame)
    assert isinstance(submit, JobSubmit)
    assert submit.size == len(frame)
    assert submit == JobSubmit(payload={"prompt": "hi"})
    assert b"size" not in encode(submit)
    frame = b'{"type":"job.result","job_id":"' + b"a" * 32 + b'","result":{"x":1}}'
    result = decode_miner_frame(frame)
    assert isinstance(result, JobResult)
    assert result.size == len(frame)
    assert b"size" not in encode(result)


def test_integer_fields_take_numbers_without_a_fraction() -> None:
    """JSON has one number type and Python clients write 120.0 for a computed 120: an integer
    field takes it as that integer, as REST does (docs/rest-api.md); 120.5 is still 1007."""
    msg = decode_client_frame(
        orjson.dumps({"type": "job.submit", "id": "s", "payload": {}, "ttl_seconds": 120.0})
    )
    assert isinstance(msg, JobSubmit)
    assert (msg.ttl_seconds, type(msg.ttl_seconds)) == (120, int)
    hello = decode_miner_frame(
        orjson.dumps({"type": "hello", "protocol": 1.0, "capabilities": {}, "concurrency": 2.0})
    )
    assert isinstance(hello, Hello)
    assert (hello.protocol, hello.concurrency) == (1, 2)
    with pytest.raises(RemoteProtocolError) as info:
        decode_client_frame(
            orjson.dumps({"type": "job.submit", "id": "s", "payload": {}, "ttl_seconds": 120.5})
        )
    assert info.value.close_code == CloseCode.INVALID_DATA


@pytest.mark.parametrize("ttl", [0, -5, -5.0, -(2**63), -1e300])
def test_a_ttl_below_one_second_is_one_second_as_rest_takes_it(ttl: float) -> None:
    """REST's POST /v1/jobs clamps ttl_seconds below 1 to 1 (rest-api.md); the socket closed
    1007 on it, ending every other job's stream on that socket for one field REST takes."""
    frame = orjson.dumps({"type": "job.submit", "id": "s", "payload": {}, "ttl_seconds": ttl})
    msg = decode_client_frame(frame)
    assert isinstance(msg, JobSubmit)
    assert (msg.ttl_seconds, type(msg.ttl_seconds)) == (1, int)


def test_attempts_past_a_million_are_read_on_both_sides() -> None:
    """Every assignment is an attempt (rejects and accept timeouts too): a long-lived job passes
    1,000,000, and a miner answering its job.assign with that attempt was closed 1007 (found by
    the input hunt). Attempts go up to MAX_ATTEMPT, as seq; the client side reads them too."""
    attempt = 1_000_001
    accept = decode_miner_frame(orjson.dumps(_obj(type="job.accept", job_id="j", attempt=attempt)))
    assert isinstance(accept, JobAccept)
    assert accept.attempt == attempt
    assign = decode_server_to_miner(orjson.dumps({**ASSIGN, "attempt": MAX_ATTEMPT}))
    assert isinstance(assign, JobAssign)
    assert assign.attempt == MAX_ATTEMPT
    event = decode_server_to_client(orjson.dumps({**EVENT, "attempt": attempt}))
    assert isinstance(event, JobEvent)
    assert event.attempt == attempt
    frame = encode_assign(
        "0" * 32, MAX_ATTEMPT, {}, {}, "2026-11-26T03:00:00.123Z", -2.2250738585072014e-308
    )
    assert assign_fits({}, {}, len(frame), read=0)
