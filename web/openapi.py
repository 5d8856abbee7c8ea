"""``/openapi.json`` (OpenAPI 3.1), generated from the ``Endpoint`` tables and ``SCHEMAS``.

Nothing here is written by hand per route: a route that exists is documented, with the same
schemas that validate its input.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from web.auth import Role
from web.http import json_response
from web.schemas import SCHEMAS

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from web.http import Endpoint

__all__ = ["TAGS", "documented", "openapi_document", "openapi_endpoint"]

TAGS = [
    {"name": "jobs", "description": "Client job routes (docs/rest-api.md); socket: /v1/jobs/ws"},
    {"name": "receipts", "description": "Signed receipts of a job (docs/receipts.md)"},
    {"name": "miners", "description": "Polling miners (docs/rest-api.md); socket: /v1/miners/ws"},
    {"name": "admin", "description": "Admin key only (docs/rest-api.md, docs/ops.md)"},
    {"name": "explorer", "description": "Public, privacy-reduced views (docs/rest-api.md)"},
    {"name": "users", "description": "Wallet login, sessions, balances (docs/wallet.md)"},
    {"name": "exchange", "description": "Buy AITBC credit with BTC (docs/wallet.md)"},
    {"name": "health", "description": "Liveness and readiness, no auth"},
    {"name": "ops", "description": "Ops page and Prometheus metrics (docs/ops.md)"},
    {"name": "docs", "description": "This document and its HTML viewers (offline assets), no auth"},
]

# A parameter with a convertor (``{miner_id:id}``: a miner id may contain "/", web/http.py) is
# documented as a plain one: the server decodes "%2F" before routing, so "/" arrives either way.
_PATH_PARAM = re.compile(r"{([^}:]+)(?::[^}]*)?}")
_TEXT = {"type": "string"}
_WITH_SLASH = "may contain '/' (sent as is or as %2F)"
# Job ids are the coordinator's own (32 hex digits): a literal path beside a ``{job_id}`` one,
# such as /v1/jobs/history, is never a job id.
_PATH_SCHEMAS = {"job_id": SCHEMAS["JobView"]["properties"]["job_id"]}

_MINER_ID_HEADER = {
    "name": "X-Miner-ID",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "maxLength": 128},
    "description": "the miner id to act as (UTF-8, no control characters; 422 otherwise), "
    "bound to the first key that uses it (403 for another); without it, "
    "miner-<sha256(key)[:12]>",
}

_HEALTH: dict[str, dict[str, Any]] = {
    "/health": {"summary": "Health", "description": "Non-empty JSON object with status ok"},
    "/health/live": {"summary": "Liveness"},
    "/health/ready": {"summary": "Readiness (503 until the dispatcher serves)"},
}

_JSON_OK = {
    "200": {
        "description": "JSON object",
        "content": {"application/json": {"schema": {"type": "object"}}},
    }
}
_HTML_OK = {
    "200": {"description": "HTML page", "content": {"text/html": {"schema": {"type": "string"}}}}
}

# Public GET routes outside the Endpoint tables: path -> (summary, tag, responses).
_PUBLIC: dict[str, tuple[str, str, dict[str, Any]]] = {
    "/openapi.json": ("This document", "docs", _JSON_OK),
    "/docs": ("Swagger UI for this document (assets served locally)", "docs", _HTML_OK),
    "/redoc": ("ReDoc for this document (assets served locally)", "docs", _HTML_OK),
    "/ops": ("The live ops page (sign in with an admin key; docs/ops.md)", "ops", _HTML_OK),
}


# Who may call an authenticated route: an API key, or a wallet session (a client, and an admin
# when its wallet is listed); a miner only with its key (a session there is 403).
_KEYS: list[dict[str, list[str]]] = [{"ApiKeyHeader": []}, {"Bearer": []}]
_CREDENTIALS = [*_KEYS, {"SessionToken": []}]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref("Error")}}}


def _path_params(path: str) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = []
    for m in _PATH_PARAM.finditer(path):
        name = m.group(1)
        schema = _PATH_SCHEMAS.get(name, _TEXT)
        param = {"name": name, "in": "path", "required": True, "schema": schema}
        if m.group().endswith(":id}"):
            param["description"] = _WITH_SLASH
        params.append(param)
    return params


def _operation(endpoint: Endpoint, path: str) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": f"{endpoint.method.lower()}_{_slug(documented(path))}",
        "summary": endpoint.summary,
        "tags": [endpoint.tag],
    }
    if endpoint.description:
        op["description"] = endpoint.description
    if path != endpoint.paths[0]:
        op["description"] = (
            f"Alias of {endpoint.method} {documented(endpoint.paths[0])}. "
            + op.get("description", "")
        ).strip()
    if endpoint.strict_query:  # web.http._check_query_names
        op["description"] = (
            op.get("description", "") + " A query parameter not listed here, or one given "
            "twice, is a 422 naming it (not ignored)."
        ).strip()
    params = _path_params(path)
    for p in endpoint.query:
        param: dict[str, Any] = {"name": p.name, "in": p.where, "schema": p.schema}
        if p.description:
            param["description"] = p.description
        params.append(param)
    if endpoint.role is Role.MINER:  # read by every miner route (web.rest_miners.miner_id_for)
        params.append(_MINER_ID_HEADER)
    if params:
        op["parameters"] = params
    if endpoint.body is not None:
        op["requestBody"] = {
            "required": endpoint.body_required,
            "content": {"application/json": {"schema": _ref(endpoint.body)}},
        }
    authed = endpoint.role is not None or endpoint.any_role
    op["security"] = [] if not authed else _KEYS if endpoint.role is Role.MINER else _CREDENTIALS
    if endpoint.optional_auth:  # ``{}``: no credential is an option too
        op["security"] = [{}, *_CREDENTIALS]
    op["responses"] = _responses(endpoint, bool(_PATH_PARAM.search(path)))
    return op


def _responses(endpoint: Endpoint, path_params: bool) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, (description, schema) in sorted(endpoint.responses.items()):
        entry: dict[str, Any] = {"description": description}
        if schema is not None:
            entry["content"] = {"application/json": {"schema": _ref(schema)}}
        responses[str(status)] = entry
    # What web.http._wrap can answer for any route before the handler runs: keep in step.
    reads_body = endpoint.body is not None or endpoint.method in ("POST", "PUT", "PATCH")
    if reads_body:
        responses.setdefault("413", _error("request body too large"))
    if (
        endpoint.body is not None
        or endpoint.query
        or endpoint.strict_query
        or endpoint.role is Role.MINER
        or path_params
    ):
        # invalid body/query, a NUL in a path parameter (``Call.path``); miner routes also
        # refuse an X-Miner-ID over 128 characters or with a control character
        responses.setdefault("422", _error("invalid request"))
    # Per credential, sent to a public route too; public POSTs also per client address.
    responses.setdefault("429", {"description": "rate limited (Retry-After)"})
    # A standby waiting for the database, a coordinator whose commit failed or that is
    # stopping, or a database read that failed: each with Retry-After.
    if not endpoint.standby:
        responses.setdefault(
            "503",
            _error("unavailable: a standby, the coordinator is stopping, or a read failed (retry)"),
        )
    return responses


def documented(path: str) -> str:
    """A route's path as OpenAPI writes it: ``{name}`` without a Starlette convertor."""
    return _PATH_PARAM.sub(r"{\1}", path)


