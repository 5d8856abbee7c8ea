"""RATE_LIMIT_PER_MINUTE: per key and route group; 429 with Retry-After; other keys unaffected."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.conftest import CLIENT_KEY, CLIENT_KEY_2
from tests.web.rest_harness import running_api

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.anyio


async def test_third_quick_request_is_rate_limited(tmp_path: Path) -> None:
    async with running_api(tmp_path, rate_limit_per_minute=2) as api:
        assert api.core.settings.rate_limit_per_minute == 2
        h1 = {"X-Api-Key": CLIENT_KEY}
        h2 = {"X-Api-Key": CLIENT_KEY_2}
        for _ in range(2):
            assert (await api.http.get("/v1/jobs", headers=h1)).status_code == 200
        r = await api.http.get("/v1/jobs", headers=h1)
        assert r.status_code == 429
        assert r.json() == {"detail": "Rate limit exceeded"}
        retry_after = r.headers["Retry-After"]
        assert retry_after.isdigit(), retry_after
        assert int(retry_after) >= 1
        # The same group (tag "jobs") through another route of it is limited too ...
        assert (
            await api.http.post("/v1/jobs", json={"payload": {}}, headers=h1)
        ).status_code == 429
        # ... while another key is not affected.
        for _ in range(2):
            assert (await api.http.get("/v1/jobs", headers=h2)).status_code == 200
        assert (await api.http.get("/v1/jobs", headers=h2)).status_code == 429


async def test_rate_limit_off_by_default(tmp_path: Path) -> None:
    async with running_api(tmp_path) as api:
        for _ in range(5):
            r = await api.http.get("/v1/jobs", headers={"X-Api-Key": CLIENT_KEY})
            assert r.status_code == 200
