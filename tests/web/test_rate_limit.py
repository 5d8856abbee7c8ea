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


def test_many_keys_never_give_another_key_its_allowance_back() -> None:
    """Past 100,000 buckets the limiter dropped them all: as many keys (client addresses of
    public POSTs, wallet sessions) in a minute gave every other key, the abuser's own key
    included, its whole allowance again. Now buckets that have filled up again are dropped,
    and while none has, new keys share one overflow bucket: memory stays bounded and no key's
    count is lost."""
    from web.http import RateLimiter

    limiter = RateLimiter(per_minute=2)
    assert limiter.check("abuser", 0.0) is None
    assert limiter.check("abuser", 0.0) is None
    assert limiter.check("abuser", 0.0) is not None
    for n in range(100_100):
        limiter.check(f"ip:{n}", 1.0 + n / 1e6)
    assert limiter.check("abuser", 1.5) is not None  # still limited
    assert len(limiter._buckets) <= 100_001
    # A minute on, the buckets have filled up again: a new key gets one of its own.
    assert limiter.check("newcomer", 62.0) is None
    assert limiter.check("newcomer", 62.0) is None
    assert limiter.check("newcomer", 62.0) is not None
    assert len(limiter._buckets) <= 100_001
