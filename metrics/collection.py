"""The edit-metric collection: a registry of metric names and helpers to build and update it.

The collection's keys are exactly the registered names (``"L1"``, ``"L1_edit"``, ``"SSIM"``);
models add their prefixes with ``collection.clone(prefix="test/")`` (and ``"test/copy/"`` for
the copy-the-input baseline: the same metrics updated with ``preds = source``).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection

from metrics.pixel import L1, PSNR, SSIM, MaskedL1, at_least_float32

#: name -> Metric class. Add metrics with :func:`register_metric`.
METRICS: dict[str, type[Metric]] = {"L1": L1, "L1_edit": MaskedL1, "SSIM": SSIM, "PSNR": PSNR}

DEFAULT_METRICS: tuple[str, ...] = ("L1", "L1_edit", "SSIM")

#: name -> the batch fields its ``update`` takes, in order (absent = ``("preds", "target")``
#: plus ``mask`` when ``update`` has a ``mask`` parameter). Fields: ``preds``, ``source``,
#: ``target``, ``mask`` and any text key of the batch (``goal_caption``, ``instruction``, ...).
METRIC_INPUTS: dict[str, tuple[str, ...]] = {}

#: name -> (backbone kind, constructor argument): ``EditEvaluator`` fills the argument from its
#: ``backbones`` mapping, so one CLIP folder serves CVS, CTS and the directional metrics.
METRIC_BACKBONES: dict[str, tuple[str, str]] = {}

#: Metrics without a copy-the-input baseline (an API judge would be paid twice for it).
NO_COPY_BASELINE: set[str] = set()

#: Judge metrics that ``test`` leaves to the offline judge of its result bundle (``python -m
#: editbench judge --bundle DIR``): no GPU waits on HTTP inside ``test_step``, and one judge
#: pass serves every aggregation. Evaluation during training still runs them in process.
JUDGED_OFFLINE: set[str] = set()


def register_metric(
    name: str,
    cls: type[Metric] | None = None,
    *,
    overwrite: bool = False,
    inputs: tuple[str, ...] | None = None,
    backbone: tuple[str, str] | None = None,
    copy_baseline: bool = True,
    judged_offline: bool = False,
) -> Any:
    """Register a ``Metric`` class under ``name`` (usable as a decorator: ``@register_metric("X")``).

    A metric whose ``update`` has a ``mask`` parameter receives the batch's mask from
    :func:`update_edit_metrics`; if that parameter has no default, the metric requires one.

    Args:
        inputs: the batch fields ``update`` takes, in order (see :data:`METRIC_INPUTS`).
        backbone: ``(kind, argument)``: the constructor argument filled from the evaluator's
            ``backbones[kind]`` (e.g. ``("clip", "clip_path")``).
        copy_baseline: whether the copy-the-input baseline is also scored with this metric.
        judged_offline: a judge that ``test`` leaves to ``editbench judge`` (:data:`JUDGED_OFFLINE`).
    """

    def _register(metric_cls: type[Metric]) -> type[Metric]:
        if not (isinstance(metric_cls, type) and issubclass(metric_cls, Metric)):
            raise TypeError(
                f"Expected a torchmetrics Metric subclass for {name!r}, got {metric_cls!r}."
            )
        if name in METRICS and METRICS[name] is not metric_cls and not overwrite:
            raise ValueError(
                f"A metric is already registered as {name!r} ({METRICS[name].__name__}); "
                "pass overwrite=True to replace it."
            )
        METRICS[name] = metric_cls
        if inputs is not None:
            METRIC_INPUTS[name] = tuple(inputs)
        if backbone is not None:
            METRIC_BACKBONES[name] = tuple(backbone)
        if not copy_baseline:
            NO_COPY_BASELINE.add(name)
        if judged_offline:
            JUDGED_OFFLINE.add(name)
        return metric_cls

    if cls is None:
        return _register
    return _register(cls)


def edit_metrics(
    names: Iterable[str] = DEFAULT_METRICS,
    metric_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
) -> MetricCollection:
    """Build a ``MetricCollection`` of the named metrics, keyed exactly by their names.

    Args:
        names: registered metric names, in order (see ``METRICS``).
        metric_kwargs: optional constructor arguments per name, e.g.
            ``{"SSIM": {"crop_border": True}}``.

    Compute groups are disabled: the metrics are cheap, and merging two metrics whose states
    happen to coincide on the first batch would silently report one for the other.
    """
    if isinstance(names, str):
        raise TypeError(f"`names` must be a sequence of metric names, got the string {names!r}.")
    names = list(names)
    if not names:
        raise ValueError("`names` is empty: name at least one metric.")
    metric_kwargs = check_metric_names(names, metric_kwargs)
    metrics = {name: METRICS[name](**dict(metric_kwargs.get(name, {}))) for name in names}
    return MetricCollection(metrics, compute_groups=False)


def check_metric_names(
    names: list[str], metric_kwargs: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, Mapping[str, Any]]:
    """Check that ``names`` are registered and distinct and that ``metric_kwargs`` names only
    them; returns ``metric_kwargs`` as a dict."""
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ValueError(f"Unknown metric name(s) {unknown}; registered: {sorted(METRICS)}.")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"Metric name(s) {duplicates} given more than once.")
    metric_kwargs = dict(metric_kwargs or {})
    stray = sorted(set(metric_kwargs) - set(names))
    if stray:
        raise ValueError(f"`metric_kwargs` names metrics not in `names`: {stray}.")
    return metric_kwargs


def metric_inputs(name: str, metric: Metric) -> tuple[str, ...]:
    """The batch fields ``metric`` (registered as ``name``) takes, in ``update``'s order."""
    if name in METRIC_INPUTS:
        return METRIC_INPUTS[name]
    return ("preds", "target", "mask") if takes_mask(metric) else ("preds", "target")


