"""Every loader on the shared native-layout fixtures (tests/fixtures/layouts.py), including the
structures of the real releases that broke them: GIER's repeated inputs, unequal pairs,
`"ids": []` and bare `NaN`; EVR's unequal pairs; IPr2Pr's `caption` key; a GIER without
`masks/`."""

from __future__ import annotations

import importlib
import json
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from fixtures.layouts import COUNTS, GIER_PAIRS, SIZE, WRITERS, datamodule_config
from PIL import Image

datasets.disable_progress_bars()


def build(name: str, root: Path, **overrides):
    config = datamodule_config(name, root)
    module, _, cls = config["class_path"].rpartition(".")
    kwargs = config["init_args"] | {"resolution": 16, "batch_size": 4, "num_workers": 0}
    if name == "magicbrush":
        kwargs["cache_dir"] = str(root / "hf_cache")
    return getattr(importlib.import_module(module), cls)(**(kwargs | overrides))


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("layouts")
    return {name: writer(base / name) for name, writer in WRITERS.items()}


@pytest.mark.parametrize("name", list(WRITERS))
def test_every_layout_loads_with_native_images(roots, name):
    dm = build(name, roots[name])
    for split, count in COUNTS[name].items():
        records = dm.build_records(split)
        ids = [r["id"] for r in records]
        assert len(ids) == count and len(set(ids)) == count, (split, Counter(ids).most_common(2))
    dm.setup("test")
    batches = list(dm.test_dataloader())
    assert sum(len(b["id"]) for b in batches) == COUNTS[name]["test"]
    for batch in batches:
        n = len(batch["id"])
        assert batch["source"].shape == batch["target"].shape == (n, 3, 16, 16)
        assert all(i.strip() for i in batch["instruction"])
        for key in ("source_native", "target_native"):
            assert isinstance(batch[key], list) and len(batch[key]) == n
            assert all(t.dtype == torch.uint8 and t.shape[0] == 3 for t in batch[key])
        for s, t in zip(batch["source_native"], batch["target_native"], strict=True):
            assert s.shape == t.shape  # unequal targets come resized to the source
        if "mask" in batch:
            assert [m.shape[-2:] for m in batch["mask_native"]] == [
                s.shape[-2:] for s in batch["source_native"]
            ]
    train = next(iter(dm.train_dataloader()))
    assert len(train["id"]) == 4 and not any(k.endswith("_native") for k in train)


# --------------------------------------------------------------------------- GIER


def test_gier_fixture_has_the_release_structures(roots):
    root = roots["gier"]
    for split, pairs in GIER_PAIRS.items():
        rows = json.loads((root / "splits" / f"{split}_sess_3.json").read_text())
        assert len(rows) == pairs
        assert len({r["input"] for r in rows}) < pairs  # an input reused
        assert len({r["output"] for r in rows}) == pairs
        empty = [op for r in rows for op in r["operator"].values() if op["local"] and not op["ids"]]
        assert empty  # `"ids": []`
        aligned = json.loads((root / "splits" / f"{split}_shapeAlign_sess_3.json").read_text())
        assert len(aligned) < pairs  # unequal pairs
    assert '"detailed_request": NaN' in (root / "splits" / "train_sess_3.json").read_text()


def test_gier_repeated_inputs_empty_ids_nan_and_unequal_pairs(roots):
    root = roots["gier"]
    dm = build("gier", root)
    records = {r["id"]: r for r in dm.build_records("train")}
    # ids by output: two pairs of input aa1_aa1 keep distinct ids
    assert {i.split("/")[1] for i in records} == {
        "aa1_Xo1", "aa1_Xo2", "bb2_Yo1", "cc3_Zo1", "dd4_Wo1",
    }  # fmt: skip
    assert records["gier/aa1_Xo1/expert/0"]["detailed_request"] is None  # bare NaN
    assert records["gier/aa1_Xo2/expert/0"]["detailed_request"] == "details"
    dm.setup("test")
    for split in ("train", "val", "test"):
        dataset = dm.make_dataset(split)
        dataset.native = True
        for index in range(len(dataset)):
            sample = dataset[index]
            pair = sample["id"].split("/")[1]
            source = sample["source_native"].float()
            target = sample["target_native"].float()
            mask = sample["mask_native"][0].bool()
            assert source.shape == target.shape == (3, SIZE[1], SIZE[0])
            if pair in ("cc3_Zo1", "ff6_Uo1", "hh8_So1"):  # every local `ids` empty
                assert not mask.any(), pair
            elif pair in ("aa1_Xo2", "ee5_Vo2", "gg7_To2"):  # global only
                assert mask.all(), pair
            else:  # the fixture inverts the image on the union of the named regions
                change = (target - source).abs().mean(0) / 255
                assert mask.any() and not mask.all(), pair
                assert change[mask].mean() > 0.2 and change[~mask].mean() < 0.03, pair
    # the unequal pair: the target file is 48x36, its sample the input's 40x32
    assert Image.open(root / "images" / "bb2_Yo1.jpg").size == (48, 36)


