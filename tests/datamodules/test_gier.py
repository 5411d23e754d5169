"""GIERDataModule on a tiny GIER in its native layout, and COCO RLE decoding (pycocotools)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.base import BadSampleError
from datamodules.gier import GIERDataModule
from datamodules.rle import decode_rle, union_rles

# --------------------------------------------------------------------------- a test encoder


def runs_of(mask: np.ndarray) -> list[int]:
    """Run lengths of a 0/1 [h, w] mask, column by column, starting with a run of 0s."""
    flat = [int(v) for v in mask.T.reshape(-1)]  # column-major
    runs, current, length = [], 0, 0
    for v in flat:
        if v == current:
            length += 1
        else:
            runs.append(length)
            current, length = v, 1
    runs.append(length)
    return runs


def encode_string(runs: list[int]) -> str:
    """COCO's compressed counts string, written from the format description."""
    out = []
    for i, run in enumerate(runs):
        x = run - runs[i - 2] if i > 2 else run
        while True:
            chunk = x & 0x1F
            x >>= 5  # arithmetic shift: negative numbers stay negative
            more = x != -1 if chunk & 0x10 else x != 0
            out.append(chr(48 + (chunk | 0x20 if more else chunk)))
            if not more:
                break
    return "".join(out)


def rle(mask: np.ndarray, compressed: bool) -> dict:
    runs = runs_of(mask)
    return {"size": list(mask.shape), "counts": encode_string(runs) if compressed else runs}


# --------------------------------------------------------------------------- RLE decoding


def test_hand_encoded_rles():
    # counts [1, 2, 3] over 2x3, column-major: column 0 = (0, 1), column 1 = (1, 0), column 2 = 0
    expected = np.array([[0, 1, 0], [1, 0, 0]], dtype=np.uint8)
    assert np.array_equal(decode_rle({"size": [2, 3], "counts": [1, 2, 3]}), expected)
    assert np.array_equal(decode_rle({"size": [2, 3], "counts": "123"}), expected)
    # "053M": runs [0, 5, 3, 2]; "M" = 48 + 29 is the 5-bit value -3 (sign bit 0x10), stored
    # as 2 - 5 for the fourth run. Over 2x5 column-major: 5 ones, 3 zeros, 2 ones.
    expected = np.array([[1, 1, 1, 0, 1], [1, 1, 0, 0, 1]], dtype=np.uint8)
    assert np.array_equal(decode_rle({"size": [2, 5], "counts": "053M"}), expected)
    assert np.array_equal(decode_rle({"size": [2, 5], "counts": b"053M"}), expected)
    # 100 = 4 + 3 * 32: "T" = 48 + (4 | 0x20 continuation), "3" = 48 + 3: 100 zeros
    assert np.array_equal(decode_rle({"size": [10, 10], "counts": "T3"}), np.zeros((10, 10)))


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (16, 24), (31, 3)])
def test_rle_round_trip_both_forms(shape):
    rng = np.random.default_rng(sum(shape))
    masks = [
        np.zeros(shape, np.uint8),
        np.ones(shape, np.uint8),  # starts with an empty run of 0s
        (rng.random(shape) < 0.5).astype(np.uint8),
        (rng.random(shape) < 0.05).astype(np.uint8),
    ]
    big = np.zeros((40, 50), np.uint8)
    big[3:37, 10:45] = 1  # long runs: multi-chunk values and large negative deltas
    for mask in [*masks, big]:
        for compressed in (False, True):
            decoded = decode_rle(rle(mask, compressed))
            assert decoded.dtype == np.uint8 and np.array_equal(decoded, mask)


