"""``python -m editbench report``: aggregate the ``test_metrics.json`` of several runs into one
table laid out as MGIE's Tables 1-2 (rows = models, columns = dataset x metric), written as
``report.md`` and ``report.csv``.

Each cell is the mean ± sample standard deviation over the runs of its row (MGIE averages 5
random seeds, Sec. 4.1), with a 95% interval ``[lo, hi]`` where the runs wrote result bundles
(:mod:`editbench.commands.report_bundles`: bundles verified, every cell recomputed from the
per-sample rows, bootstrap / t intervals, ``--compare A B`` paired tests). Folders without a
``test_metrics.json`` (a fit-only ``version_0``) are skipped and named. Runs share a column only if they were measured the same way: their
*relevant protocol* for that column (``protocol`` minus the provenance-only keys
:data:`PROVENANCE_KEYS`, with ``metrics``, ``scale`` and ``columns`` narrowed to the column's
metric) must agree, or the report stops naming the column, the runs and each differing field
(``--allow-mixed`` tabulates them anyway, marked with a dagger).
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import math
import statistics
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editbench.commands import report_bundles as bundles
from metrics.published import PUBLISHED_TABLES, TABLE_AVERAGING, TABLE_SCALES, TABLE_SOURCES

RESULTS_FILE = "test_metrics.json"
FORMAT_PREFIX = "editbench.test_metrics/"

#: Keys of ``protocol`` that record where a number came from, not how it was measured.
PROVENANCE_KEYS = frozenset({"seed", "editbench_version", "git_commit"})

#: Keys of ``protocol`` holding one entry per metric: a column compares only its metric's entry.
PER_METRIC_KEYS = ("metrics", "scale", "columns")

#: Dataset order of MGIE's tables; other datasets follow alphabetically.
DATASET_ORDER = ("evr", "gier", "ma5k", "magicbrush")
DATASET_TITLES = {
    "evr": "EVR",
    "gier": "GIER",
    "ma5k": "MA5k",
    "magicbrush": "MagicBrush",
    "advancededit": "AdvancedEdit-Eval",
}

#: +1: higher is better, -1: lower is better. Metrics not listed are not ranked.
DIRECTIONS: dict[str, int] = {
    "L1": -1,
    "L1_edit": -1,
    "LPIPS": -1,
    "FID": -1,
    "KID": -1,
    "DINO": 1,
    "CVS": 1,
    "CTS": 1,
    "SSIM": 1,
    "PSNR": 1,
    "CLIP_direction": 1,
    "VIEScore_SC": 1,
    "VIEScore_PQ": 1,
    "VIEScore_O": 1,
}

GROUP_BY = ("run.name", "model.name")
PUBLISHED_LABEL = "(paper)"
COPY_LABEL = "copy input"
MIXED_MARK = "†"
_MISSING = object()


class ReportError(ValueError):
    """Bad input to ``report``: a malformed results file or runs measured differently."""


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Run:
    """One ``test_metrics.json``: where it is, its row and what it measured."""

    path: Path
    label: str
    row: str
    dataset: str
    columns: tuple[str, ...]
    table: dict[str, float]
    copy_table: dict[str, float] | None
    protocol: dict[str, Any]
    run: dict[str, Any]


def _has_magic(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def find_results(inputs: Sequence[str]) -> list[Path]:
    """Results files named by ``inputs``: files, folders (searched recursively for
    ``test_metrics.json``) or glob patterns (expanded here too, for shells that do not).

    Raises ``FileNotFoundError`` naming every input that yields no results file.
    """
    found: list[Path] = []
    missing: list[str] = []
    for item in inputs:
        matches = sorted(glob.glob(item, recursive=True)) if _has_magic(item) else []
        paths = [Path(m) for m in matches] or ([Path(item)] if Path(item).exists() else [])
        files = [f for p in paths for f in _results_below(p)]
        if not files:
            missing.append(item)
        found += files
    if missing:
        raise FileNotFoundError(f"no {RESULTS_FILE} found in or at: {', '.join(missing)}")
    unique = {}
    for f in found:
        unique.setdefault(f.resolve(), f)
    return list(unique.values())


def _results_below(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(path.rglob(RESULTS_FILE))
    return [path] if path.is_file() else []


def _get(document: dict, key: str, path: Path, default: Any = _MISSING) -> Any:
    """``document[a][b]`` for ``key="a.b"``; a missing key is an error naming file and key."""
    value: Any = document
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            if default is not _MISSING:
                return default
            raise ReportError(f"{path}: missing key '{key}'")
        value = value[part]
    return value


def _numbers(mapping: Any, key: str, path: Path) -> dict[str, float]:
    if not isinstance(mapping, dict):
        raise ReportError(f"{path}: '{key}' must be an object of metric values")
    out = {}
    for name, value in mapping.items():
        if value is None:
            value = math.nan
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ReportError(f"{path}: '{key}.{name}' is {value!r}, not a number")
        out[name] = float(value)
    return out


def read_json(path: Path) -> dict[str, Any]:
    """A results file as a dict; unreadable JSON is an error naming the file and line."""
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    except UnicodeDecodeError:
        raise ReportError(f"{path}: not a text file") from None
    if not isinstance(document, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(document).__name__}")
    return document


def load_run(path: Path, group_by: str = "run.name", need_copy: bool = False) -> Run:
    """Read and validate one results file (format ``editbench.test_metrics/1``)."""
    document = read_json(path)
    fmt = _get(document, "format", path)
    if not str(fmt).startswith(FORMAT_PREFIX):
        raise ReportError(f"{path}: format {fmt!r} is not {FORMAT_PREFIX}<version>")
    model_name = str(_get(document, "model.name", path))
    run_name = _get(document, "run.name", path, None)
    row = model_name if group_by == "model.name" or not run_name else str(run_name)
    protocol = _get(document, "protocol", path)
    if not isinstance(protocol, dict):
        raise ReportError(f"{path}: 'protocol' must be an object")
    columns = _get(document, "protocol.columns", path)
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
        raise ReportError(f"{path}: 'protocol.columns' must be a list of metric names")
    table = _numbers(_get(document, "table", path), "table", path)
    judge_file = bundles.judged(path.parent) if path.name == RESULTS_FILE else None
    if judge_file is not None:  # VIEScore judged offline (python -m editbench judge)
        columns, table, protocol = bundles.with_judged(judge_file, columns, table, protocol)
    for name in columns:
        if name not in table:
            raise ReportError(f"{path}: missing key 'table.{name}' (listed in protocol.columns)")
    copy_table = None
    if need_copy:
        copy_table = _numbers(_get(document, "copy_table", path), "copy_table", path)
    run = _get(document, "run", path, {})
    return Run(
        path=path,
        label=str(path.parent) if path.name == RESULTS_FILE else str(path),
        row=row,
        dataset=str(_get(document, "dataset", path)),
        columns=tuple(columns),
        table=table,
        copy_table=copy_table,
        protocol=protocol,
        run=run if isinstance(run, dict) else {},
    )


# --------------------------------------------------------------------------- protocols


Column = tuple[str, str]  # (dataset, metric)


def column_name(column: Column) -> str:
    return f"{column[0]}/{column[1]}"


def _metric_entry(mapping: Any, metric: str) -> Any:
    """``mapping[metric]``, else the entry of its base name (``KID`` for ``KID_std``)."""
    if not isinstance(mapping, dict):
        return _MISSING
    if metric in mapping:
        return mapping[metric]
    return mapping.get(metric.split("_")[0], _MISSING)


def metric_scale(protocol: dict[str, Any], metric: str) -> float:
    """The factor from raw value to table value (absent = 1, as the writer records it)."""
    value = _metric_entry(protocol.get("scale"), metric)
    return 1.0 if value is _MISSING or value is None else float(value)


def relevant_protocol(protocol: dict[str, Any], metric: str) -> dict[str, Any]:
    """What must agree for two runs to share a column of ``metric``, flattened to dotted keys:
    ``protocol`` without :data:`PROVENANCE_KEYS`, with only ``metric``'s entries of
    :data:`PER_METRIC_KEYS` (``metrics.<metric>.*`` and ``scale.<metric>``), and backbones
    identified by their ``sha256`` rather than their ``path`` where both are recorded."""
    kept = {
        k: v for k, v in protocol.items() if k not in PROVENANCE_KEYS and k not in PER_METRIC_KEYS
    }
    entry = _metric_entry(protocol.get("metrics"), metric)
    if entry is not _MISSING:
        kept[f"metrics.{metric}"] = entry
    kept[f"scale.{metric}"] = metric_scale(protocol, metric)
    return _flatten(_without_hashed_paths(kept))


def _without_hashed_paths(value: Any) -> Any:
    """Drop ``path`` beside a ``sha256``: the hash identifies the weights, the folder they sit
    in differs between machines."""
    if not isinstance(value, dict):
        return value
    hashed = bool(value.get("sha256"))
    return {k: _without_hashed_paths(v) for k, v in value.items() if not (hashed and k == "path")}


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _freeze(flat: dict[str, Any]) -> str:
    return json.dumps(flat, sort_keys=True, default=str)


@dataclass(frozen=True)
class Difference:
    """One field on which ``run`` differs from the column's reference run."""

    column: Column
    key: str
    reference_value: Any
    reference: str
    value: Any
    run: str

    def __str__(self) -> str:
        ref = "<missing>" if self.reference_value is _MISSING else repr(self.reference_value)
        val = "<missing>" if self.value is _MISSING else repr(self.value)
        return (
            f"{column_name(self.column)}: {self.key} differs: {ref} ({self.reference}) vs "
            f"{val} ({self.run})"
        )


