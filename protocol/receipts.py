"""Receipt canonical form, signing and verification (rest-api.md §4.3, docs/receipts.md).

Rule 1: pure functions; the caller passes every value (ids, times), so signing is testable.
Rule 2: the signature is computed last, over every other field, so the upstream SDK verifier
(`aitbc_sdk.receipts.verify_receipt`) accepts our receipts unchanged.

The canonical form is defined as Python's ``json.dumps(sort_keys=True, separators=(",", ":"))``
with ASCII escaping and Python's float repr (``canonical_json_reference``); ``canonical_json``
reaches the same bytes through orjson when it provably can, and falls back otherwise.
``cryptography`` does the Ed25519 arithmetic; it is pure computation, no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from protocol.codec import dumps_sorted, json_fragment

if TYPE_CHECKING:
    from protocol.types import JSONObject

__all__ = [
    "CHAIN_GENESIS",
    "RECEIPT_VERSION",
    "SigningKey",
    "attestation_message",
    "canonical_float",
    "canonical_json",
    "canonical_json_reference",
    "check_signature",
    "content_hash",
    "key_id_for",
    "load_signing_key",
    "receipt_hash",
    "sign_receipt",
    "sign_prepared",
    "sign_receipt_hashed",
    "sign_result",
    "verify_receipt",
]

RECEIPT_VERSION = "1.0"
SigningKey = Ed25519PrivateKey  # the one place protocol/ names the crypto library's key type
# ``prev_hash`` of the first receipt of a chain.
CHAIN_GENESIS = "0" * 64
_UNSIGNED = ("signature", "attestations")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_CONTAINERS = (dict, list)


def _drop_nulls(value: Any) -> Any:
    """A copy of ``value`` without nulls, at any depth (scalars are not visited one by one)."""
    kind = type(value)
    if kind is dict:
        return {
            k: _drop_nulls(v) if type(v) in _CONTAINERS else v
            for k, v in value.items()
            if v is not None
        }
    if kind is list:
        return [_drop_nulls(v) if type(v) in _CONTAINERS else v for v in value if v is not None]
    return value


# orjson writes a float exactly as Python's ``repr`` does while repr uses fixed notation,
# 1e-4 <= |x| < 1e16 (both print the shortest round-trip digits). Outside that range the
# spellings differ ("1e-5" vs "1e-05", "1e16" vs "1e+16"), and orjson writes NaN/Infinity as
# null: those floats go in as fragments already spelled the way ``json.dumps`` spells them.
_FIXED_MIN, _FIXED_MAX = 1e-4, 1e16
_INFINITIES = {float("inf"): b"Infinity", float("-inf"): b"-Infinity"}
_VISIT = (dict, list, float)


def canonical_float(value: float) -> Any:
    """A float as the reference spells it: itself where orjson agrees, else a fragment."""
    if _FIXED_MIN <= abs(value) < _FIXED_MAX or value == 0.0:
        return value
    if value != value:
        return json_fragment(b"NaN")
    return json_fragment(_INFINITIES.get(value) or repr(value).encode("ascii"))


def _fast_body(value: Any) -> Any:
    """``_drop_nulls``, with floats orjson would spell differently replaced by fragments."""
    kind = type(value)
    if kind is dict:
        return {
            k: _fast_body(v) if type(v) in _VISIT else v for k, v in value.items() if v is not None
        }
    if kind is list:
        return [_fast_body(v) if type(v) in _VISIT else v for v in value if v is not None]
    if kind is float:
        return canonical_float(value)
    return value


def canonical_json_reference(obj: JSONObject) -> bytes:
    """The §4.3 canonical form, exactly as the upstream SDK computes it (the definition)."""
    return json.dumps(_drop_nulls(obj), separators=(",", ":"), sort_keys=True).encode("utf-8")


def canonical_json(obj: JSONObject) -> bytes:
    """The §4.3 canonical form: nulls dropped recursively, sorted keys, compact, ASCII.

    orjson produces the same bytes as the reference ``json.dumps`` for ASCII text and, once
    the floats it would spell differently are handed to it pre-spelled, for every number,
    several times faster. Whenever its output could still differ (non-ASCII text, DEL, an
    integer orjson cannot represent) the reference serializer is used instead. A property
    test holds the two byte-identical.
    """
    out = _orjson_canonical(_fast_body(obj))
    return out if out is not None else canonical_json_reference(obj)


def _orjson_canonical(fast: Any) -> bytes | None:
    """orjson's output for a ``_fast_body``, or None where it could differ from the reference."""
    out = dumps_sorted(fast)
    if out and out.isascii() and b"\x7f" not in out:  # Python escapes DEL as \u007f
        return out
    return None


def content_hash(value: JSONObject) -> str:
    """SHA-256 (hex) of the canonical JSON of a JSON object: ``payload_hash``/``result_hash``."""
    return hashlib.sha256(canonical_json(value)).hexdigest()


def receipt_hash(receipt: JSONObject) -> str:
    """SHA-256 (hex) of the canonical JSON of the WHOLE receipt, signature included.

    The next receipt of the chain names it as ``prev_hash``.
    """
    return hashlib.sha256(canonical_json(receipt)).hexdigest()


def attestation_message(job_id: str, result_hash: str) -> bytes:
    """The bytes a miner signs to attest its result (docs/receipts.md, "Miner co-signature")."""
    return canonical_json({"job_id": job_id, "result_hash": result_hash, "type": "aitbc.result"})


