"""Input no store can write back is a 422, on both stores: NUL (``\\u0000``) in any string
of a request, and JSON nested deeper than ``protocol.codec.MAX_DEPTH``.

A failed commit stops the coordinator, so each was one request away from stopping it. NUL:
PostgreSQL cannot store it in text (found by review on PostgreSQL; SQLite gets the same rule,
so a database moves between the two without surprises). Depth: orjson reads 1024 levels but
writes 254, so a payload 300 deep was accepted and then failed its commit (found by a hunt,
on both stores).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from tests.conftest import ADMIN_KEY, CLIENT_KEY
from tests.web.rest_harness import miner_headers, running_api

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.anyio

JOB = "0" * 32
CLIENT = {"X-Api-Key": CLIENT_KEY}
ADMIN = {"X-Api-Key": ADMIN_KEY}
NUL_REQUESTS: list[tuple[str, str, dict[str, str], Any]] = [
    ("POST", "/v1/miners/register", miner_headers("m1"), {"capabilities": {}, "region": "a\0"}),
    ("POST", "/v1/miners/register", miner_headers("m1"), {"capabilities": {"gpus": ["\0"]}}),
    ("POST", "/v1/jobs", CLIENT, {"payload": {"type": "t", "prompt": "a\0b"}}),
    ("POST", "/v1/jobs", CLIENT, {"payload": {"type": "t"}, "idempotency_key": "k\0"}),
    ("GET", "/v1/jobs/%00", CLIENT, None),
    ("GET", "/v1/jobs?job_type=%00", CLIENT, None),
    (
        "POST",
        f"/v1/miners/{JOB}/fail",
        miner_headers("m1"),
        {"error_code": "x", "error_message": "\0"},
    ),
    ("POST", f"/v1/miners/{JOB}/result", miner_headers("m1"), {"result": {"error": "a\0"}}),
    ("POST", "/v1/admin/accounts/client:abc/credit", ADMIN, {"amount": "1", "note": "a\0"}),
    (
        "POST",
        "/v1/register",
        {},
        {
            "wallet_address": "0x" + "1" * 40,
            "signature": "0x00",
            "username": "a\0",
            "email": "a@b.c",
        },
    ),
]

DEEP: Any = []
for _ in range(300):
    DEEP = [DEEP]
DEEP_REQUESTS: list[tuple[str, str, dict[str, str], Any]] = [
    ("POST", "/v1/jobs", CLIENT, {"payload": {"type": "t", "x": DEEP}}),
    ("POST", "/v1/jobs", CLIENT, {"payload": {"type": "t"}, "constraints": {"x": DEEP}}),
    ("POST", "/v1/miners/register", miner_headers("m1"), {"capabilities": {"x": DEEP}}),
    ("POST", f"/v1/miners/{JOB}/result", miner_headers("m1"), {"result": {"x": DEEP}}),
]


async def test_refused_input_is_a_422_and_the_coordinator_goes_on(
    tmp_path: Path, database_url: str
) -> None:
    async with running_api(tmp_path, database_url=database_url, billing=True) as api:
        for method, path, headers, body in NUL_REQUESTS:
            r = await api.http.request(method, path, headers=headers, json=body)
            assert r.status_code == 422, (path, r.status_code, r.text)
            assert "NUL" in r.json()["detail"], (path, r.text)
        for method, path, headers, body in DEEP_REQUESTS:
            r = await api.http.request(method, path, headers=headers, json=body)
            assert r.status_code == 422, (path, r.status_code, r.text)
            assert "levels deep" in r.json()["detail"], (path, r.text)
        # Everything still commits: a job runs through to its receipt.
        assert (await api.register("m1")).status_code == 200
        job = await api.submit()
        assert (await api.poll("m1")).status_code == 200
        done = await api.result(job["job_id"])
        assert done.status_code == 200, done.text
        assert done.json()["receipt"]["job_id"] == job["job_id"]
        assert not api.core.failed


WIDE_REQUESTS: list[tuple[str, dict[str, str], Any, str]] = [
    ("/v1/jobs", CLIENT, {"payload": {"type": "t", "n": 2**64}}, "payload.n"),
    ("/v1/jobs", CLIENT, {"payload": {"xs": [0, -(2**63) - 1]}}, "payload.xs[1]"),
    ("/v1/jobs", CLIENT, {"payload": {}, "constraints": {"k": 10**40}}, "constraints.k"),
    ("/v1/miners/register", miner_headers("m1"), {"capabilities": {"n": 2**70}}, "capabilities.n"),
    (f"/v1/miners/{JOB}/result", miner_headers("m1"), {"result": {"n": 2**64}}, "result.n"),
]


async def test_integers_past_64_bits_are_a_422_naming_where(
    tmp_path: Path, database_url: str
) -> None:
    """orjson reads an integer beyond 64 bits as a float, so a payload's 2**64 was stored and
    read back as 1.8446744073709552e+19, another value than the client sent (reported by the
    REST hunt). It is refused; the integers orjson keeps come back exactly."""
    async with running_api(tmp_path, database_url=database_url) as api:
        for path, headers, body, where in WIDE_REQUESTS:
            r = await api.http.post(path, headers=headers, json=body)
            assert r.status_code == 422, (path, r.status_code, r.text)
            assert r.json()["detail"].startswith(f"request body: {where} is an integer"), r.text
        payload = {"lo": -(2**63), "hi": 2**64 - 1, "digits": "9" * 30}
        job = await api.submit(payload=payload)
        assert (await api.job(job["job_id"]))["payload"] == payload
        assert (await api.register("m1")).status_code == 200
        assert (await api.poll("m1")).json()["payload"] == payload
        assert (await api.result(job["job_id"], result={"n": 2**64 - 1})).status_code == 200
        assert (await api.job(job["job_id"]))["result"] == {"n": 2**64 - 1}
        assert not api.core.failed


async def test_query_integers_past_64_bits_are_a_422(tmp_path: Path) -> None:
    """A query integer too big for a float or a store column (a poll's wait of 1e309 seconds
    was an OverflowError, a 500: found by a hunt)."""
    async with running_api(tmp_path) as api:
        assert (await api.register("m1")).status_code == 200
        huge = "1" + "0" * 309
        for path, headers in [
            (f"/v1/miner/jobs?max_wait_seconds={huge}", miner_headers("m1")),
            ("/v1/miner/jobs?max_wait_seconds=3601", miner_headers("m1")),
            (f"/v1/jobs?limit={2**63}", CLIENT),
            (f"/v1/jobs?offset=-{2**63 + 1}", CLIENT),
        ]:
            r = await api.http.get(path, headers=headers)
            assert r.status_code == 422, (path, r.status_code, r.text)


@pytest.mark.parametrize(
    ("query", "said"),
    [
        ("limit=1_0", "an integer"),  # Python's int() read 10
        ("limit=%D9%A5", "an integer"),  # ARABIC-INDIC DIGIT FIVE: read 5
        ("offset=%EF%BC%93", "an integer"),  # FULLWIDTH DIGIT THREE
        ("limit=%205", "an integer"),  # surrounding space
        ("limit=+5", "an integer"),  # "+" is a space in a query
        ("limit=5.0", "an integer"),
    ],
)
async def test_a_query_integer_is_plain_ascii_digits(tmp_path: Path, query: str, said: str) -> None:
    """Query integers went through Python's ``int()``, which also reads "1_0" as 10, digits
    of other scripts and surrounding spaces, while every other number the coordinator takes
    (settings, amounts) must be plain ASCII digits: a typo became another page silently."""
    async with running_api(tmp_path) as api:
        r = await api.http.get(f"/v1/jobs?{query}", headers=CLIENT)
        name = query.partition("=")[0]
        assert (r.status_code, r.json()) == (
            422,
            {"detail": f"query parameter {name} must be {said}"},
        )
        assert (await api.http.get("/v1/jobs?limit=05&offset=-0", headers=CLIENT)).is_success
        assert (await api.register("m1")).status_code == 200
        for bad in ("1_0", "%D9%A5", "1e", "0x1"):
            r = await api.http.post(
                f"/v1/miners/m1/jobs?min_reward={bad}", headers=miner_headers("m1")
            )
            assert r.json() == {"detail": "query parameter min_reward must be a finite number"}
        for good in ("1", "-2.5", ".5", "1e3", "1E-3"):
            r = await api.http.post(
                f"/v1/miners/m1/jobs?min_reward={good}", headers=miner_headers("m1")
            )
            assert r.status_code == 200, (good, r.text)


async def test_a_wallet_address_with_a_trailing_newline_is_no_address(tmp_path: Path) -> None:
    """``$`` also matched before a final newline: such an address got a nonce of its own."""
    wallet = "0x" + "ab" * 20
    async with running_api(tmp_path) as api:
        for bad in (wallet + "\n", wallet + "\n\n", " " + wallet):
            r = await api.http.post("/v1/auth/nonce", json={"wallet_address": bad})
            assert r.status_code == 400, (bad, r.text)
        assert (await api.http.post("/v1/auth/nonce", json={"wallet_address": wallet})).is_success


@pytest.mark.parametrize("fast", [True, False])
async def test_a_client_gone_before_its_body_ended_is_no_server_error(
    tmp_path: Path, fast: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that hangs up halfway through its body gets nothing, and nothing is logged:
    the ``ClientDisconnect`` reading the body went up as an unhandled exception (the 500
    handler's traceback and uvicorn's "Exception in ASGI application" per request, so any
    client could flood the error log). Found by a hunt against a served coordinator."""
    async with running_api(tmp_path) as api:
        api.app.fast_routes = fast
        messages = [
            {"type": "http.request", "body": b'{"payload":', "more_body": True},
            {"type": "http.disconnect"},
        ]
        sent: list[Any] = []

        async def receive() -> Any:
            return messages.pop(0)

        async def send(message: Any) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/jobs",
            "raw_path": b"/v1/jobs",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"x-api-key", CLIENT_KEY.encode()), (b"content-length", b"100")],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
        }
        with caplog.at_level("ERROR"):
            await api.app(scope, receive, send)
        assert sent == []
        assert [r for r in caplog.records if r.levelname == "ERROR"] == []
        assert (await api.http.get("/v1/jobs", headers=CLIENT)).json()["items"] == []
