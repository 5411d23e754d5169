"""SmartEdit's Reason-Edit read in its release's folder layout (tests/fixtures/reason_edit.py),
its two protocols against InsightEdit's published table, and one tiny ``test`` through the CLI."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from fixtures.reason_edit import image, mask, write_reason_edit
from PIL import Image

from datamodules.base import BadSampleError
from datamodules.reason_edit import ReasonEditDataModule
from editbench.cli import main
from metrics.bundle import image_name
from metrics.protocols import PROTOCOLS, get_protocol
from metrics.published import PUBLISHED_TABLES, TABLE_SCALES

REPO = Path(__file__).resolve().parents[2]
COUNTS = {
    "1-Left-Right": 2,
    "2-Relative-Size": 1,
    "3-Mirror": 3,
    "4-Color": 2,
    "5-Multiple-Objects": 1,
    "6-Reasoning": 2,
}


def reason_edit(root: Path, **kwargs) -> ReasonEditDataModule:
    dm = ReasonEditDataModule(str(root), resolution=32, num_workers=0, **kwargs)
    dm.setup("test")
    return dm


@pytest.fixture
def root(tmp_path) -> Path:
    return write_reason_edit(tmp_path / "ReasonEdit_benckmark_dir", COUNTS)


def test_understanding_scenarios_are_the_five_folders_in_order(root):
    dm = reason_edit(root)
    records = dm.datasets["test"].records
    assert [r["id"] for r in records] == [
        "reason-edit/1-Left-Right/003",
        "reason-edit/1-Left-Right/017",
        "reason-edit/2-Relative-Size/003",
        "reason-edit/3-Mirror/003",
        "reason-edit/3-Mirror/017",
        "reason-edit/3-Mirror/120",
        "reason-edit/4-Color/003",
        "reason-edit/4-Color/017",
        "reason-edit/5-Multiple-Objects/003",
    ]
    assert [r["instruction"] for r in records][2:6] == [
        "change thing 0 of 2-Relative-Size",
        "change thing 0 of 3-Mirror",
        "change thing 1 of 3-Mirror",
        "change thing 2 of 3-Mirror",
    ]
    assert [r["goal_caption"] for r in records][3:6] == [
        "a changed thing 0",
        "a changed thing 1",
        "a changed thing 2",
    ]
    assert [r["category"] for r in records][:4] == [
        "1-Left-Right", "1-Left-Right", "2-Relative-Size", "3-Mirror"
    ]  # fmt: skip
    assert records[5]["mask"] == str(root / "3-Mirror" / "120_mask.jpg")
    assert dm.protocol == "reason-edit-understanding" and dm.published_counts is None

    sample = dm.datasets["test"][5]  # 3-Mirror/120: the third image of its folder
    assert sample["instruction"] == "change thing 2 of 3-Mirror"
    assert sample["goal_caption"] == "a changed thing 2"
    assert sample["category"] == "3-Mirror"
    # the release's scoring frame: the input PIL-bicubic to 256, the JPEG mask's grey levels
    # (convert("L")) nearest to 256, and the suite's binary mask of those
    resized = Image.fromarray(image("3-Mirror", 2)).resize((256, 256), Image.BICUBIC)
    native = sample["source_native"].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(native, np.asarray(resized))
    with Image.open(root / "3-Mirror" / "120_mask.jpg") as opened:
        grey = np.asarray(opened.convert("L").resize((256, 256), Image.NEAREST))
    np.testing.assert_array_equal(sample["mask_grey_native"][0].numpy(), grey)
    np.testing.assert_array_equal(sample["mask_native"][0].numpy(), grey >= 128)
    assert ((grey > 0) & (grey < 255)).any()  # JPEG edge levels, kept for the release's rule
    assert sample["source"].shape == (3, 32, 32) and sample["mask"].shape == (1, 32, 32)
    assert "target" not in sample

    native = reason_edit(root, metrics_size=None).datasets["test"][5]  # native sizes kept
    np.testing.assert_array_equal(
        native["source_native"].permute(1, 2, 0).numpy(), image("3-Mirror", 2)
    )  # PNG: lossless
    np.testing.assert_array_equal(native["mask_native"][0].numpy(), mask(2) // 255)
    assert native["mask_grey_native"].shape == (1, 48, 40)
    with pytest.raises(ValueError, match="eval_resize must be 'resize'"):
        ReasonEditDataModule(str(root), eval_resize="pad")


def test_reasoning_scenario_and_release_output_names(root):
    dm = reason_edit(root, scenarios="reasoning")
    assert [r["id"] for r in dm.datasets["test"].records] == [
        "reason-edit/6-Reasoning/003",
        "reason-edit/6-Reasoning/017",
    ]
    assert dm.datasets["test"].records[1]["instruction"] == "change thing 1 of 6-Reasoning"
    assert dm.protocol == "reason-edit-reasoning"
    assert dm.prediction_path("reason-edit/6-Reasoning/017") == "Reasoning_metrics_1/0002.png"
    understanding = ReasonEditDataModule(str(root))  # names are known before setup too
    assert understanding.prediction_path("reason-edit/3-Mirror/120") == "Mirror_metrics_3/0003.png"
    assert understanding.prediction_path("reason-edit/1-Left-Right/003") == (
        "LeftRight_metrics_1/0001.png"
    )
    with pytest.raises(KeyError, match="not a Reason-Edit sample"):
        understanding.prediction_path("reason-edit/6-Reasoning/003")


def test_understanding_folders_are_found_below_the_root(root):
    """The release walks the tree for folders ending in the scenario's name."""
    (root / "Understanding").mkdir()
    shutil.move(root / "4-Color", root / "Understanding" / "Scene-4-Color")
    ids = [r["id"] for r in reason_edit(root).datasets["test"].records]
    assert ids[6:8] == ["reason-edit/4-Color/003", "reason-edit/4-Color/017"]
    shutil.copytree(root / "Understanding" / "Scene-4-Color", root / "old-4-Color")
    with pytest.raises(ValueError, match="2 folders ending in '4-Color'"):
        reason_edit(root)