def _slug(path: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", path.lower()).strip("_")


def openapi_document(endpoints: list[Endpoint], version: str) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for path, info in _HEALTH.items():
        paths[path] = {
            "get": {
                **info,
                "operationId": f"get_{_slug(path)}",
                "tags": ["health"],
                "security": [],
                "responses": {"200": {"description": "JSON object"}},
            }
        }
    paths["/health/ready"]["get"]["responses"]["503"] = {
        "description": "not ready: starting, a standby waiting for the database "
        '("status": "standby"), shutting down, the dispatcher failed, or a commit under way '
        'for over 10 s ("database": "commit stalled", "commit_seconds")'
    }
    for path, (summary, tag, responses) in _PUBLIC.items():
        paths[path] = {
            "get": {
                "summary": summary,
                "operationId": f"get_{_slug(path)}",
                "tags": [tag],
                "security": [],
                "responses": responses,
            }
        }
    for endpoint in endpoints:
        for path in endpoint.paths:
            op = _operation(endpoint, path)
            paths.setdefault(documented(path), {})[endpoint.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "AITBC Coordinator",
            "version": version,
            "description": "REST compatibility layer (docs/rest-api.md). Realtime clients and "
            "miners use the WebSocket protocol (docs/protocol.md).",
        },
        "tags": TAGS,
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-Api-Key"},
                "Bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an API key or a wallet session token, as "
                    "Authorization: Bearer <token>",
                },
                "SessionToken": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-Session-Token",
                    "description": "a wallet session token from POST /v1/login (a client)",
                },
            },
        },
    }


def openapi_endpoint(document: dict[str, Any]) -> Any:
    async def serve(request: Request) -> Response:
        return json_response(document)

    return serve
