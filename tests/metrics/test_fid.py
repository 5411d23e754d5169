"""FID and KID (metrics.fid) against independent numpy / scipy computations on the same features.

A tiny fixed random feature module (conv + ReLU + global average pool to 16 dims) stands in
for Inception, so nothing needs weights or a network.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

import metrics.fid as fid_module
from metrics.fid import FID, INCEPTION_WEIGHTS_FILE, KID, inception_weights_path

DIM = 16


class TinyFeatures(nn.Module):
    """Fixed random conv + ReLU + global average pool: float [N, 3, H, W] -> [N, 16]."""

    def __init__(self, with_num_features: bool = True) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, DIM, kernel_size=3, stride=2, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen))
            self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=gen) * 0.1)
        self.requires_grad_(False)
        if with_num_features:
            self.num_features = DIM

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x.float())).mean(dim=(2, 3))


def images(seed: int, n: int, size: int = 16, shift: float = 0.0) -> torch.Tensor:
    """n random images [n, 3, size, size] in the suite's [-1, 1] (some clamping at the ends)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=gen) * 2 - 1 + shift).clamp(-1, 1)


def features(x: torch.Tensor) -> np.ndarray:
    """The reference features: the same module on x / 2 + 0.5, in float64 numpy."""
    with torch.no_grad():
        return TinyFeatures()(((x / 2) + 0.5).clamp(0, 1)).double().numpy()


def numpy_fid(f_real: np.ndarray, f_fake: np.ndarray) -> float:
    mu1, mu2 = f_real.mean(0), f_fake.mean(0)
    s1, s2 = np.cov(f_real, rowvar=False), np.cov(f_fake, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def numpy_kid(f_real: np.ndarray, f_fake: np.ndarray) -> float:
    """Unbiased MMD^2 with the kernel (x.y / d + 1)^3, over all samples (equal counts)."""
    m, d = f_real.shape

    def k(a, b):
        return (a @ b.T / d + 1.0) ** 3

    kxx, kyy, kxy = k(f_real, f_real), k(f_fake, f_fake), k(f_real, f_fake)
    off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(off - 2 * kxy.sum() / m**2)


@pytest.fixture(autouse=True)
def _seeded_rng():
    """KID draws its subsets from the global RNG: seed it before every test, so that no result
    depends on the tests that ran before."""
    torch.manual_seed(0)


@pytest.fixture
def pair():
    target = images(1, 64)
    preds = images(2, 64, shift=0.3)
    return preds, target


# ---------------------------------------------------------------------------- FID


def test_fid_matches_scipy(pair):
    preds, target = pair
    metric = FID(feature=TinyFeatures())
    metric.update(preds, target)
    expected = numpy_fid(features(target), features(preds))
    assert expected > 1e-3
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-3)


def test_fid_probes_feature_dim_without_num_features(pair):
    preds, target = pair
    metric = FID(feature=TinyFeatures(with_num_features=False))
    assert metric.real_features_sum.shape == (DIM,)
    metric.update(preds, target)
    assert float(metric.compute()) == pytest.approx(
        numpy_fid(features(target), features(preds)), rel=1e-3
    )


def test_fid_identical_distributions_is_zero(pair):
    _, target = pair
    metric = FID(feature=TinyFeatures())
    metric.update(target.clone(), target)
    scale = float(np.trace(np.cov(features(target), rowvar=False)))
    assert abs(float(metric.compute())) < 1e-4 * scale


def test_fid_same_distribution_is_small(pair):
    preds, target = pair
    metric = FID(feature=TinyFeatures())
    metric.update(images(5, 64), target)
    value = float(metric.compute())
    assert value == pytest.approx(numpy_fid(features(target), features(images(5, 64))), rel=1e-3)
    assert value < 0.02 * numpy_fid(features(target), features(preds))


def test_fid_accumulation_equals_one_shot(pair):
    preds, target = pair
    one = FID(feature=TinyFeatures())
    one.update(preds, target)
    acc = FID(feature=TinyFeatures())
    for p, t in zip(preds.split([10, 30, 24]), target.split([10, 30, 24]), strict=True):
        acc.update(p, t)
    assert float(acc.compute()) == pytest.approx(float(one.compute()), rel=1e-5)


def test_fid_autocast_and_half_inputs_match_float32(pair):
    preds, target = pair
    ref = FID(feature=TinyFeatures())
    ref.update(preds, target)
    metric = FID(feature=TinyFeatures())
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        metric.update(preds, target)
    assert float(metric.compute()) == pytest.approx(float(ref.compute()), rel=1e-5)
    half = FID(feature=TinyFeatures())
    half.update(preds.bfloat16(), target.bfloat16())
    expected = numpy_fid(features(target.bfloat16().float()), features(preds.bfloat16().float()))
    assert float(half.compute()) == pytest.approx(expected, rel=1e-3)


def test_fid_keeps_frozen_real_features_when_not_reset(pair):
    preds, target = pair
    other_target = images(3, 64, shift=-0.4)
    metric = FID(feature=TinyFeatures(), reset_real_features=False)
    metric.update(preds, target)
    metric.compute()
    metric.reset()
    metric.update(preds, other_target)  # targets ignored: the real side is frozen
    assert int(metric.real_features_num_samples) == 64
    assert float(metric.compute()) == pytest.approx(
        numpy_fid(features(target), features(preds)), rel=1e-3
    )


