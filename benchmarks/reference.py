"""Plain diffusers/PyTorch references the suite is measured against (speed) and checked against
(correctness). Written from the description of diffusers' ``train_instruct_pix2pix.py`` example,
independently of ``models.diffusion``: no editbench code is imported here."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


def reference_ip2p_loss(
    unet,
    vae,
    text_encoder,
    tokenizer,
    noise_scheduler,
    source: torch.Tensor,
    target: torch.Tensor,
    prompts: list[str],
    dropout_prob: float = 0.05,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One InstructPix2Pix training loss, step by step as the diffusers example computes it."""
    bsz = target.shape[0]
    with torch.no_grad():
        latents = vae.encode(target).latent_dist.sample(generator) * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (bsz,), generator=generator
    )
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    with torch.no_grad():
        encoder_hidden_states = encode_prompts(tokenizer, text_encoder, prompts)
        null_conditioning = encode_prompts(tokenizer, text_encoder, [""])
        original_image_embeds = vae.encode(source).latent_dist.mode()
    random_p = torch.rand(bsz, generator=generator)
    prompt_mask = (random_p < 2 * dropout_prob).reshape(bsz, 1, 1)
    encoder_hidden_states = torch.where(prompt_mask, null_conditioning, encoder_hidden_states)
    image_mask = 1 - ((random_p >= dropout_prob).float() * (random_p < 3 * dropout_prob).float())
    original_image_embeds = image_mask.reshape(bsz, 1, 1, 1) * original_image_embeds
    concatenated = torch.cat([noisy_latents, original_image_embeds], dim=1)
    if noise_scheduler.config.prediction_type == "epsilon":
        goal = noise
    else:
        goal = noise_scheduler.get_velocity(latents, noise, timesteps)
    model_pred = unet(concatenated, timesteps, encoder_hidden_states, return_dict=False)[0]
    return F.mse_loss(model_pred.float(), goal.float(), reduction="mean")
