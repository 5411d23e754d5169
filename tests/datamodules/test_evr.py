"""EVRDataModule: native layout, per-sentence train / per-pair eval samples, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from datamodules.base import BadSampleError, collate
from datamodules.evr import EVRDataModule

TRAIN = [
    {"img0": "a_0.png", "img1": "a_1.png", "sents": ["brighten it"], "uid": "u1"},
    {"img0": "b_0.png", "img1": "b_1.png", "sents": ["crop the left", "remove the dog"], "uid": 7},
    {"img0": "c_0.png", "img1": "c_1.png", "sents": ["add contrast"], "uid": "u3"},
]
VALID = [
    {"img0": "d_0.png", "img1": "d_1.png", "sents": ["v1", "v2", "v3"], "uid": "v-1"},
    {"img0": "e_0.png", "img1": "e_1.png", "sents": ["w1", "w2", "w3"], "uid": "v-2"},
]
TEST = [
    {"img0": "f_0.png", "img1": "f_1.png", "sents": ["t1", "t2", "t3"], "uid": "t-1"},
    {"img0": "a_0.png", "img1": "a_1.png", "sents": ["s1", "s2", "s3"], "uid": "t-2"},
    {"img0": "b_0.png", "img1": "b_1.png", "sents": ["r1", "r2", "r3"], "uid": "t-3"},
]


def write_evr(root: Path, images_dir: str = "images") -> Path:
    """EVR's layout: {train,valid,test}.json and the image files under `images_dir`."""
    images = root / images_dir
    images.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", TRAIN), ("valid", VALID), ("test", TEST)):
        (root / f"{split}.json").write_text(json.dumps(rows))
        for i, row in enumerate(rows):
            Image.new("RGB", (24, 18), (40 * i, 90, 10)).save(images / row["img0"])
            Image.new("RGB", (24, 18), (10, 90, 40 * i)).save(images / row["img1"])
    return root


@pytest.fixture
def evr_root(tmp_path):
    return write_evr(tmp_path / "evr")


def make_dm(root: Path, **overrides) -> EVRDataModule:
    kwargs = {"root": str(root), "resolution": 16, "batch_size": 2, "num_workers": 0}
    kwargs.update(overrides)
    return EVRDataModule(**kwargs)


def test_one_sample_per_sentence_in_train(evr_root):
    records = make_dm(evr_root).build_records("train")
    assert [r["id"] for r in records] == ["evr/u1/0", "evr/7/0", "evr/7/1", "evr/u3/0"]
    assert [r["instruction"] for r in records] == [
        "brighten it",
        "crop the left",
        "remove the dog",
        "add contrast",
    ]
    assert records[1]["source"] == records[2]["source"] == str(evr_root / "images" / "b_0.png")
    assert records[1]["target"] == str(evr_root / "images" / "b_1.png")
    assert all("references" not in r for r in records)


def test_one_sample_per_pair_in_val_and_test(evr_root):
    dm = make_dm(evr_root)
    val, test = dm.build_records("val"), dm.build_records("test")
    assert [r["id"] for r in val] == ["evr/v-1", "evr/v-2"]
    assert [r["id"] for r in test] == ["evr/t-1", "evr/t-2", "evr/t-3"]
    assert [r["instruction"] for r in val] == ["v1", "w1"]
    assert val[0]["references"] == ["v1", "v2", "v3"]
    other = make_dm(evr_root, eval_sentence=2).build_records("test")
    assert [r["instruction"] for r in other] == ["t3", "s3", "r3"]
    assert [r["id"] for r in other] == [r["id"] for r in test]  # ids do not depend on it
    assert dm.protocol == "evr"


def test_eval_sentence_out_of_range_names_file_and_row(evr_root):
    with pytest.raises(ValueError, match=r"valid\.json, row 0: eval_sentence=3"):
        make_dm(evr_root, eval_sentence=3).build_records("val")
    assert len(make_dm(evr_root, eval_sentence=3).build_records("train")) == 4


