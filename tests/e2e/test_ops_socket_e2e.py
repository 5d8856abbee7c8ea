"""``/v1/admin/ws`` on a real socket: credentials, snapshot, recent events, live frames."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from protocol.messages import Heartbeat
from tests.conftest import ADMIN_KEY, CLIENT_KEY, MINER_KEY, make_settings
from tests.e2e.conftest import start_server
from tests.e2e.manual_miner import ManualMiner, client_session, close_code
from tests.e2e.test_ops_page import submit
from tests.web.wallet_helpers import KEY_A, KEY_B, address_of, bearer, login
from web import ops_feed

if TYPE_CHECKING:
    from pathlib import Path

    from tests.e2e.conftest import RunningServer

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


async def frame(ws: ClientConnection) -> dict[str, Any]:
    with anyio.fail_after(5):
        data: dict[str, Any] = json.loads(await ws.recv())
    return data


async def until(ws: ClientConnection, pred: Any) -> dict[str, Any]:
    while True:
        f = await frame(ws)
        if pred(f):
            return f


async def socket_counts(server: RunningServer) -> dict[str, int]:
    """The open sockets by role, from the snapshot of one more admin socket (counted too)."""
    async with connect(server.url("/v1/admin/ws")) as ws:
        await ws.send(json.dumps({"type": "auth", "token": ADMIN_KEY}))
        snap = await frame(ws)
    counts: dict[str, int] = snap["counters"]["sockets"]
    return counts


@pytest.mark.parametrize(("key", "code"), [(CLIENT_KEY, 4403), ("unknown-key-123", 4401)])
async def test_only_admin_keys(server: RunningServer, key: str, code: int) -> None:
    """A client key is closed 4403 and an unknown key 4401, by header or by auth frame."""
    async with connect(server.url("/v1/admin/ws"), additional_headers={"X-Api-Key": key}) as ws:
        assert await close_code(ws) == code
    async with connect(server.url("/v1/admin/ws")) as ws:
        await ws.send(json.dumps({"type": "auth", "token": key}))
        assert await close_code(ws) == code


@pytest.mark.parametrize("by_header", [False, True], ids=["auth frame", "header"])
async def test_snapshot_recent_events_then_live(server: RunningServer, by_header: bool) -> None:
    """Snapshot first, then the recent job events, then live events and a delta; the same
    whether the admin key comes in the handshake's header or in an ``auth`` frame."""
    headers = {"X-Api-Key": ADMIN_KEY} if by_header else {}
    async with client_session(server, CLIENT_KEY) as client:
        old = await submit(client, "before")
        async with connect(server.url("/v1/admin/ws"), additional_headers=headers) as ws:
            if not by_header:
                await ws.send(json.dumps({"type": "auth", "token": ADMIN_KEY}))
            snap = await frame(ws)
            assert snap["type"] == "snapshot"
            assert snap["queue"]["queued"] == 1
            assert snap["miners"] == []
            replay = await frame(ws)
            assert (replay["type"], replay["job_id"], replay["event"]) == (
                "job.event",
                old,
                "queued",
            )
            await ws.send(json.dumps({"type": "job.submit", "id": "x", "payload": {}}))
            err = await until(ws, lambda f: f["type"] == "error")
            assert (err["code"], err["id"]) == ("invalid", "x")
            await ws.send(json.dumps({"type": "subscribe", "job_ids": "all"}))
            err = await until(ws, lambda f: f["type"] == "error")
            assert (err["code"], err.get("id"), err["ref"]) == ("invalid", None, "subscribe")
            async with ManualMiner(server, MINER_KEY, "gpu-ops") as miner:
                await miner.connect()
                assigned = await until(ws, lambda f: f.get("event") == "assigned")
                assert (assigned["job_id"], assigned["miner_id"]) == (old, "gpu-ops")
                delta = await until(ws, lambda f: f["type"] == "ops.delta" and "miners" in f)
                assert delta["miners"][0]["miner_id"] == "gpu-ops"
                assert delta["miners"][0]["state"] == "busy"
                assert await socket_counts(server) == {"miner": 1, "client": 1, "admin": 2}
            # The miner left before accepting: its job is requeued and the miner dropped.
            await until(ws, lambda f: "gpu-ops" in f.get("removed", []))
            assert await socket_counts(server) == {"miner": 0, "client": 1, "admin": 2}


async def test_an_admin_wallets_session_opens_the_ops_socket(tmp_path: Path) -> None:
    """ADMIN_WALLET_ADDRESSES: a listed wallet's session gets the snapshot, by header or by
    ``auth`` frame; another wallet's session is closed 4403."""
    settings = make_settings(tmp_path, admin_wallet_addresses=frozenset({address_of(KEY_A)}))
    async with anyio.create_task_group() as tg:
        server, uv = await start_server(settings, tg)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
                admin = (await login(http, KEY_A))["session_token"]
                plain = (await login(http, KEY_B))["session_token"]
            async with connect(server.url("/v1/admin/ws"), additional_headers=bearer(admin)) as ws:
                assert (await frame(ws))["type"] == "snapshot"
            async with connect(server.url("/v1/admin/ws")) as ws:
                await ws.send(json.dumps({"type": "auth", "token": admin}))
                assert (await frame(ws))["type"] == "snapshot"
            async with connect(server.url("/v1/admin/ws")) as ws:
                await ws.send(json.dumps({"type": "auth", "token": plain}))
                assert await close_code(ws) == 4403
        finally:
            uv.should_exit = True


async def test_a_socket_miners_heartbeats_move_its_last_seen(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A socket miner's heartbeat (and status) frames move its row's last_seen once what was
    shown is SEEN_STEP old (0 here); it moved only with job events."""
    monkeypatch.setattr(ops_feed, "SEEN_STEP", 0.0)

    def last_seen() -> str:
        [row] = server.core.ops.snapshot()["miners"]
        return str(row["last_seen"])

    async with ManualMiner(server, MINER_KEY, "gpu-heartbeats") as miner:
        await miner.connect()
        before = last_seen()
        with anyio.fail_after(5):
            while last_seen() == before:
                await miner.send(Heartbeat(metrics=None))
                await anyio.sleep(0.05)
