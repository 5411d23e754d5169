"""PSNR against scikit-image's ``peak_signal_noise_ratio``, torchmetrics' pooled PSNR and hand
values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio as skimage_psnr
from torchmetrics.image import PeakSignalNoiseRatio

from metrics.collection import METRICS, edit_metrics, update_edit_metrics
from metrics.pixel import PSNR


def uint8_batch(rng: np.random.Generator, n: int, size: int = 24) -> np.ndarray:
    return rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def to_suite(images: np.ndarray) -> torch.Tensor:
    """uint8 HWC images -> [B, 3, H, W] in [-1, 1] (the suite's range)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).double() / 127.5 - 1


def noisy(rng: np.random.Generator, images: np.ndarray, scale: float) -> np.ndarray:
    noise = rng.normal(0, scale, size=images.shape)
    return np.clip(images.astype(np.float64) + noise, 0, 255).round().astype(np.uint8)


def test_psnr_is_the_mean_of_skimage_per_image_values():
    rng = np.random.default_rng(0)
    targets = [uint8_batch(rng, 3), uint8_batch(rng, 2)]
    # different noise levels per batch, so per-image and pooled PSNR differ
    preds = [noisy(rng, targets[0], 4.0), noisy(rng, targets[1], 40.0)]
    metric = PSNR()
    for p, t in zip(preds, targets, strict=True):
        metric.update(to_suite(p), to_suite(t))
    expected = [
        skimage_psnr(t / 255.0, p / 255.0, data_range=1.0)
        for pb, tb in zip(preds, targets, strict=True)
        for p, t in zip(pb, tb, strict=True)
    ]
    assert len(expected) == 5
    assert float(metric.compute()) == pytest.approx(np.mean(expected), abs=1e-4)


def test_pooled_psnr_is_torchmetrics_default_accumulation():
    rng = np.random.default_rng(1)
    targets = uint8_batch(rng, 4)
    preds = np.concatenate([noisy(rng, targets[:2], 3.0), noisy(rng, targets[2:], 30.0)])
    pooled, per_image = PSNR(reduction="pooled"), PSNR()
    reference = PeakSignalNoiseRatio(data_range=1.0)
    for lo, hi in ((0, 1), (1, 4)):
        pooled.update(to_suite(preds[lo:hi]), to_suite(targets[lo:hi]))
        per_image.update(to_suite(preds[lo:hi]), to_suite(targets[lo:hi]))
        reference.update(
            torch.from_numpy(preds[lo:hi]).permute(0, 3, 1, 2).double() / 255,
            torch.from_numpy(targets[lo:hi]).permute(0, 3, 1, 2).double() / 255,
        )
    assert float(pooled.compute()) == pytest.approx(float(reference.compute()), abs=1e-4)
    # -log10 is convex: the pooled value lies below the mean of per-image values
    assert float(pooled.compute()) < float(per_image.compute()) - 1.0


def test_psnr_by_hand_on_constant_images():
    # [0, 1] values: target 0.5; preds 0.6 (MSE 0.01 -> 20 dB) and 0.51 (MSE 1e-4 -> 40 dB)
    target = torch.zeros(2, 3, 8, 8)
    preds = torch.stack([torch.full((3, 8, 8), 0.2), torch.full((3, 8, 8), 0.02)])
    metric, pooled = PSNR(), PSNR(reduction="pooled")
    metric.update(preds, target)
    pooled.update(preds, target)
    assert float(metric.compute()) == pytest.approx(30.0, abs=1e-3)
    assert float(pooled.compute()) == pytest.approx(-10 * math.log10((0.01 + 1e-4) / 2), abs=1e-3)


def test_identical_images_give_infinity_and_no_update_gives_nan():
    metric = PSNR()
    assert math.isnan(float(metric.compute()))
    image = torch.rand(1, 3, 8, 8) * 2 - 1
    metric.update(image, image)
    assert math.isinf(float(metric.compute())) and float(metric.compute()) > 0


def test_psnr_is_registered_and_resizes_preds_to_the_target():
    assert METRICS["PSNR"] is PSNR
    rng = np.random.default_rng(2)
    target = to_suite(uint8_batch(rng, 2, size=16)).float()
    preds = torch.rand(2, 3, 32, 32) * 2 - 1
    collection = edit_metrics(["PSNR", "L1"])
    update_edit_metrics(collection, preds, target)
    resized = F.interpolate(
        preds / 2 + 0.5, size=(16, 16), mode="bicubic", align_corners=False, antialias=True
    ).clamp(0, 1)
    mse = (resized - (target / 2 + 0.5)).square().flatten(1).mean(1)
    expected = (-10 * torch.log10(mse)).mean()
    assert float(collection.compute()["PSNR"]) == pytest.approx(float(expected), abs=1e-4)
    assert PSNR().provenance()["definition"].startswith("torchmetrics PSNR, data_range 1")


def test_bad_reduction_is_an_error():
    with pytest.raises(ValueError, match="'image' or 'pooled'"):
        PSNR(reduction="mean")
