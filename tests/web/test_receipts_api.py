"""Receipts end to end: REST and socket miners' receipts checked by the §4.3 algorithm written
here from the spec (cryptography + json only), the published keys, /v1/receipts/verify, the
miner co-signature, and the chain across a restart."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from starlette.testclient import TestClient

from tests.conftest import CLIENT_KEY, MINER_KEY, SIGNING_SEED, make_settings
from tests.web.rest_harness import Api, running_api
from web.app import create_app

if TYPE_CHECKING:
    from pathlib import Path

    from starlette.testclient import WebSocketTestSession

OLD_SEED = "33" * 32
OLD_PUBLIC = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(OLD_SEED)).public_key()
PREVIOUS = f"{OLD_PUBLIC.public_bytes_raw().hex()}@1600000000/1700000000"
CURRENT_PUBLIC = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(SIGNING_SEED)).public_key()
MINER_SEED = "44" * 32


# ---- rest-api.md §4.3, written from the spec text alone ------------------------------------


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value if v is not None]
    return value


def _canonical(value: Any) -> bytes:
    return json.dumps(_drop_nulls(value), separators=(",", ":"), sort_keys=True).encode("utf-8")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def spec_verify(receipt: dict[str, Any], pinned: Ed25519PublicKey) -> bool:
    """§4.3 verification, plus pinning: the signing key must be the coordinator's."""
    message = _canonical(
        {k: v for k, v in receipt.items() if k not in ("signature", "attestations")}
    )
    sig = receipt["signature"]
    if sig["alg"] != "Ed25519" or _unb64(sig["key_id"]) != pinned.public_bytes_raw():
        return False
    try:
        Ed25519PublicKey.from_public_bytes(_unb64(sig["key_id"])).verify(
            _unb64(sig["sig"]), message
        )
    except InvalidSignature:
        return False
    return True


def spec_miner_attestation_ok(receipt: dict[str, Any], miner: Ed25519PublicKey) -> bool:
    """docs/receipts.md: the miner signs canonical {job_id, result_hash, type: aitbc.result}."""
    result_hash = hashlib.sha256(_canonical(receipt["metadata"]["result"])).hexdigest()
    if result_hash != receipt["result_hash"]:
        return False
    att = receipt["miner_attestation"]
    if _unb64(att["key_id"]) != miner.public_bytes_raw():
        return False
    message = _canonical(
        {"job_id": receipt["job_id"], "result_hash": result_hash, "type": "aitbc.result"}
    )
    try:
        miner.verify(_unb64(att["sig"]), message)
    except InvalidSignature:
        return False
    return True


# ---- REST miner -----------------------------------------------------------------------------


async def rest_receipt(api: Api, miner_id: str = "m1") -> dict[str, Any]:
    assert (await api.register(miner_id, capabilities={"price": 0.1})).status_code == 200
    job = await api.submit(payload={"prompt": "secret", "n": 1.5}, constraints={"max_price": 0.25})
    assert (await api.poll(miner_id)).json()["job_id"] == job["job_id"]
    r = await api.result(job["job_id"], miner_id, result={"text": "ünïcode"}, metrics={"units": 9})
    assert r.status_code == 200, r.text
    receipt: dict[str, Any] = r.json()["receipt"]
    return receipt


@pytest.mark.anyio
async def test_a_rest_miners_receipt_passes_the_spec_algorithm(tmp_path: Path) -> None:
    async with running_api(tmp_path) as api:
        receipt = await rest_receipt(api)
    assert spec_verify(receipt, CURRENT_PUBLIC)
    assert not spec_verify({**receipt, "price": 0.0}, CURRENT_PUBLIC)
    assert not spec_verify(receipt, OLD_PUBLIC)
    assert receipt["unit_price"] == 0.1  # the miner's advertised price (under max_price)
    assert receipt["price"] == round(receipt["units"] * 0.1, 6)
    assert receipt["metadata"]["metrics"] == {"units": 9}
    assert (
        receipt["payload_hash"]
        == hashlib.sha256(_canonical(receipt["metadata"]["job_payload"])).hexdigest()
    )
    assert (receipt["chain_seq"], receipt["prev_hash"]) == (1, "0" * 64)


