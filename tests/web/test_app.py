"""The app in process (Starlette ``TestClient``): health routes and the client/miner sockets."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from hypothesis import given, settings, strategies as st
from starlette.websockets import WebSocketDisconnect

from protocol.client import MinerClient
from protocol.codec import decode_server_to_client
from protocol.messages import Ack, JobAssign, Status
from storage.memory import InMemoryJobStore
from tests.conftest import (
    ADMIN_KEY,
    CLIENT_KEY,
    CLIENT_KEY_2,
    MINER_KEY,
    MINER_KEY_2,
    make_settings,
)
from tests.fakes import RecordingStore
from web.app import create_app
from web.schemas import ASSIGNED_CONSTRAINT_KEYS
from web.ws_client import MAX_SUBSCRIBE_JOBS

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from starlette.testclient import WebSocketTestSession

    from protocol.records import JobRecord

from starlette.testclient import TestClient

HEX32 = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(tmp_path))) as c:
        yield c


def recv(ws: WebSocketTestSession) -> dict[str, Any]:
    msg: dict[str, Any] = ws.receive_json()
    return msg


def hello(ws: WebSocketTestSession) -> dict[str, Any]:
    ws.send_json({"type": "hello", "protocol": 1})
    welcome = recv(ws)
    assert welcome["type"] == "welcome"
    return welcome


def submit(ws: WebSocketTestSession, request_id: str, **fields: Any) -> dict[str, Any]:
    ws.send_json({"type": "job.submit", "id": request_id, "payload": {"prompt": "hi"}, **fields})
    ack = recv(ws)
    assert ack["type"] == "ack"
    assert ack["id"] == request_id
    return ack


def client_socket(c: TestClient, key: str = CLIENT_KEY) -> Any:
    return c.websocket_connect("/v1/jobs/ws", headers={"X-Api-Key": key})


# ---- health -------------------------------------------------------------------------------


def test_health_reports_ok(client: TestClient) -> None:
    """/health answers 200 with a non-empty JSON body whose status is ok."""
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body
    assert body["status"] == "ok"
    assert body["version"]


def test_liveness(client: TestClient) -> None:
    """/health/live answers 200."""
    r = client.get("/health/live")
    assert r.status_code == 200
    assert r.json()["status"] == "alive"


def test_ready_after_startup(client: TestClient) -> None:
    """/health/ready answers 200 once the lifespan has opened the store and started serving."""
    r = client.get("/health/ready")
    assert r.status_code == 200
    assert r.json()["status"] == "ready"


def test_not_ready_without_startup(tmp_path: Path) -> None:
    """Before the lifespan ran, /health/ready answers 503."""
    c = TestClient(create_app(make_settings(tmp_path)))
    try:
        r = c.get("/health/ready")
    finally:
        c.close()
    assert r.status_code == 503


# ---- client socket ------------------------------------------------------------------------


def test_welcome_carries_a_client_id_that_is_not_the_key(client: TestClient) -> None:
    """hello -> welcome with a stable client id derived from, but not containing, the key."""
    with client_socket(client) as ws:
        welcome = hello(ws)
    assert welcome["protocol"] == 1
    assert welcome["client_id"]
    assert CLIENT_KEY not in welcome["client_id"]
    with client_socket(client) as ws:
        assert hello(ws)["client_id"] == welcome["client_id"]
    with client_socket(client, CLIENT_KEY_2) as ws:
        assert hello(ws)["client_id"] != welcome["client_id"]


def test_submit_acks_the_job_view_then_sends_queued(client: TestClient) -> None:
    """job.submit -> ack with a QUEUED, unservable job view, then a queued event."""
    with client_socket(client) as ws:
        hello(ws)
        ack = submit(ws, "s1", constraints={"gpu": "A100"}, priority=3)
        job = ack["job"]
        assert job["state"] == "QUEUED"
        assert HEX32.match(job["job_id"])
        assert job["servable"] is False
        assert job["payload"] == {"prompt": "hi"}
        assert job["constraints"] == {"gpu": "A100"}
        assert job["priority"] == 3
        assert ack["duplicate"] is False
        event = recv(ws)
        assert (event["type"], event["job_id"], event["seq"], event["event"], event["state"]) == (
            "job.event",
            job["job_id"],
            1,
            "queued",
            "QUEUED",
        )
        assert event["at"].endswith("Z")


def test_repeated_idempotency_key_returns_the_same_job(client: TestClient) -> None:
    """The same idempotency key from the same client -> the same job_id, duplicate: true."""
    with client_socket(client) as ws:
        hello(ws)
        first = submit(ws, "s1", idempotency_key="order-42")
        assert recv(ws)["event"] == "queued"
        again = submit(ws, "s2", idempotency_key="order-42")
    assert again["job"]["job_id"] == first["job"]["job_id"]
    assert first["duplicate"] is False
    assert again["duplicate"] is True


def test_an_empty_idempotency_key_is_refused_as_rest_refuses_it(client: TestClient) -> None:
    """``"idempotency_key": ""`` was a key: every such submit after the first answered the
    first job (duplicate: true) and queued nothing. It is an invalid field, as a key over 128
    characters is (the socket closes 1007); REST answers 422. Nothing is stored."""
    with client_socket(client) as ws:
        hello(ws)
        assert submit(ws, "s1", idempotency_key="k")["duplicate"] is False
        assert recv(ws)["event"] == "queued"
        ws.send_json({"type": "job.submit", "id": "s2", "payload": {}, "idempotency_key": ""})
        with pytest.raises(WebSocketDisconnect) as info:
            recv(ws)
    assert info.value.code == 1007
    assert info.value.reason == "field 'idempotency_key' must not be empty"
    assert len(client.app.state.core.dispatcher.scheduler.jobs) == 1


def test_idempotency_keys_are_per_client(client: TestClient) -> None:
    """Another client using the same key gets its own job."""
    with client_socket(client) as ws:
        hello(ws)
        mine = submit(ws, "s1", idempotency_key="order-42")
    with client_socket(client, CLIENT_KEY_2) as ws:
        hello(ws)
        theirs = submit(ws, "s1", idempotency_key="order-42")
    assert theirs["job"]["job_id"] != mine["job"]["job_id"]
    assert theirs["duplicate"] is False


def test_cancel_acks_then_sends_canceled_and_cannot_repeat(client: TestClient) -> None:
    """job.cancel -> ack + canceled event; a second cancel -> error not_cancelable."""
    with client_socket(client) as ws:
        hello(ws)
        job_id = submit(ws, "s1")["job"]["job_id"]
        assert recv(ws)["event"] == "queued"

        ws.send_json({"type": "job.cancel", "id": "c1", "job_id": job_id})
        ack = recv(ws)
        assert (ack["type"], ack["id"], ack["job"]["state"]) == ("ack", "c1", "CANCELED")
        event = recv(ws)
        assert (event["type"], event["seq"], event["event"], event["state"]) == (
            "job.event",
            2,
            "canceled",
            "CANCELED",
        )

        ws.send_json({"type": "job.cancel", "id": "c2", "job_id": job_id})
        err = recv(ws)
        assert (err["type"], err["id"], err["code"]) == ("error", "c2", "not_cancelable")


def test_cancel_of_an_unknown_job_is_not_found(client: TestClient) -> None:
    """Canceling a job that does not exist -> error not_found."""
    with client_socket(client) as ws:
        hello(ws)
        ws.send_json({"type": "job.cancel", "id": "c1", "job_id": "0" * 32})
        err = recv(ws)
    assert (err["type"], err["id"], err["code"]) == ("error", "c1", "not_found")


def test_cancel_of_another_clients_job_is_not_found(client: TestClient) -> None:
    """A client cannot see, let alone cancel, another client's job."""
    with client_socket(client) as ws:
        hello(ws)
        job_id = submit(ws, "s1")["job"]["job_id"]
    with client_socket(client, CLIENT_KEY_2) as ws:
        hello(ws)
        ws.send_json({"type": "job.cancel", "id": "c1", "job_id": job_id})
        err = recv(ws)
    assert (err["type"], err["code"]) == ("error", "not_found")


