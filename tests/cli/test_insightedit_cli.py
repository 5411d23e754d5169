"""Tiny InsightEdit from the CLI: fit through the three stages in one run, test and predict from
its checkpoint, and a stage as its own fit from the previous checkpoint (``init_from``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from editbench.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "experiments" / "tiny"

SHORT_STAGES = """\
model:
  init_args:
    stages:
      - {name: align, train: [qformer, new_tokens, lora], losses: {loss_llm: 1.0, loss_align: 1.0}, steps: 2, learning_rate: 2.0e-3}
      - {name: edit, train: [qformer, new_tokens, lora, unet, iaa], losses: {loss_llm: 1.0, loss_iaa: 1.0, loss_edit: 1.0}, steps: 1}
      - {name: bim, train: [qformer, new_tokens, lora, unet, iaa, bim], losses: {loss_llm: 1.0, loss_iaa: 1.0, loss_edit: 1.0}}
"""


def common(tiny_dir, synthetic_root) -> list[str]:
    return [
        "--model.init_args.mllm_path", str(tiny_dir / "llava"),
        "--model.init_args.diffusion_path", str(tiny_dir / "instruct-pix2pix"),
        "--model.init_args.clip_path", str(tiny_dir / "clip"),
        "--model.init_args.unet_init_from", "null",
        "--model.init_args.num_mm_tokens", "4",
        "--model.init_args.num_inference_steps", "2",
        "--data.init_args.root", str(synthetic_root),
        "--data.init_args.num_train", "64",
        "--data.init_args.num_val", "16",
        "--data.init_args.num_test", "16",
        "--data.init_args.batch_size", "4",
        "--data.init_args.eval_batch_size", "8",
        "--data.init_args.num_workers", "0",
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip


def checkpoint_callback(dirpath: Path) -> str:
    return json.dumps([{
        "class_path": "editbench.callbacks.FinalStepCheckpoint",
        "init_args": {"dirpath": str(dirpath), "save_last": True, "every_n_train_steps": 100},
    }])  # fmt: skip


@pytest.mark.slow
def test_three_stages_fit_test_predict_and_a_separate_stage(tiny_dir, synthetic_root, tmp_path):
    torch.set_num_threads(1)
    diff = tmp_path / "stages.yaml"
    diff.write_text(SHORT_STAGES)
    ckpts = tmp_path / "ckpt"
    fit = [
        "fit", "-c", str(TINY / "insightedit.yaml"), "-c", str(diff),
        *common(tiny_dir, synthetic_root),
        "--trainer.callbacks", checkpoint_callback(ckpts),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.max_steps", "4",
        "--trainer.limit_val_batches", "0",
        "--trainer.num_sanity_val_steps", "0",
    ]  # fmt: skip
    assert main(fit) == 0
    last = ckpts / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    assert (ckpt["stage"]["index"], ckpt["stage"]["name"]) == (2, "bim")
    keys = list(ckpt["state_dict"])
    allowed = ("mm_tokens.", "text_stream.", "image_stream.", "diffusion.unet.")
    assert all(k.startswith(allowed) or ".lora_" in k for k in keys)
    assert not any("embed_tokens" in k or "lm_head" in k or "diffusion.vae" in k for k in keys)
    # AdamW holds state for exactly stage 3's trainable tensors (rebuilt at each boundary).
    buffers = ("text_stream.pe.positional_embedding", "text_stream.h_norm.")  # not parameters
    parameters = [k for k in keys if not k.startswith(buffers)]
    assert len(ckpt["optimizer_states"][0]["state"]) == len(parameters)

    test = [
        "test", "-c", str(TINY / "insightedit.yaml"), "--ckpt_path", str(last),
        *common(tiny_dir, synthetic_root),
        "--model.init_args.image_scale", "0.5",
        "--trainer.callbacks", "[]",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "test"),
        "--trainer.limit_test_batches", "1",
    ]  # fmt: skip
    assert main(test) == 0
    results = json.loads(next((tmp_path / "test").rglob("test_metrics.json")).read_text())
    assert "test/L1_edit" in results["metrics"] and "test/copy/L1_edit" in results["metrics"]
    assert "image_scale: 0.5" in next((tmp_path / "test").rglob("config.yaml")).read_text()

    out = tmp_path / "predictions"
    predict = [
        "predict", "-c", str(TINY / "insightedit.yaml"), "--ckpt_path", str(last),
        *common(tiny_dir, synthetic_root),
        "--trainer.callbacks", "[]",
        "--trainer.logger", "false",
        "--trainer.default_root_dir", str(tmp_path / "predict"),  # its config.yaml, not in cwd
        "--trainer.limit_predict_batches", "1",
        "--prediction_writer.output_dir", str(out),
    ]  # fmt: skip
    assert main(predict) == 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all((out / f"{r['id']}.png").is_file() for r in records)

    # Stage 3 alone, as its own fit from the checkpoint (the "separate runs" form).
    separate = tmp_path / "ckpt3"
    stage3 = [
        "fit", "-c", str(TINY / "insightedit.yaml"), "-c", str(TINY / "insightedit_stage3.yaml"),
        *common(tiny_dir, synthetic_root),
        "--model.init_args.init_from", str(last),
        "--trainer.callbacks", checkpoint_callback(separate),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs3"),
        "--trainer.max_steps", "1",
        "--trainer.limit_val_batches", "0",
        "--trainer.num_sanity_val_steps", "0",
    ]  # fmt: skip
    assert main(stage3) == 0
    again = torch.load(separate / "last.ckpt", map_location="cpu", weights_only=True)
    assert again["stage"]["name"] == "bim" and set(again["state_dict"]) == set(keys)
    changed = [k for k in keys if not torch.equal(again["state_dict"][k], ckpt["state_dict"][k])]
    assert any(k.startswith("text_stream.bim.") for k in changed)
