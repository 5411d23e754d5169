"""The table of ``report`` (:mod:`editbench.commands.report`): rows, cells (mean ± std over
runs), best marks, the paper's rows and the copy-input baseline, in MGIE's layout.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from editbench.commands.report_load import ReportError, Run
from editbench.commands.report_protocol import (
    Column,
    Difference,
    metric_scale,
    protocol_differences,
    reference_run,
)
from metrics.published import PUBLISHED_TABLES, TABLE_SCALES
from metrics.published_benchmarks import IMGEDIT_TYPES

#: Dataset order of MGIE's tables, then InsightEdit's Reason-Edit columns (Understanding before
#: Reasoning, as it prints them); other datasets follow alphabetically.
DATASET_ORDER = (
    "evr",
    "gier",
    "ma5k",
    "magicbrush",
    "reason-edit-understanding",
    "reason-edit-reasoning",
)
DATASET_TITLES = {
    "evr": "EVR",
    "gier": "GIER",
    "ma5k": "MA5k",
    "magicbrush": "MagicBrush",
    "advancededit": "AdvancedEdit-Eval",
    "reason-edit-understanding": "Reason-Edit (Understanding)",
    "reason-edit-reasoning": "Reason-Edit (Reasoning)",
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
    **{f"ImgEdit_{kind}": 1 for kind in IMGEDIT_TYPES.values()},
    "PSNR_bg": 1,
    "SSIM_bg": 1,
    "LPIPS_bg": -1,
    "MSE_bg": -1,
    "CLIPScore_box": 1,
}

PUBLISHED_LABEL = "(paper)"
COPY_LABEL = "copy input"


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