def test_unknown_type_is_an_error_and_the_connection_stays_usable(client: TestClient) -> None:
    """An unknown type -> error unknown_type (not fatal); the next submit works."""
    with client_socket(client) as ws:
        hello(ws)
        ws.send_json({"type": "job.teleport", "id": "x1", "job_id": "j"})
        err = recv(ws)
        assert (err["type"], err["id"], err["code"]) == ("error", "x1", "unknown_type")
        ws.send_json({"type": "job.teleport"})
        err = recv(ws)
        assert (err["type"], err["code"], err["ref"]) == ("error", "unknown_type", "job.teleport")
        assert submit(ws, "s1")["job"]["state"] == "QUEUED"


def test_subscribe_replays_a_jobs_events_on_a_new_connection(client: TestClient) -> None:
    """A second connection subscribing to a finished job gets its stored events."""
    with client_socket(client) as ws:
        hello(ws)
        job_id = submit(ws, "s1")["job"]["job_id"]
        assert recv(ws)["event"] == "queued"
        ws.send_json({"type": "job.cancel", "id": "c1", "job_id": job_id})
        assert recv(ws)["type"] == "ack"
        assert recv(ws)["event"] == "canceled"
    with client_socket(client) as ws:
        hello(ws)
        ws.send_json({"type": "subscribe", "id": "sub1", "job_ids": [job_id, "nope"]})
        frames = [recv(ws) for _ in range(4)]
    assert [(f["seq"], f["event"]) for f in frames if f["type"] == "job.event"] == [
        (1, "queued"),
        (2, "canceled"),
    ]
    errors = [f for f in frames if f["type"] == "error"]
    assert [(e["code"], e["ref"]) for e in errors] == [("not_found", "nope")]
    # The ack comes before the replay (protocol: "-> ack {id}, then for each job ...").
    assert frames[1] == {"type": "ack", "id": "sub1", "missing": ["nope"]}
    assert [f["type"] for f in frames[2:]] == ["job.event", "job.event"]


def test_a_subscribe_past_a_jobs_log_names_it_in_behind(client: TestClient) -> None:
    """``after`` past the job's last event (events lost with the store's last commits): the ack
    says where the job's log ends (``behind``), and the events from there on follow; a subscribe
    without such a job has no ``behind``."""
    with client_socket(client) as ws:
        hello(ws)
        job_id = submit(ws, "s1")["job"]["job_id"]
        assert recv(ws)["seq"] == 1
    with client_socket(client) as ws:
        hello(ws)
        after = {job_id: 7}
        ws.send_json({"type": "subscribe", "id": "b", "job_ids": [job_id], "after": after})
        assert recv(ws) == {"type": "ack", "id": "b", "missing": [], "behind": {job_id: 1}}
        ws.send_json({"type": "job.cancel", "id": "c", "job_id": job_id})
        assert recv(ws)["type"] == "ack"
        assert recv(ws)["seq"] == 2
        ws.send_json({"type": "subscribe", "id": "n", "job_ids": [job_id], "after": {job_id: 2}})
        assert recv(ws) == {"type": "ack", "id": "n", "missing": []}


