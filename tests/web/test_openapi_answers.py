"""Answers the fuzzer (tests/web/test_openapi_fuzz.py) cannot reach conform to /openapi.json.

The fuzzer skips the long-poll routes, sends no NUL in a path, and never runs out of its rate
limit; here each of those answers is checked against the document the app serves: its status
is documented for the operation, and its body matches that status's schema.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import pytest
import schemathesis

from tests.conftest import ADMIN_KEY, CLIENT_KEY, MINER_KEY
from tests.web.rest_harness import Api, miner_headers, running_api
from tests.web.wallet_helpers import login
from web.http import EndpointRoute
from web.openapi import documented
from web.rest_miners import CONSTRAINT_DEFAULTS

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    import httpx

    from web.routing import CoordinatorApp

pytestmark = pytest.mark.anyio


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async with running_api(tmp_path) as a:
        yield a


async def conforms(api: Api, response: httpx.Response) -> None:
    """``response`` is an answer the app's /openapi.json documents, body included."""
    doc = (await api.http.get("/openapi.json")).json()
    app: CoordinatorApp = api.app
    hit = app.endpoint_for(response.request.method, response.request.url.path)
    assert hit is not None, response.request.url
    path, method = documented(hit[0].path), response.request.method
    operation = doc["paths"][path][method.lower()]
    assert str(response.status_code) in operation["responses"], (method, path, response.text)
    schemathesis.openapi.from_dict(doc)[path][method].validate_response(response)


async def test_a_polled_job_is_the_documented_assigned_job(api: Api) -> None:
    """A poll's 200 carries every Constraints key, nulls included (rest-api.md §2.3), and its
    attempt and expires_at: the published AssignedJob admits it (both poll routes)."""
    assert (await api.register("m1", concurrency=2)).status_code == 200
    for _ in range(2):
        await api.submit(constraints={"region": None, "data_classification": "internal"})
    answer = await api.poll("m1")
    assert answer.status_code == 200, answer.text
    assert answer.json()["constraints"]["gpu"] is None
    await conforms(api, answer)
    alias = await api.http.get(
        "/v1/miner/jobs", params={"max_wait_seconds": 1}, headers=miner_headers("m1")
    )
    assert alias.status_code == 200, alias.text
    await conforms(api, alias)
    doc = (await api.http.get("/openapi.json")).json()
    assigned = doc["components"]["schemas"]["AssignedJob"]
    assert {"attempt", "expires_at"} <= set(assigned["required"])
    assert set(assigned["properties"]["constraints"]["required"]) == set(CONSTRAINT_DEFAULTS)


_PARAM = re.compile(r"{[^}]+}")


async def test_a_nul_in_any_path_parameter_is_a_documented_422(api: Api) -> None:
    """Every route with a path parameter refuses a NUL in it with 422 (docs/rest-api.md,
    Errors), for a caller of its own role, and documents that 422."""
    doc = (await api.http.get("/openapi.json")).json()
    headers = [{"X-Api-Key": CLIENT_KEY}, {**miner_headers("m1")}, {"X-Api-Key": ADMIN_KEY}]
    assert (await api.register("m1")).status_code == 200
    checked = 0
    for path, item in doc["paths"].items():
        if not _PARAM.search(path):
            continue
        url = _PARAM.sub("%00", path)
        for method in item:
            statuses = []
            for h in headers:
                r = await api.http.request(method.upper(), url, headers=h)
                await conforms(api, r)
                statuses.append(r.status_code)
            assert 422 in statuses, (method, path, statuses)
            checked += 1
    assert checked > 20


async def test_an_unknown_query_parameter_on_a_list_is_a_documented_422(api: Api) -> None:
    """The lists refuse a query parameter they do not take (web.http ``strict_query``): each
    says so in its description and documents the 422, which conforms."""
    headers = [{"X-Api-Key": CLIENT_KEY}, {**miner_headers("m1")}, {"X-Api-Key": ADMIN_KEY}]
    assert (await api.register("m1")).status_code == 200
    doc = (await api.http.get("/openapi.json")).json()
    routes = [r for r in api.app.routes if isinstance(r, EndpointRoute)]
    strict = [(r.spec, r.path) for r in routes if r.spec.strict_query]
    assert len(strict) >= 8
    for endpoint, path in strict:
        operation = doc["paths"][documented(path)][endpoint.method.lower()]
        assert "not listed here, or one given twice, is a 422" in operation["description"]
        url = _PARAM.sub("m1", documented(path)) + "?no_such_filter=1"
        statuses = []
        for h in headers:
            r = await api.http.request(endpoint.method, url, headers=h)
            await conforms(api, r)
            statuses.append(r.status_code)
        assert 422 in statuses, (path, statuses)


