"""EditDataModule: sample contract, paired transforms, collate, loaders, bad-input handling."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.base import (
    BadSampleError,
    EditDataset,
    SkippedSample,
    build_transform,
    collate,
    read_jsonl_manifest,
)
from datamodules.synthetic import SyntheticEditDataModule


def rows(root: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- contract


def test_samples_follow_the_data_contract(make_dm):
    dm = make_dm()
    dm.setup("fit")
    assert set(dm.datasets) == {"train", "val"}
    assert dm.protocol == "synthetic"
    for split in ("train", "val"):
        sample = dm.datasets[split][0]
        assert sample["id"] == f"synthetic-{split}-000000"
        for key in ("source", "target"):
            x = sample[key]
            assert x.shape == (3, 32, 32) and x.dtype == torch.float32
            assert type(x) is torch.Tensor  # plain tensors, not tv_tensors
            assert x.min() >= -1 and x.max() <= 1 and x.std() > 0
        assert sample["mask"].shape == (1, 32, 32) and sample["mask"].dtype == torch.float32
        assert set(sample["mask"].unique().tolist()) <= {0.0, 1.0} and sample["mask"].any()
        for key in ("instruction", "expressive", "source_caption", "goal_caption"):
            assert isinstance(sample[key], str) and sample[key]
        assert "edit" not in sample and "skipped_ids" not in sample


def test_pixels_round_trip_exactly(make_dm, small_root):
    """Eval transform at the native size: values are the PNG's, mapped to [-1, 1]."""
    dataset = make_dm().make_dataset("test")
    record = rows(small_root, "test")[2]
    png = np.asarray(Image.open(small_root / record["source"]))
    expected = torch.from_numpy(png).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(dataset[2]["source"], expected)
    mask = np.asarray(Image.open(small_root / record["mask"])) > 127
    assert torch.equal(dataset[2]["mask"][0].bool(), torch.from_numpy(mask))


def test_multi_turn_fields_and_missing_target(tmp_path):
    Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / "a.png")
    record = {
        "id": "s1-2",
        "source": str(tmp_path / "a.png"),
        "instruction": "do it",
        "session": "s1",
        "turn": "2",
        "num_turns": 3,
    }
    dataset = EditDataset([record], build_transform(16, False, False, 0.0), "test")
    sample = dataset[0]
    assert sample["source"].shape == (3, 16, 16) and "target" not in sample
    assert (sample["session"], sample["turn"], sample["num_turns"]) == ("s1", 2, 3)


# --------------------------------------------------------------------------- transforms


def _pair_dataset(tmp_path: Path, size: tuple[int, int], regions, resolution: int, flip: float):
    """source == target: noise, with channel 0 at 255 exactly on `regions` (also the mask)."""
    w, h = size
    rng = np.random.default_rng(0)
    image = rng.integers(0, 100, size=(h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), dtype=np.uint8)
    for region in regions:
        mask[region] = 255
    image[..., 0][mask > 0] = 255
    Image.fromarray(image).save(tmp_path / "img.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    record = {
        "id": "pair",
        "source": str(tmp_path / "img.png"),
        "target": str(tmp_path / "img.png"),
        "mask": str(tmp_path / "mask.png"),
        "instruction": "nothing",
    }
    transform = build_transform(resolution, train=True, random_crop=True, random_flip=flip)
    return EditDataset([record], transform, "train")


def test_random_crop_and_flip_keep_source_target_mask_aligned(tmp_path):
    # An L-shaped region (not mirror-symmetric) in a 32x48 image: crops along the width.
    regions = [(slice(4, 20), slice(30, 36)), (slice(20, 26), slice(30, 44))]
    dataset = _pair_dataset(tmp_path, (48, 32), regions, resolution=32, flip=0.5)
    torch.manual_seed(0)
    seen = set()
    for _ in range(60):
        s = dataset[0]
        assert torch.equal(s["source"], s["target"])
        assert torch.equal(s["mask"][0] == 1, s["source"][0] == 1.0)
        seen.add(s["mask"].numpy().tobytes())
    assert len(seen) > 10  # crops and flips really varied


def test_resize_keeps_mask_aligned(tmp_path):
    regions = [(slice(16, 48), slice(40, 72))]  # 2-pixel aligned block in a 96x64 image
    dataset = _pair_dataset(tmp_path, (96, 64), regions, resolution=32, flip=1.0)
    torch.manual_seed(1)
    for _ in range(20):
        s = dataset[0]
        assert torch.equal(s["source"], s["target"])
        assert set(s["mask"].unique().tolist()) <= {0.0, 1.0}
        bright = s["source"][0] > 0.5
        mask = s["mask"][0] == 1
        assert (bright & mask).sum() / (bright | mask).sum() > 0.9


def test_eval_transform_center_crop_is_fixed(tmp_path):
    regions = [(slice(4, 20), slice(30, 36))]
    dataset = _pair_dataset(tmp_path, (48, 32), regions, resolution=32, flip=0.0)
    dataset.transform = build_transform(
        32, train=False, random_crop=True, random_flip=1.0, eval_resize="center_crop"
    )
    image = np.asarray(Image.open(tmp_path / "img.png"))
    expected = torch.from_numpy(image[:, 8:40]).permute(2, 0, 1).float() / 127.5 - 1
    for seed in range(10):
        torch.manual_seed(seed)
        assert torch.equal(dataset[0]["source"], expected)