class CountingStore(InMemoryJobStore):
    """The in-memory store, recording the ids ``get_job`` is asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    async def get_job(self, job_id: str) -> JobRecord | None:
        self.reads.append(job_id)
        return await super().get_job(job_id)


def test_subscribe_reads_each_named_job_once(tmp_path: Path) -> None:
    """A subscribe looks each job up once: every unknown id cost two store reads (one to answer
    ``missing``, one more before replaying), and a job named twice is read once."""
    store = CountingStore()
    with TestClient(create_app(make_settings(tmp_path), store=store)) as c, client_socket(c) as ws:
        hello(ws)
        ws.send_json({"type": "subscribe", "id": "s", "job_ids": ["nope-1", "nope-2", "nope-1"]})
        frames = [recv(ws) for _ in range(3)]
    assert [(f["type"], f.get("ref")) for f in frames] == [
        ("error", "nope-1"),
        ("error", "nope-2"),
        ("ack", None),
    ]
    assert frames[2]["missing"] == ["nope-1", "nope-2"]
    assert store.reads == ["nope-1", "nope-2"]


@pytest.mark.parametrize("follow_all", [False, True], ids=["job_ids", "all-after"])
def test_a_subscribe_naming_too_many_jobs_is_refused_before_any_read(
    tmp_path: Path, follow_all: bool
) -> None:
    """A subscribe naming more than MAX_SUBSCRIBE_JOBS jobs gets one ``error`` ``invalid`` and
    changes nothing: one naming 200,000 made-up ids cost two store reads and an error frame
    each (and over the outbox's hard limit of errors, its own socket was closed 4429)."""
    store = CountingStore()
    ids = [f"n{i}" for i in range(MAX_SUBSCRIBE_JOBS + 1)]
    named: dict[str, Any] = (
        {"job_ids": "all", "after": dict.fromkeys(ids, 0)} if follow_all else {"job_ids": ids}
    )
    with TestClient(create_app(make_settings(tmp_path), store=store)) as c, client_socket(c) as ws:
        hello(ws)
        ws.send_json({"type": "subscribe", "id": "big", **named})
        err = recv(ws)
        assert (err["type"], err["id"], err["code"]) == ("error", "big", "invalid")
        assert store.reads == []
        mine = submit(ws, "s1")["job"]["job_id"]  # the socket is still open, following nothing
        assert recv(ws)["event"] == "queued"
        ws.send_json({"type": "subscribe", "id": "ok", "job_ids": ids[:MAX_SUBSCRIBE_JOBS]})
        frames = [recv(ws) for _ in range(MAX_SUBSCRIBE_JOBS + 1)]
        assert frames[-1] == {"type": "ack", "id": "ok", "missing": ids[:MAX_SUBSCRIBE_JOBS]}
        core: Any = c.app.state.core  # type: ignore[attr-defined]
        (conn,) = [x for x in core.connections if getattr(x, "subscriber", None) is not None]
        assert (conn.subscriber.all, conn.subscriber.job_ids) == (False, {mine})


def test_a_job_followed_through_all_is_replayed_when_named_without_after(
    client: TestClient,
) -> None:
    """Naming a job in a subscribe replays its log, ``after`` or not, when the socket follows it
    only through "all" (the contract: "for each job: every stored event with seq > after");
    only a job the socket follows by name is not replayed again. Its live events then arrive
    once each."""
    with client_socket(client) as watcher, client_socket(client) as ws:
        hello(watcher)
        watcher.send_json({"type": "subscribe", "id": "all", "job_ids": "all"})
        assert recv(watcher) == {"type": "ack", "id": "all", "missing": []}
        hello(ws)
        job_id = submit(ws, "s1")["job"]["job_id"]
        assert (recv(watcher)["seq"], recv(ws)["seq"]) == (1, 1)
        watcher.send_json({"type": "subscribe", "id": "named", "job_ids": [job_id]})
        assert recv(watcher) == {"type": "ack", "id": "named", "missing": []}
        replayed = recv(watcher)
        assert (replayed["job_id"], replayed["seq"], replayed["event"]) == (job_id, 1, "queued")
        watcher.send_json({"type": "subscribe", "id": "again", "job_ids": [job_id]})
        assert recv(watcher) == {"type": "ack", "id": "again", "missing": []}  # by name now
        ws.send_json({"type": "job.cancel", "id": "c1", "job_id": job_id})
        assert recv(watcher)["event"] == "canceled"
        watcher.send_json({"type": "unsubscribe", "id": "u1", "job_ids": "all"})
        assert recv(watcher) == {"type": "ack", "id": "u1"}  # nothing else came before it


def test_unsubscribing_ids_while_following_all_keeps_only_live_own_jobs_muted(
    client: TestClient,
) -> None:
    """While following "all", an unsubscribed id is remembered only while it names a live job of
    this client: every id was kept for the socket's life (a client grew the coordinator's memory
    without bound with unsubscribe frames of made-up ids), and an ended job stayed."""
    core: Any = client.app.state.core  # type: ignore[attr-defined]
    with client_socket(client, CLIENT_KEY_2) as other:
        hello(other)
        foreign = submit(other, "o1")["job"]["job_id"]
    with client_socket(client) as ws:
        hello(ws)
        mine = submit(ws, "s1")["job"]["job_id"]
        assert recv(ws)["event"] == "queued"
        ws.send_json({"type": "subscribe", "id": "all", "job_ids": "all"})
        assert recv(ws) == {"type": "ack", "id": "all", "missing": []}
        made_up = [f"nope-{i}" for i in range(1000)]
        ws.send_json({"type": "unsubscribe", "id": "u1", "job_ids": [*made_up, foreign, mine]})
        assert recv(ws) == {"type": "ack", "id": "u1"}
        (conn,) = [c for c in core.connections if getattr(c, "subscriber", None) is not None]
        assert conn.subscriber.muted == {mine}
        ws.send_json({"type": "job.cancel", "id": "c1", "job_id": mine})
        assert recv(ws)["type"] == "ack"  # no canceled event follows: the job is muted
        assert conn.subscriber.muted == set()  # the canceled event was published with the ack


def test_submit_reaches_a_connected_miner(client: TestClient) -> None:
    """With a matching miner connected the job is servable and pushed to it as job.assign."""
    with client.websocket_connect("/v1/miners/ws", headers={"X-Api-Key": MINER_KEY}) as miner:
        miner.send_json({"type": "hello", "protocol": 1, "miner_id": "gpu-1", "concurrency": 1})
        welcome = recv(miner)
        assert (welcome["type"], welcome["miner_id"]) == ("welcome", "gpu-1")
        assert MINER_KEY not in welcome["session_id"]
        with client_socket(client) as ws:
            hello(ws)
            ack = submit(ws, "s1")
            assert ack["job"]["servable"] is True
            assign = recv(miner)
            assert (assign["type"], assign["job_id"], assign["attempt"]) == (
                "job.assign",
                ack["job"]["job_id"],
                1,
            )
            assert [recv(ws)["event"] for _ in range(2)] == ["queued", "assigned"]


def test_a_result_whose_status_is_failed_fails_the_job_as_over_rest(client: TestClient) -> None:
    """REST takes ``result.status == "failed"`` as a failure (rest-api.md [ours]: the production
    miner reports its failures so); a socket miner's job.result with it completed the job, with
    a signed receipt (billed with BILLING=on) and the failure as its result. It fails the job
    now, as REST does: FAILED with the result's error, no receipt, the ack's receipt null; the
    same report again gets the same ack."""
    with client.websocket_connect("/v1/miners/ws", headers={"X-Api-Key": MINER_KEY}) as miner:
        miner.send_json({"type": "hello", "protocol": 1, "miner_id": "gpu-1"})
        assert recv(miner)["type"] == "welcome"
        with client_socket(client) as ws:
            hello(ws)
            job_id = submit(ws, "s1")["job"]["job_id"]
            assign = recv(miner)
            assert assign["job_id"] == job_id
            miner.send_json({"type": "job.accept", "job_id": job_id})
            report = {
                "type": "job.result",
                "job_id": job_id,
                "attempt": assign["attempt"],
                "result": {"status": "failed", "error": "CUDA out of memory"},
            }
            miner.send_json({**report, "id": "r1"})
            ack = recv(miner)
            assert ack == {"type": "ack", "id": "r1", "job_id": job_id, "receipt": None}
            events = [recv(ws) for _ in range(4)]
            assert [e["event"] for e in events] == ["queued", "assigned", "started", "failed"]
            assert (events[-1]["state"], events[-1]["error"]) == ("FAILED", "CUDA out of memory")
            assert "receipt" not in events[-1]
            miner.send_json({**report, "id": "r2"})  # its ack was lost: the same answer
            assert recv(miner) == {"type": "ack", "id": "r2", "job_id": job_id, "receipt": None}
            miner.send_json({**report, "id": "r3", "attempt": assign["attempt"] + 1})
            refused = recv(miner)
            assert (refused["id"], refused["code"]) == ("r3", "not_assigned")
    r = client.get(f"/v1/jobs/{job_id}", headers={"X-Api-Key": CLIENT_KEY})
    assert (r.json()["state"], r.json()["receipt_id"]) == ("FAILED", None)


def test_a_repeated_failed_status_result_of_a_job_gone_from_memory_is_answered_from_the_store(
    tmp_path: Path,
) -> None:
    """The repeat of a failed-status result (its ack lost) once the job left memory: the same
    ack, read from the store; one naming another failure is not_assigned."""
    settings = make_settings(tmp_path, terminal_retention_bytes=1)  # only the last ended job
    with (
        TestClient(create_app(settings)) as c,
        c.websocket_connect("/v1/miners/ws", headers={"X-Api-Key": MINER_KEY}) as miner,
        client_socket(c) as ws,
    ):
        miner.send_json({"type": "hello", "protocol": 1, "miner_id": "gpu-1"})
        assert recv(miner)["type"] == "welcome"
        hello(ws)
        job_id = submit(ws, "s1")["job"]["job_id"]
        assert recv(miner)["type"] == "job.assign"
        report = {"type": "job.result", "job_id": job_id, "result": {"status": "failed"}}
        miner.send_json({**report, "id": "r1"})
        assert recv(miner) == {"type": "ack", "id": "r1", "job_id": job_id, "receipt": None}
        assert [recv(ws)["event"] for _ in range(3)] == ["queued", "assigned", "failed"]
        other = submit(ws, "s2")["job"]["job_id"]
        assert recv(miner)["job_id"] == other
        miner.send_json({"type": "job.result", "id": "r2", "job_id": other, "result": {}})
        assert recv(miner)["id"] == "r2"
        assert job_id not in c.app.state.core.dispatcher.scheduler.jobs
        miner.send_json({**report, "id": "r3"})
        assert recv(miner) == {"type": "ack", "id": "r3", "job_id": job_id, "receipt": None}
        miner.send_json({**report, "id": "r4", "result": {"status": "failed", "error": "other"}})
        refused = recv(miner)
        assert (refused["id"], refused["code"]) == ("r4", "not_assigned")


def test_a_miner_client_takes_the_ack_of_a_result_for_the_deepest_payload_taken(
    client: TestClient,
) -> None:
    """A payload as deep as a submit may carry: the result's ack holds it in its receipt's
    metadata, three levels deeper. MinerClient raised on that ack (it refused the server's
    frame as input to a store), so any client could crash miners built on it
    (examples/ws_miner.py died) with one such job each. Both peers' decoders now take what
    the server sends."""
    payload: dict[str, Any] = {}
    for _ in range(61):  # the submit frame is then 64 levels deep, the most it may be
        payload = {"a": payload}
    with (
        client.websocket_connect("/v1/miners/ws", headers={"X-Api-Key": MINER_KEY}) as raw,
        client_socket(client) as ws,
    ):
        miner = MinerClient(capabilities={})
        miner.hello()
        raw.send_text(miner.data_to_send()[0].decode())
        miner.receive_data(raw.receive_text())
        assert miner.events_received()[0] == miner.welcome
        hello(ws)
        ws.send_json({"type": "job.submit", "id": "s1", "payload": payload})
        ack = decode_server_to_client(ws.receive_text())
        assert isinstance(ack, Ack)
        assert ack.fields["job"]["payload"] == payload
        miner.receive_data(raw.receive_text())
        (assign,) = miner.events_received()
        assert isinstance(assign, JobAssign)
        assert assign.payload == payload
        request_id = miner.result(assign.job_id, {"ok": True})
        raw.send_text(miner.data_to_send()[0].decode())
        miner.receive_data(raw.receive_text())
        (reply,) = miner.events_received()
        assert isinstance(reply, Ack)
        assert reply.id == request_id
        assert reply.fields["receipt"]["metadata"]["job_payload"] == payload


def test_frames_of_a_replaced_session_do_not_act_for_the_session_that_took_over(
    client: TestClient,
) -> None:
    """A second session of a miner id replaces the first, whose socket is closed 4409 once the
    new hello is committed. A frame the old socket sent meanwhile acted as the miner: a
    ``status`` drained (or resized) the session that took over, a reject sent its job back.
    The old socket reads nothing more once it is replaced (here: a frame handled as if it had
    come in that window)."""
    from web.ws_miner import MinerConnection

    core = client.app.state.core
    with client.websocket_connect("/v1/miners/ws", headers={"X-Api-Key": MINER_KEY}) as old:
        old.send_json({"type": "hello", "protocol": 1, "miner_id": "twin"})
        assert recv(old)["type"] == "welcome"
        (stale,) = [c for c in core.connections if isinstance(c, MinerConnection)]
        with client.websocket_connect("/v1/miners/ws", headers={"X-Api-Key": MINER_KEY}) as new:
            new.send_json({"type": "hello", "protocol": 1, "miner_id": "twin", "concurrency": 2})
            assert recv(new)["type"] == "welcome"
            with pytest.raises(WebSocketDisconnect) as info:
                recv(old)
            assert info.value.code == 4409
            session = stale.make_session(authenticated=True)
            status = Status(draining=True, concurrency=1, id="st")
            assert client.portal is not None
            assert client.portal.call(stale.handle_now, status, session)
            miner = core.dispatcher.scheduler.miners["twin"]
            assert (miner.draining, miner.concurrency) == (False, 2)


def test_a_refused_status_without_an_id_names_its_type(client: TestClient) -> None:
    """Without an id a failure's error names the job or the offending type in ``ref``
    (protocol.md, framing): a refused ``status`` named ``set_status``, the dispatcher's method,
    a type no peer sends. Here the miner was disconnected by an operator (its started job
    waits for a resume) and its status frame handled as if it came before the socket's close."""
    from web.ws_miner import MinerConnection

    core = client.app.state.core
    with client.websocket_connect("/v1/miners/ws", headers={"X-Api-Key": MINER_KEY}) as miner:
        miner.send_json({"type": "hello", "protocol": 1, "miner_id": "m1"})
        assert recv(miner)["type"] == "welcome"
        (conn,) = [c for c in core.connections if isinstance(c, MinerConnection)]
        r = client.post("/v1/jobs", json={"payload": {}}, headers={"X-Api-Key": CLIENT_KEY})
        job_id = r.json()["job_id"]
        assert recv(miner)["job_id"] == job_id
        miner.send_json({"type": "job.accept", "job_id": job_id, "id": "a"})
        assert recv(miner) == {"type": "ack", "id": "a"}  # started: it waits for a resume
        r = client.post("/v1/admin/miners/m1/disconnect", headers={"X-Api-Key": ADMIN_KEY})
        assert r.status_code == 200, r.text
        refs: list[str | None] = []
        conn.error = lambda code, message, *, request_id, ref: refs.append(ref)  # type: ignore[method-assign]
        session = conn.make_session(authenticated=True)
        assert client.portal is not None
        assert client.portal.call(conn.handle_now, Status(draining=True), session)
        client.portal.call(core.dispatcher.barrier)
    assert refs == ["status"]


def test_a_heartbeat_with_an_id_before_hello_is_acked(client: TestClient) -> None:
    """Every request with an id gets one reply, a miner's heartbeat sent before its hello too
    (it was read and dropped unanswered); the hello then opens the session as usual."""
    with client.websocket_connect("/v1/miners/ws", headers={"X-Api-Key": MINER_KEY}) as miner:
        miner.send_json({"type": "heartbeat", "id": "hb-1", "metrics": {"util": 0.5}})
        assert recv(miner) == {"type": "ack", "id": "hb-1"}
        miner.send_json({"type": "hello", "protocol": 1, "miner_id": "m1"})
        assert recv(miner)["type"] == "welcome"


def test_a_hello_naming_a_miner_id_with_a_control_character_closes_1007(
    client: TestClient,
) -> None:
    """A socket miner could name itself "a\\nb", whose ledger account the admin route refuses
    (control characters): such a hello breaks the schema like any other field, 1007."""
    with client.websocket_connect("/v1/miners/ws", headers={"X-Api-Key": MINER_KEY}) as miner:
        miner.send_json({"type": "hello", "protocol": 1, "miner_id": "a\nb"})
        with pytest.raises(WebSocketDisconnect) as info:
            miner.receive_json()
    reason = "field 'miner_id' must not contain control characters"
    assert (info.value.code, info.value.reason) == (1007, reason)
    assert client.app.state.core.dispatcher.scheduler.miners == {}


# ---- authentication -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "key", "code", "reason"),
    [
        ("/v1/jobs/ws", "not-a-configured-key", 4401, "unknown credential"),
        ("/v1/jobs/ws", MINER_KEY, 4403, "a client credential is required"),
        ("/v1/jobs/ws", ADMIN_KEY, 4403, "a client credential is required"),
        ("/v1/miners/ws", CLIENT_KEY, 4403, "a miner credential is required"),
        ("/v1/miners/ws", "not-a-configured-key", 4401, "unknown credential"),
        ("/v1/admin/ws", CLIENT_KEY, 4403, "an admin credential is required"),
    ],
)
def test_bad_credentials_close_the_socket(
    client: TestClient, path: str, key: str, code: int, reason: str
) -> None:
    """An unknown key closes 4401; a key of the wrong role closes 4403."""
    with client.websocket_connect(path, headers={"Authorization": f"Bearer {key}"}) as ws:
        with pytest.raises(WebSocketDisconnect) as info:
            ws.receive_json()
    assert (info.value.code, info.value.reason) == (code, reason)