def test_only_test_split_and_known_scenarios(root):
    with pytest.raises(ValueError, match="only a 'test' split"):
        ReasonEditDataModule(str(root)).build_records("train")
    with pytest.raises(ValueError, match="scenarios must be one of"):
        ReasonEditDataModule(str(root), scenarios="all")


def rewrite(path: Path, lines: list[str]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def test_bad_instruction_lines_name_file_and_line(root):
    path = root / "3-Mirror" / "Mirror_text.txt"
    rewrite(path, ["a CLIP: b", "no separator here", "c CLIP: d"])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}, line 2: no 'CLIP:' text"):
        reason_edit(root)
    rewrite(path, ["a CLIP: b", "c CLIP: d", "   CLIP: e"])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}, line 3: empty instruction"):
        reason_edit(root)
    rewrite(path, ["a CLIP:  ", "c CLIP: d", "e CLIP: f"])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}, line 1: empty CLIP text"):
        reason_edit(root)
    rewrite(path, ["a CLIP: b", "c CLIP: d"])
    with pytest.raises(ValueError, match=r"Mirror_text.txt: 2 instruction line\(s\) for 3 images"):
        reason_edit(root)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=r"instruction file not found: .*Mirror_text.txt"):
        reason_edit(root)


def test_lines_after_the_last_image_are_ignored_with_a_warning(root, caplog):
    path = root / "4-Color" / "Color_text.txt"
    rewrite(path, ["a CLIP: b", "c CLIP: d", "", "left over CLIP: x"])
    with caplog.at_level(logging.WARNING, logger="datamodules.reason_edit"):
        records = reason_edit(root).datasets["test"].records
    assert [r["instruction"] for r in records if r["category"] == "4-Color"] == ["a", "c"]
    assert "lines 4 come after the last of the 2 images" in caplog.text