@pytest.mark.anyio
async def test_signing_keys_are_published_with_validity(tmp_path: Path) -> None:
    from web.settings import Settings

    previous = Settings.from_env({"RECEIPT_PREVIOUS_KEYS": PREVIOUS}).receipt_previous_keys
    async with running_api(tmp_path, receipt_previous_keys=previous) as api:
        doc = (await api.http.get("/v1/receipts/signing-keys")).json()
        assert (await api.http.get("/v1/receipts/signing-key")).json() == doc
    current_id = _b64(CURRENT_PUBLIC.public_bytes_raw())
    assert doc == {
        "alg": "Ed25519",
        "current": current_id,
        "keys": [
            {
                "key_id": current_id,
                "alg": "Ed25519",
                "public_key_hex": CURRENT_PUBLIC.public_bytes_raw().hex(),
                "status": "current",
                "valid_from": 1700000000,
                "valid_until": None,
            },
            {
                "key_id": _b64(OLD_PUBLIC.public_bytes_raw()),
                "alg": "Ed25519",
                "public_key_hex": OLD_PUBLIC.public_bytes_raw().hex(),
                "status": "previous",
                "valid_from": 1600000000,
                "valid_until": 1700000000,
            },
        ],
    }


def _sign_as(seed: str, body: dict[str, Any]) -> dict[str, Any]:
    """A receipt signed with another key, from the spec (what the old key once produced)."""
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed))
    sig = key.sign(_canonical(body))
    kid = _b64(key.public_key().public_bytes_raw())
    return {**body, "signature": {"alg": "Ed25519", "key_id": kid, "sig": _b64(sig)}}


@pytest.mark.anyio
async def test_verify_endpoint(tmp_path: Path) -> None:
    """Valid -> valid with its hash; tampered -> the exact reasons; old key only in its window."""
    from web.settings import Settings

    previous = Settings.from_env({"RECEIPT_PREVIOUS_KEYS": PREVIOUS}).receipt_previous_keys
    async with running_api(tmp_path, receipt_previous_keys=previous) as api:
        receipt = await rest_receipt(api)

        async def verify(body: Any) -> dict[str, Any]:
            r = await api.http.post("/v1/receipts/verify", json=body)
            assert r.status_code == 200, r.text
            out: dict[str, Any] = r.json()
            return out

        ok = await verify(receipt)
        assert ok["valid"] is True
        assert ok["reasons"] == []
        assert ok["receipt_id"] == receipt["receipt_id"]
        assert ok["key_id"] == receipt["signature"]["key_id"]
        assert len(ok["receipt_hash"]) == 64
        assert (await verify({"result": {}, "receipt": receipt}))["valid"] is True

        bad = await verify({**receipt, "units": 1000})
        assert (bad["valid"], bad["reasons"]) == (False, ["signature does not verify"])
        lying = {**receipt, "metadata": {**receipt["metadata"], "result": {"text": "x"}}}
        assert (await verify(lying))["reasons"] == [
            "signature does not verify",
            "result_hash does not match metadata.result",
        ]

        old = {k: v for k, v in receipt.items() if k != "signature"}
        in_window = _sign_as(OLD_SEED, {**old, "completed_at": 1650000000})
        assert (await verify(in_window))["valid"] is True
        late = _sign_as(OLD_SEED, {**old, "completed_at": 1750000000})
        assert (await verify(late))["reasons"] == [
            "completed_at is outside the signing key's validity period"
        ]
        stranger = _sign_as("55" * 32, old)
        assert (await verify(stranger))["reasons"] == [
            "signature.key_id is not a pinned coordinator key"
        ]

        null = await api.http.post("/v1/receipts/verify", content=b"null")
        assert null.json()["reasons"] == ["receipt is not a JSON object"]
        for garbage in ([], "x", 5, {}, {"signature": 7}, {"receipt": 1}):
            out = await verify(garbage)
            assert out["valid"] is False
            assert out["reasons"]
        for raw in (b"", b"{", b"\xff\xfe", b"[" * 5000):
            r = await api.http.post("/v1/receipts/verify", content=raw)
            assert r.status_code == 422
            assert "detail" in r.json()


# ---- socket miner ---------------------------------------------------------------------------


def _recv_until(ws: WebSocketTestSession, kind: str) -> dict[str, Any]:
    for _ in range(20):
        msg: dict[str, Any] = ws.receive_json()
        if msg["type"] == kind:
            return msg
    raise AssertionError(f"no {kind}")


def _socket_job(c: TestClient, miner: WebSocketTestSession) -> str:
    r = c.post("/v1/jobs", json={"payload": {"prompt": "p"}}, headers={"X-Api-Key": CLIENT_KEY})
    assert r.status_code == 201, r.text
    assign = _recv_until(miner, "job.assign")
    miner.send_json({"type": "job.accept", "job_id": assign["job_id"]})
    return str(assign["job_id"])


