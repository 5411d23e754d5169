"""A staged curriculum from the CLI (models/stages.py): the tiny InsPix2Pix with a two-stage
``stages:`` diff (text encoder for 2 steps, then the UNet), stage 1 fitted, then resumed into
stage 2 with ``--ckpt_path``; the checkpoints record the stage and hold what changed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel

from editbench.cli import main

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "experiments" / "tiny" / "inspix2pix.yaml")
U = "diffusion.unet."

STAGES_YAML = """\
model:
  init_args:
    stages:
      - name: text
        train: [text_encoder]
        losses: {loss_edit: 1.0}
        steps: 2
      - name: unet
        train: [unet]
        losses: {loss_edit: 1.0}
"""


def sub(state: dict, prefix: str) -> dict:
    """The tensors under ``prefix``, the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def changed(state: dict, reference: dict) -> int:
    """Floating-point tensors of ``state`` that differ from ``reference`` (which must share
    at least one key with it)."""
    common = [k for k in state if k in reference and state[k].is_floating_point()]
    assert common, "nothing to compare"
    return sum(not torch.equal(state[k], reference[k]) for k in common)


@pytest.mark.slow
def test_two_stages_from_the_cli_fit_then_resume(tiny_dir, synthetic_root, tmp_path):
    diff = tmp_path / "stages.yaml"
    diff.write_text(STAGES_YAML)
    runs = tmp_path / "runs"
    args = [
        "fit", "-c", CONFIG, "-c", str(diff),
        "--model.init_args.diffusion_path", str(tiny_dir / "instruct-pix2pix"),
        "--data.init_args.root", str(synthetic_root),
        "--data.init_args.num_train", "64",
        "--data.init_args.num_val", "16",
        "--data.init_args.num_test", "16",
        "--data.init_args.batch_size", "4",
        "--trainer.logger.init_args.save_dir", str(runs),
        "--trainer.enable_progress_bar", "false",
        "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "0",
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.log_every_n_steps", "1",
        "--image_logger.every_n_steps", "1000",
    ]  # fmt: skip
    assert main([*args, "--trainer.max_steps", "2"]) == 0
    first = next((runs / "tiny_inspix2pix" / "version_0" / "checkpoints").glob("*.ckpt"))
    assert main([*args, "--trainer.max_steps", "4", "--ckpt_path", str(first)]) == 0
    second = next((runs / "tiny_inspix2pix" / "version_1" / "checkpoints").glob("*.ckpt"))

    path = tiny_dir / "instruct-pix2pix"
    text = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").state_dict()
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").state_dict()
    one, two = (torch.load(p, map_location="cpu", weights_only=True) for p in (first, second))
    assert one["global_step"] == 2 and two["global_step"] == 4
    assert (one["stage"]["index"], one["stage"]["name"]) == (0, "text")
    assert (two["stage"]["index"], two["stage"]["name"]) == (1, "unet")
    for ckpt in (one, two):  # both groups in every stage's checkpoint, never the VAE
        keys = ckpt["state_dict"].keys()
        assert any(k.startswith("text_encoder.") for k in keys)
        assert any(k.startswith("diffusion.unet.") for k in keys)
        assert not any(k.startswith("diffusion.vae.") for k in keys)

    # stage 1 trained the text encoder only
    one_text, one_unet = sub(one["state_dict"], "text_encoder."), sub(one["state_dict"], U)
    assert changed(one_text, text) > 0
    assert changed(one_unet, unet) == 0
    # stage 2 trained the UNet only; the text encoder is stage 1's
    assert changed(sub(two["state_dict"], U), unet) > 0
    assert changed(sub(two["state_dict"], U), one_unet) > 0
    assert changed(sub(two["state_dict"], "text_encoder."), one_text) == 0

    # the separate-runs form: a list of only stage 2, initialised from stage 1's checkpoint
    only = tmp_path / "stage2.yaml"
    only.write_text(
        "model:\n  init_args:\n"
        f"    init_from: {first}\n"
        "    stages:\n      - {name: unet, train: [unet], losses: {loss_edit: 1.0}}\n"
    )
    assert main([*args, "-c", str(only), "--trainer.max_steps", "1"]) == 0
    third = next((runs / "tiny_inspix2pix" / "version_2" / "checkpoints").glob("*.ckpt"))
    three = torch.load(third, map_location="cpu", weights_only=True)
    assert (three["global_step"], three["stage"]["name"]) == (1, "unet")
    assert changed(sub(three["state_dict"], "text_encoder."), one_text) == 0
    assert changed(sub(three["state_dict"], U), one_unet) > 0

    # test from the stage-2 checkpoint alone (its stages: come back with its hyperparameters)
    test = ["test", "--ckpt_path", str(second), "--trainer.limit_test_batches", "1"]
    test += ["--model.init_args.num_inference_steps", "2"]
    test += ["--trainer.default_root_dir", str(tmp_path / "test")]
    assert main(test) == 0
    assert "stages:" in next((tmp_path / "test").rglob("config.yaml")).read_text()
    assert next((tmp_path / "test").rglob("test_metrics.json")).is_file()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = runs / "tiny_inspix2pix" / "version_1"
    events = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
    assert [e.value for e in events.Scalars("train/stage")] == [1.0, 1.0]
