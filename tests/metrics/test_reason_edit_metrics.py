"""The Reason-Edit metrics of SmartEdit's release (metrics/masked_release.py) against
recomputations written out here: PIL resizes as the release calls them, the mask applied by hand
in numpy, PSNR by scikit-image, SSIM by scipy's gaussian filter, LPIPS by the ``lpips`` package
called directly, the CLIP score by numpy indexing of the box, the default CLIP processor and a
cosine by hand. Images and masks are made up (a box with soft JPEG-like edge levels and a few
low nonzero levels outside it)."""

from __future__ import annotations

import math

import lpips as lpips_pkg
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter
from skimage.metrics import peak_signal_noise_ratio

from metrics.collection import METRIC_BACKBONES, METRIC_INPUTS, METRICS
from metrics.masked_release import (
    MASK_KEY,
    CLIPScoreBox,
    LPIPSBackground,
    MSEBackground,
    PSNRBackground,
    SSIMBackground,
    mask_box,
)
from metrics.protocols import get_protocol
from metrics.samples import record_samples, reduce_rows

SIZE = 256
SHAPE = (40, 48)  # (height, width): not the release's 256


def fabricated(seed: int, n: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` inputs, edits (uint8 [n, H, W, 3]) and grey masks (uint8 [n, H, W])."""
    rng = np.random.default_rng(seed)
    source = rng.integers(0, 256, (n, *SHAPE, 3), dtype=np.uint8)
    noise = rng.integers(-30, 31, source.shape)
    edit = np.clip(source.astype(int) + noise, 0, 255).astype(np.uint8)
    masks = np.zeros((n, *SHAPE), np.uint8)
    for i in range(n):
        top, left = 8 + 3 * i, 10 + 2 * i
        masks[i, top : top + 15, left : left + 20] = 255
        masks[i, top : top + 15, left - 1] = 200  # a soft edge
        masks[i, top - 1, left : left + 20] = 60
        masks[i, 2, 3 + i] = 2  # JPEG-like low level far outside: widens the nonzero box
        edit[i, top : top + 15, left : left + 20] = 255 - edit[i, top : top + 15, left : left + 20]
    return source, edit, masks


def signed(images: np.ndarray) -> torch.Tensor:
    """uint8 [n, H, W, 3] -> the suite's [-1, 1] [n, 3, H, W] (as native scoring hands them)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def grey_list(masks: np.ndarray) -> list[torch.Tensor]:
    return [torch.from_numpy(m)[None].clone() for m in masks]


def release_arrays(source, edit, masks):
    """The release's per-image arrays: images PIL-bicubic to 256 on [0, 1], masks nearest (uint8)."""

    def rgb(a):
        return np.asarray(Image.fromarray(a).resize((SIZE, SIZE), Image.BICUBIC), np.float32) / 255

    grey = [np.asarray(Image.fromarray(m).resize((SIZE, SIZE), Image.NEAREST)) for m in masks]
    return [rgb(a) for a in source], [rgb(a) for a in edit], grey


def masked_by_hand(source, edit, masks):
    """``x * (1 - mask / 255)`` per image, float32 [H, W, 3] pairs."""
    src, out, grey = release_arrays(source, edit, masks)
    pairs = []
    for a, b, m in zip(src, out, grey, strict=True):
        w = (1 - m.astype(np.float64) / 255).astype(np.float32)[..., None]
        pairs.append((a * w, b * w))
    return pairs


def ssim_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    """Gaussian SSIM (sigma 1.5, 11 taps, K = 0.01/0.03, data range 1) with the map averaged
    over the whole image, the borders filtered as torch's 'reflect' pad (scipy's 'mirror')."""
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for ch in range(3):
        a, b = x[..., ch].astype(np.float64), y[..., ch].astype(np.float64)

        def blur(z):
            return gaussian_filter(z, 1.5, mode="mirror", truncate=3.5)

        mu_a, mu_b = blur(a), blur(b)
        var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
        cov = blur(a * b) - mu_a * mu_b
        ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
            (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
        )
        values.append(ssim)
    return float(np.mean(values))


def test_registered_with_the_release_inputs():
    for name in ("PSNR_bg", "SSIM_bg", "LPIPS_bg", "MSE_bg"):
        assert METRIC_INPUTS[name] == ("source", "preds", MASK_KEY)
    assert METRIC_INPUTS["CLIPScore_box"] == ("preds", MASK_KEY, "goal_caption")
    assert METRIC_BACKBONES["CLIPScore_box"] == ("clip", "clip_path")
    assert METRICS["LPIPS_bg"] is LPIPSBackground
    for name in ("reason-edit-understanding", "reason-edit-reasoning"):
        protocol = get_protocol(name)
        assert protocol.columns == ("PSNR_bg", "SSIM_bg", "LPIPS_bg", "MSE_bg", "CLIPScore_box")
        assert protocol.scale_of("CLIPScore_box") == 1  # already 100 x cos
        assert protocol.metric_kwargs["LPIPS_bg"] == {"net": "squeeze"}


def test_pixel_metrics_against_numpy_and_skimage():
    source, edit, masks = fabricated(0)
    pairs = masked_by_hand(source, edit, masks)
    metrics = {"psnr": PSNRBackground(), "ssim": SSIMBackground(), "mse": MSEBackground()}
    for metric in metrics.values():
        record_samples(metric)
        metric.update(signed(source[:2]), signed(edit[:2]), grey_list(masks[:2]))
        metric.update(signed(source[2:]), signed(edit[2:]), torch.from_numpy(masks[2:])[:, None])
    expected = {
        "psnr": [peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in pairs],
        "ssim": [ssim_by_hand(a, b) for a, b in pairs],
        "mse": [float(np.mean((a.astype(np.float64) - b) ** 2)) for a, b in pairs],
    }
    tolerance = {"psnr": 1e-3, "ssim": 1e-4, "mse": 1e-7}
    for key, metric in metrics.items():
        rows = metric.take_samples()
        got = [r["value"] for r in rows]
        assert got == pytest.approx(expected[key], abs=tolerance[key]), key
        assert float(metric.compute()) == pytest.approx(np.mean(expected[key]), abs=tolerance[key])
        assert reduce_rows(rows) == pytest.approx(float(metric.compute()), rel=1e-6)
    # the soft mask matters: the >= 128 binary mask gives another PSNR
    src, out, grey = release_arrays(source, edit, masks)
    hard = [(1 - (m >= 128))[..., None].astype(np.float32) for m in grey]
    binary = [
        peak_signal_noise_ratio(a * w, b * w, data_range=1.0)
        for a, b, w in zip(src, out, hard, strict=True)
    ]
    assert abs(np.mean(binary) - np.mean(expected["psnr"])) > 1e-3


def test_background_only_and_input_at_256_unchanged():
    """An edit that changes only the masked region scores a perfect background; an input
    already at 256 px is not resampled (PIL's resize at equal size is a copy)."""
    rng = np.random.default_rng(1)
    source = rng.integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((1, SIZE, SIZE), np.uint8)
    mask[0, 50:120, 60:200] = 255
    edit = source.copy()
    edit[0, 50:120, 60:200] = 0
    psnr, mse = PSNRBackground(), MSEBackground()
    for metric in (psnr, mse):
        metric.update(signed(source), signed(edit), grey_list(mask))
    assert math.isinf(float(psnr.compute())) and float(mse.compute()) == 0.0
    edit[0, 0, 0] = source[0, 0, 0] ^ 0xFF  # one background pixel changes
    mse.reset()
    mse.update(signed(source), signed(edit), grey_list(mask))
    diff = (int(edit[0, 0, 0, 0]) - int(source[0, 0, 0, 0])) / 255
    expected = sum(((int(edit[0, 0, 0, c]) - int(source[0, 0, 0, c])) / 255) ** 2 for c in range(3))
    assert diff != 0 and float(mse.compute()) == pytest.approx(
        expected / (3 * SIZE * SIZE), rel=1e-5
    )


def test_lpips_against_the_lpips_package_called_directly():
    torch.manual_seed(0)
    metric = LPIPSBackground(weights_path="random")  # squeeze, the release's net
    assert metric.net_type == "squeeze"
    reference = lpips_pkg.LPIPS(net="squeeze", version="0.1", pnet_rand=True, verbose=False)
    reference.net.load_state_dict(metric.lpips_net.net.state_dict())  # the same random backbone
    reference.eval()
    source, edit, masks = fabricated(2, n=2)
    record_samples(metric)
    metric.update(signed(source), signed(edit), grey_list(masks))
    expected = []
    for a, b in masked_by_hand(source, edit, masks):
        x, y = (torch.from_numpy(v).permute(2, 0, 1)[None] * 2 - 1 for v in (a, b))
        with torch.no_grad():
            expected.append(float(reference(x, y, normalize=False)))
    got = [r["value"] for r in metric.take_samples()]
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert float(metric.compute()) == pytest.approx(np.mean(expected), rel=1e-4)


def test_mask_box_is_the_nonzero_box_with_pils_exclusive_end():
    mask = torch.zeros(1, 20, 30, dtype=torch.uint8)
    mask[0, 4:9, 7:15] = 255
    mask[0, 15, 2] = 1  # any nonzero level counts
    ys, xs = np.where(mask[0].numpy())
    assert mask_box(mask) == (ys.min(), ys.max(), xs.min(), xs.max()) == (4, 15, 2, 14)
    image = Image.fromarray(np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3))
    crop = np.asarray(image.crop((2, 4, 14, 15)))  # the release's crop((left, top, right, bottom))
    np.testing.assert_array_equal(crop, np.asarray(image)[4:15, 2:14])
    assert mask_box(torch.zeros(1, 5, 5, dtype=torch.uint8)) is None


def clip_by_hand(folder, crops: list[np.ndarray], texts: list[str], pil: bool) -> list[float]:
    """``max(100 cos, 0)`` of CLIP embeddings; ``pil``: transformers' PIL image processor (the
    release's transformers 4.28 resized with PIL), else the default (torchvision) one."""
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    images = CLIPImageProcessorPil.from_pretrained(folder) if pil else processor.image_processor
    with torch.no_grad():
        pixels = images(images=crops, return_tensors="pt")["pixel_values"]
        image = model.get_image_features(pixel_values=pixels)
        tokens = processor.tokenizer(texts, padding=True, return_tensors="pt")
        text = model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
    image = getattr(image, "pooler_output", image).numpy().astype(np.float64)
    text = getattr(text, "pooler_output", text).numpy().astype(np.float64)
    cos = (image * text).sum(-1) / np.linalg.norm(image, axis=-1) / np.linalg.norm(text, axis=-1)
    return [max(100 * c, 0.0) for c in cos]


def test_clip_score_of_the_mask_box(small_backbones):
    folder = str(small_backbones / "clip")
    source, edit, masks = fabricated(3, n=3)
    masks[2] = 0  # no edit region: not scored
    texts = ["a red thing", "blue sky", "nothing"]
    metric = CLIPScoreBox(clip_path=folder)
    record_samples(metric)
    metric.update(signed(edit), grey_list(masks), texts)
    _, out, grey = release_arrays(source, edit, masks)
    crops = []
    for image, m in zip(out[:2], grey[:2], strict=True):
        ys, xs = np.nonzero(m)
        crop = np.round(image * 255).astype(np.uint8)[ys.min() : ys.max(), xs.min() : xs.max()]
        assert crop.shape[0] < m.shape[0] and crop.shape[1] < m.shape[1]
        crops.append(crop)
    expected = clip_by_hand(folder, crops, texts[:2], pil=True)
    rows = metric.take_samples()
    assert [r["value"] for r in rows[:2]] == pytest.approx(expected, abs=1e-4)
    # the default (torchvision) processor resizes a little differently
    default = clip_by_hand(folder, crops, texts[:2], pil=False)
    assert [r["value"] for r in rows[:2]] == pytest.approx(default, abs=0.05)
    assert rows[2]["value"] is None and int(metric.num_empty) == 1
    assert float(metric.compute()) == pytest.approx(np.mean(expected), abs=1e-3)
    assert reduce_rows(rows) == pytest.approx(float(metric.compute()), abs=1e-4)
    empty = CLIPScoreBox(clip_path=folder)
    empty.update(signed(edit[2:]), grey_list(masks[2:]), texts[2:])
    with pytest.warns(UserWarning, match="masks were empty"):
        assert math.isnan(float(empty.compute()))


def test_mask_must_be_grey_levels():
    source, edit, masks = fabricated(4, n=1)
    with pytest.raises(TypeError, match="uint8"):
        PSNRBackground().update(signed(source), signed(edit), [torch.ones(1, *SHAPE)])
    with pytest.raises(ValueError, match="2 masks"):
        PSNRBackground().update(signed(source), signed(edit), grey_list(masks) * 2)
