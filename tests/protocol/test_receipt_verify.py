"""Ring 1: protocol/receipt_verify.py — pinning with validity, hashes, co-signature, chain audit."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from protocol.receipt_verify import (
    ChainAudit,
    TrustedKey,
    check_receipt,
    key_id_from_text,
    keys_from_document,
    result_attestation,
)
from protocol.receipts import (
    CHAIN_GENESIS,
    content_hash,
    key_id_for,
    load_signing_key,
    receipt_hash,
    sign_receipt,
    sign_result,
)

KEY = load_signing_key("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
OLD = load_signing_key("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb")
MINER = load_signing_key("22" * 32)
KID, OLD_KID, MINER_KID = (key_id_for(k.public_key()) for k in (KEY, OLD, MINER))
PUBLIC_HEX = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"  # RFC 8032 T1


def body(n: int = 1, prev: str = CHAIN_GENESIS, **extra: Any) -> dict[str, Any]:
    payload, result = {"prompt": f"p{n}"}, {"text": f"r{n}"}
    return {
        "version": "1.0",
        "receipt_id": f"r{n}",
        "job_id": f"j{n}",
        "provider": "gpu-1",
        "client": "c1",
        "status": "COMPLETED",
        "units": 1.0,
        "unit_type": "gpu_seconds",
        "unit_price": 0.02,
        "price": 0.02,
        "started_at": 1000 + n,
        "completed_at": 1001 + n,
        "chain_seq": n,
        "prev_hash": prev,
        "payload_hash": content_hash(payload),
        "result_hash": content_hash(result),
        "metadata": {"job_payload": payload, "result": result},
        **extra,
    }


def chain(length: int, key: Any = KEY) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    prev = CHAIN_GENESIS
    for n in range(1, length + 1):
        out.append(sign_receipt(body(n, prev), key))
        prev = receipt_hash(out[-1])
    return out


# ---- keys ---------------------------------------------------------------------------------


def test_key_id_from_text_accepts_hex_and_key_id() -> None:
    kid = key_id_from_text(PUBLIC_HEX)
    assert kid == "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
    assert key_id_from_text(f"  {kid} ") == kid
    assert key_id_from_text(PUBLIC_HEX.upper()) == kid


@pytest.mark.parametrize("text", ["", "abc", "zz" * 32, "a" * 42, "a" * 44, "+" * 43])
def test_key_id_from_text_rejects_other_text(text: str) -> None:
    with pytest.raises(ValueError, match="public key"):
        key_id_from_text(text)


def test_pinning_and_validity_windows() -> None:
    """Only pinned keys; a key signs only receipts completed inside its validity period."""
    [r] = chain(1)  # completed_at 1002
    assert check_receipt(r, [TrustedKey(key_id=KID)]) == []
    assert check_receipt(r, None) == []
    assert check_receipt(r, [TrustedKey(key_id=OLD_KID)]) == [
        "signature.key_id is not a pinned coordinator key"
    ]
    inside = TrustedKey(key_id=KID, valid_from=1002, valid_until=1002)
    assert inside.as_json() == {"key_id": KID, "valid_from": 1002, "valid_until": 1002}
    assert check_receipt(r, [inside]) == []
    for outside in (
        TrustedKey(key_id=KID, valid_until=1001),
        TrustedKey(key_id=KID, valid_from=1003),
    ):
        assert check_receipt(r, [outside]) == [
            "completed_at is outside the signing key's validity period"
        ]
    no_time = sign_receipt({**body(), "completed_at": "soon"}, KEY)
    assert check_receipt(no_time, [TrustedKey(key_id=KID, valid_until=5000)]) != []
    assert check_receipt(no_time, [TrustedKey(key_id=KID)]) == []


def test_keys_from_document() -> None:
    doc = {
        "keys": [
            {"key_id": KID, "valid_from": 10, "valid_until": None},
            {"key_id": OLD_KID, "valid_from": None, "valid_until": 10, "status": "previous"},
        ]
    }
    assert keys_from_document(doc) == (
        TrustedKey(key_id=KID, valid_from=10),
        TrustedKey(key_id=OLD_KID, valid_until=10),
    )


@pytest.mark.parametrize(
    "doc",
    [
        None,
        [],
        {"keys": []},
        {"keys": "x"},
        {"keys": [{"valid_from": 1}]},
        {"keys": [{"key_id": "short"}]},
        {"keys": [{"key_id": KID, "valid_until": "2026"}]},
        {"keys": [{"key_id": KID, "valid_from": True}]},
    ],
)
def test_keys_from_document_rejects_other_shapes(doc: Any) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - every message names its own problem
        keys_from_document(doc)


# ---- content ------------------------------------------------------------------------------


def test_hashes_must_match_the_metadata() -> None:
    """An owner's copy whose payload/result disagree with the signed hashes is invalid."""
    lying = body(payload_hash=content_hash({"prompt": "other"}))
    assert check_receipt(sign_receipt(lying, KEY)) == [
        "payload_hash does not match metadata.job_payload"
    ]
    lying = body(result_hash="00")
    assert check_receipt(sign_receipt(lying, KEY)) == ["result_hash does not match metadata.result"]
    public = {k: v for k, v in body().items() if k != "metadata"}
    assert check_receipt(sign_receipt(public, KEY)) == []