def test_fid_rejects_bad_input():
    metric = FID(feature=TinyFeatures())
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        metric.update(torch.zeros(3, 16, 16), torch.zeros(3, 16, 16))
    with pytest.raises(TypeError, match="floating point"):
        metric.update(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="one of"):
        FID(feature=100)


# ---------------------------------------------------------------------------- KID


def test_kid_matches_numpy_mmd(pair):
    preds, target = pair
    metric = KID(feature=TinyFeatures(), subsets=3, subset_size=64)
    metric.update(preds, target)
    mean, std = metric.compute()
    expected = numpy_kid(features(target), features(preds))
    assert expected > 1e-4
    assert float(mean) == pytest.approx(expected, rel=1e-3)
    assert float(std) == pytest.approx(0.0, abs=1e-5 * abs(expected))


def test_kid_identical_distributions_is_near_zero(pair):
    preds, target = pair
    same_dist = images(5, 64)  # an independent sample of the target's distribution
    metric = KID(feature=TinyFeatures(), subsets=1, subset_size=64)
    metric.update(same_dist, target)
    mean, _ = metric.compute()
    expected = numpy_kid(features(target), features(same_dist))
    assert float(mean) == pytest.approx(expected, rel=1e-3, abs=1e-5)
    shifted = numpy_kid(features(target), features(preds))
    assert abs(float(mean)) < 1e-3 * shifted


def test_kid_accumulation_equals_one_shot(pair):
    preds, target = pair
    one = KID(feature=TinyFeatures(), subsets=1, subset_size=64)
    one.update(preds, target)
    acc = KID(feature=TinyFeatures(), subsets=1, subset_size=64)
    for p, t in zip(preds.split([10, 30, 24]), target.split([10, 30, 24]), strict=True):
        acc.update(p, t)
    assert float(acc.compute()[0]) == pytest.approx(float(one.compute()[0]), rel=1e-5)


def test_kid_clamps_subset_size_with_warning(pair):
    preds, target = pair
    metric = KID(feature=TinyFeatures(), subsets=2)  # subset_size 1000 > 64 images
    metric.update(preds, target)
    with pytest.warns(UserWarning, match="64 real and 64 generated"):
        mean, _ = metric.compute()
    assert metric.subset_size == 1000
    assert float(mean) == pytest.approx(numpy_kid(features(target), features(preds)), rel=1e-3)


def test_kid_needs_two_images_per_side():
    metric = KID(feature=TinyFeatures(), subsets=1, subset_size=10)
    with pytest.raises(ValueError, match="got 0 real and 0 generated"):
        metric.compute()
    metric.update(images(0, 1), images(1, 1))
    with pytest.raises(ValueError, match="got 1 real and 1 generated"):
        metric.compute()


# ---------------------------------------------------------------------------- weights


@pytest.fixture
def no_download(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a download was attempted")

    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fail)
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", fail)
    monkeypatch.setattr(torch.hub, "download_url_to_file", fail)


@pytest.mark.parametrize("cls", [FID, KID])
def test_missing_weights_error_names_file_and_folder(cls, tmp_path, monkeypatch, no_download):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        cls()
    message = str(info.value)
    assert message.startswith(cls.__name__)
    assert INCEPTION_WEIGHTS_FILE in message
    assert str(tmp_path / "hub" / "checkpoints") in message


def test_missing_explicit_weights_path(tmp_path, no_download):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="KID") as info:
        KID(weights_path=str(missing))
    assert str(missing) in str(info.value)


def test_weights_resolved_from_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert inception_weights_path() == str(cached)
    explicit = tmp_path / "w.pth"
    explicit.write_bytes(b"")
    assert inception_weights_path(explicit) == str(explicit)


def test_weights_file_name_is_torch_fidelity_s():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert URL_INCEPTION_V3.rsplit("/", 1)[-1] == fid_module.INCEPTION_WEIGHTS_FILE


def test_inception_path_offline_with_local_weights(tmp_path, monkeypatch, no_download):
    """The int-`feature` path builds torch-fidelity's Inception from the local file (randomly
    initialised here: loading is stubbed, as the real weights are not shipped) with
    antialias=False, and runs end to end on [-1, 1] images."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    weights = tmp_path / INCEPTION_WEIGHTS_FILE
    weights.write_bytes(b"")
    loaded = []
    real_load = torch.load

    def fake_load(path, *args, **kwargs):
        if str(path) == str(weights):
            loaded.append(path)
            return {}
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", fake_load)
    monkeypatch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
    torch.manual_seed(0)
    fid = FID(feature=64, weights_path=str(weights))
    kid = KID(feature=64, weights_path=str(weights), subsets=1, subset_size=2)
    assert len(loaded) == 2
    assert fid.inception.use_antialias is False
    assert kid.inception.inception.use_antialias is False
    kid.inception.inception = fid.inception  # same network: both metrics see the same features
    preds, target = images(2, 3, size=32, shift=0.3), images(1, 3, size=32)
    fid.update(preds, target)
    kid.update(preds, target)
    assert int(fid.real_features_num_samples) == 3
    assert torch.isfinite(fid.compute())
    assert torch.isfinite(kid.compute()[0])
    # KID's uint8 adapter feeds Inception exactly what torchmetrics' FID feeds it.
    unit = (target / 2 + 0.5).clamp(0, 1)
    with torch.no_grad():
        assert torch.equal(kid.inception(unit), fid.inception((unit * 255).byte()))
