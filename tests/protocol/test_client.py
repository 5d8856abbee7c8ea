"""Ring 1: MinerClient round trips against MinerSession over SessionPair (protocol/client.py)."""

from __future__ import annotations

import orjson
import pytest

from protocol.client import MinerClient
from protocol.errors import InvalidState, RemoteProtocolError
from protocol.messages import (
    Ack,
    Error,
    Heartbeat,
    Hello,
    JobAccept,
    JobAssign,
    JobCancel,
    JobFail,
    JobProgress,
    JobReject,
    JobResult,
    Status,
    Welcome,
)
from protocol.receipt_verify import result_attestation
from protocol.receipts import key_id_for, load_signing_key
from protocol.session import AWAIT_AUTH, AWAIT_HELLO, CLOSING, OPEN
from protocol.types import CloseCode
from tests.fakes import SessionPair

CAPS = {"gpus": [{"name": "RTX 4090", "memory_mb": 24564}], "models": ["llama3"]}


def welcome(
    session_id: str = "sess-1", *, resumed: tuple[str, ...] = (), revoked: tuple[str, ...] = ()
) -> Welcome:
    return Welcome(
        protocol=1,
        session_id=session_id,
        miner_id="gpu-box-7",
        heartbeat_interval=10.0,
        heartbeat_timeout=30.0,
        resumed=resumed,
        revoked=revoked,
    )


def assign(job_id: str, attempt: int = 1) -> JobAssign:
    return JobAssign(
        job_id=job_id,
        attempt=attempt,
        payload={"prompt": job_id},
        constraints={},
        expires_at="2025-01-01T00:00:00.000Z",
        accept_timeout=10.0,
    )


def connected(*, concurrency: int = 1) -> SessionPair:
    """A pair past hello/welcome."""
    pair = SessionPair(capabilities=CAPS, concurrency=concurrency)
    pair.client.hello()
    pair.to_server()
    pair.server_send(welcome())
    return pair


def test_hello_reaches_session_as_event() -> None:
    """The client's hello opens the server session and carries the miner's declared fields."""
    pair = SessionPair(capabilities=CAPS, concurrency=2, region="eu-west")
    assert pair.client.data_to_send() == []
    pair.client.hello()
    assert pair.to_server() == [
        Hello(protocol=1, miner_id="gpu-box-7", capabilities=CAPS, concurrency=2, region="eu-west")
    ]
    assert pair.session.state is OPEN
    assert pair.client.welcome is None
    assert pair.client.session_id is None


def test_welcome_sets_session_id_and_miner_id() -> None:
    """A welcome records the session id for resume and the miner id the server settled on."""
    pair = SessionPair(capabilities=CAPS, miner_id=None)
    pair.client.hello()
    [hello] = pair.to_server()
    assert isinstance(hello, Hello)
    assert hello.miner_id is None
    w = welcome()
    assert pair.server_send(w) == [w]
    assert pair.client.welcome == w
    assert pair.client.session_id == "sess-1"
    assert pair.client.miner_id == "gpu-box-7"
    assert pair.client.jobs == {}


def test_assign_is_tracked_and_accept_reaches_server() -> None:
    """job.assign adds the job to client.jobs; accept sends job.accept for a held job."""
    pair = connected()
    a = assign("j1")
    assert pair.server_send(a) == [a]
    assert pair.client.jobs == {"j1": a}
    pair.client.accept("j1")
    assert pair.to_server() == [JobAccept(job_id="j1", attempt=1)]
    assert pair.client.jobs == {"j1": a}


def test_accept_or_reject_of_unheld_job_raises() -> None:
    """accept/reject of a job the miner does not hold is InvalidState and sends nothing."""
    pair = connected()
    with pytest.raises(InvalidState, match="not held"):
        pair.client.accept("nope")
    with pytest.raises(InvalidState, match="not held"):
        pair.client.reject("nope")
    assert pair.to_server() == []


def test_reject_drops_job_and_reaches_server() -> None:
    """reject removes the job locally and sends job.reject with the reason."""
    pair = connected()
    pair.server_send(assign("j1", attempt=2))
    pair.client.reject("j1", "no vram")
    assert pair.client.jobs == {}
    assert pair.to_server() == [JobReject(job_id="j1", reason="no vram", attempt=2)]


