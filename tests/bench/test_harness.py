"""The harness's pure parts: percentiles, run summaries, ratios, job counts, the docs writer."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from bench.harness import (
    DOCS_HEADER,
    ROOT,
    arg_parser,
    cell,
    job_count,
    median_of,
    pct,
    ratio,
    run_plan,
    summary,
    write_section,
)

if TYPE_CHECKING:
    from pathlib import Path


def test_pct_is_nearest_rank_on_sorted_values() -> None:
    values = [float(v) for v in range(100, 0, -1)]  # 100..1, unsorted on purpose
    assert pct(values, 50) == 51.0  # rank round(0.5 * 99) = 50 (0-based) of 1..100
    assert pct(values, 0) == 1.0
    assert pct(values, 100) == 100.0
    assert pct(values, 99) == 99.0
    assert pct([7.0], 99) == 7.0


def test_pct_of_nothing_is_nan() -> None:
    assert math.isnan(pct([], 50))


def test_summary_median_ratio_and_cell() -> None:
    runs = [{"x": 3.0}, {"x": 1.0}, {"x": 2.0}]
    assert summary([3.0, 1.0, 2.0]) == {"min": 1.0, "median": 2.0, "max": 3.0}
    assert median_of(runs, "x") == 2.0
    assert ratio(runs, [{"x": 4.0}, {"x": 8.0}], "x") == pytest.approx(2.0 / 6.0)
    assert cell(runs, "x") == "2 (1-3)"
    assert cell(runs, "x", "{:.2f}") == "2.00 (1.00-3.00)"


def test_job_count_prefers_jobs_then_scales_with_a_floor() -> None:
    p = arg_parser(None)
    assert job_count(p.parse_args([]), 20_000) == 20_000
    assert job_count(p.parse_args(["--scale", "0.1"]), 20_000) == 2_000
    assert job_count(p.parse_args(["--scale", "0.0001"]), 20_000) == 50
    assert job_count(p.parse_args(["--jobs", "7", "--scale", "3"]), 20_000) == 7


def test_run_plan_runs_each_selected_scenario_n_times(capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[str] = []

    def step(name: str) -> dict[str, float]:
        calls.append(name)
        return {"v": float(len(calls))}

    plan = [("a one", lambda: step("a")), ("b two", lambda: step("b"))]
    assert run_plan(plan, 2) == {
        "a one": [{"v": 1.0}, {"v": 2.0}],
        "b two": [{"v": 3.0}, {"v": 4.0}],
    }
    assert run_plan(plan, 1, only="two") == {"b two": [{"v": 5.0}]}
    with pytest.raises(SystemExit, match="no scenario"):
        run_plan(plan, 1, only="three")
    assert "a one run 2" in capsys.readouterr().out


def test_write_section_replaces_inserts_before_reproduce_and_appends(tmp_path: Path) -> None:
    doc = tmp_path / "performance.md"
    write_section("## A (`a.py`)\n\nfirst\n", doc)
    assert doc.read_text() == DOCS_HEADER + "## A (`a.py`)\n\nfirst\n"
    doc.write_text(doc.read_text() + "\n## How to reproduce\n\nmanual\n")
    write_section("## B\n\nbee\n", doc)
    write_section("## A (`a.py`)\n\nsecond\n", doc)
    text = doc.read_text()
    assert "first" not in text
    assert text.index("## A") < text.index("## B") < text.index("## How to reproduce")
    assert text.endswith("## How to reproduce\n\nmanual\n")
    assert "second" in text


PIN_CHECK = """
import os, sys, tempfile
from pathlib import Path
from bench.harness import pin_self, process
pin_self(1)  # what results_for does before it starts any server
marker = Path(tempfile.mkdtemp()) / "up"
child = f"open({str(marker)!r}, 'w').close(); import time; time.sleep(30)"
with process([sys.executable, "-c", child], name="pin", ready=marker.exists, core=0) as p:
    print(sorted(os.sched_getaffinity(0)), sorted(os.sched_getaffinity(p.pid)))
"""


@pytest.mark.skipif(not {0, 1} <= os.sched_getaffinity(0), reason="needs cores 0 and 1")
def test_a_server_started_after_pin_self_runs_on_its_own_core() -> None:
    # Regression: process() used to ask the already pinned load generator how many cores the
    # machine has, saw one, and left the server on the load generator's core.
    out = subprocess.run(
        [sys.executable, "-c", PIN_CHECK], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert out.split("\n")[0] == "[1] [0]"
