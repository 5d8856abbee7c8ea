"""Summary: issue 7's targets checked against one run's results files, never typed figures.

Reads ``ceiling.json``, ``dispatch.json``, ``rest.json``, ``sockets.json`` and ``celery.json``
from the results folder (what ``make bench`` just wrote), computes every target's figure from
the medians over the runs, and says met / missed / not measured.

    python -m bench.summary --write-docs
"""

from __future__ import annotations

import argparse
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import RESULTS, load_results, measured_on, median_of, summary, write_section

__all__ = ["SOURCES", "TARGETS", "Row", "Target", "evaluate", "load_all", "main", "render"]

Runs = list[dict[str, Any]]
Results = dict[str, dict[str, Runs]]  # source (file stem) -> scenario -> runs

SOURCES = ("ceiling", "dispatch", "rest", "sockets", "celery")

# The scenarios the targets are about (the names the bench scripts write).
DISPATCH_LOADED = ("dispatch", "100 in flight, 1 miner")
DISPATCH_UNLOADED = ("dispatch", "1 in flight, 1 miner (unloaded)")
CEILING_BARE = ("ceiling", "100 in flight, no persistence")
CEILING_SQLITE = ("ceiling", "100 in flight, group-committed SQLite")
REST_POLLERS = ("rest", "REST, 50 pollers")
REST_PICKUP = ("rest", "long-poll pickup, 1 waiting poller")
CELERY_LOADED = ("celery", "100 in flight")
CELERY_UNLOADED = ("celery", "1 in flight (unloaded round trip)")
SOCKETS = ("sockets", None)  # its one scenario, named for the socket count


def runs_of(results: Results, where: tuple[str, str | None]) -> tuple[str, Runs] | None:
    """The named scenario's runs (the source's first scenario for None), with its name."""
    source, scenario = where
    scenarios = results.get(source) or {}
    if scenario is None:
        scenario = next(iter(scenarios), None)
    if scenario is None or scenario not in scenarios:
        return None
    return scenario, scenarios[scenario]


@dataclass(frozen=True)
class Target:
    label: str
    op: str  # ">=" or "<="
    bound: float | None  # None: shown for context, no target
    ours: tuple[tuple[str, str | None], str]  # (source, scenario), key
    theirs: tuple[tuple[str, str | None], str] | None = None  # a ratio's denominator
    unit: str = ""


@dataclass(frozen=True)
class Row:
    target: Target
    value: float | None  # None: a source is missing
    detail: str
    status: str  # "met", "missed", "not measured", "context"


def figure(results: Results, t: Target) -> tuple[float | None, str]:
    """The target's figure (medians; a ratio of medians for ratios) and how it was made."""
    where, key = t.ours
    found = runs_of(results, where)
    if found is None:
        return None, f"no {where[0]} results"
    scenario, ours = found
    s = summary([r[key] for r in ours])
    shown = f"{scenario}: {s['median']:.4g} ({s['min']:.4g}-{s['max']:.4g}) over {len(ours)} runs"
    if t.theirs is None:
        return s["median"], shown
    twhere, tkey = t.theirs
    found = runs_of(results, twhere)
    if found is None:
        return None, f"no {twhere[0]} results"
    theirs = found[1]
    den = median_of(theirs, tkey)
    runs = f"medians over {len(ours)} and {len(theirs)} runs"
    return s["median"] / den, f"{s['median']:.4g} / {den:.4g} ({runs})"


def check(value: float, op: str, bound: float) -> bool:
    return bool({">=": operator.ge, "<=": operator.le}[op](value, bound))


def evaluate(results: Results, targets: list[Target] | None = None) -> list[Row]:
    rows = []
    for t in TARGETS if targets is None else targets:
        value, detail = figure(results, t)
        if value is None:
            status = "not measured"
        elif t.bound is None:
            status = "context"
        else:
            status = "met" if check(value, t.op, t.bound) else "missed"
        rows.append(Row(t, value, detail, status))
    return rows


def fewest_runs(results: Results) -> int | None:
    counts = [len(rs) for scenarios in results.values() for rs in scenarios.values()]
    return min(counts) if counts else None