def test_gier_without_masks_folder_loads_and_collates(tmp_path, caplog):
    root = WRITERS["gier"](tmp_path / "gier", masks=False)
    with caplog.at_level("WARNING", logger="datamodules.gier"):
        dm = build("gier", root, batch_size=9)
        dm.setup("fit")
    assert "no mask file" in caplog.text
    batch = next(iter(dm.train_dataloader()))  # global, empty and local pairs together
    assert len(batch["id"]) == 9 and "mask" not in batch and "mask_native" not in batch
    dm.setup("test")
    assert sum(len(b["id"]) for b in dm.test_dataloader()) == COUNTS["gier"]["test"]
    with pytest.raises(FileNotFoundError, match="require_masks"):
        build("gier", root, require_masks=True).build_records("train")


def test_gier_subsets_from_the_index_files(roots):
    dm = build("gier", roots["gier"], subsets=["shapeAlign"])
    kept = {r["id"].split("/")[1] for r in dm.build_records("train")}
    assert kept == {"aa1_Xo1", "aa1_Xo2", "cc3_Zo1", "dd4_Wo1"}  # not the unequal bb2 pair


def test_gier_without_quirks_is_plain(tmp_path):
    root = WRITERS["gier"](tmp_path / "plain", quirks=False)
    rows = json.loads((root / "splits" / "train_sess_3.json").read_text())
    assert "NaN" not in (root / "splits" / "train_sess_3.json").read_text()
    assert all(op["ids"] for r in rows for op in r["operator"].values() if op["local"])
    assert len({r["input"] for r in rows}) == len(rows)
    assert len(build("gier", root).build_records("train")) == COUNTS["gier"]["train"]


# --------------------------------------------------------------------------- others


def test_evr_unequal_pair_and_reused_input(roots):
    root = roots["evr"]
    rows = json.loads((root / "train.json").read_text())
    assert rows[0]["img0"] == rows[1]["img0"] and rows[0]["img1"] != rows[1]["img1"]
    assert Image.open(root / "images" / rows[2]["img1"]).size == (48, 36)
    sample = build("evr", root).make_dataset("val")[2]  # the val pair with a 48x36 target
    assert sample["target_native"].shape == sample["source_native"].shape == (3, 32, 40)
    assert len(sample["references"]) == 3


def test_ipr2pr_reads_input_or_caption(tmp_path):
    root = WRITERS["ipr2pr"](tmp_path / "ip2p", num_prompts=20, caption_key="caption")
    assert "caption" in json.loads((root / "0000019_prompt" / "prompt.json").read_text())
    sample = build("ipr2pr", root).make_dataset("test")[0]
    assert sample["source_caption"] == "a photo number 19"
    assert sample["goal_caption"] == "a bright photo number 19"
    assert sample["instruction"] == "make photo 19 brighter"


def test_folder_unequal_target_and_mask(roots):
    dm = build("folder", roots["folder"])
    sample = dm.make_dataset("val")[1]  # its target file is 48x36
    assert sample["target_native"].shape == sample["source_native"].shape == (3, 32, 40)
    assert sample["mask_native"].shape == (1, 32, 40)
    manifest = (roots["folder"] / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == sum(COUNTS["folder"].values())


def test_ma5k_split_files_carry_request_idx(roots):
    entries = json.loads((roots["ma5k"] / "annotations" / "train_sess_1.json").read_text())
    assert all("request_idx" in e for e in entries)
    stems = {r["id"] for r in build("ma5k", roots["ma5k"]).build_records("test")}
    assert len(stems) == 5 and all(i.startswith("ma5k/") for i in stems)


def test_magicbrush_test_folder_masks_match_edits(roots):
    dm = build("magicbrush", roots["magicbrush"])
    dataset = dm.make_dataset("test")
    for index in range(len(dataset)):
        sample = dataset[index]
        changed = (sample["source_native"] != sample["target_native"]).any(0)
        assert torch.equal(changed, sample["mask_native"][0].bool())  # PNG: lossless
    assert np.array_equal(
        [r["turn"] for r in dataset.records], [1, 2, 3, 1, 1]
    )  # sessions 301 (3 turns), 302, 303
