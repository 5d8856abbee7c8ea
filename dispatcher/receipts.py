"""Builds and signs the receipt of a completed job (rest-api.md §4, docs/receipts.md).

Billing is decided by the server: ``units`` are the seconds the server observed between the
miner's accept and its result; ``unit_price`` is the miner's advertised price capped by the
job's ``max_price`` (0.02 when the miner advertises none). What the miner claims about itself
stays in ``metadata.metrics``, labelled ``metrics_source: "miner-claimed"``.

Tamper evidence: every receipt names the hash of the receipt this coordinator signed before it
(``prev_hash``) and its place in that chain (``chain_seq``), plus the hashes of the job payload
and result. The chain head lives here, in memory: the scheduler signs at completion, in the
order the writer commits; ``resume`` loads the head from the store at start-up.
"""

from __future__ import annotations

import hashlib
import sys
from typing import TYPE_CHECKING

from dispatcher.ids import new_id
from protocol.codec import json_fragment
from protocol.receipts import (
    CHAIN_GENESIS,
    RECEIPT_VERSION,
    canonical_float,
    canonical_json,
    key_id_for,
    receipt_hash,
    sign_prepared,
)
from protocol.types import finite_number

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from dispatcher.jobs import Job
    from protocol.types import JSONObject

__all__ = ["DEFAULT_UNIT_PRICE", "ReceiptSigner"]

DEFAULT_UNIT_PRICE = 0.02


def _canonical(value: JSONObject) -> bytes:
    return canonical_json(value) if value else b"{}"


class ReceiptSigner:
    """Callable receipt factory injected into the scheduler."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.key_id = key_id_for(key.public_key())
        self.chain_seq = 0  # of the last receipt signed
        self.head_hash = CHAIN_GENESIS

    def resume(self, last: JSONObject | None) -> None:
        """Continue the chain after ``last``, the newest stored receipt (None: a new chain)."""
        if last is None:
            self.chain_seq, self.head_hash = 0, CHAIN_GENESIS
        else:
            self.chain_seq, self.head_hash = int(last["chain_seq"]), receipt_hash(last)

    def __call__(self, job: Job, miner_price: float | None, now: float) -> JSONObject:
        assert job.miner_id is not None  # the provider: the miner that returned the result
        started = job.started_at if job.started_at is not None else now
        units = round(max(0.0, now - started), 6)
        unit_price = miner_price if miner_price is not None else DEFAULT_UNIT_PRICE
        cap = finite_number(job.constraints.get("max_price"))
        if cap is not None:
            unit_price = min(unit_price, cap)
        # A huge (finite) advertised price times the units can pass a float's range: JSON has
        # no infinity (it would be stored as null, never verify and break the chain), so the
        # price saturates at the largest float.
        price = min(round(units * unit_price, 6), sys.float_info.max)
        # Each nested object is serialized once: its canonical bytes give its hash and stand
        # in for it when the whole body is signed (protocol.receipts.sign_prepared).
        payload = _canonical(job.payload)
        result = _canonical(job.result or {})
        constraints = _canonical(job.constraints)
        metrics = job.metrics or {}
        body: JSONObject = {
            "version": RECEIPT_VERSION,
            "receipt_id": new_id(),
            "job_id": job.job_id,
            "provider": job.miner_id,
            "client": job.client_id,
            "status": "COMPLETED",
            "units": units,
            "unit_type": "gpu_seconds",
            "unit_price": float(unit_price),
            "price": price,
            "started_at": int(started),
            "completed_at": int(now),
            "attempt": job.attempt,
            "chain_seq": self.chain_seq + 1,
            "prev_hash": self.head_hash,
            "payload_hash": hashlib.sha256(payload).hexdigest(),
            "result_hash": hashlib.sha256(result).hexdigest(),
            "metadata": {
                "job_payload": job.payload,
                "job_constraints": job.constraints,
                "result": job.result,
                "metrics": metrics,
                "metrics_source": "miner-claimed",
            },
        }
        metadata = {
            "job_payload": json_fragment(payload),
            "job_constraints": json_fragment(constraints),
            "metrics": json_fragment(_canonical(metrics)),
            "metrics_source": "miner-claimed",
        }
        if job.result is not None:
            metadata["result"] = json_fragment(result)
        # No top-level value is null: ``fast`` keeps them all.
        fast = {
            **body,
            "units": canonical_float(units),
            "unit_price": canonical_float(body["unit_price"]),
            "price": canonical_float(price),
            "metadata": metadata,
        }
        if job.attestation is not None:
            body["miner_attestation"] = job.attestation
            fast["miner_attestation"] = json_fragment(_canonical(job.attestation))
        receipt, self.head_hash = sign_prepared(body, fast, self._key, key_id=self.key_id)
        self.chain_seq += 1
        return receipt
