"""`python -m editbench data verify` on the native-layout fixtures: layered `-c` files, a split
that cannot be loaded, IPr2Pr instructions, and the outside-the-mask pair-quality figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures.layouts import COUNTS, WRITERS, bilinear_reference
from PIL import Image

from editbench.cli import main

REPO = Path(__file__).resolve().parents[2]
MODEL = str(REPO / "experiments" / "tiny" / "inspix2pix.yaml")


def data_config(path: Path, class_path: str, **init_args) -> str:
    lines = ["data:", f"  class_path: {class_path}", "  init_args:"]
    lines += [f"    {k}: {json.dumps(v)}" for k, v in init_args.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def folder_config(tmp_path: Path, root: Path) -> str:
    return data_config(
        tmp_path / "folder.yaml",
        "datamodules.folder.FolderEditDataModule",
        root=str(root),
        resolution=16,
        train_manifest="train.jsonl",
        val_manifest="val.jsonl",
        test_manifest="test.jsonl",
    )


def run_verify(capsys, *args) -> tuple[int, dict, str]:
    capsys.readouterr()
    code = main(["data", "verify", *args])
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{\n") :])
    return code, summary, out


def outside_change_reference(root: Path, row: dict) -> float:
    """mean |target - source| / 255 where the mask is 0, the target resized to the source by
    the bilinear reference when its size differs (numpy, from the files)."""
    source = np.asarray(Image.open(root / row["source"]).convert("RGB")).astype(np.float64)
    target = np.asarray(Image.open(root / row["target"]).convert("RGB"))
    if target.shape != source.shape:
        target = np.round(bilinear_reference(target, *source.shape[:2]))
    outside = np.asarray(Image.open(root / row["mask"]).convert("L")) < 128
    return float((np.abs(target - source).mean(-1) / 255)[outside].mean())


def test_verify_layers_configs_and_measures_change_outside_masks(tmp_path, capsys):
    root = WRITERS["folder"](tmp_path / "pairs")
    rows = {
        s: [json.loads(line) for line in (root / f"{s}.jsonl").read_text().splitlines()]
        for s in ("train", "val", "test")
    }
    bad = rows["train"][2]  # a pair whose target also changed outside its mask
    image = np.asarray(Image.open(root / bad["target"])).astype(np.int16)
    Image.fromarray(np.clip(image + 60, 0, 255).astype(np.uint8)).save(root / bad["target"])
    limit = tmp_path / "limit.yaml"
    limit.write_text("data:\n  init_args:\n    max_samples: 3\n")
    quality = tmp_path / "quality.jsonl"
    code, summary, _ = run_verify(
        capsys, "-c", MODEL, "-c", folder_config(tmp_path, root), "-c", str(limit),
        "--pair_quality", str(quality),
    )  # fmt: skip
    assert code == 0 and summary["ok"]
    # three files layered: the model config, the dataset, then max_samples
    assert {s: v["count"] for s, v in summary["splits"].items()} == {s: 3 for s in rows}
    values = {json.loads(line)["id"]: json.loads(line) for line in quality.read_text().splitlines()}
    for split, split_rows in rows.items():
        expected = {r["id"]: outside_change_reference(root, r) for r in split_rows[:3]}
        for i, value in expected.items():
            assert values[i]["split"] == split
            # the val/test pair of another size goes through resampling: rounding differences
            assert values[i]["outside_mask_change"] == pytest.approx(value, abs=2e-3), i
        block = summary["splits"][split]["outside_mask_change"]
        assert block["pairs"] == 3
        assert block["mean"] == pytest.approx(np.mean(list(expected.values())), abs=2e-3)
        assert block["worst"][0]["id"] == max(expected, key=expected.get)
    assert summary["splits"]["train"]["outside_mask_change"]["worst"][0]["id"] == bad["id"]
    assert values[bad["id"]]["outside_mask_change"] > 0.2  # the others: exactly 0 (PNG)
    assert values[rows["train"][0]["id"]]["outside_mask_change"] == 0.0


def test_verify_fails_when_a_split_cannot_be_loaded(tmp_path, capsys):
    root = WRITERS["gier"](tmp_path / "gier")
    (root / "splits" / "val_sess_3.json").unlink()
    config = data_config(tmp_path / "gier.yaml", "datamodules.gier.GIERDataModule", root=str(root))
    # max_samples: the fixture's counts are not compared with the published ones
    overrides = ["--", "--data.init_args.resolution=16", "--data.init_args.max_samples=100"]
    code, summary, out = run_verify(capsys, "-c", MODEL, "-c", config, *overrides)
    assert code == 1 and not summary["ok"] and summary["num_problems"] == 1
    assert "cannot load the split" in summary["splits"]["val"]["error"]
    assert "val_sess_3.json" in out
    # the loadable splits were still checked
    assert summary["splits"]["train"]["count"] == COUNTS["gier"]["train"]
    # GIER pair quality: global-only pairs have no outside; empty masks are all outside
    assert summary["splits"]["test"]["outside_mask_change"]["pairs"] == 2
    # only the splits asked for
    code, summary, _ = run_verify(
        capsys, "-c", MODEL, "-c", config, "--splits", "train", "test", *overrides
    )
    assert code == 0 and set(summary["splits"]) == {"train", "test"}


def test_verify_reads_ipr2pr_instructions(tmp_path, capsys):
    root = WRITERS["ipr2pr"](tmp_path / "ip2p", num_prompts=20, caption_key="caption")
    config = data_config(
        tmp_path / "ip2p.yaml",
        "datamodules.ipr2pr.IPr2PrDataModule",
        root=str(root),
        resolution=16,
        max_samples=50,
        report_dir=str(tmp_path / "reports"),
    )
    code, summary, out = run_verify(capsys, "-c", MODEL, "-c", config)
    assert "empty instruction" not in out
    assert code == 0 and summary["num_problems"] == 0
    assert [summary["splits"][s]["count"] for s in ("train", "val", "test")] == [18, 1, 1]


@pytest.mark.slow
def test_python_m_editbench_data_verify(tmp_path):
    """The user's command, in a fresh process."""
    root = WRITERS["folder"](tmp_path / "pairs", quirks=False)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "editbench", "data", "verify", "-c", MODEL]
    command += ["-c", folder_config(tmp_path, root)]
    out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout[out.stdout.index("{\n") :])
    assert summary["ok"] and summary["splits"]["test"]["outside_mask_change"]["mean"] == 0.0