def _mask_parameter(metric: Metric) -> inspect.Parameter | None:
    return inspect.signature(metric.update).parameters.get("mask")


def takes_mask(metric: Metric) -> bool:
    """Whether ``metric.update`` accepts a ``mask`` argument."""
    return _mask_parameter(metric) is not None


def requires_mask(metric: Metric) -> bool:
    """Whether ``metric.update`` needs a ``mask`` argument (a ``mask`` parameter without default)."""
    parameter = _mask_parameter(metric)
    return parameter is not None and parameter.default is inspect.Parameter.empty


def update_edit_metrics(
    collection: MetricCollection, preds: Tensor, target: Tensor, mask: Tensor | None = None
) -> None:
    """Update every metric of ``collection`` with a batch, passing ``mask`` only where taken.

    ``preds`` and ``target`` are ``[B, 3, H, W]`` in ``[-1, 1]``; ``mask`` is ``[B, 1, H, W]``
    in ``{0, 1}`` or None. Metrics whose ``update`` has a ``mask`` parameter (``L1_edit``)
    receive it; the others get ``(preds, target)`` only.

    Raises:
        ValueError: if ``mask`` is None and the collection holds a metric that requires one
            (``L1_edit``): build the collection without it for datasets that have no masks,
            rather than reporting an edit-region L1 over no region.
    """
    with torch.autocast(device_type=preds.device.type, enabled=False):
        _update(collection, at_least_float32(preds), at_least_float32(target), mask)


def _update(collection: MetricCollection, preds: Tensor, target: Tensor, mask: Tensor | None) -> None:
    if mask is None:
        needing = [
            name
            for name, metric in collection.items(keep_base=True, copy_state=False)
            if requires_mask(metric)
        ]
        if needing:
            raise ValueError(
                f"Metric(s) {needing} need an edit mask, but this batch has no 'mask'. For a "
                "dataset without masks, build the collection without them, e.g. "
                "edit_metrics(names=('L1', 'SSIM'))."
            )
        collection.update(preds, target)
    else:
        # MetricCollection.update passes keyword arguments only to metrics whose update
        # signature names them, so `mask` reaches L1_edit and not L1 or SSIM.
        collection.update(preds, target, mask=mask)


__all__: list[str] = [
    "DEFAULT_METRICS",
    "METRICS",
    "METRIC_BACKBONES",
    "METRIC_INPUTS",
    "JUDGED_OFFLINE",
    "NO_COPY_BASELINE",
    "check_metric_names",
    "metric_inputs",
    "edit_metrics",
    "register_metric",
    "requires_mask",
    "takes_mask",
    "update_edit_metrics",
]
