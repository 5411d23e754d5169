"""Inference time of MGIE and of its "- L_ins" ablation (MGIE Table 7, Appendix: "lengthy
instructions via the MLLM will incur additional overhead (29.4 vs. ours 9.2)").

Both models edit the same images with the same sampler settings; they differ in what the MLLM
generates before the [IMG] tokens: E2E's concise instruction (``max_new_tokens`` 96, the release
demo's) against the untruncated guidance of "- L_ins" (``experiments/ablations/mgie_no_lins.yaml``:
1,024, the release's narration budget). Timed interleaved in one process (``edit()``, MLLM
generation and sampling together), reported as seconds per batch, guidance tokens generated, and
the ratio "- L_ins" / MGIE beside the paper's 29.4 / 9.2 = 3.20. With untrained tiny models the
LLM never stops early, so the ratio measures the two budgets; pass trained checkpoints
(``--mgie_ckpt``, ``--no_lins_ckpt``) to measure what the models actually generate.
"""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.bench import _interleaved, _summary

#: MGIE Appendix, "Ablation Study of Training Loss": seconds per edit on an A100.
PAPER_SECONDS = {"mgie": 9.2, "no_lins": 29.4}


def _build(mllm: Path, diffusion: Path, ckpt: str | None, **kwargs):
    from models.checkpoint import read_checkpoint
    from models.mgie import MGIE

    torch.manual_seed(0)
    model = MGIE(mllm_path=str(mllm), diffusion_path=str(diffusion), **kwargs)
    model.configure_model()
    if ckpt is not None:
        model.load_weights_from(read_checkpoint(ckpt, what="benchmark checkpoint"))
    return model.eval()


def bench_mgie_inference(
    mllm: Path,
    diffusion: Path,
    *,
    batch: int = 1,
    steps: int = 20,
    repeats: int = 3,
    budgets: tuple[int, int] = (96, 1024),
    mgie_ckpt: str | None = None,
    no_lins_ckpt: str | None = None,
    head: dict | None = None,
) -> dict:
    """Seconds per ``edit()`` of MGIE (E2E budget) and "- L_ins" (untruncated), interleaved."""
    head = head or {}
    common = {"no_repeat_ngram_size": 3, **head}
    models = {
        "mgie": _build(mllm, diffusion, mgie_ckpt, max_new_tokens=budgets[0], **common),
        "no_lins": _build(
            mllm, diffusion, no_lins_ckpt, max_new_tokens=budgets[1], train_targets="derived",
            instruction_loss_weight=0.0, **common,
        ),
    }
    diffusion_model = models["mgie"].diffusion
    blocks = len(diffusion_model.vae.config.block_out_channels) - 1
    size = diffusion_model.unet.config.sample_size * 2**blocks
    source = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = ["make the red circle blue"] * batch
    kwargs = {"num_inference_steps": steps, "guidance_scale": 7.5, "image_guidance_scale": 1.5}
    tokens = {}
    with torch.no_grad():
        for name, model in models.items():
            generation = model.mllm.generate(source, prompts)
            lengths = [len(ids) - model.num_img_tokens for ids in generation.token_ids]
            tokens[name] = sum(lengths) / len(lengths)

    def run(name):
        def edit():
            with torch.no_grad():
                models[name].edit(
                    source, prompts, generator=torch.Generator().manual_seed(0), **kwargs
                )

        return edit

    times = _interleaved({name: run(name) for name in models}, repeats, warmup=1)
    summary = _summary(times, "no_lins", "mgie")
    return {
        "batch": batch,
        "steps": steps,
        "max_new_tokens": {"mgie": budgets[0], "no_lins": budgets[1]},
        "guidance_tokens": tokens,
        **summary,
        "paper_seconds": PAPER_SECONDS,
        "paper_ratio": PAPER_SECONDS["no_lins"] / PAPER_SECONDS["mgie"],
    }
