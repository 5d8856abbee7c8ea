"""Ring 1: the receipt signer (dispatcher/receipts.py): server billing, hash chain, tampering."""

from __future__ import annotations

import copy
from typing import Any

import orjson
from hypothesis import assume, given, settings, strategies as st

from dispatcher.jobs import Job
from dispatcher.policy import Capabilities
from dispatcher.receipts import DEFAULT_UNIT_PRICE, ReceiptSigner
from protocol.amounts import price_units
from protocol.receipt_verify import ChainAudit, TrustedKey, check_receipt
from protocol.receipts import (
    CHAIN_GENESIS,
    canonical_json,
    content_hash,
    key_id_for,
    load_signing_key,
    receipt_hash,
    sign_result,
)
from protocol.types import finite_number

SEED = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"
MINER_SEED = "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb"
KEY = load_signing_key(SEED)
PINNED = [TrustedKey(key_id=key_id_for(KEY.public_key()))]


def finished_job(
    job_id: str = "j1",
    *,
    started: float | None = 100.0,
    constraints: dict[str, Any] | None = None,
    attestation: dict[str, Any] | None = None,
) -> Job:
    job = Job(
        job_id=job_id,
        client_id="client-1",
        payload={"prompt": "héllo", "n": [1, 2.5]},
        constraints=constraints or {},
        priority=0,
        requested_at=50.0,
        expires_at=1000.0,
        max_attempts=3,
    )
    job.miner_id, job.attempt, job.started_at = "gpu-1", 2, started
    job.result = {"text": "ok"}
    job.metrics = {"units": 99, "price": 1000}
    job.attestation = attestation
    return job


def test_billing_is_server_observed_and_capped() -> None:
    """units = accept -> result; unit_price = miner price capped by max_price; price = product."""
    signer = ReceiptSigner(KEY)
    r = signer(finished_job(constraints={"max_price": 0.3}), 0.5, 112.5)
    assert (r["units"], r["unit_price"], r["price"]) == (12.5, 0.3, 3.75)
    assert (r["started_at"], r["completed_at"]) == (100, 112)
    assert r["metadata"]["metrics"] == {"units": 99, "price": 1000}
    assert r["metadata"]["metrics_source"] == "miner-claimed"
    cheap = signer(finished_job("j2", constraints={"max_price": 1.0}), None, 101.0)
    assert (cheap["unit_price"], cheap["price"]) == (DEFAULT_UNIT_PRICE, 0.02)
    # A max_price that is not a finite number caps nothing ("nan" once signed a NaN price,
    # which the store wrote as null, so the receipt never verified: found by a hunt).
    for junk in ("cheap", True, None, [1], "nan", "inf", "-inf", "1e400", 10**400):
        r = signer(finished_job("j4", constraints={"max_price": junk}), 0.5, 101.0)
        assert r["unit_price"] == 0.5
    assert (
        signer(finished_job("j5", constraints={"max_price": "0.1"}), 0.5, 101.0)["unit_price"]
        == 0.1
    )
    unstarted = signer(finished_job("j3", started=None), 0.5, 101.0)
    assert (unstarted["units"], unstarted["started_at"]) == (0.0, 101)


def test_receipts_chain_in_signing_order_and_hash_their_content() -> None:
    """chain_seq 1, 2, 3; each prev_hash names the receipt before; hashes of payload/result."""
    signer = ReceiptSigner(KEY)
    receipts = [signer(finished_job(f"j{n}"), 0.1, 200.0 + n) for n in range(3)]
    assert [r["chain_seq"] for r in receipts] == [1, 2, 3]
    assert receipts[0]["prev_hash"] == CHAIN_GENESIS
    assert receipts[1]["prev_hash"] == receipt_hash(receipts[0])
    assert receipts[2]["prev_hash"] == receipt_hash(receipts[1])
    assert signer.head_hash == receipt_hash(receipts[2])
    assert receipts[0]["payload_hash"] == content_hash({"prompt": "héllo", "n": [1, 2.5]})
    assert receipts[0]["result_hash"] == content_hash({"text": "ok"})
    audit = ChainAudit(PINNED)
    assert [audit.check(r) for r in receipts] == [None, None, None]
    assert all(check_receipt(r, PINNED) == [] for r in receipts)


def test_resume_continues_the_stored_chain() -> None:
    """A new signer resumed from the stored head continues the same chain."""
    first = ReceiptSigner(KEY)
    a = first(finished_job("a"), None, 200.0)
    again = ReceiptSigner(KEY)
    again.resume(a)
    b = again(finished_job("b"), None, 201.0)
    assert (b["chain_seq"], b["prev_hash"]) == (2, receipt_hash(a))
    audit = ChainAudit(PINNED)
    assert audit.check(a) is None
    assert audit.check(b) is None
    again.resume(None)
    assert again(finished_job("c"), None, 202.0)["chain_seq"] == 1


def test_miner_attestation_is_signed_into_the_receipt() -> None:
    """The miner's co-signature sits inside the signed body and verifies against result_hash."""
    miner_key = load_signing_key(MINER_SEED)
    job = finished_job()
    sig = sign_result(miner_key, "j1", {"text": "ok"})
    att = {"alg": "Ed25519", "key_id": key_id_for(miner_key.public_key()), "sig": sig}
    job.attestation = att
    r = ReceiptSigner(KEY)(job, None, 120.0)
    assert r["miner_attestation"] == att
    assert check_receipt(r, PINNED) == []
    forged = copy.deepcopy(r)
    forged["miner_attestation"]["sig"] = sign_result(miner_key, "j1", {"text": "other"})
    assert "signature does not verify" in check_receipt(forged, PINNED)
    assert "miner_attestation does not verify" in check_receipt(forged, PINNED)
    assert "miner_attestation" not in ReceiptSigner(KEY)(finished_job("j2"), None, 120.0)


