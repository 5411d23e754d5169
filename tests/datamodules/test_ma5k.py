"""MA5kDataModule on a tiny MA5k-Req in its native layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.base import BadSampleError
from datamodules.ma5k import MA5kDataModule, image_id

PHOTOS = ("0001", "0002", "0003", "0004")
EXPERTS = ("A", "B")


def five_k() -> list[dict]:
    return [
        {"input": f"{p}_O.jpg", "output": f"{p}_{e}.jpg", "request": f"brighten photo {p} like {e}"}
        for p in PHOTOS
        for e in EXPERTS
    ]


@pytest.fixture
def ma5k_root(tmp_path) -> Path:
    root = tmp_path / "ma5k"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    records = five_k()
    for record in records:
        for key in ("input", "output"):
            path = root / "images" / record[key]
            if not path.exists():
                Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(path)
    (root / "FiveK.json").write_text(json.dumps(records))
    splits = {
        "train": records[:4],  # records, as in the LGIE loader: photos 0001 and 0002
        "val": ["0003"],  # an image id
        "test": ["0004_O.jpg"],  # an input file name
    }
    for split, entries in splits.items():
        (root / "annotations" / f"{split}_sess_1.json").write_text(json.dumps(entries))
    return root


def make_dm(root, **overrides) -> MA5kDataModule:
    kwargs = {"root": str(root), "resolution": 8, "batch_size": 2, "num_workers": 0}
    kwargs.update(overrides)
    return MA5kDataModule(**kwargs)


def test_image_id():
    assert image_id("0001_O.jpg") == image_id("0001O.jpg") == image_id("0001_O") == "0001"
    assert image_id("a4500-kme_0204_O.jpg") == "a4500-kme_0204"


def test_records_per_split(ma5k_root):
    dm = make_dm(ma5k_root)
    assert dm.protocol == "ma5k"
    train = dm.build_records("train")
    assert [r["id"] for r in train] == ["ma5k/0001_A", "ma5k/0001_B", "ma5k/0002_A", "ma5k/0002_B"]
    assert train[1] == {
        "id": "ma5k/0001_B",
        "source": str(ma5k_root / "images" / "0001_O.jpg"),
        "target": str(ma5k_root / "images" / "0001_B.jpg"),
        "instruction": "brighten photo 0001 like B",
    }
    assert [r["id"] for r in dm.build_records("val")] == ["ma5k/0003_A", "ma5k/0003_B"]
    assert [r["id"] for r in dm.build_records("test")] == ["ma5k/0004_A", "ma5k/0004_B"]
    assert dm.build_records("train") == train  # stable


def test_mixed_entries_and_images_dir(ma5k_root):
    (ma5k_root / "annotations" / "val_sess_1.json").write_text(json.dumps(["0003_O", five_k()[-1]]))
    (ma5k_root / "images").rename(ma5k_root / "photos")
    dm = make_dm(ma5k_root, images_dir="photos")
    records = dm.build_records("val")
    assert [r["id"] for r in records] == ["ma5k/0003_A", "ma5k/0003_B", "ma5k/0004_B"]
    assert records[0]["source"] == str(ma5k_root / "photos" / "0003_O.jpg")
    sample = dm.make_dataset("val")[2]
    assert sample["source"].shape == (3, 8, 8) and "mask" not in sample


def test_bad_split_files(ma5k_root):
    annotations = ma5k_root / "annotations"
    (annotations / "test_sess_1.json").unlink()
    with pytest.raises(FileNotFoundError, match="test_sess_1.json"):
        make_dm(ma5k_root).build_records("test")
    records = five_k()[:3]
    del records[2]["request"]
    (annotations / "train_sess_1.json").write_text(json.dumps(records))
    with pytest.raises(
        ValueError, match=r"train_sess_1\.json, row 2: missing required key 'request'"
    ):
        make_dm(ma5k_root).build_records("train")
    (annotations / "train_sess_1.json").write_text(json.dumps([five_k()[0], five_k()[0]]))
    with pytest.raises(ValueError, match="row 1: output '0001_A' already listed in row 0"):
        make_dm(ma5k_root).build_records("train")
    (annotations / "val_sess_1.json").write_text(json.dumps(["0003", "9999"]))
    with pytest.raises(ValueError, match=r"val_sess_1\.json, row 1: photo '9999' is not in FiveK"):
        make_dm(ma5k_root).build_records("val")
    (annotations / "val_sess_1.json").write_text('{"not": "a list"}')
    with pytest.raises(ValueError, match="expected a JSON list"):
        make_dm(ma5k_root).build_records("val")


def test_corrupt_image_names_file_and_row(ma5k_root):
    (ma5k_root / "images" / "0002_B.jpg").write_bytes(b"\xff\xd8 truncated")
    dataset = make_dm(ma5k_root).make_dataset("train")
    with pytest.raises(
        BadSampleError, match=r"0002_B\.jpg \(split 'train', row 3, id 'ma5k/0002_B'\)"
    ):
        dataset[3]


def test_dataloaders_iterate(ma5k_root):
    dm = make_dm(ma5k_root)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 2
    ids = sorted(i for b in batches for i in b["id"])
    assert ids == ["ma5k/0001_A", "ma5k/0001_B", "ma5k/0002_A", "ma5k/0002_B"]
    for batch in batches:
        assert batch["source"].shape == (2, 3, 8, 8) and batch["target"].shape == (2, 3, 8, 8)
        assert "mask" not in batch and len(batch["instruction"]) == 2
        assert batch["source"].min() >= -1 and batch["source"].max() <= 1
    val = list(dm.val_dataloader())
    assert [b["id"] for b in val] == [["ma5k/0003_A", "ma5k/0003_B"]]