def test_progress_result_and_ack_with_receipt() -> None:
    """progress is relayed; result frees the job, has a fresh request id the ack answers."""
    pair = connected()
    pair.server_send(assign("j1"), assign("j2", attempt=3))
    pair.client.accept("j1")
    pair.client.progress("j1", progress=0.5, output="tok")
    request_id = pair.client.result("j1", {"text": "hi"}, {"units": 1.5})
    second_id = pair.client.result("j2", {"text": "yo"})
    assert request_id == "m1"
    assert second_id == "m2"
    assert pair.client.next_id() == "m3"
    assert pair.to_server() == [
        JobAccept(job_id="j1", attempt=1),
        JobProgress(job_id="j1", progress=0.5, output="tok", attempt=1),
        JobResult(job_id="j1", result={"text": "hi"}, metrics={"units": 1.5}, attempt=1, id="m1"),
        JobResult(job_id="j2", result={"text": "yo"}, metrics={}, attempt=3, id="m2"),
    ]
    assert pair.client.jobs == {}
    receipt = {"receipt_id": "r", "job_id": "j1"}
    ack = Ack(id=request_id, fields={"receipt": receipt})
    assert pair.server_send(ack) == [ack]


def test_result_key_registers_in_hello_and_co_signs_results() -> None:
    """With a result key the hello names its public key and every result carries a signature
    that verifies against it (for this job and result only)."""
    key = load_signing_key("22" * 32)
    pair = SessionPair(capabilities=CAPS)
    pair.client.result_key = key
    pair.client.hello()
    [hello] = pair.to_server()
    assert isinstance(hello, Hello)
    assert hello.result_key == key_id_for(key.public_key())
    pair.server_send(welcome(), assign("j1"))
    pair.client.result("j1", {"text": "hi"})
    [result] = pair.to_server()
    assert isinstance(result, JobResult)
    assert result.result_sig is not None
    kid = hello.result_key
    assert result_attestation(kid, "j1", {"text": "hi"}, result.result_sig) is not None
    assert result_attestation(kid, "j1", {"text": "ho"}, result.result_sig) is None
    assert result_attestation(kid, "j2", {"text": "hi"}, result.result_sig) is None


def test_result_for_unknown_job_is_still_sent() -> None:
    """result() of a job not held is sent without a fencing attempt; the server may refuse it."""
    pair = connected()
    pair.client.progress("gone", message="late")
    request_id = pair.client.result("gone", {})
    assert pair.to_server() == [
        JobProgress(job_id="gone", message="late", attempt=None),
        JobResult(job_id="gone", result={}, attempt=None, id=request_id),
    ]
    err = Error(code="not_assigned", message="job gone is not leased to you", id=request_id)
    assert pair.server_send(err) == [err]
    assert pair.client.jobs == {}


def test_fail_drops_job_and_reaches_server() -> None:
    """fail removes the job and sends job.fail with its retryable flag."""
    pair = connected()
    pair.server_send(assign("j1"))
    pair.client.fail("j1", "oom", "out of memory", retryable=True)
    pair.client.fail("never-held", "x", "y")
    assert pair.client.jobs == {}
    assert pair.to_server() == [
        JobFail(
            job_id="j1", error_code="oom", error_message="out of memory", retryable=True, attempt=1
        ),
        JobFail(job_id="never-held", error_code="x", error_message="y", attempt=None),
    ]


def test_cancel_drops_job() -> None:
    """job.cancel from the server removes the job; cancel of an unknown job is harmless."""
    pair = connected()
    pair.server_send(assign("j1"), assign("j2"))
    cancel = JobCancel(job_id="j1", reason="client canceled")
    assert pair.server_send(cancel, JobCancel(job_id="zz", reason="expired"))[0] == cancel
    assert set(pair.client.jobs) == {"j2"}


def test_status_and_heartbeat() -> None:
    """status updates the declared concurrency only when given; heartbeat carries metrics."""
    pair = connected(concurrency=2)
    pair.client.status(draining=True)
    assert pair.client.concurrency == 2
    pair.client.status(concurrency=4)
    assert pair.client.concurrency == 4
    pair.client.heartbeat({"load": 0.3})
    pair.client.heartbeat()
    assert pair.to_server() == [
        Status(draining=True),
        Status(concurrency=4),
        Heartbeat(metrics={"load": 0.3}),
        Heartbeat(),
    ]


