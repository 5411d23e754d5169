"""The result-bundle side of ``python -m editbench report``: verifying each run's bundle
(:mod:`metrics.bundle`), recomputing its cells from the per-sample rows, 95% intervals per
cell and the paired comparison of two rows (``--compare A B``), with :mod:`metrics.uncertainty`.

Intervals: a row with one run gets the seeded percentile bootstrap over its samples (the
metric's own reduction on each resample); a row with several runs (seeds), all with bundles,
gets the Student-t interval of the runs' values (the spread between seeds, which already
contains the sampling spread). Cells whose metric keeps no per-sample rows (FID, KID, VIEScore, model-specific
extras) and runs without a bundle get no interval, and the footnotes say so.

Comparison of rows A and B, per column: the samples both rows scored (matched by sample id at
the column's aggregation; a row with several runs contributes each sample's mean over its
runs), the mean difference A - B (in the table's scale), its bootstrap interval and the
two-sided sign-flip permutation p-value.
"""

from __future__ import annotations

import glob
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from editbench.commands.report_protocol import metric_scale
from metrics.bundle import Bundle, BundleError, mismatches, read_bundle, recompute
from metrics.uncertainty import (
    DEFAULT_RESAMPLES,
    bootstrap_ci,
    paired_comparison,
    pooled_psnr_statistic,
    t_interval,
)

RESULTS_FILE = "test_metrics.json"