def test_rle_errors_and_union():
    with pytest.raises(ValueError, match="cover 5 pixels"):
        decode_rle({"size": [2, 3], "counts": [1, 4]})
    with pytest.raises(ValueError, match="size"):
        decode_rle({"counts": [1]})
    with pytest.raises(ValueError, match="negative"):
        decode_rle({"size": [2, 3], "counts": [7, -1]})
    # pycocotools itself rejects an undecodable string; one that decodes to another number of
    # pixels (here 5 of 6) is caught by the canonical re-encoding check
    with pytest.raises(ValueError):
        decode_rle({"size": [2, 3], "counts": " "})
    with pytest.raises(ValueError, match="does not describe a 2x3 mask"):
        decode_rle({"size": [2, 3], "counts": "14"})
    a, b = np.zeros((4, 5), np.uint8), np.zeros((4, 5), np.uint8)
    a[0, :2], b[3, 4] = 1, 1
    rles = [rle(a, True), rle(b, False), rle(np.ones((4, 5), np.uint8), True)]
    assert np.array_equal(union_rles(rles, [0, 1]), a | b)
    assert union_rles(rles).all()
    with pytest.raises(IndexError, match="mask id 3"):
        union_rles(rles, [3])
    # `"ids": []`: an empty mask of the file's size (T2ONet's union of no regions)
    assert np.array_equal(union_rles(rles, []), np.zeros((4, 5), np.uint8))
    assert union_rles([], [], size=(2, 3)).shape == (2, 3)
    with pytest.raises(ValueError, match="sizes differ"):
        union_rles([rles[0], rle(np.ones((2, 2), np.uint8), True)])


# --------------------------------------------------------------------------- a tiny GIER

H, W = 16, 24  # every image; masks align with them


def region(top: int, bottom: int, left: int, right: int, shape=(H, W)) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[top:bottom, left:right] = 1
    return mask


MASKS = {  # input stem → candidate regions of its mask file
    "a_in": [region(0, 4, 0, 6), region(4, 12, 4, 10)],
    "d_in": [region(2, 6, 2, 8)],  # written as a single RLE dict
    "e_in": [region(8, 16, 12, 24)],
    "g_in": [region(0, 8, 0, 8), region(8, 16, 16, 24)],
}


def pair(name, operator, expert, amateur, detailed="details", ext="png"):
    return {
        "input": f"{name}_in.{ext}",
        "output": f"{name}_out.{ext}",
        "request": f"request {name}",
        "detailed_request": detailed,
        "dataset": "zhopped",
        "operator": operator,
        "expert_summary": expert,
        "amateur_summary": amateur,
    }


LOCAL = {"local": True, "ids": [1]}
GLOBAL = {"local": False, "ids": []}
SPLITS = {
    "train": [
        pair(
            "a", {"inpaint_obj": LOCAL, "brightness": GLOBAL}, ["erase it", "remove it"], ["gone"]
        ),
        pair("b", {"brightness": GLOBAL}, ["brighter"], ["more light"], detailed=float("nan")),
        pair("c", {"color_bg": {"local": True, "ids": [0]}}, ["blue background"], []),
        pair("d", {"tint": {"local": True}}, ["warm tint", float("nan"), "tint it"], [], ext="jpg"),
    ],
    "val": [pair("e", {"inpaint_obj": {"local": True, "ids": [0]}}, ["x"], ["y", "z"])],
    "test": [
        pair("f", {"contrast": GLOBAL}, ["more contrast"], []),
        pair("g", {"inpaint_obj": {"local": True, "ids": [0, 1]}}, ["remove two"], ["bye"]),
    ],
}
COUNTS = {"train": 3 + 2 + 1 + 2, "val": 3, "test": 3}


def write_image(path: Path, mask: np.ndarray | None = None) -> None:
    """White inside `mask` (when given), black outside; otherwise a gradient."""
    if mask is None:
        array = np.broadcast_to(np.linspace(0, 255, W, dtype=np.uint8), (H, W))
    else:
        array = mask * 255
    Image.fromarray(np.stack([array] * 3, -1).astype(np.uint8)).save(path)


@pytest.fixture
def gier_root(tmp_path) -> Path:
    root = tmp_path / "gier"
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True)
    for split, pairs in SPLITS.items():
        for p in pairs:
            stem = Path(p["input"]).stem
            union = None
            if stem in MASKS:
                regions = MASKS[stem]
                ids = [
                    i
                    for spec in p["operator"].values()
                    if spec["local"]
                    for i in spec.get("ids", range(len(regions)))
                ]
                union = np.max([regions[i] for i in ids], axis=0)
                rles = [rle(m, compressed=i % 2 == 0) for i, m in enumerate(regions)]
                data = rles[0] if len(rles) == 1 else rles
                (root / "masks" / f"{stem}_mask.json").write_text(json.dumps(data))
            write_image(root / "images" / p["input"], union)
            write_image(root / "images" / p["output"])
        (root / "splits" / f"{split}_sess_3.json").write_text(json.dumps(pairs))
    (root / "splits" / "train_global_sess_3.json").write_text(json.dumps([1, 3]))
    return root


def make_dm(root, **overrides) -> GIERDataModule:
    kwargs = {"root": str(root), "resolution": 8, "batch_size": 2, "num_workers": 0}
    kwargs.update(overrides)
    return GIERDataModule(**kwargs)


# --------------------------------------------------------------------------- records


def test_native_json_has_bare_nan(gier_root):
    text = (gier_root / "splits" / "train_sess_3.json").read_text()
    assert '"detailed_request": NaN' in text


def test_one_sample_per_summary_and_counts(gier_root):
    dm = make_dm(gier_root)
    assert dm.protocol == "gier"
    for split, count in COUNTS.items():
        assert len(dm.build_records(split)) == count
    records = dm.build_records("train")
    assert [r["id"] for r in records] == [  # named by the output image
        "gier/a_out/expert/0", "gier/a_out/expert/1", "gier/a_out/amateur/0",
        "gier/b_out/expert/0", "gier/b_out/amateur/0",
        "gier/c_out/expert/0",
        "gier/d_out/expert/0", "gier/d_out/expert/2",  # the NaN summary is skipped, k is kept
    ]  # fmt: skip
    assert [r["instruction"] for r in records[:3]] == ["erase it", "remove it", "gone"]
    by_id = {r["id"]: r for r in records}
    assert by_id["gier/b_out/expert/0"]["detailed_request"] is None  # bare NaN → absent
    assert by_id["gier/a_out/expert/0"]["detailed_request"] == "details"
    assert by_id["gier/a_out/expert/0"]["request"] == "request a"
    assert records[0]["source"] == str(gier_root / "images" / "a_in.png")
    assert records[0]["target"] == str(gier_root / "images" / "a_out.png")


def test_ids_are_stable_and_unique(gier_root):
    first = [r["id"] for r in make_dm(gier_root).build_records("train")]
    again = [r["id"] for r in make_dm(gier_root).build_records("train")]
    assert first == again and len(set(first)) == len(first)
    filtered = [r["id"] for r in make_dm(gier_root, local_only=True).build_records("train")]
    assert set(filtered) < set(first)


def test_subset_filters(gier_root):
    def stems(**kw):
        return sorted(
            {r["id"].split("/")[1] for r in make_dm(gier_root, **kw).build_records("train")}
        )

    assert stems(operators=["brightness"]) == ["a_out", "b_out"]
    assert stems(operators=["tint", "color_bg"]) == ["c_out", "d_out"]
    assert stems(local_only=True) == ["a_out", "c_out", "d_out"]
    assert stems(local_only=False) == ["b_out"]
    assert stems(subsets=["global"]) == ["b_out", "d_out"]  # rows in train_global_sess_3.json
    assert stems(subsets=["global"], local_only=True) == ["d_out"]
    assert stems(operators=["nothing"]) == []
    with pytest.raises(ValueError, match="unknown GIER subsets"):
        make_dm(gier_root, subsets=["nope"])
    with pytest.raises(FileNotFoundError, match="val_shapeAlign_sess_3.json"):
        make_dm(gier_root, subsets=["shapeAlign"]).build_records("val")


# --------------------------------------------------------------------------- masks


