"""Schemathesis against /openapi.json, in-process over ASGI: no 5xx, responses match the schema.

Every documented operation is fuzzed once per role key (client, miner, admin): a key of the
wrong role must still get a documented status (401/403/…) with a documented body. Checks: no
server error, status code documented, content type documented, body matches its schema.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings, strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import ADMIN_KEY, CLIENT_KEY, MINER_KEY, make_settings
from web import rest_admin, rest_jobs, rest_miners
from web.app import VERSION, create_app
from web.openapi import openapi_document

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from schemathesis.schemas import BaseSchema


@pytest.fixture
def app_schema(tmp_path: Path) -> Iterator[BaseSchema]:
    """A fresh app per test: schemathesis' pytest plugin ends every ASGI lifespan it started at
    each test's teardown, and a coordinator's lifespan runs once (like under uvicorn)."""
    app = create_app(make_settings(tmp_path))
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    # Schemathesis runs the app's lifespan on its own event-loop thread: end it (closes the DB).
    shutdown_lifespans()


# Long-poll routes hold the request up to max_wait_seconds (schema max 3600, capped by the
# server) when no job is queued: fuzzing them would only measure timeouts. Their contract is
# covered by tests/web/test_rest_miners.py.
LONG_POLL = ["/v1/miners/poll", "/v1/miner/jobs"]

# The operations, read from the same document the app serves (pure: no app needed to list them).
OPERATIONS = sorted(
    (path, method.upper())
    for path, item in openapi_document(
        rest_jobs.ENDPOINTS + rest_miners.ENDPOINTS + rest_admin.ENDPOINTS, VERSION
    )["paths"].items()
    for method in item
    if path not in LONG_POLL
)
ROLES = {"client": CLIENT_KEY, "miner": MINER_KEY, "admin": ADMIN_KEY}

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.mark.parametrize("role", sorted(ROLES))
@pytest.mark.parametrize(("path", "method"), OPERATIONS, ids=[f"{m} {p}" for p, m in OPERATIONS])
def test_operation_conforms_to_schema(
    app_schema: BaseSchema, path: str, method: str, role: str
) -> None:
    headers = {"X-Api-Key": ROLES[role], "X-Miner-ID": f"fuzz-{role}"}

    operation = app_schema[path][method]
    # Valid and invalid inputs (the latter must be refused with a documented 4xx, never a 5xx).
    cases = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    )

    @given(case=cases)
    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
    def fuzz(case: schemathesis.Case) -> None:
        case.call_and_validate(headers=headers, checks=CHECKS)

    fuzz()
