"""Every pixel metric: several updates == one shot, reset, forward, merged (DDP-like) states."""

from __future__ import annotations

import pytest
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_sum

from metrics import L1, SSIM, MaskedL1

METRIC_CLASSES = [L1, MaskedL1, SSIM]


def batch_data(seed: int = 0, n: int = 7, size: int = 16):
    g = torch.Generator().manual_seed(seed)
    preds = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    target = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    mask = (torch.rand(n, 1, size, size, generator=g) < 0.4).float()
    mask[2] = 0  # one empty mask, exercised by MaskedL1
    return preds, target, mask


def args_for(cls: type[Metric], preds, target, mask, idx=slice(None)):
    if cls is MaskedL1:
        return preds[idx], target[idx], mask[idx]
    return preds[idx], target[idx]


def one_shot(cls: type[Metric], *args) -> torch.Tensor:
    metric = cls()
    metric.update(*args)
    return metric.compute()


@pytest.mark.parametrize("cls", METRIC_CLASSES)
def test_several_updates_equal_one_shot(cls):
    preds, target, mask = batch_data()
    expected = one_shot(cls, *args_for(cls, preds, target, mask))
    metric = cls()
    for idx in (slice(0, 1), slice(1, 4), slice(4, 7)):  # unequal batch sizes
        metric.update(*args_for(cls, preds, target, mask, idx))
    torch.testing.assert_close(metric.compute(), expected, atol=1e-6, rtol=0)
    if cls is MaskedL1:
        assert metric.num_empty.item() == 1 and metric.num_images.item() == 6


@pytest.mark.parametrize("cls", METRIC_CLASSES)
def test_reset_forgets_previous_updates(cls):
    preds, target, mask = batch_data()
    other_preds, other_target, other_mask = batch_data(seed=1)
    metric = cls()
    metric.update(*args_for(cls, other_preds, other_target, other_mask))
    metric.reset()
    for name, default in metric._defaults.items():
        torch.testing.assert_close(getattr(metric, name), default, msg=name)
    metric.update(*args_for(cls, preds, target, mask))
    torch.testing.assert_close(
        metric.compute(), one_shot(cls, *args_for(cls, preds, target, mask)), atol=1e-7, rtol=0
    )


@pytest.mark.parametrize("cls", METRIC_CLASSES)
def test_forward_returns_batch_value_and_accumulates(cls):
    preds, target, mask = batch_data()
    metric = cls()
    first = metric(*args_for(cls, preds, target, mask, slice(0, 3)))
    metric(*args_for(cls, preds, target, mask, slice(3, 7)))
    torch.testing.assert_close(
        first, one_shot(cls, *args_for(cls, preds, target, mask, slice(0, 3))), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        metric.compute(), one_shot(cls, *args_for(cls, preds, target, mask)), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("cls", METRIC_CLASSES)
def test_merged_states_equal_one_shot(cls):
    # merge_state applies each state's dist_reduce_fx, as a DDP sync would across ranks
    preds, target, mask = batch_data()
    rank0, rank1 = cls(), cls()
    rank0.update(*args_for(cls, preds, target, mask, slice(0, 2)))
    rank1.update(*args_for(cls, preds, target, mask, slice(2, 7)))
    rank0.merge_state(rank1)
    torch.testing.assert_close(
        rank0.compute(), one_shot(cls, *args_for(cls, preds, target, mask)), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("cls", METRIC_CLASSES)
def test_metric_declarations(cls):
    metric = cls()
    assert metric.full_state_update is False
    assert isinstance(metric.higher_is_better, bool)
    assert metric.higher_is_better is (cls is SSIM)
    assert metric.is_differentiable is True
    # every state is summed across processes
    assert metric._defaults and all(
        metric._reductions[name] is dim_zero_sum for name in metric._defaults
    )


@pytest.mark.parametrize("cls", METRIC_CLASSES)
def test_gradients_flow_to_preds(cls):
    preds, target, mask = batch_data(n=3)
    preds = (preds * 0.9).requires_grad_(True)  # inside (-1, 1): no clamping at the edges
    value = cls()(*args_for(cls, preds, target, mask))
    value.backward()
    assert preds.grad is not None and preds.grad.abs().sum() > 0