def test_mask_uses_nearest_interpolation(tmp_path):
    """1-pixel stripes every 3 columns, shrunk 3x: nearest keeps them, averaging would not."""
    mask = np.zeros((96, 96), dtype=np.uint8)
    mask[:, ::3] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.new("RGB", (96, 96)).save(tmp_path / "img.png")
    record = {"id": "m", "source": str(tmp_path / "img.png"), "instruction": "x"}
    record["mask"] = str(tmp_path / "mask.png")
    dataset = EditDataset([record], build_transform(32, False, False, 0.0), "test")
    assert dataset[0]["mask"].all()


def test_datamodule_flip_mirrors_all_three(make_dm):
    flipped = make_dm(random_flip=1.0, random_crop=False).make_dataset("train")
    plain = make_dm(random_flip=0.0, random_crop=False).make_dataset("train")
    for i in range(5):
        a, b = flipped[i], plain[i]
        for key in ("source", "target", "mask"):
            assert torch.equal(a[key], b[key].flip(-1)), key


def test_synthetic_defaults_do_not_flip(small_root):
    dm = SyntheticEditDataModule(root=str(small_root))
    assert dm.random_flip == 0.0
    assert SyntheticEditDataModule.__doc__ and "left/right" in SyntheticEditDataModule.__doc__


def test_generate_resolution_and_resize(make_dm, tmp_path):
    dm = make_dm(root=str(tmp_path / "big"), resolution=32, generate_resolution=48)
    dm.setup("test")
    assert Image.open(dm.datasets["test"].records[0]["source"]).size == (48, 48)
    first = dm.datasets["test"][0]
    assert first["source"].shape == (3, 32, 32) and first["mask"].shape == (1, 32, 32)
    for seed in range(5):  # eval transforms are not random
        torch.manual_seed(seed)
        again = dm.datasets["test"][0]
        assert all(torch.equal(first[k], again[k]) for k in ("source", "target", "mask"))


# --------------------------------------------------------------------------- collate, loaders


def test_collate_stacks_tensors_and_lists_the_rest():
    def sample(i, **extra):
        return {"id": f"x{i}", "source": torch.zeros(3, 4, 4), "instruction": f"i{i}", **extra}

    batch = collate([sample(0, turn=1), SkippedSample("bad", "why"), sample(2, turn=3)])
    assert batch["source"].shape == (2, 3, 4, 4)
    assert batch["id"] == ["x0", "x2"] and batch["instruction"] == ["i0", "i2"]
    assert batch["turn"] == [1, 3] and batch["skipped_ids"] == ["bad"]
    assert collate([sample(0)])["skipped_ids"] == []
    assert collate([sample(0), sample(1, expressive="e")])["expressive"] == [None, "e"]
    empty = collate([SkippedSample("a", ""), SkippedSample("b", "")])
    assert empty == {"id": [], "skipped_ids": ["a", "b"]}
    with pytest.raises(ValueError, match="mask"):
        collate([sample(0, mask=torch.ones(1, 4, 4)), sample(1)])


def test_loaders_batch_sizes_caps_and_stages(make_dm):
    dm = make_dm(batch_size=6, eval_batch_size=2, max_samples=3, predict_split="val")
    dm.setup("validate")
    assert set(dm.datasets) == {"val"}
    dm.setup("predict")
    assert dm.predict_dataloader().dataset is dm.datasets["val"]
    val = list(dm.val_dataloader())
    assert [len(b["id"]) for b in val] == [2, 1]
    assert [i for b in val for i in b["id"]] == [f"synthetic-val-{i:06d}" for i in range(3)]
    dm.setup("test")
    assert len(dm.datasets["test"]) == 3
    train = make_dm(batch_size=6)
    train.setup("fit")
    loader = train.train_dataloader()
    assert loader.drop_last and [len(b["id"]) for b in loader] == [6, 6, 6]  # 20 // 6
    order = [i for b in train.train_dataloader() for i in b["id"]]
    assert order != sorted(order)  # shuffled


def test_fit_style_iteration_with_two_workers(make_dm):
    dm = make_dm(num_workers=2, batch_size=4, random_flip=0.5)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.persistent_workers and loader.num_workers == 2
    for _epoch in range(2):
        ids = []
        for batch in loader:
            assert batch["source"].shape == batch["target"].shape == (4, 3, 32, 32)
            assert batch["mask"].shape == (4, 1, 32, 32) and batch["skipped_ids"] == []
            ids += batch["id"]
        assert sorted(ids) == [f"synthetic-train-{i:06d}" for i in range(20)]
    assert sum(len(b["id"]) for b in dm.val_dataloader()) == 5


