"""One tiny run of each new bench script (real subprocesses on 127.0.0.1, a few seconds each).

They check that a script runs to the end by itself and writes figures that make sense, not
how fast anything is.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import pytest

from bench.harness import ROOT
from storage.base import JobQuery

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.e2e


def run_script(module: str, name: str, results: Path, *args: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", module, "--runs", "1", "--results", str(results), *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=25, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    out: dict[str, Any] = json.loads((results / f"{name}.json").read_text())
    assert json.loads((results / "machine.json").read_text())["cpus"] >= 1
    return out


def test_ceiling_tiny_run(tmp_path: Path) -> None:
    results = run_script(
        "bench.ceiling", "ceiling", tmp_path, "--jobs", "50", "--only", "100 in flight"
    )
    persisted = "100 in flight, group-committed SQLite"
    assert set(results) == {"100 in flight, no persistence", persisted}
    for (r,) in results.values():
        assert r["jobs"] == 50
        assert r["jobs_per_s"] > 0
        assert 0 < r["assign_p50_ms"] <= r["complete_p50_ms"]


def test_sockets_tiny_run(tmp_path: Path) -> None:
    results = run_script(
        "bench.sockets", "sockets", tmp_path, "--sockets", "20", "--jobs", "20", "--settle", "0.1"
    )
    ((r,),) = results.values()
    assert r["sockets"] == 20
    assert r["handshakes_per_s"] > 0
    assert r["server_rss_mib"] > 0
    assert 0 < r["assign_p50_ms"] <= r["complete_p50_ms"]


@pytest.mark.skipif(
    importlib.util.find_spec("celery") is None or shutil.which("redis-server") is None,
    reason="needs the bench extra (pip install -e '.[bench]') and Debian's redis-server",
)
def test_celery_peer_tiny_run(tmp_path: Path) -> None:
    results = run_script(
        "bench.peers.celery_redis", "celery", tmp_path, "--jobs", "30", "--only", "unloaded"
    )
    ((r,),) = results.values()
    assert r["jobs"] == 30
    assert 0 < r["round_trip_p50_ms"] <= r["round_trip_p99_ms"]


@pytest.mark.anyio
async def test_inproc_runs_every_job_through_the_dispatcher(tmp_path: Path) -> None:
    """bench/inproc.py: every submitted job is completed, committed, and its cost reported."""
    from bench.inproc import run
    from storage.sql import DatabasesJobStore

    out = await run(40, 5, tmp_path, gc_tuned=False, breakdown=True)  # pytest's collector
    assert out["jobs"] == 40
    assert out["cpu_us_per_job"] > 0
    # Both timed parts ran: every job was committed and its receipt signed.
    assert out["commit_us_per_job"] > 0
    assert out["sign_us_per_job"] > 0
    # Each job's rows reached the WAL: at least the pages of its own events and row.
    assert out["wal_pages_per_job"] > 0
    store = DatabasesJobStore(f"sqlite:///{tmp_path / 'inproc.db'}")
    await store.open()
    try:
        assert await store.count_jobs() == {"COMPLETED": 40}
        assert len(await store.list_receipts(None, 100, 0)) == 40
    finally:
        await store.close()


def _timeline(tmp_path: Path, env: dict[str, str], *bench: str) -> dict[str, float]:
    """Run a bench script through bench/timeline.py; its report as {step: median µs}."""
    out = tmp_path / "timeline.txt"
    env = {
        **os.environ,
        **env,
        "BENCH_SERVER_SCRIPT": str(ROOT / "bench" / "timeline.py"),
        "BENCH_TIMELINE_OUT": str(out),
    }
    cmd = [sys.executable, "-m", *bench, "--runs", "1", "--results", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=25, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = out.read_text().splitlines()
    assert lines[0].startswith("server timeline of ")
    steps = [re.fullmatch(r"\s*([\d.]+)  (.*) \(n=\d+\)", line) for line in lines[1:]]
    at = {m[2]: float(m[1]) for m in steps if m is not None}
    # Then the tail: every step's gap over all jobs and over the slowest 2%.
    tail = lines[lines.index(next(x for x in lines if x.startswith("step gaps"))) + 1 :]
    gaps = [re.fullmatch(r"\s*(-?[\d.]+) \|\s*(-?[\d.]+)  (.*)", line) for line in tail]
    assert sorted(m[3] for m in gaps if m is not None) == sorted(at)
    return at


def test_timeline_entry_point_reports_the_steps_of_unloaded_jobs(tmp_path: Path) -> None:
    at = _timeline(tmp_path, {}, "bench.dispatch", "--jobs", "60", "--only", "1 in flight, 1 miner")
    assert 0 < at["commit start"] < at["commit end"] < at["assign written to the socket"]
    assert at["assign written to the socket"] < at["client frames written to the socket"]


def test_timeline_entry_point_follows_a_rest_pickup(tmp_path: Path) -> None:
    at = _timeline(
        tmp_path, {"BENCH_TIMELINE": "rest"}, "bench.rest", "--jobs", "40", "--only", "pickup"
    )
    assert 0 < at["credentials checked"] < at["body validated"] < at["scheduler submit start"]
    assert at["scheduler submit start"] < at["scheduler submit end"] < at["commit start"]
    assert at["commit start"] < at["commit end"]
    assert at["commit end"] < at["job handed to the waiting poll"]
    assert at["job handed to the waiting poll"] < at["poll answer written to the socket"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("protocol", "store"), [("layered", "sqlite"), ("lean", "sqlite"), ("lean", "memory")]
)
async def test_rest_inproc_runs_jobs_through_either_http_protocol(
    tmp_path: Path, protocol: str, store: str
) -> None:
    """bench/rest_inproc.py: submit, poll and result through the protocol; a cost comes back."""
    from bench.rest_inproc import run

    cost = await run(tmp_path / "rest.db", protocol, jobs=30, warmup=10, store=store)
    assert cost > 0
    assert (tmp_path / "rest.db").exists() is (store == "sqlite")


def test_classes_bench_runs_every_case(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import classes

    monkeypatch.setattr(classes, "_settle", lambda: None)  # no gc.freeze() in the test process
    assert classes.queued(50, 20, distinct=True, unservable=50) > 0
    assert classes.queued(50, 20, distinct=False, refuse=True) > 0
    assert classes.idle(50, 20, distinct=True) > 0


@pytest.mark.anyio
async def test_store_scale_builds_what_the_upgrade_keeps_whole(tmp_path: Path) -> None:
    """bench/store_scale.py: a database it builds at version 4 upgrades with every completed
    job's receipt found through its row and the whole chain in order; the lists are timed."""
    from bench import store_scale
    from storage.sql import DatabasesJobStore

    path = tmp_path / "scale.db"
    store_scale.build(path, 40, 4, receipt_bytes=10)
    await store_scale.measure(path, 40)
    store = DatabasesJobStore(f"sqlite:///{path}")
    await store.open()
    try:
        jobs, _ = await store.list_jobs(JobQuery(limit=100, offset=0))
        assert [j.job_id for j in jobs] == [f"{i:032x}" for i in reversed(range(40))]
        assert all(j.receipt is not None and j.receipt["n"] == int(j.job_id, 16) for j in jobs)
        chain = await store.receipt_chain(0, 100)
        assert [(n, r["n"]) for n, r in chain] == [(i + 1, i) for i in range(40)]
    finally:
        await store.close()


