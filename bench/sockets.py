"""Connections: thousands of idle miner sockets in one coordinator process.

The coordinator runs as a subprocess pinned to core 0 (fresh SQLite database, open-file limit
raised to its hard limit); this load generator (limit raised too) runs on core 1 and opens
``--sockets`` miner sockets on 127.0.0.1, each a bare asyncio protocol (``bench/rawws.py``):
HTTP upgrade with the miner key, ``hello`` (a GPU no job asks for, so they stay idle), wait for
``welcome``, answer pings. ``--concurrency`` handshakes are in progress at a time.

- handshakes/s: sockets / time from the first connect to the last ``welcome``;
- RSS per socket: the server's VmRSS after every idle socket is welcomed (and ``--settle``
  seconds) minus before the first, divided by the number of sockets;
- dispatch latency: then one more miner (``bench/dispatch.py``'s, the only one with the GPU the
  jobs ask for) and one client run ``--latency-jobs`` jobs one at a time: submit→assign and
  submit→completed p50/p99 while the others idle.

    python -m bench.sockets --runs 3 --write-docs
"""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import orjson

from bench.dispatch import drive
from bench.harness import (
    MINER_KEY,
    arg_parser,
    cell,
    coordinator,
    cpu_seconds,
    in_uvloop,
    measured_on,
    raise_nofile,
    results_for,
    rss_bytes,
    run_count,
    write_section,
)
from bench.rawws import IdleMiner, upgrade_request

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["main", "open_idle", "run_once"]

KIB = 1024


def idle_hello(n: int) -> bytes:
    return orjson.dumps(
        {
            "type": "hello",
            "protocol": 1,
            "miner_id": f"idle-{n}",
            "capabilities": {"gpus": [{"name": "idle-gpu"}]},
            "concurrency": 1,
        }
    )


async def open_idle(port: int, count: int, concurrency: int) -> list[IdleMiner]:
    """Open ``count`` idle miner sockets, at most ``concurrency`` handshakes at a time."""
    loop = asyncio.get_running_loop()
    request = upgrade_request("127.0.0.1", port, "/v1/miners/ws", {"X-Api-Key": MINER_KEY})
    slots = asyncio.Semaphore(concurrency)
    miners: list[IdleMiner] = []
    settled = failed = 0
    all_settled = asyncio.Event()

    def settle(ok: bool) -> None:
        nonlocal settled, failed
        settled += 1
        failed += not ok
        slots.release()
        if settled == count:
            all_settled.set()

    for n in range(count):
        await slots.acquire()
        proto = IdleMiner(request, idle_hello(n), settle)
        miners.append(proto)

        def factory(p: IdleMiner = proto) -> IdleMiner:
            return p

        try:
            await loop.create_connection(factory, "127.0.0.1", port)
        except OSError:
            settle(False)
    if count:
        await all_settled.wait()
    if failed:
        raise RuntimeError(f"{failed} of {count} idle sockets failed to connect or handshake")
    return miners


async def run_once(
    *, sockets: int, concurrency: int, latency_jobs: int, settle: float
) -> dict[str, Any]:
    raise_nofile()
    with coordinator(core=0) as server:
        pid = server.proc.pid
        await anyio.sleep(settle)
        rss0, cpu0, own0 = rss_bytes(pid), cpu_seconds(pid), time.process_time()
        t0 = time.perf_counter()
        with anyio.fail_after(60 + sockets / 100):
            idle = await open_idle(server.port, sockets, concurrency)
        elapsed = time.perf_counter() - t0
        cpu, own = cpu_seconds(pid) - cpu0, time.process_time() - own0
        await anyio.sleep(settle)
        rss1 = rss_bytes(pid)
        lat = await drive(
            pid=pid,
            miner_url=server.url("/v1/miners/ws"),
            client_url=server.url("/v1/jobs/ws"),
            jobs=latency_jobs,
            inflight=1,
            miners=1,
            clients=1,
        )
        dropped = sum(m.closed for m in idle)
        for m in idle:
            if m.transport is not None:
                m.transport.abort()
        await anyio.sleep(settle)  # let the server see the disconnects before it is stopped
    if dropped:
        raise RuntimeError(f"the server closed {dropped} of {sockets} idle sockets")
    return {
        "sockets": sockets,
        "handshakes_per_s": sockets / elapsed,
        "rss_kib_per_socket": (rss1 - rss0) / sockets / KIB,
        "server_rss_mib": rss1 / KIB / KIB,
        "server_cpu_us_per_handshake": cpu / sockets * 1e6,
        "loadgen_cpu_pct": own / elapsed * 100,
        "assign_p50_ms": lat["assign_p50_ms"],
        "assign_p99_ms": lat["assign_p99_ms"],
        "complete_p50_ms": lat["complete_p50_ms"],
        "complete_p99_ms": lat["complete_p99_ms"],
    }


def render(results: dict[str, list[dict[str, Any]]]) -> str:
    ms, one = "{:.2f}", "{:.1f}"
    lines = [
        "| scenario | handshakes/s | server CPU µs/handshake | load generator CPU % "
        "| RSS KiB/socket | server RSS MiB | submit→assign p50 / p99 ms "
        "| submit→completed p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rs in results.items():
        lines.append(
            f"| {name} | {cell(rs, 'handshakes_per_s')} "
            f"| {cell(rs, 'server_cpu_us_per_handshake')} | {cell(rs, 'loadgen_cpu_pct')} "
            f"| {cell(rs, 'rss_kib_per_socket', one)} | {cell(rs, 'server_rss_mib')} "
            f"| {cell(rs, 'assign_p50_ms', ms)} / {cell(rs, 'assign_p99_ms', ms)} "
            f"| {cell(rs, 'complete_p50_ms', ms)} / {cell(rs, 'complete_p99_ms', ms)} |"
        )
    return "\n".join(lines)


def write_docs(table: str, runs: int, concurrency: int, out: Path) -> None:
    write_section(
        "## Connections: idle miner sockets (`bench/sockets.py`)\n\n"
        f"{measured_on(out)}; coordinator pinned to core 0 (open-file limit raised to the hard "
        "limit), load generator on core 1 with bare asyncio sockets (`bench/rawws.py`: upgrade, "
        f"`hello`, `welcome`, pongs), {concurrency} handshakes in progress at a time. "
        "handshakes/s counts from the first connect to the last `welcome`; RSS per socket is the "
        "server's VmRSS growth over the idle sockets divided by their number; the latencies are "
        "one more miner's (the only one with the GPU the jobs ask for), one job at a time, "
        f"while the others idle. Median (min-max) over {runs} runs.\n\n"
        f"{table}\n"
    )


def main() -> None:
    p = arg_parser(__doc__)
    p.add_argument("--sockets", type=int, default=10_000, help="idle miner sockets")
    p.add_argument("--concurrency", type=int, default=200, help="handshakes in progress")
    p.add_argument("--latency-jobs", type=int, default=1_000)
    p.add_argument("--settle", type=float, default=1.0, help="seconds before reading RSS")
    a = p.parse_args()
    job = partial(
        run_once,
        sockets=a.sockets,
        concurrency=a.concurrency,
        latency_jobs=a.jobs or a.latency_jobs,
        settle=a.settle,
    )
    results = results_for(
        a, "sockets", lambda: [(f"{a.sockets:,} idle miner sockets", in_uvloop(job))]
    )
    table = render(results)
    print(table)
    if a.write_docs:
        write_docs(table, run_count(results), a.concurrency, a.results)


if __name__ == "__main__":
    main()
