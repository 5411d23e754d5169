"""Rendering of ``report`` (:mod:`editbench.commands.report`): the table as Markdown with its
footnotes (protocol, runs, marks) and as CSV.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from editbench.commands.report_load import MISSING
from editbench.commands.report_protocol import Column, column_name, freeze, metric_entry
from editbench.commands.report_table import (
    COPY_LABEL,
    DATASET_TITLES,
    DIRECTIONS,
    PUBLISHED_LABEL,
    Cell,
    Report,
    dataset_sort_key,
)
from metrics.published import TABLE_AVERAGING, TABLE_SOURCES

MIXED_MARK = "†"


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
        described: dict[str, list[str]] = {}  # one note for metrics described alike (a judge)
        for column in columns:
            entry = metric_entry(report.references[column].protocol.get("metrics"), column[1])
            if entry is not MISSING:
                described.setdefault(_backbone_text(entry), []).append(column[1])
        parts += [f"{', '.join(names)}: {text}" for text, names in described.items()]
        title = DATASET_TITLES.get(dataset, dataset)
        lines.append(f"{title}: " + "; ".join(parts))
    return lines


def _row_notes(report: Report) -> list[str]:
    lines = []
    for row in (r for r in report.rows if r.kind == "run"):
        runs = [r for r in report.runs if r.row == row.label]
        seeds = sorted({str(r.run["seed"]) for r in runs if "seed" in r.run})
        samplers = {freeze(r.run.get("sampler") or {}) for r in runs}
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
