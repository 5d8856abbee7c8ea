"""Ring 1: receipt canonical form, signing and verification (protocol/receipts.py)."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import assume, given, settings, strategies as st

from protocol.receipts import (
    RECEIPT_VERSION,
    canonical_json,
    canonical_json_reference,
    key_id_for,
    load_signing_key,
    sign_receipt,
    verify_receipt,
)

# RFC 8032 section 7.1, TEST 1: a published seed and its public key.
RFC_SEED = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"
RFC_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
OTHER_SEED = "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb"  # RFC 8032 TEST 2

KEY = load_signing_key(RFC_SEED)
OTHER_KEY = load_signing_key(OTHER_SEED)


def receipt_fields(**overrides: Any) -> dict[str, Any]:
    """A receipt with every §4.1 field, before signing."""
    fields: dict[str, Any] = {
        "version": RECEIPT_VERSION,
        "receipt_id": "0f" * 16,
        "job_id": "job-1",
        "provider": "gpu-box-7",
        "client": "client-1",
        "status": "COMPLETED",
        "units": 2.0,
        "unit_type": "gpu_seconds",
        "unit_price": 0.02,
        "price": 0.04,
        "completed_at": 1_700_000_002,
        "started_at": 1_700_000_000,
        "metadata": {
            "job_payload": {"prompt": "héllo ☃", "parameters": {"temperature": 0.7}},
            "job_constraints": {"models": ["llama3"], "region": None},
            "result": {"text": "hi", "tokens": [1, None, 3]},
            "metrics": {"duration_ms": 2000},
        },
    }
    fields.update(overrides)
    return fields


# ---- an independent verifier, written from rest-api.md §4.3 alone -------------------------


def spec_drop_nulls(value: Any) -> Any:
    """§4.3 step 1: drop every key whose value is null and every null list element, recursively."""
    if isinstance(value, dict):
        return {key: spec_drop_nulls(val) for key, val in value.items() if val is not None}
    if isinstance(value, list):
        return [spec_drop_nulls(item) for item in value if item is not None]
    return value


def spec_canonical(receipt: dict[str, Any]) -> bytes:
    """§4.3: the receipt minus signature/attestations, nulls dropped, sorted compact ASCII JSON."""
    unsigned = {k: v for k, v in receipt.items() if k not in ("signature", "attestations")}
    text = json.dumps(spec_drop_nulls(unsigned), separators=(",", ":"), sort_keys=True)
    return text.encode("utf-8")


def spec_unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def spec_verify(receipt: dict[str, Any]) -> bool:
    """The SDK's algorithm: decode key_id to a key, check alg, verify sig and every attestation."""
    message = spec_canonical(receipt)
    for sig in [receipt["signature"], *receipt.get("attestations", [])]:
        if sig["alg"] != "Ed25519" or "=" in sig["key_id"] + sig["sig"]:
            return False
        public = Ed25519PublicKey.from_public_bytes(spec_unb64url(sig["key_id"]))
        try:
            public.verify(spec_unb64url(sig["sig"]), message)
        except InvalidSignature:
            return False
    return True


def spec_sign(receipt: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, str]:
    """An attestation made from the spec text, as the upstream attestation key would."""
    raw_public = key.public_key().public_bytes_raw()
    return {
        "alg": "Ed25519",
        "key_id": base64.urlsafe_b64encode(raw_public).decode().rstrip("="),
        "sig": base64.urlsafe_b64encode(key.sign(spec_canonical(receipt))).decode().rstrip("="),
    }


# ---- keys ---------------------------------------------------------------------------------


def test_load_signing_key_matches_rfc8032() -> None:
    """The hex seed loads to the RFC 8032 key pair; key_id is its unpadded base64url public key."""
    assert KEY.public_key().public_bytes_raw() == RFC_PUBLIC
    key_id = key_id_for(KEY.public_key())
    assert key_id == base64.urlsafe_b64encode(RFC_PUBLIC).decode().rstrip("=")
    assert "=" not in key_id
    assert len(key_id) == 43