def reference_run(runs: Sequence[Run], metric: str) -> Run:
    """The run whose relevant protocol is the most common in ``runs`` (first on a tie)."""
    keys = [_freeze(relevant_protocol(r.protocol, metric)) for r in runs]
    counts = Counter(keys)
    best = max(counts.values())
    return runs[next(i for i, k in enumerate(keys) if counts[k] == best)]


def protocol_differences(column: Column, runs: Sequence[Run]) -> list[Difference]:
    """Every field on which a run of ``column`` differs from the column's reference run."""
    metric = column[1]
    reference = reference_run(runs, metric)
    ref = relevant_protocol(reference.protocol, metric)
    out = []
    for run in runs:
        flat = relevant_protocol(run.protocol, metric)
        for key in sorted(set(ref) | set(flat)):
            a, b = ref.get(key, _MISSING), flat.get(key, _MISSING)
            if a != b:
                out.append(Difference(column, key, a, reference.label, b, run.label))
    return out


# --------------------------------------------------------------------------- the table


@dataclass
class Cell:
    """The values of one row in one column (one per run)."""

    values: list[float] = field(default_factory=list)
    mixed: bool = False
    best: bool = False
    interval: tuple[float, float] | None = None
    interval_method: str | None = None

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation (n - 1 in the denominator); nan for fewer than 2 runs."""
        return statistics.stdev(self.values) if self.n > 1 else math.nan


@dataclass
class Row:
    """A table row: a model's runs, a published method or the copy-input baseline."""

    label: str
    kind: str  # "run", "paper" or "copy"
    cells: dict[Column, Cell] = field(default_factory=dict)


