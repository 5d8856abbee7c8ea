"""``/ops``: the live ops page, static HTML/CSS/JS modules from ``web/static/ops`` (no build step).

The page loads nothing from elsewhere (no CDN, no web fonts) and talks only to ``/v1/admin/ws``
and the admin REST routes, with the admin key the operator types in (kept in sessionStorage).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from starlette.responses import FileResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.routing import BaseRoute

__all__ = ["ASSETS", "STATIC_DIR", "ops_routes"]

STATIC_DIR = Path(__file__).resolve().parent / "static" / "ops"
ASSETS = "/ops/assets"
CSP = (
    "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
    "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)


async def page(request: Request) -> FileResponse:
    return FileResponse(
        STATIC_DIR / "index.html",
        media_type="text/html",
        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"},
    )


def ops_routes() -> list[BaseRoute]:
    return [
        Route("/ops", page, methods=["GET"]),
        Mount(ASSETS, StaticFiles(directory=STATIC_DIR), name="ops-assets"),
    ]
