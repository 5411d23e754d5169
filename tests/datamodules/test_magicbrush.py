"""MagicBrushDataModule on tiny fixtures in the native layouts (HF parquet shards, test folder)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.base import BadSampleError, SkippedSample
from datamodules.magicbrush import (
    MagicBrushDataModule,
    TurnBatchSampler,
    apply_previous_outputs,
    official_output_name,
    official_output_path,
    parse_id,
)

datasets.disable_progress_bars()

H, W = 16, 24  # not square: the eval center crop cuts the width to 16


def noise(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(H, W, 3), dtype=np.uint8)


def edit(image: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(edited image, RGB mask): a random box inverted; white mask on the box."""
    rng = np.random.default_rng(1000 + seed)
    y, x = int(rng.integers(0, H - 6)), int(rng.integers(0, W - 6))
    box = np.zeros((H, W), dtype=bool)
    box[y : y + 6, x : x + 6] = True
    out = image.copy()
    out[box] = 255 - out[box]  # 255 - v != v for every uint8 v
    mask = np.zeros((H, W, 3), dtype=np.uint8)
    mask[box] = 255
    return out, mask


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def session_images(seed: int, num_turns: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """([input, output1, ..., outputN], [mask1, ..., maskN])."""
    images, masks = [noise(seed)], []
    for k in range(num_turns):
        out, mask = edit(images[-1], seed * 10 + k)
        images.append(out)
        masks.append(mask)
    return images, masks


FEATURES = datasets.Features(
    {
        "img_id": datasets.Value("string"),
        "turn_index": datasets.Value("int32"),
        "source_img": datasets.Image(),
        "mask_img": datasets.Image(),
        "instruction": datasets.Value("string"),
        "target_img": datasets.Image(),
    }
)


def write_shard(path: Path, sessions: dict[str, int], seed: int, corrupt_row: int | None = None):
    """One parquet shard as the HF release writes it; returns {id: (source, target, mask)}."""
    rows = {k: [] for k in FEATURES}
    truth = {}
    for n, (img_id, num_turns) in enumerate(sessions.items()):
        images, masks = session_images(seed + n, num_turns)
        for k in range(num_turns):
            rows["img_id"].append(img_id)
            rows["turn_index"].append(k + 1)
            rows["source_img"].append({"bytes": png(images[k]), "path": None})
            rows["mask_img"].append({"bytes": png(masks[k]), "path": None})
            rows["instruction"].append(f"edit {img_id} turn {k + 1}")
            rows["target_img"].append({"bytes": png(images[k + 1]), "path": None})
            truth[f"magicbrush/{img_id}/{k + 1}"] = (images[k], images[k + 1], masks[k])
    if corrupt_row is not None:
        rows["target_img"][corrupt_row] = {"bytes": b"not a png", "path": None}
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=FEATURES).to_parquet(str(path))
    return truth


TEST_SESSIONS = {"100": 1, "200": 3}


def write_test_folder(folder: Path) -> None:
    sessions, global_desc, local_desc = {}, {}, {}
    for n, (img_id, num_turns) in enumerate(TEST_SESSIONS.items()):
        images, masks = session_images(500 + n, num_turns)
        directory = folder / "images" / img_id
        directory.mkdir(parents=True)
        Image.fromarray(images[0]).save(directory / f"{img_id}-input.png")
        global_desc[img_id] = {f"{img_id}-input.png": f"global {img_id} input"}
        local_desc[img_id] = {}
        turns = []
        for k in range(1, num_turns + 1):
            Image.fromarray(images[k]).save(directory / f"{img_id}-output{k}.png")
            Image.fromarray(masks[k - 1]).save(directory / f"{img_id}-mask{k}.png")
            source = f"{img_id}-input.png" if k == 1 else f"{img_id}-output{k - 1}.png"
            turns.append(
                {
                    "input": source,
                    "mask": f"{img_id}-mask{k}.png",
                    "output": f"{img_id}-output{k}.png",
                    "instruction": f"test edit {img_id} turn {k}",
                }
            )
            global_desc[img_id][f"{img_id}-output{k}.png"] = f"global {img_id} output{k}"
            local_desc[img_id][f"{img_id}-output{k}.png"] = f"local {img_id} output{k}"
        sessions[img_id] = turns
    for name, data in (
        ("edit_sessions.json", sessions),
        ("global_descriptions.json", global_desc),
        ("local_descriptions.json", local_desc),
    ):
        (folder / name).write_text(json.dumps(data), encoding="utf-8")