def test_load_signing_key_strips_whitespace_and_accepts_upper_case() -> None:
    """Surrounding whitespace (a trailing newline from a file) and upper-case hex are accepted."""
    key = load_signing_key(f"  {RFC_SEED.upper()}\n")
    assert key.public_key().public_bytes_raw() == RFC_PUBLIC


@pytest.mark.parametrize(
    "seed_hex",
    [
        pytest.param("", id="empty"),
        pytest.param("zz" * 32, id="not-hex"),
        pytest.param("0" * 63, id="odd-length"),
        pytest.param("00" * 31, id="31-bytes"),
        pytest.param("00" * 33, id="33-bytes"),
        pytest.param("00" * 64, id="64-bytes"),
        pytest.param(RFC_SEED[:-2] + "0g", id="bad-last-digit"),
    ],
)
def test_load_signing_key_rejects_bad_seed(seed_hex: str) -> None:
    """Anything but 64 hex digits is a ValueError."""
    with pytest.raises(ValueError, match=r"hex|32 bytes"):
        load_signing_key(seed_hex)


# ---- canonical form -----------------------------------------------------------------------


def test_canonical_json_follows_spec_rules() -> None:
    """Nulls dropped recursively (keys and list items), keys sorted, compact, ASCII, float repr."""
    obj = {"b": 2.0, "a": None, "c": [1, None, {"z": None, "y": "é"}], "d": {"e": None}, "f": False}
    assert canonical_json(obj) == b'{"b":2.0,"c":[1,{"y":"\\u00e9"}],"d":{},"f":false}'


def test_canonical_json_agrees_with_spec_implementation() -> None:
    """Our canonical bytes equal the independent §4.3 implementation for a full receipt."""
    receipt = receipt_fields()
    assert canonical_json(receipt) == spec_canonical(receipt)


# ---- signing ------------------------------------------------------------------------------


def test_sign_then_verify_round_trip() -> None:
    """A signed receipt verifies, keeps every field, and has an Ed25519 signature block."""
    fields = receipt_fields()
    signed = sign_receipt(fields, KEY)
    assert verify_receipt(signed) == []
    assert {k: v for k, v in signed.items() if k != "signature"} == fields
    assert signed["signature"]["alg"] == "Ed25519"
    assert signed["signature"]["key_id"] == key_id_for(KEY.public_key())
    assert fields == receipt_fields()  # the input is not modified


def test_signature_passes_independent_verifier() -> None:
    """Our signature verifies under the verifier written from the spec text alone."""
    signed = sign_receipt(receipt_fields(), KEY)
    assert spec_verify(signed)
    sig = spec_unb64url(signed["signature"]["sig"])
    assert len(sig) == 64
    KEY.public_key().verify(sig, spec_canonical(signed))


def test_sign_with_precomputed_key_id() -> None:
    """Passing the key's id saves deriving it and gives the same receipt."""
    key_id = key_id_for(KEY.public_key())
    assert sign_receipt(receipt_fields(), KEY, key_id=key_id) == sign_receipt(receipt_fields(), KEY)


def test_signing_is_deterministic() -> None:
    """Ed25519 is deterministic: the same receipt and key give the same signature."""
    assert sign_receipt(receipt_fields(), KEY) == sign_receipt(receipt_fields(), KEY)


def test_resigning_replaces_signature_and_drops_attestations() -> None:
    """sign_receipt signs everything but signature/attestations and replaces the old signature."""
    stale = {**receipt_fields(), "signature": {"alg": "x"}, "attestations": [{"alg": "x"}]}
    signed = sign_receipt(stale, OTHER_KEY)
    assert "attestations" not in signed
    assert signed["signature"]["key_id"] == key_id_for(OTHER_KEY.public_key())
    assert verify_receipt(signed) == []
    assert spec_verify(signed)


