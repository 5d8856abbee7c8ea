"""REST client routes and auth: rest-api.md §8 behaviours 1-17 and 49-52 (client side)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from storage.errors import StorageError
from tests.conftest import ADMIN_KEY, CLIENT_KEY, CLIENT_KEY_2, MINER_KEY
from tests.fakes import FakeClock, RecordingStore
from tests.web.rest_harness import Api, answered_after_commit, miner_headers, running_api
from tests.web.wallet_helpers import login
from web import rest_jobs

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path


pytestmark = pytest.mark.anyio

HEX32 = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async with running_api(tmp_path, clock=FakeClock()) as a:  # no timers needed here
        yield a


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


# ---- auth (1-7) ---------------------------------------------------------------------------


async def test_submit_without_credentials_is_401(api: Api) -> None:
    """1: no credential -> 401."""
    r = await api.http.post("/v1/jobs", json={"payload": {}})
    assert r.status_code == 401
    assert r.json() == {"detail": "Authentication required"}


async def test_submit_with_unknown_key_is_401(api: Api) -> None:
    """2: an unknown X-Api-Key -> 401."""
    r = await api.http.post("/v1/jobs", json={"payload": {}}, headers={"X-Api-Key": "nope-1234"})
    assert r.status_code == 401


async def test_submit_with_miner_key_is_403(api: Api) -> None:
    """3: a valid miner key on a client route -> 403."""
    r = await api.http.post("/v1/jobs", json={"payload": {}}, headers={"X-Api-Key": MINER_KEY})
    assert r.status_code == 403


async def test_miner_register_needs_a_miner_key(api: Api) -> None:
    """4: register with no key -> 401; with a client key -> 403."""
    r = await api.http.post("/v1/miners/register", json={"capabilities": {}})
    assert r.status_code == 401
    r = await api.register(key=CLIENT_KEY)
    assert r.status_code == 403


async def test_admin_route_with_miner_key_is_403(api: Api) -> None:
    """5: GET /v1/admin/miners with a miner key -> 403."""
    r = await api.http.get("/v1/admin/miners", headers={"X-Api-Key": MINER_KEY})
    assert r.status_code == 403


async def test_bearer_client_key_works_like_x_api_key(api: Api) -> None:
    """6: Authorization: Bearer <client key> -> 201."""
    r = await api.http.post(
        "/v1/jobs",
        json={"payload": {"prompt": "hi"}},
        headers={"Authorization": f"Bearer {CLIENT_KEY}"},
    )
    assert r.status_code == 201
    assert (await api.job(r.json()["job_id"]))["state"] == "QUEUED"


async def test_health_without_auth(api: Api) -> None:
    """7: /health -> 200 non-empty JSON object with status ok."""
    r = await api.http.get("/health")
    assert r.status_code == 200
    assert r.json()["status"] == "ok"


# ---- submission and reads (8-17) ----------------------------------------------------------


async def test_an_empty_idempotency_key_is_refused(api: Api) -> None:
    """``"idempotency_key": ""`` was taken as a key: every such submit of a client after the
    first answered 200 with that first job, unchanged and not queued again (a client sending
    its unset key as "" lost every job but one). 422 naming the field, nothing stored."""
    headers = {"X-Api-Key": CLIENT_KEY}
    for prompt in ("a", "b"):
        body = {"payload": {"prompt": prompt}, "idempotency_key": ""}
        r = await api.http.post("/v1/jobs", json=body, headers=headers)
        assert (r.status_code, r.json()) == (
            422,
            {"detail": "body.idempotency_key must not be empty"},
        )
    assert api.core.dispatcher.scheduler.jobs == {}
    one = await api.submit(idempotency_key="k")
    r = await api.http.post(
        "/v1/jobs", json={"payload": {}, "idempotency_key": "k"}, headers=headers
    )
    assert (r.status_code, r.json()["job_id"]) == (200, one["job_id"])


async def test_submit_returns_201_job_view(api: Api) -> None:
    """8: 201 with job_id (32 hex), QUEUED, no miner, both timestamps."""
    job = await api.submit()
    assert HEX32.match(job["job_id"])
    assert job["state"] == "QUEUED"
    assert job["assigned_miner_id"] is None
    assert job["requested_at"]
    assert job["expires_at"]
    assert job["payment_id"] is None


async def test_default_and_explicit_ttl(api: Api) -> None:
    """9: default TTL 900 s; ttl_seconds 120 -> 120 s."""
    job = await api.submit()
    assert ts(job["expires_at"]) - ts(job["requested_at"]) == pytest.approx(900)
    job = await api.submit(ttl_seconds=120)
    assert ts(job["expires_at"]) - ts(job["requested_at"]) == pytest.approx(120)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "payload"),
        ({"payload": "x"}, "payload"),
        ({"payload": {}, "ttl_seconds": "abc"}, "ttl_seconds"),
    ],
)
async def test_invalid_submit_is_422_naming_the_field(
    api: Api, body: dict[str, Any], field: str
) -> None:
    """10: missing/invalid payload or ttl_seconds -> 422."""
    r = await api.http.post("/v1/jobs", json=body, headers={"X-Api-Key": CLIENT_KEY})
    assert r.status_code == 422
    assert field in r.json()["detail"]


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b'{"payload": {"x": 1e400}}', "number is infinity when parsed as double: line 1"),
        (b'{"payload": {}, }', "trailing comma is not allowed: line 1 column 15"),
        (b'\xef\xbb\xbf{"payload": {}}', "byte order mark (BOM) is not supported"),
        # Latin-1 "café": orjson said "str is not valid UTF-8: surrogates not allowed: line 1
        # column 1 (char 0)", naming neither the byte nor where it is.
        (b'{"payload": {"p": "caf\xe9"}}', "it is not UTF-8: byte 0xe9 at offset 22"),
        (b'{"payload": {"p": "\xed\xa0\x80"}}', "it is not UTF-8: byte 0xed at offset 19"),
    ],
)
async def test_a_body_the_parser_refuses_is_a_422_saying_why_and_where(
    api: Api, raw: bytes, why: str
) -> None:
    """Every body the JSON parser refused was 422 "request body is not valid JSON", with no
    reason nor place: a trailing comma, a byte order mark (as some Windows tools write), or a
    number that is valid JSON but beyond a double (1e400) all read the same. The detail now
    gives the parser's reason and where it stopped."""
    r = await api.http.post("/v1/jobs", content=raw, headers={"X-Api-Key": CLIENT_KEY})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail.startswith("request body cannot be read as JSON: "), detail
    assert why in detail, detail


