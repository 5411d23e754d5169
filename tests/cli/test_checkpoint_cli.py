"""``last.ckpt`` at the final step of ``fit``, the EMA weights in ``test``/``predict``/``edit``
and the one checkpoint reader, through ``python -m editbench`` on the quickstart config
(issue 13, items 3-4). The Trainer-level randomness and EMA tests are in
tests/models/test_rng_ema_checkpoint.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from datamodules.synthetic import SyntheticEditDataModule
from models.base import CheckpointMismatchError, sample_generators
from models.inspix2pix import InsPix2Pix

REPO = Path(__file__).resolve().parents[2]
VAE_STEPS = 30  # tests/conftest.py's TEST_VAE_STEPS: make_tiny reuses the session's folder


def make_data(root) -> SyntheticEditDataModule:
    return SyntheticEditDataModule(
        root=str(root),
        resolution=32,
        batch_size=4,
        num_workers=0,
        num_train=64,
        num_val=16,
        num_test=16,
    )


MAX_STEPS = 5
EVERY = 2


def quickstart_args(tiny_dir, synthetic_root, tmp) -> list[str]:
    """The README's quickstart config with its callbacks pointed at the test's folders (the
    ModelCheckpoint block keeps its class and save_last, saving every 2 steps)."""
    config = yaml.safe_load((REPO / "experiments" / "quickstart.yaml").read_text())
    for callback in config["trainer"]["callbacks"]:
        args = callback["init_args"]
        if callback["class_path"].endswith("EnsureTinyAssets"):
            args.update(out=str(tiny_dir), vae_steps=VAE_STEPS)
        elif "every_n_train_steps" in args:
            args.update(dirpath=str(tmp / "checkpoints"), every_n_train_steps=EVERY)
    path = tmp / "quickstart.yaml"
    path.write_text(yaml.safe_dump(config))
    return [
        "-c", str(path),
        "--trainer.accelerator", "cpu",
        "--trainer.logger.init_args.save_dir", str(tmp / "runs"),
        "--trainer.enable_progress_bar", "false",
        "--trainer.limit_val_batches", "0",
        "--model.init_args.diffusion_path", str(tiny_dir / "instruct-pix2pix"),
        "--model.init_args.num_inference_steps", "3",
        "--data.init_args.root", str(synthetic_root),
        "--data.init_args.num_train", "64",
        "--data.init_args.num_val", "16",
        "--data.init_args.num_test", "16",
        "--data.init_args.batch_size", "8",
        "--data.init_args.num_workers", "0",
        "--image_logger.every_n_steps", "0",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def quickstart_fit(tiny_dir, synthetic_root, tmp_path_factory):
    """`fit -c experiments/quickstart.yaml` for 5 steps (not a multiple of the checkpoint
    interval), with an EMA and a large, constant learning rate so the EMA visibly lags."""
    from editbench.cli import main

    tmp = tmp_path_factory.mktemp("quickstart")
    args = quickstart_args(tiny_dir, synthetic_root, tmp)
    fit = [
        "fit", *args,
        "--trainer.max_steps", str(MAX_STEPS),
        "--model.init_args.ema_decay", "0.5",
        "--model.init_args.learning_rate", "0.01",
        "--model.init_args.warmup_steps", "0",
        "--model.init_args.lr_schedule", "constant",
    ]  # fmt: skip
    saved = os.environ.get("PL_GLOBAL_SEED")
    assert main(fit) == 0
    if saved is None:
        os.environ.pop("PL_GLOBAL_SEED", None)
    return tmp, args, tmp / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_last_ckpt_is_the_final_step_of_fit(quickstart_fit):
    tmp, _, last = quickstart_fit
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == MAX_STEPS
    assert checkpoint["ema"]["optimization_step"] == MAX_STEPS
    periodic = sorted(p.name for p in (tmp / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt")
    assert periodic == [f"epoch=0-step={MAX_STEPS // EVERY * EVERY}.ckpt"]


def direct_model(tiny_dir, last: Path, ema: bool) -> InsPix2Pix:
    """The checkpoint's model built by hand: its hyperparameters, the saved trainable weights
    with the EMA's averages substituted (or not) here, frozen weights from the folder."""
    raw = torch.load(last, map_location="cpu", weights_only=True)
    hparams = {k: v for k, v in raw["hyper_parameters"].items() if not k.startswith("_")}
    model = InsPix2Pix(**hparams)
    model.configure_model()
    state = model.state_dict()
    state.update(raw["state_dict"])
    if ema:
        state.update(raw["ema"]["shadow_params"])
    model.load_state_dict(state, strict=True)
    return model.eval()


def reference_edits(model: InsPix2Pix, synthetic_root) -> tuple[dict, float]:
    """The model's test edits by id ([0, 1]) and their L1 against the targets (per image mean
    absolute error of the [0, 1] images, averaged), with the evaluation's per-id noise."""
    data = make_data(synthetic_root)
    data.setup("test")
    images, l1 = {}, []
    for batch in data.test_dataloader():
        out = model.edit(
            batch["source"],
            batch["instruction"],
            num_inference_steps=model.num_inference_steps,
            generator=sample_generators(batch["id"], model.eval_seed),
        )
        pred = (out.images.float().clamp(-1, 1) + 1) / 2
        target = (batch["target"].float().clamp(-1, 1) + 1) / 2
        l1 += (pred - target).abs().mean(dim=(1, 2, 3)).tolist()
        images.update(zip(batch["id"], pred, strict=True))
    return images, float(np.mean(l1))