def sign_result(key: Ed25519PrivateKey, job_id: str, result: JSONObject) -> str:
    """A miner's co-signature of its result: base64url Ed25519 over ``attestation_message``."""
    return _b64url(key.sign(attestation_message(job_id, content_hash(result))))


def load_signing_key(seed_hex: str) -> Ed25519PrivateKey:
    """Build the key from ``RECEIPT_SIGNING_KEY_HEX`` (a 32-byte seed in hex).

    Raises:
        ValueError: the text is not 64 hex digits.
    """
    seed = bytes.fromhex(seed_hex.strip())
    if len(seed) != 32:
        raise ValueError("an Ed25519 seed is 32 bytes (64 hex digits)")
    return Ed25519PrivateKey.from_private_bytes(seed)


def key_id_for(public_key: Ed25519PublicKey) -> str:
    """Unpadded base64url of the raw 32-byte public key (the upstream ``key_id``)."""
    return _b64url(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw))


def _signed_part(receipt: JSONObject) -> JSONObject:
    return {k: v for k, v in receipt.items() if k not in _UNSIGNED}


def sign_receipt(
    receipt: JSONObject, key: Ed25519PrivateKey, *, key_id: str | None = None
) -> JSONObject:
    """Return a copy of ``receipt`` with ``signature`` over all its other fields.

    Args:
        key_id: the key's id when the caller already has it (saves deriving it per receipt).
    """
    return sign_receipt_hashed(receipt, key, key_id=key_id)[0]


def sign_receipt_hashed(
    receipt: JSONObject, key: Ed25519PrivateKey, *, key_id: str | None = None
) -> tuple[JSONObject, str]:
    """``sign_receipt``, plus the signed receipt's ``receipt_hash`` (the chain's next link).

    The hash reuses the walk of the signed fields: the whole receipt's canonical form is
    theirs with the ``signature`` object (plain ASCII) added.
    """
    body = _signed_part(receipt)
    fast = _fast_body(body)
    out = _orjson_canonical(fast)
    sig = key.sign(out if out is not None else canonical_json_reference(body))
    kid = key_id if key_id is not None else key_id_for(key.public_key())
    signature = {"alg": "Ed25519", "key_id": kid, "sig": _b64url(sig)}
    signed = {**body, "signature": signature}
    whole = None if out is None else _orjson_canonical({**fast, "signature": signature})
    return signed, hashlib.sha256(whole or canonical_json(signed)).hexdigest()


def sign_prepared(
    body: JSONObject, fast: JSONObject, key: Ed25519PrivateKey, *, key_id: str
) -> tuple[JSONObject, str]:
    """``sign_receipt_hashed`` for a body whose canonical stand-in the caller built.

    ``fast`` has the keys of ``body`` that are not null; its nested objects are
    ``json_fragment``s of their ``canonical_json`` (bytes a caller often has already: a
    payload is hashed anyway) and its floats go through ``canonical_float``. orjson then only
    writes the top level. Where its output could differ from the reference (non-ASCII text
    at the top level) this falls back to ``sign_receipt_hashed``: same bytes, slower.
    """
    out = _orjson_canonical(fast)
    if out is None:
        return sign_receipt_hashed(body, key, key_id=key_id)
    signature = {"alg": "Ed25519", "key_id": key_id, "sig": _b64url(key.sign(out))}
    whole = _orjson_canonical({**fast, "signature": signature})
    assert whole is not None  # the signature block is plain ASCII
    return {**body, "signature": signature}, hashlib.sha256(whole).hexdigest()


def check_signature(body: bytes, sig: Any, label: str) -> list[str]:
    """Reasons the ``{"alg","key_id","sig"}`` block ``sig`` does not sign ``body`` (empty: ok)."""
    if not isinstance(sig, dict):
        return [f"{label} is missing or not an object"]
    if sig.get("alg") != "Ed25519":
        return [f"{label}.alg is not Ed25519"]
    try:
        public = Ed25519PublicKey.from_public_bytes(_b64url_decode(str(sig.get("key_id", ""))))
        public.verify(_b64url_decode(str(sig.get("sig", ""))), body)
    except (ValueError, InvalidSignature):
        return [f"{label} does not verify"]
    return []


def verify_receipt(receipt: Any, *, pinned_key_ids: frozenset[str] | None = None) -> list[str]:
    """Check a receipt; returns the reasons it is invalid (empty means valid).

    Args:
        receipt: any JSON value claimed to be a receipt.
        pinned_key_ids: when given, the signing key must be one of these (key pinning).
    """
    if not isinstance(receipt, dict):
        return ["receipt is not a JSON object"]
    body = canonical_json(_signed_part(receipt))
    reasons = check_signature(body, receipt.get("signature"), "signature")
    sig = receipt.get("signature")
    if pinned_key_ids is not None and isinstance(sig, dict):
        key_id = sig.get("key_id")
        if not isinstance(key_id, str) or key_id not in pinned_key_ids:
            reasons.append("signature.key_id is not a pinned coordinator key")
    attestations = receipt.get("attestations") or []
    if not isinstance(attestations, list):
        return [*reasons, "attestations is not a list"]
    for n, att in enumerate(attestations):
        reasons += check_signature(body, att, f"attestations[{n}]")
    return reasons
