"""Encode messages to wire bytes and decode wire frames into messages (docs/protocol.md).

Rule 1: this is the only module that touches orjson and the only one that sees raw dicts.
Rule 2: every failure to decode is a :class:`RemoteProtocolError` carrying the close code the
contract prescribes: 1007 for invalid JSON or schema, ``UnknownMessageType`` (not fatal) for a
``type`` this direction does not know.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import fields
from typing import Any, Literal, TypeVar

import orjson

from protocol.errors import LocalProtocolError, RemoteProtocolError, UnknownMessageType
from protocol.messages import (
    Ack,
    Auth,
    ClientHello,
    ClientToServer,
    ClientWelcome,
    Error,
    Heartbeat,
    Hello,
    JobAccept,
    JobAssign,
    JobCancel,
    JobCancelRequest,
    JobEvent,
    JobFail,
    JobProgress,
    JobReject,
    JobResult,
    JobSubmit,
    MinerToServer,
    ServerToClient,
    ServerToMiner,
    Status,
    Subscribe,
    Unsubscribe,
    Welcome,
)
from protocol.types import JSON, JSONObject

__all__ = [
    "DEPTH_REFUSED",
    "MAX_DEPTH",
    "CONTROL_CHARACTERS",
    "MAX_ATTEMPT",
    "MAX_ID_LENGTH",
    "MAX_SEQ",
    "NUL_REFUSED",
    "contains_nul",
    "has_control_character",
    "input_refusal",
    "decode_client_frame",
    "decode_miner_frame",
    "decode_server_to_client",
    "decode_server_to_miner",
    "dumps",
    "dumps_sorted",
    "encode",
    "loads",
    "may_contain_nul",
    "too_deep",
    "trimmed",
    "wide_int_at",
]

MAX_ID_LENGTH = 64
_MAX_JOB_ID = 128
_MAX_TEXT = 64 * 1024

T = TypeVar("T")


def trimmed(data: bytes) -> bytes:
    """A right-sized copy of orjson's output, for keeping: the ``bytes`` orjson returns hold a
    buffer of at least 4 KiB (orjson 3.12 and later), however short the JSON."""
    return bytes(memoryview(data))


def dumps(value: JSON) -> bytes:
    """Serialise any JSON value with orjson (used by storage for payload columns too)."""
    return orjson.dumps(value)


def dumps_sorted(value: JSON) -> bytes:
    """Compact JSON with sorted keys; empty bytes when orjson cannot represent the value."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # e.g. an integer beyond 64 bits
        return b""


def json_fragment(text: bytes) -> object:
    """Already-serialized JSON that ``dumps_sorted`` writes verbatim in its place."""
    return orjson.Fragment(text)


def loads(data: bytes | str) -> JSON:
    """Parse JSON; raises RemoteProtocolError(1007) on malformed input."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise RemoteProtocolError("malformed JSON") from exc


# JSON spells NUL only as this escape (a raw control character is malformed JSON).
_NUL_ESCAPE, _NUL_ESCAPE_TEXT = b"\\u0000", "\\u0000"
NUL_REFUSED = "strings must not contain NUL (\\u0000)"


def contains_nul(value: JSON) -> bool:
    """Whether any string of ``value``, a key included, holds the NUL character.

    Input is refused with it (``NUL_REFUSED``): PostgreSQL cannot store NUL in text, and a
    store must never be handed a value it cannot commit."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in k or contains_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(contains_nul(v) for v in value)
    return False


# C0, DEL and C1: the characters no id (a miner's, a client's) may hold, wherever it comes
# from (a socket hello, X-Miner-ID, an admin account route's ``miner:<id>``). A regular
# expression class body, so a route's pattern can refuse the same set.
CONTROL_CHARACTERS = "\\x00-\\x1f\\x7f-\\x9f"
_CONTROL = re.compile(f"[{CONTROL_CHARACTERS}]")


def has_control_character(text: str) -> bool:
    """Whether ``text`` holds a control character (``CONTROL_CHARACTERS``)."""
    return _CONTROL.search(text) is not None