@pytest.fixture(scope="module")
def references(quickstart_fit, tiny_dir, synthetic_root):
    _, _, last = quickstart_fit
    return {
        ema: reference_edits(direct_model(tiny_dir, last, ema), synthetic_root)
        for ema in (True, False)
    }


@pytest.mark.slow
def test_cli_test_and_predict_use_the_ema_weights(quickstart_fit, references, tmp_path):
    from editbench.cli import main

    tmp, args, last = quickstart_fit
    (ema_images, ema_l1), (raw_images, raw_l1) = references[True], references[False]
    assert abs(ema_l1 - raw_l1) > 1e-3, "the EMA should change the edits"

    for prefer, expected in ((True, ema_l1), (False, raw_l1)):
        root = tmp_path / f"test_{prefer}"
        test = [
            "test", *args, "--ckpt_path", str(last),
            "--trainer.logger.init_args.save_dir", str(root),
            "--model.init_args.prefer_ema_weights", str(prefer).lower(),
        ]  # fmt: skip
        assert main(test) == 0
        document = json.loads(next(root.rglob("test_metrics.json")).read_text())
        assert document["metrics"]["test/L1"] == pytest.approx(expected, abs=1e-5)

    out = tmp_path / "predictions"
    predict = [
        "predict", *args, "--ckpt_path", str(last), "--prediction_writer.output_dir", str(out),
    ]  # fmt: skip
    assert main(predict) == 0
    worst_ema = worst_raw = 0.0
    for sample_id, image in ema_images.items():
        written = torch.from_numpy(np.asarray(Image.open(out / f"{sample_id}.png"))).float() / 255
        written = written.permute(2, 0, 1)
        worst_ema = max(worst_ema, float((written - image).abs().max()))
        worst_raw = max(worst_raw, float((written - raw_images[sample_id]).abs().max()))
    assert worst_ema <= 1 / 255 + 1e-4  # the PNG rounding
    assert worst_raw > 4 / 255


@pytest.mark.slow
def test_edit_command_uses_the_ema_weights_unless_raw(
    quickstart_fit, tiny_dir, synthetic_root, tmp_path, capsys
):
    from editbench.cli import main
    from editbench.commands.edit import load_image

    _, _, last = quickstart_fit
    source = next((synthetic_root / "images" / "test").glob("*source*.png"))
    image = load_image(source, 32)
    outputs = {}
    for raw in (False, True):
        output = tmp_path / f"raw_{raw}.png"
        argv = [
            "edit", "--ckpt_path", str(last), "--image", str(source), "--instruction",
            "make the red circle blue", "--output", str(output), "--num_inference_steps", "3",
            "--device", "cpu",
        ] + (["--raw_weights"] if raw else [])  # fmt: skip
        assert main(argv) == 0
        record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert record["ema"] is (not raw)
        outputs[raw] = torch.from_numpy(np.asarray(Image.open(output))).float().permute(2, 0, 1)
    for raw in (False, True):
        model = direct_model(tiny_dir, last, ema=not raw)
        expected = model.edit(
            image, ["make the red circle blue"], num_inference_steps=3,
            generator=torch.Generator().manual_seed(0),
        ).images[0]  # fmt: skip
        expected = ((expected.float().clamp(-1, 1) + 1) / 2 * 255).round()
        assert (outputs[raw] - expected).abs().max() <= 1.0
    assert (outputs[True] - outputs[False]).abs().max() > 4


# ----------------------------------------------------------------------------- the reader


def test_reader_names_the_file_on_bad_input(tmp_path, capsys):
    from editbench.cli import main
    from models.checkpoint import read_checkpoint

    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        read_checkpoint(tmp_path / "nowhere.ckpt")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointMismatchError, match="garbage.ckpt"):
        read_checkpoint(garbage)
    plain = tmp_path / "plain.ckpt"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointMismatchError, match="plain.ckpt.*state_dict"):
        read_checkpoint(plain)
    bad_ema = tmp_path / "bad_ema.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "ema": {"shadow_params": [1.0]}}, bad_ema)
    with pytest.raises(CheckpointMismatchError, match="bad_ema.ckpt.*'ema'"):
        read_checkpoint(bad_ema)
    # An EMA entry naming a weight the checkpoint does not hold; the averages replace the rest.
    odd = tmp_path / "odd.ckpt"
    shadow = {"w": torch.zeros(2), "nonexistent": torch.zeros(1)}
    torch.save(
        {"state_dict": {"w": torch.ones(2), "v": torch.ones(3)}, "global_step": 7,
         "ema": {"optimization_step": 7, "shadow_params": shadow}},
        odd,
    )  # fmt: skip
    checkpoint = read_checkpoint(odd)
    assert checkpoint.global_step == 7 and checkpoint.has_ema
    with pytest.raises(CheckpointMismatchError, match="odd.ckpt.*nonexistent"):
        checkpoint.weights(ema=True)
    del shadow["nonexistent"]
    torch.save(
        {"state_dict": {"w": torch.ones(2), "v": torch.ones(3)}, "ema": {"shadow_params": shadow}},
        odd,
    )
    weights = read_checkpoint(odd).weights(ema=True)
    assert torch.equal(weights["w"], torch.zeros(2)) and torch.equal(weights["v"], torch.ones(3))
    assert torch.equal(read_checkpoint(odd).weights(ema=False)["w"], torch.ones(2))
    # Through the CLI: one line naming the file, exit status 2.
    assert main(["test", "--ckpt_path", str(garbage)]) == 2
    assert "garbage.ckpt" in capsys.readouterr().err
