"""``python -m editbench sweep`` on a tiny InsPix2Pix trained for two steps."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import pytest
import torch
from PIL import Image

from datamodules.synthetic import SyntheticEditDataModule
from editbench.cli import main
from editbench.commands.sweep import default_labels, parse_range, parse_scales

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "experiments" / "tiny" / "inspix2pix.yaml")
SCALES = (1.0, 2.0)
NUM_SAMPLES = 4
STEPS = 2
LABELS = ("trained", "perturbed")


@pytest.fixture(scope="module")
def checkpoints(tiny_dir, synthetic_root, tmp_path_factory):
    """A 2-step fit (its data: the synthetic fixture) and a copy with perturbed UNet weights,
    so that the two curves differ."""
    runs = tmp_path_factory.mktemp("sweep_runs")
    args = [
        "fit", "-c", CONFIG,
        "--model.init_args.diffusion_path", str(tiny_dir / "instruct-pix2pix"),
        "--data.init_args.root", str(synthetic_root),
        "--data.init_args.num_train", "64",
        "--data.init_args.num_val", "16",
        "--data.init_args.num_test", "16",
        "--data.init_args.batch_size", "4",
        "--trainer.logger.init_args.save_dir", str(runs),
        "--trainer.enable_progress_bar", "false",
        "--trainer.max_steps", "2",
        "--trainer.limit_val_batches", "0",
        "--image_logger.every_n_steps", "100",
    ]  # fmt: skip
    assert main(args) == 0
    trained = sorted(runs.rglob("*.ckpt"))[-1]
    checkpoint = torch.load(trained, map_location="cpu", weights_only=True)
    generator = torch.Generator().manual_seed(0)
    for key, value in checkpoint["state_dict"].items():
        if value.is_floating_point():
            noise = torch.randn(value.shape, generator=generator)
            checkpoint["state_dict"][key] = value + 0.05 * value.std().nan_to_num() * noise
    perturbed = runs / "perturbed.ckpt"
    torch.save(checkpoint, perturbed)
    return trained, perturbed


def sweep_args(ckpts, tiny_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "sweep", "--ckpt_path", *map(str, ckpts),
        "--image_guidance_scales", ",".join(map(str, SCALES)),
        "--clip", str(tiny_dir / "clip"),
        "--max_samples", str(NUM_SAMPLES),
        "--num_inference_steps", str(STEPS),
        "--batch_size", "2",
        "--out", str(out),
        "--device", "cpu",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def swept(checkpoints, tiny_dir, tmp_path_factory):
    """One sweep of both checkpoints: the output folder and the CSV rows."""
    out = tmp_path_factory.mktemp("sweep")
    assert main(sweep_args(checkpoints, tiny_dir, out, "--label", *LABELS)) == 0
    with (out / "sweep.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return out, rows


@pytest.mark.slow
def test_csv_rows(swept, checkpoints):
    _, rows = swept
    assert [(r["label"], float(r["image_guidance_scale"])) for r in rows] == [
        (label, s) for label in LABELS for s in SCALES
    ]
    assert [r["ckpt"] for r in rows] == [str(c) for c in checkpoints for _ in SCALES]
    assert all(float(r["guidance_scale"]) == 7.5 for r in rows)
    assert all(int(r["num_samples"]) == NUM_SAMPLES for r in rows)
    for r in rows:
        assert -1 <= float(r["clip_direction"]) <= 1 and -1 <= float(r["clip_image"]) <= 1
    by_label = {label: [float(r["clip_image"]) for r in rows if r["label"] == label] for label in LABELS}
    assert by_label["trained"] != by_label["perturbed"], "two checkpoints gave one curve"


@pytest.mark.slow
def test_csv_values_equal_an_independent_recomputation(swept, checkpoints, tiny_dir, synthetic_root):
    """The first checkpoint at αV = SCALES[1]: the first samples of the test split edited in one
    batch (the sweep used batches of 2) with the same per-sample noise, scored by the metric
    classes directly."""
    from editbench.commands.edit import load_checkpoint_model
    from metrics.features import CLIPDirectionalSimilarity, CLIPImageSimilarity
    from models.base import sample_generators

    _, rows = swept
    model, _ = load_checkpoint_model(checkpoints[0], "cpu")
    dm = SyntheticEditDataModule(
        root=str(synthetic_root), resolution=32, num_train=64, num_val=16, num_test=16
    )
    dataset = dm.make_dataset("test")
    samples = [dataset[i] for i in range(NUM_SAMPLES)]
    source = torch.stack([s["source"] for s in samples])
    ids = [s["id"] for s in samples]
    with torch.no_grad():
        edited = model.edit(
            source,
            [s["instruction"] for s in samples],
            num_inference_steps=STEPS,
            guidance_scale=7.5,
            image_guidance_scale=SCALES[1],
            generator=sample_generators(ids, 0),
        ).images.clamp(-1, 1)
    direction = CLIPDirectionalSimilarity(tiny_dir / "clip")
    direction.update(
        source, edited, [s["source_caption"] for s in samples], [s["goal_caption"] for s in samples]
    )
    image = CLIPImageSimilarity(tiny_dir / "clip")
    image.update(source, edited)
    row = next(
        r for r in rows if r["label"] == LABELS[0] and float(r["image_guidance_scale"]) == SCALES[1]
    )
    assert float(row["clip_direction"]) == pytest.approx(float(direction.compute()), abs=1e-4)
    assert float(row["clip_image"]) == pytest.approx(float(image.compute()), abs=1e-4)
    assert float(image.compute()) < 1 - 1e-4, "the edit left the input unchanged"


@pytest.mark.slow
def test_png_is_a_valid_image(swept):
    out, _ = swept
    with Image.open(out / "sweep.png") as image:
        image.verify()
    with Image.open(out / "sweep.png") as image:
        assert image.format == "PNG" and min(image.size) > 100


@pytest.mark.slow
def test_tensorboard_has_one_run_per_label_with_the_csv_values(swept):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, rows = swept
    assert sorted(p.name for p in (out / "tb").iterdir()) == sorted(LABELS)
    for label in LABELS:
        events = EventAccumulator(str(out / "tb" / label), size_guidance={"scalars": 0}).Reload()
        expected = [r for r in rows if r["label"] == label]
        for key in ("clip_direction", "clip_image", "image_guidance_scale"):
            scalars = events.Scalars(f"sweep/{key}")
            assert [e.step for e in scalars] == list(range(len(SCALES)))
            assert [e.value for e in scalars] == pytest.approx([float(r[key]) for r in expected])


def test_parse_range_and_scales():
    assert parse_range("1.0:2.2:0.2") == [1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2]
    assert parse_range("1.5:1.5:0.5") == [1.5]
    assert parse_range("1:2:0.3") == [1.0, 1.3, 1.6, 1.9]
    assert parse_scales("1.0, 1.5,2") == [1.0, 1.5, 2.0]
    for bad in ("1.0-2.2", "2.2:1.0:0.2", "1:2:0", "1:2", "a:b:c", "1:2:-0.1", "1:nan:0.1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_range(bad)


@pytest.mark.parametrize("bad", ["1.0-2.2", "2.2:1.0:0.2"])
def test_bad_range_is_an_error(bad, tmp_path, capsys):
    args = ["sweep", "--ckpt_path", str(tmp_path / "x.ckpt"), "--clip", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--range", bad, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--range" in err and bad in err
    assert not (tmp_path / "out").exists()


def test_missing_caption_key_is_an_error_naming_it(
    checkpoints, tiny_dir, synthetic_root, tmp_path, capsys
):
    """Also reads the data from a config (-c) with --data overrides instead of the checkpoint."""
    out = tmp_path / "out"
    data = ["-c", CONFIG, f"--data.init_args.root={synthetic_root}"]
    data += [f"--data.init_args.{k}=16" for k in ("num_val", "num_test")]
    data += ["--data.init_args.num_train=64"]
    args = sweep_args(checkpoints[:1], tiny_dir, out, "--caption_keys", "before,goal_caption", *data)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "'before'" in err and "--caption_keys" in err
    assert not out.exists()


def test_default_labels():
    assert default_labels([Path("a/last.ckpt"), Path("b/best.ckpt")]) == ["last", "best"]
    labels = default_labels([Path("runs/a/last.ckpt"), Path("runs/b/last.ckpt")])
    assert labels == ["a/last", "b/last"]


def test_data_comes_from_the_checkpoint_unless_a_config_is_given(checkpoints, synthetic_root):
    from editbench.commands.sweep import sweep_datamodule

    hparams = torch.load(checkpoints[0], map_location="cpu", weights_only=True)[
        "datamodule_hyper_parameters"
    ]
    dm = sweep_datamodule(None, hparams, ["--data.init_args.max_samples=3"])
    assert isinstance(dm, SyntheticEditDataModule)
    assert (dm.root, dm.num_test, dm.batch_size, dm.max_samples) == (
        str(synthetic_root), 16, 4, 3
    )
    dm = sweep_datamodule(CONFIG, hparams, ["--data.init_args.root=elsewhere"])
    assert (dm.root, dm.num_test, dm.batch_size) == ("elsewhere", 200, 16)  # the config's


@pytest.mark.slow
def test_each_point_is_a_test_run_and_test_reproduces_it(swept, checkpoints, tiny_dir, tmp_path):
    """The sweep runs `test` per grid point (its own folder with test_metrics.json and the
    run's config.yaml); `python -m editbench test` run by hand at that point, batch 1 instead
    of 2, gives the same numbers."""
    import json

    out, rows = swept
    for label in LABELS:
        for scale in SCALES:
            folder = out / "runs" / label / f"ig_{scale:g}"
            assert (folder / "test_metrics.json").is_file() and (folder / "config.yaml").is_file()
    args = [
        "test", "--ckpt_path", str(checkpoints[0]),
        "--model.init_args.image_guidance_scale", str(SCALES[1]),
        "--model.init_args.num_inference_steps", str(STEPS),
        "--model.init_args.metrics", '["CLIP_direction", "CLIP_image"]',
        "--model.init_args.backbones", json.dumps({"clip": str(tiny_dir / "clip")}),
        "--data.init_args.max_samples", str(NUM_SAMPLES),
        "--data.init_args.eval_batch_size", "1",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    assert main(args) == 0
    metrics = json.loads((tmp_path / "test_metrics.json").read_text())["metrics"]
    row = next(
        r for r in rows if r["label"] == LABELS[0] and float(r["image_guidance_scale"]) == SCALES[1]
    )
    assert float(row["clip_direction"]) == pytest.approx(metrics["test/CLIP_direction"], abs=1e-5)
    assert float(row["clip_image"]) == pytest.approx(metrics["test/CLIP_image"], abs=1e-5)