async def test_a_rate_limited_public_read_is_documented(tmp_path: Path) -> None:
    """A public route read with a credential is limited per credential like any other: its
    429 is documented too."""
    async with running_api(tmp_path, rate_limit_per_minute=1) as api:
        answers: list[Any] = []
        for _ in range(2):
            r = await api.http.get("/v1/exchange/rates", headers={"X-Api-Key": MINER_KEY})
            answers.append(r.status_code)
            await conforms(api, r)
        assert answers == [200, 429]


async def test_miner_routes_do_not_offer_a_session_token(api: Api) -> None:
    """A wallet session is a client credential: on a miner route it is refused (403), so the
    miner operations list only the API key schemes (they listed SessionToken too)."""
    doc = (await api.http.get("/openapi.json")).json()
    profile = await login(api.http)
    r = await api.http.post(
        "/v1/miners/register",
        json={"capabilities": {}},
        headers={"X-Session-Token": profile["session_token"]},
    )
    assert r.status_code == 403, r.text
    await conforms(api, r)
    miner_ops = [
        op for item in doc["paths"].values() for op in item.values() if op["tags"] == ["miners"]
    ]
    assert len(miner_ops) > 10
    for op in miner_ops:
        assert op["security"] == [{"ApiKeyHeader": []}, {"Bearer": []}], op["operationId"]
    submit = doc["paths"]["/v1/jobs"]["post"]
    assert {"SessionToken": []} in submit["security"]


async def test_miner_routes_document_the_x_miner_id_header(api: Api) -> None:
    """Every miner route reads X-Miner-ID (the miner it acts as, else the key's id) and refuses
    one over 128 characters with 422, but the document named no such header: a client
    generated from it, or Swagger UI's "Try it out", could only ever act as the key's id."""
    doc = (await api.http.get("/openapi.json")).json()
    miner_ops = [
        op for item in doc["paths"].values() for op in item.values() if op["tags"] == ["miners"]
    ]
    assert len(miner_ops) > 10
    for op in miner_ops:
        [header] = [p for p in op["parameters"] if p["in"] == "header"]
        assert header["name"] == "X-Miner-ID", op["operationId"]
        assert header["required"] is False
        assert header["schema"] == {"type": "string", "maxLength": 128}
    r = await api.http.post(
        "/v1/miners/register",
        json={"capabilities": {}},
        headers={"X-Api-Key": MINER_KEY, "X-Miner-ID": "m" * 129},
    )
    assert r.status_code == 422, r.text
    await conforms(api, r)
    registered = await api.http.post(
        "/v1/miners/register",
        json={"capabilities": {}},
        headers={"X-Api-Key": MINER_KEY, "X-Miner-ID": "rack-2/gpu-1"},
    )
    assert registered.json()["miner_id"] == "rack-2/gpu-1"


async def test_metrics_documents_the_admin_credential_it_asks_for(api: Api) -> None:
    """/metrics needs an admin credential unless METRICS_PUBLIC=on, but its operation said
    ``security: []`` (no credential): Swagger UI's "Try it out" sent none after "Authorize"
    and got 401, and so did a client generated from the document. It lists the credential
    schemes, and no credential (``{}``) as an option, for METRICS_PUBLIC=on."""
    doc = (await api.http.get("/openapi.json")).json()
    security = doc["paths"]["/metrics"]["get"]["security"]
    assert {} in security
    schemes = doc["components"]["securitySchemes"]
    sent = {"ApiKeyHeader": "X-Api-Key", "Bearer": "Authorization", "SessionToken": None}
    assert [s for s in security if s] == [{name: []} for name in sent]
    for name, header in sent.items():
        assert name in schemes
        if header is None:
            continue
        value = ADMIN_KEY if header == "X-Api-Key" else f"Bearer {ADMIN_KEY}"
        r = await api.http.get("/metrics", headers={header: value})
        assert r.status_code == 200, (name, r.text)
    bare = await api.http.get("/metrics")
    assert bare.status_code == 401
    await conforms(api, bare)