def test_a_socket_miners_co_signed_receipt_passes_the_spec_algorithm(tmp_path: Path) -> None:
    """The miner registers its key in hello and signs its result; a bad signature is refused
    (the job stays running), a signature without a registered key too; the receipt carries
    the attestation and passes §4.3 with the pinned coordinator key."""
    miner_key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(MINER_SEED))
    kid = _b64(miner_key.public_key().public_bytes_raw())

    def result_sig(job_id: str, result: dict[str, Any]) -> str:
        result_hash = hashlib.sha256(_canonical(result)).hexdigest()
        message = {"job_id": job_id, "result_hash": result_hash, "type": "aitbc.result"}
        return _b64(miner_key.sign(_canonical(message)))

    with TestClient(create_app(make_settings(tmp_path))) as c:
        with c.websocket_connect("/v1/miners/ws", headers={"X-Api-Key": MINER_KEY}) as miner:
            miner.send_json({"type": "hello", "protocol": 1, "miner_id": "s1", "result_key": kid})
            assert _recv_until(miner, "welcome")["miner_id"] == "s1"
            job_id = _socket_job(c, miner)
            result = {"text": "done", "score": 0.5}
            forged = result_sig(job_id, {"text": "other"})
            miner.send_json(
                {
                    "type": "job.result",
                    "id": "r0",
                    "job_id": job_id,
                    "result": result,
                    "result_sig": forged,
                }
            )
            error = _recv_until(miner, "error")
            assert (error["id"], error["code"]) == ("r0", "invalid")
            job = c.get(f"/v1/jobs/{job_id}", headers={"X-Api-Key": CLIENT_KEY}).json()
            assert job["state"] == "RUNNING"
            miner.send_json(
                {
                    "type": "job.result",
                    "id": "r1",
                    "job_id": job_id,
                    "result": result,
                    "result_sig": result_sig(job_id, result),
                }
            )
            ack = _recv_until(miner, "ack")
        receipt = ack["receipt"]
        stored = c.get(f"/v1/jobs/{job_id}/receipt", headers={"X-Api-Key": CLIENT_KEY}).json()
        assert stored == receipt

        with c.websocket_connect("/v1/miners/ws", headers={"X-Api-Key": MINER_KEY}) as plain:
            plain.send_json({"type": "hello", "protocol": 1, "miner_id": "s2"})
            _recv_until(plain, "welcome")
            other = _socket_job(c, plain)
            plain.send_json(
                {
                    "type": "job.result",
                    "id": "r2",
                    "job_id": other,
                    "result": {},
                    "result_sig": result_sig(other, {}),
                }
            )
            assert "result_key" in _recv_until(plain, "error")["message"]
            plain.send_json({"type": "job.result", "id": "r3", "job_id": other, "result": {}})
            unsigned = _recv_until(plain, "ack")["receipt"]

    assert spec_verify(receipt, CURRENT_PUBLIC)
    assert receipt["provider"] == "s1"
    assert spec_miner_attestation_ok(receipt, miner_key.public_key())
    assert receipt["miner_attestation"]["key_id"] == kid
    assert spec_verify(unsigned, CURRENT_PUBLIC)
    assert "miner_attestation" not in unsigned
    assert unsigned["prev_hash"] == hashlib.sha256(_canonical(receipt)).hexdigest()


# ---- the chain across a restart -------------------------------------------------------------


@pytest.mark.anyio
async def test_the_chain_continues_after_a_restart(tmp_path: Path) -> None:
    """The head is loaded from the store: receipt 3 (after a restart) names receipt 2."""
    async with running_api(tmp_path) as api:
        first = await rest_receipt(api)
        job = await api.submit()
        assert (await api.poll("m1")).json()["job_id"] == job["job_id"]
        second = (await api.result(job["job_id"])).json()["receipt"]
    async with running_api(tmp_path) as api:
        third = await rest_receipt(api)
    assert [r["chain_seq"] for r in (first, second, third)] == [1, 2, 3]
    assert second["prev_hash"] == hashlib.sha256(_canonical(first)).hexdigest()
    assert third["prev_hash"] == hashlib.sha256(_canonical(second)).hexdigest()


