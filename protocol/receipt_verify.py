"""Receipt verification anyone can run: REST ``/v1/receipts/verify``, the CLI, docs/receipts.md.

Rule: pure. ``check_receipt`` takes any JSON value and returns the exact reasons it is not a
valid receipt (empty means valid); it never raises on bad input. ``ChainAudit`` walks a chain
of receipts in ``chain_seq`` order and names what breaks it.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from protocol.receipts import (
    CHAIN_GENESIS,
    attestation_message,
    check_signature,
    content_hash,
    receipt_hash,
    verify_receipt,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from protocol.types import JSONObject

__all__ = [
    "ChainAudit",
    "TrustedKey",
    "check_receipt",
    "key_id_from_text",
    "keys_from_document",
    "result_attestation",
]

_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")
_B64_KEY = re.compile(r"[A-Za-z0-9_-]{43}")


def key_id_from_text(text: str) -> str:
    """A public key as 64 hex digits or as its 43-character key id -> the key id.

    Raises:
        ValueError: neither form.
    """
    text = text.strip()
    if _HEX_KEY.fullmatch(text):
        raw = bytes.fromhex(text)
    elif _B64_KEY.fullmatch(text):
        try:
            raw = base64.urlsafe_b64decode(text + "=")
        except binascii.Error:  # pragma: no cover - the pattern admits only valid base64url
            raise ValueError("not base64url") from None
    else:
        raise ValueError("a public key is 64 hex digits or a 43-character base64url key id")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


@dataclass(frozen=True, slots=True, kw_only=True)
class TrustedKey:
    """A pinned coordinator key and the receipts it may sign (``completed_at`` in the window)."""

    key_id: str
    valid_from: int | None = None
    valid_until: int | None = None

    def covers(self, completed_at: Any) -> bool:
        if self.valid_from is None and self.valid_until is None:
            return True
        if not isinstance(completed_at, int | float) or isinstance(completed_at, bool):
            return False
        if self.valid_from is not None and completed_at < self.valid_from:
            return False
        return self.valid_until is None or completed_at <= self.valid_until

    def as_json(self) -> JSONObject:
        return {
            "key_id": self.key_id,
            "valid_from": self.valid_from,
            "valid_until": self.valid_until,
        }


def keys_from_document(doc: Any) -> tuple[TrustedKey, ...]:
    """The keys of a ``GET /v1/receipts/signing-keys`` answer, to pin.

    Raises:
        ValueError: the document does not have that shape.
    """
    items = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(items, list) or not items:
        raise ValueError('not a signing-keys document (no "keys" list)')
    keys = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("key_id"), str):
            raise ValueError("every key needs a key_id")
        window = [item.get("valid_from"), item.get("valid_until")]
        if any(v is not None and (not isinstance(v, int) or isinstance(v, bool)) for v in window):
            raise ValueError("valid_from/valid_until must be integers or null")
        keys.append(
            TrustedKey(
                key_id=key_id_from_text(item["key_id"]),
                valid_from=window[0],
                valid_until=window[1],
            )
        )
    return tuple(keys)


def _pinning(receipt: JSONObject, keys: Sequence[TrustedKey]) -> list[str]:
    sig = receipt.get("signature")
    key_id = sig.get("key_id") if isinstance(sig, dict) else None
    matching = [k for k in keys if k.key_id == key_id]
    if not matching:
        return ["signature.key_id is not a pinned coordinator key"]
    if not any(k.covers(receipt.get("completed_at")) for k in matching):
        return ["completed_at is outside the signing key's validity period"]
    return []


def result_attestation(key_id: str, job_id: str, result: JSONObject, sig: str) -> JSONObject | None:
    """The receipt's ``miner_attestation`` block when ``sig`` signs this result; else None."""
    block: JSONObject = {"alg": "Ed25519", "key_id": key_id, "sig": sig}
    if check_signature(attestation_message(job_id, content_hash(result)), block, "result_sig"):
        return None
    return block


def _miner_attestation(receipt: JSONObject) -> list[str]:
    att = receipt.get("miner_attestation")
    if att is None:
        return []
    job_id, result_hash = receipt.get("job_id"), receipt.get("result_hash")
    if not isinstance(job_id, str) or not isinstance(result_hash, str):
        return ["miner_attestation needs the receipt's job_id and result_hash"]
    return check_signature(attestation_message(job_id, result_hash), att, "miner_attestation")


def _hashes(receipt: JSONObject) -> list[str]:
    """The owner's copy carries payload and result in ``metadata``: they must match the hashes."""
    metadata = receipt.get("metadata")
    if not isinstance(metadata, dict):
        return []
    reasons = []
    for field, key in (("payload_hash", "job_payload"), ("result_hash", "result")):
        stated, content = receipt.get(field), metadata.get(key)
        if stated is not None and isinstance(content, dict) and content_hash(content) != stated:
            reasons.append(f"{field} does not match metadata.{key}")
    return reasons


MAX_DEPTH = 200  # orjson itself stops at 255 levels; real receipts have a handful


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether ``value`` nests containers deeper than ``limit`` (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def check_receipt(receipt: Any, keys: Sequence[TrustedKey] | None = None) -> list[str]:
    """Every reason ``receipt`` is not a valid receipt; empty means valid.

    Args:
        receipt: any JSON value.
        keys: the pinned coordinator keys; ``None`` trusts the key the receipt names (the
            upstream SDK's behaviour: only proves the receipt is intact, not who signed it).
    """
    if not isinstance(receipt, dict):
        return ["receipt is not a JSON object"]
    if _depth_exceeds(receipt, MAX_DEPTH):
        return ["receipt is nested too deeply"]
    reasons = verify_receipt(receipt)
    if keys is not None:
        reasons += _pinning(receipt, keys)
    return reasons + _miner_attestation(receipt) + _hashes(receipt)


@dataclass(frozen=True, slots=True)
class ChainBreak:
    chain_seq: Any
    receipt_id: Any
    reasons: list[str]


class ChainAudit:
    """Feed the stored receipts in ``chain_seq`` order; the first ``ChainBreak`` is the answer."""

    def __init__(self, keys: Sequence[TrustedKey] | None = None) -> None:
        self.keys = keys
        self.checked = 0
        self._seq = 0
        self._hash = CHAIN_GENESIS

    def check(self, receipt: Any, stored_seq: int | None = None) -> ChainBreak | None:
        """The next receipt of the chain; ``stored_seq`` is the place the store filed it at."""
        if not isinstance(receipt, dict):
            self.checked += 1
            return ChainBreak(stored_seq, None, ["receipt is not a JSON object"])
        reasons = check_receipt(receipt, self.keys)
        seq, prev = receipt.get("chain_seq"), receipt.get("prev_hash")
        if stored_seq is not None and seq != stored_seq:
            reasons.append(f"chain_seq is {seq!r} but the store files it at {stored_seq}")
        if seq != self._seq + 1:
            reasons.append(f"chain_seq is {seq!r}, expected {self._seq + 1} (a receipt is missing)")
        if prev != self._hash:
            reasons.append("prev_hash is not the hash of the previous receipt")
        self.checked += 1
        self._seq = seq if isinstance(seq, int) and not isinstance(seq, bool) else self._seq + 1
        self._hash = receipt_hash(receipt)
        if reasons:
            return ChainBreak(seq, receipt.get("receipt_id"), reasons)
        return None


__all__ += ["ChainBreak"]