def _signed_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a non-null value of the signed body (``signature`` excluded)."""
    out: list[tuple[Any, ...]] = []
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return out
    for key, child in items:
        if prefix == () and key in ("signature", "attestations"):
            continue
        if child is not None:
            out.append((*prefix, key))
            out += _signed_paths(child, (*prefix, key))
    return out


_REPLACEMENTS = st.one_of(
    st.integers(-5, 10**12),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_REAL = ReceiptSigner(KEY)
_REAL.resume({"chain_seq": 41, "receipt_id": "x"})
_SIGNED = _REAL(
    finished_job(
        attestation={
            "alg": "Ed25519",
            "key_id": key_id_for(load_signing_key(MINER_SEED).public_key()),
            "sig": sign_result(load_signing_key(MINER_SEED), "j1", {"text": "ok"}),
        }
    ),
    0.4,
    130.0,
)


@settings(max_examples=200, deadline=None)
@given(
    path=st.sampled_from(_signed_paths(_SIGNED)),
    value=_REPLACEMENTS,
    delete=st.booleans(),
)
def test_property_any_change_to_a_signed_field_fails(
    path: tuple[Any, ...], value: Any, delete: bool
) -> None:
    """A real receipt (chain, hashes, attestation): changing or removing ANY signed value fails."""
    assert check_receipt(_SIGNED, PINNED) == []
    changed = copy.deepcopy(_SIGNED)
    parent = changed
    for step in path[:-1]:
        parent = parent[step]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    signed_part = {k: v for k, v in changed.items() if k != "signature"}
    original = {k: v for k, v in _SIGNED.items() if k != "signature"}
    assume(canonical_json(signed_part) != canonical_json(original))
    assert "signature does not verify" in check_receipt(changed, PINNED)


_JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=6),
)
_JSON = st.recursive(
    _JSON_LEAF,
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3)
    ),
    max_leaves=12,
)
_OBJECT = st.dictionaries(st.text(max_size=5), _JSON, max_size=4)


@settings(max_examples=300, deadline=None)
@given(
    payload=_OBJECT,
    result=st.none() | _OBJECT,
    constraints=_OBJECT,
    metrics=st.none() | _OBJECT,
    miner_id=st.text(min_size=1, max_size=6),
    price=st.none() | st.floats(min_value=0, max_value=1e20),
    now=st.floats(min_value=100, max_value=1e7),
)
def test_property_signed_bytes_are_the_reference_canonical_form(
    payload: dict[str, Any],
    result: dict[str, Any] | None,
    constraints: dict[str, Any],
    metrics: dict[str, Any] | None,
    miner_id: str,
    price: float | None,
    now: float,
) -> None:
    """The signer serializes each nested object once (canonical fragments) and orjson writes
    the top level; whatever the content (non-ASCII, nulls, NaN, huge integers, tiny floats),
    the signature verifies over the reference canonical form and the chain head is the
    reference hash of the whole receipt."""
    job = finished_job()
    job.payload, job.result, job.constraints, job.metrics = payload, result, constraints, metrics
    job.miner_id = miner_id
    signer = ReceiptSigner(KEY)
    receipt = signer(job, price, now)
    assert check_receipt(receipt, PINNED) == []
    assert signer.head_hash == receipt_hash(receipt)
    assert receipt["payload_hash"] == content_hash(payload)
    assert receipt["result_hash"] == content_hash(result or {})
    assert receipt["metadata"]["job_payload"] is payload


def test_a_miner_price_that_is_not_a_finite_number_is_no_price() -> None:
    """Capabilities are parsed by ``Capabilities.parse``: a price of "nan", "inf", 1e400 or an
    integer past a float's range is no price (the default is billed), and the receipt
    verifies after a round trip through JSON."""
    signer = ReceiptSigner(KEY)
    for n, junk in enumerate(("nan", "inf", "-inf", "1e400", 10**400, True)):
        caps = Capabilities.parse({"price": junk}, None)
        assert caps.unit_price is None
        receipt = signer(finished_job(f"j{n}"), caps.unit_price, 101.0)
        assert receipt["unit_price"] == DEFAULT_UNIT_PRICE
        assert check_receipt(orjson.loads(orjson.dumps(receipt)), PINNED) == []
    assert Capabilities.parse({"price": "0.5"}, None).unit_price == 0.5
    assert finite_number(-0.0) == 0.0


def test_a_price_past_a_floats_range_is_the_largest_float() -> None:
    """units * unit_price of a huge (finite) advertised price overflowed to infinity: the
    receipt was signed with it, stored and served with ``price: null`` (JSON has no
    infinity), so it never verified and the next receipt's prev_hash named bytes no store
    held; with billing the settlement raised OverflowError in the batch (a 500 for a result
    already applied in memory). Found by a hunt. The price saturates instead."""
    signer = ReceiptSigner(KEY)
    for n, price in enumerate((1e308, 1.7976931348623157e308)):
        receipt = signer(finished_job(f"j{n}"), price, 105.0)
        assert receipt["price"] == 1.7976931348623157e308
        stored = orjson.loads(orjson.dumps(receipt))
        assert check_receipt(stored, PINNED) == []
        assert receipt_hash(stored) == signer.head_hash
        assert price_units(stored) > 0
