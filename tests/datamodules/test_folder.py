"""FolderEditDataModule: JSONL/CSV manifests, per-split manifests, the seeded split, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.folder import FolderEditDataModule, read_manifest, seeded_split

N = 20


@pytest.fixture
def root(tmp_path) -> Path:
    """images/{s,t}{i}.png (16px, distinct), images/m0.png (white left half), manifests."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        for kind in ("s", "t"):
            array = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
            Image.fromarray(array).save(images / f"{kind}{i}.png")
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:, :8] = 255
    Image.fromarray(mask).save(images / "m0.png")
    rows = []
    for i in range(N):
        row = {
            "source": f"images/s{i % 3}.png",
            "target": f"images/t{i % 3}.png",
            "instruction": f"edit number {i}",
            "mask": "images/m0.png",
        }
        if i % 2 == 0:
            row |= {"goal_caption": f"goal {i}", "expressive": f"ex {i}"}
        rows.append(row)
    write_jsonl(tmp_path / "manifest.jsonl", rows)
    write_csv(tmp_path / "pairs.csv", rows)
    return tmp_path


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_csv(path: Path, rows: list[dict], fields: tuple[str, ...] | None = None) -> None:
    fields = fields or ("id", "source", "target", "mask", "instruction", "expressive",
                        "source_caption", "goal_caption")  # fmt: skip
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def make(root: Path, **overrides) -> FolderEditDataModule:
    kwargs = {"root": str(root), "resolution": 16, "batch_size": 4, "num_workers": 0}
    kwargs.update(overrides)
    return FolderEditDataModule(**kwargs)


def test_jsonl_and_csv_give_the_same_records(root):
    jsonl = read_manifest(root / "manifest.jsonl", root)
    rows = read_manifest(root / "pairs.csv", root)
    assert len(jsonl) == len(rows) == N
    assert jsonl[0]["id"] == "images/s0.png#1"  # source path + line number
    assert rows[0]["id"] == "images/s0.png#2"  # CSV: the header is line 1
    for a, b in zip(jsonl, rows, strict=True):
        assert {k: v for k, v in a.items() if k != "id"} == {
            k: v for k, v in b.items() if k != "id"
        }
    assert jsonl[0]["source"] == str(root / "images/s0.png")
    assert "goal_caption" not in rows[1] and "expressive" not in rows[1]  # empty cell = absent


def test_ids_are_stable_and_explicit_ids_kept(root):
    first = [r["id"] for r in read_manifest(root / "manifest.jsonl", root)]
    assert first == [r["id"] for r in read_manifest(root / "manifest.jsonl", root)]
    assert len(set(first)) == N
    write_jsonl(root / "ids.jsonl", [{"id": 7, "source": "a.png", "target": "b.png",
                                      "instruction": "x"}])  # fmt: skip
    assert read_manifest(root / "ids.jsonl", root)[0]["id"] == "7"


def test_seeded_split_is_disjoint_deterministic_and_counted(root):
    dm = make(root, val_fraction=0.1, test_fraction=0.2, split_seed=3)
    splits = {s: [r["id"] for r in dm.build_records(s)] for s in ("train", "val", "test")}
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (14, 2, 4)
    assert sorted(sum(splits.values(), [])) == sorted(
        r["id"] for r in read_manifest(root / "manifest.jsonl", root)
    )
    again = make(root, val_fraction=0.1, test_fraction=0.2, split_seed=3)
    assert {s: [r["id"] for r in again.build_records(s)] for s in splits} == splits
    other = make(root, val_fraction=0.1, test_fraction=0.2, split_seed=4)
    assert [r["id"] for r in other.build_records("test")] != splits["test"]
    # Defaults: 5% of 20 = 1 each.
    defaults = make(root)
    assert [len(defaults.build_records(s)) for s in ("train", "val", "test")] == [18, 1, 1]


def test_seeded_split_ignores_row_order():
    records = [{"id": f"r{i}"} for i in range(50)]
    a = seeded_split(records, 0.1, 0.1, seed=0)
    b = seeded_split(records[::-1], 0.1, 0.1, seed=0)
    for split in a:
        assert sorted(r["id"] for r in a[split]) == sorted(r["id"] for r in b[split])
    assert [len(a[s]) for s in ("train", "val", "test")] == [40, 5, 5]
    with pytest.raises(ValueError, match="no training data"):
        seeded_split(records[:2], 0.5, 0.4, seed=0)


def test_per_split_manifests_and_dataloader(root):
    dm = make(root, train_manifest="manifest.jsonl", val_manifest="pairs.csv")
    dm.setup("fit")
    assert len(dm.datasets["train"]) == len(dm.datasets["val"]) == N
    assert dm.protocol == "generic"
    batch = next(iter(dm.val_dataloader()))
    assert batch["source"].shape == batch["target"].shape == (4, 3, 16, 16)
    assert batch["instruction"] == [f"edit number {i}" for i in range(4)]
    assert batch["goal_caption"] == ["goal 0", None, "goal 2", None]
    assert len(list(dm.train_dataloader())) == N // 4
    with pytest.raises(ValueError, match="set test_manifest"):
        dm.build_records("test")


def test_samples_pixels_and_mask(root):
    dataset = make(root, val_manifest="manifest.jsonl").make_dataset("val")
    sample = dataset[0]
    png = np.asarray(Image.open(root / "images/s0.png"))
    assert torch.equal(sample["source"], torch.from_numpy(png).permute(2, 0, 1).float() / 127.5 - 1)
    assert sample["mask"].shape == (1, 16, 16)
    assert sample["mask"][0, :, :8].eq(1).all() and sample["mask"][0, :, 8:].eq(0).all()
    assert sample["expressive"] == "ex 0" and "expressive" not in dataset[1]


def test_missing_manifest_names_it(root):
    with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
        make(root, manifest="nothere.jsonl").build_records("train")


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("bad.jsonl", '{"source": "a", "target": "b", "instruction": "x"}\n{oops\n',
         r"bad\.jsonl, line 2: not valid JSON"),
        ("bad.jsonl", '\n{"source": "a", "instruction": "x"}\n',
         r"bad\.jsonl, line 2: missing required key 'target'"),
        ("bad.jsonl", '{"source": "a", "target": "b", "instruction": "  "}\n',
         r"bad\.jsonl, line 1: empty value for key 'instruction'"),
        ("bad.csv", "source,target\na.png,b.png\n",
         r"bad\.csv, line 1: header lacks required column 'instruction'"),
        ("bad.csv", "source,target,instruction\na.png,b.png,go\na.png,b.png,\n",
         r"bad\.csv, line 3: missing required key 'instruction'"),
        ("bad.csv", "source,target,instruction,mask\na,b,i,m.png\nc,d,i,\n",
         r"bad\.csv: 'mask' is given on some rows but missing on line\(s\) \[3\]"),
        ("bad.jsonl", '{"id": "x", "source": "a", "target": "b", "instruction": "i"}\n' * 2,
         r"duplicate ids \['x'\]"),
    ],
)  # fmt: skip
def test_bad_rows_name_file_line_and_key(root, name, content, match):
    (root / name).write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        make(root, train_manifest=name).build_records("train")