@pytest.fixture(scope="module")
def mb_root(tmp_path_factory):
    """data/train-0000{0,1}-of-00002.parquet (4 turns), data/dev-00000-of-00001.parquet
    (3 turns), test/ (sessions 100: 1 turn, 200: 3 turns); truth per id in `root.truth`."""
    root = tmp_path_factory.mktemp("magicbrush")
    truth = {}
    truth |= write_shard(root / "data/train-00000-of-00002.parquet", {"10": 3}, seed=1)
    truth |= write_shard(root / "data/train-00001-of-00002.parquet", {"20": 1}, seed=2)
    truth |= write_shard(root / "data/dev-00000-of-00001.parquet", {"30": 1, "31": 2}, seed=3)
    write_test_folder(root / "test")
    return root, truth


def make(root: Path, **overrides) -> MagicBrushDataModule:
    kwargs = {
        "root": str(root),
        "resolution": 16,
        "batch_size": 2,
        "num_workers": 0,
        "cache_dir": str(root / "hf_cache"),
    }
    kwargs.update(overrides)
    return MagicBrushDataModule(**kwargs)


def as_unit(array: np.ndarray) -> torch.Tensor:
    """[H,W,3] uint8 → the [3,16,16] tensor in [-1,1] of `eval_resize="center_crop"`."""
    left = (W - 16) // 2
    return torch.from_numpy(array[:, left : left + 16].copy()).permute(2, 0, 1).float() / 127.5 - 1


# --------------------------------------------------------------------------- train / val


def test_parquet_splits_counts_ids_and_turns(mb_root):
    root, _ = mb_root
    dm = make(root)
    assert dm.protocol == "magicbrush"
    train, val = dm.build_records("train"), dm.build_records("val")
    assert [r["id"] for r in train] == [
        "magicbrush/10/1", "magicbrush/10/2", "magicbrush/10/3", "magicbrush/20/1",
    ]  # fmt: skip
    assert [r["id"] for r in val] == ["magicbrush/30/1", "magicbrush/31/1", "magicbrush/31/2"]
    assert [(r["session"], r["turn"], r["num_turns"]) for r in train] == [
        ("10", 1, 3), ("10", 2, 3), ("10", 3, 3), ("20", 1, 1),
    ]  # fmt: skip
    assert [r["num_turns"] for r in val] == [1, 2, 2]


def test_parquet_samples_decode_bytes_and_masks(mb_root):
    root, truth = mb_root
    dm = make(root, eval_resize="center_crop")
    dm.setup("fit")
    dataset = dm.datasets["val"]
    assert len(dataset) == 3
    for index in range(3):
        sample = dataset[index]
        source, target, mask = truth[sample["id"]]
        # the native images: exactly as stored, uncropped
        assert torch.equal(sample["source_native"], torch.from_numpy(source).permute(2, 0, 1))
        assert torch.equal(sample["target_native"], torch.from_numpy(target).permute(2, 0, 1))
        assert torch.equal(sample["mask_native"][0], torch.from_numpy(mask[..., 0] == 255).byte())
        assert torch.equal(sample["source"], as_unit(source))
        assert torch.equal(sample["target"], as_unit(target))
        left = (W - 16) // 2
        assert sample["mask"].shape == (1, 16, 16)
        white = torch.from_numpy(mask[:, left : left + 16, 0] == 255)
        assert torch.equal(sample["mask"][0].bool(), white)
        assert sample["instruction"] == f"edit {sample['session']} turn {sample['turn']}"
        assert sample["session"] == sample["id"].split("/")[1]


def test_mask_aligned_with_edit_under_random_crop_and_flip(mb_root):
    """Training transforms: the changed pixels are exactly the white mask pixels."""
    root, _ = mb_root
    dm = make(root, random_flip=1.0, random_crop=True)
    dataset = dm.make_dataset("train")
    torch.manual_seed(0)
    for index in range(len(dataset)):
        sample = dataset[index]
        changed = (sample["source"] != sample["target"]).any(dim=0)
        assert torch.equal(changed, sample["mask"][0].bool())
        assert set(sample["mask"].unique().tolist()) <= {0.0, 1.0}


