"""The results file of a test run (``test_metrics.json``) and its ``protocol`` block.

Format ``editbench.test_metrics/1``::

    {
      "format": "editbench.test_metrics/1",
      "model": {"class_path", "name"},
      "run": {"name", "log_dir", "ckpt_path", "seed", "sampler": {...}},
      "dataset": "<protocol name>",
      "metrics": {"test/L1": ..., "test/copy/L1": ..., "test/final/L1": ...},   # raw
      "table": {"L1": ..., "DINO": ...},        # default aggregation, scaled as the paper
      "copy_table": {...},                      # the copy-the-input baseline, likewise
      "protocol": {
        "name", "columns", "scale", "split", "num_samples", "resolution", "resize",
        "caption_source", "turn_mode", "aggregation", "aggregations", "data",
        "metrics": {<name>: <the metric's provenance()>},
        "seed", "editbench_version", "git_commit"      # provenance only
      }
    }

``python -m editbench report`` puts runs in one column only when everything in ``protocol``
but the provenance-only keys (:data:`PROVENANCE_ONLY`) and the other metrics' entries agree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from metrics.evaluation import EditEvaluator
from metrics.provenance import editbench_version, git_commit

FORMAT = "editbench.test_metrics/1"

#: Keys of ``protocol`` that say where a number comes from but not how it was measured.
PROVENANCE_ONLY = ("seed", "editbench_version", "git_commit")


def eval_transform_description(resolution: int | None) -> str:
    """The evaluation transform of :func:`datamodules.base.build_transform` in words."""
    if resolution is None:
        return "images at their stored size"
    return (
        f"source, target and mask: shorter side resized to {resolution} (bilinear, antialiased; "
        f"masks nearest), center crop {resolution}x{resolution}; metrics compare the edit with "
        f"the target at that size"
    )


def data_description(datamodule: Any) -> dict[str, Any]:
    """The DataModule fields that change what a metric sees (not `expressive_path`: that is
    model input, and runs with and without it must share a report column)."""
    if datamodule is None:
        return {"class_path": None}
    cls = type(datamodule)
    record = {"class_path": f"{cls.__module__}.{cls.__qualname__}"}
    for key in ("max_samples", "caption_source", "test_mode"):
        if hasattr(datamodule, key):
            record[key] = getattr(datamodule, key)
    return record


def protocol_block(
    evaluator: EditEvaluator,
    results: dict[str, float],
    datamodule: Any,
    *,
    split: str,
    seed: int,
) -> dict[str, Any]:
    """The ``protocol`` record of a run evaluated by ``evaluator`` on ``datamodule``."""
    protocol = evaluator.protocol
    counts = evaluator.num_samples()
    resolution = getattr(datamodule, "resolution", None)
    table_names = list(evaluator.table(results))
    return {
        "name": protocol.name,
        "source": protocol.source,
        "columns": table_names,
        "scale": {n: protocol.scale_of(n) for n in table_names},
        "split": split,
        "num_samples": counts[protocol.default_aggregation],
        "num_samples_per_aggregation": counts,
        "resolution": resolution,
        "resize": eval_transform_description(resolution),
        "caption_source": getattr(datamodule, "caption_source", None),
        "turn_mode": getattr(datamodule, "test_mode", None),
        "aggregation": protocol.default_aggregation,
        "aggregations": list(protocol.aggregations),
        "data": data_description(datamodule),
        "metrics": evaluator.metric_provenance(),
        "seed": seed,
        "editbench_version": editbench_version(),
        "git_commit": git_commit(),
    }


def results_document(
    evaluator: EditEvaluator,
    results: dict[str, float],
    *,
    model: Any,
    datamodule: Any,
    run: dict[str, Any],
    split: str = "test",
) -> dict[str, Any]:
    """The whole ``test_metrics.json`` document (see the module docstring)."""
    cls = type(model)
    return {
        "format": FORMAT,
        "model": {"class_path": f"{cls.__module__}.{cls.__qualname__}", "name": cls.__name__},
        "run": run,
        "dataset": evaluator.protocol.name,
        "metrics": results,
        "table": evaluator.table(results),
        "copy_table": evaluator.table(results, copy=True),
        "protocol": protocol_block(
            evaluator, results, datamodule, split=split, seed=run.get("seed", 0)
        ),
    }


def write_results(path: str | Path, document: dict[str, Any]) -> Path:
    """Write ``document`` as JSON (NaN written as ``NaN``, which Python's json reads back)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return path


def read_results(path: str | Path) -> dict[str, Any]:
    """Read a ``test_metrics.json``; a file of another format is an error naming it."""
    path = Path(path)
    document = json.loads(path.read_text())
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f"{path} is not an editbench results file (format {FORMAT})")
    return document
