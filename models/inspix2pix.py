"""InsPix2Pix: InstructPix2Pix (Brooks et al., 2023), the CLIP-text baseline of MGIE's tables."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info
from transformers import AutoTokenizer, CLIPTextModel

from models.base import EditModel, EditOutput
from models.checkpoint import read_checkpoint
from models.diffusion import EditDiffusion
from models.stages import StagedModel


class InsPix2Pix(StagedModel, EditModel):
    """CLIP text encoder → :class:`EditDiffusion`.

    Stage groups (:mod:`models.stages`): ``text_encoder`` and ``unet``; loss term ``loss_edit``.

    Args:
        diffusion_path: a diffusers InstructPix2Pix folder (the layout of
            ``timbrooks/instruct-pix2pix``) or a Stable Diffusion v1.5 folder, whose 4-channel
            UNet is then widened to 8 input channels (zero-initialised extra channels).
        scheduler: diffusers scheduler class for sampling, built from the folder's scheduler
            config (its betas carry over). ``EulerAncestralDiscreteScheduler`` by default, as
            InstructPix2Pix samples (its ``edit_cli.py``; the ``timbrooks/instruct-pix2pix``
            folder's scheduler), also from a Stable Diffusion v1.5 folder, whose own is PNDM;
            ``None`` takes the folder's own; e.g. ``DDIMScheduler`` for a deterministic one.
        prediction_type: ``epsilon`` or ``v_prediction``; ``None`` takes the folder's.
        conditioning_dropout_prob: p of the conditioning dropout (p text, p image, p both).
        train_text_encoder: also train the CLIP text encoder (frozen in the paper).
        compile_unet: ``torch.compile`` the UNet in place (state-dict keys unchanged); pays off
            on a GPU, where the tiny UNet's edits ran 1.9x faster on an H100.
        **kwargs: the :class:`EditModel` arguments (learning rate, guidance scales, metrics, ...)
            and ``stages`` (:class:`~models.stages.StagedModel`).
    """

    def __init__(
        self,
        diffusion_path: str,
        scheduler: str | None = "EulerAncestralDiscreteScheduler",
        prediction_type: str | None = None,
        conditioning_dropout_prob: float = 0.05,
        train_text_encoder: bool = False,
        compile_unet: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.diffusion_path = diffusion_path
        self.scheduler_name = scheduler
        self.prediction_type = prediction_type
        self.conditioning_dropout_prob = conditioning_dropout_prob
        self.train_text_encoder = train_text_encoder
        self.compile_unet = compile_unet
        self.frozen_modules = ("diffusion.vae",) + (() if train_text_encoder else ("text_encoder",))
        self.diffusion: EditDiffusion | None = None
        self.text_encoder: CLIPTextModel | None = None
        self.tokenizer = None
        self._null_text: torch.Tensor | None = None

    @property
    def uses_text_encoder(self) -> bool:
        """Whether the CLIP text encoder conditions the UNet (subclasses may replace it)."""
        return True

    @property
    def text_encoder_trains(self) -> bool:
        """Whether the CLIP text encoder trains now (``train_text_encoder``, or a stage)."""
        encoder = self.text_encoder
        return encoder is not None and any(p.requires_grad for p in encoder.parameters())

    def stage_groups(self) -> dict[str, list[torch.nn.Module]]:
        unet = self.diffusion.unet if self.diffusion is not None else None
        groups = {"text_encoder": [self.text_encoder], "unet": [unet]}
        return {k: [m for m in v if m is not None] for k, v in groups.items()}

    def loss_terms(self) -> tuple[str, ...]:
        return ("loss_edit",)

    def configure_model(self) -> None:
        if self.diffusion is not None:
            return
        path = Path(self.diffusion_path)
        needs_text = self.uses_text_encoder
        if needs_text and not ((path / "text_encoder").is_dir() and (path / "tokenizer").is_dir()):
            raise FileNotFoundError(
                f"{path}: diffusion_path must be a diffusers InstructPix2Pix or Stable Diffusion "
                f"folder with text_encoder/ and tokenizer/ (e.g. a local copy of "
                f"timbrooks/instruct-pix2pix, or `python -m editbench data make-tiny`)"
            )
        if needs_text:
            self.tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
            self.text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
        self.diffusion = EditDiffusion.from_pretrained(
            path,
            scheduler=self.scheduler_name,
            prediction_type=self.prediction_type,
            conditioning_dropout_prob=self.conditioning_dropout_prob,
        )
        self.diffusion.vae.requires_grad_(False).eval()
        if self.compile_unet:
            self.diffusion.unet.compile()
        if self.text_encoder is not None:
            self.text_encoder.requires_grad_(self.train_text_encoder)
            if not self.train_text_encoder:
                self.text_encoder.eval()

    def train(self, mode: bool = True):
        """Frozen submodules stay in eval mode (no dropout) while the rest trains."""
        super().train(mode)
        if self.diffusion is not None:
            self.diffusion.vae.eval()
            if self.text_encoder is not None and not self.text_encoder_trains:
                self.text_encoder.eval()
        return self

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP last hidden states [B, 77, D] of padded prompts, as the diffusers pipeline does."""
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        return self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]

    def null_text(self) -> torch.Tensor:
        """Embedding of the empty prompt [1, 77, D] (the dropped and unconditional text); cached
        while the text encoder is frozen."""
        if self.text_encoder_trains:
            self._null_text = None  # stale once the encoder trains (in some stage)
            return self.encode_text([""])
        if self._null_text is None or self._null_text.device != self.device:
            with torch.no_grad():
                self._null_text = self.encode_text([""])
        return self._null_text

    def training_losses(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        with torch.set_grad_enabled(self.text_encoder_trains and torch.is_grad_enabled()):
            text = self.encode_text(batch["instruction"])
            null = self.null_text()
        out = self.diffusion.loss(batch["source"], batch["target"], text, null, generator=generator)
        return {"loss": self.loss_weight("loss_edit") * out.loss, "loss_edit": out.loss.detach()}

    @torch.no_grad()
    def edit(
        self,
        source: torch.Tensor,
        instructions: Sequence[str],
        *,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> EditOutput:
        source = source.to(self.device)
        cond, null, expressive = self.conditions(source, instructions)
        images = self.render(
            source,
            cond,
            null,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            image_guidance_scale=image_guidance_scale,
            generator=generator,
        )
        return EditOutput(images=images, expressive=expressive)

    def conditions(self, source: torch.Tensor, instructions: Sequence[str]):
        """The text condition [B, 77, D], its null [1, 77, D], and no expressive instructions;
        models with other guidance override this."""
        return self.encode_text(instructions), self.null_text(), None

    def init_unet_from(self, path: str) -> None:
        """The UNet (and a trained CLIP text encoder) of an editbench InsPix2Pix checkpoint, for a
        model's ``unet_init_from`` (MGIE, LGIE, InsightEdit and MMIG start their diffusion model
        from a trained one); its EMA weights when it has them and ``prefer_ema_weights``."""
        checkpoint = read_checkpoint(
            path,
            what="unet_init_from checkpoint",
            hint="the tiny presets start from the quickstart model: run `python -m editbench fit "
            "-c experiments/quickstart.yaml` first, or set model.init_args.unet_init_from null",
        )
        ema = self.prefer_ema_weights and checkpoint.has_ema
        unet = checkpoint.submodule("diffusion.unet.", ema=ema)
        if not unet:
            raise FileNotFoundError(
                f"{path} holds no diffusion.unet.* weights (not an editbench model)"
            )
        self.diffusion.unet.load_state_dict(unet, strict=True)
        kind = " (its EMA weights)" if ema else ""
        rank_zero_info(f"initialised the UNet from {path}{kind}")
        text = checkpoint.submodule("text_encoder.", ema=ema)
        if text and self.text_encoder is not None:
            self.text_encoder.load_state_dict(text, strict=True)
            self._null_text = None
            rank_zero_info(f"initialised the CLIP text encoder from {path}{kind}")

    def render(
        self,
        source: torch.Tensor,
        cond: torch.Tensor,
        null: torch.Tensor,
        *,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """The αV/αX sampler on a condition ``cond`` [B, L, D] and its null [1, L, D]; unset
        arguments take the model's evaluation settings."""
        return self.diffusion.sample(
            source,
            cond,
            null,
            num_inference_steps=num_inference_steps or self.num_inference_steps,
            guidance_scale=self.guidance_scale if guidance_scale is None else guidance_scale,
            image_guidance_scale=(
                self.image_guidance_scale if image_guidance_scale is None else image_guidance_scale
            ),
            generator=generator,
        )