# orjson reads 1024 levels of nesting but writes only 254, and every stored document wraps
# the input a few levels deeper (a receipt holds the job's payload): input deeper than this is
# refused, where a commit would otherwise fail (and a failed commit stops the coordinator).
MAX_DEPTH = 64
DEPTH_REFUSED = f"JSON must not nest more than {MAX_DEPTH} levels deep"


def too_deep(data: bytes | str, value: JSON) -> bool:
    """Whether the parsed JSON ``value`` (text ``data``) nests more than ``MAX_DEPTH`` levels.

    The bracket count of the text bounds the depth: only input with that many is walked."""
    if len(data) <= 2 * MAX_DEPTH:  # too short to hold MAX_DEPTH + 1 pairs of brackets
        return False
    if isinstance(data, bytes):
        brackets = data.count(b"[") + data.count(b"{")
    else:
        brackets = data.count("[") + data.count("{")
    if brackets <= MAX_DEPTH:
        return False
    todo: list[tuple[JSON, int]] = [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict):
            children: Iterable[JSON] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > MAX_DEPTH:
            return True
        todo.extend((child, depth + 1) for child in children)
    return False


# orjson reads an integer literal outside -2**63 .. 2**64 - 1 as a float (and writes no Python
# int outside that range): 2**64 would be stored and read back as 1.8446744073709552e+19,
# another value than the sender's. Such input is refused, naming where it is. Only text with
# 19 digits in a row (-2**63 has 19) can hold one, found by mapping every digit to "0" and
# everything else to "x" (C speed: a regular expression took ten times longer on 1 MiB); that
# text alone is parsed again, by the standard library, which hands over each integer as text.
_DIGITS_AS_ZERO = bytes(0x30 if 0x30 <= c <= 0x39 else 0x78 for c in range(256))
_DIGIT_RUN = b"0" * 19
_INT_RANGE = (-(2**63), 2**64 - 1)


class _Wide:
    """Where an integer orjson reads as a float was (``wide_int_at``)."""

    __slots__ = ()


_WIDE = _Wide()


def wide_int_at(data: bytes | str) -> str | None:
    """Where the JSON text ``data`` (parsed by orjson, at most ``MAX_DEPTH`` deep) holds an
    integer orjson reads as a float: a path such as ``payload.xs[1]``; None when it holds none."""
    raw = data if isinstance(data, bytes) else data.encode()
    if _DIGIT_RUN not in raw.translate(_DIGITS_AS_ZERO):
        return None
    # The standard parser reads all that orjson does (and more: NaN), nesting included.
    todo: list[tuple[object, str]] = [(json.loads(data, parse_int=_read_int), "")]
    while todo:
        item, path = todo.pop()
        if item is _WIDE:
            return path or "the value"
        if isinstance(item, dict):
            todo.extend((v, f"{path}.{k}" if path else str(k)) for k, v in item.items())
        elif isinstance(item, list):
            todo.extend((v, f"{path}[{i}]") for i, v in enumerate(item))
    return None


def _read_int(text: str) -> object:
    """An integer literal, for ``wide_int_at``: ``_WIDE`` when orjson reads it as a float."""
    lo, hi = _INT_RANGE
    # More digits than 2**64 has (20) is wide without int(), which refuses 4300 digits.
    if len(text.lstrip("-")) <= 20 and lo <= int(text) <= hi:
        return 0
    return _WIDE


def input_refusal(data: bytes | str, value: JSON) -> str | None:
    """Why parsed input cannot be taken whatever its schema (NUL, nesting, an integer beyond
    64 bits), or None."""
    if may_contain_nul(data) and contains_nul(value):
        return NUL_REFUSED
    if too_deep(data, value):
        return DEPTH_REFUSED
    where = wide_int_at(data)  # after the depth check: the standard parser recurses
    if where is not None:
        return f"{where[:80]} is an integer beyond 64 bits (send it as a string)"
    return None


def may_contain_nul(data: bytes | str) -> bool:
    """False when the JSON text ``data`` surely has no NUL (its escape is absent): the check
    every input pays; ``contains_nul`` then decides the rare rest."""
    return (_NUL_ESCAPE in data) if isinstance(data, bytes) else (_NUL_ESCAPE_TEXT in data)


