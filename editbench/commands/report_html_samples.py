"""The data of the visual report (:mod:`editbench.commands.report_html`): per run its view
of the verified result bundle (per-sample scores, inputs, images) and the samples' rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editbench.commands.report_table import dataset_sort_key
from metrics.bundle import IMAGES, Bundle, BundleError, image_name, read_inputs


@dataclass
class RunView:
    """One run's column group: its label, bundle, aggregation and per-sample values."""

    run: Any  # editbench.commands.report.Run
    label: str
    bundle: Bundle
    aggregation: str
    metrics: list[str]
    values: dict[str, dict[str, float | None]]  # metric -> id -> value
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def has_images(self) -> bool:
        return any(name.startswith(f"{IMAGES}/") for name in self.bundle.manifest.get("files", {}))

    def image(self, sample_id: str, kind: str) -> tuple[Path, str] | None:
        """The bundle file of ``sample_id``'s ``kind`` image and its sha256, if listed."""
        name = image_name(sample_id, kind)
        entry = (self.bundle.manifest.get("files") or {}).get(name)
        return None if entry is None else (self.bundle.folder / name, str(entry.get("sha256")))


@dataclass
class Sample:
    id: str
    dataset: str
    instruction: str | None


def run_labels(runs: Sequence[Any]) -> dict[Path, str]:
    """Per results path: the report row and the run's folder (``version_0``, ``ig_1.5``), with
    as many parent folders as it takes to tell the runs apart."""
    for depth in range(1, 6):
        labels = {r.path: f"{r.row} · " + "/".join(r.path.parts[-1 - depth : -1]) for r in runs}
        if len(set(labels.values())) == len(labels):
            break
    return labels


def run_view(run: Any, bundle: Bundle, label: str) -> RunView:
    aggregation = str(run.protocol.get("aggregation") or "all")
    rows = [r for r in bundle.rows if r["system"] == "model" and r["aggregation"] == aggregation]
    found = list(dict.fromkeys(r["metric"] for r in rows))
    metrics = [m for m in run.columns if m in found] + sorted(
        m for m in found if m not in run.columns
    )
    values = {m: {} for m in metrics}
    for row in rows:
        value = row.get("value")
        values[row["metric"]][str(row["id"])] = None if value is None else float(value)
    try:
        inputs = read_inputs(bundle.folder)
    except BundleError:
        inputs = {}  # a bundle written without images: scores only
    return RunView(run, label, bundle, aggregation, metrics, values, inputs)


def collect_samples(views: Sequence[RunView]) -> list[Sample]:
    """Every sample id of the runs, by dataset (MGIE's order) then id."""
    found: dict[tuple[str, str], Sample] = {}
    for view in views:
        datasets = {
            str(r["id"]): str(r.get("dataset") or view.run.dataset) for r in view.bundle.rows
        }
        for sample_id in [*view.inputs, *datasets]:
            row = view.inputs.get(sample_id, {})
            dataset = str(row.get("dataset") or datasets.get(sample_id) or view.run.dataset)
            sample = found.setdefault((dataset, sample_id), Sample(sample_id, dataset, None))
            if sample.instruction is None and row.get("instruction") is not None:
                sample.instruction = str(row["instruction"])
    return [found[k] for k in sorted(found, key=lambda k: (dataset_sort_key(k[0]), k[1]))]