TARGETS = [
    Target(
        "durable dispatch jobs/s ÷ 4-frame ceiling (no persistence), 100 in flight",
        ">=",
        0.4,
        (DISPATCH_LOADED, "jobs_per_s"),
        (CEILING_BARE, "jobs_per_s"),
        "x",
    ),
    Target(
        "durable dispatch jobs/s ÷ ceiling with group-committed SQLite, 100 in flight",
        ">=",
        None,
        (DISPATCH_LOADED, "jobs_per_s"),
        (CEILING_SQLITE, "jobs_per_s"),
        "x",
    ),
    Target(
        "unloaded submit→assign p50", "<=", 0.5, (DISPATCH_UNLOADED, "assign_p50_ms"), unit="ms"
    ),
    Target(
        "unloaded submit→assign p99", "<=", 1.0, (DISPATCH_UNLOADED, "assign_p99_ms"), unit="ms"
    ),
    Target("REST jobs/s, 50 pollers", ">=", 2000, (REST_POLLERS, "jobs_per_s"), unit="jobs/s"),
    Target("REST long-poll pickup p99", "<=", 2.0, (REST_PICKUP, "pickup_p99_ms"), unit="ms"),
    Target("RSS per idle miner socket", "<=", 30, (SOCKETS, "rss_kib_per_socket"), unit="KiB"),
    Target("socket handshakes/s", ">=", 1500, (SOCKETS, "handshakes_per_s"), unit="/s"),
    Target(
        "throughput ÷ Celery + Redis, 100 in flight",
        ">=",
        2.0,
        (DISPATCH_LOADED, "jobs_per_s"),
        (CELERY_LOADED, "jobs_per_s"),
        "x",
    ),
    Target(
        "unloaded round trip p50 ÷ Celery + Redis (submit→completed vs submit→result)",
        "<=",
        0.5,
        (DISPATCH_UNLOADED, "complete_p50_ms"),
        (CELERY_UNLOADED, "round_trip_p50_ms"),
        "x",
    ),
    Target(
        "unloaded round trip p99 ÷ Celery + Redis",
        "<=",
        0.5,
        (DISPATCH_UNLOADED, "complete_p99_ms"),
        (CELERY_UNLOADED, "round_trip_p99_ms"),
        "x",
    ),
]


def render(rows: list[Row], runs: int | None) -> str:
    sign = {">=": "≥", "<=": "≤"}
    lines = [
        "| target | figure | bound | result | from |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        t = row.target
        value = "—" if row.value is None else f"{row.value:.3g} {t.unit}".rstrip()
        bound = "—" if t.bound is None else f"{sign[t.op]} {t.bound:g} {t.unit}".rstrip()
        lines.append(f"| {t.label} | {value} | {bound} | {row.status} | {row.detail} |")
    met = sum(r.status == "met" for r in rows)
    judged = sum(r.status in ("met", "missed") for r in rows)
    missing = sum(r.status == "not measured" for r in rows)
    tail = f"; {missing} not measured." if missing else "."
    lines += ["", f"{met} of {judged} measured targets met{tail}"]
    if runs is not None and runs < 3:
        lines.append(f"Some scenarios ran only {runs} time(s): fewer than the 3 the report asks.")
    return "\n".join(lines)


def load_all(out: Path) -> Results:
    return {name: r for name in SOURCES if (r := load_results(out, name)) is not None}


def write_docs(text: str, out: Path) -> None:
    write_section(
        "## Summary: targets (`bench/summary.py`)\n\n"
        f"{measured_on(out)}. Computed from this run's results files (`bench/results/*.json`) "
        "by `bench/summary.py`: each figure is the median over the runs, a ratio is the ratio "
        "of the two medians; our side of every ratio is `bench/dispatch.py`'s row "
        "(100 in flight with 1 miner, or 1 in flight unloaded).\n\n"
        f"{text}\n"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--results", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--write-docs", action="store_true", help="rewrite docs/performance.md")
    a = p.parse_args(argv)
    results = load_all(a.results)
    if not results:
        raise SystemExit(f"no results in {a.results}: run the benchmarks first (make bench)")
    text = render(evaluate(results), fewest_runs(results))
    print(text)
    if a.write_docs:
        write_docs(text, a.results)


if __name__ == "__main__":
    main()