# ---- field readers ------------------------------------------------------------------------


def _bad(key: str, what: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"field {key!r} {what}")


def _str(d: JSONObject, key: str, *, max_len: int = _MAX_TEXT) -> str:
    v = d.get(key)
    if not isinstance(v, str):
        raise _bad(key, "must be a string")
    if len(v) > max_len:
        raise _bad(key, f"is longer than {max_len} characters")
    return v


def _opt_str(d: JSONObject, key: str, *, max_len: int = _MAX_TEXT) -> str | None:
    return None if d.get(key) is None else _str(d, key, max_len=max_len)


def _idempotency_key(d: JSONObject) -> str | None:
    """A job.submit's key, as REST's ``JobCreate`` takes it: "" would be one key shared by
    every submit that sends it (all but the first answered with the first job)."""
    key = _opt_str(d, "idempotency_key", max_len=128)
    if key == "":
        raise _bad("idempotency_key", "must not be empty")
    return key


_KEY_ID = re.compile(r"[A-Za-z0-9_-]{43}")
_SIG = re.compile(r"[A-Za-z0-9_-]{86}")


def _opt_b64(d: JSONObject, key: str, pattern: re.Pattern[str], what: str) -> str | None:
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, str) or not pattern.fullmatch(v):
        raise _bad(key, f"must be {what}")
    return v


def _opt_amount(d: JSONObject, key: str) -> str | None:
    """A decimal amount as text (a JSON number is kept as its shortest text)."""
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, str | int | float):
        raise _bad(key, "must be a decimal number or string")
    text = v if isinstance(v, str) else repr(v)
    if len(text) > 32:
        raise _bad(key, "is longer than 32 characters")
    return text


def _job_id(d: JSONObject) -> str:
    v = _str(d, "job_id", max_len=_MAX_JOB_ID)
    if not v:
        raise _bad("job_id", "must not be empty")
    return v


def _miner_id(d: JSONObject) -> str | None:
    """Stripped, as REST strips ``X-Miner-ID``: one id names one miner on both paths (blank:
    none, so the key's derived id)."""
    v = _opt_str(d, "miner_id", max_len=128)
    if v is None:
        return None
    v = v.strip()
    if has_control_character(v):
        raise _bad("miner_id", "must not contain control characters")
    return v or None


# A hello's protocol may be any integer: one other than ours closes 4002 (unsupported version)
# in the session, not 1007 as a schema violation.
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


def _int(d: JSONObject, key: str, default: int | None = None, *, lo: int, hi: int) -> int:
    v = d.get(key)
    if v is None:
        if default is None:
            raise _bad(key, "is required")
        return default
    if not isinstance(v, int) or isinstance(v, bool):
        if not (isinstance(v, float) and v.is_integer()):
            raise _bad(key, "must be an integer")
        v = int(v)  # 120.0: JSON has one number type (Python clients write such numbers)
    if not lo <= v <= hi:
        raise _bad(key, f"must be between {lo} and {hi}")
    return v


def _opt_int(d: JSONObject, key: str, *, lo: int, hi: int) -> int | None:
    return None if d.get(key) is None else _int(d, key, lo=lo, hi=hi)


_MAX_TTL = 7 * 86400


def _ttl(d: JSONObject) -> int | None:
    """A submit's ``ttl_seconds``: an integer of at most ``_MAX_TTL``; one below 1 is 1, as REST's
    ``POST /v1/jobs`` takes it (rest-api.md: values below 1 are clamped), not a closed socket."""
    v = d.get("ttl_seconds")
    if isinstance(v, int | float) and not isinstance(v, bool) and v < 1:
        if isinstance(v, int) or v.is_integer():
            return 1
    return _opt_int(d, "ttl_seconds", lo=1, hi=_MAX_TTL)


def _opt_float(d: JSONObject, key: str, *, lo: float, hi: float) -> float | None:
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, int | float) or isinstance(v, bool) or not lo <= v <= hi:
        raise _bad(key, f"must be a number between {lo} and {hi}")
    return float(v)


