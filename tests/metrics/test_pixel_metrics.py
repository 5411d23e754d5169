"""L1, MaskedL1 (L1_edit) and SSIM against independent numpy / PIL / scikit-image references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter
from skimage.metrics import structural_similarity

from metrics import L1, SSIM, MaskedL1

# ---------------------------------------------------------------------------- helpers


def to_suite(x01: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, H, W, C] numpy images in [0, 1] -> [B, C, H, W] tensors in the suite's [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(x01.transpose(0, 3, 1, 2)) * 2 - 1).to(dtype)


def mask_tensor(mask: np.ndarray) -> torch.Tensor:
    """[B, H, W] numpy {0, 1} -> [B, 1, H, W] float tensor."""
    return torch.from_numpy(mask.astype(np.float32))[:, None]


def pil_resize(x01: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """Resize [B, H, W, C] float images per channel with Pillow's float ("F") mode."""
    out = np.empty((x01.shape[0], height, width, x01.shape[3]), dtype=np.float64)
    for b in range(x01.shape[0]):
        for c in range(x01.shape[3]):
            channel = Image.fromarray(x01[b, :, :, c].astype(np.float32), mode="F")
            out[b, :, :, c] = np.asarray(channel.resize((width, height), resample))
    return np.clip(out, 0.0, 1.0)


def smooth_images(rng: np.random.Generator, n: int, size: int, sigma: float) -> np.ndarray:
    """n smooth [size, size, 3] images in [0, 1] (blurred noise, stretched to the full range)."""
    out = []
    for _ in range(n):
        x = gaussian_filter(rng.random((size, size, 3)), sigma=(sigma, sigma, 0))
        out.append((x - x.min()) / (x.max() - x.min()))
    return np.stack(out)


def skimage_ssim(a: np.ndarray, b: np.ndarray) -> float:
    return structural_similarity(
        a,
        b,
        data_range=1.0,
        channel_axis=-1,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )


def mirror_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM with torchmetrics' border convention, in numpy/scipy: filter with scipy's "mirror"
    padding (torch's "reflect": the edge pixel is not repeated), average the whole map."""

    def blur(z: np.ndarray) -> np.ndarray:
        return gaussian_filter(z, sigma=(1.5, 1.5, 0), truncate=3.5, mode="mirror")

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    var_a = np.maximum(blur(a * a) - mu_a**2, 0)
    var_b = np.maximum(blur(b * b) - mu_b**2, 0)
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return float(ssim_map.mean())


def value(metric, *args) -> float:
    """One-shot value; float64 inputs get float64 states (``set_dtype``), else float32 states."""
    if args[0].dtype == torch.float64:
        metric.set_dtype(torch.float64)
    metric.reset()
    metric.update(*args)
    return metric.compute().item()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# ---------------------------------------------------------------------------- L1


def test_l1_matches_numpy(rng):
    a, b = rng.random((4, 24, 20, 3)), rng.random((4, 24, 20, 3))
    expected = np.abs(a - b).reshape(4, -1).mean(axis=1).mean()
    assert value(L1(), to_suite(a), to_suite(b)) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("mode", "resample", "pred_hw"),
    [
        ("bilinear", Image.BILINEAR, (48, 40)),  # downsampling: antialiasing matters
        ("bilinear", Image.BILINEAR, (20, 24)),  # upsampling
        ("bicubic", Image.BICUBIC, (48, 40)),  # what PIL's resize() default (MagicBrush) uses
    ],
)
def test_l1_resizes_preds_to_target_size_like_pil(rng, mode, resample, pred_hw):
    preds = rng.random((3, *pred_hw, 3))
    target = rng.random((3, 32, 32, 3))
    resized = pil_resize(preds, 32, 32, resample)
    expected = np.abs(resized - target).reshape(3, -1).mean(axis=1).mean()
    got = value(L1(resize_mode=mode), to_suite(preds), to_suite(target))
    assert got == pytest.approx(expected, abs=1e-5)


def test_l1_identical_is_zero_and_range_mapping(rng):
    x = to_suite(rng.random((2, 16, 16, 3)))
    assert value(L1(), x, x.clone()) == 0.0
    black, white = -torch.ones(2, 3, 8, 8), torch.ones(2, 3, 8, 8)
    assert value(L1(), black, white) == pytest.approx(1.0, abs=0)
    # values outside [-1, 1] are clamped after mapping to [0, 1]
    assert value(L1(), 3 * white, white) == 0.0
    # half of the pixels off by 0.5 in [0, 1] (1.0 in [-1, 1]) -> 0.25
    half = white.clone()
    half[..., :4] = 0.0
    assert value(L1(), half, white) == pytest.approx(0.25, abs=1e-7)


