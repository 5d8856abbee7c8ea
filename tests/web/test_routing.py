"""Ring 2: CoordinatorApp's own routing of endpoint-table routes answers as Starlette would."""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given, settings, strategies as st
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.testclient import TestClient

from tests.conftest import ADMIN_KEY, CLIENT_KEY, MINER_KEY, make_settings
from web.app import create_app
from web.auth import Authenticator
from web.http import (
    Endpoint,
    EndpointRoute,
    RateLimiter,
    http_exception,
    internal_error,
    routes_for,
)
from web.routing import CoordinatorApp, FastRouter

if TYPE_CHECKING:
    from pathlib import Path

    from starlette.routing import BaseRoute
    from starlette.types import ASGIApp, Receive, Scope, Send

METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"]


def _starlette_pick(routes: list[BaseRoute], method: str, path: str) -> Any:
    """Starlette's router: the first route that fully matches, with its path parameters."""
    scope = {"type": "http", "method": method, "path": path, "root_path": "", "headers": []}
    for route in routes:
        match, child = route.matches(scope)
        if match is Match.FULL:
            return route, child.get("path_params", {})
    return None


@pytest.fixture(scope="module")
def app_routes(tmp_path_factory: pytest.TempPathFactory) -> list[BaseRoute]:
    return list(create_app(make_settings(tmp_path_factory.mktemp("routes"))).routes)


def _segments(routes: list[BaseRoute]) -> list[str]:
    out = {"x", "", "job-1", "a b", "ws", "ü", "..", "result\n"}
    for route in routes:
        out.update(getattr(route, "path", "").split("/"))
    return sorted(s for s in out if "{" not in s)


def _check(router: FastRouter, routes: list[BaseRoute], method: str, path: str) -> None:
    picked = _starlette_pick(routes, method, path)
    fast = router.lookup(method, path)
    if fast is not None:
        assert picked is not None, (method, path)
        assert picked[0] is fast[0], (method, path)
        assert picked[1] == fast[1], (method, path)
    elif not path.endswith("\n"):
        # Everything Starlette would give an endpoint route, the fast router finds too.
        assert picked is None or not isinstance(picked[0], EndpointRoute), (method, path)


def test_every_route_template_resolves_as_starlette_resolves_it(
    app_routes: list[BaseRoute],
) -> None:
    router = FastRouter(app_routes)
    hits = 0
    for route in app_routes:
        template = getattr(route, "path", "/")
        for value in ("x", "job-1", "a b", "ws", "register", "poll"):
            path = template
            for name in getattr(route, "param_convertors", {}):
                path = path.replace("{" + name + "}", value)
            for variant in (path, path + "/", path + "/x", path.rsplit("/", 1)[0], path + "\n"):
                for method in METHODS:
                    _check(router, app_routes, method, variant)
                    hits += router.lookup(method, variant) is not None
    assert hits > 100  # the endpoint routes really are served by the fast router


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_path_resolves_as_starlette_resolves_it(
    app_routes: list[BaseRoute], data: st.DataObject
) -> None:
    segments = data.draw(st.lists(st.sampled_from(_segments(app_routes)), max_size=6))
    method = data.draw(st.sampled_from(METHODS))
    _check(FastRouter(app_routes), app_routes, method, "/" + "/".join(segments))


def test_methods_no_endpoint_serves_are_not_remembered(app_routes: list[BaseRoute]) -> None:
    """The fast router remembered its answer for every (method, path) of a parameterless
    path, and a method is any token the client sends: h11 (uvicorn's parser where httptools
    is missing) takes made-up ones, up to 16 KiB each. Each made-up method sent to /v1/jobs
    (a 405) kept one more entry for good: memory any unauthenticated client could grow
    without bound. A method no endpoint route serves is left to Starlette, as before, and
    nothing is kept for it."""
    router = FastRouter(app_routes)
    before = len(router._static)
    for n in range(1000):
        method = f"M{n}" + "X" * 1000
        assert router.lookup(method, "/v1/jobs") is None
        assert _starlette_pick(app_routes, method, "/v1/jobs") is None  # Starlette: 405
    assert len(router._static) == before
    assert router.lookup("GET", "/v1/jobs") is not None  # served methods are still served


class Recorder:
    """Wraps Starlette's middleware stack: records the requests that went through it."""

    def __init__(self, app: ASGIApp, seen: list[str]) -> None:
        self.app, self.seen = app, seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.seen.append(f"{scope['method']} {scope['path']}")
        await self.app(scope, receive, send)