def _float(d: JSONObject, key: str, default: float) -> float:
    v = _opt_float(d, key, lo=0.0, hi=1e9)
    return default if v is None else v


def _bool(d: JSONObject, key: str, default: bool) -> bool:
    v = d.get(key, default)
    if not isinstance(v, bool):
        raise _bad(key, "must be a boolean")
    return v


def _opt_bool(d: JSONObject, key: str) -> bool | None:
    return None if d.get(key) is None else _bool(d, key, False)


def _obj(d: JSONObject, key: str, *, required: bool = False) -> JSONObject:
    v = d.get(key)
    if v is None:
        if required:
            raise _bad(key, "is required")
        return {}
    if not isinstance(v, dict):
        raise _bad(key, "must be an object")
    return v


def _opt_obj(d: JSONObject, key: str) -> JSONObject | None:
    return None if d.get(key) is None else _obj(d, key)


MAX_SEQ = 2**62  # event numbers fit the stores' 64-bit integers
# Every assignment is an attempt (rejects, accept timeouts and REST polls gone too, uncharged),
# and writes one event: a job's attempt never passes its event count, bounded as seq is. A
# fleet refusing a week-long job passes a million attempts in days.
MAX_ATTEMPT = MAX_SEQ


def _attempt(d: JSONObject) -> int | None:
    return _opt_int(d, "attempt", lo=0, hi=MAX_ATTEMPT)


def _job_ids(d: JSONObject, key: str) -> tuple[str, ...] | Literal["all"]:
    v = d.get(key)
    if v == "all":
        return "all"
    if not isinstance(v, list) or len(v) > 10_000:
        raise _bad(key, 'must be "all" or a list of at most 10000 job ids')
    if not all(isinstance(x, str) and 0 < len(x) <= _MAX_JOB_ID for x in v):
        raise _bad(key, "must contain job id strings")
    return tuple(v)


def _id_list(d: JSONObject, key: str) -> tuple[str, ...]:
    v = d.get(key)
    if v is None:
        return ()
    if not isinstance(v, list) or not all(
        isinstance(x, str) and 0 < len(x) <= _MAX_JOB_ID for x in v
    ):
        raise _bad(key, "must be a list of job id strings")
    return tuple(v)


def _after(d: JSONObject) -> dict[str, int]:
    v = _obj(d, "after")
    for k, seq in v.items():
        if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= MAX_SEQ:
            raise _bad("after", f"entry {k!r} must be an integer from 0 to 2**62")
    return v


# ---- per-type decoders --------------------------------------------------------------------

# (the decoded object, its ``id``, the frame's length): the length becomes the ``size`` of
# the messages that carry a job's payload or result (what the scheduler counts it as).
_Decoder = Callable[[JSONObject, "str | None", int], Any]

_MINER: dict[str, _Decoder] = {
    "auth": lambda d, i, n: Auth(token=_str(d, "token", max_len=4096), id=i),
    "hello": lambda d, i, n: Hello(
        protocol=_int(d, "protocol", lo=_I64_MIN, hi=_I64_MAX),
        miner_id=_miner_id(d),
        capabilities=_obj(d, "capabilities"),
        concurrency=_int(d, "concurrency", 1, lo=1, hi=1024),
        region=_opt_str(d, "region", max_len=128),
        resume_session=_opt_str(_obj(d, "resume"), "session_id", max_len=128),
        result_key=_opt_b64(
            d, "result_key", _KEY_ID, "an Ed25519 public key as 43 base64url characters"
        ),
        id=i,
    ),
    "job.accept": lambda d, i, n: JobAccept(job_id=_job_id(d), attempt=_attempt(d), id=i),
    "job.reject": lambda d, i, n: JobReject(
        job_id=_job_id(d),
        reason=_opt_str(d, "reason", max_len=1024) or "",
        attempt=_attempt(d),
        id=i,
    ),
    "job.progress": lambda d, i, n: JobProgress(
        job_id=_job_id(d),
        progress=_opt_float(d, "progress", lo=0.0, hi=1.0),
        message=_opt_str(d, "message"),
        output=_opt_str(d, "output"),
        attempt=_attempt(d),
        id=i,
    ),
    "job.result": lambda d, i, n: JobResult(
        job_id=_job_id(d),
        result=_obj(d, "result", required=True),
        metrics=_obj(d, "metrics"),
        attempt=_attempt(d),
        result_sig=_opt_b64(
            d, "result_sig", _SIG, "an Ed25519 signature as 86 base64url characters"
        ),
        id=i,
        size=n,
    ),
    "job.fail": lambda d, i, n: JobFail(
        job_id=_job_id(d),
        error_code=_str(d, "error_code", max_len=256),
        error_message=_str(d, "error_message"),
        retryable=_bool(d, "retryable", False),
        attempt=_attempt(d),
        id=i,
    ),
    "status": lambda d, i, n: Status(
        concurrency=_opt_int(d, "concurrency", lo=1, hi=1024),
        draining=_opt_bool(d, "draining"),
        metrics=_opt_obj(d, "metrics"),
        id=i,
    ),
    "heartbeat": lambda d, i, n: Heartbeat(metrics=_opt_obj(d, "metrics"), id=i),
}