def test_train_dataloader_batches(mb_root):
    root, _ = mb_root
    dm = make(root)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 2  # 4 turns, batch 2, drop_last
    batch = batches[0]
    assert batch["source"].shape == batch["target"].shape == (2, 3, 16, 16)
    assert batch["mask"].shape == (2, 1, 16, 16)
    assert all(isinstance(s, str) for s in batch["session"])
    assert all(isinstance(t, int) for t in batch["turn"] + batch["num_turns"])
    assert batch["skipped_ids"] == []
    assert len(list(dm.val_dataloader())) == 2


def test_bad_shard_row_names_shard_and_row(tmp_path):
    write_shard(tmp_path / "bad/train-0.parquet", {"7": 2}, seed=9, corrupt_row=1)
    dm = make(tmp_path, train_files="bad/*.parquet")
    dataset = dm.make_dataset("train")
    dataset[0]
    with pytest.raises(BadSampleError, match=r"train-0\.parquet, row 1, column 'target_img'"):
        dataset[1]
    skipping = make(tmp_path, train_files="bad/*.parquet", on_bad_sample="skip")
    skipped = skipping.make_dataset("train")[1]
    assert isinstance(skipped, SkippedSample) and skipped.id == "magicbrush/7/2"


def test_missing_shards_and_columns(tmp_path):
    with pytest.raises(FileNotFoundError, match="no MagicBrush train shard files match"):
        make(tmp_path).build_records("train")
    (tmp_path / "data").mkdir()
    datasets.Dataset.from_dict({"img_id": ["1"], "turn_index": [1]}).to_parquet(
        str(tmp_path / "data/dev-0.parquet")
    )
    with pytest.raises(ValueError, match=r"dev-0\.parquet lacks column\(s\) \['source_img'"):
        make(tmp_path).build_records("val")


# --------------------------------------------------------------------------- test split


def test_test_split_sessions_and_captions(mb_root):
    root, _ = mb_root
    records = make(root, caption_source="local").build_records("test")
    assert [r["id"] for r in records] == [
        "magicbrush/100/1", "magicbrush/200/1", "magicbrush/200/2", "magicbrush/200/3",
    ]  # fmt: skip
    assert [(r["session"], r["turn"], r["num_turns"]) for r in records] == [
        ("100", 1, 1), ("200", 1, 3), ("200", 2, 3), ("200", 3, 3),
    ]  # fmt: skip
    assert [r["goal_caption"] for r in records] == [
        "local 100 output1", "local 200 output1", "local 200 output2", "local 200 output3",
    ]  # fmt: skip
    assert [r["source_caption"] for r in records] == [
        "global 100 input", "global 200 input", "global 200 output1", "global 200 output2",
    ]  # fmt: skip
    assert all("previous_output_id" not in r for r in records)
    # The default is the global captions: MGIE's tables and MagicBrush's script.
    global_records = make(root).build_records("test")
    assert [r["goal_caption"] for r in global_records][2] == "global 200 output2"
    with pytest.raises(ValueError, match="caption_source"):
        make(root, caption_source="short")


def test_independent_chaining_uses_ground_truth(mb_root):
    root, _ = mb_root
    dm = make(root, eval_resize="center_crop")
    dm.setup("test")
    dataset = dm.datasets["test"]
    samples = {dataset[i]["id"]: dataset[i] for i in range(len(dataset))}
    for turn in (2, 3):
        current, previous = samples[f"magicbrush/200/{turn}"], samples[f"magicbrush/200/{turn - 1}"]
        assert torch.equal(current["source"], previous["target"])
        assert not torch.equal(current["source"], previous["source"])
    sample = samples["magicbrush/200/2"]
    changed = (sample["source"] != sample["target"]).any(dim=0)
    assert torch.equal(changed, sample["mask"][0].bool())  # test masks: white = edit region
    native_changed = (sample["source_native"] != sample["target_native"]).any(dim=0)
    assert torch.equal(native_changed, sample["mask_native"][0].bool())
    assert sample["target_native"].shape == (3, H, W)  # not cropped
    batches = list(dm.test_dataloader())
    assert [len(b["id"]) for b in batches] == [2, 2]
    assert batches[0]["goal_caption"] == ["global 100 output1", "global 200 output1"]