@dataclass
class Report:
    """Everything :func:`render_markdown` and :func:`render_csv` print."""

    title: str
    columns: list[Column]
    rows: list[Row]
    runs: list[Run]
    differences: list[Difference]
    published: str | None = None
    show_n: bool = False
    references: dict[Column, Run] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    appendix: list[str] = field(default_factory=list)


def dataset_sort_key(dataset: str) -> tuple[int, str]:
    return (
        (DATASET_ORDER.index(dataset), "")
        if dataset in DATASET_ORDER
        else (len(DATASET_ORDER), dataset)
    )


def ordered_columns(runs: Iterable[Run]) -> list[Column]:
    """Dataset x metric in MGIE's dataset order, metrics in the protocol's column order."""
    metrics: dict[str, list[str]] = {}
    for run in runs:
        names = metrics.setdefault(run.dataset, [])
        names += [m for m in run.columns if m not in names]
    return [(d, m) for d in sorted(metrics, key=dataset_sort_key) for m in metrics[d]]


def runs_by_column(runs: Sequence[Run], columns: Sequence[Column]) -> dict[Column, list[Run]]:
    return {c: [r for r in runs if r.dataset == c[0] and c[1] in r.columns] for c in columns}


def build_report(
    runs: Sequence[Run],
    *,
    title: str = "Results",
    allow_mixed: bool = False,
    published: str | None = None,
    copy_baseline: bool = False,
) -> Report:
    """Rows, cells, protocol check and best marks for ``runs``.

    Raises :class:`ReportError` listing every protocol difference unless ``allow_mixed``.
    """
    columns = ordered_columns(runs)
    by_column = runs_by_column(runs, columns)
    differences = [d for c in columns for d in protocol_differences(c, by_column[c])]
    if differences and not allow_mixed:
        raise ReportError(_differences_message(differences))
    report = Report(title, columns, [], list(runs), differences, published)
    report.references = {c: reference_run(by_column[c], c[1]) for c in columns}
    report.rows = _run_rows(runs, columns, differences)
    counts = {cell.n for row in report.rows for cell in row.cells.values()}
    report.show_n = len(counts) > 1
    _mark_best(report.rows, columns, {d.column for d in differences})
    if published:
        report.rows += _published_rows(published, columns, report.references)
    if copy_baseline:
        report.rows.append(_copy_row(by_column))
    return report