def test_l1_is_a_mean_over_images_not_over_pixels():
    # a 16x16 pair with L1 0.5 and a 32x32 pair with L1 0; per image -> 0.25 (pixel-pooled: 0.1)
    metric = L1()
    metric.update(torch.zeros(1, 3, 16, 16), torch.ones(1, 3, 16, 16))
    metric.update(torch.ones(1, 3, 32, 32), torch.ones(1, 3, 32, 32))
    assert metric.compute().item() == pytest.approx(0.25, abs=1e-7)


def test_l1_input_validation():
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        L1().update(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="batch size and channels"):
        L1().update(torch.zeros(2, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="resize_mode"):
        L1(resize_mode="nearest")
    with pytest.raises(TypeError, match="floating point"):
        L1().update(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.zeros(1, 3, 8, 8))


def test_l1_low_precision_inputs(rng):
    a, b = rng.random((2, 16, 16, 3)), rng.random((2, 16, 16, 3))
    expected = np.abs(a - b).mean()
    got = value(L1(), to_suite(a, torch.bfloat16), to_suite(b, torch.bfloat16))
    assert got == pytest.approx(expected, abs=1e-2)  # bf16 input rounding, computed in float32


# ---------------------------------------------------------------------------- MaskedL1


def test_masked_l1_hand_computed():
    # [0, 1] images, B=2, C=3, 2x2. Target is 0 everywhere.
    preds01 = np.zeros((2, 2, 2, 3))
    mask = np.zeros((2, 2, 2))
    # image 0: masked pixels (0,0) = 0.5 and (1,1) = 0.25 in every channel; unmasked pixels
    # are 1.0 and must not count -> (3*0.5 + 3*0.25) / (2 pixels * 3 channels) = 0.375
    preds01[0, 0, 0], preds01[0, 1, 1] = 0.5, 0.25
    preds01[0, 0, 1], preds01[0, 1, 0] = 1.0, 1.0
    mask[0, 0, 0] = mask[0, 1, 1] = 1
    # image 1: one masked pixel (0,1), differing by 0.5 in channel 0 only -> 0.5 / 3
    preds01[1, 0, 1, 0] = 0.5
    preds01[1, 1, 0] = 1.0
    mask[1, 0, 1] = 1
    metric = MaskedL1()
    metric.update(to_suite(preds01), to_suite(np.zeros_like(preds01)), mask_tensor(mask))
    assert metric.compute().item() == pytest.approx((0.375 + 0.5 / 3) / 2, abs=1e-7)
    assert metric.num_images.item() == 2 and metric.num_empty.item() == 0


def test_masked_l1_matches_numpy_on_random_images(rng):
    a, b = rng.random((5, 20, 24, 3)), rng.random((5, 20, 24, 3))
    mask = (rng.random((5, 20, 24)) < 0.3).astype(np.float64)
    per_image = [
        (np.abs(a[i] - b[i]) * mask[i][..., None]).sum() / (mask[i].sum() * 3) for i in range(5)
    ]
    got = value(MaskedL1(), to_suite(a), to_suite(b), mask_tensor(mask))
    assert got == pytest.approx(np.mean(per_image), abs=1e-6)
    # a bool mask is the same mask
    got_bool = value(MaskedL1(), to_suite(a), to_suite(b), mask_tensor(mask).bool())
    assert got_bool == pytest.approx(got, abs=0)


def test_masked_l1_full_mask_equals_l1_also_after_resize(rng):
    preds, target = to_suite(rng.random((3, 40, 48, 3))), to_suite(rng.random((3, 32, 32, 3)))
    full = torch.ones(3, 1, 32, 32)
    assert value(MaskedL1(), preds, target, full) == pytest.approx(
        value(L1(), preds, target), abs=1e-6
    )


def test_masked_l1_skips_and_counts_empty_masks(rng):
    a, b = rng.random((3, 8, 8, 3)), rng.random((3, 8, 8, 3))
    mask = np.ones((3, 8, 8))
    mask[1] = 0
    metric = MaskedL1()
    metric.update(to_suite(a), to_suite(b), mask_tensor(mask))
    expected = np.mean([np.abs(a[i] - b[i]).mean() for i in (0, 2)])
    assert metric.compute().item() == pytest.approx(expected, abs=1e-6)
    assert metric.num_empty.item() == 1
    assert metric.num_images.item() == 2


def test_masked_l1_all_empty_is_nan_with_warning():
    metric = MaskedL1()
    metric.update(torch.zeros(2, 3, 8, 8), torch.ones(2, 3, 8, 8), torch.zeros(2, 1, 8, 8))
    with pytest.warns(UserWarning, match="empty mask"):
        result = metric.compute()
    assert math.isnan(result.item())
    assert metric.num_empty.item() == 2


def test_masked_l1_mask_validation():
    x = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="mask"):
        MaskedL1().update(x, x, torch.ones(2, 3, 8, 8))  # channels
    with pytest.raises(ValueError, match="mask"):
        MaskedL1().update(x, x, torch.ones(2, 1, 4, 4))  # size
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        MaskedL1().update(x, x, -torch.ones(2, 1, 8, 8))  # a [-1, 1]-encoded mask


