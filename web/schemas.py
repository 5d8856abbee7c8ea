"""Request/response schemas as JSON Schema (OpenAPI 3.1), checked by ``protocol.schema``.

Rule: one definition per shape. The same dicts validate request bodies and are published in
``/openapi.json``, so the documentation cannot drift from what the server accepts. Shapes the
client socket checks too (a job's constraints) live in ``protocol.schema``.
"""

from __future__ import annotations

from typing import Any

from protocol.codec import MAX_ATTEMPT
from protocol.schema import CONSTRAINTS, Schema, ValidationFailed, validate as check

# The longest failure text a miner may report (/fail; a socket job.fail's limit too).
MAX_ERROR_MESSAGE = 65536

__all__ = [
    "ASSIGNED_CONSTRAINT_KEYS",
    "MAX_ERROR_MESSAGE",
    "SCHEMAS",
    "ValidationFailed",
    "validate",
]

_str = {"type": "string"}
_num = {"type": "number"}
_obj = {"type": "object"}
# A REST miner's /result or /fail names the attempt its poll answer gave (docs/rest-api.md).
_report_attempt = {
    "type": "integer",
    "minimum": 1,
    "maximum": MAX_ATTEMPT,
    "description": "ours, optional: the attempt the poll answer named; a report of another "
    "attempt is refused 409",
}
_nullable_str = {"type": ["string", "null"]}
_sig = {
    "type": "object",
    "required": ["alg", "key_id", "sig"],
    "properties": {"alg": _str, "key_id": _str, "sig": _str},
}

