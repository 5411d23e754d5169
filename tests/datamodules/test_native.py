"""Native images in evaluation samples, `eval_resize`, unequal pairs and the way back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.layouts import bilinear_reference
from PIL import Image

from datamodules.base import EditDataset, build_transform, collate
from datamodules.folder import FolderEditDataModule
from datamodules.native import eval_transform, model_box, native_box, prediction_to_native


def smooth(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    out = [127 + 100 * np.sin(x / rng.uniform(3, 6) + y / rng.uniform(3, 6) + c) for c in range(3)]
    return np.clip(np.stack(out, -1), 0, 255).astype(np.uint8)


def write_pair(tmp_path: Path, source_hw, target_hw, mask_hw=None) -> dict:
    source = smooth(*source_hw)
    Image.fromarray(source).save(tmp_path / "s.png")
    Image.fromarray(smooth(*target_hw, seed=1)).save(tmp_path / "t.png")
    record = {
        "id": "p",
        "source": str(tmp_path / "s.png"),
        "target": str(tmp_path / "t.png"),
        "instruction": "x",
    }
    if mask_hw is not None:
        mask = np.zeros(mask_hw, np.uint8)
        mask[:, : mask_hw[1] // 3] = 255
        mask[::4] = 255
        Image.fromarray(mask).save(tmp_path / "m.png")
        record["mask"] = str(tmp_path / "m.png")
    return record


# --------------------------------------------------------------------------- unequal pairs


def test_unequal_target_and_mask_follow_the_source(tmp_path):
    record = write_pair(tmp_path, (32, 40), (45, 57), mask_hw=(13, 17))
    sample = EditDataset([record], build_transform(16, False, False, 0.0), "test")[0]
    source = np.asarray(Image.open(tmp_path / "s.png"))
    assert torch.equal(sample["source_native"], torch.from_numpy(source).permute(2, 0, 1))
    # target: bilinear without antialiasing to the source's 32x40 (T2ONet's cv2.resize)
    target = np.asarray(Image.open(tmp_path / "t.png"))
    expected = bilinear_reference(target, 32, 40)
    got = sample["target_native"].permute(1, 2, 0).numpy().astype(np.float64)
    assert sample["target_native"].dtype == torch.uint8 and got.shape == (32, 40, 3)
    assert np.abs(got - expected).max() <= 1.0  # rounding only
    # mask: nearest (source index floor(i * in / out)), {0, 1}
    mask = np.asarray(Image.open(tmp_path / "m.png")) >= 128
    rows, cols = (np.arange(32) * 13) // 32, (np.arange(40) * 17) // 40
    nearest = mask[rows][:, cols].astype(np.uint8)
    assert sample["mask_native"].dtype == torch.uint8
    assert torch.equal(sample["mask_native"][0], torch.from_numpy(nearest))
    assert sample["source"].shape == sample["target"].shape == (3, 16, 16)


def test_train_samples_carry_no_native_images(tmp_path):
    record = write_pair(tmp_path, (20, 30), (20, 30), mask_hw=(20, 30))
    train = EditDataset([record], build_transform(8, True, True, 0.5), "train")[0]
    assert not any(k.endswith("_native") for k in train)
    val = EditDataset([record], build_transform(8, False, False, 0.0), "val")[0]
    assert {"source_native", "target_native", "mask_native"} <= set(val)
    assert set(val["mask_native"].unique().tolist()) == {0, 1}


def test_collate_keeps_native_images_as_lists(tmp_path):
    samples = []
    for i, hw in enumerate([(20, 30), (25, 18), (20, 30)]):
        folder = tmp_path / str(i)
        folder.mkdir()
        record = write_pair(folder, hw, (hw[0] + 3, hw[1] + 5), mask_hw=hw)
        samples.append(EditDataset([record], build_transform(8, False, False, 0.0), "test")[0])
    batch = collate(samples)
    assert batch["source"].shape == (3, 3, 8, 8) and batch["mask"].shape == (3, 1, 8, 8)
    for key in ("source_native", "target_native", "mask_native"):
        assert isinstance(batch[key], list) and len(batch[key]) == 3
    assert [tuple(t.shape[-2:]) for t in batch["target_native"]] == [(20, 30), (25, 18), (20, 30)]


# --------------------------------------------------------------------------- eval_resize


def stripes(tmp_path: Path) -> dict:
    """A 32x48 grey image, red in the 8 leftmost and blue in the 8 rightmost columns."""
    image = np.full((32, 48, 3), 128, np.uint8)
    image[:, :8] = (255, 0, 0)
    image[:, -8:] = (0, 0, 255)
    Image.fromarray(image).save(tmp_path / "s.png")
    return {"id": "s", "source": str(tmp_path / "s.png"), "instruction": "x"}


def test_eval_resize_modes(tmp_path):
    record = stripes(tmp_path)

    def source(mode):
        dataset = EditDataset([record], build_transform(16, False, False, 0.0, mode), "test")
        return (dataset[0]["source"] + 1) * 127.5

    squashed = source("resize")  # whole image, 48 → 16 columns: 8 columns → ~2.7
    assert squashed.shape == (3, 16, 16)
    assert (squashed[0, :, :2] > 200).all() and (squashed[2, :, -2:] > 200).all()
    cropped = source("center_crop")  # 32x48 → 16x24, centre 16 columns: stripes cut to 0
    assert (cropped[0, :, 0] < 200).all() and (cropped[2, :, -1] < 200).all()
    padded = source("pad")  # 32x48 → 10x16 (hand: int(16 * 32 / 48) = 10), 3 black rows each side
    assert padded[:, :3].eq(0).all() and padded[:, 13:].eq(0).all()
    assert (padded[:, 3:13].sum(0) > 0).all()
    assert (padded[0, 3:13, :2] > 200).all() and (padded[2, 3:13, -2:] > 200).all()
    with pytest.raises(ValueError, match="eval_resize"):
        build_transform(16, False, False, 0.0, "stretch")


@pytest.mark.parametrize("hw", [(32, 48), (48, 32), (33, 32), (7, 100), (16, 16), (5, 9)])
def test_model_box_matches_the_transform(hw):
    """The content box of a letterboxed white image is `model_box` (torchvision is the ref)."""
    from torchvision import tv_tensors

    white = tv_tensors.Image(torch.full((3, *hw), 255, dtype=torch.uint8))
    out = eval_transform(16, "pad")(white)
    rows = out[0].gt(0).any(1).nonzero()[:, 0]
    cols = out[0].gt(0).any(0).nonzero()[:, 0]
    top, left = int(rows.min()), int(cols.min())
    assert model_box(*hw, 16, "pad") == (top, left, len(rows), len(cols))
    assert model_box(*hw, 16, "resize") == (0, 0, 16, 16)


def test_native_box_hand_computed():
    # 32x48 at 16: resized to 16x24, centre crop columns 4..20 → native columns 8..40
    assert native_box(32, 48, 16, "center_crop") == (0, 8, 32, 32)
    assert native_box(48, 32, 16, "center_crop") == (8, 0, 32, 32)
    assert native_box(32, 48, 16, "pad") == (0, 0, 32, 48)
    assert native_box(32, 48, 16, "resize") == (0, 0, 32, 48)


@pytest.mark.parametrize("mode", ["resize", "pad", "center_crop"])
def test_prediction_to_native_undoes_the_eval_transform(mode):
    """A perfect model (output = its input) maps back onto the native image's region."""
    from torchvision import tv_tensors

    native = torch.from_numpy(smooth(36, 60, seed=3)).permute(2, 0, 1)
    model_input = eval_transform(24, mode)(tv_tensors.Image(native)).as_subclass(torch.Tensor)
    back, (top, left, h, w) = prediction_to_native(model_input, 36, 60, mode)
    assert back.dtype == torch.uint8 and back.shape == (3, h, w)
    region = native[:, top : top + h, left : left + w].float()
    error = (back.float() - region).abs().mean() / 255
    assert error < 0.03, error  # resampling only; the letterbox would give ~0.2 for "pad"
    if mode != "center_crop":
        assert (top, left, h, w) == (0, 0, 36, 60)
    batched, _ = prediction_to_native(model_input[None].float() / 127.5 - 1, 36, 60, mode)
    assert batched.shape == (1, 3, h, w) and batched.dtype == torch.float32


def test_eval_resize_is_a_recorded_hyperparameter(tmp_path):
    dm = FolderEditDataModule(root=str(tmp_path), eval_resize="pad")
    assert dm.hparams["eval_resize"] == "pad" and dm.eval_resize == "pad"
    assert FolderEditDataModule(root=str(tmp_path)).hparams["eval_resize"] == "resize"
    with pytest.raises(ValueError, match="eval_resize must be one of"):
        FolderEditDataModule(root=str(tmp_path), eval_resize="crop")