def test_resume_keeps_only_resumed_jobs() -> None:
    """On reconnect the hello asks to resume; welcome.resumed jobs stay, all others are dropped."""
    pair = connected()
    pair.server_send(assign("a"), assign("b"), assign("c"))
    pair.reconnect()
    pair.client.hello()
    [hello] = pair.to_server()
    assert isinstance(hello, Hello)
    assert hello.resume_session == "sess-1"
    assert pair.client.welcome is None
    w = welcome("sess-2", resumed=("a", "c", "unknown-to-client"), revoked=("b",))
    pair.server_send(w)
    assert set(pair.client.jobs) == {"a", "c"}
    assert pair.client.jobs["a"] == assign("a")
    assert pair.client.session_id == "sess-2"


def test_fresh_welcome_drops_all_jobs() -> None:
    """A welcome that resumes nothing clears every job the miner thought it held."""
    pair = connected()
    pair.server_send(assign("a"))
    pair.reconnect()
    pair.client.hello(resume=False)
    [hello] = pair.to_server()
    assert isinstance(hello, Hello)
    assert hello.resume_session is None
    pair.server_send(welcome("sess-2"))
    assert pair.client.jobs == {}


def test_reconnect_unauthenticated_needs_auth_first() -> None:
    """A pair can start unauthenticated: hello first closes 4401 and nothing is delivered."""
    pair = SessionPair(capabilities=CAPS, authenticated=False)
    assert pair.session.state is AWAIT_AUTH
    pair.client.hello()
    assert pair.to_server() == []
    assert pair.session.state is CLOSING
    assert pair.session.close_code == CloseCode.NOT_AUTHENTICATED
    pair.reconnect(authenticated=True)
    assert pair.session.state is AWAIT_HELLO


def test_hello_after_handshake_closes_session() -> None:
    """A client that says hello twice on one socket gets the session closed 4000."""
    pair = connected()
    pair.client.hello()
    assert pair.to_server() == []
    assert pair.session.close_code == CloseCode.PROTOCOL_ERROR


def test_oversize_result_closes_1009() -> None:
    """A result bigger than the session's frame limit closes 1009 on the server side."""
    pair = SessionPair(capabilities=CAPS, max_frame=256)
    pair.client.hello()
    pair.to_server()
    pair.client.result("j1", {"text": "x" * 300})
    assert pair.to_server() == []
    assert pair.session.close_code == CloseCode.TOO_BIG


def test_wire_frames_are_recorded() -> None:
    """SessionPair keeps every frame that crossed the link, in both directions, as JSON bytes."""
    pair = connected()
    assert [orjson.loads(f)["type"] for f in pair.wire_to_server] == ["hello"]
    assert [orjson.loads(f)["type"] for f in pair.wire_to_client] == ["welcome"]


def test_client_rejects_bad_server_frames() -> None:
    """The client's decoder raises RemoteProtocolError on an invalid server frame."""
    client = MinerClient(capabilities={})
    with pytest.raises(RemoteProtocolError):
        client.receive_data(b'{"type":"job.assign","job_id":""}')
    with pytest.raises(RemoteProtocolError):
        client.receive_data(
            b'{"type":"welcome","protocol":1,"session_id":"s","miner_id":"m","resumed":"abc"}'
        )
    with pytest.raises(RemoteProtocolError):
        client.receive_data(b'{"no":"type"}')
    assert client.events_received() == []
    assert client.jobs == {}


def test_a_server_frame_of_an_unknown_type_is_skipped_and_counted() -> None:
    """A type this client does not know (a newer coordinator's, or another socket's) is no
    error: it is counted in ``unknown_types`` and the session goes on."""
    pair = connected()
    client = pair.client
    client.events_received()
    client.receive_data(b'{"type":"job.event","job_id":"j"}')
    client.receive_data(b'{"type":"something.new","x":[1]}')
    assert client.unknown_types == 2
    assert client.events_received() == []
    assert client.welcome is not None


def test_untracked_server_message_is_still_an_event(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoded message the client keeps no state for is passed on to events unchanged."""
    from protocol import client as client_module

    other = Heartbeat(metrics={"x": 1})
    monkeypatch.setattr(client_module, "decode_server_to_miner", lambda data: other)
    client = MinerClient(capabilities={})
    client.receive_data(b"{}")
    assert client.events_received() == [other]
    assert client.jobs == {}
    assert client.welcome is None
