"""Diffusion parts of the tiny checkpoints (:mod:`editbench.tiny`): the shrunk VAE, UNet and
CLIP text encoder, and the fixed-step VAE fit that also sets the VAE's `scaling_factor`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from editbench.tiny_tokenizers import CLIP_MAX_LENGTH

DEFAULT_VAE_STEPS = 400  # ~0.24 s a step on 2 cores: ~100 s to held-out L1 ~0.035 (32 px)
VAE_BATCH = 64
VAE_LR = 1e-3
VAE_KL_WEIGHT = 1e-6
VAE_POOL = 2048  # training images drawn once from sample_images(seed)
VAE_HELDOUT = 256  # held-out images from sample_images(seed + HELDOUT_SEED_OFFSET)
HELDOUT_SEED_OFFSET = 1_000_003

TEXT_HIDDEN = 64  # CLIP text encoder width = UNet cross_attention_dim

Log = Callable[[str], Any]


def _vae(resolution: int):
    """SD's AutoencoderKL shrunk: (16, 32) channels, one layer per block, 4 latent channels
    (32 px -> 16x16 latents). No attention in the mid blocks: at this size it cost 20% more
    per step on 2 cores and fitted no better."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=resolution,
        mid_block_add_attention=False,
    )


def _unet(in_channels: int, resolution: int):
    """0.73M parameters; cross-attention only in the 8x8 mid block (the CPU sweet spot)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=resolution // 2,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def _text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=TEXT_HIDDEN,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


@torch.no_grad()
def reconstruction_l1(vae, images: torch.Tensor, batch: int = 128) -> float:
    """Mean |x̂ − x| on [0, 1] images, x̂ decoded from the posterior mode (x in [-1, 1])."""
    was_training = vae.training
    vae.eval()
    total = 0.0
    for chunk in images.split(batch):
        latents = vae.encode(chunk).latent_dist.mode()
        recon = vae.decode(latents).sample.clamp(-1, 1)
        total += (recon - chunk).abs().sum().item() / 2
    vae.train(was_training)
    return total / images.numel()


@torch.no_grad()
def _latent_std(vae, images: torch.Tensor, batch: int = 128) -> float:
    vae.eval()
    latents = torch.cat([vae.encode(c).latent_dist.mode() for c in images.split(batch)])
    return latents.std().item()


def _fit_vae(
    vae, *, seed: int, resolution: int, steps: int, generator: torch.Generator, log: Log
) -> dict:
    """AdamW 1e-3, batch 64, MSE + 1e-6·KL for a fixed number of steps (deterministic): batches
    and posterior samples drawn from `generator` (make_tiny passes its "vae-fit" generator)."""
    from datamodules.synthetic import sample_images

    t0 = time.perf_counter()
    pool = sample_images(VAE_POOL, resolution, seed)
    heldout = sample_images(VAE_HELDOUT, resolution, seed + HELDOUT_SEED_OFFSET)
    data_s = time.perf_counter() - t0
    before = reconstruction_l1(vae, heldout)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=VAE_LR)
    vae.train()
    t0, cpu0 = time.perf_counter(), time.process_time()
    loss = torch.tensor(float("nan"))
    for step in range(1, steps + 1):
        index = torch.randint(len(pool), (VAE_BATCH,), generator=generator)
        images = pool[index]
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(recon, images) + VAE_KL_WEIGHT * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps:
            elapsed = time.perf_counter() - t0
            log(f"tiny: VAE step {step}/{steps} loss {loss.item():.4f} ({elapsed:.0f} s)")
    fit_s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    vae.eval()
    vae.requires_grad_(False)
    after = reconstruction_l1(vae, heldout)
    scaling_factor = round(1.0 / _latent_std(vae, heldout), 5)
    vae.register_to_config(scaling_factor=scaling_factor)
    log(
        f"tiny: VAE fitted in {fit_s:.0f} s: held-out recon L1 {before:.4f} -> {after:.4f}, "
        f"scaling_factor {scaling_factor}"
    )
    return {
        "steps": steps,
        "batch": VAE_BATCH,
        "lr": VAE_LR,
        "kl_weight": VAE_KL_WEIGHT,
        "train_images": VAE_POOL,
        "train_seed": seed,
        "heldout_images": VAE_HELDOUT,
        "heldout_seed": seed + HELDOUT_SEED_OFFSET,
        "final_loss": round(loss.item(), 6) if steps else None,
        "data_seconds": round(data_s, 2),
        "seconds": round(fit_s, 2),
        "seconds_per_step": round(fit_s / steps, 4) if steps else None,
        "cpu_seconds": round(cpu_s, 2),  # all threads; wall time suffers on a shared machine
        "threads": torch.get_num_threads(),
        "heldout_l1_before": round(before, 5),
        "heldout_l1_after": round(after, 5),
        "scaling_factor": scaling_factor,
        "scaling_factor_from": "1/std of the posterior-mode latents of the held-out images",
    }