def test_a_submit_with_an_integer_past_64_bits_closes_1007_naming_where(
    client: TestClient,
) -> None:
    """orjson reads 2**64 as a float: the job was stored with 1.8446744073709552e+19, not what
    the client sent. Like any frame that breaks the schema it closes 1007; nothing is stored."""
    with client_socket(client) as ws:
        hello(ws)
        ws.send_json({"type": "job.submit", "id": "s1", "payload": {"n": [2**64]}})
        with pytest.raises(WebSocketDisconnect) as info:
            ws.receive_json()
    reason = "invalid frame: payload.n[0] is an integer beyond 64 bits (send it as a string)"
    assert (info.value.code, info.value.reason) == (1007, reason)
    assert client.app.state.core.dispatcher.scheduler.jobs == {}


def test_auth_frame_authenticates_a_browser(client: TestClient) -> None:
    """Without headers, an auth frame first authenticates the socket."""
    with client.websocket_connect("/v1/jobs/ws") as ws:
        ws.send_json({"type": "auth", "token": CLIENT_KEY})
        assert hello(ws)["client_id"]


@pytest.mark.parametrize(
    ("path", "key", "hello_frame"),
    [
        ("/v1/jobs/ws", CLIENT_KEY, {"type": "hello", "protocol": 1}),
        ("/v1/miners/ws", MINER_KEY, {"type": "hello", "protocol": 1, "miner_id": "m1"}),
        ("/v1/admin/ws", ADMIN_KEY, None),
    ],
)
def test_an_auth_and_a_hello_with_an_id_are_answered_with_that_id(
    client: TestClient, path: str, key: str, hello_frame: dict[str, Any] | None
) -> None:
    """Every request with an id gets exactly one reply carrying it (protocol.md, framing): an
    ``auth`` with an id got none, and a ``hello``'s welcome did not carry it, so a client that
    matches replies by id waited for good. The auth is acked (before the ops socket's
    snapshot); the welcome carries the hello's id."""
    with client.websocket_connect(path) as ws:
        ws.send_json({"type": "auth", "id": "a1", "token": key})
        assert recv(ws) == {"type": "ack", "id": "a1"}
        if hello_frame is None:
            assert recv(ws)["type"] == "snapshot"
            return
        ws.send_json({**hello_frame, "id": "h1"})
        welcome = recv(ws)
        assert (welcome["type"], welcome["id"]) == ("welcome", "h1")
        ws.send_json({**hello_frame, "id": None})  # a second hello: closed 4000 as before
        with pytest.raises(WebSocketDisconnect) as info:
            recv(ws)
        assert info.value.code == 4000