_amount = {
    "type": "string",
    "pattern": "^-?[0-9]+\\.[0-9]{8}$",
    "description": "exact decimal, 8 places",
}
# A configured key list as the admin debug settings show it: never a key's text.
_key_ids = {
    "type": "object",
    "required": ["count", "ids"],
    "properties": {
        "count": {"type": "integer"},
        "ids": {
            "type": "array",
            "items": _str,
            "description": "each key's non-secret id, <role>-<sha256(key)[:12]>",
        },
    },
}
# A page of ledger transactions: the user's and an account's answers share it.
_transaction_page = {
    "total": {"type": "integer"},
    "transactions": {"type": "array", "items": {"$ref": "#/components/schemas/Transaction"}},
}
_wallet = {**_str, "maxLength": 64, "description": "0x + 40 hex digits (400 otherwise)"}
_login = {
    "wallet_address": _wallet,
    "nonce": {**_str, "maxLength": 128, "description": "from POST /v1/auth/nonce"},
    "signature": {
        **_str,
        "maxLength": 200,
        "description": "EIP-191 personal_sign of the login message, hex (0x optional)",
    },
}
WALLET_SCHEMAS: dict[str, Schema] = {
    "NonceRequest": {
        "type": "object",
        "required": ["wallet_address"],
        "properties": {"wallet_address": _wallet},
    },
    "Nonce": {
        "type": "object",
        "required": ["wallet_address", "nonce", "expires_at"],
        "properties": {
            "wallet_address": _str,
            "nonce": _str,
            "expires_at": {"type": "integer", "description": "Unix seconds (now + 300)"},
            "message": {**_str, "description": "the exact text to sign"},
        },
    },
    "LoginRequest": {
        "type": "object",
        "required": ["wallet_address", "nonce", "signature"],
        "properties": _login,
    },
    "RegisterRequest": {
        "type": "object",
        "required": ["email", "username", "wallet_address", "nonce", "signature"],
        "properties": {
            **_login,
            "email": {**_str, "maxLength": 254},
            "username": {**_str, "maxLength": 64},
            "password": {**_str, "maxLength": 1024, "description": "accepted and ignored"},
        },
    },
    "UserProfile": {
        "type": "object",
        "required": ["user_id", "email", "username", "created_at", "session_token"],
        "properties": {
            "user_id": _str,
            "email": _str,
            "username": _str,
            "wallet_address": _str,
            "created_at": {**_str, "format": "date-time"},
            "session_token": _str,
        },
    },
    "Balance": {
        "type": "object",
        "required": ["user_id", "address", "balance", "updated_at"],
        "properties": {
            "user_id": _str,
            "address": _str,
            "balance": _amount,
            "available": {**_amount, "description": "balance less reservations in flight"},
            "currency": _str,
            "updated_at": {**_str, "format": "date-time"},
        },
    },
    "Transaction": {
        "type": "object",
        "properties": {
            "id": _str,
            "type": _str,
            "status": _str,
            "amount": _amount,
            "fee": _amount,
            "description": _str,
            "reference": _nullable_str,
            "created_at": {**_str, "format": "date-time"},
            "confirmed_at": {**_str, "format": "date-time"},
        },
    },
    "TransactionList": {
        "type": "object",
        "required": ["user_id", "transactions", "total"],
        "properties": {
            "user_id": _str,
            **_transaction_page,
        },
    },
    "Account": {
        "type": "object",
        "required": ["account", "balance", "available"],
        "properties": {
            "account": _str,
            "balance": _amount,
            "available": _amount,
            "currency": _str,
            **_transaction_page,
        },
    },
    "Credit": {
        "type": "object",
        "required": ["amount"],
        "properties": {
            "amount": {"type": ["string", "number"], "maxLength": 32, "description": "AITBC"},
            "note": {**_str, "maxLength": 256},
        },
    },
    "Message": {"type": "object", "required": ["message"], "properties": {"message": _str}},
    "PaymentCreate": {
        "type": "object",
        "description": "aitbc_amount or btc_amount (or both, agreeing at the rate to 1 sat)",
        "properties": {
            "user_id": {**_str, "maxLength": 128, "description": "ignored: the caller pays"},
            "aitbc_amount": {
                "type": ["string", "number"],
                "maxLength": 32,
                "description": "0.01 to 1000000",
            },
            "btc_amount": {"type": ["string", "number"], "maxLength": 32},
            "eth_amount": {
                "type": ["string", "number"],
                "maxLength": 32,
                "description": "upstream ETH form: refused (400)",
            },
        },
    },
    "Payment": {
        "type": "object",
        "required": ["payment_id", "status", "payment_address", "aitbc_amount", "btc_amount"],
        "properties": {
            "payment_id": _str,
            "user_id": _str,
            "aitbc_amount": _amount,
            "btc_amount": _amount,
            "payment_address": _str,
            "status": {"enum": ["pending", "confirmed", "expired"]},
            "created_at": {"type": "integer"},
            "expires_at": {"type": "integer"},
            "confirmations": {"type": "integer"},
            "tx_hash": _nullable_str,
            "confirmed_at": {"type": ["integer", "null"]},
        },
    },
    "PaymentConfirm": {
        "type": "object",
        "properties": {
            "tx_hash": {**_str, "maxLength": 64, "description": "64 hex digits"},
            "vout": {"type": "integer", "minimum": 0, "maximum": 100000},
        },
    },
    "Rates": {
        "type": "object",
        "required": ["btc_to_aitbc", "aitbc_to_btc"],
        "properties": {
            "btc_to_aitbc": _amount,
            "aitbc_to_btc": _amount,
            "fee_percent": _num,
            "currency_pair": _str,
            "configured": {"type": "boolean"},
        },
    },
    "MarketStats": {
        "type": "object",
        "required": [
            "price",
            "price_change_24h",
            "daily_volume",
            "daily_volume_btc",
            "total_payments",
            "pending_payments",
        ],
        "properties": {
            "price": {**_amount, "description": "BTC per AITBC at BTC_TO_AITBC_RATE"},
            "price_change_24h": {
                "type": "null",
                "description": "always null: the price is configured, there is no history",
            },
            "daily_volume": {
                **_amount,
                "description": "AITBC of the payments confirmed in the last 24 hours",
            },
            "daily_volume_btc": {**_amount, "description": "the BTC those payments asked"},
            "total_payments": {
                "type": "integer",
                "description": "every payment requested (pending, confirmed or expired)",
            },
            "pending_payments": {"type": "integer"},
        },
    },
}

# The keys every poll answer's constraints carry (rest-api.md §2.3: "the full Constraints object
# with every key, nulls and false defaults included"; web/rest_miners.py fills them in).
ASSIGNED_CONSTRAINT_KEYS = (
    "gpu",
    "cuda",
    "min_vram_gb",
    "models",
    "region",
    "max_price",
    "min_reputation",
    "bond_required",
    "min_bond_amount",
    "zk_proof_required",
    "tee_attestation_required",
    "tee_enclave_id",
    "confidential",
    "required_enclave_measurement",
    "auto_reinvest_pct",
)

