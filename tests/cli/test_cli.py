"""``python -m editbench`` end to end on the tiny checkpoints and a small synthetic split."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from editbench.cli import main

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "experiments" / "tiny" / "inspix2pix.yaml")


def overrides(tiny_dir: Path, synthetic_root: Path, runs: Path) -> list[str]:
    return [
        "--model.init_args.diffusion_path", str(tiny_dir / "instruct-pix2pix"),
        "--model.init_args.num_inference_steps", "3",
        "--data.init_args.root", str(synthetic_root),
        "--data.init_args.num_train", "64",
        "--data.init_args.num_val", "16",
        "--data.init_args.num_test", "16",
        "--data.init_args.batch_size", "8",
        "--trainer.logger.init_args.save_dir", str(runs),
        "--trainer.enable_progress_bar", "false",
        "--image_logger.every_n_steps", "2",
        "--image_logger.num_inference_steps", "2",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tiny_dir, synthetic_root, tmp_path_factory):
    """A 4-step fit: the run folder and its last checkpoint."""
    runs = tmp_path_factory.mktemp("runs")
    args = [
        "fit",
        "-c",
        CONFIG,
        *overrides(tiny_dir, synthetic_root, runs),
        "--trainer.max_steps",
        "4",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.log_every_n_steps",
        "1",
    ]
    assert main(args) == 0
    run = runs / "tiny_inspix2pix" / "version_0"
    ckpts = sorted((run / "checkpoints").glob("*.ckpt"))
    assert ckpts, f"no checkpoint in {run}"
    return runs, run, ckpts[-1]


def test_fit_writes_config_with_seed_checkpoint_and_tensorboard(trained):
    runs, run, ckpt = trained
    config = (run / "config.yaml").read_text()
    assert "seed_everything: 0" in config
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(
        str(run), size_guidance={"images": 0, "scalars": 0, "tensors": 0}
    ).Reload()
    tags = events.Tags()
    assert {"train/loss", "train/loss_edit", "val/loss"} <= set(tags["scalars"])
    assert any(t.startswith("lr-") for t in tags["scalars"])
    assert "train/edits" in tags["images"]
    assert any("instructions" in t for t in tags["tensors"])
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert state and all(k.startswith("diffusion.unet.") for k in state), (
        "frozen weights leaked into the checkpoint"
    )


def test_test_with_ckpt_abbreviation_writes_metrics(trained, tiny_dir, synthetic_root, capsys):
    """The brief's `test --ckpt ...` (argparse abbreviation of --ckpt_path) works."""
    runs, _, ckpt = trained
    assert (
        main(
            ["test", "-c", CONFIG, *overrides(tiny_dir, synthetic_root, runs), "--ckpt", str(ckpt)]
        )
        == 0
    )
    files = sorted(runs.glob("tiny_inspix2pix/version_*/test_metrics.json"))
    assert files
    document = json.loads(files[-1].read_text())
    metrics = document["metrics"]
    for key in (
        "test/L1",
        "test/L1_edit",
        "test/SSIM",
        "test/copy/L1",
        "test/copy/L1_edit",
        "test/copy/SSIM",
    ):
        assert key in metrics and metrics[key] == metrics[key]  # present and not NaN
    assert 0 < metrics["test/copy/L1"] < metrics["test/copy/L1_edit"]  # edits are local
    # The results say how they were measured.
    protocol = document["protocol"]
    assert document["dataset"] == protocol["name"] == "synthetic"
    assert protocol["num_samples"] == 16 and protocol["resolution"] == 32
    assert set(protocol["metrics"]) == {"L1", "L1_edit", "SSIM"}
    assert document["table"]["SSIM"] == 100 * metrics["test/SSIM"]
    assert document["run"]["sampler"]["num_inference_steps"] > 0
    assert "copy input" in capsys.readouterr().out


def test_test_from_checkpoint_alone_and_flags_override_it(trained, tmp_path):
    """`test --ckpt_path X` needs no config (model and data come from the checkpoint), and an
    explicit flag beats the checkpoint's value (Lightning's default is the reverse)."""
    _, _, ckpt = trained
    args = [
        "test",
        "--ckpt_path",
        str(ckpt),
        "--model.init_args.guidance_scale",
        "3.25",
        "--model.init_args.num_inference_steps",
        "2",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.enable_progress_bar",
        "false",
    ]
    assert main(args) == 0
    config = next(tmp_path.rglob("config.yaml")).read_text()
    assert "guidance_scale: 3.25" in config
    assert "num_inference_steps: 2" in config
    assert "SyntheticEditDataModule" in config and "instruct-pix2pix" in config
    assert next(tmp_path.rglob("test_metrics.json")).is_file()


def test_predict_writes_pngs_and_jsonl(trained, tiny_dir, synthetic_root, tmp_path):
    runs, _, ckpt = trained
    out = tmp_path / "preds"
    args = [
        "predict",
        "-c",
        CONFIG,
        *overrides(tiny_dir, synthetic_root, runs),
        "--ckpt_path",
        str(ckpt),
        "--prediction_writer.output_dir",
        str(out),
    ]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 16
    for record in records:
        image = Image.open(out / f"{record['id']}.png")
        assert image.size == (32, 32)
        assert record["instruction"]


def test_edit_command(trained, synthetic_root, tmp_path, capsys):
    _, _, ckpt = trained
    source = next((synthetic_root / "images" / "test").glob("*source*.png"))
    output = tmp_path / "out.png"
    args = [
        "edit",
        "--ckpt_path",
        str(ckpt),
        "--image",
        str(source),
        "--instruction",
        "make the red circle blue",
        "--output",
        str(output),
        "--num_inference_steps",
        "2",
    ]
    assert main(args) == 0
    assert Image.open(output).size == Image.open(source).size
    assert (
        json.loads(capsys.readouterr().out.strip().splitlines()[-1])["instruction"]
        == "make the red circle blue"
    )