C_REGION = region(2, 10, 3, 9)


def add_c_mask(root: Path) -> None:
    """The mask file the fixture leaves out (so the train split can have masks)."""
    (root / "masks" / "c_in_mask.json").write_text(json.dumps([rle(C_REGION, False)]))


def test_masks_are_the_union_of_local_regions(gier_root):
    add_c_mask(gier_root)
    # train and eval: shorter side already H (a no-op resize), then the centre crop
    dm = make_dm(gier_root, resolution=H, random_crop=False, eval_resize="center_crop")
    c_region = C_REGION
    dataset = dm.make_dataset("train")
    samples = {dataset[i]["id"]: dataset[i] for i in range(len(dataset))}
    crop = slice((W - H) // 2, (W - H) // 2 + H)
    # a: the local operator names region 1 only (the global one adds nothing)
    assert torch.equal(
        samples["gier/a_out/expert/0"]["mask"][0],
        torch.from_numpy(MASKS["a_in"][1][:, crop]).float(),
    )
    # b: global only → the whole image
    assert samples["gier/b_out/amateur/0"]["mask"].eq(1).all()
    # c: ids [0] of its (uncompressed) file
    assert torch.equal(
        samples["gier/c_out/expert/0"]["mask"][0], torch.from_numpy(c_region[:, crop]).float()
    )
    # d: a single RLE dict and a local operator without ids → that region
    assert torch.equal(
        samples["gier/d_out/expert/2"]["mask"][0],
        torch.from_numpy(MASKS["d_in"][0][:, crop]).float(),
    )
    test = dm.make_dataset("test")
    g = MASKS["g_in"][0] | MASKS["g_in"][1]
    assert torch.equal(test[1]["mask"][0], torch.from_numpy(g[:, crop]).float())
    assert torch.equal(test[1]["mask_native"][0], torch.from_numpy(g))  # uncropped, {0,1}
    assert test[0]["mask"].eq(1).all() and test[0]["mask_native"].eq(1).all()


def test_mask_aligns_with_image_after_train_transforms(gier_root):
    """Inputs are white exactly on their mask: flips and random crops must keep that."""
    add_c_mask(gier_root)
    torch.manual_seed(0)
    dataset = make_dm(gier_root, resolution=8, random_flip=1.0).make_dataset("train")
    for _ in range(4):  # a's samples: a local mask, random crops, always flipped
        sample = dataset[0]
        assert sample["source"].shape == (3, 8, 8) and sample["mask"].shape == (1, 8, 8)
        assert torch.equal(sample["source"][0] > 0, sample["mask"][0].bool())
        assert sample["mask"].any() and not sample["mask"].all()
    # region 1 spans columns 4..10 of 24, i.e. 2..5 of 12 after the resize: flipped 7..10,
    # then center-cropped by 2 → columns 5..8 of the 8: on the right
    flipped = make_dm(gier_root, resolution=8, random_flip=1.0, random_crop=False)
    mask = flipped.make_dataset("train")[0]["mask"][0]
    assert mask[:, :5].sum() == 0 and mask[:, 5:].sum() > 0


def test_mask_of_another_size_is_resized(gier_root):
    small = region(0, 4, 0, 6, shape=(8, 12))
    (gier_root / "masks" / "e_in_mask.json").write_text(json.dumps([rle(small, True)]))
    sample = make_dm(gier_root, resolution=H, eval_resize="center_crop").make_dataset("val")[0]
    expected = np.kron(small, np.ones((2, 2), np.uint8))  # nearest x2 to the 16x24 input
    assert torch.equal(sample["mask_native"][0], torch.from_numpy(expected))
    assert torch.equal(sample["mask"][0], torch.from_numpy(expected[:, 4:20]).float())


def test_require_masks_or_no_mask_in_the_split(gier_root, caplog):
    """c's mask file is missing: no train sample gets a mask (a batch needs all or none)."""
    with pytest.raises(FileNotFoundError, match=r"c_in_mask\.json.*row 2"):
        make_dm(gier_root, require_masks=True).build_records("train")
    assert len(make_dm(gier_root, require_masks=True).build_records("val")) == 3
    with caplog.at_level("WARNING", logger="datamodules.gier"):
        dm = make_dm(gier_root, batch_size=8)
        dm.setup("fit")
    assert "1 local pair(s) have no mask file" in caplog.text and "c_in_mask.json" in caplog.text
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["id"]) == 8 and "mask" not in batch
    assert next(iter(dm.val_dataloader()))["mask"].shape == (3, 1, 8, 8)  # val is complete