# A job page's ``limit`` (web/rest_jobs.py ``job_page``).
_PAGE_LIMIT = {
    "type": "integer",
    "description": "the page size read (above 500: 500); a page its jobs' size ended early "
    "says its length, so offset + limit is the next page",
}

SCHEMAS: dict[str, Schema] = {
    "Constraints": CONSTRAINTS,
    "JobCreate": {
        "type": "object",
        "required": ["payload"],
        "properties": {
            "payload": {**_obj, "description": "free-form job input (type, prompt, model, …)"},
            "constraints": {"$ref": "#/components/schemas/Constraints"},
            "ttl_seconds": {
                "type": "integer",
                "maximum": 604800,
                "description": "queue + run time; values below 1 become 1",
            },
            "priority": {"type": "integer", "minimum": -1000, "maximum": 1000},
            "idempotency_key": {
                **_str,
                "minLength": 1,
                "maxLength": 128,
                "description": "a repeat of one of your earlier keys answers that job (200)",
            },
            "payment_amount": {
                "type": ["number", "string", "null"],
                "maxLength": 32,
                "description": "BILLING=on: reserved from your balance at submission (402 "
                "when short); the miner is paid the receipt price, the rest comes back",
            },
            "payment_currency": {**_str, "maxLength": 16, "description": "AITBC only"},
        },
    },
    "JobView": {
        "type": "object",
        "required": ["job_id", "state", "requested_at", "expires_at"],
        "properties": {
            "job_id": {**_str, "pattern": "^[0-9a-f]{32}$"},
            "state": {"enum": ["QUEUED", "RUNNING", "COMPLETED", "FAILED", "CANCELED", "EXPIRED"]},
            "assigned_miner_id": _nullable_str,
            "requested_at": {**_str, "format": "date-time"},
            "expires_at": {**_str, "format": "date-time"},
            "error": _nullable_str,
            "payment_id": _nullable_str,
            "payment_status": {
                "type": ["string", "null"],
                "enum": ["reserved", "released", "refunded", None],
            },
            "payment_amount": _nullable_str,
            "payload": _obj,
            "constraints": _obj,
            "result": {"type": ["object", "null"]},
            "receipt_id": _nullable_str,
            "attempt": {"type": "integer"},
            "priority": {"type": "integer"},
            "started_at": _nullable_str,
            "finished_at": _nullable_str,
            "seq": {"type": "integer"},
            "servable": {"type": "boolean"},
        },
    },
    "JobList": {
        "type": "object",
        "required": ["items", "total", "limit", "offset"],
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/JobView"}},
            "total": {"type": "integer", "description": "every match, not the page length"},
            "limit": _PAGE_LIMIT,
            "offset": {"type": "integer"},
        },
    },
    "MinerJobList": {
        "type": "object",
        "required": ["jobs", "total", "limit", "offset", "miner_id"],
        "properties": {
            "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/JobView"}},
            "total": {"type": "integer", "description": "every match, not the page length"},
            "limit": _PAGE_LIMIT,
            "offset": {"type": "integer"},
            "miner_id": _str,
        },
    },
    "MinerEarnings": {
        "type": "object",
        "required": [
            "miner_id",
            "total_earnings",
            "pending_earnings",
            "paid_earnings",
            "completed_jobs",
            "currency",
            "earnings_history",
        ],
        "properties": {
            "miner_id": _str,
            "total_earnings": {"type": "number"},
            "pending_earnings": {"type": "number"},
            "paid_earnings": {"type": "number"},
            "completed_jobs": {"type": "integer"},
            "currency": {"const": "AITBC"},
            "from_time": _nullable_str,
            "to_time": _nullable_str,
            "earnings_history": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "job_id": _str,
                        "receipt_id": _str,
                        "amount": {"type": "number"},
                        "completed_at": {"type": "integer"},
                    },
                },
            },
        },
    },
    "JobResult": {
        "type": "object",
        "required": ["result", "receipt"],
        "properties": {
            "result": {"type": ["object", "null"]},
            "receipt": {"oneOf": [{"$ref": "#/components/schemas/Receipt"}, {"type": "null"}]},
        },
    },
    "Receipt": {
        "type": "object",
        "description": "Signed receipt (docs/receipts.md): Ed25519 over the canonical JSON of "
        "every other field.",
        "required": [
            "version",
            "receipt_id",
            "job_id",
            "provider",
            "status",
            "units",
            "unit_type",
            "unit_price",
            "price",
            "started_at",
            "completed_at",
            "signature",
        ],
        "properties": {
            "version": _str,
            "receipt_id": _str,
            "job_id": _str,
            "provider": _str,
            "client": _str,
            "status": _str,
            "units": _num,
            "unit_type": _str,
            "unit_price": _num,
            "price": _num,
            "started_at": {"type": "integer"},
            "completed_at": {"type": "integer"},
            "attempt": {"type": "integer"},
            "chain_seq": {
                "type": "integer",
                "description": "place in this coordinator's receipt chain (1, 2, ...)",
            },
            "prev_hash": {**_str, "description": "SHA-256 hex of the previous receipt"},
            "payload_hash": {**_str, "description": "SHA-256 hex of the job payload"},
            "result_hash": {**_str, "description": "SHA-256 hex of the result"},
            "miner_attestation": {
                **_sig,
                "description": "the miner's signature of job_id and result_hash (optional)",
            },
            "metadata": _obj,
            "signature": _sig,
        },
    },
    "AnyJSON": {"description": "any JSON value"},
    "SigningKeys": {
        "type": "object",
        "required": ["alg", "current", "keys"],
        "properties": {
            "alg": {"enum": ["Ed25519"]},
            "current": {**_nullable_str, "description": "key_id of the current signing key"},
            "keys": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["key_id", "public_key_hex", "status"],
                    "properties": {
                        "key_id": {**_str, "description": "unpadded base64url public key"},
                        "alg": _str,
                        "public_key_hex": _str,
                        "status": {"enum": ["current", "previous"]},
                        "valid_from": {
                            "type": ["integer", "null"],
                            "description": "Unix seconds; receipts with an earlier "
                            "completed_at are not this key's",
                        },
                        "valid_until": {"type": ["integer", "null"], "description": "Unix s"},
                    },
                },
            },
        },
    },
    "ReceiptVerdict": {
        "type": "object",
        "required": ["valid", "reasons"],
        "properties": {
            "valid": {"type": "boolean"},
            "reasons": {"type": "array", "items": _str},
            "receipt_id": {"description": "the receipt's receipt_id, as given"},
            "key_id": {"description": "the key the receipt names, as given"},
            "receipt_hash": {**_str, "description": "when valid: what the next prev_hash names"},
        },
    },
    "ReceiptList": {
        "type": "object",
        "required": ["items"],
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/Receipt"}}
        },
    },
    "MinerRegister": {
        "type": "object",
        "required": ["capabilities"],
        "properties": {
            "capabilities": {
                **_obj,
                "description": "gpus[{name,memory_mb}], cuda, models, "
                "price, … (free-form extras kept)",
            },
            "concurrency": {"type": "integer", "minimum": 1, "maximum": 1024},
            "region": {"type": ["string", "null"], "maxLength": 128},
        },
    },
    "MinerRegistered": {
        "type": "object",
        "required": ["status", "session_token"],
        "properties": {"status": {"const": "ok"}, "session_token": _str, "miner_id": _str},
    },
    "MinerUpdated": {
        "type": "object",
        "required": ["miner_id", "status", "capabilities", "session_token"],
        "properties": {
            "miner_id": _str,
            "status": {"const": "updated"},
            "capabilities": _obj,
            "session_token": _str,
        },
    },
    "MinerDeregistered": {
        "type": "object",
        "required": ["miner_id", "status"],
        "properties": {"miner_id": _str, "status": {"const": "deregistered"}},
    },
    "MinerHeartbeat": {
        "type": "object",
        "description": "Extra keys are accepted and ignored; inflight is never trusted.",
        "properties": {"status": _str, "inflight": {"type": "integer"}, "metadata": _obj},
    },
    "PollRequest": {
        "type": "object",
        "properties": {"max_wait_seconds": {"type": "integer", "minimum": 0, "maximum": 3600}},
    },
    "AssignedJob": {
        "type": "object",
        "required": ["job_id", "payload", "constraints", "attempt", "expires_at"],
        "properties": {
            "job_id": _str,
            "payload": _obj,
            "constraints": {
                **_obj,
                # Not Constraints: its keys come back null when the job gave none (and a job
                # the socket took before it checked constraints may hold any JSON value).
                "required": list(ASSIGNED_CONSTRAINT_KEYS),
                "description": "every Constraints key and upstream's escrow extras "
                f"({', '.join(ASSIGNED_CONSTRAINT_KEYS)}): the job's own value, else null "
                "(false for the booleans); the job's other keys as it gave them",
            },
            "attempt": {"type": "integer", "description": "name it in /result and /fail"},
            "expires_at": {**_str, "format": "date-time", "description": "the job's TTL end"},
        },
    },
    "JobResultSubmit": {
        "type": "object",
        "required": ["result"],
        "properties": {
            "result": _obj,
            "metrics": _obj,
            "job_id": {**_str, "description": "only on POST /v1/miner/result"},
            "attempt": _report_attempt,
        },
    },
    "ResultAccepted": {
        "type": "object",
        "required": ["status", "receipt"],
        "properties": {
            "status": {"const": "ok"},
            "receipt": {"oneOf": [{"$ref": "#/components/schemas/Receipt"}, {"type": "null"}]},
        },
    },
    "JobComplete": {
        "type": "object",
        "required": ["output"],
        "properties": {"output": _obj, "receipt": _obj},
    },
    "JobFailSubmit": {
        "type": "object",
        "required": ["error_code", "error_message"],
        "properties": {
            "error_code": {**_str, "maxLength": 256},
            "error_message": {**_str, "maxLength": MAX_ERROR_MESSAGE},
            "metrics": _obj,
            "retryable": {"type": "boolean"},
            "attempt": _report_attempt,
        },
    },
    "Ok": {"type": "object", "required": ["status"], "properties": {"status": _str}},
    "AdminStatus": {
        "type": "object",
        "required": ["jobs", "miners", "system", "status"],
        "properties": {
            "jobs": {
                "type": "object",
                "required": ["total", "active", "completed", "failed"],
                "properties": {
                    "total": {"type": "integer"},
                    "active": {"type": "integer", "description": "QUEUED + RUNNING"},
                    "completed": {"type": "integer"},
                    "failed": {"type": "integer"},
                },
            },
            "miners": {
                "type": "object",
                "required": ["total", "online", "offline", "avg_job_duration_ms"],
                "properties": {
                    "total": {"type": "integer"},
                    "online": {"type": "integer"},
                    "offline": {"type": "integer"},
                    "avg_job_duration_ms": _num,
                },
            },
            "system": _obj,
            "status": {"type": "string", "enum": ["healthy", "degraded"]},
        },
    },
    "AdminStats": {
        "type": "object",
        "required": ["total_jobs", "active_jobs", "online_miners", "avg_miner_job_duration_ms"],
        "properties": {
            "total_jobs": {"type": "integer"},
            "active_jobs": {"type": "integer", "description": "QUEUED + RUNNING"},
            "online_miners": {"type": "integer"},
            "avg_miner_job_duration_ms": {
                **_num,
                "description": "mean run time of the newest 1000 completed jobs",
            },
            "jobs_by_state": _obj,
        },
    },
    "AdminKeyCheck": {
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {"const": "ok"},
            "role": {"enum": ["admin"]},
            "key_id": {**_str, "description": "admin-<sha256(key)[:12]>, never the key"},
        },
    },
    "AdminDebugSettings": {
        "type": "object",
        "required": ["client_api_keys", "miner_api_keys", "admin_api_keys"],
        "properties": {
            "client_api_keys": _key_ids,
            "miner_api_keys": _key_ids,
            "admin_api_keys": _key_ids,
            "receipt_key_id": {**_str, "description": "the receipt signing key's public id"},
            "database": {**_str, "description": "the database kind (sqlite), not its URL"},
            "environment": _str,
            "job_ttl_seconds": _num,
            "heartbeat_interval_seconds": _num,
            "heartbeat_timeout_seconds": _num,
            "max_attempts": {"type": "integer"},
            "billing": {"type": "boolean"},
            "exchange_configured": {"type": "boolean"},
        },
    },
    "TestMiner": {
        "type": "object",
        "required": ["miner_id", "status"],
        "properties": {
            "miner_id": {"const": "debug-test-miner"},
            "status": {"enum": ["created", "updated"]},
        },
    },
    "AdminJobList": {
        "type": "object",
        "required": ["items"],
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "job_id": _str,
                        "state": _str,
                        "client_id": _str,
                        "assigned_miner_id": _nullable_str,
                        "requested_at": {**_str, "format": "date-time"},
                        "attempt": {"type": "integer"},
                    },
                },
            }
        },
    },
    "AdminMinerList": {
        "type": "object",
        "required": ["items"],
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "miner_id": _str,
                        "status": {"enum": ["ONLINE", "OFFLINE"]},
                        "inflight": {"type": "integer"},
                        "concurrency": {"type": "integer"},
                        "region": _nullable_str,
                        "last_heartbeat": _nullable_str,
                        "transport": {"enum": ["rest", "websocket"]},
                        "jobs_completed": {
                            "type": "integer",
                            "description": "since the coordinator started",
                        },
                        "jobs_failed": {
                            "type": "integer",
                            "description": "since the coordinator started (retryable "
                            "failures included)",
                        },
                        "average_job_duration_ms": {
                            "type": ["number", "null"],
                            "description": "mean run of its completed jobs since the start",
                        },
                        "last_receipt_id": _nullable_str,
                    },
                },
            }
        },
    },
    "AdminJobDetail": {
        "type": "object",
        "required": ["job", "client_id", "events", "next_after", "receipt", "receipt_check"],
        "properties": {
            "job": {"$ref": "#/components/schemas/JobView"},
            "client_id": _str,
            "events": {
                "type": "array",
                "description": "the job's stored events after ?after, oldest first, at most "
                "?limit of them and 4 MiB of their data, the first in any case (job.event "
                "fields)",
                "items": {
                    "type": "object",
                    "required": ["seq", "event", "state", "at", "attempt"],
                    "properties": {
                        "seq": {"type": "integer"},
                        "event": _str,
                        "state": _str,
                        "at": {**_str, "format": "date-time"},
                        "attempt": {"type": "integer"},
                        "miner_id": _nullable_str,
                        "data": _obj,
                    },
                },
            },
            "next_after": {
                "type": ["integer", "null"],
                "description": "more events follow: ask again with this as ?after (the "
                "last seq here); null when these reach the newest stored event",
            },
            "receipt": {"type": ["object", "null"]},
            "receipt_check": {
                "type": "object",
                "required": ["status", "problems"],
                "description": "the signed receipt checked by this coordinator",
                "properties": {
                    "status": {"enum": ["valid", "invalid", "none"]},
                    "problems": {"type": "array", "items": _str},
                },
            },
        },
    },
    "AdminJobAction": {
        "type": "object",
        "required": ["job"],
        "properties": {"job": {"$ref": "#/components/schemas/JobView"}},
    },
    "DrainRequest": {
        "type": "object",
        "properties": {
            "draining": {
                "type": "boolean",
                "default": True,
                "description": "false resumes offering jobs to the miner",
            }
        },
    },
    "AdminMinerAction": {
        "type": "object",
        "required": ["miner_id", "status"],
        "properties": {
            "miner_id": _str,
            "status": {"enum": ["draining", "active", "disconnected"]},
        },
    },
    "OpsSnapshot": {
        "type": "object",
        "required": ["at", "miners", "queue", "counters", "history"],
        "description": "the ops socket's snapshot frame without its type (docs/ops.md)",
        "properties": {
            "at": {**_str, "format": "date-time"},
            "miners": {"type": "array", "items": _obj},
            "queue": _obj,
            "counters": _obj,
            "history": {"type": "array", "items": _obj},
            "tick_seconds": _num,
        },
    },
    "ExplorerReceipts": {
        "type": "object",
        "required": ["jobId", "items"],
        "properties": {
            "jobId": {**_str, "description": 'the job id asked for, or "all"'},
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "receiptId": _str,
                        "jobId": _str,
                        "miner": _str,
                        "coordinator": {**_str, "description": "the signing key id"},
                        "issuedAt": _nullable_str,
                        "status": _str,
                        "payload": {
                            **_obj,
                            "description": "the receipt's public fields only: version, receipt_id, "
                            "job_id, provider, status, units, unit_type, unit_price, price, "
                            "started_at, completed_at (no payload, result, client, hashes or "
                            "signature)",
                        },
                    },
                },
            },
        },
    },
    **WALLET_SCHEMAS,
    "Error": {
        "type": "object",
        "required": ["detail"],
        "properties": {"detail": {"description": "a message, or a list of field errors"}},
    },
}


def validate(schema: Schema, value: Any, where: str = "body") -> None:
    """Raise ValidationFailed at the first violation (``protocol.schema.validate``, with this
    module's schemas as the ones a ``$ref`` names)."""
    check(schema, value, where, SCHEMAS)