_CLIENT: dict[str, _Decoder] = {
    "auth": _MINER["auth"],
    "hello": lambda d, i, n: ClientHello(
        protocol=_int(d, "protocol", lo=_I64_MIN, hi=_I64_MAX), id=i
    ),
    "job.submit": lambda d, i, n: JobSubmit(
        payload=_obj(d, "payload", required=True),
        constraints=_obj(d, "constraints"),
        ttl_seconds=_ttl(d),
        priority=_int(d, "priority", 0, lo=-1000, hi=1000),
        idempotency_key=_idempotency_key(d),
        payment_amount=_opt_amount(d, "payment_amount"),
        payment_currency=_opt_str(d, "payment_currency", max_len=16),
        id=i,
        size=n,
    ),
    "subscribe": lambda d, i, n: Subscribe(job_ids=_job_ids(d, "job_ids"), after=_after(d), id=i),
    "unsubscribe": lambda d, i, n: Unsubscribe(job_ids=_job_ids(d, "job_ids"), id=i),
    "job.cancel": lambda d, i, n: JobCancelRequest(job_id=_job_id(d), id=i),
}

_SERVER_TO_MINER: dict[str, _Decoder] = {
    "welcome": lambda d, i, n: Welcome(
        protocol=_int(d, "protocol", lo=0, hi=1_000_000),
        session_id=_str(d, "session_id"),
        miner_id=_str(d, "miner_id"),
        heartbeat_interval=_float(d, "heartbeat_interval", 10.0),
        heartbeat_timeout=_float(d, "heartbeat_timeout", 30.0),
        resumed=_id_list(d, "resumed"),
        revoked=_id_list(d, "revoked"),
        id=i,
    ),
    "job.assign": lambda d, i, n: JobAssign(
        job_id=_job_id(d),
        attempt=_int(d, "attempt", lo=0, hi=MAX_ATTEMPT),
        payload=_obj(d, "payload"),
        constraints=_obj(d, "constraints"),
        expires_at=_str(d, "expires_at"),
        accept_timeout=_float(d, "accept_timeout", 10.0),
    ),
    "job.cancel": lambda d, i, n: JobCancel(job_id=_job_id(d), reason=_str(d, "reason")),
}

_EVENT_KEYS = frozenset({"type", "job_id", "seq", "event", "state", "at", "attempt", "miner_id"})
_SERVER_TO_CLIENT: dict[str, _Decoder] = {
    "welcome": lambda d, i, n: ClientWelcome(
        protocol=_int(d, "protocol", lo=0, hi=1_000_000), client_id=_str(d, "client_id"), id=i
    ),
    "job.event": lambda d, i, n: JobEvent(
        job_id=_job_id(d),
        seq=_int(d, "seq", lo=1, hi=MAX_SEQ),
        event=_str(d, "event"),
        state=_str(d, "state"),
        at=_str(d, "at"),
        attempt=_int(d, "attempt", 0, lo=0, hi=MAX_ATTEMPT),
        miner_id=_opt_str(d, "miner_id"),
        data={k: v for k, v in d.items() if k not in _EVENT_KEYS},
    ),
}