def test_iterative_mode_turn_batches_and_substitution(mb_root):
    root, _ = mb_root
    dm = make(root, test_mode="iterative", eval_batch_size=4)
    dm.setup("test")
    records = dm.datasets["test"].records
    assert [r.get("previous_output_id") for r in records] == [
        None, None, "magicbrush/200/1", "magicbrush/200/2",
    ]  # fmt: skip
    batches = list(dm.test_dataloader())
    assert [b["id"] for b in batches] == [
        ["magicbrush/100/1", "magicbrush/200/1"], ["magicbrush/200/2"], ["magicbrush/200/3"],
    ]  # fmt: skip
    assert "previous_output_id" not in batches[0]
    # A test loop: the "model" negates its input; turn k must see the model's turn k-1 output.
    predictions: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    for batch in dm.test_dataloader():
        batch = apply_previous_outputs(batch, predictions)
        for sample_id, source in zip(batch["id"], batch["source"], strict=True):
            inputs[sample_id] = source
            predictions[sample_id] = -source
    first = inputs["magicbrush/200/1"]
    assert torch.equal(inputs["magicbrush/200/2"], -first)
    assert torch.equal(inputs["magicbrush/200/3"], first)
    with pytest.raises(KeyError, match="magicbrush/200/1"):
        apply_previous_outputs(batches[1], {})
    assert len(TurnBatchSampler([1, 2, 1, 3, 2], batch_size=1)) == 5
    assert list(TurnBatchSampler([1, 2, 1, 3, 2], batch_size=2)) == [[0, 2], [1, 4], [3]]


def test_official_output_names():
    assert official_output_name("139", 1, "independent") == "139_1.png"
    assert official_output_name("139", 1, "iterative") == "139_1.png"
    assert official_output_name("139", 3, "independent") == "139_inde_3.png"
    assert official_output_name("139", 2, "iterative") == "139_iter_2.png"
    assert official_output_path("magicbrush/139/2", "iterative") == "139/139_iter_2.png"
    assert parse_id("magicbrush/139/2") == ("139", 2)
    with pytest.raises(ValueError):
        official_output_name("139", 0)


def test_bad_test_folder(tmp_path, mb_root):
    with pytest.raises(FileNotFoundError, match="edit_sessions.json"):
        make(tmp_path).build_records("test")
    root, _ = mb_root
    folder = tmp_path / "test"
    folder.mkdir()
    for name in ("global_descriptions.json", "local_descriptions.json"):
        (folder / name).write_text((root / "test" / name).read_text())
    (folder / "edit_sessions.json").write_text(json.dumps({"5": [{"input": "5-input.png"}]}))
    with pytest.raises(ValueError, match=r"session '5', turn 1: missing key 'mask'"):
        make(tmp_path).build_records("test")


@pytest.mark.parametrize("mode", ["iterative", "independent"])
def test_predict_with_the_tiny_model_chains_turns_and_writes_official_names(
    mb_root, tiny_dir, tmp_path, mode
):
    """Trainer.predict with the suite's callbacks: in iterative mode turn k is edited from the
    model's own turn k-1 output; files carry MagicBrush's names for the mode."""
    import lightning as L

    from editbench.callbacks import EditPredictionWriter, MultiTurnChaining
    from models.inspix2pix import InsPix2Pix

    root, _ = mb_root
    dm = make(root, test_mode=mode, eval_batch_size=4)
    model = InsPix2Pix(diffusion_path=str(tiny_dir / "instruct-pix2pix"), num_inference_steps=2)
    seen: dict[str, torch.Tensor] = {}
    edit = model.edit

    def recording_edit(source, instructions, **kwargs):  # records inputs, then edits for real
        out = edit(source, instructions, **kwargs)
        for i, instruction in enumerate(instructions):
            seen[instruction] = source[i].clone()
        return out

    model.edit = recording_edit
    out_dir = tmp_path / "preds"
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False,
        callbacks=[MultiTurnChaining(), EditPredictionWriter(str(out_dir))],
    )  # fmt: skip
    predictions = trainer.predict(model, datamodule=dm)
    by_id = {i: img for p in predictions for i, img in zip(p["id"], p["images"], strict=True)}
    turn2 = seen["test edit 200 turn 2"]
    if mode == "iterative":
        torch.testing.assert_close(turn2, by_id["magicbrush/200/1"])
        torch.testing.assert_close(seen["test edit 200 turn 3"], by_id["magicbrush/200/2"])
        names = ["100/100_1.png", "200/200_1.png", "200/200_iter_2.png", "200/200_iter_3.png"]
    else:
        assert not torch.allclose(turn2, by_id["magicbrush/200/1"])
        names = ["100/100_1.png", "200/200_1.png", "200/200_inde_2.png", "200/200_inde_3.png"]
    assert sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*.png")) == names