def test_null_fields_are_not_signed() -> None:
    """A null field may be present, absent or added later without breaking the signature."""
    signed = sign_receipt(receipt_fields(zk_status=None), KEY)
    assert verify_receipt(signed) == []
    assert verify_receipt({k: v for k, v in signed.items() if k != "zk_status"}) == []
    assert verify_receipt({**signed, "tee_status": None}) == []
    assert spec_verify(signed)


def test_attestation_from_spec_verifies() -> None:
    """An attestation made by a second key per the spec is checked and accepted."""
    signed = sign_receipt(receipt_fields(), KEY)
    attested = {**signed, "attestations": [spec_sign(signed, OTHER_KEY)]}
    assert verify_receipt(attested) == []
    assert spec_verify(attested)


# ---- verification failures ----------------------------------------------------------------


@pytest.mark.parametrize("value", [None, [], "receipt", 1, True])
def test_non_object_receipt(value: Any) -> None:
    """A receipt that is not a JSON object is invalid, not a crash."""
    assert verify_receipt(value) == ["receipt is not a JSON object"]


SIGNED = sign_receipt(receipt_fields(), KEY)
SIG = SIGNED["signature"]


@pytest.mark.parametrize(
    ("signature", "reason"),
    [
        pytest.param(None, "signature is missing or not an object", id="null"),
        pytest.param("sig", "signature is missing or not an object", id="string"),
        pytest.param([SIG], "signature is missing or not an object", id="list"),
        pytest.param({**SIG, "alg": "RS256"}, "signature.alg is not Ed25519", id="wrong-alg"),
        pytest.param(
            {"key_id": SIG["key_id"], "sig": SIG["sig"]},
            "signature.alg is not Ed25519",
            id="no-alg",
        ),
        pytest.param(
            {**SIG, "sig": SIG["sig"][:-4] + "AAAA"}, "signature does not verify", id="wrong-sig"
        ),
        pytest.param({**SIG, "sig": "!!!"}, "signature does not verify", id="sig-not-base64"),
        pytest.param({**SIG, "sig": "é"}, "signature does not verify", id="sig-not-ascii"),
        pytest.param(
            {"alg": "Ed25519", "key_id": SIG["key_id"]}, "signature does not verify", id="no-sig"
        ),
        pytest.param({**SIG, "key_id": "AAAA"}, "signature does not verify", id="short-key"),
        pytest.param({**SIG, "key_id": [1]}, "signature does not verify", id="key-id-list"),
        pytest.param(
            {**SIG, "key_id": key_id_for(OTHER_KEY.public_key())},
            "signature does not verify",
            id="other-key",
        ),
    ],
)
def test_bad_signature_block(signature: Any, reason: str) -> None:
    """Every broken signature block yields exactly one reason naming the problem."""
    receipt = {**SIGNED}
    if signature is None:
        del receipt["signature"]
    else:
        receipt["signature"] = signature
    assert verify_receipt(receipt) == [reason]


def test_bad_attestations() -> None:
    """Each attestation is checked on its own; a non-list attestations field is a reason."""
    good = spec_sign(SIGNED, OTHER_KEY)
    forged = {**good, "sig": SIG["sig"]}
    assert verify_receipt({**SIGNED, "attestations": [good, forged, "x"]}) == [
        "attestations[1] does not verify",
        "attestations[2] is missing or not an object",
    ]
    assert verify_receipt({**SIGNED, "attestations": 5}) == ["attestations is not a list"]
    assert verify_receipt({**SIGNED, "attestations": {"alg": "Ed25519"}}) == [
        "attestations is not a list"
    ]
    assert verify_receipt({**SIGNED, "attestations": []}) == []
    assert verify_receipt({**SIGNED, "attestations": None}) == []