def test_fast_dev_run(tiny_dir, synthetic_root, tmp_path):
    assert (
        main(
            [
                "fit",
                "-c",
                CONFIG,
                *overrides(tiny_dir, synthetic_root, tmp_path),
                "--trainer.fast_dev_run",
                "1",
            ]
        )
        == 0
    )


@pytest.mark.parametrize(
    "config", sorted(str(p.relative_to(REPO)) for p in (REPO / "experiments").rglob("*.yaml"))
)
def test_every_experiment_config_parses(config, capsys):
    """Every config parses; a diff file (first line `# base: FILE`) is layered on its base."""
    first = (REPO / config).read_text().splitlines()[0]
    bases = first.split(":", 1)[1].split() if first.startswith("# base:") else []  # one or more
    layers = [arg for base in bases for arg in ("-c", str(REPO / base))]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *layers, "-c", str(REPO / config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out


def test_unknown_config_key_names_the_key(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", CONFIG, "--model.init_args.no_such_field", "1"])
    assert exit_info.value.code != 0
    assert "no_such_field" in capsys.readouterr().err


def test_missing_config_file_names_the_path(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(tmp_path / "missing.yaml")])
    assert exit_info.value.code != 0
    assert "missing.yaml" in capsys.readouterr().err


def test_missing_checkpoint_folder_is_one_clear_line(synthetic_root, tmp_path, capsys):
    args = [
        "fit",
        "-c",
        CONFIG,
        "--model.init_args.diffusion_path",
        str(tmp_path / "no_such_folder"),
        "--data.init_args.root",
        str(synthetic_root),
        "--data.init_args.num_train",
        "64",
        "--data.init_args.num_val",
        "16",
        "--data.init_args.num_test",
        "16",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        "--trainer.fast_dev_run",
        "1",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no_such_folder" in err and "Traceback" not in err


def test_corrupt_training_image_names_file_and_row(tiny_dir, synthetic_root, tmp_path, capsys):
    import shutil

    root = tmp_path / "synthetic"
    shutil.copytree(synthetic_root, root)
    first = json.loads((root / "train.jsonl").read_text().splitlines()[0])
    (root / first["source"]).write_bytes(b"not a png")
    args = [
        "fit",
        "-c",
        CONFIG,
        *overrides(tiny_dir, root, tmp_path),
        "--trainer.fast_dev_run",
        "1",
        "--data.init_args.batch_size",
        "64",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert first["source"] in err and first["id"] in err


def test_python_m_entry_point_help():
    out = subprocess.run(
        [sys.executable, "-m", "editbench", "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 0
    for word in ("fit", "test", "predict", "edit", "data", "benchmark"):
        assert word in out.stdout


def test_data_synth_command(tmp_path, capsys):
    root = tmp_path / "synth"
    assert (
        main(
            [
                "data",
                "synth",
                "--root",
                str(root),
                "--num_train",
                "6",
                "--num_val",
                "2",
                "--num_test",
                "2",
            ]
        )
        == 0
    )
    assert len((root / "train.jsonl").read_text().splitlines()) == 6
    assert str(root) in capsys.readouterr().out


def test_data_inspect_and_verify(synthetic_root, tmp_path, capsys):
    base = [
        "-c",
        CONFIG,
        f"--data.init_args.root={synthetic_root}",
        "--data.init_args.num_train=64",
        "--data.init_args.num_val=16",
        "--data.init_args.num_test=16",
    ]
    grid = tmp_path / "grid.png"
    assert main(["data", "inspect", *base[:2], "--output", str(grid), "--", *base[2:]]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [summary[s]["count"] for s in ("train", "val", "test")] == [64, 16, 16]
    assert {"source", "target", "mask", "instruction", "expressive"} <= set(
        summary["train"]["fields"]
    )
    assert grid.is_file() and Image.open(grid).size[0] > 100
    sums = tmp_path / "sha256.txt"
    assert main(["data", "verify", *base[:2], "--checksums", str(sums), "--", *base[2:]]) == 0
    lines = sums.read_text().splitlines()
    assert len(lines) == 3 * (64 + 16 + 16)  # source, target and mask of every sample
    digest, path = lines[0].split("  ")
    import hashlib

    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == digest
    # Break one image and duplicate an id: verify lists both and fails.
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(synthetic_root, root)
    lines = (root / "val.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    (root / first["target"]).write_bytes(b"garbage")
    second = json.loads(lines[1])
    second["id"] = first["id"]
    lines[1] = json.dumps(second)
    (root / "val.jsonl").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    args = [
        "data",
        "verify",
        "-c",
        CONFIG,
        "--",
        f"--data.init_args.root={root}",
        "--data.init_args.num_train=64",
        "--data.init_args.num_val=16",
        "--data.init_args.num_test=16",
    ]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert first["target"] in out and "row 0" in out
    assert "duplicate id" in out and first["id"] in out


def test_init_from_loads_trainable_weights_only_when_not_resuming(trained, tiny_dir):
    from models.inspix2pix import InsPix2Pix

    _, _, ckpt = trained
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    model = InsPix2Pix(diffusion_path=str(tiny_dir / "instruct-pix2pix"), init_from=str(ckpt))
    model.configure_model()
    key = "diffusion.unet.conv_in.weight"
    assert not torch.equal(model.state_dict()[key], saved[key])  # training moved it
    model.load_initial_weights(ckpt)
    for k, v in saved.items():
        assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        model.load_initial_weights("nowhere.ckpt")
