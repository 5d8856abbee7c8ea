"""Shared benchmark plumbing: pinned subprocesses, stats, results files, the docs writer."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import httpx

if TYPE_CHECKING:
    from collections.abc import Awaitable, Iterator

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"  # gitignored: every run's raw figures
CLIENT_KEY = "bench-client-key-0001"
MINER_KEY = "bench-miner-key-00001"
ADMIN_KEY = "bench-admin-key-00001"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The cores this machine lets us use, read once at import: ``pin_self`` shrinks this process's
# own affinity mask, and the servers it starts afterwards must still be pinned to another core.
MACHINE_CORES = sorted(os.sched_getaffinity(0))


def cores() -> list[int]:
    return MACHINE_CORES


def pin_self(core: int | None) -> None:
    if core is not None and core in cores():
        os.sched_setaffinity(0, {core})


@dataclass
class Server:
    port: int
    proc: subprocess.Popen[bytes]
    db: Path

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"


def raise_nofile() -> int:
    """Raise this process's open-file soft limit to its hard limit; return the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def http_ok(port: int, path: str) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def scratch(name: str) -> Iterator[Path]:
    """A fresh temporary folder, removed afterwards unless an exception left it to look at."""
    path = Path(tempfile.mkdtemp(prefix=f"aitbc-bench-{name}-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextmanager
def process(
    cmd: list[str],
    *,
    name: str,
    ready: Callable[[], bool],
    core: int | None = 0,
    env: dict[str, str] | None = None,
    timeout: float = 20,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` pinned to ``core`` (open-file limit raised), until ``ready()`` holds.

    Output goes to ``<tmp>/<name>.log`` (printed on failure); the process is terminated, then
    killed, on exit.
    """
    pinned = core is not None and len(cores()) > 1
    if pinned:
        cmd = ["taskset", "-c", str(core), *cmd]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    raise_nofile()  # the child inherits it (no preexec_fn: not safe with threads)
    with scratch(name) as tmp, open(tmp / f"{name}.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=full_env, cwd=ROOT, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + timeout
            while not ready():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start")
                time.sleep(0.05)
            if pinned and os.sched_getaffinity(proc.pid) != {core}:
                raise RuntimeError(f"{name} is not pinned to core {core}")
            yield proc
        except BaseException:
            print(f"{name} log: {tmp / (name + '.log')}", file=sys.stderr)
            raise
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def coordinator(*, core: int | None = 0, env: dict[str, str] | None = None) -> Iterator[Server]:
    """Run ``aitbc-coordinator serve`` on a fresh database, pinned to ``core``."""
    with scratch("db") as tmp:
        yield from _coordinator(tmp, core, env)


def _coordinator(tmp: Path, core: int | None, env: dict[str, str] | None) -> Iterator[Server]:
    port = free_port()
    # BENCH_SERVER_SCRIPT: run an instrumented entry point instead (profiling experiments).
    entry = os.environ.get("BENCH_SERVER_SCRIPT")
    # BENCH_POSTGRES_URL (a server's maintenance database, e.g.
    # postgresql://postgres@127.0.0.1:5432/postgres): run on a fresh PostgreSQL database of that
    # server instead of a SQLite file; it is dropped afterwards. The server is not pinned.
    postgres = os.environ.get("BENCH_POSTGRES_URL")
    with fresh_postgres(postgres) if postgres else nullcontext(None) as database_url:
        cmd = [
            sys.executable,
            *([entry] if entry else ["-m", "web.cli"]),
            "serve",
            "--port",
            str(port),
            *([] if database_url else ["--db", str(tmp / "bench.db")]),
            "--log-level",
            "warning",
        ]
        full_env = {
            "CLIENT_API_KEYS": CLIENT_KEY,
            "MINER_API_KEYS": MINER_KEY,
            "ADMIN_API_KEYS": ADMIN_KEY,
            "RECEIPT_SIGNING_KEY_HEX": "42" * 32,
            **({"DATABASE_URL": database_url} if database_url else {}),
            **(env or {}),
        }
        ready = partial(http_ok, port, "/health/ready")
        with process(cmd, name="coordinator", ready=ready, core=core, env=full_env) as proc:
            yield Server(port, proc, tmp / "bench.db")


@contextmanager
def fresh_postgres(server_url: str) -> Iterator[str]:
    """A new empty database on the PostgreSQL server ``server_url`` names, dropped on exit."""
    import asyncpg

    name = f"bench_{secrets.token_hex(6)}"

    async def execute(sql: str) -> None:
        conn = await asyncpg.connect(server_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def run(sql: str) -> None:  # on a thread of its own: the caller may be in an event loop
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, execute(sql)).result()

    run(f"CREATE DATABASE {name}")
    try:
        yield server_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        run(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def cpu_seconds(pid: int) -> float:
    """User+system CPU seconds a process has used (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def pct(values: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank on the sorted values); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    values: list[float] = [r[key] for r in runs]
    return statistics.median(values)


def ratio(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], key: str) -> float:
    """Median of ``key`` over our runs divided by its median over theirs."""
    return median_of(ours, key) / median_of(theirs, key)


def cell(runs: list[dict[str, Any]], key: str, fmt: str = "{:.0f}") -> str:
    """``median (min-max)`` of ``key`` over the runs, for a report table."""
    s = summary([r[key] for r in runs])
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})"


def machine_info() -> dict[str, Any]:
    import importlib.metadata as md
    import sqlite3

    versions = {}
    for name in (
        "starlette",
        "uvicorn",
        "websockets",
        "uvloop",
        "orjson",
        "cryptography",
        "celery",
        "redis",
    ):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass  # the bench extra is not installed: no peer figures either
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "versions": versions,
    }


def arg_parser(doc: str | None, **defaults: Any) -> argparse.ArgumentParser:
    """The options every bench script takes (``defaults`` overrides their defaults)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--scale", type=float, default=1.0, help="multiply job counts")
    p.add_argument("--jobs", type=int, help="jobs per scenario (overrides --scale)")
    p.add_argument("--write-docs", action="store_true", help="rewrite docs/performance.md")
    p.add_argument(
        "--from-results", action="store_true", help="do not measure: render the results file"
    )
    p.add_argument("--results", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--only", metavar="TEXT", help="run only the scenarios whose name has TEXT")
    p.set_defaults(**defaults)
    return p


def job_count(args: argparse.Namespace, default: int) -> int:
    """A scenario's job count: ``--jobs``, else ``default`` times ``--scale`` (at least 50)."""
    return int(args.jobs) if args.jobs else max(50, int(default * args.scale))


def save_results(out: Path, name: str, results: Any, machine: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    (out / "machine.json").write_text(json.dumps(machine, indent=2))


def load_results(out: Path, name: str) -> Any:
    """``<out>/<name>.json``, or None when that benchmark has not run."""
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def need_results(out: Path, name: str) -> Any:
    results = load_results(out, name)
    if results is None:
        raise SystemExit(f"no {out / (name + '.json')}: run the benchmark first")
    return results


def run_plan(
    plan: list[tuple[str, Callable[[], dict[str, Any]]]], runs: int, only: str | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Run every scenario (whose name has ``only``) ``runs`` times, one after another; print
    each run as it ends."""
    results: dict[str, list[dict[str, Any]]] = {}
    plan = [(name, job) for name, job in plan if only is None or only in name]
    if not plan:
        raise SystemExit(f"no scenario name has {only!r}")
    for name, job in plan:
        for run in range(runs):
            r = job()
            results.setdefault(name, []).append(r)
            shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
            print(f"{name} run {run + 1}: {json.dumps(shown)}", flush=True)
    return results


Plan = list[tuple[str, Callable[[], dict[str, Any]]]]


def results_for(
    args: argparse.Namespace, name: str, plan: Callable[[], Plan]
) -> dict[str, list[dict[str, Any]]]:
    """``<results>/<name>.json`` with ``--from-results``; else measure: the load generator
    pinned to core 1, every scenario of ``plan()`` run ``--runs`` times, the results saved."""
    if args.from_results:
        return need_results(args.results, name)  # type: ignore[no-any-return]
    machine = machine_info()  # before pinning: the affinity mask shrinks to one core
    pin_self(1)
    results = run_plan(plan(), args.runs, args.only)
    save_results(args.results, name, results, machine)
    return results


def run_count(results: dict[str, list[dict[str, Any]]]) -> int:
    """How many runs each scenario had (the docs say "over N runs")."""
    return len(next(iter(results.values())))


def in_uvloop(fn: Callable[[], Awaitable[dict[str, Any]]]) -> Callable[[], dict[str, Any]]:
    """A plan step that runs the coroutine function ``fn`` in a fresh uvloop event loop."""
    return lambda: anyio.run(fn, backend_options={"use_uvloop": True})


def measured_on(out: Path = RESULTS) -> str:
    """The "Measured <date> on <machine> …" sentence, from ``<out>/machine.json``."""
    m = load_results(out, "machine") or machine_info()
    libs = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    return (
        f"Measured {m['date']} on {m['machine']} with {m['cpus']} cores, Python {m['python']}, "
        f"SQLite {m['sqlite']} ({libs})"
    )


DOCS_HEADER = (
    "# Performance\n\n"
    "Every figure below is written by the benchmark harness (`make bench`), never typed by "
    "hand.\n\n"
)
TRAILING_SECTION = "## How to reproduce"


def write_section(section: str, path: Path | None = None) -> None:
    """Replace the ``## `` section of ``path`` whose heading line starts ``section``'s heading.

    A new section goes before "How to reproduce" (kept last), else at the end of the file.
    """
    path = path or ROOT / "docs" / "performance.md"
    heading = section.split("\n", 1)[0]
    assert heading.startswith("## "), heading
    text = path.read_text() if path.exists() else DOCS_HEADER
    start = text.find(heading)
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + ("" if end < 0 else text[end:])
    else:
        at = text.find(TRAILING_SECTION)
        if at >= 0:
            text = text[:at] + section + "\n" + text[at:]
        else:
            text = text.rstrip() + "\n\n" + section
    path.write_text(text)
