"""The app class: endpoint-table requests skip Starlette's middleware stack and route scan.

Starlette sends every HTTP request through ``ServerErrorMiddleware``, ``ExceptionMiddleware``
(each wrapping ``send``), a router that tries each of ~60 routes' regex in order, and
``request_response``'s exception wrapper before our endpoint wrapper (web/http.py) runs;
profiled under ``bench.rest`` that was a tenth of the server's CPU. ``CoordinatorApp`` finds
the route of an ``EndpointRoute`` itself and calls its endpoint directly, with the same
outcome as Starlette's own routing:

- the route is the one Starlette would pick: the first route (in order) that fully matches
  path and method. A path that equals a parameterless route's path is resolved once, by
  Starlette's own ``route.matches``, and cached; any other path is matched against the routes
  with parameters and the mounts, in order (a literal-prefix check before each regex);
- anything else — no full match (404, 405, trailing-slash redirects), a non-endpoint route
  (health, docs, ops page), a mount, a ``root_path``, an app with user middleware, debug mode
  or a body limit — goes through Starlette unchanged (but for one thing, ``SlashRouter``: a
  trailing slash is redirected before another method's route answers 405);
- the scope gets what Starlette's router adds (``app``, ``router``, ``route``, ``endpoint``,
  ``path_params``); an exception the endpoint raises goes through Starlette's own
  ``ExceptionMiddleware`` and ``ServerErrorMiddleware`` (built once, around an app that
  re-raises it), so the app's handlers answer as usual. An exception while the response is
  being sent is left to the server, as Starlette leaves one after the response started.

Tests drive this class directly (``create_app`` returns it), so both paths are exercised;
tests/web/test_routing.py compares them request by request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette._utils import get_route_path
from starlette.applications import Starlette
from starlette.datastructures import URL
from starlette.exceptions import HTTPException
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import RedirectResponse
from starlette.routing import BaseRoute, Match, Route, Router, WebSocketRoute

from web.http import RESPONDER, EndpointRoute

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

    from web.http import Responder

__all__ = ["CoordinatorApp", "FastRouter", "SlashRouter"]

_FALLBACK = None  # a lookup result: let Starlette handle the request
_ERROR = "aitbc.endpoint_error"
_ORDER = {m: i for i, m in enumerate(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"))}


class FastRouter:
    """Resolves ``(method, path)`` to an ``EndpointRoute`` exactly as Starlette's router
    would, or to ``None`` when Starlette must handle the request."""

    def __init__(self, routes: list[BaseRoute]) -> None:
        self.routes = list(routes)
        self._static_paths = {
            r.path for r in self.routes if isinstance(r, Route) and not r.param_convertors
        }
        # A parameterless path's route for a method, with the path parameters it took: another
        # method may pick a route with parameters (DELETE /v1/miners/register is
        # DELETE /v1/miners/{miner_id}).
        self._static: dict[tuple[str, str], tuple[EndpointRoute, dict[str, Any]] | None] = {}
        # The methods some endpoint route serves: no other can resolve to one. A method is
        # any token a client sends (h11 takes made-up ones), so lookups of other methods are
        # neither made nor cached (``_static`` stays bounded by the routes' own methods).
        self._methods = {
            m for r in self.routes if isinstance(r, EndpointRoute) for m in r.methods or ()
        }
        # Everything that could match a path no parameterless route has, in order.
        self._dynamic: list[tuple[str, BaseRoute]] = []
        for r in self.routes:
            if isinstance(r, WebSocketRoute):
                continue  # never matches an HTTP scope
            if isinstance(r, Route):
                if r.param_convertors:
                    self._dynamic.append((r.path.partition("{")[0], r))
            else:
                self._dynamic.append((getattr(r, "path", "").partition("{")[0], r))

    def lookup(self, method: str, path: str) -> tuple[EndpointRoute, dict[str, Any]] | None:
        if path.endswith("\n") or method not in self._methods:
            # ``$`` in a route regex also matches before a final newline; no endpoint route
            # serves that method (Starlette answers 405 or 404).
            return _FALLBACK
        if path in self._static_paths:
            key = (method, path)
            try:
                found = self._static[key]
            except KeyError:
                found = self._static[key] = self._resolve(method, path)
            return None if found is None else (found[0], dict(found[1]))  # a request's own
        for prefix, r in self._dynamic:
            if not path.startswith(prefix):
                continue
            if isinstance(r, Route):
                m = r.path_regex.match(path)
                if m is None:
                    continue
                if r.methods and method not in r.methods:
                    continue  # a partial match: Starlette keeps looking for a full one
                if not isinstance(r, EndpointRoute):
                    return _FALLBACK
                params = m.groupdict()
                for name, value in params.items():
                    params[name] = r.param_convertors[name].convert(value)
                return r, params
            match, _ = r.matches(_scope(method, path))
            if match is Match.FULL:
                return _FALLBACK
        return _FALLBACK

    def _resolve(self, method: str, path: str) -> tuple[EndpointRoute, dict[str, Any]] | None:
        """The route Starlette picks for a parameterless path (its own ``matches``), with the
        path parameters it took."""
        scope = _scope(method, path)
        for r in self.routes:
            match, child = r.matches(scope)
            if match is Match.FULL:
                if not isinstance(r, EndpointRoute):
                    return None
                return r, dict(child.get("path_params", {}))
        return None


def _scope(method: str, path: str) -> Scope:
    return {"type": "http", "method": method, "path": path, "root_path": "", "headers": []}


class SlashRouter(Router):
    """Starlette's router, but a path with a trailing slash that no route fully matches is
    redirected (307) to the path without it when a route fully matches that one, before a
    route that matches it only for another method answers 405.

    Starlette redirects a trailing slash only when no route matched at all, and
    ``DELETE /v1/miners/{miner_id:id}`` takes any rest of the path as a miner id (an id may
    contain "/"), so ``POST /v1/miners/register/`` was 405 with ``Allow: DELETE`` where every
    other route's trailing slash is a redirect (as upstream answers). A path some route fully
    matches as sent is left alone (``DELETE /v1/miners/m1/`` names the miner "m1/")."""

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.redirect_slashes:
            target = self._without_slash(scope)
            if target is not None:
                await RedirectResponse(url=str(URL(scope=target)))(scope, receive, send)
                return
        try:
            await super().app(scope, receive, send)
        except HTTPException as exc:
            allowed = self._allowed(scope) if exc.status_code == 405 else ""
            if allowed and scope["type"] == "http":
                # Starlette's ``Allow`` names the methods of the first route that matched the
                # path only: ``PUT /v1/jobs`` said ``Allow: POST``, though GET serves it too.
                # (None matched: a static files mount's own 405, left as it is.)
                exc.headers = {**(exc.headers or {}), "Allow": allowed}
            raise

    def _allowed(self, scope: Scope) -> str:
        """Every method some route serves at the request's path (RFC 9110's ``Allow``)."""
        methods: set[str] = set()
        for route in self.routes:
            if isinstance(route, Route) and route.matches(scope)[0] is not Match.NONE:
                methods |= route.methods or set()
        return ", ".join(sorted(methods, key=lambda m: (_ORDER.get(m, len(_ORDER)), m)))

    def _without_slash(self, scope: Scope) -> Scope | None:
        path = get_route_path(scope)
        if path == "/" or not path.endswith("/") or self._matched(scope):
            return None
        target = {**scope, "path": scope["path"].rstrip("/")}
        return target if self._matched(target) else None

    def _matched(self, scope: Scope) -> bool:
        return any(route.matches(scope)[0] is Match.FULL for route in self.routes)


class CoordinatorApp(Starlette):
    fast_routes = True  # False: every request through Starlette (tests compare the two)
    _fast: FastRouter | None = None
    _fast_routes: list[BaseRoute] | None = None
    _error_stack: ASGIApp | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.router = SlashRouter(self.router.routes, lifespan=self.router.lifespan_context)

    def _router(self) -> FastRouter | None:
        """The fast router over the current routes, or None when this app must not use one."""
        if not self.fast_routes or self.debug or self.user_middleware:
            return None
        if self.max_body_size is not None:
            return None
        if self._fast is None or self._fast_routes != self.routes:
            self._fast = FastRouter(self.routes)
            self._fast_routes = list(self.routes)
        return self._fast

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("root_path"):
            hit = self.endpoint_for(scope["method"], scope["path"])
            if hit is not None:
                route, params = hit
                self.enter(scope, route, params)
                await self.serve(route, scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def endpoint_for(self, method: str, path: str) -> tuple[EndpointRoute, dict[str, Any]] | None:
        """The endpoint route this app serves itself for an HTTP request without a
        ``root_path``, with its path parameters; None when Starlette must handle it."""
        router = self._router()
        return None if router is None else router.lookup(method, path)

    def enter(self, scope: Scope, route: EndpointRoute, params: dict[str, Any]) -> None:
        """What Starlette's router adds to the scope of a request it routes to ``route``."""
        scope["app"] = self
        scope.setdefault("router", self.router)
        scope["route"] = route
        scope["endpoint"] = route.endpoint
        scope["path_params"] = {**scope.get("path_params", {}), **params}

    async def serve(
        self,
        route: EndpointRoute,
        scope: Scope,
        receive: Receive,
        send: Send,
        responder: Responder | None = None,
    ) -> None:
        """Run the endpoint of an ``enter``ed request and send its response: through
        ``responder`` when given and it takes the response (web/lean_http.py), else through
        the response's own ASGI call."""
        if responder is not None:
            scope[RESPONDER] = responder  # for ``Call.responder``
        try:
            response = await route.endpoint(Request(scope, receive, send))
        except Exception as exc:
            # Starlette's own exception middlewares decide: an app handler's answer, or the
            # 500 handler's and a re-raise for the server to log.
            scope[_ERROR] = exc
            await self._errors()(scope, receive, send)
            return
        finally:
            scope.pop(RESPONDER, None)  # the scope would hold its own request cycle
        if responder is None or not responder.write(response):
            await response(scope, receive, send)  # ``ALREADY_SENT`` sends nothing

    def _errors(self) -> ASGIApp:
        """Starlette's two exception middlewares (as ``build_middleware_stack`` sets them up)
        around an app that raises the endpoint's exception."""
        if self._error_stack is None:
            error_handler = None
            handlers: dict[Any, Any] = {}
            for key, value in self.exception_handlers.items():
                if key in (500, Exception):
                    error_handler = value
                else:
                    handlers[key] = value
            self._error_stack = ServerErrorMiddleware(
                ExceptionMiddleware(_reraise, handlers=handlers, debug=self.debug),
                handler=error_handler,
                debug=self.debug,
            )
        return self._error_stack


async def _reraise(scope: Scope, receive: Receive, send: Send) -> None:
    raise scope.pop(_ERROR)
