"""MMIG from the CLI: the tiny config's five stages (Sec. 3.5) in one short fit, then test and
predict from its checkpoint (BLIP-2 captions in the predictions JSONL); the paper config and
the per-stage diffs parse against the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from editbench.cli import main
from models.mmig import LOSS_TERMS

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "experiments" / "tiny" / "mmig.yaml"
PAPER = REPO / "experiments" / "mmig.yaml"

FIVE_STAGES = """\
model:
  init_args:
    stages:
      - {name: mmsm, train: [mmsm], losses: {loss_mmsm: 1.0, loss_sdm: 1.0}, steps: 1}
      - {name: mmsm_llm, train: [mmsm, llm], losses: {loss_mmt: 1.0, loss_mmsm: 1.0}, steps: 1}
      - {name: mmsm_dem, train: [mmsm, dem], losses: {loss_sdm: 1.0, loss_as: 1.0}, steps: 1}
      - {name: llm_mmsm_dem, train: [llm, mmsm, dem], losses: {loss_mmt: 1.0, loss_bg: 1.0},
         steps: 1}
      - {name: end_to_end, train: [llm, mmsm, dem, blip2],
         losses: {loss_mmt: 1.0, loss_mmsm: 1.0, loss_sdm: 1.0, loss_fg: 1.0, loss_bg: 1.0,
                  loss_as: 1.0, loss_ar: 1.0, loss_blip2: 1.0}}
"""


def test_configs_name_five_stages_and_known_terms():
    for path in (PAPER, TINY):
        config = yaml.safe_load(path.read_text())
        args = config["model"]["init_args"]
        assert config["model"]["class_path"] == "models.mmig.MMIG"
        stages = args["stages"]
        assert [s["name"] for s in stages] == [
            "mmsm", "mmsm_llm", "mmsm_dem", "llm_mmsm_dem", "end_to_end"
        ]  # fmt: skip
        assert [s["train"] for s in stages] == [
            ["mmsm"], ["mmsm", "llm"], ["mmsm", "dem"], ["llm", "mmsm", "dem"],
            ["llm", "mmsm", "dem", "blip2"],
        ]  # fmt: skip
        assert set(stages[-1]["losses"]) == set(LOSS_TERMS)  # Eq. 22
        assert all(set(s["losses"]) <= set(LOSS_TERMS) for s in stages)
        assert args["blend_alpha"] == 0.7  # Eq. 16
    for folder in (REPO / "experiments" / "mmig_stages", REPO / "experiments/tiny/mmig_stages"):
        diffs = sorted(folder.glob("stage*.yaml"))
        assert len(diffs) == 5
        for i, diff in enumerate(diffs, 1):
            args = yaml.safe_load(diff.read_text())["model"]["init_args"]
            assert len(args["stages"]) == 1
            assert ("init_from" in args) == (i > 1)


@pytest.mark.slow
def test_tiny_five_stage_fit_then_test_and_predict(
    tiny_dir, synthetic_root, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    runs, ckpt_dir = tmp_path / "runs", tmp_path / "ckpt"
    diff = tmp_path / "five.yaml"
    diff.write_text(
        FIVE_STAGES
        + "trainer:\n  callbacks:\n    - class_path: editbench.callbacks.FinalStepCheckpoint\n"
        + f"      init_args: {{dirpath: {ckpt_dir}, save_last: true}}\n"
    )
    common = [
        "-c", str(TINY),
        "--model.init_args.mllm_path", str(tiny_dir / "llava"),
        "--model.init_args.diffusion_path", str(tiny_dir / "instruct-pix2pix"),
        "--model.init_args.blip2_path", str(tiny_dir / "blip2"),
        "--model.init_args.unet_init_from", "null",
        "--model.init_args.max_new_tokens", "4",
        "--model.init_args.blip2_max_new_tokens", "4",
        "--model.init_args.num_inference_steps", "2",
        "--data.init_args.root", str(synthetic_root),
        "--data.init_args.num_train", "64",
        "--data.init_args.num_val", "16",
        "--data.init_args.num_test", "16",
        "--data.init_args.batch_size", "2",
        "--data.init_args.eval_batch_size", "4",
        "--data.init_args.max_samples", "4",
        "--data.init_args.num_workers", "0",
        "--trainer.logger.init_args.save_dir", str(runs),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    fit = [
        "fit", *common, "-c", str(diff), "--trainer.max_steps", "5",
        "--trainer.log_every_n_steps", "1",
    ]  # fmt: skip
    assert main(fit) == 0
    ckpt = ckpt_dir / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 5
    assert (state["stage"]["index"], state["stage"]["name"]) == (4, "end_to_end")
    keys = state["state_dict"].keys()
    for prefix in ("mmsm.", "diffusion.unet.", "blip2.qformer.", "blip2.query_tokens"):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert any("mm_adapter" in k for k in keys)
    for frozen in ("diffusion.vae.", "blip2.vision_model.", "blip2.language_model."):
        assert not any(k.startswith(frozen) for k in keys), frozen
    assert not any(k.startswith("mllm.") and "mm_adapter" not in k for k in keys)

    evaluate = [*common, "--trainer.callbacks", "[]", "--ckpt_path", str(ckpt)]
    assert main(["test", *evaluate]) == 0
    metrics = next(runs.rglob("test_metrics.json"))
    results = json.loads(metrics.read_text())["metrics"]
    assert "test/L1" in results and "test/copy/L1" in results

    out = tmp_path / "predictions"
    assert main([
        "predict", *evaluate, "--prediction_writer.output_dir", str(out)
    ]) == 0  # fmt: skip
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 4
    for record in records:
        assert isinstance(record["caption"], str) and isinstance(record["expressive"], str)
        assert (out / record["image"]).is_file()
