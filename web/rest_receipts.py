"""Public receipt routes: the signing keys to pin, and verification for anyone (docs/receipts.md).

``GET /v1/receipts/signing-keys`` publishes the current key and the previous ones configured in
``RECEIPT_PREVIOUS_KEYS``, with their validity periods. ``POST /v1/receipts/verify`` checks any
JSON against those keys with ``protocol.receipt_verify.check_receipt`` (the CLI uses the same).
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

from protocol.receipt_verify import TrustedKey, check_receipt
from protocol.receipts import key_id_for, load_signing_key, receipt_hash
from web.http import Call, Endpoint, json_response

if TYPE_CHECKING:
    from starlette.responses import Response

    from web.settings import Settings

__all__ = ["ENDPOINTS", "signing_keys", "signing_keys_document"]


def signing_keys(settings: Settings) -> tuple[TrustedKey, ...]:
    """The current key (valid from the end of the newest previous key) and the previous keys."""
    previous = settings.receipt_previous_keys
    keys: list[TrustedKey] = []
    if settings.receipt_signing_key_hex is not None:
        current = key_id_for(load_signing_key(settings.receipt_signing_key_hex).public_key())
        since = max((k.valid_until for k in previous if k.valid_until is not None), default=None)
        keys.append(TrustedKey(key_id=current, valid_from=since))
    return (*keys, *previous)


def _public_hex(key_id: str) -> str:
    return base64.urlsafe_b64decode(key_id + "=").hex()


def signing_keys_document(settings: Settings) -> dict[str, Any]:
    keys = signing_keys(settings)
    current = settings.receipt_signing_key_hex is not None
    return {
        "alg": "Ed25519",
        "current": keys[0].key_id if current else None,
        "keys": [
            {
                **k.as_json(),
                "alg": "Ed25519",
                "public_key_hex": _public_hex(k.key_id),
                "status": "current" if current and n == 0 else "previous",
            }
            for n, k in enumerate(keys)
        ],
    }


async def get_signing_keys(call: Call) -> Response:
    return json_response(call.core.signing_keys_document)


async def verify(call: Call) -> Response:
    body = call.body
    # Accept a bare receipt, or anything that wraps one as "receipt" (a /result answer).
    if isinstance(body, dict) and "signature" not in body and isinstance(body.get("receipt"), dict):
        body = body["receipt"]
    reasons = check_receipt(body, call.core.signing_keys)
    out: dict[str, Any] = {"valid": not reasons, "reasons": reasons}
    if isinstance(body, dict):
        sig = body.get("signature")
        out["receipt_id"] = body.get("receipt_id")
        out["key_id"] = sig.get("key_id") if isinstance(sig, dict) else None
        if not reasons:
            out["receipt_hash"] = receipt_hash(body)
    return json_response(out)


ENDPOINTS = [
    Endpoint(
        "GET",
        ("/v1/receipts/signing-keys", "/v1/receipts/signing-key"),
        get_signing_keys,
        "The coordinator's receipt signing keys, to pin",
        "receipts",
        responses={200: ("current and previous public keys, with validity", "SigningKeys")},
    ),
    Endpoint(
        "POST",
        ("/v1/receipts/verify",),
        verify,
        "Verify any receipt against the published keys",
        "receipts",
        body="AnyJSON",
        responses={
            200: ("the verdict and, when invalid, every reason", "ReceiptVerdict"),
            413: ("body too large", "Error"),
            422: ("body is not JSON", "Error"),
        },
        description="The body is a receipt (or an object holding one as `receipt`). Checks the "
        "Ed25519 signature (docs/receipts.md), that the key is one of "
        "`/v1/receipts/signing-keys` and valid at `completed_at`, the miner's co-signature, "
        "and the payload/result hashes when `metadata` carries the payload and result.",
    ),
]