def _replies(d: JSONObject, i: str | None, n: int) -> Ack | Error:
    if d["type"] == "ack":
        if i is None:
            raise _bad("id", "is required on ack")
        return Ack(id=i, fields={k: v for k, v in d.items() if k not in ("type", "id")})
    return Error(code=_str(d, "code"), message=_str(d, "message"), id=i, ref=_opt_str(d, "ref"))


for _table in (_SERVER_TO_MINER, _SERVER_TO_CLIENT):
    _table["ack"] = _replies
    _table["error"] = _replies


def _decode(data: bytes | str, table: dict[str, _Decoder], *, to_server: bool = True) -> Any:
    """``to_server``: a peer's frame, refused as input (``input_refusal``: what no store could
    keep). A frame from the server is not: it wraps what it took a few levels deeper (an
    ack's JobView holds the payload, and so does a receipt's metadata)."""
    obj = loads(data)
    refusal = input_refusal(data, obj) if to_server else None
    if refusal is not None:
        raise RemoteProtocolError(f"invalid frame: {refusal}")
    if not isinstance(obj, dict):
        raise RemoteProtocolError("frame is not a JSON object")
    msg_type = obj.get("type")
    if not isinstance(msg_type, str):
        raise RemoteProtocolError("frame has no string 'type'")
    raw_id = obj.get("id")
    if raw_id is not None and (not isinstance(raw_id, str) or len(raw_id) > MAX_ID_LENGTH):
        raise _bad("id", f"must be a string of at most {MAX_ID_LENGTH} characters")
    decoder = table.get(msg_type)
    if decoder is None:
        raise UnknownMessageType(msg_type[:64], raw_id)
    try:
        return decoder(obj, raw_id, len(data))
    except RemoteProtocolError:
        raise
    except (TypeError, ValueError, AttributeError) as exc:  # e.g. float() of a string
        raise RemoteProtocolError(f"invalid {msg_type} frame") from exc


def decode_miner_frame(data: bytes | str) -> MinerToServer:
    """Decode one frame sent by a miner."""
    msg: MinerToServer = _decode(data, _MINER)
    return msg


def decode_client_frame(data: bytes | str) -> ClientToServer:
    """Decode one frame sent by a client."""
    msg: ClientToServer = _decode(data, _CLIENT)
    return msg


def decode_server_to_miner(data: bytes | str) -> ServerToMiner:
    """Decode one frame the server sent to a miner (used by :mod:`protocol.client`)."""
    msg: ServerToMiner = _decode(data, _SERVER_TO_MINER, to_server=False)
    return msg


def decode_server_to_client(data: bytes | str) -> ServerToClient:
    """Decode one frame the server sent to a client."""
    msg: ServerToClient = _decode(data, _SERVER_TO_CLIENT, to_server=False)
    return msg


# ---- encoding -----------------------------------------------------------------------------

_TYPES: dict[type, str] = {
    Auth: "auth",
    Hello: "hello",
    ClientHello: "hello",
    JobAccept: "job.accept",
    JobReject: "job.reject",
    JobProgress: "job.progress",
    JobResult: "job.result",
    JobFail: "job.fail",
    Status: "status",
    Heartbeat: "heartbeat",
    Welcome: "welcome",
    ClientWelcome: "welcome",
    JobAssign: "job.assign",
    JobCancel: "job.cancel",
    JobCancelRequest: "job.cancel",
    JobSubmit: "job.submit",
    Subscribe: "subscribe",
    Unsubscribe: "unsubscribe",
}


def message_type(msg: object) -> str | None:
    """The ``type`` a protocol message is sent with (None: not a message of the contract)."""
    return _TYPES.get(type(msg))