def test_pinned_key_ids() -> None:
    """Pinning accepts our key and rejects a receipt validly signed by a foreign key."""
    ours = key_id_for(KEY.public_key())
    assert verify_receipt(SIGNED, pinned_key_ids=frozenset({ours})) == []
    foreign = sign_receipt(receipt_fields(), OTHER_KEY)
    assert verify_receipt(foreign) == []
    assert verify_receipt(foreign, pinned_key_ids=frozenset({ours})) == [
        "signature.key_id is not a pinned coordinator key"
    ]
    assert verify_receipt(SIGNED, pinned_key_ids=frozenset()) == [
        "signature.key_id is not a pinned coordinator key"
    ]


def test_pinned_key_ids_with_malformed_key_id() -> None:
    """A non-string key_id under pinning is reported, never a crash (unhashable values)."""
    receipt = {**SIGNED, "signature": {**SIG, "key_id": {"k": 1}}}
    assert verify_receipt(receipt, pinned_key_ids=frozenset({SIG["key_id"]})) == [
        "signature does not verify",
        "signature.key_id is not a pinned coordinator key",
    ]
    missing = {**SIGNED}
    del missing["signature"]
    assert verify_receipt(missing, pinned_key_ids=frozenset({SIG["key_id"]})) == [
        "signature is missing or not an object"
    ]


def test_post_signing_annotation_breaks_signature() -> None:
    """The upstream bug: adding zk_status/tee_status after signing must fail verification."""
    annotated = {**SIGNED, "zk_status": "not_required", "tee_status": "not_required"}
    assert verify_receipt(annotated) == ["signature does not verify"]
    assert not spec_verify(annotated)


# ---- properties ---------------------------------------------------------------------------

