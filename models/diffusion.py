"""EditDiffusion: the latent diffusion core every editing model in the suite shares.

It owns the VAE, the 8-channel UNet and the schedulers of InstructPix2Pix (Brooks et al., 2023)
and knows nothing about where the text condition comes from: InsPix2Pix feeds it CLIP text
embeddings, MGIE the edit head's output, InsightEdit its bridged features. Every model therefore
trains with the same loss and samples with the same two-scale guidance.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.schedulers import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

Generator = torch.Generator | list[torch.Generator] | None


def widen_conv_in(unet: UNet2DConditionModel, in_channels: int = 8) -> UNet2DConditionModel:
    """Give a Stable Diffusion UNet the extra image-condition input channels of InstructPix2Pix.

    The new ``conv_in`` copies the pretrained weights into the first 4 input channels and
    zero-initialises the rest, so the widened UNet computes exactly what the original did until
    training teaches it to read the image latents (InstructPix2Pix, Sec. 3.2).
    """
    old = unet.conv_in
    if old.in_channels == in_channels:
        return unet
    if old.in_channels > in_channels:
        raise ValueError(f"cannot widen conv_in from {old.in_channels} to {in_channels} channels")
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)
    return unet


def load_scheduler(path: str | Path, name: str | None = None, **overrides) -> SchedulerMixin:
    """Read the scheduler config of a diffusers folder, optionally as another scheduler class.

    ``name`` is a diffusers class name such as ``"DDIMScheduler"``; the checkpoint's beta
    schedule and prediction type carry over, as with ``Scheduler.from_config`` in diffusers.
    """
    config = DDPMScheduler.load_config(path, subfolder="scheduler")
    cls_name = name or config.get("_class_name", "DDPMScheduler")
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not issubclass(cls, SchedulerMixin):
        raise ValueError(f"unknown diffusers scheduler {cls_name!r} (from {path}/scheduler)")
    return cls.from_config(config, **overrides)


@dataclass
class DiffusionLoss:
    """The terms of one training step; ``loss`` is what the optimizer sees."""

    loss: torch.Tensor
    timesteps: torch.Tensor


def uses_guidance(guidance_scale: float, image_guidance_scale: float) -> bool:
    """Whether :meth:`EditDiffusion.sample` runs the three guidance branches ``[text, image,
    none]`` (αX > 1 and αV ≥ 1) or the conditional branch alone: callers that feed the UNet
    per-row extras (image tokens, MMSM rows) size them by it."""
    return guidance_scale > 1.0 and image_guidance_scale >= 1.0


class EditDiffusion(nn.Module):
    """VAE + image-conditioned UNet + schedulers, with InstructPix2Pix training and sampling.

    Args:
        unet: a UNet whose ``in_channels`` is twice the VAE's latent channels.
        vae: the autoencoder; the image condition is its *unscaled* posterior mode, the
            denoised latent is scaled by ``vae.config.scaling_factor`` (as in the reference code).
        scheduler: the inference scheduler (any diffusers scheduler).
        noise_scheduler: the training scheduler (``DDPMScheduler`` on the same betas).
        conditioning_dropout_prob: p in the InstructPix2Pix dropout (5% text, 5% image, 5% both).
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler: SchedulerMixin,
        noise_scheduler: DDPMScheduler,
        conditioning_dropout_prob: float = 0.05,
    ) -> None:
        super().__init__()
        latent = vae.config.latent_channels
        if unet.config.in_channels != 2 * latent:
            raise ValueError(
                f"UNet has {unet.config.in_channels} input channels, expected {2 * latent} "
                f"(noisy latent + image latent); use widen_conv_in for a 4-channel UNet"
            )
        self.unet = unet
        self.vae = vae
        self.scheduler = scheduler
        self.noise_scheduler = noise_scheduler
        self.conditioning_dropout_prob = conditioning_dropout_prob

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        scheduler: str | None = None,
        prediction_type: str | None = None,
        conditioning_dropout_prob: float = 0.05,
    ) -> EditDiffusion:
        """Load an InstructPix2Pix folder, or a Stable Diffusion folder and widen its UNet."""
        path = Path(path)
        for sub in ("unet", "vae", "scheduler"):
            if not (path / sub).is_dir():
                raise FileNotFoundError(
                    f"{path / sub} not found: diffusion_path must be a diffusers InstructPix2Pix "
                    f"or Stable Diffusion folder (with unet/, vae/, scheduler/)"
                )
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
        widen_conv_in(unet, 2 * vae.config.latent_channels)
        overrides = {"prediction_type": prediction_type} if prediction_type else {}
        # Schedulers compute their tables with numpy: build them on the CPU even when Lightning
        # has made the GPU the default device for configure_model.
        with torch.device("cpu"):
            inference = load_scheduler(path, scheduler, **overrides)
            training = load_scheduler(path, "DDPMScheduler", **overrides)
        return cls(unet, vae, inference, training, conditioning_dropout_prob)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def scaling_factor(self) -> float:
        return self.vae.config.scaling_factor

    def vae_precision(self, device: torch.device):
        """A float32 VAE computes in float32 under a mixed-precision trainer too (autocast off
        around it), as diffusers' pipelines upcast the SD VAE, whose decoder overflows in
        half precision; a VAE loaded in another dtype runs as autocast decides."""
        if self.vae.dtype != torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, enabled=False)

    def encode_condition(self, images: torch.Tensor) -> torch.Tensor:
        """Image condition: the unscaled posterior mode of the source image in [-1, 1]."""
        with self.vae_precision(images.device):
            return self.vae.encode(images.to(self.vae.dtype)).latent_dist.mode()

    def encode_target(self, images: torch.Tensor, generator: Generator = None) -> torch.Tensor:
        """Denoising target: a posterior sample of the goal image, times the scaling factor."""
        with self.vae_precision(images.device):
            dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
            return dist.sample(generator) * self.scaling_factor

    def encode_pair(
        self, target: torch.Tensor, source: torch.Tensor, generator: Generator = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``encode_target(target)`` and ``encode_condition(source)`` in one VAE call (the
        encoder's cost is per image, its overhead per call); same random draws as the two."""
        with self.vae_precision(target.device):
            params = self.vae.encode(
                torch.cat([target, source]).to(self.vae.dtype)
            ).latent_dist.parameters
            goal, cond = params.chunk(2)
            latents = DiagonalGaussianDistribution(goal).sample(generator) * self.scaling_factor
            return latents, DiagonalGaussianDistribution(cond).mode()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (scaled) → images in [-1, 1] (unclamped, as the VAE decodes them)."""
        with self.vae_precision(latents.device):
            return self.vae.decode(latents.to(self.vae.dtype) / self.scaling_factor).sample

    def drop_conditions(
        self,
        text: torch.Tensor,
        null_text: torch.Tensor,
        image_latents: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """InstructPix2Pix conditioning dropout with one uniform draw r per sample.

        Text is replaced by the null condition when r < 2p, the image latent is zeroed when
        p <= r < 3p: 5% text only, 5% both, 5% image only for p = 0.05.
        """
        masks = self.dropout_masks(text.shape[0], text.device, generator)
        return _apply_dropout(masks, text, null_text, image_latents)

    def dropout_masks(
        self, batch: int, device: torch.device, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of :meth:`drop_conditions` from one uniform draw r per sample: ``drop_text``
        (r < 2p) and ``keep_image`` (not p <= r < 3p), boolean ``[B]`` on ``device``. Other
        conditions that belong with the text (InsightEdit's image tokens) drop on the same
        rows (``loss(image_tokens=...)``)."""
        p = self.conditioning_dropout_prob
        like = torch.empty(0, device=device)
        r = torch.rand(batch, device=_draw_device(generator, like), generator=generator)
        r = r.to(device)
        return r < 2 * p, ~((r >= p) & (r < 3 * p))

    def loss(
        self,
        source: torch.Tensor,
        target: torch.Tensor,
        text: torch.Tensor,
        null_text: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        image_tokens: torch.Tensor | None = None,
        null_image_tokens: torch.Tensor | None = None,
    ) -> DiffusionLoss:
        """The denoising loss of InstructPix2Pix (Eq. 2 of Brooks et al.), ε- or v-prediction.

        ``text`` is the per-sample condition [B, L, D] and ``null_text`` the dropped condition
        [1, L, D]; images are in [-1, 1]. Every random number of the step (the VAE posterior
        sample, the noise, the timesteps and the conditioning dropout) comes from
        ``generator``: training passes one per process and step (:func:`training_seeds`),
        validation a fixed one (a comparable loss).

        ``image_tokens`` [B, N, D] (optional; with ``null_image_tokens`` [1, N, D]) are extra
        condition tokens for a UNet with decoupled cross-attention (diffusers' IP-Adapter
        convention, ``encoder_hidden_states=(text, [image_tokens])``; InsightEdit's ``f_img``):
        they are replaced by their null on exactly the rows whose text is dropped (the same
        draw, :meth:`dropout_masks`); without them the loss is unchanged.
        """
        with torch.no_grad():
            latents, image_latents = self.encode_pair(target, source, generator)
        noise = randn_tensor(
            latents.shape, generator=generator, device=latents.device, dtype=latents.dtype
        )
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(
            0,
            steps,
            (latents.shape[0],),
            generator=generator,
            device=_draw_device(generator, latents),
        ).to(latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            goal = noise
        elif self.prediction_type == "v_prediction":
            goal = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")
        if image_tokens is not None and null_image_tokens is None:
            raise ValueError("loss: image_tokens need null_image_tokens (their dropped value)")
        if self.conditioning_dropout_prob > 0:
            masks = self.dropout_masks(text.shape[0], text.device, generator)
            text, image_latents = _apply_dropout(masks, text, null_text, image_latents)
            if image_tokens is not None:
                null = null_image_tokens.expand_as(image_tokens).to(image_tokens.dtype)
                image_tokens = torch.where(masks[0].view(-1, 1, 1), null, image_tokens)
        model_input = torch.cat([noisy, image_latents.to(noisy.dtype)], dim=1)
        condition = text if image_tokens is None else (text, [image_tokens.to(text.dtype)])
        pred = self.unet(
            model_input, timesteps, encoder_hidden_states=condition, return_dict=False
        )[0]
        loss = nn.functional.mse_loss(pred.float(), goal.float())
        return DiffusionLoss(loss=loss, timesteps=timesteps)

    @torch.no_grad()
    def sample(
        self,
        source: torch.Tensor,
        text: torch.Tensor,
        null_text: torch.Tensor,
        *,
        num_inference_steps: int = 100,
        guidance_scale: float = 7.5,
        image_guidance_scale: float = 1.5,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        scheduler: SchedulerMixin | None = None,
    ) -> torch.Tensor:
        """Edit ``source`` (images in [-1, 1]) under text condition ``text``; returns [-1, 1].

        Two-scale classifier-free guidance of InstructPix2Pix (Eq. 3 of Brooks et al.):
        ε = ε(∅, ∅) + αV·(ε(cI, ∅) − ε(∅, ∅)) + αX·(ε(cI, cT) − ε(cI, ∅)), with αV =
        ``image_guidance_scale`` and αX = ``guidance_scale``. The three branches
        ``[(cI, cT), (cI, ∅), (∅, ∅)]`` run in one batched UNet call per step. Random numbers are
        drawn in the order of diffusers' ``StableDiffusionInstructPix2PixPipeline`` (initial
        latents first, then the scheduler's own draws), so the same generator reproduces it.
        """
        scheduler = copy.deepcopy(scheduler or self.scheduler)
        # Latents, guidance and scheduler arithmetic stay in float32 whatever the UNet's
        # precision: under bf16 the αX-amplified branch differences would swamp the edit.
        device, dtype = source.device, torch.float32
        unet_dtype = self.unet.dtype
        batch = source.shape[0]
        guided = uses_guidance(guidance_scale, image_guidance_scale)

        scheduler.set_timesteps(num_inference_steps, device=device)
        image_latents = self.encode_condition(source).to(dtype)
        text = text.to(dtype)
        if guided:
            null = null_text.expand(batch, -1, -1).to(dtype)
            text = torch.cat([text, null, null])
            image_latents = torch.cat(
                [image_latents, image_latents, torch.zeros_like(image_latents)]
            )
        shape = (batch, self.vae.config.latent_channels, *image_latents.shape[-2:])
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        latents = latents * scheduler.init_noise_sigma
        step_kwargs = _step_kwargs(scheduler, generator)

        for t in scheduler.timesteps:
            model_input = torch.cat([latents] * 3) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            model_input = torch.cat([model_input, image_latents], dim=1).to(unet_dtype)
            eps = self.unet(
                model_input, t, encoder_hidden_states=text.to(unet_dtype), return_dict=False
            )[0]
            eps = eps.float()
            if guided:
                eps_text, eps_image, eps_uncond = eps.chunk(3)
                eps = (
                    eps_uncond
                    + guidance_scale * (eps_text - eps_image)
                    + image_guidance_scale * (eps_image - eps_uncond)
                )
            latents = scheduler.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
        return self.decode(latents.to(self.vae.dtype))


def training_seeds(seed: int, rank: int, step: int, micro_batch: int = 0) -> tuple[int, int]:
    """Two 64-bit seeds for one training micro-batch of one process, mixed by numpy's
    ``SeedSequence`` from (run seed, global rank, global step, micro-batch within the step).

    Stateless: the draws of a step depend on nothing but these numbers, so every rank draws
    its own noise, timesteps and dropout, a run is reproducible for a given seed and world size,
    and a resumed run draws exactly what the uninterrupted one would, with no RNG state saved.
    The first seed is for the step's explicit generator, the second for torch's global
    generator (module dropout and any other global draw of the step).
    """
    entropy = [int(v) % 2**64 for v in (seed, rank, step, micro_batch)]
    first, second = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint64)
    return int(first), int(second)


def _apply_dropout(
    masks: tuple[torch.Tensor, torch.Tensor],
    text: torch.Tensor,
    null_text: torch.Tensor,
    image_latents: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text → its null on the ``drop_text`` rows, image latents zeroed off the ``keep_image``
    rows (:meth:`EditDiffusion.dropout_masks`)."""
    drop_text, keep_image = masks
    text = torch.where(drop_text.view(-1, 1, 1), null_text.expand_as(text).to(text.dtype), text)
    image_latents = image_latents * keep_image.view(-1, 1, 1, 1).to(image_latents.dtype)
    return text, image_latents


def _draw_device(generator: torch.Generator | None, like: torch.Tensor) -> torch.device:
    """Where to draw random numbers: on the generator's device if one is given (a CPU
    generator then reproduces the same numbers on any accelerator), else beside ``like``."""
    return generator.device if generator is not None else like.device


def _step_kwargs(scheduler: SchedulerMixin, generator: Generator) -> dict:
    """Pass ``generator`` (and eta = 0) only to schedulers whose ``step`` accepts them."""
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs
