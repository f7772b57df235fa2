"""The benchmark's report: the side-by-side table, the scale section and the targets.

This module holds the pure formatting of results the runs produced (dicts, as the children
report them and ``engines.py`` summarizes them): the markdown tables and each target with its
measured value and PASS or FAIL. It also holds ``paired_ratios`` and ``median_interval``,
which both the summaries in ``engines.py`` and the targets use. It is apart from ``engines.py``
so the report can be read and tested without running anything; it imports no torch.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from typing import Any

OWN_SAMPLING = {"flower"}  # systems whose cohorts differ from fedsim's, so weights do too
TARGET_WORKLOADS = ("W1a", "W1b")  # the targets are stated for W1 (W1b-0 only explains them)
# The vmap engine's targets, steady round / floor's by workload: on CPU, and on one GPU
# (at least 5x the floor's throughput there).
VMAP_TARGETS = {"cpu": {"W1b": 0.6, "D1b": 0.3}, "cuda": {"W1b": 0.2}}
CONFIDENCE = 0.95  # wanted coverage of the intervals around median ratios


def paired_ratios(
    runs: Sequence[dict[str, Any]], baseline: Sequence[dict[str, Any]], key: str
) -> list[float]:
    """Return ``run[key] / baseline run[key]`` for each repetition both ran."""
    base = {r["attempt"]: r[key] for r in baseline}
    return [r[key] / base[r["attempt"]] for r in runs if r["attempt"] in base]


def median_interval(
    values: Sequence[float], confidence: float = CONFIDENCE
) -> tuple[float, float, float] | None:
    """Return ``(low, high, coverage)``: a distribution-free interval for the median.

    Of n independent draws, the k-th smallest and k-th largest enclose the
    population's median with probability ``1 - 2 P(Binomial(n, 1/2) <= k - 1)``,
    whatever the distribution. The narrowest such interval with at least
    ``confidence`` coverage is returned; with too few draws to reach it, the
    widest one (min to max) with the coverage it has. ``None`` for fewer than 2.
    The runs' medians decide PASS and FAIL; the interval says whether the
    machine's noise could have decided otherwise.
    """
    n = len(values)
    if n < 2:
        return None

    def coverage(k: int) -> float:
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n

    k = max((k for k in range(1, n // 2 + 1) if coverage(k) >= confidence), default=1)
    ordered = sorted(values)
    return ordered[k - 1], ordered[n - k], coverage(k)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Return the side-by-side table, one row per system and workload."""
    header = [
        "system", "workload", "total s", "steady round s", "peak RSS MB", "total / floor",
        "steady / floor", "steady min-max s", "import s", "start-up s", "max |w - floor|",
        "threads", "runs",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        own = r["system"] in OWN_SAMPLING
        gap = "own cohorts" if own else _fmt(r["max_abs_diff_to_floor"], ".1e")
        low, high = r["steady_round_range_s"]
        cells = [
            r["label"], r["workload"], _fmt(r["total_s"], ".2f"), _fmt(r["steady_round_s"], ".3f"),
            _fmt(r["peak_rss_mb"], ".0f"), _fmt(r["total_ratio_to_floor"], ".2f"),
            _fmt(r["steady_round_ratio_to_floor"], ".2f"), f"{low:.3f}-{high:.3f}",
            _fmt(r["import_s"], ".2f"), _fmt(r["startup_s"], ".2f"), gap, r["threads"],
            str(len(r["runs"])),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_scale(results: dict[str, dict[str, Any]]) -> str:
    """Return the scale section: start-up and peak memory of each case."""
    lines = [
        "| case | population | cohort | rounds | start-up s | steady round s | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results.values():
        cells = [r["label"], f"{r['num_clients']:,}", str(r["cohort"]), str(r["rounds"])]
        cells += [f"{r['startup_s']:.2f}", f"{r['steady_round_s']:.3f}", f"{r['peak_rss_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _check(what: str, measured: str, ok: bool | None) -> str:
    verdict = {True: "PASS", False: "FAIL", None: "n/a (not measured)"}[ok]
    return f"{what}: {measured}  {verdict}"


def _ratio_check(what: str, ratios: Sequence[float], bound: float, *, below: bool) -> str:
    """Judge a median ratio against ``bound`` (``below``: it must not exceed it).

    The measured text gives the interval around the median; where the interval
    holds the bound, the verdict says so: another set of runs could reverse it.
    """
    if not ratios:
        return _check(what, "-", None)
    median = statistics.median(ratios)
    measured = f"{median:.3f}x"
    interval = median_interval(ratios)
    close = False
    if interval:
        low, high, coverage = interval
        measured += f" ({coverage:.0%} interval {low:.3f}-{high:.3f}, {len(ratios)} runs)"
        close = low <= bound <= high
    ok = median <= bound if below else median > bound
    return _check(what, measured, ok) + (", within noise" if close else "")


def targets(rows: Sequence[dict[str, Any]], scale: dict[str, dict[str, Any]]) -> list[str]:
    """Return each target of the issue with its measured value and PASS or FAIL."""
    lines = []
    by = {(r["system"], r["workload"]): r for r in rows}
    for name in dict.fromkeys(r["workload"] for r in rows if r["workload"] in TARGET_WORKLOADS):
        floor, inline = by.get(("floor", name)), by.get(("inline", name))
        for key, limit in (("steady_round", 1.10), ("total", 1.15)):
            what = f"{name}  fedsim inline {key.replace('_', ' ')} <= {limit:.2f}x floor"
            ratios = (
                paired_ratios(inline["runs"], floor["runs"], f"{key}_s") if floor and inline else []
            )
            lines.append(_ratio_check(what, ratios, limit, below=True))
        for mine, theirs in itertools.product(("inline", "threads", "ray"), ("flower", "pfl")):
            a, b = by.get((mine, name)), by.get((theirs, name))
            what = f"{name}  fedsim {mine} steady round faster than {theirs} ({theirs} / fedsim)"
            ratios = paired_ratios(b["runs"], a["runs"], "steady_round_s") if a and b else []
            lines.append(_ratio_check(what, ratios, 1.0, below=False))
    device = next((r.get("device", "cpu") for r in rows), "cpu")
    for name, limit in VMAP_TARGETS.get(device.split(":")[0], {}).items():
        floor, vmap = by.get(("floor", name)), by.get(("vmap", name))
        if floor and vmap:
            what = f"{name}  fedsim vmap steady round <= {limit:.2f}x floor ({device})"
            ratios = paired_ratios(vmap["runs"], floor["runs"], "steady_round_s")
            lines.append(_ratio_check(what, ratios, limit, below=True))
    small, large = scale.get("population-1e3"), scale.get("population-1e6")
    for case in (small, large):
        if case:
            what = f"scale  start-up <= 2 s, {case['label']}"
            lines.append(_check(what, f"{case['startup_s']:.2f} s", case["startup_s"] <= 2.0))
    growth = large["peak_rss_mb"] - small["peak_rss_mb"] if (small and large) else None
    what = "scale  peak RSS(10^6 clients) - peak RSS(10^3) <= 100 MB"
    lines.append(_check(what, f"{_fmt(growth, '+.1f')} MB", _at_most(growth, 100.0)))
    few, many = scale.get("cohort-10"), scale.get("cohort-500")
    ratio = many["peak_rss_mb"] / few["peak_rss_mb"] if (few and many) else None
    extra = f" ({many['peak_rss_mb'] - few['peak_rss_mb']:+.0f} MB)" if (few and many) else ""
    what = "scale  peak RSS cohort 500 / cohort 10, 1M-param model <= 1.3"
    lines.append(_check(what, f"{_fmt(ratio, '.3f')}x{extra}", _at_most(ratio, 1.3)))
    return lines


def _at_most(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit
