"""IPr2PrDataModule: both native layouts, split rule, missing folders, seeds, bad input."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from datamodules.base import BadSampleError, SkippedSample
from datamodules.ipr2pr import MISSING_REPORT_NAME, IPr2PrDataModule, split_bounds

#: Seed → solid colour of its images, so a sample tells which seed was drawn.
SEED_COLOURS = {11: (230, 20, 20), 22: (20, 230, 20), 33: (20, 20, 230)}


def seed_of(sample: dict) -> int:
    """The seed whose colour the (solid) source image has."""
    mean = ((sample["source"] + 1) * 127.5).mean(dim=(1, 2))
    return list(SEED_COLOURS)[int(mean.argmax())]


def write_original(
    root: Path,
    n: int,
    *,
    missing: tuple[int, ...] = (),
    images: bool = True,
    seeds: tuple[int, ...] = (11, 22, 33),
) -> list[str]:
    """An original-layout IPr2Pr folder with `n` prompts; folders at `missing` not created."""
    root.mkdir(parents=True, exist_ok=True)
    names = [f"{i:07d}" for i in range(n)]
    (root / "seeds.json").write_text(json.dumps([[name, list(seeds)] for name in names]))
    for i, name in enumerate(names):
        if i in missing:
            continue
        folder = root / name
        folder.mkdir()
        prompt = {"edit": f"edit {i}", "input": f"input {i}", "output": f"output {i}"}
        (folder / "prompt.json").write_text(json.dumps(prompt))
        if images:
            for seed in seeds:
                colour = SEED_COLOURS.get(seed, (128, 128, 128))
                Image.new("RGB", (20, 16), colour).save(folder / f"{seed}_0.jpg")
                Image.new("RGB", (20, 16), colour[::-1]).save(folder / f"{seed}_1.jpg")
    return names


def make_dm(root: Path, tmp_path: Path, **overrides) -> IPr2PrDataModule:
    kwargs = {
        "root": str(root),
        "resolution": 16,
        "batch_size": 4,
        "num_workers": 0,
        "random_flip": 0.0,
        "report_dir": str(tmp_path / "reports"),
    }
    kwargs.update(overrides)
    return IPr2PrDataModule(**kwargs)


# --------------------------------------------------------------------------- original layout


def test_split_bounds_hand_computed():
    assert split_bounds(40) == (36, 38)  # 0.9*40 = 36, 0.95*40 = 38
    assert split_bounds(19) == (17, 18)  # floor(17.1), floor(18.05)
    assert split_bounds(313_010) == (281_709, 297_359)


def test_split_rule_on_40_entries(tmp_path):
    names = write_original(tmp_path / "ip2p", 40, images=False)
    dm = make_dm(tmp_path / "ip2p", tmp_path)
    ids = {split: [r["id"] for r in dm.build_records(split)] for split in ("train", "val", "test")}
    assert [len(ids[s]) for s in ("train", "val", "test")] == [36, 2, 2]
    assert ids["train"] == [f"ipr2pr/{n}" for n in names[:36]]
    assert ids["val"] == ["ipr2pr/0000036", "ipr2pr/0000037"]
    assert ids["test"] == ["ipr2pr/0000038", "ipr2pr/0000039"]
    assert dm.missing_prompts == [] and dm.missing_report is None
    assert dm.protocol == "ipr2pr"


def test_missing_folders_reported_and_left_out(tmp_path, caplog):
    root = tmp_path / "ip2p"
    names = write_original(root, 40, missing=(3, 36, 39), images=False)
    dm = make_dm(root, tmp_path)
    with caplog.at_level(logging.WARNING, logger="datamodules.ipr2pr"):
        records = {s: dm.build_records(s) for s in ("train", "val", "test")}
    ids = {s: [r["id"] for r in recs] for s, recs in records.items()}
    # Boundaries come from the full seeds.json: the survivors keep their split and id.
    assert ids["train"] == [f"ipr2pr/{n}" for i, n in enumerate(names[:36]) if i != 3]
    assert ids["val"] == ["ipr2pr/0000037"]
    assert ids["test"] == ["ipr2pr/0000038"]
    assert dm.missing_prompts == ["0000003", "0000036", "0000039"]
    report = tmp_path / "reports" / MISSING_REPORT_NAME
    assert dm.missing_report == report
    assert report.read_text().splitlines() == ["0000003", "0000036", "0000039"]
    assert "3 of 40 prompt folders" in caplog.text


def test_missing_folders_error_mode(tmp_path):
    root = tmp_path / "ip2p"
    write_original(root, 10, missing=(2, 5), images=False)
    dm = make_dm(root, tmp_path, on_missing_prompt="error")
    with pytest.raises(FileNotFoundError, match=r"2 prompt folder\(s\).*0000002, 0000005"):
        dm.build_records("train")
    assert not (tmp_path / "reports").exists()


def test_samples_captions_and_iteration(tmp_path):
    root = tmp_path / "ip2p"
    write_original(root, 20)  # 18 / 1 / 1
    dm = make_dm(root, tmp_path)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 18 and len(dm.datasets["val"]) == 1
    sample = dm.datasets["val"][0]
    assert sample["id"] == "ipr2pr/0000018"
    assert sample["instruction"] == "edit 18"
    assert sample["source_caption"] == "input 18" and sample["goal_caption"] == "output 18"
    assert sample["source"].shape == sample["target"].shape == (3, 16, 16)
    assert sample["source"].min() >= -1 and sample["source"].max() <= 1
    batch = next(iter(dm.train_dataloader()))
    assert batch["source"].shape == batch["target"].shape == (4, 3, 16, 16)
    assert len(batch["instruction"]) == 4 and batch["skipped_ids"] == []
    assert all(i.startswith("ipr2pr/") for i in batch["id"])


def test_random_seed_in_train_fixed_in_test(tmp_path):
    root = tmp_path / "ip2p"
    write_original(root, 20)
    dm = make_dm(root, tmp_path, random_crop=False)
    dm.setup()
    torch.manual_seed(0)
    train_seeds = [seed_of(dm.datasets["train"][0]) for _ in range(20)]
    assert set(train_seeds) == set(SEED_COLOURS)  # all three drawn in 20 accesses
    torch.manual_seed(0)
    assert [seed_of(dm.datasets["train"][0]) for _ in range(20)] == train_seeds  # torch RNG
    test_seeds = {seed_of(dm.datasets["test"][0]) for _ in range(10)}
    assert test_seeds == {11}  # the first seed, always
    assert dm.datasets["test"].resolve(0)["source"].endswith("0000019/11_0.jpg")


def test_ids_stable_across_instances(tmp_path):
    root = tmp_path / "ip2p"
    write_original(root, 20, images=False)
    first = [r["id"] for r in make_dm(root, tmp_path).build_records("train")]
    second = [r["id"] for r in make_dm(root, tmp_path).build_records("train")]
    assert first == second and len(set(first)) == len(first)


def test_bad_seeds_json(tmp_path):
    root = tmp_path / "ip2p"
    root.mkdir()
    with pytest.raises(FileNotFoundError, match="seeds.json"):
        make_dm(root, tmp_path).build_records("train")
    (root / "seeds.json").write_text(json.dumps([["0000000", [1]], ["0000001", []]]))
    with pytest.raises(ValueError, match=r"seeds.json, entry 1"):
        make_dm(root, tmp_path).build_records("train")


def test_missing_prompt_json_or_edit_key(tmp_path):
    root = tmp_path / "ip2p"
    write_original(root, 20)
    (root / "0000000" / "prompt.json").unlink()
    (root / "0000001" / "prompt.json").write_text(json.dumps({"input": "x"}))
    dm = make_dm(root, tmp_path)
    dm.setup("fit")
    train = dm.datasets["train"]
    with pytest.raises(BadSampleError, match=r"0000000/prompt\.json.*row 0"):
        train[0]
    with pytest.raises(BadSampleError, match=r"0000001/prompt\.json: missing required key 'edit'"):
        train[1]
    skipping = make_dm(root, tmp_path, on_bad_sample="skip")
    skipping.setup("fit")
    skipped = skipping.datasets["train"][0]
    assert isinstance(skipped, SkippedSample) and skipped.id == "ipr2pr/0000000"


def test_corrupt_image_names_file_and_row(tmp_path):
    root = tmp_path / "ip2p"
    write_original(root, 20, seeds=(11,))
    (root / "0000002" / "11_1.jpg").write_bytes(b"not a jpeg")
    dm = make_dm(root, tmp_path)
    dm.setup("fit")
    with pytest.raises(BadSampleError, match=r"target image .*0000002/11_1\.jpg.*row 2"):
        dm.datasets["train"][2]


# --------------------------------------------------------------------------- parquet layout


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def random_image(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def parquet_root(tmp_path_factory):
    """Two shards of 3 rows written with `datasets` (images as {bytes, path} structs)."""
    import datasets

    root = tmp_path_factory.mktemp("ip2p_parquet")
    (root / "data").mkdir()
    features = datasets.Features(
        {
            "original_prompt": datasets.Value("string"),
            "original_image": datasets.Image(),
            "edit_prompt": datasets.Value("string"),
            "edited_prompt": datasets.Value("string"),
            "edited_image": datasets.Image(),
        }
    )
    rng = np.random.default_rng(0)
    sources = {}
    for shard in range(2):
        rows = {k: [] for k in features}
        for row in range(3):
            source, edited = random_image(rng), random_image(rng)
            sources[(shard, row)] = source
            rows["original_prompt"].append(f"caption {shard}-{row}")
            rows["original_image"].append({"bytes": png_bytes(source), "path": None})
            rows["edit_prompt"].append(f"edit {shard}-{row}")
            rows["edited_prompt"].append(f"edited caption {shard}-{row}")
            rows["edited_image"].append({"bytes": png_bytes(edited), "path": None})
        table = datasets.Dataset.from_dict(rows, features=features)
        table.to_parquet(str(root / "data" / f"train-0000{shard}-of-00002.parquet"))
    return root, sources


def make_parquet_dm(root: Path, tmp_path: Path, **overrides) -> IPr2PrDataModule:
    kwargs = {
        "layout": "parquet",
        "random_crop": False,
        "parquet_cache_dir": str(root.parent / f"{root.name}_cache"),
    }
    kwargs.update(overrides)
    return make_dm(root, tmp_path, **kwargs)


def test_parquet_round_trip_and_ids(parquet_root, tmp_path):
    root, sources = parquet_root
    dm = make_parquet_dm(root, tmp_path)
    dm.prepare_data()
    assert dm.splits_for("fit") == ("train",)  # no val fraction: fit sets up train only
    dm.setup("fit")
    train = dm.datasets["train"]
    assert len(train) == 6
    assert [train.records[i]["id"] for i in (0, 3, 5)] == [
        "ipr2pr/data/train-00000-of-00002/0",
        "ipr2pr/data/train-00001-of-00002/0",
        "ipr2pr/data/train-00001-of-00002/2",
    ]
    sample = train[4]  # shard 1, row 1
    expected = torch.from_numpy(sources[(1, 1)]).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(sample["source"], expected)
    assert sample["instruction"] == "edit 1-1"
    assert sample["source_caption"] == "caption 1-1"
    assert sample["goal_caption"] == "edited caption 1-1"
    batch = next(iter(dm.train_dataloader()))
    assert batch["source"].shape == (4, 3, 16, 16) and len(batch["id"]) == 4


def test_parquet_held_out_splits(parquet_root, tmp_path):
    root, _ = parquet_root
    dm = make_parquet_dm(root, tmp_path, parquet_val_fraction=0.34, parquet_test_fraction=0.17)
    ids = {s: [r["id"] for r in dm.build_records(s)] for s in ("train", "val", "test")}
    assert [len(ids[s]) for s in ("train", "val", "test")] == [3, 2, 1]  # floor(2.04), floor(1.02)
    assert len(set(ids["train"]) | set(ids["val"]) | set(ids["test"])) == 6
    again = make_parquet_dm(root, tmp_path, parquet_val_fraction=0.34, parquet_test_fraction=0.17)
    assert [r["id"] for r in again.build_records("val")] == ids["val"]  # seeded
    assert dm.splits_for("fit") == ("train", "val")


def test_parquet_empty_split_is_a_clear_error(parquet_root, tmp_path):
    root, _ = parquet_root
    dm = make_parquet_dm(root, tmp_path)
    with pytest.raises(ValueError, match="split 'val'.*parquet_val_fraction > 0"):
        dm.val_dataloader()
    with pytest.raises(ValueError, match="must be below 1"):
        make_parquet_dm(root, tmp_path, parquet_val_fraction=0.5, parquet_test_fraction=0.5)


def test_parquet_corrupt_image_and_missing_column(tmp_path):
    root = tmp_path / "pq"
    root.mkdir()
    good = png_bytes(random_image(np.random.default_rng(1)))
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "original_prompt": ["a", "b"],
            "original_image": pa.array(
                [{"bytes": good, "path": None}, {"bytes": b"garbage", "path": None}], type=image
            ),
            "edit_prompt": ["make it red", "make it blue"],
            "edited_prompt": ["a red", "b blue"],
            "edited_image": pa.array([{"bytes": good, "path": None}] * 2, type=image),
        }
    )
    pq.write_table(table, root / "shard.parquet")
    dm = make_parquet_dm(root, tmp_path)
    dm.setup("fit")
    assert dm.datasets["train"][0]["instruction"] == "make it red"  # plain pyarrow structs work
    with pytest.raises(BadSampleError, match=r"source image .*shard\.parquet, row 1"):
        dm.datasets["train"][1]

    (root / "shard.parquet").unlink()
    pq.write_table(table.drop_columns(["edit_prompt"]), root / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet: missing column\(s\) \['edit_prompt'\]"):
        make_parquet_dm(root, tmp_path).build_records("train")


# --------------------------------------------------------------------------- shared fields


def test_expressive_path_joins_by_stable_id(tmp_path):
    root = tmp_path / "ip2p"
    write_original(root, 20, seeds=(11,))
    path = tmp_path / "expressive.jsonl"
    path.write_text(json.dumps({"id": "ipr2pr/0000019", "expressive": "goal 19"}) + "\n")
    dm = make_dm(root, tmp_path, expressive_path=str(path))
    dm.setup("test")
    assert dm.datasets["test"][0]["expressive"] == "goal 19"
    assert dm.hparams["expressive_path"] == str(path) and dm.hparams["layout"] == "original"


def test_every_field_is_visible_to_the_cli_parser():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(IPr2PrDataModule, "data")
    cfg = parser.parse_args(["--data.root=/x", "--data.batch_size=3", "--data.layout=parquet"])
    for key in ("batch_size", "expressive_path", "on_missing_prompt", "report_dir"):
        assert key in cfg.data
    assert "parquet_val_fraction" in parser.format_help()


def per_seed_file(path: Path, ids: list[str], seeds: tuple[int, ...]) -> None:
    """One expressive line per (id, seed), as `data expressive` writes for this layout."""
    lines = [
        json.dumps({"id": i, "seed": s, "expressive": f"{i} pair {s}"}) for i in ids for s in seeds
    ]
    path.write_text("".join(line + "\n" for line in lines))


def test_train_sample_expressive_belongs_to_the_drawn_pair(tmp_path):
    """Per-seed instructions for seeds 11 and 22 only: training draws only those two pairs
    (never 33, which has no instruction), and each sample's `expressive` and `seed` are those
    of the pair whose images it returns (told apart by colour), also through the loader."""
    root = tmp_path / "ip2p"
    names = write_original(root, 20)
    path = tmp_path / "expressive.jsonl"
    per_seed_file(path, [f"ipr2pr/{n}" for n in names[:19]], (11, 22))  # train and val
    dm = make_dm(root, tmp_path, expressive_path=str(path), batch_size=6)
    dm.setup("fit")
    train = dm.datasets["train"]
    assert [r["seeds"] for r in train.records] == [[11, 22]] * 18
    torch.manual_seed(0)
    drawn = set()
    for _ in range(3):
        for i in range(len(train)):
            sample = train[i]
            assert seed_of(sample) == sample["seed"]
            assert sample["expressive"] == f"{sample['id']} pair {sample['seed']}"
            drawn.add(sample["seed"])
    assert drawn == {11, 22}
    batch = next(iter(dm.train_dataloader()))
    assert batch["expressive"] == [
        f"{i} pair {s}" for i, s in zip(batch["id"], batch["seed"], strict=True)
    ]


def test_eval_uses_the_first_pair_with_an_instruction(tmp_path):
    root = tmp_path / "ip2p"
    names = write_original(root, 20)
    path = tmp_path / "expressive.jsonl"
    per_seed_file(path, [f"ipr2pr/{names[19]}"], (22, 33))
    dm = make_dm(root, tmp_path, expressive_path=str(path))
    sample = dm.make_dataset("test")[0]
    assert sample["seed"] == 22 and seed_of(sample) == 22
    assert sample["expressive"] == f"ipr2pr/{names[19]} pair 22"


def test_prompt_without_an_instructed_pair_is_missing(tmp_path):
    root = tmp_path / "ip2p"
    names = write_original(root, 20)
    path = tmp_path / "expressive.jsonl"
    # seed 44 is not one of the folder's seeds: no pair of 0000019 has an instruction
    path.write_text(json.dumps({"id": f"ipr2pr/{names[19]}", "seed": 44, "expressive": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"no expressive instruction for 1 of the 1 'test'"):
        make_dm(root, tmp_path, expressive_path=str(path)).make_dataset("test")


def test_id_with_and_without_seed_is_an_error_naming_the_line(tmp_path):
    root = tmp_path / "ip2p"
    write_original(root, 20)
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        json.dumps({"id": "ipr2pr/0000019", "seed": 11, "expressive": "a"})
        + "\n"
        + json.dumps({"id": "ipr2pr/0000019", "expressive": "b"})
        + "\n"
    )
    with pytest.raises(ValueError, match=r"mixed\.jsonl, line 2: id 'ipr2pr/0000019' is written"):
        make_dm(root, tmp_path, expressive_path=str(path)).make_dataset("test")