TEXT = st.text(max_size=10)
SCALARS = (
    st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT
)
JSON_VALUES = st.recursive(
    st.none() | SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
NON_NULL = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
TOP_KEYS = TEXT.filter(lambda k: k not in ("signature", "attestations"))
RECEIPTS = st.dictionaries(TOP_KEYS.filter(lambda k: k != "metadata"), JSON_VALUES, max_size=6).map(
    lambda extra: {**receipt_fields(), **extra}
)


@settings(max_examples=60, deadline=None)
@given(receipt=RECEIPTS)
def test_property_round_trip(receipt: dict[str, Any]) -> None:
    """Any JSON receipt signs, verifies, and passes the independent verifier."""
    signed = sign_receipt(receipt, KEY)
    assert verify_receipt(signed, pinned_key_ids=frozenset({key_id_for(KEY.public_key())})) == []
    assert spec_verify(signed)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a non-null value inside ``value`` (dict keys and list indexes)."""
    out: list[tuple[Any, ...]] = []
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, child in items:
        if child is not None:
            out.append((*prefix, key))
            out += _paths(child, (*prefix, key))
    return out


@st.composite
def tampered(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    """A signed receipt and a copy whose signed content was changed in one place."""
    signed = sign_receipt(draw(RECEIPTS), KEY)
    changed = copy.deepcopy(signed)
    how = draw(st.sampled_from(["add-top", "modify-top", "modify-nested"]))
    if how == "add-top":
        key = draw(TOP_KEYS.filter(lambda k: k not in signed or signed[k] is None))
        changed[key] = draw(NON_NULL)
    elif how == "modify-top":
        key = draw(
            st.sampled_from(sorted(k for k in signed if k not in ("signature", "attestations")))
        )
        changed[key] = draw(JSON_VALUES)
    else:
        path = draw(st.sampled_from(_paths(changed["metadata"])))
        parent = changed["metadata"]
        for step in path[:-1]:
            parent = parent[step]
        parent[path[-1]] = draw(JSON_VALUES)
    return signed, changed


@settings(max_examples=150, deadline=None)
@given(case=tampered())
def test_property_tampering_is_detected(case: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """Any change to the signed content (top-level or inside metadata) fails verification."""
    signed, changed = case
    # Skip the rare draw that replaced a value by an equal one (the signed bytes did not change).
    assume(spec_canonical(changed) != spec_canonical(signed))
    assert verify_receipt(changed) == ["signature does not verify"]
    assert not spec_verify(changed)


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=25,
)


@pytest.mark.timeout(120)  # ~11 s alone; several times that on a loaded machine
@settings(max_examples=600, deadline=None)
@given(st.dictionaries(st.text(max_size=8), _json_values, max_size=6))
def test_fast_canonical_form_is_byte_identical_to_the_reference(obj: dict[str, Any]) -> None:
    """The orjson fast path never changes a byte of the §4.3 canonical form."""
    assert canonical_json(obj) == canonical_json_reference(obj)


@pytest.mark.parametrize(
    "value",
    [
        1e16,
        1e-7,
        2.5e-5,
        1e15,
        123456789.123,
        0.1,
        -0.0,
        100.0,
        2**63,
        2**64 + 1,
        "é",
        "\x1f\x7f",
        float("nan"),
        float("inf"),
        [None, 1],
        {"a": None},
        [1e16, -2.5e-5, 12345678901234567.0],
        {"x": [0.00001]},
        ":1e-7",
        "[1e16,0.00001]",
        {"a:2e-6": [",0.00001", 3e-6]},
    ],
)
def test_fast_canonical_form_edge_values(value: Any) -> None:
    """Exponents, big integers, non-ASCII, control characters, NaN and nulls fall back or agree."""
    assert canonical_json({"v": value}) == canonical_json_reference({"v": value})


@pytest.mark.parametrize("exponent", range(-30, 31))
def test_fast_canonical_form_across_float_magnitudes(exponent: int) -> None:
    """Every decimal magnitude, with short and long mantissas, matches the reference."""
    for mantissa in (1.0, 2.5, 1.234567891234, 9.999999999999999, -3.3):
        value = mantissa * 10.0**exponent
        assert canonical_json({"v": value}) == canonical_json_reference({"v": value})


def test_typical_receipt_takes_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """No fallback for hex ids ("...3e5..."), tiny prices, exponents or NaN: only for text."""
    import protocol.receipts as receipts

    body = {
        "receipt_id": "019ac3e5e7d0e1e2e3e4e5e6e7e8e9e0",
        "job_id": "0e10" * 8,
        "units": 0.000123,
        "unit_price": 0.02,
        "price": 2.46e-06,
        "extremes": [1e16, -1e-7, float("nan"), float("inf"), 0.0001, 9999999999999998.0],
        "metadata": {"result": {"text": "note: 1e5 inside a string"}, "list": [1, 2.5]},
    }
    expected = canonical_json_reference(body)

    def no_reference(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("the reference serializer was used")

    monkeypatch.setattr(receipts.json, "dumps", no_reference)
    assert canonical_json(body) == expected


def test_drop_nulls_returns_scalars_unchanged() -> None:
    """Scalars pass through the null-dropping pass as they are."""
    from protocol.receipts import _drop_nulls

    assert _drop_nulls(7) == 7
    for scalar in (7, "text", True):  # a payload or result need not be an object
        assert canonical_json(scalar) == canonical_json_reference(scalar)  # type: ignore[arg-type]
    assert _drop_nulls([1, None, {"a": None, "b": [None]}]) == [1, {"b": []}]


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"metadata": {"result": {"text": "é ☃"}}},  # non-ASCII: the reference path
        {"metadata": {"result": {"text": "\x7f"}}},
        {"units": 1e-7, "price": float("nan"), "metadata": {"list": [1e16, None]}},
    ],
)
def test_sign_receipt_hashed_returns_the_receipt_hash(extra: dict[str, Any]) -> None:
    """The hash that saves a walk equals ``receipt_hash`` of the very receipt it signed."""
    from protocol.receipts import receipt_hash, sign_receipt_hashed

    body = {"version": RECEIPT_VERSION, "receipt_id": "r1", "job_id": "j1", **extra}
    signed, digest = sign_receipt_hashed(body, KEY)
    assert digest == receipt_hash(signed)
    assert signed == sign_receipt(body, KEY)
    assert verify_receipt(signed) == []
