"""The loaders on the REAL annotation files, when `EDITBENCH_REAL_RELEASES` points at them.

The project ships no excerpt of the releases. To run these tests, copy the files (e.g. with
`git show HEAD:<path>` in clones of the two repositories) into::

    $EDITBENCH_REAL_RELEASES/evr/{train,valid,test}.json         airsplay/VisualRelationships
                                                                  dataset/adobe/
    $EDITBENCH_REAL_RELEASES/gier/splits/*_sess_3.json           jshi31/T2ONet data/GIER/splits/
    $EDITBENCH_REAL_RELEASES/ma5k/FiveK.json, annotations/*.json jshi31/T2ONet data/FiveK/

Counts and ids need only the JSON files. Where image files (and GIER `masks/`) are present,
e.g. placeholders written at the referenced names, the samples the release's quirks touch
(unequal pairs, `"ids": []`) are also decoded and collated.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from datamodules.base import collate
from datamodules.evr import EVRDataModule
from datamodules.gier import PUBLISHED_PAIRS, PUBLISHED_SAMPLES, GIERDataModule
from datamodules.ma5k import MA5kDataModule

REAL = os.environ.get("EDITBENCH_REAL_RELEASES")
pytestmark = pytest.mark.skipif(not REAL, reason="EDITBENCH_REAL_RELEASES is not set")
SPLITS = ("train", "val", "test")
#: Published in the EVR paper / release: pairs (= rows; val/test give one sample per pair)
#: and instructions (one sentence per train pair, three per val/test pair): 5,695 in all.
EVR_PAIRS = {"train": 3061, "val": 383, "test": 495}
MA5K_SAMPLES = {"train": 17325, "val": 2475, "test": 4950}
#: Checked on the release (REFERENCE.md): inputs in 2+ train pairs; pairs absent from the
#: shapeAlign index (unequal sizes); local operator entries with `"ids": []`.
GIER_REPEATED_TRAIN_INPUTS = 949
GIER_UNEQUAL = {"train": 1164, "val": 130, "test": 164}
GIER_EMPTY_IDS = {"train": 27, "val": 4, "test": 1}


def root(name: str) -> Path:
    path = Path(REAL) / name
    if not path.is_dir():
        pytest.skip(f"{path} not found")
    return path


def load_some(dm, split: str, records: list[dict], indices: list[int]) -> dict | None:
    """Decode and collate the samples at `indices` when their image files are present."""
    if not all(Path(records[i]["source"]).is_file() for i in indices):
        return None
    dataset = dm.make_dataset(split)
    dataset.native = True  # the train split too
    return collate([dataset[i] for i in indices])


def test_evr_counts_and_ids():
    dm = EVRDataModule(root=str(root("evr")), resolution=16, num_workers=0)
    instructions = 0
    for split in SPLITS:
        records = dm.build_records(split)
        ids = [r["id"] for r in records]
        assert len(ids) == EVR_PAIRS[split] and len(set(ids)) == len(ids)
        instructions += len(records) if split == "train" else 3 * len(records)
        assert dm.published_counts[split] == len(records)
    assert instructions == 5695


def test_gier_counts_ids_and_quirks():
    path = root("gier")
    dm = GIERDataModule(root=str(path), resolution=16, num_workers=0)
    for split in SPLITS:
        pairs = json.loads((path / "splits" / f"{split}_sess_3.json").read_text())
        records = dm.build_records(split)
        ids = [r["id"] for r in records]
        assert len(pairs) == PUBLISHED_PAIRS[split]
        assert len(ids) == PUBLISHED_SAMPLES[split] and len(set(ids)) == len(ids)
        assert len({r["pair_row"] for r in records}) == PUBLISHED_PAIRS[split]
        aligned = set(json.loads((path / "splits" / f"{split}_shapeAlign_sess_3.json").read_text()))
        unequal = [i for i in range(len(pairs)) if i not in aligned]
        assert len(unequal) == GIER_UNEQUAL[split]
        empty = [
            (row, name)
            for row, p in enumerate(pairs)
            for name, op in p["operator"].items()
            if op["local"] and op["ids"] == []
        ]
        assert len(empty) == GIER_EMPTY_IDS[split]
        if split == "train":
            repeated = Counter(p["input"] for p in pairs)
            assert sum(n > 1 for n in repeated.values()) == GIER_REPEATED_TRAIN_INPUTS
            assert any(isinstance(p["detailed_request"], float) for p in pairs)  # bare NaN
        # decode the quirky samples where images are present
        first = {}
        for i, r in enumerate(records):
            first.setdefault(r["pair_row"], i)
        picks = [first[row] for row in unequal[:3]] + [first[row] for row, _ in empty[:3]]
        batch = load_some(dm, split, records, picks)
        if batch is not None:
            assert len(batch["id"]) == len(picks)
            for s, t in zip(batch["source_native"], batch["target_native"], strict=True):
                assert s.shape == t.shape


def test_ma5k_counts_and_ids():
    dm = MA5kDataModule(root=str(root("ma5k")), resolution=16, num_workers=0)
    for split in SPLITS:
        records = dm.build_records(split)
        ids = [r["id"] for r in records]
        assert len(ids) == MA5K_SAMPLES[split] and len(set(ids)) == len(ids)
        batch = load_some(dm, split, records, [0, len(records) - 1])
        if batch is not None:
            assert batch["source"].shape == (2, 3, 16, 16)
