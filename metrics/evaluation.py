"""EditEvaluator: a protocol's metrics for the model and the copy-the-input baseline.

One evaluator scores a test (or sampled validation) run: for every aggregation of the protocol
(``all``; MagicBrush adds ``final`` and ``turn1``) it keeps one instance of each metric for the
model's edits and one for the copy-the-input baseline (``preds = source``), feeds each metric
the batch fields it takes (:data:`metrics.collection.METRIC_INPUTS`: images, masks, captions,
instructions) and reports flat keys::

    test/L1            the protocol's default aggregation
    test/final/L1      each aggregation, when the protocol has several
    test/copy/L1       the copy-the-input baseline (likewise per aggregation)

plus the table (raw values times :data:`metrics.protocols.PAPER_SCALE`) and a provenance
record saying how every number was measured.

Where the batch carries the native images (``target_native``, ``source_native``,
``mask_native``: the DataModules' evaluation collate), edits are scored at the native ground
truth's size on the whole image, as MagicBrush's script does (:mod:`metrics.native`);
hand-built batches without them are scored at the model's resolution.

Exact under DDP: ``compute()`` is a collective that every rank reaches with the same calls in
the same order, whatever turns each rank saw: first one ``all_reduce`` of the per-aggregation
sample counts, then ``compute()`` of every metric of every aggregation whose global count is
positive (ranks that saw none join with empty states, see :mod:`metrics.distributed`); an
aggregation no rank saw is nan everywhere. ``num_samples()`` returns the counts of the last
``compute()`` (no further collective), so it is safe on rank 0 alone.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from metrics.collection import (
    METRIC_BACKBONES,
    METRICS,
    NO_COPY_BASELINE,
    check_metric_names,
    metric_inputs,
)
from metrics.distributed import align_list_states, global_counts, is_distributed
from metrics.native import NATIVE_DESCRIPTION, NativeBatch, has_native
from metrics.pixel import at_least_float32
from metrics.protocols import MAGICBRUSH_BACKBONES, Protocol, aggregation_indices
from metrics.samples import record_samples

#: Default backbone folders, under ``$EDITBENCH_BACKBONES`` (default
#: ``~/.cache/editbench/backbones``), of a protocol that names none: MagicBrush's CLIP ViT-B/32
#: and DINO ViT-S/16. Protocols name their own (:attr:`Protocol.backbones`).
DEFAULT_BACKBONE_NAMES = dict(MAGICBRUSH_BACKBONES)

#: Batch keys that are not one entry per sample (never indexed by an aggregation).
BATCH_LEVEL_KEYS = frozenset({"skipped_ids"})

_NOT_UPDATED = r".*was called before the ``update`` method.*"


def backbone_home() -> Path:
    """Where backbone folders are looked up by default (``$EDITBENCH_BACKBONES``)."""
    return Path(
        os.environ.get("EDITBENCH_BACKBONES", Path.home() / ".cache" / "editbench" / "backbones")
    )


def default_backbones(protocol: Protocol | None = None) -> dict[str, str]:
    """The protocol's backbone folders under :func:`backbone_home` (without a protocol:
    ``{"clip": <home>/clip-vit-base-patch32, "dino": <home>/dino-vits16}``); LPIPS and
    Inception weights default to the torch hub cache inside their metrics."""
    home = backbone_home()
    names = protocol.backbones if protocol is not None else DEFAULT_BACKBONE_NAMES
    return {kind: str(home / name) for kind, name in names.items()}


def build_metric(
    name: str, kwargs: Mapping[str, Any] | None = None, backbones: Mapping[str, str] | None = None
) -> Metric:
    """The registered metric ``name``, its backbone argument filled from ``backbones`` unless
    ``kwargs`` sets it."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; registered: {sorted(METRICS)}")
    kwargs = dict(kwargs or {})
    if name in METRIC_BACKBONES:
        kind, argument = METRIC_BACKBONES[name]
        backbones = {**default_backbones(), **dict(backbones or {})}
        if argument not in kwargs and kind in backbones:
            kwargs[argument] = backbones[kind]
    return METRICS[name](**kwargs)


