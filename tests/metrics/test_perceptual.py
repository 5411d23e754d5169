"""LPIPS: against torchmetrics' implementation on identical weights, and the offline weight logic.

No pretrained backbone exists on the test machines, so the comparisons use a random backbone
(``weights_path="random"``). torchmetrics' ``LearnedPerceptualImagePatchSimilarity`` would
download the ImageNet backbone in its constructor, so it is built with its internal network
class patched to ``pnet_rand=True`` (random backbone, no download; its linear heads still come
from the files shipped inside torchmetrics), and our backbone weights are then copied into it.
"""

from __future__ import annotations

import copy
import functools
import pickle
import re

import pytest
import torch
import torchvision
from torchmetrics.image import lpip as tm_lpip

from metrics.perceptual import BACKBONE_FILES, LPIPS


@pytest.fixture(scope="module")
def metric() -> LPIPS:
    torch.manual_seed(0)
    return LPIPS(net="alex", weights_path="random")


def fresh_copy(metric: LPIPS) -> LPIPS:
    out = copy.deepcopy(metric)
    out.reset()
    return out


def images(seed: int, n: int = 4, size: int = 64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=gen) * 2 - 1


_SLICE = re.compile(r"^(slice\d+|slices\.\d+)\.")


def by_feature_index(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone state keyed as torchvision's ``features`` ("3.weight" for "slice2.3.weight")."""
    return {_SLICE.sub("", name): value for name, value in state.items()}


def torchmetrics_lpips_like(
    metric: LPIPS, monkeypatch
) -> tm_lpip.LearnedPerceptualImagePatchSimilarity:
    """torchmetrics' LPIPS (mean reduction) with ``metric``'s backbone weights, built offline."""
    monkeypatch.setattr(
        tm_lpip, "_NoTrainLpips", functools.partial(tm_lpip._NoTrainLpips, pnet_rand=True)
    )
    theirs = tm_lpip.LearnedPerceptualImagePatchSimilarity(net_type=metric.net_type)
    ours_net = metric.lpips_net
    # Both wrap torchvision's `features[i]` layers in slices named differently ("slice1.0.*" in
    # lpips, "slices.0.0.*" for torchmetrics' SqueezeNet): match them by the feature index.
    ours_by_feature = by_feature_index(ours_net.net.state_dict())
    their_names = {_SLICE.sub("", name): name for name in theirs.net.net.state_dict()}
    assert set(their_names) == set(ours_by_feature)
    theirs.net.net.load_state_dict(
        {their_names[k]: v for k, v in ours_by_feature.items()}, strict=True
    )
    # The linear heads come from each package's own shipped file: they must already agree.
    for ours_lin, their_lin in zip(ours_net.lins, theirs.net.lins, strict=True):
        torch.testing.assert_close(ours_lin.model[-1].weight, their_lin.model[-1].weight)
    return theirs


def test_matches_torchmetrics_on_same_weights(metric, monkeypatch):
    theirs = torchmetrics_lpips_like(metric, monkeypatch)
    ours = fresh_copy(metric)
    for seed in range(3):
        preds, target = images(seed), images(100 + seed)
        ours.update(preds, target)
        theirs.update(preds, target)
    expected = theirs.compute()
    assert expected > 0
    torch.testing.assert_close(ours.compute(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("net", [pytest.param("vgg", marks=pytest.mark.slow), "squeeze"])
def test_other_backbones_match_torchmetrics(net, monkeypatch):
    torch.manual_seed(1)
    ours = LPIPS(net=net, weights_path="random")
    theirs = torchmetrics_lpips_like(ours, monkeypatch)
    preds, target = images(7, n=2, size=48), images(8, n=2, size=48)
    ours.update(preds, target)
    theirs.update(preds, target)
    torch.testing.assert_close(ours.compute(), theirs.compute(), atol=1e-5, rtol=1e-5)


def test_identity_is_zero(metric):
    ours = fresh_copy(metric)
    x = images(3)
    ours.update(x, x.clone())
    assert ours.compute().abs() < 1e-7


def test_symmetric(metric):
    a, b = images(11), images(12)
    forward, backward = fresh_copy(metric), fresh_copy(metric)
    forward.update(a, b)
    backward.update(b, a)
    torch.testing.assert_close(forward.compute(), backward.compute(), atol=1e-6, rtol=1e-6)


def test_accumulation_equals_one_shot_mean_over_images(metric):
    preds, target = images(20, n=7), images(21, n=7)
    one_shot, batched = fresh_copy(metric), fresh_copy(metric)
    one_shot.update(preds, target)
    for chunk in ((0, 1), (1, 4), (4, 7)):  # uneven batches: each image weighs the same
        batched.update(preds[slice(*chunk)], target[slice(*chunk)])
    assert int(batched.num_images) == 7
    torch.testing.assert_close(batched.compute(), one_shot.compute(), atol=1e-6, rtol=1e-6)
    per_image = torch.stack(
        [metric.lpips_net(preds[i : i + 1], target[i : i + 1]).flatten()[0] for i in range(7)]
    )
    torch.testing.assert_close(one_shot.compute(), per_image.mean(), atol=1e-6, rtol=1e-6)


def test_size_mismatch_resizes_preds(metric):
    target = images(30)
    preds_big = torch.nn.functional.interpolate(target, size=(96, 96), mode="bicubic").clamp(-1, 1)
    ours = fresh_copy(metric)
    ours.update(preds_big, target)
    assert 0 <= ours.compute() < 0.1


def test_half_inputs_and_bf16_autocast(metric):
    preds, target = images(40), images(41)
    ref = fresh_copy(metric)
    ref.update(preds, target)
    ours = fresh_copy(metric)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours.update(preds.bfloat16(), target.bfloat16())
    torch.testing.assert_close(ours.compute(), ref.compute(), atol=5e-3, rtol=5e-2)


def test_backbone_not_in_state_dict_nor_parameters(metric):
    keys = set(metric.state_dict())
    assert not any("net" in k or "lin" in k or "scaling" in k for k in keys), keys
    assert list(metric.parameters()) == []
    parent = torch.nn.Module()
    parent.lpips = metric
    assert not any(k.startswith("lpips.") for k in parent.state_dict())


def test_network_follows_moves_stays_float32_and_eval(metric):
    ours = fresh_copy(metric)
    ours.train()
    ours.to(torch.float64)
    ours.half()
    assert not ours.lpips_net.training
    assert all(p.dtype == torch.float32 for p in ours.lpips_net.parameters())
    ours.to("cpu")
    ours.update(images(50), images(51))
    assert torch.isfinite(ours.compute())


def test_deepcopy_and_pickle_keep_network(metric):
    restored = pickle.loads(pickle.dumps(metric))
    for a, b in zip(metric.lpips_net.parameters(), restored.lpips_net.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_missing_backbone_names_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        LPIPS(net="alex")
    message = str(info.value)
    assert "LPIPS" in message
    assert "alexnet-owt-7be5be79.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        LPIPS(net="alex", weights_path=str(tmp_path / "nowhere.pth"))


def test_backbone_file_names():
    assert BACKBONE_FILES == {
        "alex": "alexnet-owt-7be5be79.pth",
        "vgg": "vgg16-397923af.pth",
        "squeeze": "squeezenet1_1-b8a52dc0.pth",
    }


def test_loads_backbone_from_hub_cache_and_weights_path(tmp_path, monkeypatch):
    torch.manual_seed(5)
    alexnet = torchvision.models.alexnet(weights=None)
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(alexnet.state_dict(), checkpoints / "alexnet-owt-7be5be79.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def assert_backbone_is_alexnet(metric: LPIPS) -> None:
        backbone = metric.lpips_net.net.state_dict()
        assert len(backbone) == 10  # the 5 convolutions' weights and biases
        for name, value in by_feature_index(backbone).items():
            torch.testing.assert_close(value, alexnet.features.state_dict()[name])

    assert_backbone_is_alexnet(LPIPS(net="alex"))
    moved = tmp_path / "elsewhere.pth"
    (checkpoints / "alexnet-owt-7be5be79.pth").rename(moved)
    assert_backbone_is_alexnet(LPIPS(net="alex", weights_path=str(moved)))


def test_rejects_wrong_state_dict(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="missing keys"):
        LPIPS(net="alex", weights_path=str(path))


def test_invalid_net():
    with pytest.raises(ValueError, match="net"):
        LPIPS(net="resnet", weights_path="random")  # type: ignore[arg-type]