class _Probe(L.LightningModule):
    """Minimal model: one parameter, records batch sizes."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.sizes = []

    def training_step(self, batch, batch_idx):
        self.sizes.append(len(batch["id"]))
        return ((batch["target"] - batch["source"]).mean() - self.weight) ** 2

    def validation_step(self, batch, batch_idx):
        self.sizes.append(len(batch["id"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_fit_counts_skipped_samples(make_dm, small_root):
    (small_root / rows(small_root, "train")[7]["source"]).unlink()
    dm = make_dm(num_workers=2, batch_size=4, on_bad_sample="skip")
    model = _Probe()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    assert dm.num_skipped == 1 and dm.skipped_ids == ["synthetic-train-000007"]
    assert sorted(model.sizes) == [1, 3, 4, 4, 4, 4, 4]  # 5 train batches (one short), 2 val


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("damage", ["missing", "garbage", "truncated"])
def test_bad_image_raises_naming_path_split_row_and_id(make_dm, small_root, damage):
    path = small_root / rows(small_root, "val")[3]["target"]
    if damage == "missing":
        path.unlink()
    elif damage == "garbage":
        path.write_bytes(b"this is not a png" * 10)
    else:
        path.write_bytes(path.read_bytes()[:60])
    dm = make_dm()
    dm.setup("validate")
    dataset = dm.datasets["val"]
    dataset[2]  # the other rows are fine
    with pytest.raises(BadSampleError) as err:
        dataset[3]
    message = str(err.value)
    for part in (str(path), "'val'", "row 3", "synthetic-val-000003"):
        assert part in message
    assert isinstance(err.value, ValueError)


def test_skip_policy_drops_counts_and_reports(make_dm, small_root):
    for i in (1, 4):
        (small_root / rows(small_root, "val")[i]["mask"]).write_bytes(b"\x89PNG garbage")
    dm = make_dm(on_bad_sample="skip", eval_batch_size=2)
    dm.setup("validate")
    batches = [dm.on_before_batch_transfer(b, 0) for b in dm.val_dataloader()]
    kept = [i for b in batches for i in b["id"]]
    skipped = [i for b in batches for i in b["skipped_ids"]]
    assert skipped == ["synthetic-val-000001", "synthetic-val-000004"]
    assert kept == ["synthetic-val-000000", "synthetic-val-000002", "synthetic-val-000003"]
    assert dm.num_skipped == 2 and dm.skipped_ids == skipped


def test_invalid_policy_is_rejected(small_root):
    with pytest.raises(ValueError, match="on_bad_sample"):
        SyntheticEditDataModule(root=str(small_root), on_bad_sample="ignore")


def test_bad_json_line_names_file_and_line(make_dm, small_root):
    path = small_root / "val.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:-5]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as err:
        make_dm().setup("validate")
    assert str(path) in str(err.value) and "line 3" in str(err.value)
    assert "JSON" in str(err.value)


@pytest.mark.parametrize(("split", "key"), [("val", "instruction"), ("train", "target")])
def test_missing_key_names_the_key(make_dm, small_root, split, key):
    path = small_root / f"{split}.jsonl"
    records = rows(small_root, split)
    del records[4][key]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError) as err:
        make_dm().setup("fit")
    assert (
        str(path) in str(err.value) and "line 5" in str(err.value) and repr(key) in str(err.value)
    )


def test_target_is_optional_outside_training(make_dm, small_root):
    path = small_root / "test.jsonl"
    records = rows(small_root, "test")
    for r in records:
        del r["target"]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    dm = make_dm()
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert "target" not in batch and batch["source"].shape[0] == 4


def test_missing_split_file_names_the_path(make_dm, small_root):
    (small_root / "test.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=str(small_root / "test.jsonl")):
        make_dm().setup("test")


def test_missing_generation_is_reported(tmp_path):
    dm = SyntheticEditDataModule(root=str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="meta.json"):
        dm.setup("fit")


def test_read_jsonl_manifest_resolves_paths(tmp_path):
    manifest = tmp_path / "m.jsonl"
    lines = [
        {"id": "a", "source": "images/a.png", "mask": None, "instruction": "x"},
        {"id": "b", "source": "/abs/b.png", "target": "t/b.png", "instruction": "y"},
    ]
    manifest.write_text(json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n")
    records = read_jsonl_manifest(manifest, tmp_path / "root")
    assert records[0]["source"] == str(tmp_path / "root/images/a.png")
    assert records[0]["mask"] is None
    assert records[1]["source"] == "/abs/b.png"
    assert records[1]["target"] == str(tmp_path / "root/t/b.png")
    manifest.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="line 1"):
        read_jsonl_manifest(manifest, tmp_path)


def test_constructor_fields_are_visible_to_the_cli(small_root):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(SyntheticEditDataModule, "data")
    config = parser.parse_args(["--data.root", str(small_root)])
    fields = vars(config.data)
    for name, value in {
        "resolution": 256,
        "batch_size": 8,
        "eval_batch_size": None,
        "num_workers": 2,
        "random_flip": 0.0,
        "random_crop": True,
        "max_samples": None,
        "on_bad_sample": "error",
        "predict_split": "test",
        "num_train": 4000,
        "seed": 0,
        "generate_resolution": None,
    }.items():
        assert fields[name] == value, name
    assert "left/right" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--data.root", "x", "--data.on_bad_sample", "ignore"])