def test_samples_and_dataloaders(evr_root):
    dm = make_dm(evr_root, random_flip=0.0)
    dm.setup()
    assert [len(dm.datasets[s]) for s in ("train", "val", "test")] == [4, 2, 3]
    sample = dm.datasets["val"][1]
    assert sample["id"] == "evr/v-2" and sample["instruction"] == "w1"
    assert sample["references"] == ["w1", "w2", "w3"]
    assert sample["source"].shape == sample["target"].shape == (3, 16, 16)
    batch = next(iter(dm.val_dataloader()))
    assert batch["id"] == ["evr/v-1", "evr/v-2"]
    assert batch["references"] == [["v1", "v2", "v3"], ["w1", "w2", "w3"]]
    assert batch["source"].shape == (2, 3, 16, 16)
    train_ids = []
    for batch in dm.train_dataloader():
        assert batch["target"].shape == (2, 3, 16, 16) and "references" not in batch
        train_ids += batch["id"]
    assert sorted(train_ids) == ["evr/7/0", "evr/7/1", "evr/u1/0", "evr/u3/0"]
    assert collate([dm.datasets["train"][0]])["id"] == ["evr/u1/0"]


def test_images_dir_is_configurable(tmp_path):
    root = write_evr(tmp_path / "flat", images_dir=".")
    dm = make_dm(root, images_dir="")
    dm.setup("test")
    assert dm.datasets["test"][0]["id"] == "evr/t-1"


def test_ids_are_stable(evr_root):
    first = {s: [r["id"] for r in make_dm(evr_root).build_records(s)] for s in ("val", "train")}
    second = {s: [r["id"] for r in make_dm(evr_root).build_records(s)] for s in ("val", "train")}
    assert first == second


def test_missing_file_and_bad_rows(evr_root):
    (evr_root / "valid.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"valid\.json"):
        make_dm(evr_root).build_records("val")
    rows = [dict(TEST[0]), {k: v for k, v in TEST[1].items() if k != "img1"}]
    (evr_root / "test.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=r"test\.json, row 1: missing required key 'img1'"):
        make_dm(evr_root).build_records("test")
    (evr_root / "test.json").write_text(json.dumps([TEST[0], {**TEST[1], "sents": []}]))
    with pytest.raises(ValueError, match=r"test\.json, row 1: 'sents'"):
        make_dm(evr_root).build_records("test")
    (evr_root / "test.json").write_text(json.dumps([TEST[0], {**TEST[1], "uid": "t-1"}]))
    with pytest.raises(ValueError, match=r"rows 0 and 1: duplicate uid 't-1'"):
        make_dm(evr_root).build_records("test")
    (evr_root / "train.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"train\.json: not valid JSON"):
        make_dm(evr_root).build_records("train")


def test_corrupt_image_names_file_and_row(evr_root):
    (evr_root / "images" / "e_1.png").write_bytes(b"\x89PNG broken")
    dm = make_dm(evr_root)
    dm.setup("validate")
    with pytest.raises(BadSampleError, match=r"target image .*e_1\.png \(split 'val', row 1"):
        dm.datasets["val"][1]
    skipping = make_dm(evr_root, on_bad_sample="skip")
    batch = next(iter(skipping.val_dataloader()))
    assert batch["id"] == ["evr/v-1"] and batch["skipped_ids"] == ["evr/v-2"]


def test_expressive_path_joins_by_id(evr_root, tmp_path):
    path = tmp_path / "expressive.jsonl"
    lines = [{"id": "evr/v-1", "expressive": "goal 1"}, {"id": "evr/v-2", "expressive": "goal 2"}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    dm = make_dm(evr_root, expressive_path=str(path))
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["expressive"] == ["goal 1", "goal 2"]
    assert dm.hparams["images_dir"] == "images" and dm.hparams["batch_size"] == 2
