"""Reading ``report``'s inputs (:mod:`editbench.commands.report`): find the
``test_metrics.json`` files, validate each and load it as a :class:`Run`.
"""

from __future__ import annotations

import glob
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from editbench.commands import report_bundles as bundles

RESULTS_FILE = "test_metrics.json"
FORMAT_PREFIX = "editbench.test_metrics/"

#: An absent key or entry (equal to no JSON value).
MISSING = object()


class ReportError(ValueError):
    """Bad input to ``report``: a malformed results file or runs measured differently."""


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


def _get(document: dict, key: str, path: Path, default: Any = MISSING) -> Any:
    """``document[a][b]`` for ``key="a.b"``; a missing key is an error naming file and key."""
    value: Any = document
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            if default is not MISSING:
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
