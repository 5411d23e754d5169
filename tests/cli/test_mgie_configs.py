"""Every tiny MGIE/LGIE config (E2E, FT, FZ and the ablation diffs) runs on the CPU: one
training step (or, for the test-only FZ, one test batch) through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from editbench.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "experiments" / "tiny"
CONFIGS = sorted(
    str(p.relative_to(REPO))
    for p in [*TINY.glob("[ml]gie_*.yaml"), *(TINY / "ablations").glob("*.yaml")]
    if p.name != "mgie_release.yaml"  # needs release files: tests/cli/test_mgie_release_cli.py
)


def layers(config: str) -> list[str]:
    """``-c base -c diff`` for a diff file (first line ``# base: FILE``), else ``-c config``."""
    first = (REPO / config).read_text().splitlines()[0]
    bases = first.split(":", 1)[1].split() if first.startswith("# base:") else []  # one or more
    base = [arg for base in bases for arg in ("-c", str(REPO / base))]
    return [*base, "-c", str(REPO / config)]


@pytest.fixture(scope="module")
def inspix2pix_ckpt(tiny_dir, synthetic_root, tmp_path_factory):
    """A one-step tiny InsPix2Pix checkpoint: the presets' `unet_init_from` (the quickstart's)."""
    runs = tmp_path_factory.mktemp("ip2p")
    args = [
        "fit",
        "-c",
        str(TINY / "inspix2pix.yaml"),
        "--model.init_args.diffusion_path", str(tiny_dir / "instruct-pix2pix"),
        "--data.init_args.root", str(synthetic_root),
        "--data.init_args.num_train", "64",
        "--data.init_args.num_val", "16",
        "--data.init_args.num_test", "16",
        "--data.init_args.batch_size", "4",
        "--trainer.logger.init_args.save_dir", str(runs),
        "--trainer.max_steps", "1",
        "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    assert main(args) == 0
    return next(runs.rglob("*.ckpt"))


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_tiny_config_runs(config, tiny_dir, synthetic_root, inspix2pix_ckpt, tmp_path):
    texts = [Path(path).read_text() for path in layers(config)[1::2]]
    llm = "llama" if any("models.mgie.LGIE" in t for t in texts) else "llava"
    test_only = "train_unet: false" in (REPO / config).read_text()
    args = [
        "test" if test_only else "fit",
        *layers(config),
        "--model.init_args.mllm_path", str(tiny_dir / llm),
        "--model.init_args.diffusion_path", str(tiny_dir / "instruct-pix2pix"),
        "--model.init_args.unet_init_from", str(inspix2pix_ckpt),
        "--model.init_args.max_new_tokens", "4",
        "--model.init_args.num_inference_steps", "2",
        "--data.init_args.root", str(synthetic_root),
        "--data.init_args.num_train", "64",
        "--data.init_args.num_val", "16",
        "--data.init_args.num_test", "16",
        "--data.init_args.batch_size", "4",
        "--data.init_args.eval_batch_size", "4",
        "--data.init_args.num_workers", "0",
        "--trainer.callbacks", "[]",
        "--trainer.enable_checkpointing", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
        "--trainer.max_steps", "1",
        "--trainer.limit_val_batches", "0",
        "--trainer.limit_test_batches", "1",
    ]  # fmt: skip
    if any("summarizer:" in t for t in texts):  # FZ/FT: the test-time summariser, tiny
        summarizer = {"path": str(tiny_dir / "t5"), "max_length": 8}
        args += ["--model.init_args.summarizer", json.dumps(summarizer),
                 "--model.init_args.narration", json.dumps({"max_new_tokens": 4})]  # fmt: skip
    assert main(args) == 0
    if test_only:
        assert next(tmp_path.rglob("test_metrics.json")).is_file()
    else:
        assert next(tmp_path.rglob("events.out.tfevents.*")).is_file()


def test_conversation_options_reach_the_mllm_from_yaml(tiny_dir, tmp_path):
    """The conversation fields of a YAML config (here as flags over the tiny MGIE preset) are
    what the built MLLM formats and reads with."""
    from editbench.cli import EditbenchCLI

    yaml_file = tmp_path / "conversation.yaml"
    yaml_file.write_text(
        "model:\n"
        "  init_args:\n"
        "    prompt_template: 'how to edit: {instruction}'\n"
        '    chat_template: "Q: <image> {prompt} A:"\n'
        "    hidden_position: token\n"
        "    new_token_init: mean\n"
    )
    args = [
        "-c", str(TINY / "mgie_e2e.yaml"),
        "-c", str(yaml_file),
        "--model.init_args.mllm_path", str(tiny_dir / "llava"),
        "--model.init_args.diffusion_path", str(tiny_dir / "instruct-pix2pix"),
        "--model.init_args.unet_init_from", "null",
        "--trainer.callbacks", "[]",
        "--trainer.logger", "false",
    ]  # fmt: skip
    model = EditbenchCLI(args=args, run=False).model
    model.configure_model()
    assert model.mllm.format_prompts(["make it red"]) == ["Q: <image> how to edit: make it red A:"]
    assert model.mllm.hidden_position == "token"
    rows = model.mllm.embed_tokens.weight[model.mllm.img_token_ids]
    mean = model.mllm.embed_tokens.weight[: min(model.mllm.img_token_ids)].mean(0)
    torch.testing.assert_close(rows, mean.expand_as(rows))
