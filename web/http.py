"""REST plumbing: the endpoint table type, auth, bodies, errors and rate limits.

Every REST route is an ``Endpoint``: the same object builds the Starlette route (with auth,
body-size limit, JSON parsing and schema validation in front of the handler) and its entry in
``/openapi.json``. Errors always leave as ``{"detail": …}``; nothing a client sends can turn
into a 500.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute

from dispatcher.errors import DispatchError, Unavailable
from protocol.codec import input_refusal
from storage.errors import StorageError
from web.errors import READ_FAILED, http_status_for
from web.schemas import SCHEMAS, ValidationFailed, validate

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.types import Receive, Scope, Send
    from starlette.websockets import WebSocket

    from web.app import Coordinator
    from web.auth import Principal, Role

__all__ = [
    "ALREADY_SENT",
    "RESPONDER",
    "Call",
    "Endpoint",
    "EndpointRoute",
    "HTTPError",
    "JSON",
    "JSONBytes",
    "Param",
    "Responder",
    "RateLimiter",
    "json_error",
    "json_response",
    "routes_for",
]

log = logging.getLogger("aitbc.coordinator")
JSON = Any


class _IdConvertor(Convertor[str]):
    """``{name:id}``: a path parameter that may contain "/" (a miner id may: "rack-2/gpu-1").

    Starlette's ``{name}`` stops at the first "/" (so did upstream's), and the server decodes
    "%2F" before routing, so such an id could not reach a route naming it, sent either way.
    Unlike ``{name:path}`` (``.*``) this matches line breaks too, as ``{name}`` does: a
    trailing "\n" stays in the id instead of being dropped before ``$``."""

    regex = r"[\s\S]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("id", _IdConvertor())


class HTTPError(Exception):
    def __init__(self, status: int, detail: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


_JSON_TYPE = (b"content-type", b"application/json")


class JSONBytes(Response):
    """``Response(orjson.dumps(data), media_type="application/json")`` with the raw headers
    Starlette would build for it written down directly (this is every REST answer)."""

    media_type = "application/json"

    def __init__(self, data: JSON, status: int = 200) -> None:
        self.status_code = status
        self.background = None
        self.body = body = orjson.dumps(data)
        if status < 200 or status in (204, 304):
            self.raw_headers = [_JSON_TYPE]
        else:
            self.raw_headers = [(b"content-length", b"%d" % len(body)), _JSON_TYPE]


def json_response(data: JSON, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    if headers:
        return Response(
            orjson.dumps(data), status_code=status, headers=headers, media_type="application/json"
        )
    return JSONBytes(data, status)


class Responder(Protocol):
    """A request's cycle that can write a plain response at once, from any task
    (web/lean_http.py's ``LeanCycle``)."""

    disconnected: bool  # the client has gone away

    def write(self, response: Response) -> bool:
        """Write ``response`` now; False, having done nothing, when it cannot (flow control,
        a response already started, the client gone): the handler returns it as usual."""

    def on_hangup(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once if the client goes away before the response is written
        (at once if it is gone already); the request's latest registration replaces any
        earlier one."""


# The scope key under which web/routing.py offers the request's ``Responder``.
RESPONDER = "aitbc.responder"


class _AlreadySent(Response):
    """What a handler returns once its ``Call.responder`` has written its response."""

    def __init__(self) -> None:
        super().__init__(status_code=200)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        return None


ALREADY_SENT: Response = _AlreadySent()


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    schema: dict[str, Any]
    description: str = ""
    where: str = "query"


def page_params(
    *, default: int, maximum: int = 500, clamp: bool = False, max_offset: int = 10**9
) -> tuple[Param, Param]:
    """The ``limit`` and ``offset`` query parameters of a paged list. ``clamp``: a larger
    ``limit`` is not refused, the handler reads it as ``maximum``. The database steps over
    ``offset`` rows: ``max_offset`` bounds what one request may cost."""
    limit: dict[str, Any] = {
        "type": "integer",
        "minimum": 1,
        "maximum": maximum,
        "default": default,
    }
    if clamp:
        del limit["maximum"]
    said = f"page size; above {maximum} it is read as {maximum} (the answer's limit says so)"
    return (
        Param("limit", limit, said if clamp else ""),
        Param("offset", {"type": "integer", "minimum": 0, "maximum": max_offset, "default": 0}),
    )


@dataclass(slots=True)
class Call:
    """What a handler receives: the request, the app core, the caller, the validated input."""

    request: Request
    core: Coordinator
    principal: Principal | None
    body: Any
    query: dict[str, Any]
    size: int = 0  # the body's length in bytes, as received

    def path(self, name: str) -> str:
        value = str(self.request.path_params[name])
        if "\x00" in value:
            raise HTTPError(422, f"path parameter {name} must not contain NUL")
        return value

    @property
    def responder(self) -> Responder | None:
        """What can write this request's response at once, from another task (a handler that
        used it returns ``ALREADY_SENT``); None when the server cannot (only web/lean_http.py
        can, for the requests it serves)."""
        responder: Responder | None = self.request.scope.get(RESPONDER)
        return responder

    @property
    def caller_id(self) -> str:
        assert self.principal is not None
        return self.principal.id


Handler = Callable[[Call], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class Endpoint:
    method: str
    paths: tuple[str, ...]
    handler: Handler
    summary: str
    tag: str
    role: Role | None = None
    body: str | None = None
    body_required: bool = True
    query: tuple[Param, ...] = ()
    responses: dict[int, tuple[str, str | None]] = field(default_factory=dict)
    description: str = ""
    any_role: bool = False  # a valid credential of any role (role must then be None)
    # A public route whose handler may ask for a credential itself (``/metrics``, an admin's
    # unless METRICS_PUBLIC=on): documented as taking one, or none.
    optional_auth: bool = False
    # A GET also answers HEAD (Starlette's default); False for a GET that changes state (the
    # seed doc's long-poll assigns a job), whose HEAD would drop the answer naming what changed.
    head: bool = True
    # Served by a standby too (``_wrap`` answers 503 for every other route while it waits).
    standby: bool = False
    # A list whose query parameters filter it: one it does not declare (a typo, another API's
    # filter name), or one given twice, is a 422 rather than ignored, which answered every
    # item as if it had matched.
    strict_query: bool = False


class RateLimiter:
    """Per-credential token buckets (``RATE_LIMIT_PER_MINUTE``; 0 turns it off).

    At most ``max_buckets`` are kept. Past that, the buckets that have filled up again are
    dropped (one is as good as none); while every bucket is still in use, a key without one
    draws on a shared overflow bucket. All of them used to be dropped at once: 100,000 keys
    (client addresses of public POSTs, wallet sessions) gave every other key its whole
    allowance back, the abuser's own included.
    """

    OVERFLOW = "\x00overflow"  # no credential hash or client address looks like it

    def __init__(self, per_minute: int, max_buckets: int = 100_000) -> None:
        self.per_minute = per_minute
        self.max_buckets = max_buckets
        self._buckets: dict[str, tuple[float, float]] = {}
        self._next_sweep = -math.inf

    def check(self, key: str, now: float) -> float | None:
        """None when allowed; otherwise the seconds to wait."""
        if self.per_minute <= 0:
            return None
        buckets = self._buckets
        if key not in buckets and len(buckets) >= self.max_buckets:
            if now >= self._next_sweep:  # a sweep walks every bucket: once a second at most
                self._next_sweep = now + 1.0
                buckets = self._drop_full(now)
            if len(buckets) >= self.max_buckets:
                key = self.OVERFLOW
        rate = self.per_minute / 60.0
        tokens, last = buckets.get(key, (float(self.per_minute), now))
        tokens = min(float(self.per_minute), tokens + (now - last) * rate)
        if tokens < 1.0:
            buckets[key] = (tokens, now)
            return (1.0 - tokens) / rate
        buckets[key] = (tokens - 1.0, now)
        return None

    def _drop_full(self, now: float) -> dict[str, tuple[float, float]]:
        """Drop the buckets that have filled up again since their last use."""
        rate, full = self.per_minute / 60.0, float(self.per_minute)
        self._buckets = {
            key: (tokens, last)
            for key, (tokens, last) in self._buckets.items()
            if tokens + (now - last) * rate < full
        }
        return self._buckets


def _authorize(
    core: Coordinator, request: Request, role: Role | None, any_role: bool = False
) -> Principal | None:
    token = core.auth.token_from_headers(request.headers)
    if role is None and not any_role:
        return None if token is None else core.auth.from_token(token)
    if token is None:
        raise HTTPError(401, "Authentication required", {"WWW-Authenticate": "Bearer"})
    principal = core.auth.from_token(token)
    if principal is None:
        detail = core.auth.unknown_detail(request.headers)
        raise HTTPError(401, detail, {"WWW-Authenticate": "Bearer"})
    if role is not None and not principal.acts_as(role):
        raise HTTPError(403, "Forbidden")
    return principal


async def _read_body(request: Request, limit: int) -> bytes:
    """The whole body (what ``request.stream()`` yields, read off ``receive`` directly)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"request body is larger than {limit} bytes")
    receive = request.receive
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, f"request body is larger than {limit} bytes")
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect()
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _plain(pattern: str, convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """``convert`` of text written as ``pattern`` (ASCII) says, else ValueError: Python's
    ``int``/``float`` also read "1_0" (10), digits of other scripts and surrounding spaces."""
    written = re.compile(pattern, re.ASCII)

    def read(text: str) -> Any:
        if not written.fullmatch(text):
            raise ValueError(text)
        return convert(text)

    return read


# Query parameters are text: these schema types are converted before they are validated.
_QUERY_NUMBERS: dict[str, tuple[Callable[[str], Any], str]] = {
    "integer": (_plain(r"-?[0-9]+", int), "an integer"),
    "number": (
        _plain(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?", float),
        "a finite number",
    ),
}


def _check_query_names(params: tuple[Param, ...], request: Request) -> None:
    """Every query parameter is one of ``params``, given once (``Endpoint.strict_query``)."""
    names = [p.name for p in params if p.where == "query"]
    seen: dict[str, int] = {}
    for name, _ in request.query_params.multi_items():
        if name not in names:
            takes = f"this route takes {', '.join(names)}" if names else "this route takes none"
            shown = name if len(name) <= 64 and name.isprintable() else repr(name[:64])
            raise ValidationFailed(f"unknown query parameter {shown}; {takes}")
        seen[name] = seen.get(name, 0) + 1
    for name, n in seen.items():
        if n > 1:
            raise ValidationFailed(f"query parameter {name} is given {n} times (once at most)")


def _coerce_query(
    params: tuple[Param, ...], request: Request, strict: bool = False
) -> dict[str, Any]:
    if strict:
        _check_query_names(params, request)
    out: dict[str, Any] = {}
    for p in params:
        raw = request.query_params.get(p.name)
        if raw is None or raw == "":
            if "default" in p.schema:
                out[p.name] = p.schema["default"]
            continue
        if "\x00" in raw:
            raise ValidationFailed(f"query parameter {p.name} must not contain NUL")
        value: Any = raw
        kind = p.schema.get("type")
        if kind in _QUERY_NUMBERS:
            convert, said = _QUERY_NUMBERS[kind]
            try:
                value = convert(raw)
            except ValueError:
                raise ValidationFailed(f"query parameter {p.name} must be {said}") from None
            if (isinstance(value, float) and not math.isfinite(value)) or (
                isinstance(value, int) and not -(2**63) <= value < 2**63
            ):  # beyond what a float holds exactly or a store's integer column: never a 500
                raise ValidationFailed(f"query parameter {p.name} must be {said}")
        validate(p.schema, value, f"query parameter {p.name}")
        out[p.name] = value
    return out


def _rate_limit(
    limiter: RateLimiter, request: Request, principal: Principal | None, post: bool, suffix: str
) -> None:
    """Per credential; public POSTs (wallet nonce/login/register) per client address."""
    who = principal.key_hash if principal is not None else None
    if who is None and post and request.client is not None:
        who = f"ip:{request.client.host}"
    if who is not None:
        wait = limiter.check(who + suffix, time.monotonic())
        if wait is not None:
            raise HTTPError(
                429, "Rate limit exceeded", {"Retry-After": str(max(1, math.ceil(wait)))}
            )


STANDBY_DETAIL = "standby: another coordinator holds the database; try again shortly"


def json_error(raw: bytes, exc: ValueError) -> str:
    """Why orjson could not read ``raw``: the parser's reason and place ("trailing comma is not
    allowed: line 1 column 15 (char 14)"; a number beyond a double, 1e400, is valid JSON it
    cannot read), never quoting the input. On bytes that are not UTF-8 (a Latin-1 "café") it
    says "str is not valid UTF-8: surrogates not allowed" at char 0, wherever they are: the
    byte and its offset instead."""
    try:
        raw.decode()
    except UnicodeDecodeError as bad:
        return f"it is not UTF-8: byte 0x{raw[bad.start]:02x} at offset {bad.start}"
    return str(exc)


def _parsed_body(raw: bytes, schema: Any, required: bool) -> Any:
    """The request body ``raw`` as JSON checked against ``schema`` (None: not read as JSON);
    None when there is none and none is required."""
    if schema is None:
        return None
    if not raw or raw.isspace():
        if required:
            raise HTTPError(422, "request body is required (a JSON object)")
        return None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        why = json_error(raw, exc)
        raise HTTPError(422, f"request body cannot be read as JSON: {why}") from None
    refusal = input_refusal(raw, body)
    if refusal is not None:
        raise HTTPError(422, f"request body: {refusal}")
    validate(schema, body)
    return body


def _wrap(endpoint: Endpoint) -> Callable[[Request], Awaitable[Response]]:
    role, any_role, handler = endpoint.role, endpoint.any_role, endpoint.handler
    reads_body = endpoint.body is not None or endpoint.method in ("POST", "PUT", "PATCH")
    schema = None if endpoint.body is None else SCHEMAS[endpoint.body]
    public_post = endpoint.method == "POST"
    rate_suffix = f":{endpoint.tag}"
    refused_on_standby = not endpoint.standby
    strict_query = endpoint.strict_query
    reads_query = bool(endpoint.query) or strict_query

    async def run(request: Request) -> Response:
        core: Coordinator = request.app.state.core
        if core.standby and refused_on_standby:
            return json_response({"detail": STANDBY_DETAIL}, 503, {"Retry-After": "1"})
        try:
            principal = _authorize(core, request, role, any_role)
            body: Any = None
            raw = b""
            if reads_body:
                raw = await _read_body(request, core.settings.max_body_bytes)
                body = _parsed_body(raw, schema, endpoint.body_required)
            query = _coerce_query(endpoint.query, request, strict_query) if reads_query else {}
            if core.rate_limiter.per_minute > 0:
                _rate_limit(core.rate_limiter, request, principal, public_post, rate_suffix)
            return await handler(Call(request, core, principal, body, query, len(raw)))
        except ValidationFailed as exc:
            return json_response({"detail": exc.message}, 422)
        except HTTPError as exc:
            return json_response({"detail": exc.detail}, exc.status, exc.headers)
        except DispatchError as exc:
            if not isinstance(exc, Unavailable):
                try:
                    await core.dispatcher.before_refusal()
                except Unavailable as gone:  # the refusal's state may never be durable
                    exc = gone
            retry = {"Retry-After": "1"} if isinstance(exc, Unavailable) else None
            return json_response({"detail": str(exc)}, http_status_for(exc), retry)
        except ClientDisconnect:
            return ALREADY_SENT  # gone before its body ended: nobody to answer
        except StorageError as exc:  # a read failed (a dropped connection, a server restart)
            path = request.url.path
            log.warning("%s %s: the database could not be read: %s", request.method, path, exc)
            return json_response({"detail": READ_FAILED}, 503, {"Retry-After": "1"})

    return run


class EndpointRoute(Route):
    """The route of one path of an ``Endpoint`` (web/routing.py routes these itself)."""

    def __init__(self, path: str, endpoint: Endpoint, handler: Callable[[Request], Any]) -> None:
        super().__init__(path, handler, methods=[endpoint.method])
        if not endpoint.head and self.methods is not None:
            self.methods.discard("HEAD")  # 405, as for any other method it does not serve
        self.spec = endpoint


def routes_for(endpoints: list[Endpoint]) -> list[Route]:
    routes: list[Route] = []
    for endpoint in endpoints:
        handler = _wrap(endpoint)
        for path in endpoint.paths:
            routes.append(EndpointRoute(path, endpoint, handler))
    return routes


async def http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 as JSON."""
    assert isinstance(exc, HTTPException)
    return json_response({"detail": exc.detail}, exc.status_code, dict(exc.headers or {}))


async def unknown_socket(websocket: WebSocket) -> None:
    """A WebSocket upgrade at a path with no socket: 404 naming the socket paths (Starlette
    closes before accepting, which uvicorn answers 403, read as a credential problem)."""
    sockets = [
        r.path
        for r in websocket.app.routes
        if isinstance(r, WebSocketRoute) and r.endpoint is not unknown_socket
    ]
    detail = f"no socket at {websocket.url.path}; the sockets are {', '.join(sockets)}"
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(json_response({"detail": detail}, 404))
    else:
        await websocket.close()


async def internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return json_response({"detail": "internal server error"}, 500)


__all__ += ["http_exception", "internal_error", "unknown_socket"]