def test_anything_but_auth_first_closes_4401(client: TestClient) -> None:
    """Without headers, any first frame but auth closes the socket with 4401."""
    with client.websocket_connect("/v1/jobs/ws") as ws:
        ws.send_json({"type": "hello", "protocol": 1})
        with pytest.raises(WebSocketDisconnect) as info:
            ws.receive_json()
    assert info.value.code == 4401


def test_a_failed_commit_stops_the_coordinator_instead_of_serving_without_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """When the writer's commit fails, sockets close 1011, readiness turns 503, and the
    server is told to exit (never keeps accepting work with a dead dispatcher). The log says
    why on one line: the store's failure (a PostgreSQL restart, a full disk) came with an
    exception group's traceback, which read as a crash and said nothing more."""
    from storage.errors import StorageError
    from storage.memory import InMemoryJobStore

    class BrokenStore(InMemoryJobStore):
        async def commit(self, batch: Any) -> None:
            raise StorageError("disk full")

    app = create_app(make_settings(tmp_path), store=BrokenStore())
    stopped: list[bool] = []
    app.state.core.on_fatal = lambda: stopped.append(True)
    with TestClient(app) as c, client_socket(c) as ws:
        hello(ws)
        ws.send_json({"type": "job.submit", "id": "s1", "payload": {"type": "x"}})
        with pytest.raises(WebSocketDisconnect) as closed:
            recv(ws)
        assert closed.value.code == 1011
        assert stopped == [True]
        assert c.get("/health/ready").status_code == 503
    failed = [r for r in caplog.records if "dispatcher failed" in r.getMessage()]
    assert [(r.levelname, r.exc_info, r.getMessage()) for r in failed] == [
        ("ERROR", None, "dispatcher failed, shutting the coordinator down: disk full")
    ]


def test_readiness_turns_503_while_a_commit_hangs_and_back_once_it_ends(tmp_path: Path) -> None:
    """A commit that hangs (a PostgreSQL lock another session holds: ``LOCK TABLE``, ``VACUUM
    FULL``) held every change and answer of the coordinator while /health/ready stayed 200, so
    no load balancer turned away from it. Past ``commit_stall_seconds`` it is 503 saying so
    (and ``aitbc_ready`` 0, which ``/metrics`` answers without waiting for the commit); once
    the commit is through, 200 again and the submit answered."""
    import threading

    entered, release = threading.Event(), threading.Event()

    class HeldStore(InMemoryJobStore):
        hold = False

        async def commit(self, batch: Any) -> None:
            if self.hold:
                entered.set()
                await anyio.to_thread.run_sync(release.wait)
            await super().commit(batch)

    store = HeldStore()
    app = create_app(make_settings(tmp_path), store=store)
    core = app.state.core
    with TestClient(app) as c, client_socket(c) as ws:
        hello(ws)
        assert c.get("/health/ready").status_code == 200
        core.commit_stall_seconds = 0.0  # any commit under way counts as hanging
        store.hold = True
        ws.send_json({"type": "job.submit", "id": "s1", "payload": {"type": "x"}})
        try:
            assert entered.wait(10)
            r = c.get("/health/ready")
            scraped = c.get("/metrics", headers={"X-Api-Key": ADMIN_KEY}).text
            core.commit_stall_seconds = 3600.0  # a commit under way is not a hang yet
            not_yet = c.get("/health/ready").status_code
            core.commit_stall_seconds = 0.0
        finally:
            store.hold = False
            release.set()  # a failed check must not leave the shutdown waiting for the commit
        assert (r.status_code, r.json()["status"], r.json()["database"]) == (
            503,
            "not ready",
            "commit stalled",
        )
        assert r.json()["commit_seconds"] > 0
        # /metrics answers during the stall (waiting for the commit would leave the scrape to
        # time out), without the scheduler's uncommitted miner series.
        assert "aitbc_ready 0.0" in scraped
        assert 'aitbc_jobs{state="QUEUED"} 0.0' in scraped
        assert "aitbc_miners_online" not in scraped
        assert not_yet == 200
        assert recv(ws)["id"] == "s1"
        assert c.get("/health/ready").status_code == 200
        scraped = c.get("/metrics", headers={"X-Api-Key": ADMIN_KEY}).text
        assert "aitbc_ready 1.0" in scraped
        assert "aitbc_miners_online 0.0" in scraped


def test_a_fake_clock_drives_expiry_through_the_test_client(tmp_path: Path) -> None:
    """Time advanced from the test thread reaches the app's timer loop (TestClient portal)."""
    from tests.fakes import FakeClock

    clock = FakeClock()
    with TestClient(create_app(make_settings(tmp_path), clock=clock)) as c, client_socket(c) as ws:
        hello(ws)
        job_id = submit(ws, "s1", ttl_seconds=5)["job"]["job_id"]
        assert recv(ws)["event"] == "queued"
        clock.advance(6)
        event = recv(ws)  # pytest-timeout bounds the wait if the timer never fires
        assert (event["job_id"], event["event"], event["state"]) == (job_id, "expired", "EXPIRED")


def test_progress_past_max_progress_bytes_is_an_error_and_the_job_still_completes(
    tmp_path: Path,
) -> None:
    """A miner streaming more progress than MAX_PROGRESS_BYTES allows one job gets `error`
    `invalid` (with its request id) for each event over it, none of them stored or relayed;
    its session stays open and its result is taken."""
    settings = make_settings(tmp_path, max_progress_bytes=1024)
    with (
        TestClient(create_app(settings)) as c,
        client_socket(c) as ws,
        c.websocket_connect("/v1/miners/ws", headers={"X-Api-Key": MINER_KEY}) as miner,
    ):
        hello(ws)
        miner.send_json({"type": "hello", "protocol": 1, "miner_id": "m1"})
        assert recv(miner)["type"] == "welcome"
        job_id = submit(ws, "s1")["job"]["job_id"]
        assert recv(miner)["type"] == "job.assign"
        chunk = "t" * 400
        for n in range(3):
            miner.send_json(
                {"type": "job.progress", "id": f"p{n}", "job_id": job_id, "output": chunk}
            )
            reply = recv(miner)
            assert reply["id"] == f"p{n}"
        assert reply["type"] == "error"
        assert reply["code"] == "invalid"
        assert "MAX_PROGRESS_BYTES" in reply["message"]
        miner.send_json({"type": "job.result", "id": "r", "job_id": job_id, "result": {}})
        assert recv(miner)["type"] == "ack"
        events: list[str] = []
        while not events or events[-1] != "completed":
            event = recv(ws)
            if event["type"] == "job.event":
                events.append(event["event"])
        assert events == ["queued", "assigned", "started", "progress", "progress", "completed"]


# ---- memory -------------------------------------------------------------------------------


def test_socket_jobs_count_their_frames_against_the_retention_bytes(client: TestClient) -> None:
    """A job's payload and result count as the frames that brought them (submit, with an
    idempotency key or not, and result): what TERMINAL_RETENTION_BYTES bounds once it ends."""
    scheduler = client.app.state.core.dispatcher.scheduler  # type: ignore[attr-defined]
    with (
        client_socket(client) as ws,
        client.websocket_connect("/v1/miners/ws", headers={"X-Api-Key": MINER_KEY}) as miner,
    ):
        hello(ws)
        miner.send_json({"type": "hello", "protocol": 1, "miner_id": "m1"})
        assert recv(miner)["type"] == "welcome"
        for key in (None, "k1"):
            fields = {} if key is None else {"idempotency_key": key}
            submit_frame = {"type": "job.submit", "id": "s1", "payload": {"image": "p" * 50_000}}
            ws.send_json({**submit_frame, **fields})
            while (ack := recv(ws))["type"] != "ack":
                pass  # the events of the job before
            job_id = ack["job"]["job_id"]
            assign = recv(miner)
            assert (assign["type"], assign["job_id"]) == ("job.assign", job_id)
            miner.send_json({"type": "job.accept", "job_id": job_id})
            result = {"image": "r" * 80_000}
            miner.send_json({"type": "job.result", "id": "r1", "job_id": job_id, "result": result})
            while recv(miner)["type"] != "ack":
                pass
            assert 130_000 < scheduler._terminal[job_id] < 130_500


