"""Per-sample rows (metrics.samples via EditEvaluator.record_samples) and result bundles
(metrics.bundle): the rows of each aggregation, reduced the metric's way, give back the
torchmetrics aggregate; the manifest catches missing and changed files.

The batches are scored at native resolution (non-square native targets of two sizes, so the
evaluator splits them into size groups) with MagicBrush's turn aggregations and one empty mask
(``L1_edit`` skips that image) for the pixel metrics; the backbone metrics (LPIPS, DINO and the
CLIP metrics, tiny random backbones) on one batch under the one-aggregation generic protocol.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from metrics.bundle import (
    BundleError,
    read_bundle,
    recompute,
    save_images,
    write_bundle,
)
from metrics.evaluation import EditEvaluator
from metrics.protocols import get_protocol
from metrics.results import write_results
from metrics.samples import reduce_rows

PIXEL = ["L1", "L1_edit", "SSIM", "PSNR"]
BACKBONE = ["LPIPS", "DINO", "CVS", "CTS", "CLIP_direction", "CLIP_image"]
SIZES = [(40, 56), (48, 32), (40, 56), (48, 32), (40, 56)]


def batch_and_preds(seed: int = 0) -> tuple[dict, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    n = len(SIZES)
    masks = []
    for k, (h, w) in enumerate(SIZES):
        mask = torch.zeros(1, h, w, dtype=torch.uint8)
        if k != 2:  # sample 2: empty mask, not scored by L1_edit
            mask[:, h // 4 : h // 2, w // 5 : w // 2] = 1
        masks.append(mask)

    def native(size, offset):
        return (torch.rand(3, *size, generator=gen) * 255).to(torch.uint8) // 2 + offset

    batch = {
        "id": [f"s{i}" for i in range(n)],
        "instruction": ["make it red"] * n,
        "source_caption": [f"a photo {i}" for i in range(n)],
        "goal_caption": [f"a red photo {i}" for i in range(n)],
        "session": ["a", "a", "b", "c", "c"],
        "turn": torch.tensor([1, 2, 1, 1, 2]),
        "num_turns": torch.tensor([2, 2, 1, 2, 2]),
        "source": torch.zeros(n, 3, 32, 32),
        "target": torch.zeros(n, 3, 32, 32),
        "target_native": [native(s, 40) for s in SIZES],
        "source_native": [native(s, 60) for s in SIZES],
        "mask_native": masks,
    }
    preds = torch.rand(n, 3, 32, 32, generator=gen) * 2 - 1
    return batch, preds


def evaluator_for(kind: str, backbones=None) -> EditEvaluator:
    if kind == "backbone":
        return EditEvaluator(
            get_protocol("generic"),
            BACKBONE,
            metric_kwargs={"LPIPS": {"weights_path": "random"}},
            backbones={"clip": str(backbones / "clip"), "dino": str(backbones / "dino")},
        )
    psnr = "pooled" if kind == "pooled" else "image"
    return EditEvaluator(
        get_protocol("magicbrush"), PIXEL, metric_kwargs={"PSNR": {"reduction": psnr}}
    )


@pytest.fixture(scope="module")
def scored(small_backbones):
    out = {}
    for kind, batches in (("image", (0, 1)), ("pooled", (0, 1)), ("backbone", (0,))):
        evaluator = evaluator_for(kind, small_backbones)
        assert evaluator.record_samples() == (BACKBONE if kind == "backbone" else PIXEL)
        with torch.no_grad():
            for seed in batches:
                batch, preds = batch_and_preds(seed)
                batch["id"] = [f"b{seed}-{i}" for i in batch["id"]]
                evaluator.update(batch, preds)
        out[kind] = (evaluator, evaluator.compute(), evaluator.samples())
    return out


@pytest.mark.parametrize("kind", ["image", "pooled", "backbone"])
def test_rows_reproduce_every_aggregate(scored, kind):
    evaluator, results, rows = scored[kind]
    reductions = evaluator.sample_reductions()
    names = BACKBONE if kind == "backbone" else PIXEL
    if kind != "backbone":
        assert reductions["PSNR"] == ("mean" if kind == "image" else "pooled_psnr")
    aggregations = ("all",) if kind == "backbone" else ("all", "final", "turn1")
    checked = 0
    for aggregation in aggregations:
        for system in ("model", "copy"):
            for name in names:
                group = [
                    r
                    for r in rows
                    if (r["aggregation"], r["system"], r["metric"]) == (aggregation, system, name)
                ]
                expected = {"all": 10, "final": 6, "turn1": 6}[aggregation]
                if kind == "backbone":
                    expected = 5
                assert len(group) == expected, (aggregation, system, name)
                key = "test/copy" if system == "copy" else "test"
                middle = "" if kind == "backbone" else f"{aggregation}/"
                reported = results[f"{key}/{middle}{name}"]
                assert math.isfinite(reported)
                value = reduce_rows(group, reductions[name])
                assert value == pytest.approx(reported, rel=1e-6, abs=1e-7), (aggregation, name)
                checked += 1
    assert checked == len(aggregations) * 2 * len(names)


def test_rows_carry_keys_and_skip_empty_masks(scored):
    _, _, rows = scored["image"]
    keys = [(r["aggregation"], r["system"], r["metric"], r["id"]) for r in rows]
    assert len(keys) == len(set(keys))
    row = next(r for r in rows if r["id"] == "b0-s1" and r["metric"] == "L1")
    assert (row["dataset"], row["session"], row["turn"]) == ("magicbrush", "a", 2)
    empty = [r for r in rows if r["metric"] == "L1_edit" and r["id"].endswith("-s2")]
    assert empty and all(r["value"] is None for r in empty)
    # an independent check of one value: L1 is the mean |pred - target| at native size,
    # so all values lie in [0, 1] and differ between samples
    l1 = [r["value"] for r in rows if r["metric"] == "L1" and r["aggregation"] == "all"]
    assert all(0 < v < 1 for v in l1) and len(set(l1)) == len(l1)


def test_pooled_psnr_rows_hold_sums(scored):
    _, results, rows = scored["pooled"]
    group = [r for r in rows if r["metric"] == "PSNR" and (r["aggregation"], r["system"]) == (
        "all", "model")]
    sse = sum(r["sse"] for r in group)
    count = sum(r["n"] for r in group)
    assert 10 * math.log10(count / sse) == pytest.approx(results["test/all/PSNR"], rel=1e-6)
    # pooled differs from the mean of the per-image values (convexity)
    assert np.mean([r["value"] for r in group]) != pytest.approx(results["test/all/PSNR"])


def write_run(folder, scored_run, images: bool = True):
    evaluator, results, rows = scored_run
    protocol = {"aggregation": "all", "aggregations": ["all", "final", "turn1"]}
    write_results(
        folder / "test_metrics.json", {"format": "x", "metrics": results, "protocol": protocol}
    )
    if images:
        save_images(folder, ["b0-s0", "b0-s1"], torch.zeros(2, 3, 8, 8))
    write_bundle(folder, rows, evaluator.sample_reductions(), ["FID"])
    return protocol, results


def test_bundle_round_trip_recomputes(scored, tmp_path):
    protocol, results = write_run(tmp_path, scored["image"])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest["files"]) == {
        "test_metrics.json", "samples.jsonl", "images/b0-s0.png", "images/b0-s1.png",
    }  # fmt: skip
    bundle = read_bundle(tmp_path)
    assert bundle.not_recomputable == ["FID"]
    recomputed = recompute(bundle, protocol)
    assert recomputed["test/L1"] == pytest.approx(results["test/L1"], rel=1e-6)
    assert set(recomputed) == {k for k in results if k.split("/")[-1] in PIXEL}


def test_missing_or_changed_files_are_named(scored, tmp_path):
    write_run(tmp_path, scored["image"])
    (tmp_path / "images" / "b0-s1.png").unlink()
    samples = tmp_path / "samples.jsonl"
    samples.write_text(samples.read_text().replace('"value": 0.', '"value": 1.', 1))
    with pytest.raises(BundleError) as err:
        read_bundle(tmp_path)
    message = str(err.value)
    assert "missing" in message and "b0-s1.png" in message
    assert "changed" in message and "samples.jsonl" in message
    assert "b0-s0.png" not in message


def test_no_manifest_is_no_bundle(tmp_path):
    assert read_bundle(tmp_path) is None


def test_recording_off_by_default_and_reset_forgets():
    evaluator = evaluator_for("image")
    batch, preds = batch_and_preds()
    with torch.no_grad():
        evaluator.update(batch, preds)
    assert evaluator.samples() == []
    evaluator.record_samples()
    with torch.no_grad():
        evaluator.update(batch, preds)
    assert evaluator.samples()
    evaluator.reset()
    assert evaluator.samples() == []