STARLETTE = True  # not an endpoint route: Starlette answers either way
REQUESTS: list[tuple[str, str, dict[str, str], bytes | None, bool]] = [
    ("GET", "/v1/jobs", {}, None, False),
    ("GET", "/v1/jobs", {"X-Api-Key": CLIENT_KEY}, None, False),
    ("HEAD", "/v1/jobs", {"X-Api-Key": CLIENT_KEY}, None, False),
    ("GET", "/v1/jobs?limit=0", {"X-Api-Key": CLIENT_KEY}, None, False),
    ("GET", "/v1/jobs", {"X-Api-Key": MINER_KEY}, None, False),
    ("GET", "/v1/jobs", {"Authorization": "Bearer nope"}, None, False),
    ("GET", "/v1/jobs/nope", {"X-Api-Key": CLIENT_KEY}, None, False),
    ("GET", "/v1/client/jobs/nope/status", {"X-Api-Key": CLIENT_KEY}, None, False),
    ("POST", "/v1/jobs", {"X-Api-Key": CLIENT_KEY}, b"{", False),
    ("POST", "/v1/jobs", {"X-Api-Key": CLIENT_KEY}, b'{"payload": 3}', False),
    ("POST", "/v1/jobs", {"X-Api-Key": CLIENT_KEY}, b"", False),
    ("POST", "/v1/jobs", {"X-Api-Key": CLIENT_KEY}, b"x" * 2_000_000, False),
    ("POST", "/v1/miners/poll", {"X-Api-Key": MINER_KEY, "X-Miner-ID": "m9"}, b"{}", False),
    ("POST", "/v1/miners/nope/result", {"X-Api-Key": MINER_KEY}, b'{"result": {}}', False),
    (
        "POST",
        "/v1/miners/heartbeat",
        {"X-Api-Key": MINER_KEY, "X-Miner-ID": "x" * 200},
        b"{}",
        False,
    ),
    ("GET", "/v1/admin/jobs/nope", {"X-Api-Key": ADMIN_KEY}, None, False),
    ("PUT", "/v1/jobs", {"X-Api-Key": CLIENT_KEY}, None, STARLETTE),  # 405
    ("GET", "/v1/jobs/", {"X-Api-Key": CLIENT_KEY}, None, STARLETTE),  # redirect
    ("GET", "/v1/nope", {}, None, STARLETTE),  # 404
    ("GET", "/health/live", {}, None, STARLETTE),
]


def test_the_app_answers_the_same_with_and_without_its_own_routing(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path))
    assert isinstance(app, CoordinatorApp)
    seen: list[str] = []
    with TestClient(app, follow_redirects=False) as c:
        assert app.middleware_stack is not None  # built for the lifespan
        app.middleware_stack = Recorder(app.middleware_stack, seen)
        for method, path, headers, body, starlette in REQUESTS:
            answers = []
            for fast in (True, False):
                seen.clear()
                app.fast_routes = fast
                r = c.request(method, path, headers=headers, content=body)
                answers.append((r.status_code, sorted(r.headers.items()), r.content))
                assert len(seen) == (1 if starlette or not fast else 0), (method, path, fast)
            assert answers[0] == answers[1], (method, path)


async def _boom(call: Any) -> Any:
    raise RuntimeError("boom")


async def _teapot(call: Any) -> Any:
    raise HTTPException(418, "short and stout", headers={"X-Tea": "yes"})


def _tiny_app(tmp_path: Path) -> CoordinatorApp:
    endpoints = [
        Endpoint("GET", ("/boom",), _boom, "boom", "t"),
        Endpoint("GET", ("/teapot",), _teapot, "teapot", "t"),
    ]
    app = CoordinatorApp(
        routes=routes_for(endpoints),
        exception_handlers={HTTPException: http_exception, Exception: internal_error},
    )
    settings_ = make_settings(tmp_path)
    app.state.core = SimpleNamespace(
        settings=settings_,
        auth=Authenticator(settings_),
        rate_limiter=RateLimiter(0),
        standby=False,
    )
    return app


@pytest.mark.parametrize("fast", [True, False])
def test_endpoint_exceptions_reach_the_apps_handlers_either_way(tmp_path: Path, fast: bool) -> None:
    app = _tiny_app(tmp_path)
    app.fast_routes = fast
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/teapot")
        assert (r.status_code, r.json(), r.headers["x-tea"]) == (
            418,
            {"detail": "short and stout"},
            "yes",
        )
        r = c.get("/boom")
        assert (r.status_code, r.json()) == (500, {"detail": "internal server error"})
    with TestClient(app) as c, pytest.raises(RuntimeError, match="boom"):
        c.get("/boom")  # re-raised for the server to log, after the 500 went out
