"""REST compatibility path: jobs/s with long-polling miners, long-poll pickup latency.

Same set-up as ``bench/dispatch.py``: the coordinator runs as a subprocess pinned to core 0
(fresh SQLite database, every transition durable), this load generator runs on core 1 (uvloop,
one ``Client`` with a 200-connection pool). Every timestamp is ``perf_counter`` in
this process.

- ``REST, 50 pollers``: 50 REST miners (distinct ``X-Miner-ID``, concurrency 1) each loop
  ``POST /v1/miners/poll {"max_wait_seconds": 5}`` and, on 200, post the result at once.
  Clients ``POST /v1/jobs`` with at most ``--inflight`` (100) jobs outstanding, a job stops
  being outstanding when its ``POST /v1/miners/{job_id}/result`` returns 200. jobs/s counts
  accepted results; submit→assigned runs from the start of the client's submit request to
  the miner receiving the poll response with that job; submit→result accepted to the 200 of
  the result post.
- ``mixed``: the same with 25 REST miners and 25 socket miners (``/v1/miners/ws``,
  concurrency 1) on one queue; a socket result counts when the server acks its ``job.result``.
- ``long-poll pickup``: one REST miner parked in a long-poll; one job at a time is submitted
  ``--park-ms`` after the poll was sent (so that it waits on the server), and the latency is
  submit request start → poll response received. Target: p99 ≤ 2 ms.

    python -m bench.rest --runs 3 --write-docs
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import orjson
from websockets.asyncio.client import connect

from bench.harness import (
    CLIENT_KEY,
    MINER_KEY,
    Plan,
    arg_parser,
    cell,
    coordinator,
    cpu_seconds,
    in_uvloop,
    job_count,
    measured_on,
    pct,
    results_for,
    run_count,
    write_section,
)
from bench.http11 import Client, Response

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

__all__ = ["main", "run_pickup", "run_throughput"]

JOB = {"payload": {"type": "bench"}, "constraints": {"gpu": "A100"}}
CAPABILITIES = {"gpus": [{"name": "A100"}]}
CLIENT_HEADERS = {"X-Api-Key": CLIENT_KEY}
POLL = {"max_wait_seconds": 5}  # the field clients' value: the server answers 204 after 4 s
RESULT = {"result": {"ok": True}, "metrics": {}}
ENV = {"RATE_LIMIT_PER_MINUTE": "0"}


def http_client(port: int) -> Client:
    return Client(port)


def miner_headers(miner_id: str) -> dict[str, str]:
    return {"X-Api-Key": MINER_KEY, "X-Miner-ID": miner_id}


def expect(r: Response, status: int) -> Response:
    if r.status_code != status:
        raise RuntimeError(f"{r.method} {r.path}: {r.status_code} {r.text}")
    return r


async def register(http: Client, miner_id: str) -> None:
    body = {"capabilities": CAPABILITIES, "concurrency": 1}
    expect(await http.post("/v1/miners/register", json=body, headers=miner_headers(miner_id)), 200)


@dataclass
class Trace:
    sent: dict[str, float] = field(default_factory=dict)  # job id -> submit request start
    assigned: dict[str, float] = field(default_factory=dict)  # job id -> miner got it
    accepted: dict[str, float] = field(default_factory=dict)  # job id -> result accepted
    by_rest: int = 0
    by_socket: int = 0


async def rest_miner(
    http: Client, miner_id: str, trace: Trace, on_done: Callable[[], None]
) -> None:
    headers = miner_headers(miner_id)
    while True:
        r = await http.post("/v1/miners/poll", json=POLL, headers=headers)
        if r.status_code == 204:
            continue
        t = time.perf_counter()
        job_id = expect(r, 200).json()["job_id"]
        trace.assigned[job_id] = t
        expect(await http.post(f"/v1/miners/{job_id}/result", json=RESULT, headers=headers), 200)
        trace.accepted[job_id] = time.perf_counter()
        trace.by_rest += 1
        on_done()


async def socket_miner(
    url: str, n: int, ready: anyio.Event, trace: Trace, on_done: Callable[[], None]
) -> None:
    async with connect(
        url, additional_headers={"X-Api-Key": MINER_KEY}, compression=None, max_queue=None
    ) as ws:
        hello = {
            "type": "hello",
            "protocol": 1,
            "miner_id": f"bench-ws-{n}",
            "capabilities": CAPABILITIES,
            "concurrency": 1,
        }
        await ws.send(orjson.dumps(hello).decode())
        await ws.recv()
        ready.set()
        async for raw in ws:
            msg = orjson.loads(raw)
            kind = msg["type"]
            if kind == "job.assign":
                job_id, attempt = msg["job_id"], msg["attempt"]
                trace.assigned[job_id] = time.perf_counter()
                accept = {"type": "job.accept", "job_id": job_id, "attempt": attempt}
                await ws.send(orjson.dumps(accept).decode())
                result = {"type": "job.result", "id": job_id, "job_id": job_id, "attempt": attempt}
                await ws.send(orjson.dumps({**result, **RESULT}).decode())
            elif kind == "ack" and msg["id"] in trace.assigned:
                trace.accepted[msg["id"]] = time.perf_counter()
                trace.by_socket += 1
                on_done()
            elif kind == "error":
                raise RuntimeError(f"socket miner: {msg}")


async def rest_client(http: Client, n: int, slots: anyio.Semaphore, trace: Trace) -> None:
    for _ in range(n):
        await slots.acquire()
        t = time.perf_counter()
        r = expect(await http.post("/v1/jobs", json=JOB, headers=CLIENT_HEADERS), 201)
        trace.sent[r.json()["job_id"]] = t


async def run_throughput(
    *, jobs: int, inflight: int, rest_miners: int, socket_miners: int, clients: int
) -> dict[str, Any]:
    trace = Trace()
    with coordinator(core=0, env=ENV) as server:
        async with http_client(server.port) as http, anyio.create_task_group() as tg:
            slots = anyio.Semaphore(inflight)
            finished = anyio.Event()

            def on_done() -> None:
                slots.release()
                if len(trace.accepted) >= jobs:
                    finished.set()

            for n in range(rest_miners):
                await register(http, f"bench-rest-{n}")
                tg.start_soon(rest_miner, http, f"bench-rest-{n}", trace, on_done)
            for n in range(socket_miners):
                ready = anyio.Event()
                url = f"ws://127.0.0.1:{server.port}/v1/miners/ws"
                tg.start_soon(socket_miner, url, n, ready, trace, on_done)
                await ready.wait()
            await anyio.sleep(0.2)  # let every first poll park
            cpu0, own0 = cpu_seconds(server.proc.pid), time.process_time()
            t0 = time.perf_counter()
            for c in range(clients):
                share = jobs // clients + (1 if c < jobs % clients else 0)
                tg.start_soon(rest_client, http, share, slots, trace)
            with anyio.fail_after(600):
                await finished.wait()
            elapsed = time.perf_counter() - t0
            cpu = cpu_seconds(server.proc.pid) - cpu0
            own = time.process_time() - own0
            tg.cancel_scope.cancel()
    assign_ms, accept_ms = [], []
    for job_id, t_sent in trace.sent.items():
        if job_id in trace.assigned:
            assign_ms.append((trace.assigned[job_id] - t_sent) * 1000)
        if job_id in trace.accepted:
            accept_ms.append((trace.accepted[job_id] - t_sent) * 1000)
    done = len(trace.accepted)
    return {
        "jobs": done,
        "jobs_per_s": done / elapsed,
        "server_cpu_us_per_job": cpu / max(1, done) * 1e6,
        "loadgen_cpu_us_per_job": own / max(1, done) * 1e6,
        "rest_share_pct": trace.by_rest / max(1, done) * 100,
        "assign_p50_ms": pct(assign_ms, 50),
        "assign_p99_ms": pct(assign_ms, 99),
        "accepted_p50_ms": pct(accept_ms, 50),
        "accepted_p99_ms": pct(accept_ms, 99),
    }


async def run_pickup(*, jobs: int, park_ms: float) -> dict[str, Any]:
    pickup_ms, submit_ms = [], []
    with coordinator(core=0, env=ENV) as server:
        async with http_client(server.port) as http:
            await register(http, "bench-pickup")
            headers = miner_headers("bench-pickup")
            for _ in range(jobs):
                got: dict[str, Any] = {}

                async def poll(got: dict[str, Any] = got) -> None:
                    r = await http.post("/v1/miners/poll", json=POLL, headers=headers)
                    got["t"], got["r"] = time.perf_counter(), r

                with anyio.fail_after(30):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(poll)
                        await anyio.sleep(park_ms / 1000)  # the poll parks on the server
                        t0 = time.perf_counter()
                        r = await http.post("/v1/jobs", json=JOB, headers=CLIENT_HEADERS)
                        submit_ms.append((time.perf_counter() - t0) * 1000)
                        job_id = expect(r, 201).json()["job_id"]
                got_id = expect(got["r"], 200).json()["job_id"]
                if got_id != job_id:
                    raise RuntimeError(f"poll returned {got_id}, submitted {job_id}")
                pickup_ms.append((got["t"] - t0) * 1000)
                path = f"/v1/miners/{job_id}/result"
                expect(await http.post(path, json=RESULT, headers=headers), 200)
    return {
        "jobs": len(pickup_ms),
        "pickup_p50_ms": pct(pickup_ms, 50),
        "pickup_p99_ms": pct(pickup_ms, 99),
        "pickup_max_ms": max(pickup_ms),
        "submit_p50_ms": pct(submit_ms, 50),
        "submit_p99_ms": pct(submit_ms, 99),
    }


THROUGHPUT = [
    # name, rest miners, socket miners, jobs
    ("REST, 50 pollers", 50, 0, 10_000),
    ("mixed, 25 REST + 25 socket miners", 25, 25, 10_000),
]
PICKUP = ("long-poll pickup, 1 waiting poller", 1_000)


def render(results: dict[str, list[dict[str, Any]]]) -> str:
    ms = "{:.2f}"
    lines = [
        "| scenario | jobs/s | server CPU µs/job | load generator CPU µs/job "
        "| jobs run by REST miners % "
        "| submit→assigned p50 / p99 ms | submit→result accepted p50 / p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rs in results.items():
        if "jobs_per_s" not in rs[0]:
            continue
        lines.append(
            f"| {name} | {cell(rs, 'jobs_per_s')} | {cell(rs, 'server_cpu_us_per_job')} "
            f"| {cell(rs, 'loadgen_cpu_us_per_job')} | {cell(rs, 'rest_share_pct')} "
            f"| {cell(rs, 'assign_p50_ms', ms)} / {cell(rs, 'assign_p99_ms', ms)} "
            f"| {cell(rs, 'accepted_p50_ms', ms)} / {cell(rs, 'accepted_p99_ms', ms)} |"
        )
    lines += [
        "",
        "| scenario | jobs | submit→poll response p50 / p99 / max ms | submit (201) p50 / p99 ms |",
        "|---|---|---|---|",
    ]
    for name, rs in results.items():
        if "pickup_p50_ms" not in rs[0]:
            continue
        lines.append(
            f"| {name} | {rs[0]['jobs']} "
            f"| {cell(rs, 'pickup_p50_ms', ms)} / {cell(rs, 'pickup_p99_ms', ms)} "
            f"/ {cell(rs, 'pickup_max_ms', ms)} "
            f"| {cell(rs, 'submit_p50_ms', ms)} / {cell(rs, 'submit_p99_ms', ms)} |"
        )
    return "\n".join(lines)


def write_docs(table: str, runs: int, inflight: int, park_ms: float, out: Path) -> None:
    write_section(
        "## REST compatibility path (`bench/rest.py`)\n\n"
        f"{measured_on(out)}; same set-up as above (coordinator pinned to core 0, load "
        "generator on core 1, one `Client` with a 200-connection pool). "
        f"Median (min-max) over {runs} runs; every latency is measured in the load generator "
        "from the start of the client's `POST /v1/jobs`.\n\n"
        "- Throughput rows: miners (concurrency 1 each) loop `POST /v1/miners/poll "
        '{"max_wait_seconds": 5}` and post the result as soon as a poll returns a job; socket '
        "miners accept and send `job.result` as soon as a job is pushed. Clients keep at most "
        f"{inflight} jobs outstanding; a job stops being outstanding when its result is accepted "
        "(200 from `POST /v1/miners/{job_id}/result`, or the ack of the socket `job.result`), "
        "which is what jobs/s counts. submit→assigned ends when the miner receives the poll "
        "response (or `job.assign`) carrying the job.\n"
        "- Pickup row: one REST miner; each job is submitted "
        f"{park_ms:g} ms after its poll was sent, so the poll is already parked on the server; "
        "the latency ends when the poll response is received (target: p99 ≤ 2 ms).\n\n"
        f"{table}\n"
    )


def main() -> None:
    p = arg_parser(__doc__)
    p.add_argument("--inflight", type=int, default=100)
    p.add_argument("--clients", type=int, default=4, help="concurrent submitting tasks")
    p.add_argument("--park-ms", type=float, default=5.0, help="pause before each pickup submit")
    a = p.parse_args()
    jobs = partial(job_count, a)

    def plan() -> Plan:
        steps: Plan = [
            (
                name,
                in_uvloop(
                    partial(
                        run_throughput,
                        jobs=jobs(n),
                        inflight=a.inflight,
                        rest_miners=rest,
                        socket_miners=sock,
                        clients=a.clients,
                    )
                ),
            )
            for name, rest, sock, n in THROUGHPUT
        ]
        pickup = partial(run_pickup, jobs=jobs(PICKUP[1]), park_ms=a.park_ms)
        return [*steps, (PICKUP[0], in_uvloop(pickup))]

    results = results_for(a, "rest", plan)
    table = render(results)
    print(table)
    if a.write_docs:
        write_docs(table, run_count(results), a.inflight, a.park_ms, a.results)


if __name__ == "__main__":
    main()
