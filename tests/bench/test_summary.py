"""bench/summary.py: target figures and verdicts computed from results files."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest

from bench.summary import (
    SOURCES,
    TARGETS,
    Target,
    evaluate,
    fewest_runs,
    load_all,
    main,
    render,
)

if TYPE_CHECKING:
    from pathlib import Path


def runs(key: str, *values: float) -> list[dict[str, Any]]:
    return [{key: v} for v in values]


def full_results(n: int = 3) -> dict[str, Any]:
    """Every source, with ``n`` runs per scenario, all targets met by a margin."""
    three = [1.0] * n

    def rs(**fields: float) -> list[dict[str, float]]:
        return [{k: v * f for k, v in fields.items()} for f in three]

    return {
        "ceiling": {
            "100 in flight, no persistence": rs(jobs_per_s=10_000),
            "100 in flight, group-committed SQLite": rs(jobs_per_s=8_000),
        },
        "dispatch": {
            "100 in flight, 1 miner": rs(jobs_per_s=6_000),
            "1 in flight, 1 miner (unloaded)": rs(
                assign_p50_ms=0.3, assign_p99_ms=0.8, complete_p50_ms=0.6, complete_p99_ms=1.0
            ),
        },
        "rest": {
            "REST, 50 pollers": rs(jobs_per_s=2_500),
            "long-poll pickup, 1 waiting poller": rs(pickup_p99_ms=1.5),
        },
        "sockets": {"10,000 idle miner sockets": rs(rss_kib_per_socket=20, handshakes_per_s=3000)},
        "celery": {
            "100 in flight": rs(jobs_per_s=1_000),
            "1 in flight (unloaded round trip)": rs(round_trip_p50_ms=2.0, round_trip_p99_ms=4.0),
        },
    }


def test_every_target_met_on_good_figures() -> None:
    rows = evaluate(full_results())
    assert [r.status for r in rows if r.target.bound is not None] == ["met"] * 10
    assert [r.status for r in rows if r.target.bound is None] == ["context"]
    by_label = {r.target.label: r.value for r in rows}
    assert by_label[TARGETS[0].label] == pytest.approx(0.6)  # 6000 / 10000
    assert by_label[TARGETS[1].label] == pytest.approx(0.75)  # 6000 / 8000
    assert by_label["throughput ÷ Celery + Redis, 100 in flight"] == pytest.approx(6.0)


def test_a_ratio_uses_the_medians_of_both_sides() -> None:
    results = full_results()
    results["dispatch"]["100 in flight, 1 miner"] = runs("jobs_per_s", 100, 3_900, 9_000)
    results["ceiling"]["100 in flight, no persistence"] = runs("jobs_per_s", 1, 10_000, 50_000)
    row = evaluate(results, [TARGETS[0]])[0]
    assert row.value == pytest.approx(0.39)
    assert row.status == "missed"
    assert "3900 / 1e+04" in row.detail


@pytest.mark.parametrize(
    ("op", "bound", "value", "status"),
    [
        (">=", 2.0, 2.0, "met"),
        (">=", 2.0, 1.99, "missed"),
        ("<=", 0.5, 0.5, "met"),
        ("<=", 0.5, 0.51, "missed"),
    ],
)
def test_bounds_are_inclusive(op: str, bound: float, value: float, status: str) -> None:
    target = Target("t", op, bound, (("x", "s"), "k"))
    row = evaluate({"x": {"s": runs("k", value, value, value)}}, [target])[0]
    assert row.status == status


def test_missing_sources_are_not_measured_never_met() -> None:
    results = full_results()
    del results["celery"]
    del results["sockets"]
    rows = evaluate(results)
    missing = [r for r in rows if r.status == "not measured"]
    assert {r.target.label for r in missing} == {
        "RSS per idle miner socket",
        "socket handshakes/s",
        "throughput ÷ Celery + Redis, 100 in flight",
        "unloaded round trip p50 ÷ Celery + Redis (submit→completed vs submit→result)",
        "unloaded round trip p99 ÷ Celery + Redis",
    }
    assert all(r.value is None for r in missing)
    text = render(rows, fewest_runs(results))
    assert "5 of 5 measured targets met; 5 not measured." in text
    assert "not measured" in text


def test_render_counts_and_flags_too_few_runs() -> None:
    results = full_results(n=1)
    results["sockets"]["10,000 idle miner sockets"] = [
        {"rss_kib_per_socket": 40.0, "handshakes_per_s": 3000.0}
    ]
    text = render(evaluate(results), fewest_runs(results))
    assert "9 of 10 measured targets met." in text
    assert "| RSS per idle miner socket | 40 KiB | ≤ 30 KiB | missed |" in text
    assert "ran only 1 time(s)" in text
    assert "ran only" not in render(evaluate(full_results()), fewest_runs(full_results()))


def test_main_reads_the_results_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit, match="no results"):
        main(["--results", str(tmp_path)])
    for name, data in full_results().items():
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    (tmp_path / "unrelated.json").write_text("{}")
    assert set(load_all(tmp_path)) == set(SOURCES)
    main(["--results", str(tmp_path)])
    assert "10 of 10 measured targets met." in capsys.readouterr().out
