"""ConcatEditDataModule: several datasets as one, with a mask in only some of them."""

from __future__ import annotations

import json

import pytest

from datamodules.concat import ConcatEditDataModule
from datamodules.synthetic import SyntheticEditDataModule


def member(root, **kwargs):
    return SyntheticEditDataModule(root=str(root), resolution=32, num_train=64, num_val=16, num_test=16, **kwargs)


def test_union_of_members_with_and_without_masks(synthetic_root, tmp_path):
    # A copy of the synthetic data whose manifests have no masks and other ids.
    other = tmp_path / "nomask"
    other.mkdir()
    (other / "meta.json").write_text((synthetic_root / "meta.json").read_text())
    (other / "images").symlink_to(synthetic_root / "images")
    for split in ("train", "val", "test"):
        rows = [json.loads(line) for line in (synthetic_root / f"{split}.jsonl").read_text().splitlines()]
        rows = [{k: v for k, v in r.items() if k != "mask"} | {"id": "other/" + r["id"]} for r in rows]
        (other / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = ConcatEditDataModule([member(synthetic_root), member(other)], resolution=32, batch_size=128, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 128 and len(dm.datasets["val"]) == 32
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["id"]) == 128 and len(set(batch["id"])) == 128
    assert "mask" not in batch and batch["source"].shape == (128, 3, 32, 32)
    masked_only = ConcatEditDataModule([member(synthetic_root)], resolution=32, batch_size=8, num_workers=0)
    masked_only.setup("test")
    assert "mask" in next(iter(masked_only.test_dataloader()))


def test_resolution_mismatch_names_the_member(synthetic_root):
    with pytest.raises(ValueError, match="resolution 32"):
        ConcatEditDataModule([member(synthetic_root)], resolution=64)