# ---- frames pushed to miners ----------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        {"prompt": "x" * 1990},  # the submit frame fits; the assign's fields make it too big
        {"xs": [10**15] * 100},  # sent as 1e15 (4 bytes), written 1000000000000000.0 (18)
    ],
    ids=["near-the-limit", "numbers-written-longer"],
)
def test_a_job_whose_assign_frame_would_pass_the_frame_limit_is_refused(
    tmp_path: Path, payload: dict[str, Any]
) -> None:
    """A miner's library refuses frames over the limit (1 MiB by default, as ours): a job whose
    job.assign frame is larger than WS_MAX_FRAME_BYTES closed every miner it was pushed to
    (1009), went back to the queue uncharged and was pushed again at its reconnect, for its whole
    TTL. Such a submit is refused (error invalid) and nothing is stored."""
    limit = 2048
    frame = {"type": "job.submit", "id": "big", "payload": payload}
    text = json.dumps(frame, separators=(",", ":")).replace(str(10**15), "1e15")
    assert len(text) <= limit
    settings = make_settings(tmp_path, max_frame_bytes=limit)
    with (
        TestClient(create_app(settings)) as c,
        c.websocket_connect("/v1/miners/ws", headers={"X-Api-Key": MINER_KEY}) as miner,
        client_socket(c) as ws,
    ):
        miner.send_json({"type": "hello", "protocol": 1, "miner_id": "m1"})
        assert recv(miner)["type"] == "welcome"
        hello(ws)
        ws.send_text(text)
        err = recv(ws)
        assert (err["type"], err["id"], err["code"]) == ("error", "big", "invalid")
        assert err["message"] == (
            f"job too large: its job.assign frame would be over {limit} bytes (WS_MAX_FRAME_BYTES)"
        )
        # The socket stays open; a job that fits is still taken and pushed within the limit.
        ack = submit(ws, "small")
        assign = miner.receive_text()
        assert json.loads(assign)["job_id"] == ack["job"]["job_id"]
        assert len(assign.encode()) <= limit
        assert len(c.app.state.core.dispatcher.scheduler.jobs) == 1  # type: ignore[attr-defined]


# ---- one validator for both paths ----------------------------------------------------------

BAD_CONSTRAINTS: list[tuple[dict[str, Any], str]] = [
    ({"gpu": 5}, "constraints.gpu must be string"),
    ({"gpu": ["A100"]}, "constraints.gpu must be string"),
    ({"cuda": 12.1}, "constraints.cuda must be string"),
    ({"region": {"eu": True}}, "constraints.region must be string"),
    ({"models": "llama"}, "constraints.models must be array"),
    ({"models": ["llama", 3]}, "constraints.models[1] must be string"),
    ({"min_vram_gb": "16"}, "constraints.min_vram_gb must be number"),
    ({"min_vram_gb": -1}, "constraints.min_vram_gb must be at least 0"),
    ({"max_price": -0.5}, "constraints.max_price must be at least 0"),
    ({"max_price": True}, "constraints.max_price must be number"),
    ({"bond_required": "yes"}, "constraints.bond_required must be boolean"),
]


@pytest.mark.parametrize(("constraints", "message"), BAD_CONSTRAINTS)
def test_a_submit_with_constraints_rest_refuses_is_refused_on_the_socket(
    client: TestClient, constraints: dict[str, Any], message: str
) -> None:
    """The socket took any constraints document REST refuses with 422 (found by the input
    hunt): ``{"models": "llama"}`` matched every miner, ``{"gpu": 5}`` reached REST miners'
    polls as a number. The socket answers ``error invalid`` naming the field as REST's 422
    does; nothing is stored and the socket stays open."""
    body = {"payload": {"prompt": "hi"}, "constraints": constraints}
    r = client.post("/v1/jobs", json=body, headers={"X-Api-Key": CLIENT_KEY})
    assert (r.status_code, r.json()["detail"]) == (422, f"body.{message}")
    with client_socket(client) as ws:
        hello(ws)
        ws.send_json({"type": "job.submit", "id": "s1", **body})
        err = recv(ws)
        assert (err["type"], err["id"], err["code"]) == ("error", "s1", "invalid")
        assert err["message"] == message
        ws.send_json({"type": "job.submit", **body})  # without an id: the error names the type
        err = recv(ws)
        assert (err["type"], err["code"], err["ref"]) == ("error", "invalid", "job.submit")
        assert client.app.state.core.dispatcher.scheduler.jobs == {}
        assert submit(ws, "s2", constraints={"gpu": "A100", "min_vram_gb": 16})["job"]


_json_leaf = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(-2, 2) | st.text(max_size=3)
_json_any = _json_leaf | st.lists(_json_leaf, max_size=3)  # what a constraint's value can be
_constraint_values = st.dictionaries(
    st.sampled_from([*ASSIGNED_CONSTRAINT_KEYS, "other"]),
    _json_any | st.lists(st.text(max_size=3), max_size=3),
    max_size=3,
)


def test_null_constraints_are_none_on_the_socket_and_422_over_rest(client: TestClient) -> None:
    """The one documented difference (docs/protocol.md, job.submit): on the socket a null is
    the absence of an optional field, constraints too; REST's JobCreate refuses it, as upstream
    did (rest-api.md §2.2)."""
    body: dict[str, Any] = {"payload": {}, "constraints": None}
    r = client.post("/v1/jobs", json=body, headers={"X-Api-Key": CLIENT_KEY})
    assert (r.status_code, r.json()["detail"]) == (422, "body.constraints must be object")
    with client_socket(client) as ws:
        hello(ws)
        assert submit(ws, "s1", constraints=None)["job"]["constraints"] == {}


def test_rest_and_the_socket_take_the_same_constraints(tmp_path: Path) -> None:
    """Any constraints document: REST takes it (201) exactly when the socket acks it."""
    with TestClient(create_app(make_settings(tmp_path))) as c, client_socket(c) as ws:
        hello(ws)
        n = 0

        @settings(max_examples=60, deadline=None)
        @given(constraints=_constraint_values)
        def check(constraints: dict[str, Any]) -> None:
            nonlocal n
            n += 1
            body = {"payload": {}, "constraints": constraints}
            r = c.post("/v1/jobs", json=body, headers={"X-Api-Key": CLIENT_KEY})
            assert r.status_code in (201, 422), r.text
            ws.send_json({"type": "job.submit", "id": f"s{n}", **body})
            reply = recv(ws)
            while reply["type"] == "job.event":
                reply = recv(ws)
            assert reply["id"] == f"s{n}"
            assert (reply["type"] == "ack") == (r.status_code == 201), (constraints, reply, r.text)

        check()


def test_a_ttl_below_one_second_is_one_second_on_the_socket_as_over_rest(
    client: TestClient,
) -> None:
    """REST clamps ttl_seconds 0 to 1 (rest-api.md); the socket closed 1007, so one field REST
    takes ended the whole socket (every other job's stream on it)."""
    from protocol.types import parse_instant

    def ttl(view: dict[str, Any]) -> float:
        return round(parse_instant(view["expires_at"]) - parse_instant(view["requested_at"]), 3)

    body = {"payload": {"prompt": "hi"}, "ttl_seconds": 0}
    r = client.post("/v1/jobs", json=body, headers={"X-Api-Key": CLIENT_KEY})
    assert (r.status_code, ttl(r.json())) == (201, 1.0)
    with client_socket(client) as ws:
        hello(ws)
        assert ttl(submit(ws, "s1", ttl_seconds=0)["job"]) == 1.0
        assert recv(ws)["event"] == "queued"
        assert ttl(submit(ws, "s2", ttl_seconds=-30)["job"]) == 1.0