def encode(msg: object) -> bytes:
    """Encode any protocol message to the bytes of one text frame.

    ``None`` fields are left out; ``Ack.fields`` and ``JobEvent.data`` are merged into the
    top-level object, as the contract shows them.
    """
    if isinstance(msg, Ack):
        return orjson.dumps({"type": "ack", "id": msg.id, **msg.fields})
    if isinstance(msg, Error):
        err: JSONObject = {"type": "error", "code": msg.code, "message": msg.message}
        if msg.id is not None:
            err["id"] = msg.id
        if msg.ref is not None:
            err["ref"] = msg.ref
        return orjson.dumps(err)
    if isinstance(msg, JobEvent):
        return encode_event(
            msg.job_id, msg.seq, msg.event, msg.state, msg.at, msg.attempt, msg.miner_id, msg.data
        )
    if isinstance(msg, Hello):
        return _encode_hello(msg)
    msg_type = _TYPES.get(type(msg))
    if msg_type is None:
        raise LocalProtocolError(f"not a protocol message: {type(msg).__name__}")
    out: JSONObject = {"type": msg_type}
    # Shallow on purpose: dataclasses.asdict would deep-copy every payload on the hot path.
    for name in _field_names(type(msg)):
        value = getattr(msg, name)
        if value is not None:
            out[name] = value
    return orjson.dumps(out)


def _encode_hello(msg: Hello) -> bytes:
    hello: JSONObject = {
        "type": "hello",
        "protocol": msg.protocol,
        "capabilities": msg.capabilities,
        "concurrency": msg.concurrency,
    }
    for k in ("miner_id", "region", "result_key", "id"):
        if getattr(msg, k) is not None:
            hello[k] = getattr(msg, k)
    if msg.resume_session is not None:
        hello["resume"] = {"session_id": msg.resume_session}
    return orjson.dumps(hello)


_FIELDS: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(f.name for f in fields(cls) if f.metadata.get("wire", True))
    return names


def encode_event(
    job_id: str,
    seq: int,
    event: str,
    state: str,
    at: str,
    attempt: int,
    miner_id: str | None,
    data: JSONObject,
) -> bytes:
    """Encode a ``job.event`` frame (hot path: no dataclass round trip)."""
    frame: JSONObject = {
        "type": "job.event",
        "job_id": job_id,
        "seq": seq,
        "event": event,
        "state": state,
        "at": at,
        "attempt": attempt,
        "miner_id": miner_id,
    }
    frame.update(data)
    return orjson.dumps(frame)


def encode_assign(
    job_id: str,
    attempt: int,
    payload: JSONObject,
    constraints: JSONObject,
    expires_at: str,
    accept_timeout: float,
) -> bytes:
    """``encode(JobAssign(...))`` without building the message (hot path: one per job)."""
    return orjson.dumps(
        {
            "type": "job.assign",
            "job_id": job_id,
            "attempt": attempt,
            "payload": payload,
            "constraints": constraints,
            "expires_at": expires_at,
            "accept_timeout": accept_timeout,
        }
    )


# What a job.assign frame holds besides its payload and constraints, at most (a 32-digit job
# id, MAX_ATTEMPT attempts, an accept timeout as long as a float is written), and the most bytes
# a value can take when written again per byte (or character) of the text it was read from:
# orjson writes 1e15 (4 characters) as 1000000000000000.0 (18).
_LONGEST_FLOAT = -2.2250738585072014e-308
_ASSIGN_OVERHEAD = (
    len(encode_assign("0" * 32, MAX_ATTEMPT, {}, {}, "2026-11-26T03:00:00.123Z", _LONGEST_FLOAT))
    - 4
)
_REWRITTEN_GROWTH = 5


def assign_fits(payload: JSONObject, constraints: JSONObject, limit: int, *, read: int) -> bool:
    """Whether every ``job.assign`` frame of a job fits in ``limit`` bytes. ``read``: the length
    of the frame or body its payload and constraints were read from (0: unknown); a job far
    below the limit is not encoded to find out."""
    if read and read * _REWRITTEN_GROWTH + _ASSIGN_OVERHEAD <= limit:
        return True
    return len(orjson.dumps(payload)) + len(orjson.dumps(constraints)) + _ASSIGN_OVERHEAD <= limit


__all__ += ["assign_fits", "encode_assign", "encode_event", "message_type"]