def find_results_skipping(inputs: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Results files named by ``inputs`` (files, folders searched recursively, glob patterns),
    and the inputs (each folder a glob matched) without one, e.g. a fit-only ``version_0``.

    Raises ``FileNotFoundError`` naming the inputs when none yields a results file."""
    found: list[Path] = []
    skipped: list[str] = []
    for item in inputs:
        magic = any(c in item for c in "*?[")
        paths = [Path(m) for m in sorted(glob.glob(item, recursive=True))] if magic else []
        if not paths and Path(item).exists():
            paths = [Path(item)]
        if not paths:
            skipped.append(item)
            continue
        for path in paths:
            files = sorted(path.rglob(RESULTS_FILE)) if path.is_dir() else [path]
            if not files:
                skipped.append(str(path))
            found += [f for f in files if f.is_file()]
    if not found:
        raise FileNotFoundError(f"no {RESULTS_FILE} found in or at: {', '.join(inputs)}")
    unique: dict[Path, Path] = {}
    for f in found:
        unique.setdefault(f.resolve(), f)
    return list(unique.values()), skipped


def skipped_lines(skipped: Sequence[str]) -> list[str]:
    return [f"skipped {item}: no {RESULTS_FILE}" for item in skipped]


# --------------------------------------------------------------------------- bundles


@dataclass
class BundleCheck:
    """What the bundles of a report's runs gave: per results path its bundle, the cells
    recomputed and the runs without a bundle."""

    bundles: dict[Path, Bundle] = field(default_factory=dict)
    recomputed: int = 0
    without_bundle: list[str] = field(default_factory=list)
    not_recomputable: dict[str, list[str]] = field(default_factory=dict)  # metric -> runs
    judged: dict[str, dict[str, Any]] = field(default_factory=dict)  # run -> judge_metrics.json


def check_bundles(runs: Sequence[Any], error: type[Exception]) -> BundleCheck:
    """Verify every run's bundle and recompute its aggregates from the rows; a missing or
    changed file, or a recomputed value that differs from ``test_metrics.json``, raises
    ``error`` naming the files / keys."""
    check = BundleCheck()
    for run in runs:
        folder = run.path.parent
        try:
            bundle = read_bundle(folder)
        except BundleError as err:
            raise error(str(err)) from None
        if bundle is None:
            check.without_bundle.append(run.label)
            continue
        from metrics.results import read_results

        document = read_results(run.path)
        recomputed = recompute(bundle, run.protocol)
        judge_file = judged(folder)
        reported = {**(document.get("metrics") or {}), **(judge_file or {}).get("metrics", {})}
        if judge_file is not None:
            check.judged[run.label] = judge_file
        wrong = mismatches(recomputed, reported)
        if wrong:
            raise error(
                f"{folder / 'samples.jsonl'}: the per-sample rows do not reproduce "
                f"{run.path}:\n  " + "\n  ".join(wrong[:20])
            )
        check.recomputed += sum(1 for c in run.columns if _reduction(bundle, c) is not None)
        for column in run.columns:
            if _reduction(bundle, column) is None:
                check.not_recomputable.setdefault(column, []).append(run.label)
        check.bundles[run.path] = bundle
    return check


def judged(folder: Path) -> dict[str, Any] | None:
    """The bundle's ``judge_metrics.json`` (``python -m editbench judge``), None if unjudged."""
    from metrics.judge.offline import read_judge_metrics

    return read_judge_metrics(folder)


#: Judge settings that do not change what is measured (left out of the column check).
_JUDGE_TRANSPORT = ("timeout", "max_retries", "base_url")


def with_judged(
    judge_file: dict[str, Any], columns: list[str], table: dict[str, float], protocol: dict
) -> tuple[list[str], dict[str, float], dict[str, Any]]:
    """A run's columns, table and protocol with the judged columns added (VIEScore's or
    ImgEdit's, the failure rate among them); the judge's description becomes
    ``metrics.<scheme>``, so runs judged differently (model as reported, prompts, sampling) do
    not share a column."""
    values = judge_file.get("table") or {}
    order = [c for c in judge_file.get("columns") or [] if c in values] or sorted(values)
    columns = [*columns, *(name for name in order if name not in columns)]
    table = {**table, **{k: math.nan if v is None else float(v) for k, v in values.items()}}
    judge = {k: v for k, v in (judge_file.get("judge") or {}).items() if k not in _JUDGE_TRANSPORT}
    protocol = {
        **protocol,
        "scale": {**(protocol.get("scale") or {}), **(judge_file.get("scale") or {})},
        "metrics": {**(protocol.get("metrics") or {}), judge_scheme(judge_file): judge},
    }
    return columns, table, protocol


def judge_scheme(judge_file: dict[str, Any]) -> str:
    """The judge's scheme (``VIEScore`` in files written before ImgEdit's judge existed)."""
    return str(judge_file.get("scheme") or "VIEScore")


def _reduction(bundle: Bundle, metric: str) -> str | None:
    return bundle.reductions.get(metric)


def _rows(bundle: Bundle, metric: str, aggregation: str, system: str) -> list[dict]:
    return [
        r
        for r in bundle.values(metric, aggregation, system).values()
        if r.get("value") is not None or r.get("sse") is not None
    ]


def sample_interval(
    bundle: Bundle, metric: str, aggregation: str, system: str, scale: float, *, resamples: int,
    seed: int,
) -> tuple[float, float] | None:
    """The bootstrap interval of one run's cell, in the table's scale."""
    reduction = _reduction(bundle, metric)
    rows = _rows(bundle, metric, aggregation, system)
    if reduction is None or len(rows) < 2:
        return None
    if reduction == "pooled_psnr":
        statistic = pooled_psnr_statistic([r["sse"] for r in rows], [r["n"] for r in rows])
        interval = bootstrap_ci(statistic=statistic, n=len(rows), n_resamples=resamples, seed=seed)
    else:
        values = [r["value"] for r in rows if r.get("value") is not None]
        interval = bootstrap_ci(values, n_resamples=resamples, seed=seed)
    if math.isnan(interval.low):
        return None
    return (interval.low * scale, interval.high * scale)


def attach_intervals(report: Any, check: BundleCheck, *, resamples: int, seed: int) -> None:
    """Set ``cell.interval`` (and ``cell.interval_method``) on the run and copy rows."""
    for row in report.rows:
        if row.kind not in ("run", "copy"):
            continue
        for column, cell in row.cells.items():
            runs = [
                r
                for r in report.runs
                if r.dataset == column[0]
                and column[1] in r.columns
                and (row.kind == "copy" or r.row == row.label)
            ]
            bundled = all(r.path in check.bundles for r in runs)
            if len(runs) > 1 and row.kind == "run" and bundled:
                interval = t_interval(np.array(cell.values))
                cell.interval, cell.interval_method = (interval.low, interval.high), "t"
                continue
            if len(runs) != 1 or runs[0].path not in check.bundles:
                continue
            run = runs[0]
            found = sample_interval(
                check.bundles[run.path],
                column[1],
                run.protocol.get("aggregation", "all"),
                "copy" if row.kind == "copy" else "model",
                metric_scale(run.protocol, column[1]),
                resamples=resamples,
                seed=seed,
            )
            if found is not None:
                cell.interval, cell.interval_method = found, "bootstrap"


# --------------------------------------------------------------------------- comparison


@dataclass
class ComparisonRow:
    column: tuple[str, str]
    n: int
    mean_a: float
    mean_b: float
    difference: float
    low: float
    high: float
    p_value: float


def _per_sample(runs: Sequence[Any], check: BundleCheck, metric: str) -> dict[str, float]:
    """Sample id -> value at the runs' aggregation, averaged over the runs that have it."""
    sums: dict[str, list[float]] = {}
    for run in runs:
        bundle = check.bundles.get(run.path)
        if bundle is None or _reduction(bundle, metric) != "mean":
            continue
        aggregation = run.protocol.get("aggregation", "all")
        for sample_id, row in bundle.values(metric, aggregation, "model").items():
            if row.get("value") is not None:
                sums.setdefault(sample_id, []).append(float(row["value"]))
    return {k: sum(v) / len(v) for k, v in sums.items()}


def compare_rows(
    report: Any, a: str, b: str, check: BundleCheck, error: type[Exception], *, resamples: int,
    seed: int,
) -> list[ComparisonRow]:
    """Paired comparison of rows ``a`` and ``b`` in every column both have (see the module
    docstring); an unknown row label or no shared samples is ``error``."""
    labels = [r.label for r in report.rows if r.kind == "run"]
    unknown = [x for x in (a, b) if x not in labels]
    if unknown:
        raise error(f"--compare: no row {', '.join(unknown)}; rows: {', '.join(labels)}")
    out = []
    for column in report.columns:
        runs = {
            x: [r for r in report.runs if r.row == x and r.dataset == column[0]
                and column[1] in r.columns]
            for x in (a, b)
        }
        values = {x: _per_sample(runs[x], check, column[1]) for x in (a, b)}
        shared = sorted(set(values[a]) & set(values[b]))
        if not shared:
            continue
        scale = metric_scale(runs[a][0].protocol, column[1])
        va = np.array([values[a][i] for i in shared]) * scale
        vb = np.array([values[b][i] for i in shared]) * scale
        result = paired_comparison(va, vb, n_resamples=resamples, seed=seed)
        out.append(
            ComparisonRow(
                column, result.n, result.mean_a, result.mean_b, result.difference.estimate,
                result.difference.low, result.difference.high, result.p_value,
            )
        )
    if not out:
        raise error(
            f"--compare {a} {b}: the two rows share no per-sample rows (their runs need result "
            "bundles with per-sample metrics on the same samples)"
        )
    return out


def render_comparison(a: str, b: str, rows: Sequence[ComparisonRow], resamples: int) -> list[str]:
    lines = [
        "",
        f"## {a} vs {b} (paired, on shared samples)",
        "",
        "| Column | n | A | B | A - B | 95% CI | p |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.column[0]}/{row.column[1]} | {row.n} | {row.mean_a:.4g} | {row.mean_b:.4g} "
            f"| {row.difference:.4g} | [{row.low:.4g}, {row.high:.4g}] | {row.p_value:.4g} |"
        )
    lines += [
        "",
        f"- A = {a}, B = {b}. Samples matched by id at each column's aggregation (a row with "
        "several runs: each sample's mean over them); 95% CI: seeded percentile bootstrap "
        f"({resamples} resamples) of the mean difference; p: two-sided paired sign-flip "
        "permutation test (exact for n <= 13, else 10000 random sign patterns).",
    ]
    return lines


def comparison_csv(rows: Sequence[ComparisonRow]) -> list[list[str]]:
    header = ["column", "n", "mean_a", "mean_b", "difference", "lo", "hi", "p_value"]
    body = [
        [f"{r.column[0]}/{r.column[1]}", str(r.n), *(repr(v) for v in (
            r.mean_a, r.mean_b, r.difference, r.low, r.high, r.p_value))]
        for r in rows
    ]
    return [header, *body]


def bundle_notes(check: BundleCheck, resamples: int, seed: int) -> list[str]:
    """Footnotes: what was recomputed, how intervals were made, which cells have none."""
    notes = []
    if check.bundles:
        notes.append(
            f"All {check.recomputed} recomputable cells of the {len(check.bundles)} run(s) with "
            "a result bundle were recomputed from their per-sample files (samples.jsonl, "
            "checked against manifest.json) and agree with test_metrics.json."
        )
        notes.append(
            "[lo, hi]: 95% interval; one run: seeded percentile bootstrap over samples "
            f"({resamples} resamples, seed {seed}); several runs: Student-t interval over the "
            "runs' values (seeds)."
        )
    for metric, runs in sorted(check.not_recomputable.items()):
        notes.append(
            f"{metric}: no per-sample rows (set-level or judge metric), not recomputed and no "
            f"bootstrap interval ({len(runs)} run(s))."
        )
    for label, judge_file in sorted(check.judged.items()):
        judge, summary = judge_file.get("judge") or {}, judge_file.get("summary") or {}
        models = ", ".join(judge.get("models_reported") or []) or str(judge.get("model"))
        scheme = judge_scheme(judge_file)
        notes.append(
            f"{scheme} of {label}: judged offline (judge.jsonl) by {judge.get('backend')} "
            f"{models}, prompts {judge.get('prompt_set')} ({str(judge.get('prompt_sha256'))[:12]})"
            f"; {summary.get('failures')} of {summary.get('n_samples')} samples got no valid "
            f"answer: missing from the {scheme} means (never 0), counted in "
            f"{scheme}_failure_rate."
        )
    if check.without_bundle:
        notes.append(
            "No result bundle (written before bundles existed), so no interval and nothing "
            "recomputed: " + ", ".join(check.without_bundle) + "."
        )
    return notes


__all__ = [
    "DEFAULT_RESAMPLES",
    "BundleCheck",
    "ComparisonRow",
    "attach_intervals",
    "bundle_notes",
    "check_bundles",
    "compare_rows",
    "comparison_csv",
    "find_results_skipping",
    "render_comparison",
    "sample_interval",
    "skipped_lines",
]