# ---------------------------------------------------------------------------- SSIM

# Observed on these cases (see the SSIM docstring): crop_border=True vs skimage differs by
# <= 7e-6 in float32 (float32 rounding in E[x^2] - E[x]^2 on smooth images) and ~1e-15 in
# float64; the default (torchmetrics) convention differs from skimage by up to 0.034 at 64x64.
SSIM_CASES = ["random", "random_noisy", "smooth", "smooth_noisy"]
# float32 (the suite's dtype, 2e-5) on every case; float64 (1e-10: the same computation up to
# rounding) on two, as float64 convolutions are slow on CPU.
PRECISION_CASES = [(kind, torch.float32, 2e-5) for kind in SSIM_CASES] + [
    (kind, torch.float64, 1e-10) for kind in ("random_noisy", "smooth")
]


def ssim_pair(rng: np.random.Generator, kind: str, n: int = 3, size: int = 64):
    if kind.startswith("random"):
        a = rng.random((n, size, size, 3))
        b = rng.random((n, size, size, 3))
    else:
        a = smooth_images(rng, n, size, sigma=4.0)
        b = smooth_images(rng, n, size, sigma=4.0)
    if kind.endswith("noisy"):  # a degraded copy: SSIM well inside (0, 1)
        b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)
    return a, b


@pytest.mark.parametrize(("kind", "dtype", "atol"), PRECISION_CASES)
def test_ssim_crop_border_matches_skimage(rng, kind, dtype, atol):
    a, b = ssim_pair(rng, kind, n=3 if dtype == torch.float32 else 1)
    expected = np.mean([skimage_ssim(a[i], b[i]) for i in range(len(a))])
    got = value(SSIM(crop_border=True), to_suite(a, dtype), to_suite(b, dtype))
    assert got == pytest.approx(expected, abs=atol)


@pytest.mark.parametrize(("kind", "dtype", "atol"), PRECISION_CASES)
def test_ssim_default_matches_whole_map_mirror_reference(rng, kind, dtype, atol):
    a, b = ssim_pair(rng, kind, n=3 if dtype == torch.float32 else 1)
    expected = np.mean([mirror_ssim(a[i], b[i]) for i in range(len(a))])
    got = value(SSIM(), to_suite(a, dtype), to_suite(b, dtype))
    assert got == pytest.approx(expected, abs=atol)


@pytest.mark.parametrize("kind", SSIM_CASES)
def test_ssim_default_vs_skimage_differs_only_by_the_border(rng, kind):
    a, b = ssim_pair(rng, kind)
    expected = np.mean([skimage_ssim(a[i], b[i]) for i in range(len(a))])
    got = value(SSIM(), to_suite(a), to_suite(b))
    # the 5-pixel frame is 29% of a 64x64 image; measured up to 0.011 (random) and 0.034
    # (smooth) over 40 pairs each, per image. Means of 3 images stay well inside 0.04.
    assert got == pytest.approx(expected, abs=0.04)


def test_ssim_identical_is_one_and_inverted_is_negative(rng):
    x = to_suite(rng.random((2, 32, 32, 3)))
    assert value(SSIM(), x, x.clone()) == pytest.approx(1.0, abs=1e-6)
    assert value(SSIM(crop_border=True), x, x.clone()) == pytest.approx(1.0, abs=1e-6)
    # structure-inverted image: strongly negative SSIM
    assert value(SSIM(), x, -x) < -0.5


def test_ssim_resizes_preds_to_target_size(rng):
    preds, target = rng.random((2, 48, 40, 3)), rng.random((2, 32, 32, 3))
    resized = pil_resize(preds, 32, 32, Image.BICUBIC)
    got = value(SSIM(), to_suite(preds), to_suite(target))
    expected = value(SSIM(), to_suite(resized), to_suite(target))
    assert got == pytest.approx(expected, abs=1e-5)


def test_ssim_rejects_images_smaller_than_the_window():
    with pytest.raises(ValueError, match="at least 11x11"):
        SSIM().update(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_ssim_is_float32_under_bf16_autocast():
    """A bf16-mixed test run must score the same SSIM as a float32 one."""
    g = torch.Generator().manual_seed(0)
    target = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    preds = (target + 0.1 * torch.randn(4, 3, 32, 32, generator=g)).clamp(-1, 1)
    expected = SSIM()(preds, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = SSIM()(preds, target)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