def test_miner_attestation() -> None:
    result = {"text": "r1"}
    sig = sign_result(MINER, "j1", result)
    att = result_attestation(MINER_KID, "j1", result, sig)
    assert att == {"alg": "Ed25519", "key_id": MINER_KID, "sig": sig}
    assert result_attestation(MINER_KID, "j2", result, sig) is None
    assert result_attestation(MINER_KID, "j1", {"text": "x"}, sig) is None
    assert result_attestation(KID, "j1", result, sig) is None
    r = sign_receipt(body(miner_attestation=att), KEY)
    assert check_receipt(r, [TrustedKey(key_id=KID)]) == []
    no_hash = sign_receipt({**body(miner_attestation=att), "result_hash": None}, KEY)
    assert check_receipt(no_hash) == [
        "miner_attestation needs the receipt's job_id and result_hash"
    ]
    junk = sign_receipt(body(miner_attestation="yes"), KEY)
    assert check_receipt(junk) == ["miner_attestation is missing or not an object"]


# ---- garbage ------------------------------------------------------------------------------


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=20,
)
FIELDS = st.sampled_from(
    [
        "signature",
        "attestations",
        "miner_attestation",
        "metadata",
        "completed_at",
        "job_id",
        "result_hash",
        "payload_hash",
        "chain_seq",
        "prev_hash",
    ]
)


@settings(max_examples=300, deadline=None)
@given(value=JSON | st.dictionaries(FIELDS, JSON))
def test_any_json_gets_reasons_never_an_exception(value: Any) -> None:
    reasons = check_receipt(value, [TrustedKey(key_id=KID, valid_until=10)])
    assert reasons
    assert all(isinstance(r, str) for r in reasons)
    assert ChainAudit().check(value) is not None


def test_deep_nesting_is_a_reason() -> None:
    deep: Any = {}
    for _ in range(5000):
        deep = {"a": [deep]}
    assert check_receipt({"metadata": deep, "signature": {}}) == ["receipt is nested too deeply"]


# ---- the chain ----------------------------------------------------------------------------


def test_an_intact_chain_audits_clean() -> None:
    audit = ChainAudit([TrustedKey(key_id=KID)])
    assert [audit.check(r, n) for n, r in enumerate(chain(4), 1)] == [None] * 4
    assert audit.checked == 4


def _first_break(receipts: list[Any], keys: Any = None) -> Any:
    audit = ChainAudit(keys)
    for n, r in enumerate(receipts, 1):
        broken = audit.check(r, r.get("chain_seq") if isinstance(r, dict) else n)
        if broken is not None:
            return broken
    return None


def test_a_tampered_receipt_breaks_the_chain_at_itself() -> None:
    receipts = chain(4)
    receipts[1] = copy.deepcopy(receipts[1])
    receipts[1]["price"] = 0.0
    broken = _first_break(receipts)
    assert (broken.chain_seq, broken.receipt_id) == (2, "r2")
    assert broken.reasons == ["signature does not verify"]


def test_a_re_signed_forgery_breaks_the_chain_at_the_next_receipt() -> None:
    """Even a validly re-signed replacement is caught: the next prev_hash no longer matches."""
    receipts = chain(3)
    receipts[1] = sign_receipt({**receipts[1], "price": 0.0}, KEY)
    broken = _first_break(receipts)
    assert (broken.chain_seq, broken.reasons) == (
        3,
        ["prev_hash is not the hash of the previous receipt"],
    )


def test_a_missing_receipt_breaks_the_chain() -> None:
    receipts = chain(4)
    del receipts[1]
    broken = _first_break(receipts)
    assert broken.chain_seq == 3
    assert broken.reasons == [
        "chain_seq is 3, expected 2 (a receipt is missing)",
        "prev_hash is not the hash of the previous receipt",
    ]


def test_a_chain_must_start_at_genesis_and_be_filed_where_it_says() -> None:
    receipts = chain(2)
    assert _first_break(receipts[1:]).chain_seq == 2
    audit = ChainAudit()
    assert audit.check(receipts[0], 1) is None
    broken = audit.check(receipts[1], 7)
    assert broken is not None
    assert broken.reasons == ["chain_seq is 2 but the store files it at 7"]


def test_a_foreign_key_breaks_the_chain_when_keys_are_pinned() -> None:
    receipts = chain(2, OLD)
    assert _first_break(receipts) is None
    broken = _first_break(receipts, [TrustedKey(key_id=KID)])
    assert broken.reasons == ["signature.key_id is not a pinned coordinator key"]