def test_missing_folders_masks_and_images_are_named(root, tmp_path):
    (root / "5-Multiple-Objects" / "003_mask.jpg").unlink()
    with pytest.raises(ValueError, match=r"5-Multiple-Objects has 1 images \(\*.png\) but 0 masks"):
        reason_edit(root)
    shutil.rmtree(root / "5-Multiple-Objects")
    with pytest.raises(FileNotFoundError, match="no folder ending in '5-Multiple-Objects'"):
        reason_edit(root)
    shutil.rmtree(root / "6-Reasoning")
    with pytest.raises(FileNotFoundError, match=r"scenario folder not found: .*6-Reasoning"):
        reason_edit(root, scenarios="reasoning")
    with pytest.raises(FileNotFoundError, match="benchmark folder not found"):
        reason_edit(tmp_path / "nowhere")
    empty = write_reason_edit(tmp_path / "empty", {"6-Reasoning": 0})
    with pytest.raises(ValueError, match=r"no \*.png images in .*6-Reasoning"):
        reason_edit(empty, scenarios="reasoning")


def test_undecodable_image_is_named(root):
    path = root / "6-Reasoning" / "017.png"
    path.write_bytes(b"not a png")
    dm = reason_edit(root, scenarios="reasoning")
    with pytest.raises(BadSampleError, match=re.escape(str(path))):
        dm.datasets["test"][1]


# ----------------------------------------------------------------------------- protocols


@pytest.mark.parametrize("name", ["reason-edit-understanding", "reason-edit-reasoning"])
def test_protocols_match_the_release_and_insightedits_table(name):
    protocol = get_protocol(name)
    assert protocol.columns == ("PSNR_bg", "SSIM_bg", "LPIPS_bg", "MSE_bg", "CLIPScore_box")
    assert protocol.reference == "source"  # no ground-truth edits in the release
    assert protocol.backbones == {"clip": "clip-vit-large-patch14"}  # CLIPScore ViT-L/14
    assert protocol.metric_kwargs["LPIPS_bg"] == {"net": "squeeze"}
    # CLIPScore_box is already 100 x cos; InsightEdit prints VIEScore on 0-1 (0-10 x 0.1)
    assert protocol.scale_of("CLIPScore_box") == 1 and protocol.scale_of("VIEScore_O") == 0.1
    assert protocol.scale_of("PSNR_bg") == protocol.scale_of("SSIM_bg") == 1
    table = PUBLISHED_TABLES["insightedit-reason-edit"]
    assert {d for row in table.values() for d in row} == {
        "reason-edit-understanding",
        "reason-edit-reasoning",
    }
    assert set(table["SmartEdit-7B"]) <= set(PROTOCOLS)
    assert TABLE_SCALES["insightedit-reason-edit"]["VIEScore_O"] == protocol.scale_of("VIEScore_O")


def test_report_published_reason_edit_rows(tmp_path, capsys):
    """A judged run per scenario lines up with InsightEdit's Reason-Edit columns."""
    for dataset, value in (("reason-edit-understanding", 0.5), ("reason-edit-reasoning", 0.25)):
        document = {
            "format": "editbench.test_metrics/1",
            "model": {"class_path": "models.inspix2pix.InsPix2Pix", "name": "InsPix2Pix"},
            "run": {"name": "ours", "seed": 0},
            "dataset": dataset,
            "metrics": {"test/VIEScore_O": value * 10},
            "table": {"VIEScore_O": value},
            "copy_table": {},
            "protocol": {"name": dataset, "columns": ["VIEScore_O"], "scale": {"VIEScore_O": 0.1}},
        }
        path = tmp_path / "runs" / dataset / "test_metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(document))
    args = [str(tmp_path / "runs"), "--published", "insightedit-reason-edit"]
    assert main(["report", *args, "--out", str(tmp_path / "out")]) == 0
    rows = {}
    for text in capsys.readouterr().out.splitlines():
        cells = [c.strip() for c in text.strip().strip("|").split("|")]
        if text.startswith("|") and len(cells) > 1:
            rows[cells[0]] = cells[1:]
    # InsightEdit, Reason-Edit comparison (Understanding / Reasoning): SmartEdit-7B 0.866 /
    # 0.835, InsightEdit 0.901 / 0.893, in the paper's order: understanding first
    assert rows["Model"] == ["Reason-Edit (Understanding) VIEScore_O↑",
                             "Reason-Edit (Reasoning) VIEScore_O↑"]  # fmt: skip
    assert rows["SmartEdit-7B (paper)"] == ["0.866", "0.835"]
    assert rows["InsightEdit (paper)"] == ["0.901", "0.893"]
    assert rows["ours"] == ["0.500", "0.250"]


