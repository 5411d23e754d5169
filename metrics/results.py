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
        "name", "source", "columns", "scale", "split", "num_samples",
        "num_samples_per_aggregation", "resolution", "eval_resize", "resize", "scoring",
        "caption_source", "protocol_caption_source", "turn_mode", "aggregation", "setting",
        "aggregations", "settings", "data",
        "metrics": {<name>: <the metric's provenance()>},
        "seed", "editbench_version", "git_commit"      # provenance only
      }
    }

``setting`` names the table's MagicBrush turn setting (``single-turn``: aggregation ``all`` of
an independent run; ``multi-turn``: ``final`` of an iterative run) or is None where the table's
aggregation is neither (e.g. ``turn1``); ``settings`` maps the run's aggregation that is a
MagicBrush setting to its name (``{"all": "single-turn"}``). ``eval_resize`` is how the DataModule fed a non-square
input to the model (``resize``, ``pad``, ``center_crop``); ``scoring`` how the edit was compared
with the target (``native``: at the native ground truth's size, MagicBrush's rule, the
``model_box``/``native_box`` of ``pad``/``center_crop`` applied; ``model``: at the model's).

``python -m editbench report`` puts runs in one column only when everything in ``protocol``
but the provenance-only keys (:data:`PROVENANCE_ONLY`) and the other metrics' entries agree.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from metrics.evaluation import EditEvaluator
from metrics.provenance import editbench_version, git_commit

FORMAT = "editbench.test_metrics/1"

#: Keys of ``protocol`` that say where a number comes from but not how it was measured.
PROVENANCE_ONLY = ("seed", "editbench_version", "git_commit")


def eval_transform_description(resolution: int | None, scoring: dict | None = None) -> str:
    """How the edit met the target, in words: at the native ground truth's size (MagicBrush's
    rule) when ``scoring`` says so, else the model-resolution comparison."""
    if scoring is not None and scoring.get("resolution") == "native":
        return scoring["description"]
    if resolution is None:
        return "images at their stored size"
    return (
        f"model input at {resolution}x{resolution}; metrics compare the edit with the target "
        f"transformed to that size (no native images in the batches)"
    )


def data_description(datamodule: Any) -> dict[str, Any]:
    """The DataModule fields that change what a metric sees (not `expressive_path`: that is
    model input, and runs with and without it must share a report column)."""
    if datamodule is None:
        return {"class_path": None}
    cls = type(datamodule)
    record = {"class_path": f"{cls.__module__}.{cls.__qualname__}"}
    for key in ("max_samples", "caption_source", "test_mode", "eval_resize"):
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
    scoring = evaluator.scoring()
    eval_resize = getattr(datamodule, "eval_resize", None)
    unaligned = scoring["resolution"] != "model" and not scoring["boxes"]
    if eval_resize not in (None, "resize") and unaligned:
        warnings.warn(
            f"the data fed the model with eval_resize={eval_resize!r} but its batches carry "
            "no model_box/native_box, so whole predictions were resized onto whole native "
            "targets; the numbers are recorded as scoring 'native-unaligned'",
            UserWarning,
            stacklevel=2,
        )
        scoring = scoring | {"resolution": "native-unaligned"}
    test_mode = getattr(datamodule, "test_mode", None)
    setting = protocol.setting(protocol.default_aggregation, test_mode)
    return {
        "name": protocol.name,
        "source": protocol.source,
        "columns": table_names,
        "scale": {n: protocol.scale_of(n) for n in table_names},
        "split": split,
        "num_samples": counts[protocol.default_aggregation],
        "num_samples_per_aggregation": counts,
        "resolution": resolution,
        "eval_resize": eval_resize,
        "resize": eval_transform_description(resolution, scoring),
        "scoring": scoring["resolution"],
        "caption_source": getattr(datamodule, "caption_source", None),
        "protocol_caption_source": protocol.caption_source,
        "turn_mode": test_mode,
        "aggregation": protocol.default_aggregation,
        "setting": setting.name if setting is not None else None,
        "aggregations": list(protocol.aggregations),
        "settings": protocol.settings_for(test_mode),
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
