"""The current benchmarks through the CLI: a real tiny ``test -c experiments/quickstart.yaml -c
experiments/tiny/eval/<bench>.yaml`` on each benchmark's layout fixture (tests/fixtures/
benchmarks.py), scored against the INPUT (the sets have no targets), and ``report --published``
rendering the GEdit-Bench and ImgEdit-Bench papers' rows.

The quickstart's model is the tiny InsPix2Pix built from the session's tiny checkpoint folder
(``--model.init_args.diffusion_path``, as tests/cli/test_bundle_cli.py does), not a trained
``--ckpt_path``; the Emu Edit L1 is checked against numpy on the bundle's saved edits and the
fixture's input images.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from fixtures.benchmark_runs import run_test
from fixtures.benchmarks import emu_image, write_emu_edit, write_gedit, write_imgedit
from PIL import Image

from editbench.cli import main
from metrics.bundle import image_name, read_samples


@pytest.fixture(scope="module")
def backbones(tmp_path_factory) -> dict[str, str]:
    from fixtures.backbones import save_tiny_clip, save_tiny_dino

    out = tmp_path_factory.mktemp("backbones")
    return {"clip": str(save_tiny_clip(out / "clip")), "dino": str(save_tiny_dino(out / "dino"))}


@pytest.fixture(scope="module")
def emu_run(tiny_dir, backbones, tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("emu")
    root = write_emu_edit(tmp / "emu_edit_test_set", num_rows=5, num_shards=2)
    folder = run_test(
        "emu_edit", root, tiny_dir, tmp / "runs",
        "--model.init_args.backbones", json.dumps(backbones),
        "--data.init_args.cache_dir", str(tmp / "cache"),
    )  # fmt: skip
    return root, folder


@pytest.mark.slow  # a tiny test run (10-30 s on 2 cores)
def test_emu_edit_scores_every_column_against_the_input(emu_run):
    _, folder = emu_run
    document = json.loads((folder / "test_metrics.json").read_text())
    assert document["dataset"] == "emu-edit"
    assert document["protocol"]["columns"] == ["CLIP_direction", "CVS", "CTS", "L1", "DINO"]
    assert document["protocol"]["num_samples"] == 5
    for column in document["protocol"]["columns"]:
        assert math.isfinite(document["metrics"][f"test/{column}"]), column
    assert not any(k.startswith("test/copy/") for k in document["metrics"])  # no copy baseline
    assert document["copy_table"] == {}


@pytest.mark.slow
def test_emu_edit_l1_is_the_edit_against_the_input_image(emu_run):
    """L1 = mean over samples of mean |edit - input| on [0, 1], the edit (the bundle's 8-bit
    PNG, at the model's 32 px) brought to the input's native 40x48 by PIL bicubic."""
    _, folder = emu_run
    document = json.loads((folder / "test_metrics.json").read_text())
    values = {}
    for idx in range(5):
        edit = Image.open(folder / image_name(f"emu_edit/{idx}")).convert("RGB")
        source = emu_image(idx)
        assert edit.size == (32, 32) and source.shape == (48, 40, 3)
        edit = np.asarray(edit.resize((40, 48), Image.Resampling.BICUBIC), np.float64)
        values[f"emu_edit/{idx}"] = np.abs(edit - source).mean() / 255
    assert document["metrics"]["test/L1"] == pytest.approx(np.mean(list(values.values())), abs=1e-5)
    rows = {
        r["id"]: r["value"] for r in read_samples(folder / "samples.jsonl") if r["metric"] == "L1"
    }
    assert rows.keys() == values.keys()
    for sample_id, value in values.items():
        assert rows[sample_id] == pytest.approx(value, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("bench", ["gedit", "imgedit"])
def test_judged_benchmarks_write_a_bundle_for_the_judge(bench, tiny_dir, tmp_path):
    if bench == "gedit":
        root = write_gedit(tmp_path / "GEdit-Bench", num_keys=3)
        protocol, ids = "gedit-en", 3
    else:
        root = write_imgedit(tmp_path / "ImgEdit-Bench", num_entries=4)
        protocol, ids = "imgedit", 4
    folder = run_test(bench, root, tiny_dir, tmp_path / "runs")
    document = json.loads((folder / "test_metrics.json").read_text())
    assert document["dataset"] == protocol
    assert document["protocol"]["columns"] == ["L1"]  # in test: only the change from the input
    assert document["protocol"]["num_samples"] == ids
    assert not any(k.startswith("test/copy/") for k in document["metrics"])
    inputs = [json.loads(line) for line in (folder / "inputs.jsonl").read_text().splitlines()]
    assert len(inputs) == ids and all(row["dataset"] == protocol for row in inputs)
    for row in inputs:  # what a judge needs: instruction, input and edit per id
        assert (folder / image_name(row["id"])).is_file()
        assert (folder / image_name(row["id"], "sources")).is_file()
        assert not (folder / "targets").exists()


# ----------------------------------------------------------------------------- report


def judged_run(path: Path, dataset: str, table: dict[str, float]) -> Path:
    """A results document as a judged run of ``dataset`` reads (hand-written, like
    tests/cli/test_report.py's)."""
    columns = list(table)
    document = {
        "format": "editbench.test_metrics/1",
        "model": {"class_path": "models.inspix2pix.InsPix2Pix", "name": "InsPix2Pix"},
        "run": {"name": "ours", "seed": 0},
        "dataset": dataset,
        "metrics": {f"test/{k}": v for k, v in table.items()},
        "table": table,
        "copy_table": {},
        "protocol": {"name": dataset, "columns": columns, "scale": dict.fromkeys(columns, 1.0)},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
    return path


def report_rows(args: list[str], out: Path, capsys) -> dict[str, list[str]]:
    assert main(["report", *args, "--out", str(out)]) == 0
    markdown = capsys.readouterr().out
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) > 1:
            rows[cells[0]] = cells[1:]
    return rows


def test_report_published_gedit_rows(tmp_path, capsys):
    judged_run(
        tmp_path / "runs" / "ours" / "test_metrics.json",
        "gedit-en",
        {"VIEScore_SC": 1.5, "VIEScore_PQ": 2.5, "VIEScore_O": 1.2},
    )
    rows = report_rows(
        [str(tmp_path / "runs"), "--published", "step1x-gedit-en"], tmp_path / "o", capsys
    )
    # Step1X-Edit Table 2, GEdit-Bench-EN full set, GPT-4.1: 3.575 5.491 3.684
    assert rows["Instruct-Pix2Pix (paper)"] == ["3.58", "5.49", "3.68"]
    assert rows["GPT-4o (paper)"] == ["7.85", "7.62", "7.53"]
    assert "MGIE (paper)" not in rows


def test_report_published_imgedit_rows(tmp_path, capsys):
    judged_run(
        tmp_path / "runs" / "ours" / "test_metrics.json",
        "imgedit",
        {"ImgEdit_add": 2.0, "ImgEdit_style": 3.0},
    )
    rows = report_rows(
        [str(tmp_path / "runs"), "--published", "imgedit-v1"], tmp_path / "o", capsys
    )
    # ImgEdit v1 Table 4: Addition 2.29, Style Transfer 3.54 for Instruct-Pix2Pix
    assert rows["Instruct-Pix2Pix (paper)"] == ["2.29", "3.54"]
    assert rows["MagicBrush (paper)"] == ["2.72", "2.49"]