def test_a_start_whose_keys_leave_out_the_chains_key_is_refused(tmp_path: Path) -> None:
    """A new RECEIPT_SIGNING_KEY_HEX without the old key in RECEIPT_PREVIOUS_KEYS (or a
    database moved without its generated .signing-key, which a new one then replaced)
    started, and every receipt already in the store stopped verifying: /v1/receipts/verify,
    receipts audit ('chain broken at chain_seq 1') and every client pinning the published
    keys. The start is refused, naming the key and how to list it (one line, exit 3); with it
    listed, the coordinator starts and the chain goes on."""
    import os
    import re

    from protocol.receipt_verify import TrustedKey
    from tests.serve_once import serve_once

    async def sign_one() -> dict[str, Any]:
        async with running_api(tmp_path) as api:
            return await rest_receipt(api)

    receipt = anyio.run(sign_one)
    old = receipt["signature"]["key_id"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECEIPT_", "DATABASE_"))}
    env["RECEIPT_SIGNING_KEY_HEX"] = "22" * 32
    done = serve_once(tmp_path / "coordinator.db", env, timeout=30)
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr
    [line] = [x for x in done.stderr.splitlines() if "cannot start" in x]
    assert re.search(
        f"cannot start: RECEIPT_PREVIOUS_KEYS: the newest receipt in the database "
        f"\\(chain_seq 1\\) was signed by {old}, which is neither the current signing key "
        f"nor a previous one: list it as {old}@/{receipt['completed_at']}",
        line,
    ), line

    async def go_on() -> dict[str, Any]:
        previous = (TrustedKey(key_id=old, valid_until=receipt["completed_at"]),)
        async with running_api(
            tmp_path, receipt_signing_key_hex="22" * 32, receipt_previous_keys=previous
        ) as api:
            return await rest_receipt(api, "m2")

    assert anyio.run(go_on)["chain_seq"] == 2


@pytest.mark.anyio
async def test_a_previous_key_listed_until_before_its_last_receipt_is_refused(
    tmp_path: Path,
) -> None:
    """The old key listed with an UNTIL before the newest receipt it signed (the time the
    rotation was planned, while the old coordinator went on signing): those receipts fell
    outside its window and failed verification. The start is refused, naming the time."""
    from protocol.receipt_verify import TrustedKey
    from web.settings import SettingsError

    async with running_api(tmp_path) as api:
        receipt = await rest_receipt(api)
    old, at = receipt["signature"]["key_id"], receipt["completed_at"]
    previous = (TrustedKey(key_id=old, valid_until=at - 10),)
    with pytest.raises(SettingsError, match=f"list it as {old}@/{at} "):
        async with running_api(
            tmp_path, receipt_signing_key_hex="22" * 32, receipt_previous_keys=previous
        ):
            pass


def test_the_python_in_docs_receipts_md_verifies_a_receipt(tmp_path: Path) -> None:
    """The few lines of Python in docs/receipts.md accept a real receipt and reject a change."""
    import re
    from pathlib import Path as _Path

    text = (_Path(__file__).parents[2] / "docs" / "receipts.md").read_text()
    [code] = re.findall(r"```python\n(.*?)```", text, re.S)
    namespace: dict[str, Any] = {}
    exec(code, namespace)

    async def one() -> dict[str, Any]:
        async with running_api(tmp_path) as api:
            return await rest_receipt(api)

    receipt = anyio.run(one)
    public_hex = CURRENT_PUBLIC.public_bytes_raw().hex()
    namespace["verify"](receipt, public_hex)
    with pytest.raises(InvalidSignature):
        namespace["verify"]({**receipt, "units": receipt["units"] + 1}, public_hex)
    with pytest.raises(ValueError, match="pinned"):
        namespace["verify"](receipt, OLD_PUBLIC.public_bytes_raw().hex())


@pytest.mark.anyio
async def test_the_receipt_routes_are_in_the_openapi_document(tmp_path: Path) -> None:
    async with running_api(tmp_path) as api:
        doc = (await api.http.get("/openapi.json")).json()
    keys = doc["paths"]["/v1/receipts/signing-keys"]["get"]
    verify = doc["paths"]["/v1/receipts/verify"]["post"]
    assert "/v1/receipts/signing-key" in doc["paths"]
    assert keys["security"] == verify["security"] == []
    assert keys["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SigningKeys"
    }
    assert verify["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/AnyJSON"
    }
    receipt = doc["components"]["schemas"]["Receipt"]["properties"]
    assert {"chain_seq", "prev_hash", "payload_hash", "result_hash", "miner_attestation"} <= set(
        receipt
    )