def test_a_job_assigned_more_than_a_million_times_can_still_be_run(client: TestClient) -> None:
    """Every assignment is an attempt number, rejects and accept timeouts too (uncharged): a job
    with a 7-day TTL that a fleet of 1,000 miners keeps refusing (each at most every 5 minutes)
    passes attempt 1,000,000 in about 3.5 days. Frames naming such an attempt broke the codec's
    bound (found by the input hunt): every miner that answered its job.assign with the attempt
    (as protocol.client does) was closed 1007 and, the job requeued at once without a pause,
    the next one too. An attempt is bounded by the job's event count (each assignment writes
    one event), as seq is."""
    with client_socket(client) as ws:
        hello(ws)
        job_id = submit(ws, "s1")["job"]["job_id"]
    client.app.state.core.dispatcher.scheduler.jobs[job_id].attempt = 1_000_000
    with client.websocket_connect("/v1/miners/ws", headers={"X-Api-Key": MINER_KEY}) as miner:
        miner.send_json({"type": "hello", "protocol": 1, "miner_id": "m1"})
        assert recv(miner)["type"] == "welcome"
        assign = recv(miner)
        assert (assign["type"], assign["job_id"], assign["attempt"]) == (
            "job.assign",
            job_id,
            1_000_001,
        )
        miner.send_json({"type": "job.accept", "id": "a", "job_id": job_id, "attempt": 1_000_001})
        assert recv(miner) == {"type": "ack", "id": "a"}
        done = {"type": "job.result", "id": "r", "job_id": job_id, "result": {"ok": True}}
        miner.send_json({**done, "attempt": 1_000_001})
        ack = recv(miner)
        assert (ack["type"], ack["receipt"]["attempt"]) == ("ack", 1_000_001)


def test_a_held_key_lookup_does_not_hold_the_sockets_later_frames(tmp_path: Path) -> None:
    """A submit whose idempotency key is not in memory waits for a store read; the socket's
    later frames were queued behind that read (under load a client's cancels waited 0.5-1.5 s
    behind its submits, and many arrived after the job had completed). Now a cancel sent after
    it is answered while the read is held, and two submits of one new key still give one job,
    answered in the order sent."""
    store = RecordingStore()
    with TestClient(create_app(make_settings(tmp_path), store=store)) as c:
        portal = c.portal
        assert portal is not None

        async def settled() -> None:
            with anyio.fail_after(5):
                await anyio.wait_all_tasks_blocked()

        with client_socket(c) as ws:
            client_id = hello(ws)["client_id"]
            earlier = submit(ws, "s1")["job"]["job_id"]
            assert recv(ws)["event"] == "queued"
            portal.call(store.block_lookups)
            for request_id in ("s2", "s3"):
                ws.send_json(
                    {"type": "job.submit", "id": request_id, "payload": {}, "idempotency_key": "n"}
                )
            ws.send_json({"type": "job.cancel", "id": "c1", "job_id": earlier})
            portal.call(settled)
            assert store.jobs[earlier].state == "CANCELED"  # while the lookup is held
            assert (recv(ws)["id"], recv(ws)["event"]) == ("c1", "canceled")
            portal.call(store.release_lookups)
            first, _queued, again = recv(ws), recv(ws), recv(ws)
    assert (first["id"], first["duplicate"], again["id"], again["duplicate"]) == (
        "s2",
        False,
        "s3",
        True,
    )
    assert again["job"]["job_id"] == first["job"]["job_id"]
    assert store.lookups == [{(client_id, "n")}]  # one read for both


def test_a_failed_key_lookup_is_an_unavailable_error_not_a_closed_socket(
    tmp_path: Path,
) -> None:
    """A store read that fails while a submit's key is looked up (a dropped PostgreSQL
    connection) closed the client's socket 1011 with a traceback; the submit now gets `error`
    `unavailable` (as REST answers 503), nothing is queued, and the socket goes on."""
    from storage.errors import StorageError

    class LostReads(RecordingStore):
        async def find_jobs(self, keys: Any) -> dict[tuple[str, str], JobRecord]:
            raise StorageError("connection was closed in the middle of operation")

    store = LostReads()
    with TestClient(create_app(make_settings(tmp_path), store=store)) as c, client_socket(c) as ws:
        hello(ws)
        ws.send_json({"type": "job.submit", "id": "s1", "payload": {}, "idempotency_key": "k"})
        error = recv(ws)
        assert (error["type"], error["id"], error["code"]) == ("error", "s1", "unavailable")
        assert error["message"] == "the database could not be read; retry"
        job = submit(ws, "s2")["job"]
    assert list(store.jobs) == [job["job_id"]]


def test_a_failed_read_on_a_socket_is_unavailable_not_an_internal_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A subscribe, a cancel or a miner's late result that reads the store while its read
    fails (a dropped PostgreSQL connection, a server restart) closed the socket 1011 "internal
    error" with a traceback, as a bug would; each now gets `error` `unavailable` (REST's 503),
    the socket goes on, and the log has one warning line. A replay that fails once the
    subscribe was answered cannot be told apart from a gap: that socket is closed 1011 saying
    so (a reconnect and a subscribe with `after` catches up)."""
    from storage.errors import StorageError

    class LostReads(RecordingStore):
        lost = False
        lost_events = False

        async def get_job(self, job_id: str) -> JobRecord | None:
            if self.lost:
                raise StorageError("connection was closed in the middle of operation")
            return await super().get_job(job_id)

        async def events_after(self, job_id: str, after: int, limit: int = 1000) -> Any:
            if self.lost_events:
                raise StorageError("connection was closed in the middle of operation")
            return await super().events_after(job_id, after, limit)

    store = LostReads()
    unknown = "0" * 32
    with TestClient(create_app(make_settings(tmp_path), store=store)) as c:
        with client_socket(c) as ws:
            hello(ws)
            store.lost = True
            ws.send_json({"type": "subscribe", "id": "sub1", "job_ids": [unknown]})
            ws.send_json({"type": "job.cancel", "id": "c1", "job_id": unknown})
            for request_id in ("sub1", "c1"):
                error = recv(ws)
                assert (error["type"], error["id"], error["code"]) == (
                    "error",
                    request_id,
                    "unavailable",
                )
                assert error["message"] == "the database could not be read; retry"
            store.lost = False
            job_id = submit(ws, "s1")["job"]["job_id"]  # the socket goes on
            assert recv(ws)["event"] == "queued"
        with c.websocket_connect("/v1/miners/ws", headers={"X-Api-Key": MINER_KEY}) as miner:
            miner.send_json({"type": "hello", "protocol": 1, "miner_id": "gpu-1"})
            assert recv(miner)["type"] == "welcome"
            assert recv(miner)["type"] == "job.assign"
            store.lost = True
            miner.send_json(
                {"type": "job.result", "id": "r1", "job_id": unknown, "result": {}, "attempt": 1}
            )
            error = recv(miner)
            assert (error["type"], error["id"], error["code"]) == ("error", "r1", "unavailable")
            store.lost = False
            miner.send_json({"type": "heartbeat", "id": "hb"})
            assert recv(miner) == {"type": "ack", "id": "hb"}
        with client_socket(c) as ws:
            hello(ws)
            store.lost_events = True
            ws.send_json({"type": "subscribe", "id": "sub2", "job_ids": [job_id]})
            assert recv(ws) == {"type": "ack", "id": "sub2", "missing": []}
            with pytest.raises(WebSocketDisconnect) as closed:
                recv(ws)
        assert (closed.value.code, closed.value.reason) == (
            1011,
            "the database could not be read; retry",
        )
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    warned = [r.getMessage() for r in caplog.records if "could not be read" in r.getMessage()]
    assert len(warned) == 4


def test_a_client_pipelining_submits_is_read_no_further_past_its_unanswered_limit(
    tmp_path: Path,
) -> None:
    """A client sending submits without end (and not reading the acks) had every one of them
    taken into the open batch while a commit was in flight: 13,000 writes in one batch, the
    other clients' acks 0.6 s late, memory without bound. Past ``MAX_PENDING_SUBMITS``
    unanswered submits its socket is now read no further until answers go out; every submit is
    still taken, in the order sent."""
    store = RecordingStore()
    settings = make_settings(tmp_path, max_pending_submits=3)
    with TestClient(create_app(settings, store=store)) as c:
        portal = c.portal
        assert portal is not None
        scheduler = c.app.state.core.dispatcher.scheduler  # type: ignore[attr-defined]

        async def settled() -> None:
            with anyio.fail_after(5):
                await anyio.wait_all_tasks_blocked()

        with client_socket(c) as ws:
            hello(ws)
            portal.call(store.block_commits)
            for i in range(10):
                ws.send_json({"type": "job.submit", "id": f"s{i}", "payload": {}})
            ws.send_json({"type": "job.cancel", "id": "c", "job_id": "none"})
            portal.call(settled)
            taken = len(scheduler.jobs)  # the rest is not read yet
            portal.call(store.release_commits)
            replies = [recv(ws) for _ in range(21)]
    assert taken == 3
    acks = [r["id"] for r in replies if r["type"] in ("ack", "error")]
    assert acks == [*(f"s{i}" for i in range(10)), "c"]
    assert len(store.jobs) == 10


def test_a_socket_adds_a_bounded_share_of_frames_to_the_batch_being_filled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A miner streaming progress (or any peer sending frames the writer must act on:
    heartbeats with an id, cancels) had every frame taken into the open batch while a commit
    was in flight: without end, and each one a write or an answer held in memory, the next
    commit as large. A socket now adds at most ``BATCH_SHARE`` frames to the batches not yet
    performed; past that it is read no further until they are. Every frame is still taken,
    in order."""
    from web import connection

    monkeypatch.setattr(connection, "BATCH_SHARE", 3)
    store = RecordingStore()
    with (
        TestClient(create_app(make_settings(tmp_path), store=store)) as c,
        client_socket(c) as ws,
        c.websocket_connect("/v1/miners/ws", headers={"X-Api-Key": MINER_KEY}) as miner,
    ):
        portal = c.portal
        assert portal is not None
        dispatcher = c.app.state.core.dispatcher  # type: ignore[attr-defined]

        async def settled() -> None:
            with anyio.fail_after(5):
                await anyio.wait_all_tasks_blocked()

        hello(ws)
        miner.send_json({"type": "hello", "protocol": 1, "miner_id": "m1"})
        assert recv(miner)["type"] == "welcome"
        job_id = submit(ws, "s1")["job"]["job_id"]
        assert recv(miner)["type"] == "job.assign"
        portal.call(settled)
        portal.call(store.block_commits)
        for n in range(10):
            miner.send_json({"type": "job.progress", "job_id": job_id, "output": f"{n}"})
        miner.send_json({"type": "heartbeat", "id": "h"})
        portal.call(settled)
        held = store.waiting, len(dispatcher._writes.events)
        portal.call(store.release_commits)
        assert recv(miner) == {"type": "ack", "id": "h"}
    assert held == (1, 2)  # one in the commit held, two waiting for it: the rest unread
    outputs = [e.data.get("output") for e in store.events[job_id] if e.event == "progress"]
    assert outputs == [f"{n}" for n in range(10)]