def flatten_value(name: str, value: Any) -> dict[str, float]:
    """A metric's ``compute()`` as flat floats: a tensor -> ``name``; KID's ``(mean, std)`` ->
    ``name``, ``name_std``; a dict (VIEScore) -> ``name_<key>``."""
    if isinstance(value, Mapping):
        return {f"{name}_{k}": float(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return {name: float(value[0]), f"{name}_std": float(value[1])}
    return {name: float(value)}


def source_as_target(batch: dict) -> dict:
    """A shallow copy of ``batch`` whose reference images are its inputs: ``target`` =
    ``source`` and ``target_native`` = ``source_native`` (native scoring then compares the edit
    with the input at the input's size). For protocols whose benchmark has no targets
    (:data:`metrics.protocols.REFERENCES`)."""
    if batch.get("source") is None:
        ids = ", ".join(str(i) for i in list(batch.get("id") or [])[:3])
        raise ValueError(f"a protocol scored against the input needs 'source' (samples {ids})")
    out = dict(batch)
    out["target"] = batch["source"]
    if isinstance(batch.get("source_native"), (list, tuple)):
        out["target_native"] = batch["source_native"]
    return out


class EditEvaluator(nn.Module):
    """Scores edits under a :class:`~metrics.protocols.Protocol`.

    Args:
        protocol: the dataset's protocol (aggregations, default aggregation, scaling, default
            backbones and metric arguments).
        names: metric names (default: the protocol's columns).
        metric_kwargs: constructor arguments per metric name (over the protocol's defaults,
            key by key).
        backbones: backbone folders/files by kind (``clip``, ``dino``, ``lpips``,
            ``inception``), shared by the metrics that use them; kinds not given take the
            protocol's defaults under ``$EDITBENCH_BACKBONES``.
        copy_baseline: also score the copy-the-input baseline.
        prefix: the key prefix (``test`` or ``val``).
    """

    def __init__(
        self,
        protocol: Protocol,
        names: Iterable[str] | None = None,
        *,
        metric_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        backbones: Mapping[str, str] | None = None,
        copy_baseline: bool = True,
        prefix: str = "test",
    ) -> None:
        super().__init__()
        self.protocol = protocol
        self.names = list(names) if names is not None else list(protocol.columns)
        metric_kwargs = check_metric_names(self.names, metric_kwargs)
        merged = {
            name: {**protocol.metric_kwargs.get(name, {}), **dict(metric_kwargs.get(name, {}))}
            for name in self.names
        }
        self.backbones = {**default_backbones(protocol), **dict(backbones or {})}
        self.prefix = prefix

        def build(names: list[str]) -> nn.ModuleDict:
            return nn.ModuleDict({n: build_metric(n, merged[n], self.backbones) for n in names})

        # A protocol scored against the input has no copy baseline (the input against itself).
        copy_baseline = copy_baseline and protocol.reference == "target"
        copied = [n for n in self.names if n not in NO_COPY_BASELINE] if copy_baseline else []
        self.model_metrics = nn.ModuleDict({a: build(self.names) for a in protocol.aggregations})
        self.copy_metrics = nn.ModuleDict({a: build(copied) for a in protocol.aggregations})
        self._local_counts = dict.fromkeys(protocol.aggregations, 0)
        self._global_counts: dict[str, int] | None = None
        self._scored = {"native": 0, "model": 0, "boxes": 0}
        self._recording = False
        self._rows: list[dict[str, Any]] = []
        self._unnamed = 0

    # ------------------------------------------------------------------ per-sample rows
    def record_samples(self, on: bool = True) -> list[str]:
        """Keep one row per sample, aggregation, system and per-image metric (see
        :meth:`samples`); returns the metric names that record (the others, FID/KID/VIEScore,
        are set-level or judge metrics without per-sample rows)."""
        self._recording = on
        self._rows = []
        recorded = []
        for group in (self.model_metrics, self.copy_metrics):
            for metrics in group.values():
                for name, metric in metrics.items():
                    if record_samples(metric, on) and name not in recorded:
                        recorded.append(name)
        return [n for n in self.names if n in recorded]

    def sample_reductions(self) -> dict[str, str]:
        """Per recorded metric: how its aggregate follows from its rows
        (:data:`metrics.samples.REDUCTIONS`)."""
        metrics = self.model_metrics[self.protocol.default_aggregation]
        return {
            name: metric.sample_reduction
            for name, metric in metrics.items()
            if getattr(metric, "_recording", False)
        }

    def _record(self, name: str, metric: Metric, fields: dict, aggregation: str, copy: bool) -> None:
        values = metric.take_samples() if hasattr(metric, "take_samples") else []
        if not values:
            return
        ids = list(fields["id"])
        if len(values) != len(ids):
            raise RuntimeError(f"{name} recorded {len(values)} values for {len(ids)} samples")
        sessions, turns = fields.get("session"), fields.get("turn")
        for i, (sample_id, value) in enumerate(zip(ids, values, strict=True)):
            self._rows.append(
                {
                    "id": str(sample_id),
                    "dataset": self.protocol.name,
                    "session": None if sessions is None else str(sessions[i]),
                    "turn": None if turns is None else int(turns[i]),
                    "aggregation": aggregation,
                    "system": "copy" if copy else "model",
                    "metric": name,
                    **value,
                }
            )

    def samples(self) -> list[dict[str, Any]]:
        """Every process's rows, on every process (one ``all_gather_object`` under DDP, a
        collective: call it on every rank), one per (sample id, aggregation, system, metric):
        a repeat of a key (a padded sample) is dropped, sorted by aggregation, system, metric
        and id."""
        gathered = [self._rows]
        if is_distributed():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, self._rows)
        unique: dict[tuple, dict[str, Any]] = {}
        for rows in gathered:
            for row in rows or []:
                key = (row["aggregation"], row["system"], row["metric"], row["id"])
                unique.setdefault(key, row)
        return [unique[k] for k in sorted(unique)]

    # ------------------------------------------------------------------ update
    @staticmethod
    def _fields(batch: dict, preds: Tensor) -> dict[str, Any]:
        fields = {k: v for k, v in batch.items() if k not in ("preds",)}
        fields["preds"] = at_least_float32(preds)
        for key in ("source", "target"):
            if isinstance(fields.get(key), Tensor):
                fields[key] = at_least_float32(fields[key])
        return fields

    @staticmethod
    def _select(fields: dict[str, Any], index: Tensor | list[int] | None) -> dict[str, Any]:
        """The per-sample fields at ``index`` (tensors with a batch dimension and lists of
        batch length, except :data:`BATCH_LEVEL_KEYS`); other fields are kept whole."""
        if index is None:
            return fields
        size = len(fields["preds"])
        positions = index.tolist() if isinstance(index, Tensor) else list(index)
        chosen = {}
        for key, value in fields.items():
            per_sample = key not in BATCH_LEVEL_KEYS
            if per_sample and isinstance(value, Tensor) and value.ndim > 0 and len(value) == size:
                chosen[key] = value[
                    torch.as_tensor(positions, dtype=torch.long, device=value.device)
                ]
            elif per_sample and isinstance(value, list | tuple) and len(value) == size:
                chosen[key] = [value[i] for i in positions]
            else:
                chosen[key] = value
        return chosen

    def _update(
        self,
        metrics: nn.ModuleDict,
        fields: dict[str, Any],
        aggregation: str | None = None,
        copy: bool = False,
    ) -> None:
        for name, metric in metrics.items():
            inputs = metric_inputs(name, metric)
            missing = [k for k in inputs if fields.get(k) is None]
            if missing:
                ids = ", ".join(str(i) for i in list(fields.get("id") or [])[:3])
                raise ValueError(
                    f"metric {name} needs the batch field(s) {missing}, which this dataset does "
                    f"not provide (samples {ids}); drop {name} from the metrics or use data "
                    f"that has them"
                )
            metric.update(*[fields[k] for k in inputs])
            if self._recording:
                self._record(name, metric, fields, aggregation or "all", copy)

    def _groups(self, fields: dict, native: NativeBatch | None, index: Tensor | None) -> list[dict]:
        """The fields of the chosen samples, one dict per native size (one dict without
        native images)."""
        if native is None:
            return [self._select(fields, index)]
        rows = list(range(len(fields["preds"]))) if index is None else index.tolist()
        groups = []
        for members, images in native.groups(rows):
            chosen = self._select(fields, members)
            chosen.update(images)
            groups.append(chosen)
        return groups

    def update(self, batch: dict, preds: Tensor) -> None:
        """Score a batch's edits ``preds`` ([-1, 1]) against its target (and the copy
        baseline, ``preds = source``), for every aggregation; at native resolution when the
        batch carries ``target_native``. A protocol whose ``reference`` is ``"source"`` scores
        against the input instead (:func:`source_as_target`)."""
        if self.protocol.reference == "source":
            batch = source_as_target(batch)
        fields = self._fields(batch, preds)
        if fields.get("id") is None:  # hand-built batches: positional ids
            start, self._unnamed = self._unnamed, self._unnamed + len(fields["preds"])
            fields["id"] = [f"sample{start + i}" for i in range(len(fields["preds"]))]
        native = NativeBatch(batch, fields["preds"]) if has_native(batch) else None
        self._scored["native" if native is not None else "model"] += len(fields["preds"])
        self._scored["boxes"] += native.boxes if native is not None else 0
        self._global_counts = None
        with torch.autocast(device_type=preds.device.type, enabled=False):
            for aggregation in self.protocol.aggregations:
                index = aggregation_indices(aggregation, batch)
                if index is not None and len(index) == 0:
                    continue
                for chosen in self._groups(fields, native, index):
                    self._local_counts[aggregation] += len(chosen["preds"])
                    self._update(self.model_metrics[aggregation], chosen, aggregation)
                    if len(self.copy_metrics[aggregation]):
                        self._update_copy(aggregation, chosen, native is not None)

    def _update_copy(self, aggregation: str, chosen: dict, native: bool) -> None:
        if chosen.get("source") is None:
            ids = ", ".join(str(i) for i in list(chosen.get("id") or [])[:3])
            key = "source_native (beside target_native)" if native else "source"
            raise ValueError(
                f"the copy-the-input baseline needs the batch field {key}, which samples {ids} "
                "lack; set copy_baseline=False or use data that has it"
            )
        self._update(
            self.copy_metrics[aggregation], chosen | {"preds": chosen["source"]}, aggregation, True
        )

    # ------------------------------------------------------------------ results
    def _key(self, name: str, aggregation: str, copy: bool) -> list[str]:
        base = f"{self.prefix}/copy" if copy else self.prefix
        keys = []
        if aggregation == self.protocol.default_aggregation:
            keys.append(f"{base}/{name}")
        if len(self.protocol.aggregations) > 1:
            keys.append(f"{base}/{aggregation}/{name}")
        return keys

    def _sync_counts(self) -> dict[str, int]:
        aggregations = list(self.protocol.aggregations)
        counts = global_counts([self._local_counts[a] for a in aggregations], _metric_device(self))
        self._global_counts = dict(zip(aggregations, counts, strict=True))
        return self._global_counts

    def compute(self) -> dict[str, float]:
        """Flat results (see the module docstring); aggregations no process saw are nan.

        A collective under DDP: call it on every rank."""
        counts = self._sync_counts()
        results: dict[str, float] = {}
        for aggregation in self.protocol.aggregations:
            for copy, metrics in ((False, self.model_metrics), (True, self.copy_metrics)):
                for name, metric in metrics[aggregation].items():
                    if counts[aggregation] == 0:
                        values = {name: float("nan")}
                    else:
                        align_list_states(metric)
                        with warnings.catch_warnings():
                            # a rank that saw none of this aggregation still joins the sync
                            warnings.filterwarnings("ignore", message=_NOT_UPDATED)
                            values = flatten_value(name, metric.compute())
                    for flat, value in values.items():
                        for key in self._key(flat, aggregation, copy):
                            results[key] = value
        return results

    def num_samples(self) -> dict[str, int]:
        """Samples scored per aggregation, summed over processes: the counts of the last
        :meth:`compute` (no collective then); before any, they are synced here (a collective)."""
        if self._global_counts is None:
            self._sync_counts()
        return dict(self._global_counts)

    def scoring(self) -> dict[str, Any]:
        """How the images were compared (this process's view): ``resolution`` ``native``
        (MagicBrush's rule, :mod:`metrics.native`), ``model`` (the model's resolution) or
        ``mixed``; ``boxes``: samples whose ``model_box``/``native_box`` were applied."""
        native, model = self._scored["native"], self._scored["model"]
        resolution = "mixed" if native and model else "native" if native else "model"
        description = {
            "native": NATIVE_DESCRIPTION,
            "model": "edit and target compared at the model's input resolution",
            "mixed": "some batches at native resolution, some at the model's",
        }[resolution]
        return {
            "resolution": resolution,
            "description": description,
            "boxes": self._scored["boxes"],
        }

    def table(self, results: Mapping[str, float], copy: bool = False) -> dict[str, float]:
        """The default aggregation's values, scaled as the paper prints them."""
        base = f"{self.prefix}/copy/" if copy else f"{self.prefix}/"
        table = {}
        for key, value in results.items():
            if not key.startswith(base):
                continue
            name = key[len(base) :]
            if "/" in name:  # another aggregation or the copy baseline
                continue
            table[name] = value * self.protocol.scale_of(name)
        return table

    def metric_provenance(self) -> dict[str, Any]:
        """Per metric: how it measures (backbone path and weights hash, preprocessing...)."""
        metrics = self.model_metrics[self.protocol.default_aggregation]
        record = {}
        for name, metric in metrics.items():
            describe = getattr(metric, "provenance", None)
            record[name] = describe() if callable(describe) else {"class": type(metric).__name__}
        return record

    def reset(self) -> None:
        for group in (self.model_metrics, self.copy_metrics):
            for metrics in group.values():
                for metric in metrics.values():
                    metric.reset()
        self._local_counts = dict.fromkeys(self.protocol.aggregations, 0)
        self._global_counts = None
        self._scored = {"native": 0, "model": 0, "boxes": 0}
        self._rows = []
        self._unnamed = 0


def _metric_device(evaluator: EditEvaluator) -> torch.device:
    """The device of the evaluator's metrics (their states), CPU when it has none."""
    for group in (evaluator.model_metrics, evaluator.copy_metrics):
        for metrics in group.values():
            for metric in metrics.values():
                return metric.device
    return torch.device("cpu")
