"""/docs (Swagger UI) and /redoc (ReDoc) work offline: every asset is served by the app."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import pytest

from tests.web.rest_harness import Api, running_api

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

pytestmark = pytest.mark.anyio

_SRC = re.compile(r"<script[^>]*\ssrc=\"([^\"]+)\"")
_HREF = re.compile(r"<link[^>]*\shref=\"([^\"]+)\"")
_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async with running_api(tmp_path) as a:
        yield a


@pytest.mark.parametrize(
    ("page", "needs"),
    [
        ("/docs", ("swagger-ui-bundle.js", "swagger-ui.css", "SwaggerUIBundle(")),
        ("/redoc", ("redoc.standalone.js", "<redoc spec-url=")),
    ],
)
async def test_doc_pages_load_only_local_assets(api: Api, page: str, needs: tuple[str]) -> None:
    """200 HTML; every <script src>/<link href> is a local path served 200 with its type."""
    r = await api.http.get(page)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "http://" not in html
    assert "https://" not in html
    assert "/openapi.json" in html
    for needle in needs:
        assert needle in html
    assets = _SRC.findall(html) + _HREF.findall(html)
    assert len(assets) >= 2
    for url in assets:
        assert url.startswith("/"), url
        assert not url.startswith("//"), url
        asset = await api.http.get(url)
        assert asset.status_code == 200, url
        expected = _TYPES[url[url.rfind(".") :]]
        assert expected in asset.headers["content-type"], (url, asset.headers["content-type"])
        assert len(asset.content) > 100, url


async def test_doc_pages_are_in_openapi(api: Api) -> None:
    doc = (await api.http.get("/openapi.json")).json()
    for page in ("/docs", "/redoc"):
        op = doc["paths"][page]["get"]
        assert op["security"] == []
        assert "text/html" in op["responses"]["200"]["content"]


async def test_unknown_asset_is_a_json_404(api: Api) -> None:
    r = await api.http.get("/docs/static/swagger-ui/nope.js")
    assert r.status_code == 404
    assert r.json() == {"detail": "Not Found"}