# --------------------------------------------------------------------------- bad input


def test_missing_split_file(gier_root):
    (gier_root / "splits" / "val_sess_3.json").unlink()
    with pytest.raises(FileNotFoundError, match="val_sess_3.json"):
        make_dm(gier_root).build_records("val")


def test_missing_key_names_file_and_row(gier_root):
    path = gier_root / "splits" / "train_sess_3.json"
    pairs = json.loads(path.read_text())
    del pairs[1]["amateur_summary"]
    path.write_text(json.dumps(pairs))
    with pytest.raises(
        ValueError, match=r"train_sess_3\.json, row 1: missing required key 'amateur_summary'"
    ):
        make_dm(gier_root).build_records("train")


def test_duplicate_output_is_an_error_a_repeated_input_is_not(gier_root):
    path = gier_root / "splits" / "test_sess_3.json"
    pairs = json.loads(path.read_text())
    path.write_text(json.dumps([pairs[0], pairs[0]]))
    with pytest.raises(ValueError, match="row 1: output 'f_out' already used in row 0"):
        make_dm(gier_root).build_records("test")
    second = {**pairs[0], "output": "f_out2.png"}  # the release reuses inputs in several pairs
    (gier_root / "images" / "f_out2.png").write_bytes((gier_root / "images/f_out.png").read_bytes())
    path.write_text(json.dumps([pairs[0], second]))
    ids = [r["id"] for r in make_dm(gier_root).build_records("test")]
    assert ids == ["gier/f_out/expert/0", "gier/f_out2/expert/0"]


def test_corrupt_image_and_mask_name_file_and_row(gier_root):
    (gier_root / "images" / "g_out.png").write_bytes(b"not a png")
    dataset = make_dm(gier_root).make_dataset("test")
    with pytest.raises(
        BadSampleError, match=r"g_out\.png \(split 'test', row 1, id 'gier/g_out/expert/0'\)"
    ):
        dataset[1]
    (gier_root / "masks" / "e_in_mask.json").write_text('[{"size": [16, 24], "counts": [1, 2]}]')
    dataset = make_dm(gier_root).make_dataset("val")
    with pytest.raises(
        BadSampleError,
        match=r"mask .*e_in_mask\.json \(split 'val', row 2, id 'gier/e_out/amateur/1'\)",
    ):
        dataset[2]
    skipping = make_dm(gier_root, on_bad_sample="skip").make_dataset("val")
    assert skipping[0].id == "gier/e_out/expert/0"


# --------------------------------------------------------------------------- loaders


def test_dataloaders_iterate(gier_root):
    dm = make_dm(gier_root, operators=["inpaint_obj", "brightness", "tint", "contrast"])  # not c
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 3  # 7 samples, batch 2, drop_last
    for batch in batches:
        assert batch["source"].shape == (2, 3, 8, 8) and batch["target"].shape == (2, 3, 8, 8)
        assert batch["mask"].shape == (2, 1, 8, 8) and len(batch["instruction"]) == 2
        assert batch["skipped_ids"] == []
    val = list(dm.val_dataloader())
    assert [len(b["id"]) for b in val] == [2, 1]
    dm.setup("test")
    test_ids = [i for b in dm.test_dataloader() for i in b["id"]]
    assert test_ids == ["gier/f_out/expert/0", "gier/g_out/expert/0", "gier/g_out/amateur/0"]
