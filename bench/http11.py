"""A minimal keep-alive HTTP/1.1 client for load generation.

httpx cost ~3 ms of load-generator CPU per request here, so with it the REST benchmark measured
httpx, not the coordinator. This client does only what the benchmark needs: POST/GET with a
JSON body over pooled keep-alive connections, Content-Length responses (what Starlette sends).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import orjson

__all__ = ["Client", "Response"]


class Response:
    __slots__ = ("body", "method", "path", "status_code")

    def __init__(self, method: str, path: str, status_code: int, body: bytes) -> None:
        self.method, self.path, self.status_code, self.body = method, path, status_code, body

    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


class Client:
    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.host, self.port = host, port
        self._idle: deque[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = deque()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        while self._idle:
            _, writer = self._idle.pop()
            writer.close()

    async def post(
        self, path: str, *, json: Any = None, headers: dict[str, str] | None = None
    ) -> Response:
        return await self.request("POST", path, json=json, headers=headers)

    async def get(self, path: str, *, headers: dict[str, str] | None = None) -> Response:
        return await self.request("GET", path, headers=headers)

    async def request(
        self, method: str, path: str, *, json: Any = None, headers: dict[str, str] | None = None
    ) -> Response:
        body = b"" if json is None else orjson.dumps(json)
        head = [
            f"{method} {path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            f"Content-Length: {len(body)}",
        ]
        if json is not None:
            head.append("Content-Type: application/json")
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        data = ("\r\n".join(head) + "\r\n\r\n").encode() + body
        if self._idle:
            reader, writer = self._idle.popleft()
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        writer.write(data)
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        payload = await reader.readexactly(length) if length else b""
        self._idle.append((reader, writer))
        return Response(method, path, status, payload)