def test_store_scale_reports_every_figure(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import store_scale

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["store_scale", "--jobs", "30", "--receipt-bytes", "10"])
        store_scale.main()
    out = capsys.readouterr().out
    assert re.search(r"first start \(migrations\): \d+\.\d s", out), out
    for name in ("100 newest jobs", "a client's 100 newest jobs", "50 newest receipts"):
        assert re.search(rf"{name}: \d+\.\d\d ms", out), out
    assert re.search(r"file: \d+ MB before, \d+ MB after", out), out


@pytest.mark.parametrize("mode", ["off", "nosync", "flush"])
def test_tail_runs_through_each_checkpoint_mode(tmp_path: Path, mode: str) -> None:
    """``bench.tail`` through ``bench/checkpoint_modes.py``: the server starts in every mode
    and the run reports its percentiles and slow jobs."""
    env = {
        **os.environ,
        "CKPT_MODE": mode,
        "BENCH_SERVER_SCRIPT": str(ROOT / "bench" / "checkpoint_modes.py"),
    }
    cmd = [sys.executable, "-m", "bench.tail", "--jobs", "60"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=25, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    first, second = done.stdout.splitlines()
    figures = re.fullmatch(
        r"60 jobs, server \d+ µs CPU/job; submit→assign p50 ([\d.]+) p99 ([\d.]+) "
        r"p99\.9 ([\d.]+) max ([\d.]+) ms",
        first,
    )
    assert figures is not None, first
    p50, p99, p999, top = map(float, figures.groups())
    assert 0 < p50 <= p99 <= p999 <= top
    assert second.startswith("at or above p99 (s:ms): ")
    assert len(second.split()) >= 6  # the p99 job at least


def test_tail_runs_through_the_commit_stall_report(tmp_path: Path) -> None:
    """``bench.tail`` through ``bench/commit_stalls.py``: the server's exit writes the report of
    held-round waits, slow commits and checkpoint rounds."""
    out = tmp_path / "stalls.txt"
    env = {
        **os.environ,
        "STALLS_OUT": str(out),
        "BENCH_SERVER_SCRIPT": str(ROOT / "bench" / "commit_stalls.py"),
    }
    cmd = [sys.executable, "-m", "bench.tail", "--jobs", "60"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=25, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    held, slow, rounds = out.read_text().splitlines()
    number_list = r"(none|[\d.]+( [\d.]+)*)"
    assert re.fullmatch(
        rf"commits that waited for a held checkpoint round \(ms\): {number_list}", held
    )
    assert re.fullmatch(rf"other commits over 5 ms \(ms\): {number_list}", slow)
    assert re.fullmatch(r"checkpoint rounds: \d+, longest [\d.]+ ms", rounds), rounds


@pytest.mark.parametrize("how", ["kill", "term"])
def test_failover_runs_to_a_standby_that_holds_every_job(how: str) -> None:
    """``bench.failover``: the standby takes over after the signal and holds every acked job
    (the script checks that itself and exits non-zero otherwise)."""
    env = {k: v for k, v in os.environ.items() if k != "BENCH_POSTGRES_URL"}
    cmd = [sys.executable, "-m", "bench.failover", "--jobs", "30", "--runs", "1", "--signal", how]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    figure = re.fullmatch(
        rf"SQLite, 30 queued jobs, SIG{how.upper()} → standby ready: median (\d+) ms "
        r"\(min \d+, max \d+\) over 1 runs",
        done.stdout.strip(),
    )
    assert figure is not None, done.stdout
    assert int(figure.group(1)) > 0
