"""`expressive_path`: expressive instructions joined to any dataset by sample id."""

from __future__ import annotations

import json

import pytest

from datamodules.synthetic import SyntheticEditDataModule


def make(root, **kwargs) -> SyntheticEditDataModule:
    dm = SyntheticEditDataModule(
        root=str(root),
        resolution=32,
        num_train=64,
        num_val=16,
        num_test=16,
        batch_size=4,
        num_workers=0,
        **kwargs,
    )
    dm.prepare_data()
    return dm


def test_expressive_path_fills_every_sample_by_id(synthetic_root, tmp_path):
    ids = [
        json.loads(line)["id"] for line in (synthetic_root / "test.jsonl").read_text().splitlines()
    ]
    path = tmp_path / "expressive.jsonl"
    path.write_text(
        "".join(json.dumps({"id": i, "expressive": f"goal of {i}"}) + "\n" for i in reversed(ids))
    )
    dm = make(synthetic_root, expressive_path=str(path))
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch["expressive"] == [f"goal of {i}" for i in batch["id"]]
    assert dm.hparams["expressive_path"] == str(path) and dm.hparams["num_train"] == 64


def test_missing_id_is_an_error_naming_it_unless_kept(synthetic_root, tmp_path):
    ids = [
        json.loads(line)["id"] for line in (synthetic_root / "test.jsonl").read_text().splitlines()
    ]
    path = tmp_path / "partial.jsonl"
    path.write_text("".join(json.dumps({"id": i, "expressive": "x"}) + "\n" for i in ids[1:]))
    with pytest.raises(ValueError, match=ids[0]):
        make(synthetic_root, expressive_path=str(path)).setup("test")
    dm = make(synthetic_root, expressive_path=str(path), on_missing_expressive="keep")
    dm.setup("test")
    first = dm.datasets["test"][0]
    assert first["id"] == ids[0] and first["expressive"] != "x"  # kept the dataset's own


def test_malformed_expressive_file_names_file_and_line(synthetic_root, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "expressive": "x"}\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: missing required key 'expressive'"):
        make(synthetic_root, expressive_path=str(path)).setup("test")


def test_per_seed_lines_on_a_dataset_without_seeds_are_an_error(synthetic_root, tmp_path):
    ids = [
        json.loads(line)["id"] for line in (synthetic_root / "test.jsonl").read_text().splitlines()
    ]
    path = tmp_path / "seeds.jsonl"
    path.write_text(
        "".join(json.dumps({"id": i, "seed": 1, "expressive": "x"}) + "\n" for i in ids)
    )
    with pytest.raises(ValueError, match=rf"id '{ids[0]}' has per-seed expressive instructions"):
        make(synthetic_root, expressive_path=str(path)).setup("test")
