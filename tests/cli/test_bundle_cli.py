"""Result bundles through the CLI: a real tiny ``test`` writes them, ``report`` verifies and
recomputes them, shows 95% intervals, compares two rows and skips fit-only folders; on 2
processes (gloo) the per-sample rows equal 1 process's.

The tiny InsPix2Pix is scored on an odd synthetic split (7 samples, batch 2, so a padding
sampler would repeat one), with PSNR added to the synthetic protocol's L1, L1_edit, SSIM.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from editbench.cli import main
from editbench.commands.report import ReportError
from metrics.bundle import read_inputs, read_samples, write_bundle
from metrics.results import FORMAT

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "experiments" / "tiny" / "inspix2pix.yaml")
NUM_TEST = 7
METRICS = ("L1", "L1_edit", "SSIM", "PSNR")


@pytest.fixture(scope="module")
def odd_root(tmp_path_factory) -> Path:
    from datamodules.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("synthetic-odd")
    generate_synthetic(root, num_train=4, num_val=2, num_test=NUM_TEST, resolution=32, seed=0)
    return root


def cli_args(tiny_dir: Path, root: Path, save: Path) -> list[str]:
    return [
        "test", "-c", CONFIG,
        "--model.init_args.diffusion_path", str(tiny_dir / "instruct-pix2pix"),
        "--model.init_args.num_inference_steps", "2",
        "--model.init_args.extra_metrics", "[PSNR]",
        "--data.init_args.root", str(root),
        "--data.init_args.num_train", "4",
        "--data.init_args.num_val", "2",
        "--data.init_args.num_test", str(NUM_TEST),
        "--data.init_args.batch_size", "2",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(save),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tested(tiny_dir, odd_root, tmp_path_factory) -> Path:
    """One real `test` run (in process); its log dir."""
    save = tmp_path_factory.mktemp("runs")
    assert main(cli_args(tiny_dir, odd_root, save)) == 0
    (folder,) = sorted(save.glob("tiny_inspix2pix/version_*"))
    return folder


def copy_run(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "runs" / "tiny_inspix2pix" / "version_1"
    shutil.copytree(folder, target)
    return target


def report(args: list[str], out: Path, capsys) -> tuple[str, str, list[dict]]:
    assert main(["report", *args, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    with open(out / "report.csv", newline="") as f:
        return captured.out, captured.err, list(csv.DictReader(f))


def report_error(args: list[str], capsys) -> str:
    try:
        status = main(["report", *args])
    except ReportError as err:
        return str(err)
    assert status != 0
    return capsys.readouterr().err


def test_bundle_files_and_rows_reproduce_test_metrics(tested):
    document = json.loads((tested / "test_metrics.json").read_text())
    manifest = json.loads((tested / "manifest.json").read_text())
    rows = read_samples(tested / "samples.jsonl")
    ids = {r["id"] for r in rows}
    assert len(ids) == NUM_TEST
    images = {f"{kind}/{i}.png" for i in ids for kind in ("images", "sources", "targets")}
    listed = {"test_metrics.json", "samples.jsonl", "inputs.jsonl", *images}
    assert listed == set(manifest["files"])
    assert all((tested / name).is_file() for name in images)
    assert set(manifest["reductions"]) == set(METRICS)
    for system, prefix in (("model", "test"), ("copy", "test/copy")):
        for name in METRICS:
            values = [
                r["value"]
                for r in rows
                if (r["metric"], r["system"]) == (name, system) and r["value"] is not None
            ]
            assert len(values) >= NUM_TEST - 1  # L1_edit may skip an empty mask
            assert np.mean(values) == pytest.approx(document["metrics"][f"{prefix}/{name}"], rel=1e-6)


def test_bundle_inputs_are_the_datasets_samples(tested, odd_root):
    """inputs.jsonl and sources/ + targets/ hold what the DataModule gave the model: the
    instruction of each id (read back from the synthetic dataset's own files) and its images."""
    from datamodules.synthetic import SyntheticEditDataModule

    lines = (odd_root / "test.jsonl").read_text().splitlines()
    instructions = {r["id"]: r["instruction"] for r in map(json.loads, lines)}
    dm = SyntheticEditDataModule(
        root=str(odd_root), num_train=4, num_val=2, num_test=NUM_TEST, resolution=32
    )
    dm.setup("test")
    dataset = dm.datasets["test"]
    expected = {s["id"]: s for s in (dataset[i] for i in range(NUM_TEST))}
    inputs = read_inputs(tested)
    assert set(inputs) == set(expected) == set(instructions)
    for sample_id, row in inputs.items():
        assert row["instruction"] == instructions[sample_id]
        assert row["dataset"] == "synthetic"
        for kind, key in (("sources", "source"), ("targets", "target")):
            saved = np.asarray(Image.open(tested / kind / f"{sample_id}.png").convert("RGB"))
            want = ((expected[sample_id][key].permute(1, 2, 0).numpy() + 1) / 2 * 255).round()
            assert np.abs(saved.astype(float) - want).max() <= 1, (kind, sample_id)


def test_report_recomputes_and_shows_intervals(tested, tmp_path, capsys):
    printed, _, rows = report([str(tested)], tmp_path / "out", capsys)
    assert "recomputed from their per-sample files" in printed
    assert "agree with test_metrics.json" in printed
    (row,) = rows
    for name in ("L1", "SSIM"):
        mean = float(row[f"synthetic/{name} mean"])
        low, high = float(row[f"synthetic/{name} lo"]), float(row[f"synthetic/{name} hi"])
        assert low < mean < high, (name, low, mean, high)
    assert "[" in printed.split("\n\n")[1]  # the interval in the markdown cell


def test_report_names_a_missing_image(tested, tmp_path, capsys):
    run = copy_run(tested, tmp_path)
    victim = sorted((run / "images").glob("*.png"))[0]
    victim.unlink()
    message = report_error([str(run)], capsys)
    assert victim.name in message and "missing" in message


def test_report_names_an_edited_samples_file(tested, tmp_path, capsys):
    run = copy_run(tested, tmp_path)
    samples = run / "samples.jsonl"
    lines = samples.read_text().splitlines()
    row = json.loads(lines[0])
    row["value"] = row["value"] + 0.25
    lines[0] = json.dumps(row)
    samples.write_text("\n".join(lines) + "\n")
    message = report_error([str(run)], capsys)
    assert "samples.jsonl" in message and "changed" in message


def test_report_rejects_rows_that_do_not_reproduce(tested, tmp_path, capsys):
    """A consistent manifest over wrong rows: the recomputation itself fails, naming the key."""
    run = copy_run(tested, tmp_path)
    rows = read_samples(run / "samples.jsonl")
    rows[0]["value"] = rows[0]["value"] + 0.25
    manifest = json.loads((run / "manifest.json").read_text())
    shutil.rmtree(run / "images")
    write_bundle(run, rows, manifest["reductions"], manifest["not_recomputable"])
    message = report_error([str(run)], capsys)
    assert "do not reproduce" in message and f"/{rows[0]['metric']}" in message


def test_report_skips_fit_only_version_folder(tested, tmp_path, capsys):
    run = copy_run(tested, tmp_path)
    fit_only = run.parent / "version_0"
    (fit_only / "checkpoints").mkdir(parents=True)
    (fit_only / "hparams.yaml").write_text("{}\n")
    pattern = str(run.parent / "version_*")
    printed, err, rows = report([pattern], tmp_path / "out", capsys)
    assert f"skipped {fit_only}: no test_metrics.json" in err
    assert f"skipped {fit_only}" in printed  # and in the footnotes
    assert len(rows) == 1
    message = report_error([str(fit_only)], capsys)
    assert "no test_metrics.json" in message and str(fit_only) in message


# --------------------------------------------------------------------------- --compare


def fabricated_run(folder: Path, name: str, values: np.ndarray) -> None:
    ids = [f"x{i}" for i in range(len(values))]
    protocol = {
        "name": "synthetic", "columns": ["L1"], "scale": {"L1": 1}, "aggregation": "all",
        "aggregations": ["all"], "metrics": {"L1": {}},
    }  # fmt: skip
    document = {
        "format": FORMAT,
        "model": {"name": "M", "class_path": "m.M"},
        "run": {"name": name, "seed": 0},
        "dataset": "synthetic",
        "metrics": {"test/L1": float(np.mean(values))},
        "table": {"L1": float(np.mean(values))},
        "copy_table": {},
        "protocol": protocol,
    }
    folder.mkdir(parents=True)
    (folder / "test_metrics.json").write_text(json.dumps(document))
    rows = [
        {"id": i, "dataset": "synthetic", "session": None, "turn": None, "aggregation": "all",
         "system": "model", "metric": "L1", "value": float(v)}
        for i, v in zip(ids, values, strict=True)
    ]  # fmt: skip
    write_bundle(folder, rows, {"L1": "mean"})


def test_compare_is_scipys_paired_permutation_test(tmp_path, capsys):
    rng = np.random.default_rng(0)
    a = rng.random(8) * 0.1
    b = a + 0.02 + rng.normal(0, 0.01, 8)
    fabricated_run(tmp_path / "a", "A", a)
    fabricated_run(tmp_path / "b", "B", b)
    out = tmp_path / "out"
    printed, _, _ = report(
        [str(tmp_path / "a"), str(tmp_path / "b"), "--compare", "A", "B"], out, capsys
    )
    assert "## A vs B" in printed
    with open(out / "compare.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert int(row["n"]) == 8
    assert float(row["difference"]) == pytest.approx(np.mean(a - b), rel=1e-12)
    expected = stats.permutation_test(
        (a, b), lambda x, y, axis=-1: np.mean(x - y, axis=axis), permutation_type="samples",
        vectorized=True, n_resamples=10000,
    ).pvalue  # fmt: skip
    assert float(row["p_value"]) == pytest.approx(expected, abs=1e-12)
    assert float(row["p_value"]) < 0.05
    assert float(row["lo"]) < np.mean(a - b) < float(row["hi"]) < 0


def test_compare_unknown_row_is_an_error(tmp_path, capsys):
    fabricated_run(tmp_path / "a", "A", np.arange(4.0))
    message = report_error([str(tmp_path / "a"), "--compare", "A", "Z"], capsys)
    assert "no row Z" in message


# --------------------------------------------------------------------------- 2 processes


def run_cli(args: list[str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("LOCAL_RANK", None)
    result = subprocess.run(
        [sys.executable, "-m", "editbench", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, f"editbench {args[0]} failed:\n{result.stderr[-4000:]}"


@pytest.mark.slow
def test_two_processes_write_the_same_rows(tiny_dir, odd_root, tested, tmp_path):
    save = tmp_path / "runs2"
    run_cli(
        [
            *cli_args(tiny_dir, odd_root, save),
            "--trainer.accelerator", "cpu", "--trainer.devices", "2",
            "--trainer.strategy", "ddp",
        ]
    )  # fmt: skip
    (folder,) = sorted(save.glob("tiny_inspix2pix/version_*"))
    one = read_samples(tested / "samples.jsonl")
    two = read_samples(folder / "samples.jsonl")
    key = lambda r: (r["aggregation"], r["system"], r["metric"], r["id"])  # noqa: E731
    assert len({key(r) for r in two}) == len(two)  # no padded duplicate
    assert {r["id"] for r in two} == {r["id"] for r in one} and len({r["id"] for r in two}) == 7
    assert sorted(map(key, one)) == sorted(map(key, two))
    by_key = {key(r): r for r in one}
    for row in two:
        ref = by_key[key(row)]
        if ref["value"] is None:
            assert row["value"] is None
        elif math.isinf(ref["value"]):
            assert row["value"] == ref["value"]
        else:
            assert row["value"] == pytest.approx(ref["value"], rel=1e-5, abs=1e-5), key(row)
    manifest = json.loads((folder / "manifest.json").read_text())
    for kind in ("images/", "sources/", "targets/"):
        assert len([n for n in manifest["files"] if n.startswith(kind)]) == NUM_TEST
    assert read_inputs(folder) == read_inputs(tested)  # gathered from both ranks, no duplicate
