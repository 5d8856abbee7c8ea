"""``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), served offline.

The JavaScript and CSS come from the ``drf-spectacular-sidecar`` wheel on PyPI, which vendors
the upstream ``swagger-ui-dist`` (5.x, needed for OpenAPI 3.1) and ``redoc.standalone.js``
builds as plain static files. Only the files are used: the package's ``__init__`` (which imports
Django) is never imported, we locate the package directory with ``find_spec``. The HTML pages
reference nothing but these local assets and ``/openapi.json``: no CDN, no web fonts (and
``/redoc``'s policy keeps the bundle's own CDN logo out, ``REDOC_CSP``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.responses import HTMLResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.routing import BaseRoute

__all__ = ["ASSETS_PACKAGE", "STATIC_PREFIX", "asset_dir", "docs_routes"]

ASSETS_PACKAGE = "drf_spectacular_sidecar"
STATIC_PREFIX = "/docs/static"
OPENAPI_URL = "/openapi.json"
# ReDoc's footer draws Redocly's logo from https://cdn.redoc.ly (in the bundle, with no option to
# turn it off): each view of /redoc was a request to a third party, and a failed one offline.
# Images from here only; the logo's error handler then drops it.
REDOC_CSP = "img-src 'self' data:"


def asset_dir() -> Path:
    """``…/drf_spectacular_sidecar/static/drf_spectacular_sidecar`` without importing it."""
    spec = importlib.util.find_spec(ASSETS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the {ASSETS_PACKAGE} package (Swagger UI/ReDoc assets) is missing")
    return Path(next(iter(spec.submodule_search_locations))) / "static" / ASSETS_PACKAGE


_SWAGGER_HTML = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>{title} - Swagger UI</title>
  <link rel="stylesheet" href="{static}/swagger-ui/swagger-ui.css">
  <link rel="icon" type="image/png" href="{static}/swagger-ui/favicon-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{static}/swagger-ui/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({{
      url: "{openapi}",
      dom_id: "#swagger-ui",
      deepLinking: true,
      validatorUrl: null,
      persistAuthorization: true,
      presets: [SwaggerUIBundle.presets.apis],
      layout: "BaseLayout"
    }});
  </script>
</body>
</html>
"""

_REDOC_HTML = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>{title} - ReDoc</title>
  <link rel="icon" type="image/png" href="{static}/swagger-ui/favicon-32x32.png">
  <style>body {{ margin: 0; padding: 0; }}</style>
</head>
<body>
  <redoc spec-url="{openapi}"></redoc>
  <script src="{static}/redoc/redoc.standalone.js"></script>
</body>
</html>
"""


def docs_routes(title: str) -> list[BaseRoute]:
    """GET /docs, GET /redoc and the static assets they load (under ``/docs/static``)."""
    root = asset_dir()
    swagger = _SWAGGER_HTML.format(title=title, static=STATIC_PREFIX, openapi=OPENAPI_URL)
    redoc = _REDOC_HTML.format(title=title, static=STATIC_PREFIX, openapi=OPENAPI_URL)

    async def swagger_ui(request: Request) -> HTMLResponse:
        return HTMLResponse(swagger)

    async def redoc_ui(request: Request) -> HTMLResponse:
        return HTMLResponse(redoc, headers={"Content-Security-Policy": REDOC_CSP})

    return [
        Route("/docs", swagger_ui, methods=["GET"]),
        Route("/redoc", redoc_ui, methods=["GET"]),
        Mount(
            f"{STATIC_PREFIX}/swagger-ui",
            app=StaticFiles(directory=root / "swagger-ui-dist"),
            name="swagger-ui-assets",
        ),
        Mount(
            f"{STATIC_PREFIX}/redoc",
            app=StaticFiles(directory=root / "redoc" / "bundles"),
            name="redoc-assets",
        ),
    ]