def _differences_message(differences: Sequence[Difference], limit: int = 20) -> str:
    lines = [str(d) for d in differences[:limit]]
    if len(differences) > limit:
        lines.append(f"... and {len(differences) - limit} more")
    return (
        "runs in the same column were measured with different protocols (pass --allow-mixed "
        "to tabulate them anyway, marked):\n  " + "\n  ".join(lines)
    )


def _run_rows(
    runs: Sequence[Run], columns: Sequence[Column], differences: Sequence[Difference]
) -> list[Row]:
    deviating = {(d.column, d.run) for d in differences}
    rows: dict[str, Row] = {}
    for run in runs:
        row = rows.setdefault(run.row, Row(run.row, "run"))
        for column in columns:
            if run.dataset == column[0] and column[1] in run.columns:
                cell = row.cells.setdefault(column, Cell())
                cell.values.append(run.table[column[1]])
                cell.mixed |= (column, run.label) in deviating
    return list(rows.values())


def _mark_best(rows: Sequence[Row], columns: Sequence[Column], mixed: set[Column]) -> None:
    """Bold the best mean of each column among run rows, by :data:`DIRECTIONS` (ties: all);
    columns with mixed protocols, metrics of unknown direction and columns with a single
    row get no mark."""
    for column in columns:
        direction = DIRECTIONS.get(column[1])
        if direction is None or column in mixed:
            continue
        cells = [r.cells[column] for r in rows if column in r.cells]
        means = [c.mean for c in cells if not math.isnan(c.mean)]
        if len(means) < 2:
            continue  # nothing to compare with
        best = max(means) if direction > 0 else min(means)
        for cell in cells:
            cell.best = cell.mean == best


def _published_rows(
    name: str, columns: Sequence[Column], references: dict[Column, Run]
) -> list[Row]:
    """The paper's rows for the columns we have, converted from the table's printed scale
    (:data:`metrics.published.TABLE_SCALES`) to each column's."""
    paper_scale = TABLE_SCALES[name]
    rows = []
    for method, datasets in PUBLISHED_TABLES[name].items():
        row = Row(f"{method} {PUBLISHED_LABEL}", "paper")
        for column in columns:
            value = datasets.get(column[0], {}).get(column[1])
            if value is None:
                continue
            ours = metric_scale(references[column].protocol, column[1])
            value = value * ours / paper_scale.get(column[1], 1)
            row.cells[column] = Cell([value])
        if row.cells:
            rows.append(row)
    return rows


def _copy_row(by_column: dict[Column, list[Run]]) -> Row:
    row = Row(COPY_LABEL, "copy")
    for column, runs in by_column.items():
        values = [
            r.copy_table[column[1]] for r in runs if r.copy_table and column[1] in r.copy_table
        ]
        if values:
            row.cells[column] = Cell(values)
    return row


# --------------------------------------------------------------------------- rendering


def _decimals(value: float) -> int:
    """The paper's precision: 2 decimals from 1 up (percentages), 3 below, 4 below 0.01."""
    magnitude = abs(value)
    if math.isnan(magnitude) or magnitude >= 1:
        return 2
    return 3 if magnitude >= 0.01 or magnitude == 0 else 4


def format_cell(cell: Cell | None, show_n: bool) -> str:
    """``mean ± std`` (no ± for one value), ``(n=k)`` if asked, bold if best, † if mixed."""
    if cell is None or not cell.values:
        return "–"
    places = _decimals(cell.mean)
    text = f"{cell.mean:.{places}f}"
    if cell.n > 1:
        text += f" ± {cell.std:.{places}f}"
    if cell.interval is not None:
        low, high = cell.interval
        text += f" [{low:.{places}f}, {high:.{places}f}]"
    if cell.best:
        text = f"**{text}**"
    if cell.mixed:
        text += MIXED_MARK
    if show_n:
        text += f" (n={cell.n})"
    return text


