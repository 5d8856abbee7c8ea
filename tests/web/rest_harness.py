"""In-process REST harness: the app on a ``FakeClock``, httpx over ASGI, lifespan managed."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import httpx

from dispatcher.clock import SystemClock
from tests.conftest import ADMIN_KEY, CLIENT_KEY, MINER_KEY, make_settings
from web.app import create_app

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable
    from pathlib import Path

    from dispatcher.clock import Clock
    from storage.base import Store
    from tests.fakes import RecordingStore


class Api:
    def __init__(self, http: httpx.AsyncClient, app: Any, clock: Any) -> None:
        self.http = http
        self.app = app
        self.clock = clock

    @property
    def core(self) -> Any:
        return self.app.state.core

    async def submit(self, key: str = CLIENT_KEY, **body: Any) -> dict[str, Any]:
        body.setdefault("payload", {"type": "inference", "prompt": "hi"})
        r = await self.http.post("/v1/jobs", json=body, headers={"X-Api-Key": key})
        assert r.status_code == 201, r.text
        data: dict[str, Any] = r.json()
        return data

    async def job(self, job_id: str, key: str = CLIENT_KEY) -> dict[str, Any]:
        r = await self.http.get(f"/v1/jobs/{job_id}", headers={"X-Api-Key": key})
        assert r.status_code == 200, r.text
        data: dict[str, Any] = r.json()
        return data

    async def register(
        self, miner_id: str | None = "m1", key: str = MINER_KEY, **body: Any
    ) -> httpx.Response:
        body.setdefault("capabilities", {})
        return await self.http.post(
            "/v1/miners/register", json=body, headers=miner_headers(miner_id, key)
        )

    async def poll(
        self, miner_id: str | None = "m1", max_wait: int = 1, key: str = MINER_KEY
    ) -> httpx.Response:
        return await self.http.post(
            "/v1/miners/poll",
            json={"max_wait_seconds": max_wait},
            headers=miner_headers(miner_id, key),
        )

    async def result(
        self, job_id: str, miner_id: str | None = "m1", key: str = MINER_KEY, **body: Any
    ) -> httpx.Response:
        body.setdefault("result", {"output": "x"})
        return await self.http.post(
            f"/v1/miners/{job_id}/result", json=body, headers=miner_headers(miner_id, key)
        )

    async def cancel(self, job_id: str, key: str = CLIENT_KEY) -> httpx.Response:
        return await self.http.post(f"/v1/jobs/{job_id}/cancel", headers={"X-Api-Key": key})

    async def admin(self, path: str) -> dict[str, Any]:
        r = await self.http.get(path, headers={"X-Api-Key": ADMIN_KEY})
        assert r.status_code == 200, r.text
        data: dict[str, Any] = r.json()
        return data

    async def settle(self) -> None:
        with anyio.fail_after(5):
            await anyio.wait_all_tasks_blocked()


async def answered_after_commit(
    api: Api, store: RecordingStore, *requests: tuple[str, Awaitable[httpx.Response]]
) -> list[tuple[str, int]]:
    """Send ``requests`` one after the other, each once the previous one's commit is in
    flight (commits held), check that none is answered before the commits are released, and
    return their ``(name, status)`` in the order they were answered."""
    answers: list[tuple[str, int]] = []

    async def answer(name: str, request: Awaitable[httpx.Response]) -> None:
        answers.append((name, (await request).status_code))

    store.block_commits()
    async with anyio.create_task_group() as tg:
        for name, request in requests:
            tg.start_soon(answer, name, request)
            await api.settle()
        assert answers == []
        store.release_commits()
    return answers


def miner_headers(miner_id: str | None, key: str = MINER_KEY) -> dict[str, str]:
    headers = {"X-Api-Key": key}
    if miner_id is not None:
        headers["X-Miner-ID"] = miner_id
    return headers


@asynccontextmanager
async def running_api(
    tmp_path: Path, clock: Clock | None = None, store: Store | None = None, **settings: Any
) -> AsyncIterator[Api]:
    clock = SystemClock() if clock is None else clock
    app = create_app(make_settings(tmp_path, **settings), store=store, clock=clock)
    with anyio.fail_after(20):
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                yield Api(http, app, clock)