async def test_integer_fields_take_numbers_without_a_fraction(api: Api) -> None:
    """An integer field sent as 120.0 (a Python client's arithmetic) was a 422, though the
    published schema's "integer" (JSON Schema) admits it and upstream (pydantic) took it: it
    is that integer now, handed on as an int; 120.5 stays a 422."""
    job = await api.submit(ttl_seconds=120.0)
    assert ts(job["expires_at"]) - ts(job["requested_at"]) == pytest.approx(120)
    r = await api.http.post(
        "/v1/jobs", json={"payload": {}, "ttl_seconds": 120.5}, headers={"X-Api-Key": CLIENT_KEY}
    )
    assert (r.status_code, r.json()["detail"]) == (422, "body.ttl_seconds must be integer")
    assert (await api.register("m1", concurrency=2.0)).status_code == 200
    concurrency = api.core.dispatcher.scheduler.miners["m1"].concurrency
    assert (type(concurrency), concurrency) == (int, 2)
    await api.submit()
    for _ in range(2):
        r = await api.http.post(
            "/v1/miners/poll", json={"max_wait_seconds": 1.0}, headers=miner_headers("m1")
        )
        assert r.status_code == 200, r.text


async def test_unknown_keys_are_accepted(api: Api) -> None:
    """11: unknown constraint and top-level keys -> 201."""
    r = await api.http.post(
        "/v1/jobs",
        json={"payload": {}, "constraints": {"data_classification": "x"}, "whatever": 1},
        headers={"X-Api-Key": CLIENT_KEY},
    )
    assert r.status_code == 201


async def test_get_job_owner_other_unknown(api: Api) -> None:
    """12: owner 200 with same payload; another client 404; unknown 404 'job not found'."""
    job = await api.submit(payload={"prompt": "p"})
    got = await api.job(job["job_id"])
    assert got["job_id"] == job["job_id"]
    assert got["payload"] == {"prompt": "p"}
    r = await api.http.get(f"/v1/jobs/{job['job_id']}", headers={"X-Api-Key": CLIENT_KEY_2})
    assert r.status_code == 404
    r = await api.http.get("/v1/jobs/" + "0" * 32, headers={"X-Api-Key": CLIENT_KEY})
    assert r.status_code == 404
    assert r.json() == {"detail": "job not found"}