def _header(column: Column) -> str:
    arrow = {1: "↑", -1: "↓"}.get(DIRECTIONS.get(column[1]), "")
    return f"{DATASET_TITLES.get(column[0], column[0])} {column[1]}{arrow}"


def render_markdown(report: Report) -> str:
    """The report as Markdown: title, table, footnotes."""
    header = ["Model", *(_header(c) for c in report.columns)]
    lines = [f"# {report.title}", "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "---|" + "---:|" * len(report.columns))
    for row in report.rows:
        cells = [
            format_cell(row.cells.get(c), report.show_n and row.kind == "run")
            for c in report.columns
        ]
        lines.append("| " + " | ".join([row.label, *cells]) + " |")
    lines += ["", *footnotes(report), *report.appendix]
    return "\n".join(lines) + "\n"


def footnotes(report: Report) -> list[str]:
    """What a reader needs to know how each number was measured and aggregated."""
    notes = [
        "- Cells: mean ± sample standard deviation (n - 1) over the runs of a row"
        + (", n = number of runs" if report.show_n else "")
        + "; one run shows no ±. **Bold**: the best run row per column (↑ higher / ↓ lower is "
        "better); columns with mixed protocols or metrics of unknown direction are not ranked."
    ]
    notes += [f"- {line}" for line in _protocol_notes(report)]
    notes += [f"- {line}" for line in _row_notes(report)]
    if any(r.kind == "paper" for r in report.rows):
        notes.append(
            f"- Rows marked {PUBLISHED_LABEL}: {TABLE_SOURCES[report.published]}. Values as "
            f"printed ({TABLE_AVERAGING[report.published]}), converted to this table's scale; "
            "shown for reference, not protocol-checked and not ranked."
        )
    if any(r.kind == "copy" for r in report.rows):
        notes.append(
            f"- {COPY_LABEL}: the input image scored as the edit (each run's copy_table), over "
            "every run of the column; not ranked."
        )
    for diff in report.differences:
        notes.append(f"- {MIXED_MARK} {diff}")
    notes += [f"- {line}" for line in report.notes]
    return notes


def _short(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _backbone_text(entry: Any) -> str:
    if not isinstance(entry, dict):
        return _short(entry)
    parts = []
    for key, value in entry.items():
        if isinstance(value, dict) and ("path" in value or "sha256" in value):
            name = Path(str(value.get("path", "?"))).name
            digest = str(value.get("sha256") or "")[:8]
            parts.append(f"{key} {name}" + (f" ({digest})" if digest else ""))
        else:
            parts.append(f"{key} {_short(value)}")
    return ", ".join(parts)


_DATASET_FIELDS = (
    ("split", "split {}"),
    ("num_samples", "{} samples"),
    ("resolution", "{} px"),
    ("caption_source", "captions: {}"),
    ("turn_mode", "turns: {}"),
    ("aggregation", "aggregation: {}"),
    ("resize", "resize: {}"),
)


def _protocol_notes(report: Report) -> list[str]:
    """One line per dataset: its (reference) protocol and each metric's backbone."""
    lines = []
    datasets = list(dict.fromkeys(c[0] for c in report.columns))
    for dataset in datasets:
        columns = [c for c in report.columns if c[0] == dataset]
        protocol = report.references[columns[0]].protocol
        parts = [
            fmt.format(protocol[k]) for k, fmt in _DATASET_FIELDS if protocol.get(k) is not None
        ]
        for column in columns:
            entry = _metric_entry(report.references[column].protocol.get("metrics"), column[1])
            if entry is not _MISSING:
                parts.append(f"{column[1]}: {_backbone_text(entry)}")
        title = DATASET_TITLES.get(dataset, dataset)
        lines.append(f"{title}: " + "; ".join(parts))
    return lines


def _row_notes(report: Report) -> list[str]:
    lines = []
    for row in (r for r in report.rows if r.kind == "run"):
        runs = [r for r in report.runs if r.row == row.label]
        seeds = sorted({str(r.run["seed"]) for r in runs if "seed" in r.run})
        samplers = {_freeze(r.run.get("sampler") or {}) for r in runs}
        counts = Counter(r.dataset for r in runs)
        per_dataset = ", ".join(
            f"{counts[d]} on {DATASET_TITLES.get(d, d)}"
            for d in sorted(counts, key=dataset_sort_key)
        )
        text = f"{row.label}: runs {per_dataset}"
        if seeds:
            text += f"; seeds {', '.join(seeds)}"
        if len(samplers) == 1 and runs[0].run.get("sampler"):
            sampler = runs[0].run["sampler"]
            text += "; sampler " + ", ".join(f"{k} {v}" for k, v in sampler.items())
        elif len(samplers) > 1:
            text += "; samplers differ between runs"
        lines.append(text)
    return lines


def render_csv(report: Report) -> str:
    """One line per row; per column ``mean``, ``std``, ``n`` and the 95% interval's ``lo`` and
    ``hi`` (empty without one), full float precision."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["row", "kind"]
    for column in report.columns:
        name = column_name(column)
        header += [f"{name} mean", f"{name} std", f"{name} n", f"{name} lo", f"{name} hi"]
    writer.writerow(header)
    for row in report.rows:
        line = [row.label, row.kind]
        for column in report.columns:
            cell = row.cells.get(column)
            if cell is None or not cell.values:
                line += ["", "", "", "", ""]
            else:
                std = "" if cell.n < 2 else repr(cell.std)
                bounds = [repr(v) for v in cell.interval] if cell.interval else ["", ""]
                line += [repr(cell.mean), std, str(cell.n), *bounds]
        writer.writerow(line)
    return buffer.getvalue()


# --------------------------------------------------------------------------- command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m editbench report", description=__doc__)
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="run folders (searched recursively for test_metrics.json), files or glob patterns",
    )
    parser.add_argument("--out", default=".", help="folder for report.md and report.csv")
    parser.add_argument("--name", default="Results", help="the report's title")
    parser.add_argument(
        "--published",
        choices=sorted(PUBLISHED_TABLES),
        default=None,
        help="add a paper's published rows (MGIE or InsightEdit tables; not ranked)",
    )
    parser.add_argument(
        "--allow-mixed",
        "--allow_mixed",
        dest="allow_mixed",
        action="store_true",
        help="tabulate runs with different protocols in one column, marked with a dagger",
    )
    parser.add_argument(
        "--copy-baseline",
        "--copy_baseline",
        dest="copy_baseline",
        action="store_true",
        help="add a 'copy input' row from each run's copy_table",
    )
    parser.add_argument(
        "--group-by",
        "--group_by",
        dest="group_by",
        choices=GROUP_BY,
        default="run.name",
        help="what makes a row (run.name falls back to model.name)",
    )
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        default=None,
        help="paired test of rows A and B on their shared samples (needs result bundles)",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=bundles.DEFAULT_RESAMPLES,
        help="bootstrap resamples of the 95%% intervals (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and tests")
    from editbench.commands import report_html

    report_html.add_arguments(parser)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    paths, skipped = bundles.find_results_skipping(args.runs)
    for line in bundles.skipped_lines(skipped):
        print(line, file=sys.stderr)
    runs = [load_run(p, args.group_by, need_copy=args.copy_baseline) for p in paths]
    check = bundles.check_bundles(runs, ReportError)
    report = build_report(
        runs,
        title=args.name,
        allow_mixed=args.allow_mixed,
        published=args.published,
        copy_baseline=args.copy_baseline,
    )
    resamples, seed = args.bootstrap, args.seed
    bundles.attach_intervals(report, check, resamples=resamples, seed=seed)
    report.notes = bundles.bundle_notes(check, resamples, seed) + bundles.skipped_lines(skipped)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.compare:
        a, b = args.compare
        compared = bundles.compare_rows(
            report, a, b, check, ReportError, resamples=resamples, seed=seed
        )
        report.appendix = bundles.render_comparison(a, b, compared, resamples)
        with (out / "compare.csv").open("w", newline="") as handle:
            csv.writer(handle, lineterminator="\n").writerows(bundles.comparison_csv(compared))
    markdown = render_markdown(report)
    (out / "report.md").write_text(markdown)
    (out / "report.csv").write_text(render_csv(report))
    print(markdown, end="")
    if args.html:
        from editbench.commands import report_html

        page = report_html.write_html(
            runs, check, out, title=args.name, sort=args.sort, limit=args.html_limit,
            plot_x=args.plot_x, plot_y=args.plot_y, skipped=bundles.skipped_lines(skipped),
            error=ReportError,
        )  # fmt: skip
        print(f"wrote {page}", file=sys.stderr)
    return 0
