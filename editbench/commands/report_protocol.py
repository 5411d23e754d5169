"""The protocol check of ``report`` (:mod:`editbench.commands.report`): what must agree for
runs to share a column, and every field on which they differ.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from editbench.commands.report_load import MISSING, Run

#: Keys of ``protocol`` that record where a number came from, not how it was measured.
PROVENANCE_KEYS = frozenset({"seed", "editbench_version", "git_commit"})

#: Keys of ``protocol`` holding one entry per metric: a column compares only its metric's entry
#: (the judge metrics ``test`` left to ``editbench judge``, and their configured settings, are
#: compared through the judge's own description once judged).
PER_METRIC_KEYS = ("metrics", "scale", "columns", "judged_offline", "judge_settings")

Column = tuple[str, str]  # (dataset, metric)


def column_name(column: Column) -> str:
    return f"{column[0]}/{column[1]}"


def metric_entry(mapping: Any, metric: str) -> Any:
    """``mapping[metric]``, else the entry of its base name (``KID`` for ``KID_std``)."""
    if not isinstance(mapping, dict):
        return MISSING
    if metric in mapping:
        return mapping[metric]
    return mapping.get(metric.split("_")[0], MISSING)


def metric_scale(protocol: dict[str, Any], metric: str) -> float:
    """The factor from raw value to table value (absent = 1, as the writer records it)."""
    value = metric_entry(protocol.get("scale"), metric)
    return 1.0 if value is MISSING or value is None else float(value)


def relevant_protocol(protocol: dict[str, Any], metric: str) -> dict[str, Any]:
    """What must agree for two runs to share a column of ``metric``, flattened to dotted keys:
    ``protocol`` without :data:`PROVENANCE_KEYS`, with only ``metric``'s entries of
    :data:`PER_METRIC_KEYS` (``metrics.<metric>.*`` and ``scale.<metric>``), and backbones
    identified by their ``sha256`` rather than their ``path`` where both are recorded."""
    kept = {
        k: v for k, v in protocol.items() if k not in PROVENANCE_KEYS and k not in PER_METRIC_KEYS
    }
    entry = metric_entry(protocol.get("metrics"), metric)
    if entry is not MISSING:
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


def freeze(flat: dict[str, Any]) -> str:
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
        ref = "<missing>" if self.reference_value is MISSING else repr(self.reference_value)
        val = "<missing>" if self.value is MISSING else repr(self.value)
        return (
            f"{column_name(self.column)}: {self.key} differs: {ref} ({self.reference}) vs "
            f"{val} ({self.run})"
        )


def reference_run(runs: Sequence[Run], metric: str) -> Run:
    """The run whose relevant protocol is the most common in ``runs`` (first on a tie)."""
    keys = [freeze(relevant_protocol(r.protocol, metric)) for r in runs]
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
            a, b = ref.get(key, MISSING), flat.get(key, MISSING)
            if a != b:
                out.append(Difference(column, key, a, reference.label, b, run.label))
    return out
