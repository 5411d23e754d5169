"""edit_metrics(), the name registry and update_edit_metrics()."""

from __future__ import annotations

import pytest
import torch
from torchmetrics import Metric, MetricCollection

from metrics import (
    DEFAULT_METRICS,
    L1,
    METRICS,
    SSIM,
    MaskedL1,
    edit_metrics,
    register_metric,
    requires_mask,
    takes_mask,
    update_edit_metrics,
)


def batch(seed: int = 0, n: int = 3, size: int = 16):
    g = torch.Generator().manual_seed(seed)
    source = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    target = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    preds = (target + 0.3 * torch.randn(n, 3, size, size, generator=g)).clamp(-1, 1)
    mask = (torch.rand(n, 1, size, size, generator=g) < 0.5).float()
    return source, preds, target, mask


def test_default_collection_keys_and_types():
    collection = edit_metrics()
    assert isinstance(collection, MetricCollection)
    assert list(collection.keys()) == ["L1", "L1_edit", "SSIM"] == list(DEFAULT_METRICS)
    assert isinstance(collection["L1"], L1)
    assert isinstance(collection["L1_edit"], MaskedL1)
    assert isinstance(collection["SSIM"], SSIM)


def test_prefixed_clones_keep_the_names():
    collection = edit_metrics()
    assert list(collection.clone(prefix="test/").keys()) == ["test/L1", "test/L1_edit", "test/SSIM"]
    assert list(collection.clone(prefix="test/copy/").keys()) == [
        "test/copy/L1",
        "test/copy/L1_edit",
        "test/copy/SSIM",
    ]


def test_update_matches_individual_metrics_and_routes_the_mask():
    source, preds, target, mask = batch()
    collection = edit_metrics().clone(prefix="test/")
    copy_baseline = edit_metrics().clone(prefix="test/copy/")
    for half in (slice(0, 1), slice(1, 3)):
        update_edit_metrics(collection, preds[half], target[half], mask[half])
        update_edit_metrics(copy_baseline, source[half], target[half], mask[half])
    results = {**collection.compute(), **copy_baseline.compute()}

    def alone(metric: Metric, *args) -> torch.Tensor:
        metric.update(*args)
        return metric.compute()

    expected = {
        "test/L1": alone(L1(), preds, target),
        "test/L1_edit": alone(MaskedL1(), preds, target, mask),
        "test/SSIM": alone(SSIM(), preds, target),
        "test/copy/L1": alone(L1(), source, target),
        "test/copy/L1_edit": alone(MaskedL1(), source, target, mask),
        "test/copy/SSIM": alone(SSIM(), source, target),
    }
    assert results.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(results[key], value, atol=1e-6, rtol=0, msg=key)
    # L1_edit really used the mask: it differs from the whole-image L1
    assert abs(results["test/L1_edit"] - results["test/L1"]) > 1e-4


def test_missing_mask_raises_when_l1_edit_is_requested():
    _, preds, target, _ = batch()
    collection = edit_metrics()
    with pytest.raises(ValueError, match=r"L1_edit.*no 'mask'"):
        update_edit_metrics(collection, preds, target)
    # nothing was updated by the failed call
    assert all(metric.update_count == 0 for metric in collection.values(copy_state=False))


def test_collection_without_l1_edit_needs_no_mask():
    _, preds, target, mask = batch()
    collection = edit_metrics(names=("L1", "SSIM"))
    update_edit_metrics(collection, preds, target)
    with_mask = edit_metrics(names=("L1", "SSIM"))
    update_edit_metrics(with_mask, preds, target, mask)  # a mask is simply not used
    first, second = collection.compute(), with_mask.compute()
    assert list(first) == ["L1", "SSIM"]
    for key in first:
        torch.testing.assert_close(first[key], second[key])


def test_mask_introspection():
    assert requires_mask(MaskedL1()) and takes_mask(MaskedL1())
    assert not takes_mask(L1()) and not requires_mask(SSIM())


def test_names_validation():
    with pytest.raises(ValueError, match="Unknown metric"):
        edit_metrics(names=("L1", "PSNR-not-registered"))
    with pytest.raises(ValueError, match="more than once"):
        edit_metrics(names=("L1", "L1"))
    with pytest.raises(TypeError, match="sequence of metric names"):
        edit_metrics(names="L1")
    with pytest.raises(ValueError, match="not in `names`"):
        edit_metrics(names=("L1",), metric_kwargs={"SSIM": {"crop_border": True}})


def test_metric_kwargs_reach_the_metric():
    collection = edit_metrics(names=("SSIM",), metric_kwargs={"SSIM": {"crop_border": True}})
    assert collection["SSIM"].crop_border is True


def test_compute_groups_are_disabled():
    # with compute groups on, metrics whose states coincide after the first batch (e.g. two
    # distances that are both 0 on an identical pair) would be merged for good
    _, _, target, mask = batch()
    collection = edit_metrics()
    update_edit_metrics(collection, target, target, mask)
    assert collection.compute_groups == {}  # torchmetrics' value when disabled
    assert collection["L1"].sum_l1 is not collection["L1_edit"].sum_l1


class _OptionalMaskMetric(Metric):
    """A toy metric with an optional mask: counts masked pixels when given a mask."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None):
        self.total += preds.new_tensor(-1.0) if mask is None else mask.sum()

    def compute(self) -> torch.Tensor:
        return self.total


def test_register_metric_and_optional_mask(monkeypatch):
    monkeypatch.setattr("metrics.collection.METRICS", dict(METRICS))
    register_metric("MaskedPixels", _OptionalMaskMetric)
    with pytest.raises(ValueError, match="already registered"):
        register_metric("MaskedPixels", L1)
    _, preds, target, mask = batch()
    collection = edit_metrics(names=("L1", "MaskedPixels"))
    update_edit_metrics(collection, preds, target, mask)
    assert collection.compute()["MaskedPixels"].item() == mask.sum().item()
    collection.reset()
    update_edit_metrics(collection, preds, target)  # optional: no error without a mask
    assert collection.compute()["MaskedPixels"].item() == -1.0
    with pytest.raises(TypeError, match="Metric subclass"):
        register_metric("NotAMetric", dict)

    @register_metric("DecoratedL1")
    class DecoratedL1(L1):
        pass

    assert isinstance(edit_metrics(names=("DecoratedL1",))["DecoratedL1"], DecoratedL1)
