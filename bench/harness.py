"""Shared benchmark plumbing: start the coordinator as a pinned subprocess, stats helpers."""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parent.parent
CLIENT_KEY = "bench-client-key-0001"
MINER_KEY = "bench-miner-key-00001"
ADMIN_KEY = "bench-admin-key-00001"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


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


@contextmanager
def coordinator(*, core: int | None = 0, env: dict[str, str] | None = None) -> Iterator[Server]:
    """Run ``aitbc-coordinator serve`` on a fresh database, pinned to ``core``."""
    tmp = Path(tempfile.mkdtemp(prefix="aitbc-bench-"))
    port = free_port()
    # BENCH_SERVER_SCRIPT: run an instrumented entry point instead (profiling experiments).
    entry = os.environ.get("BENCH_SERVER_SCRIPT")
    cmd = [
        sys.executable,
        *([entry] if entry else ["-m", "web.cli"]),
        "serve",
        "--port",
        str(port),
        "--db",
        str(tmp / "bench.db"),
        "--log-level",
        "warning",
    ]
    if core is not None and len(cores()) > 1:
        cmd = ["taskset", "-c", str(core), *cmd]
    full_env = {
        **os.environ,
        "CLIENT_API_KEYS": CLIENT_KEY,
        "MINER_API_KEYS": MINER_KEY,
        "ADMIN_API_KEYS": ADMIN_KEY,
        "RECEIPT_SIGNING_KEY_HEX": "42" * 32,
        "PYTHONPATH": str(ROOT),
        **(env or {}),
    }
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen(cmd, env=full_env, cwd=ROOT, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("coordinator did not start")
            time.sleep(0.05)
        yield Server(port, proc, tmp / "bench.db")
    except BaseException:
        print(f"coordinator log: {tmp / 'server.log'}", file=sys.stderr)
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def cpu_seconds(pid: int) -> float:
    """User+system CPU seconds a process has used (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def machine_info() -> dict[str, Any]:
    import importlib.metadata as md
    import sqlite3

    versions = {
        name: md.version(name)
        for name in (
            "starlette",
            "uvicorn",
            "websockets",
            "uvloop",
            "orjson",
            "cryptography",
        )
    }
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "versions": versions,
    }


def measured_on() -> str:
    """The "Measured <date> on <machine> …" sentence, from bench/results/machine.json."""
    out = ROOT / "bench" / "results" / "machine.json"
    m = json.loads(out.read_text()) if out.exists() else machine_info()
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
