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
    import os

    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import BaseRoute
    from starlette.types import Scope

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


class _Assets(StaticFiles):
    """The page's modules and styles, revalidated at each load (a 304 while unchanged): without
    a ``Cache-Control`` a browser may reuse them unasked for a tenth of their age, so after an
    upgrade the new page could run with the old scripts."""

    def file_response(
        self,
        full_path: os.PathLike[str] | str,
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers["Cache-Control"] = "no-cache"
        return response


def ops_routes() -> list[BaseRoute]:
    return [
        Route("/ops", page, methods=["GET"]),
        Mount(ASSETS, _Assets(directory=STATIC_DIR), name="ops-assets"),
    ]