async def test_a_read_the_database_fails_is_503_not_500(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store read that fails (a PostgreSQL connection dropped mid-query, a server restart)
    was a 500 with a traceback; it is a 503 the caller may retry, and the next read works."""
    store = RecordingStore()
    async with running_api(tmp_path, store=store) as api:

        async def lost(job_id: str) -> None:
            raise StorageError("connection was closed in the middle of operation")

        with monkeypatch.context() as patch:
            patch.setattr(store, "get_job", lost)
            r = await api.http.get("/v1/jobs/" + "0" * 32, headers={"X-Api-Key": CLIENT_KEY})
        assert (r.status_code, r.headers["retry-after"]) == (503, "1")
        assert r.json() == {"detail": "the database could not be read; retry"}
        r = await api.http.get("/v1/jobs/" + "0" * 32, headers={"X-Api-Key": CLIENT_KEY})
        assert r.status_code == 404


async def test_list_jobs_page_newest_first_own_only(api: Api) -> None:
    """13: limit=1 -> one item, newest first, only the caller's jobs."""
    await api.submit()
    api.clock.advance(1)
    newest = await api.submit()
    await api.submit(key=CLIENT_KEY_2)
    r = await api.http.get("/v1/jobs?limit=1", headers={"X-Api-Key": CLIENT_KEY})
    body = r.json()
    assert r.status_code == 200
    assert [j["job_id"] for j in body["items"]] == [newest["job_id"]]
    assert body["limit"] == 1
    assert body["offset"] == 0
    assert body["total"] == 2


async def test_jobs_history_is_the_job_list_not_a_job_lookup(api: Api) -> None:
    """§9: upstream's /v1/jobs/history was shadowed by /v1/jobs/{job_id} (always 404). Here it
    lists the caller's jobs as /v1/jobs does, with the same query parameters."""
    first = await api.submit()
    api.clock.advance(1)
    second = await api.submit()
    await api.http.post(f"/v1/jobs/{first['job_id']}/cancel", headers={"X-Api-Key": CLIENT_KEY})
    headers = {"X-Api-Key": CLIENT_KEY}
    r = await api.http.get("/v1/jobs/history", headers=headers)
    assert r.status_code == 200, r.text
    assert r.json() == (await api.http.get("/v1/jobs", headers=headers)).json()
    assert [j["job_id"] for j in r.json()["items"]] == [second["job_id"], first["job_id"]]
    r = await api.http.get("/v1/jobs/history?status=canceled&limit=5", headers=headers)
    assert [j["job_id"] for j in r.json()["items"]] == [first["job_id"]]
    assert r.json()["limit"] == 5


async def test_list_jobs_by_job_type_and_the_seed_doc_aliases(api: Api) -> None:
    """``job_type`` matches ``payload.type``; the seed doc's ``POST /v1/client/jobs`` submits
    and ``GET /v1/client/jobs/{id}/receipts`` lists receipts, as the main routes do."""
    headers = {"X-Api-Key": CLIENT_KEY}
    r = await api.http.post(
        "/v1/client/jobs", json={"payload": {"type": "inference"}}, headers=headers
    )
    assert r.status_code == 201, r.text
    inference = r.json()
    await api.submit(payload={"type": "training"})
    await api.submit(payload={"prompt": "no type"})
    r = await api.http.get("/v1/jobs?job_type=inference", headers=headers)
    assert [j["job_id"] for j in r.json()["items"]] == [inference["job_id"]]
    assert r.json()["total"] == 1
    path = f"/jobs/{inference['job_id']}/receipts"
    alias = await api.http.get(f"/v1/client{path}", headers=headers)
    assert alias.status_code == 200
    assert alias.json() == (await api.http.get(f"/v1{path}", headers=headers)).json()


async def test_a_job_page_larger_than_the_cap_is_read_as_the_cap(api: Api) -> None:
    """Upstream has no cap on limit, and the CLI passes the user's --limit through: a larger
    one gets the largest page (500), and the answer's limit says so; below 1 is still 422."""
    job = await api.submit()
    headers = {"X-Api-Key": CLIENT_KEY}
    r = await api.http.get("/v1/jobs?limit=1000000", headers=headers)
    assert r.status_code == 200, r.text
    assert (r.json()["limit"], [j["job_id"] for j in r.json()["items"]]) == (500, [job["job_id"]])
    assert (await api.http.get("/v1/jobs?limit=0", headers=headers)).status_code == 422


async def test_a_job_page_ends_at_its_character_budget(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``GET /v1/jobs?limit=500`` read every job of the page whole: 500 jobs near the body
    limit took about 4.6 GB for one call. A page ends before the job that would take its
    payloads and results past ``PAGE_CHARS`` (the first job whatever its size), its ``limit``
    is then its length, so ``offset + limit`` pages on without gap or repeat."""
    monkeypatch.setattr(rest_jobs, "PAGE_CHARS", 2500)
    blob = "x" * 1000
    ids = [(await api.submit(payload={"b": blob}))["job_id"] for _ in range(5)][::-1]
    headers = {"X-Api-Key": CLIENT_KEY}
    seen, offset = [], 0
    while offset < 5:
        r = await api.http.get(f"/v1/jobs?limit=500&offset={offset}", headers=headers)
        body = r.json()
        assert (r.status_code, body["total"], body["offset"]) == (200, 5, offset)
        # Cut short: its limit is its length; the last page is not cut and says 500.
        assert (body["limit"], len(body["items"])) == ((2, 2) if offset < 4 else (500, 1))
        seen += [j["job_id"] for j in body["items"]]
        offset += body["limit"]
    assert seen == ids
    assert (await api.register("m1", concurrency=5)).status_code == 200
    for _ in range(5):
        assert (await api.poll("m1")).status_code == 200
    r = await api.http.post("/v1/miners/m1/jobs?limit=3", headers=miner_headers("m1"))
    assert (r.json()["limit"], len(r.json()["jobs"]), r.json()["total"]) == (2, 2, 5)
    monkeypatch.setattr(rest_jobs, "PAGE_CHARS", 10)
    r = await api.http.get("/v1/jobs?limit=3", headers=headers)
    assert [j["job_id"] for j in r.json()["items"]] == ids[:1]  # the first whatever its size


async def test_list_jobs_by_status_case_insensitive(api: Api) -> None:
    """14: status=queued returns only QUEUED jobs."""
    queued = await api.submit()
    other = await api.submit()
    await api.http.post(f"/v1/jobs/{other['job_id']}/cancel", headers={"X-Api-Key": CLIENT_KEY})
    r = await api.http.get("/v1/jobs?status=queued", headers={"X-Api-Key": CLIENT_KEY})
    assert [j["job_id"] for j in r.json()["items"]] == [queued["job_id"]]


async def test_list_jobs_by_state_is_the_status_filter(api: Api) -> None:
    """``state`` (the field's name in JobView) filters as ``status`` does: it was read by the
    handler but never parsed, so ``?state=queued`` quietly listed every job."""
    queued = await api.submit()
    other = await api.submit()
    await api.cancel(other["job_id"])
    headers = {"X-Api-Key": CLIENT_KEY}
    for path in ("/v1/jobs?state=queued", "/v1/jobs/history?state=QUEUED"):
        r = await api.http.get(path, headers=headers)
        assert r.status_code == 200, r.text
        assert [j["job_id"] for j in r.json()["items"]] == [queued["job_id"]], path
    r = await api.http.get("/v1/jobs?state=done", headers=headers)
    assert r.status_code == 422
    assert "state must be one of QUEUED" in r.json()["detail"]
    r = await api.http.get("/v1/jobs?state=queued&status=canceled", headers=headers)
    assert r.status_code == 422
    assert "status and state" in r.json()["detail"]


@pytest.mark.parametrize(
    "query",
    ["stauts=queued", "job_state=QUEUED", "client_id=x", "miner_id=m1", "type=inference"],
)
async def test_list_jobs_refuses_a_filter_it_does_not_know(api: Api, query: str) -> None:
    """A filter the list does not know (a typo, another API's name) was ignored, and the
    answer listed every job as if it had matched: 422 naming it and the parameters there are."""
    await api.submit()
    r = await api.http.get(f"/v1/jobs?{query}", headers={"X-Api-Key": CLIENT_KEY})
    assert r.status_code == 422, r.text
    name = query.partition("=")[0]
    assert r.json()["detail"] == (
        f"unknown query parameter {name}; this route takes limit, offset, job_type, status, state"
    )


async def test_list_jobs_refuses_a_filter_given_twice(api: Api) -> None:
    """``?status=queued&status=running`` read only the last one, listing the running jobs as
    if those were all that was asked for."""
    r = await api.http.get(
        "/v1/jobs?status=queued&status=running", headers={"X-Api-Key": CLIENT_KEY}
    )
    assert r.status_code == 422
    assert r.json()["detail"] == "query parameter status is given 2 times (once at most)"


async def test_result_before_the_end_is_425(api: Api) -> None:
    """15: /result while QUEUED -> 425 job not ready."""
    job = await api.submit()
    r = await api.http.get(f"/v1/jobs/{job['job_id']}/result", headers={"X-Api-Key": CLIENT_KEY})
    assert r.status_code == 425
    assert r.json() == {"detail": "job not ready"}


async def test_receipts_before_completion(api: Api) -> None:
    """16: /receipt -> 404; /receipts -> 200 empty list."""
    job = await api.submit()
    h = {"X-Api-Key": CLIENT_KEY}
    assert (await api.http.get(f"/v1/jobs/{job['job_id']}/receipt", headers=h)).status_code == 404
    r = await api.http.get(f"/v1/jobs/{job['job_id']}/receipts", headers=h)
    assert r.status_code == 200
    assert r.json() == {"items": []}


async def test_receipts_of_unknown_job_is_404(api: Api) -> None:
    """17 [fix]: /receipts of an unknown job -> 404, not 500."""
    r = await api.http.get("/v1/jobs/" + "1" * 32 + "/receipts", headers={"X-Api-Key": CLIENT_KEY})
    assert r.status_code == 404


# ---- cancel and expiry (49-52, client side) -----------------------------------------------


async def test_cancel_without_body_and_no_poll_returns_it(api: Api) -> None:
    """49: bodiless cancel of a QUEUED job -> 200 CANCELED; a later poll never returns it."""
    job = await api.submit()
    r = await api.http.post(f"/v1/jobs/{job['job_id']}/cancel", headers={"X-Api-Key": CLIENT_KEY})
    assert r.status_code == 200
    body = r.json()
    assert body["state"] == "CANCELED"
    assert body["error"] == "canceled by client"
    assert body["assigned_miner_id"] is None
    assert (await api.register()).status_code == 200
    assert (await api.poll(max_wait=1)).status_code == 204


async def test_cancel_terminal_is_409_and_foreign_is_404(api: Api) -> None:
    """50: cancel a CANCELED job -> 409 job not cancelable; another client's job -> 404."""
    job = await api.submit()
    h = {"X-Api-Key": CLIENT_KEY}
    await api.http.post(f"/v1/jobs/{job['job_id']}/cancel", headers=h)
    r = await api.http.post(f"/v1/jobs/{job['job_id']}/cancel", headers=h)
    assert r.status_code == 409
    assert r.json() == {"detail": "job not cancelable"}
    other = await api.submit()
    r = await api.http.post(
        f"/v1/jobs/{other['job_id']}/cancel", headers={"X-Api-Key": CLIENT_KEY_2}
    )
    assert r.status_code == 404


async def test_a_cancel_refused_by_an_end_not_yet_durable_waits_for_it(tmp_path: Path) -> None:
    """A cancel refused because the job has just ended is answered once that end is committed
    (the 409 went out at once: a crash before the commit left the job running, though its
    client had been told it could no longer be canceled)."""
    store = RecordingStore()
    async with running_api(tmp_path, clock=FakeClock(), store=store) as api:
        assert (await api.register()).status_code == 200
        job = await api.submit()
        assert (await api.poll()).json()["job_id"] == job["job_id"]
        answers = await answered_after_commit(
            api, store, ("result", api.result(job["job_id"])), ("cancel", api.cancel(job["job_id"]))
        )
        assert answers == [("result", 200), ("cancel", 409)]


async def test_a_job_is_servable_once_a_miner_that_can_run_it_is_committed(
    tmp_path: Path,
) -> None:
    """The JobView's ``servable`` asked the scheduler, which counted a miner whose registration
    was still being committed (a failed commit then stops the coordinator, and no such miner
    ever existed). It counts the miners as last committed."""
    store = RecordingStore()
    async with running_api(tmp_path, clock=FakeClock(), store=store) as api:
        job = await api.submit(constraints={"models": ["llama"]})
        assert job["servable"] is False
        store.block_commits()
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: api.register("m1", capabilities={"models": ["llama"]}))
            await api.settle()
            assert (await api.job(job["job_id"]))["servable"] is False
            store.release_commits()
        assert (await api.job(job["job_id"]))["servable"] is True


async def test_upstreams_unbounded_inputs_are_bounded(api: Api) -> None:
    """rest-api.md §9 "Unbounded inputs" had no test: upstream took any ttl_seconds and any
    concurrency (0 meaning unlimited). Here a TTL over 7 days and a concurrency outside
    1..1024 are 422s naming the field."""
    client = {"X-Api-Key": CLIENT_KEY}
    r = await api.http.post("/v1/jobs", json={"payload": {}, "ttl_seconds": 604801}, headers=client)
    assert (r.status_code, r.json()) == (422, {"detail": "body.ttl_seconds must be at most 604800"})
    assert (await api.submit(ttl_seconds=604800))["state"] == "QUEUED"
    for concurrency, said in ((0, "at least 1"), (1025, "at most 1024")):
        r = await api.register("m1", concurrency=concurrency)
        assert (r.status_code, r.json()) == (422, {"detail": f"body.concurrency must be {said}"})


async def test_a_session_token_in_the_url_is_no_credential(tmp_path: Path) -> None:
    """rest-api.md §9: upstream took session tokens as ?token= (tokens in URLs end up in logs
    and histories); docs/rest-api.md says it is not accepted, which no test held."""
    async with running_api(tmp_path, clock=FakeClock()) as api:
        token = (await login(api.http))["session_token"]
        r = await api.http.get("/v1/users/me", params={"token": token})
        assert (r.status_code, r.json()) == (401, {"detail": "Authentication required"})
        r = await api.http.get("/v1/jobs", params={"token": token})
        assert r.status_code == 401
        r = await api.http.get("/v1/users/me", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200


async def test_not_found_and_method_not_allowed_are_json(api: Api) -> None:
    """Starlette's own 404/405 come back as {"detail": …}."""
    r = await api.http.get("/v1/nothing-here")
    assert r.status_code == 404
    assert "detail" in r.json()
    r = await api.http.delete("/v1/jobs", headers={"X-Api-Key": CLIENT_KEY})
    assert r.status_code == 405
    assert "detail" in r.json()


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/v1/jobs", "GET, HEAD, POST"),  # GET and POST are two routes
        ("DELETE", "/v1/jobs", "GET, HEAD, POST"),
        ("POST", "/v1/jobs/j1", "GET, HEAD"),
        ("GET", "/v1/jobs/j1/cancel", "POST"),
        ("HEAD", "/v1/miner/jobs", "GET"),  # its HEAD is refused (a poll would take a job)
        ("POST", "/health", "GET, HEAD"),
    ],
)
async def test_a_405_allows_every_method_the_path_takes(
    api: Api, method: str, path: str, allow: str
) -> None:
    """``PUT /v1/jobs`` said ``Allow: POST`` (the first route that matched the path), though
    ``GET /v1/jobs`` lists the jobs: RFC 9110 asks for every method the resource supports."""
    r = await api.http.request(method, path, headers={"X-Api-Key": CLIENT_KEY})
    assert r.status_code == 405
    assert r.headers["allow"] == allow
    if method != "HEAD":
        assert r.json() == {"detail": "Method Not Allowed"}


async def test_a_405_of_a_static_file_keeps_its_allow(api: Api) -> None:
    """A static asset's 405 (its mount answers it, no route) keeps its ``Allow: GET, HEAD``: the
    union of the routes' methods, none there, made it an empty ``Allow``, "no method at all"."""
    r = await api.http.post("/docs/static/swagger-ui/swagger-ui.css")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, HEAD"


async def test_admin_key_on_client_route_is_403(api: Api) -> None:
    """Keys are per role: an admin key is not a client key."""
    r = await api.http.get("/v1/jobs", headers={"X-Api-Key": ADMIN_KEY})
    assert r.status_code == 403


async def test_a_job_whose_assign_frame_would_pass_the_frame_limit_is_413(tmp_path: Path) -> None:
    """A body within MAX_BODY_BYTES whose job would reach a socket miner in a job.assign frame
    over WS_MAX_FRAME_BYTES (which the miner's library refuses) is 413, and nothing is stored."""
    async with running_api(tmp_path, max_frame_bytes=2048, max_body_bytes=2048) as api:
        # 1e15 is 4 bytes as sent and 18 as written again (1000000000000000.0).
        body = '{"payload":{"xs":[' + ",".join(["1e15"] * 200) + "]}}"
        headers = {"X-Api-Key": CLIENT_KEY, "Content-Type": "application/json"}
        r = await api.http.post("/v1/jobs", content=body, headers=headers)
        assert r.status_code == 413
        assert r.json() == {
            "detail": "job too large: its job.assign frame would be over 2048 bytes "
            "(WS_MAX_FRAME_BYTES)"
        }
        assert api.core.dispatcher.scheduler.jobs == {}
