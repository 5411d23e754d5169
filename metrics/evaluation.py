"""EditEvaluator: a protocol's metrics for the model and the copy-the-input baseline.

One evaluator scores a test (or sampled validation) run: for every aggregation of the protocol
(``all``; MagicBrush adds ``single`` and ``final``) it keeps one instance of each metric for the
model's edits and one for the copy-the-input baseline (``preds = source``), feeds each metric
the batch fields it takes (:data:`metrics.collection.METRIC_INPUTS`: images, masks, captions,
instructions) and reports flat keys::

    test/L1            the protocol's default aggregation
    test/final/L1      each aggregation, when the protocol has several
    test/copy/L1       the copy-the-input baseline (likewise per aggregation)

plus the table (raw values times :data:`metrics.protocols.PAPER_SCALE`) and a provenance
record saying how every number was measured.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric, SumMetric

from metrics.collection import (
    METRIC_BACKBONES,
    METRICS,
    NO_COPY_BASELINE,
    check_metric_names,
    metric_inputs,
)
from metrics.pixel import at_least_float32
from metrics.protocols import Protocol, aggregation_indices

#: Default backbone folders, under ``$EDITBENCH_BACKBONES`` (default
#: ``~/.cache/editbench/backbones``): MagicBrush's CLIP ViT-B/32 and DINO ViT-S/16.
DEFAULT_BACKBONE_NAMES = {"clip": "clip-vit-base-patch32", "dino": "dino-vits16"}


def backbone_home() -> Path:
    """Where backbone folders are looked up by default (``$EDITBENCH_BACKBONES``)."""
    return Path(
        os.environ.get("EDITBENCH_BACKBONES", Path.home() / ".cache" / "editbench" / "backbones")
    )


def default_backbones() -> dict[str, str]:
    """``{"clip": <home>/clip-vit-base-patch32, "dino": <home>/dino-vits16}``; LPIPS and
    Inception weights default to the torch hub cache inside their metrics."""
    home = backbone_home()
    return {kind: str(home / name) for kind, name in DEFAULT_BACKBONE_NAMES.items()}


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


class EditEvaluator(nn.Module):
    """Scores edits under a :class:`~metrics.protocols.Protocol`.

    Args:
        protocol: the dataset's protocol (aggregations, default aggregation, scaling).
        names: metric names (default: the protocol's columns).
        metric_kwargs: constructor arguments per metric name.
        backbones: backbone folders/files by kind (``clip``, ``dino``, ``lpips``,
            ``inception``), shared by the metrics that use them.
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
        self.backbones = {**default_backbones(), **dict(backbones or {})}
        self.prefix = prefix

        def build(names: list[str]) -> nn.ModuleDict:
            return nn.ModuleDict(
                {n: build_metric(n, metric_kwargs.get(n), self.backbones) for n in names}
            )

        copied = [n for n in self.names if n not in NO_COPY_BASELINE] if copy_baseline else []
        self.model_metrics = nn.ModuleDict({a: build(self.names) for a in protocol.aggregations})
        self.copy_metrics = nn.ModuleDict({a: build(copied) for a in protocol.aggregations})
        self.counts = nn.ModuleDict({a: SumMetric() for a in protocol.aggregations})

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
    def _select(fields: dict[str, Any], index: Tensor | None) -> dict[str, Any]:
        if index is None:
            return fields
        chosen = {}
        positions = index.tolist()
        for key, value in fields.items():
            if isinstance(value, Tensor) and value.ndim > 0:
                chosen[key] = value[index.to(value.device)]
            elif isinstance(value, list | tuple):
                chosen[key] = [value[i] for i in positions]
            else:
                chosen[key] = value
        return chosen

    def _update(self, metrics: nn.ModuleDict, fields: dict[str, Any]) -> None:
        for name, metric in metrics.items():
            inputs = metric_inputs(name, metric)
            missing = [k for k in inputs if fields.get(k) is None]
            if missing:
                ids = ", ".join(list(fields.get("id") or [])[:3])
                raise ValueError(
                    f"metric {name} needs the batch field(s) {missing}, which this dataset does "
                    f"not provide (samples {ids}); drop {name} from the metrics or use data "
                    f"that has them"
                )
            metric.update(*[fields[k] for k in inputs])

    def update(self, batch: dict, preds: Tensor) -> None:
        """Score a batch's edits ``preds`` ([-1, 1]) against its ``target`` (and the copy
        baseline, ``preds = source``), for every aggregation."""
        fields = self._fields(batch, preds)
        with torch.autocast(device_type=preds.device.type, enabled=False):
            for aggregation in self.protocol.aggregations:
                chosen = self._select(fields, aggregation_indices(aggregation, batch))
                count = len(chosen["preds"])
                if count == 0:
                    continue
                self.counts[aggregation].update(torch.tensor(float(count)))
                self._update(self.model_metrics[aggregation], chosen)
                if len(self.copy_metrics[aggregation]):
                    self._update(
                        self.copy_metrics[aggregation], chosen | {"preds": chosen["source"]}
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

    def compute(self) -> dict[str, float]:
        """Flat results (see the module docstring); metrics that saw no sample are nan."""
        results: dict[str, float] = {}
        for aggregation in self.protocol.aggregations:
            for copy, metrics in ((False, self.model_metrics), (True, self.copy_metrics)):
                for name, metric in metrics[aggregation].items():
                    if not metric.update_called:
                        values = {name: float("nan")}
                    else:
                        values = flatten_value(name, metric.compute())
                    for flat, value in values.items():
                        for key in self._key(flat, aggregation, copy):
                            results[key] = value
        return results

    def num_samples(self) -> dict[str, int]:
        """Samples scored per aggregation (summed over processes)."""
        return {
            a: int(m.compute()) if m.update_called else 0 for a, m in self.counts.items()
        }

    def table(self, results: Mapping[str, float], copy: bool = False) -> dict[str, float]:
        """The default aggregation's values, scaled as the paper prints them."""
        base = f"{self.prefix}/copy/" if copy else f"{self.prefix}/"
        table = {}
        for key, value in results.items():
            if not key.startswith(base):
                continue
            name = key[len(base):]
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
        for metric in self.counts.values():
            metric.reset()