# ----------------------------------------------------------------------------- CLI


@pytest.mark.slow  # a tiny test run (10-30 s on 2 cores)
def test_cli_test_writes_the_protocols_metrics(tiny_dir, tmp_path):
    from fixtures.backbones import save_tiny_clip

    root = write_reason_edit(tmp_path / "ReasonEdit_benckmark_dir", COUNTS)
    backbones = {"clip": str(save_tiny_clip(tmp_path / "clip")), "lpips": "random"}
    save = tmp_path / "runs"
    args = [
        "test",
        "-c", str(REPO / "experiments" / "quickstart.yaml"),
        "-c", str(REPO / "experiments" / "tiny" / "eval" / "reason_edit.yaml"),
        "--trainer.accelerator", "cpu",
        "--trainer.callbacks", "[]",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(save),
        "--model.init_args.diffusion_path", str(tiny_dir / "instruct-pix2pix"),
        "--model.init_args.num_inference_steps", "2",
        "--model.init_args.backbones", json.dumps(backbones),
        "--data.init_args.root", str(root),
        "--data.init_args.scenarios", "reasoning",
    ]  # fmt: skip
    assert main(args) == 0
    (folder,) = sorted(save.glob("quickstart/version_*"))
    document = json.loads((folder / "test_metrics.json").read_text())
    assert document["dataset"] == "reason-edit-reasoning"
    columns = ["PSNR_bg", "SSIM_bg", "LPIPS_bg", "MSE_bg", "CLIPScore_box"]
    assert document["protocol"]["columns"] == columns
    assert document["protocol"]["num_samples"] == 2
    for column in columns:
        assert math.isfinite(document["metrics"][f"test/{column}"]), column
    assert not any(k.startswith("test/copy/") for k in document["metrics"])  # no copy baseline
    # PSNR_bg by SmartEdit's rule, from the bundle's files: the 8-bit edit PNG (the model's
    # 32 px) and the input PIL-bicubic to 256, both times 1 - mask/255 with the JPEG mask's grey
    # levels (convert("L"), nearest to 256), 10 log10(1 / MSE) over the whole 256 frame
    psnr = []
    for index, stem in enumerate(("003", "017")):
        edit = Image.open(folder / image_name(f"reason-edit/6-Reasoning/{stem}")).convert("RGB")
        assert edit.size == (32, 32)
        edit = np.asarray(edit.resize((256, 256), Image.Resampling.BICUBIC), np.float64) / 255
        source = Image.fromarray(image("6-Reasoning", index)).resize((256, 256), Image.BICUBIC)
        source = np.asarray(source, np.float64) / 255
        with Image.open(root / "6-Reasoning" / f"{stem}_mask.jpg") as opened:
            grey = np.asarray(opened.convert("L").resize((256, 256), Image.NEAREST), np.float64)
        background = (1 - grey / 255)[..., None]
        mse = (((edit - source) * background) ** 2).mean()
        psnr.append(10 * math.log10(1 / mse))
    assert document["metrics"]["test/PSNR_bg"] == pytest.approx(np.mean(psnr), abs=1e-3)
    rows = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    per_image = [r["value"] for r in rows if r["metric"] == "PSNR_bg"]
    assert per_image == pytest.approx(psnr, abs=1e-3)  # ids sort as 003, 017
    assert {r["metric"] for r in rows} == set(columns)
    inputs = [json.loads(line) for line in (folder / "inputs.jsonl").read_text().splitlines()]
    assert [r["id"] for r in inputs] == [
        "reason-edit/6-Reasoning/003",
        "reason-edit/6-Reasoning/017",
    ]
    assert all(r["category"] == "6-Reasoning" for r in inputs)  # carried for the judge
    assert [r["instruction"] for r in inputs] == [
        "change thing 0 of 6-Reasoning",
        "change thing 1 of 6-Reasoning",
    ]
