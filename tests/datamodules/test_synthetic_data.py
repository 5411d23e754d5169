"""The synthetic generator: determinism, disjoint splits, exact ground truth, texts, metadata."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from datamodules import synthetic
from datamodules.synthetic import (
    ADJUST_FACTORS,
    BACKGROUNDS,
    COLOURS,
    EDITS,
    GLOBAL_EDITS,
    INSTRUCTIONS,
    Scene,
    generate_synthetic,
    make_sample,
    render_mask,
    sample_images,
    text_corpus,
)

SMALL = {"num_train": 20, "num_val": 5, "num_test": 5, "resolution": 32, "seed": 0}
TEXT_FIELDS = ("instruction", "expressive", "source_caption", "goal_caption")


def records(root: Path, split: str) -> list[dict]:
    with open(root / f"{split}.jsonl") as f:
        return [json.loads(line) for line in f]


def load(root: Path, rel: str) -> np.ndarray:
    return np.asarray(Image.open(root / rel))


def all_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    """A larger set (every edit kind several times) for the content checks; read only."""
    root = tmp_path_factory.mktemp("many")
    return generate_synthetic(root, num_train=150, num_val=20, num_test=20, resolution=32, seed=3)


def test_generation_is_deterministic(tmp_path, make_dm):
    a = generate_synthetic(tmp_path / "a", **SMALL)
    b = generate_synthetic(tmp_path / "b", **SMALL)
    files_a, files_b = all_files(a), all_files(b)
    assert len(files_a) == 3 + 1 + 3 * 30  # jsonl, meta, 3 PNGs per sample
    assert files_a == files_b
    c = generate_synthetic(tmp_path / "c", **{**SMALL, "seed": 1})
    assert all_files(c)["train.jsonl"] != files_a["train.jsonl"]
    # ... and the datasets read back give identical tensors (eval transform).
    ds_a = make_dm(root=str(a)).make_dataset("test")
    ds_b = make_dm(root=str(b)).make_dataset("test")
    for i in range(len(ds_a)):
        for key in ("source", "target", "mask"):
            assert torch.equal(ds_a[i][key], ds_b[i][key])


def test_sample_images_deterministic_range_and_shape():
    x = sample_images(7, 32, seed=5)
    assert x.shape == (7, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.1
    assert torch.equal(x, sample_images(7, 32, seed=5))
    assert not torch.equal(x, sample_images(7, 32, seed=6))
    assert sample_images(2, 64, seed=0).shape == (2, 3, 64, 64)


def test_splits_are_disjoint(many):
    ids, keys = set(), set()
    for split in ("train", "val", "test"):
        for r in records(many, split):
            assert r["id"] not in ids
            ids.add(r["id"])
            source = load(many, r["source"]).tobytes()
            key = hashlib.sha1(source + r["instruction"].encode()).hexdigest()
            assert key not in keys, f"{r['id']} repeats a (source, instruction) pair"
            keys.add(key)
    assert len(ids) == 190


def test_colliding_draws_are_resampled(tmp_path, monkeypatch):
    """Force the generator to draw the same sample repeatedly: it must redraw, not repeat."""
    real = synthetic.make_sample
    fixed = real(np.random.default_rng(123), 32)
    calls = {"n": 0}

    def sometimes_fixed(rng, resolution):
        calls["n"] += 1
        return fixed if calls["n"] % 3 == 0 else real(rng, resolution)

    monkeypatch.setattr(synthetic, "make_sample", sometimes_fixed)
    root = generate_synthetic(tmp_path / "d", **SMALL)
    seen = []
    for split in ("train", "val", "test"):
        for r in records(root, split):
            seen.append((load(root, r["source"]).tobytes(), r["instruction"]))
    assert len(seen) == 30 and len(set(seen)) == 30
    assert calls["n"] > 30  # some draws were thrown away


def test_every_edit_kind_appears_with_a_mask(many):
    rows = records(many, "train")
    assert {r["edit"] for r in rows} == set(EDITS)
    for r in rows:
        mask = load(many, r["mask"])
        assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 255}
        assert mask.any(), r["id"]
        if r["edit"] in GLOBAL_EDITS:
            assert mask.all()


def _background_of(expressive: str, res: int) -> np.ndarray:
    """Re-render the background the expressive text names."""
    names = "|".join(BACKGROUNDS)
    m = re.search(
        rf"(?:on a|an empty) (?:plain ({names})|({names}) gradient) background$", expressive
    )
    assert m, expressive
    style = "plain" if m.group(1) else "gradient"
    return synthetic._background(Scene(m.group(1) or m.group(2), style, ()), res)


def _direction(instruction: str) -> str:
    for key, templates in INSTRUCTIONS.items():
        if instruction in templates and " " in key:
            return key.split()[1]
    raise AssertionError(instruction)


def test_ground_truth_is_exact(many):
    checked = set()
    for split in ("train", "val"):
        for r in records(many, split):
            src, tgt = load(many, r["source"]), load(many, r["target"])
            inside = load(many, r["mask"]) > 0
            changed = (src != tgt).any(-1)
            edit = r["edit"]
            if edit in GLOBAL_EDITS:
                reference = getattr(ImageEnhance, {"saturation": "Color"}.get(edit, edit.title()))
                factor = ADJUST_FACTORS[_direction(r["instruction"])]
                expected = np.asarray(reference(Image.fromarray(src)).enhance(factor))
                np.testing.assert_array_equal(tgt, expected, err_msg=r["id"])
                checked.add(edit)
                continue
            # Local edits change nothing outside the mask, and something inside it.
            assert not changed[~inside].any(), r["id"]
            assert changed[inside].any(), r["id"]
            background = _background_of(r["expressive"], 32)
            colours = {tuple(c) for c in COLOURS.values()}
            if edit == "remove":
                np.testing.assert_array_equal(tgt[inside], background[inside], err_msg=r["id"])
            if edit == "add":
                np.testing.assert_array_equal(src[inside], background[inside], err_msg=r["id"])
            if edit == "recolour":
                (old,), (new,) = np.unique(src[inside], axis=0), np.unique(tgt[inside], axis=0)
                assert {tuple(old), tuple(new)} <= colours and tuple(old) != tuple(new)
                assert (
                    f" {[k for k, v in COLOURS.items() if v == tuple(new)][0]}"
                    in (r["instruction"])
                )
            checked.add(edit)
    assert checked == set(EDITS)


@pytest.mark.parametrize("res", [32, 64, 256])
def test_objects_never_overlap_at_any_resolution(res):
    """Neighbouring objects never share a pixel, so a removal reveals the plain background."""
    rng = np.random.default_rng(res)
    for _ in range(40 if res < 256 else 10):
        scene = synthetic._random_scene(rng, 3)
        masks = np.stack([render_mask([o], res) > 0 for o in scene.objects])
        assert masks.sum(0).max() == 1
        assert all(m.sum() > 4 for m in masks)  # drawn proportionally, visible at 32 px
    sample = make_sample(rng, res)
    assert sample.source.shape == (res, res, 3) and sample.mask.shape == (res, res)


def test_text_corpus_covers_every_generated_word(many):
    corpus = text_corpus()
    assert corpus == text_corpus() and len(corpus) == len(set(corpus))
    vocabulary = {w for text in corpus for w in re.findall(r"[a-z]+", text)}
    characters = set("".join(corpus))
    instructions = set(corpus)
    for split in ("train", "val", "test"):
        for r in records(many, split):
            assert r["instruction"] in instructions
            for field in TEXT_FIELDS:
                words = set(re.findall(r"[a-z]+", r[field]))
                assert words <= vocabulary, (r["id"], field, words - vocabulary)
                assert set(r[field]) <= characters, (r["id"], field)  # punctuation too
    for name in (*COLOURS, *BACKGROUNDS, *synthetic.POSITIONS, *synthetic.SHAPES):
        assert set(name.split()) <= vocabulary


def test_instruction_phrasings_vary(many):
    kinds: dict[str, set[str]] = {}
    for r in records(many, "train"):
        template = re.sub(
            r"\b(red|green|blue|yellow|purple|orange|white|black)\b", "C", r["instruction"]
        )
        kinds.setdefault(r["edit"], set()).add(template.split(" C")[0])
    assert all(len(v) >= 2 for v in kinds.values()), kinds


def test_meta_and_records(small_root):
    meta = json.loads((small_root / "meta.json").read_text())
    assert meta["version"] == synthetic.GENERATOR_VERSION
    assert {k: meta[k] for k in SMALL} == SMALL
    rows = records(small_root, "val")
    assert [r["id"] for r in rows] == [f"synthetic-val-{i:06d}" for i in range(5)]
    for r in rows:
        assert set(r) == {"id", "source", "target", "mask", "edit", *TEXT_FIELDS}
        assert not Path(r["source"]).is_absolute() and (small_root / r["source"]).is_file()


def test_existing_data_is_reused_and_mismatch_raises(small_root):
    before = {p: p.stat().st_mtime_ns for p in small_root.rglob("*")}
    assert generate_synthetic(small_root, **SMALL) == small_root
    assert {p: p.stat().st_mtime_ns for p in small_root.rglob("*")} == before
    with pytest.raises(ValueError) as err:
        generate_synthetic(small_root, **{**SMALL, "seed": 1, "resolution": 64})
    message = str(err.value)
    assert str(small_root) in message and "seed" in message and "resolution" in message
    assert "num_train" not in message


def test_interrupted_generation_is_redone(small_root, tmp_path):
    expected = all_files(small_root)
    (small_root / "meta.json").unlink()
    (small_root / "train.jsonl").write_text('{"id": "half a')
    (small_root / "images/val/000002_target.png").unlink()
    generate_synthetic(small_root, **SMALL)
    assert all_files(small_root) == expected


def test_generation_speed_scales(tmp_path):
    """Smoke check on throughput: 400 samples well under the 4,400-in-30-s budget."""
    import time

    start = time.perf_counter()
    generate_synthetic(tmp_path / "s", num_train=400, num_val=0, num_test=0, resolution=32)
    assert time.perf_counter() - start < 2.5