def test_a_miner_key_binds_at_most_max_miner_ids_per_key_ids(tmp_path: Path) -> None:
    """Every miner id a key names is bound to it for good (in memory and in the miners table):
    a miner key naming a new id at each hello, or each REST registration, grew both without
    bound. Past ``MAX_MINER_IDS_PER_KEY`` a new id is refused (socket 4403, REST 403) naming
    the setting; the ids it has keep working, and other keys are not affected."""
    settings = make_settings(tmp_path, max_miner_ids_per_key=2)
    miner_headers = {"X-Api-Key": MINER_KEY}

    def hello_as(c: TestClient, miner_id: str, key: str = MINER_KEY) -> dict[str, Any]:
        with c.websocket_connect("/v1/miners/ws", headers={"X-Api-Key": key}) as miner:
            miner.send_json({"type": "hello", "protocol": 1, "miner_id": miner_id})
            try:
                return recv(miner)
            except WebSocketDisconnect as exc:
                return {"closed": exc.code, "reason": exc.reason}

    with TestClient(create_app(settings)) as c:
        assert hello_as(c, "m1")["type"] == "welcome"
        r = c.post(
            "/v1/miners/register",
            json={"capabilities": {}},
            headers={**miner_headers, "X-Miner-ID": "m2"},
        )
        assert r.status_code == 200
        refused = hello_as(c, "m3")
        r = c.post(
            "/v1/miners/register",
            json={"capabilities": {}},
            headers={**miner_headers, "X-Miner-ID": "m4"},
        )
        assert (r.status_code, "MAX_MINER_IDS_PER_KEY" in r.json()["detail"]) == (403, True)
        assert hello_as(c, "m1")["type"] == "welcome"  # an id it has
        assert hello_as(c, "m3", MINER_KEY_2)["type"] == "welcome"  # another key
    assert refused["closed"] == 4403
    assert "MAX_MINER_IDS_PER_KEY" in refused["reason"]
    # The count is kept across a restart: the bindings are read back from the store.
    with TestClient(create_app(settings)) as c:
        assert hello_as(c, "m5")["closed"] == 4403
        assert hello_as(c, "m2")["type"] == "welcome"


def test_a_clients_live_jobs_are_bounded_in_count_and_bytes(tmp_path: Path) -> None:
    """A client's queued and running jobs are held in memory, payloads included, until they
    end (for up to their TTL, 7 days at most): a client submitting without end grew memory
    without bound. Past ``MAX_ACTIVE_JOBS_PER_CLIENT`` live jobs, or
    ``MAX_ACTIVE_BYTES_PER_CLIENT`` of their submissions, a submit is refused (socket
    `conflict`, REST 429) naming the setting; once one ends there is room again, and another
    client is not affected."""
    settings = make_settings(
        tmp_path, max_active_jobs_per_client=2, max_active_bytes_per_client=4096
    )
    with TestClient(create_app(settings)) as c, client_socket(c) as ws:
        hello(ws)
        first = submit(ws, "s1")["job"]["job_id"]
        assert recv(ws)["event"] == "queued"
        r = c.post("/v1/jobs", json={"payload": {}}, headers={"X-Api-Key": CLIENT_KEY})
        assert r.status_code == 201
        ws.send_json({"type": "job.submit", "id": "s3", "payload": {}})
        refused = recv(ws)
        assert (refused["type"], refused["id"], refused["code"]) == ("error", "s3", "conflict")
        assert "MAX_ACTIVE_JOBS_PER_CLIENT" in refused["message"]
        r = c.post("/v1/jobs", json={"payload": {}}, headers={"X-Api-Key": CLIENT_KEY})
        assert r.status_code == 429
        assert "MAX_ACTIVE_JOBS_PER_CLIENT" in r.json()["detail"]
        r = c.post("/v1/jobs", json={"payload": {}}, headers={"X-Api-Key": CLIENT_KEY_2})
        assert r.status_code == 201  # another client
        ws.send_json({"type": "job.cancel", "id": "c", "job_id": first})
        assert recv(ws)["id"] == "c"
        assert recv(ws)["event"] == "canceled"
        submit(ws, "s4")  # room again
        assert recv(ws)["event"] == "queued"
    with TestClient(create_app(settings)) as c:  # counted again after a restart
        r = c.post("/v1/jobs", json={"payload": {}}, headers={"X-Api-Key": CLIENT_KEY})
        assert r.status_code == 429
        big = {"payload": {"blob": "x" * 4096}}
        r = c.post("/v1/jobs", json=big, headers={"X-Api-Key": CLIENT_KEY_2})
        assert r.status_code == 429
        assert "MAX_ACTIVE_BYTES_PER_CLIENT" in r.json()["detail"]


def test_job_retention_days_reaches_the_dispatcher(tmp_path: Path) -> None:
    """JOB_RETENTION_DAYS turns the retention walk on, in seconds; 0 leaves it off."""
    assert create_app(make_settings(tmp_path)).state.core.dispatcher.retention is None
    app = create_app(make_settings(tmp_path, job_retention_days=2.5))
    assert app.state.core.dispatcher.retention == 2.5 * 86400
