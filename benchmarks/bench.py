"""Speed of editbench against plain diffusers/PyTorch on the same model, batch and settings.

Reported as ratios (editbench time / reference time) measured in the same process with the
two interleaved, so machine load affects both alike. Run as ``python -m editbench benchmark``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.reference import reference_ip2p_loss


def _interleaved(
    fns: dict[str, Callable[[], None]], repeats: int, warmup: int
) -> dict[str, list[float]]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def _summary(times: dict[str, list[float]], ours: str, ref: str) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        f"{ours}_s": med[ours],
        f"{ref}_s": med[ref],
        "ratio": med[ours] / med[ref],
        "repeats": len(times[ours]),
    }


def bench_edit(path: Path, batch: int, steps: int, repeats: int, warmup: int = 1) -> dict:
    """(a) ``InsPix2Pix.edit`` against ``StableDiffusionInstructPix2PixPipeline`` on one folder."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from models.inspix2pix import InsPix2Pix

    model = InsPix2Pix(diffusion_path=str(path))
    model.configure_model()
    model.eval()
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
        path, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    size = model.diffusion.unet.config.sample_size * 2 ** (
        len(model.diffusion.vae.config.block_out_channels) - 1
    )
    source = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = ["make the red circle blue"] * batch
    kwargs = {"num_inference_steps": steps, "guidance_scale": 7.5, "image_guidance_scale": 1.5}

    def ours():
        model.edit(source, prompts, generator=torch.Generator().manual_seed(0), **kwargs)

    def diffusers_pipeline():
        pipe(
            prompt=prompts,
            image=(source + 1) / 2,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
            **kwargs,
        )

    times = _interleaved({"editbench": ours, "diffusers": diffusers_pipeline}, repeats, warmup)
    return {"batch": batch, "steps": steps, **_summary(times, "editbench", "diffusers")}


def bench_train_step(path: Path, batch: int, repeats: int, warmup: int = 2) -> dict:
    """(b) one optimisation step (forward, backward, AdamW) of ``InsPix2Pix`` against the same
    step written by hand after diffusers' training example, on copies of the same UNet."""
    import copy

    from diffusers import DDPMScheduler

    from models.inspix2pix import InsPix2Pix

    model = InsPix2Pix(diffusion_path=str(path))
    model.configure_model()
    model.train()
    ref_unet = copy.deepcopy(model.diffusion.unet)
    vae, text_encoder, tokenizer = model.diffusion.vae, model.text_encoder, model.tokenizer
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    size = model.diffusion.unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    g = torch.Generator().manual_seed(0)
    source = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    target = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    prompts = ["make the red circle blue", "remove the green square"] * (batch // 2) + [
        "add a cross"
    ] * (batch % 2)
    data = {
        "source": source,
        "target": target,
        "instruction": prompts,
        "id": [str(i) for i in range(batch)],
    }
    opt_ours = torch.optim.AdamW([p for g_ in model.param_groups() for p in g_["params"]], lr=1e-4)
    opt_ref = torch.optim.AdamW(ref_unet.parameters(), lr=1e-4)

    def ours():
        loss = model.training_losses(data)["loss"]
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def reference():
        loss = reference_ip2p_loss(
            ref_unet, vae, text_encoder, tokenizer, noise_scheduler, source, target, prompts
        )
        loss.backward()
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)

    times = _interleaved({"editbench": ours, "reference": reference}, repeats, warmup)
    return {"batch": batch, **_summary(times, "editbench", "reference")}
