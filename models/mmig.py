"""MMIG: Multi-Modal Image Generator (../shared/papers/mmig.txt, Eqs. 1-22, Sec. 3.5).

``[I_new, d_new] = f_MMIG(x, w)`` (Eq. 5): a multimodal LLM with MM-Adapters describes the
target image, ``z_d = f_mllm(x, w)`` (Eq. 1, greedy), and gives its text embeddings ``e_llm``;
MMSM mixes ``e_llm`` into a DEM feature map, ``v_M = f_MMSM(e_llm, v_DEM)`` (Eq. 2); the DEM
edits, ``I_new = f_DEM(x, z_d, v_M)`` (Eq. 3); BLIP-2 captions the result, ``d_new =
BLIP2(I_new)`` (Eq. 4). No code was released; the parts:

- LLM: :class:`~models.components.mmig_llm.DescriptionLLM` (LaVIN's MM-Adapter, Eq. 6; only θ_a
  trains, ``L_MMT`` on the target description, Eqs. 7-8). The description the data gives is the
  first of ``description_keys`` a sample has (synthetic: ``expressive``, "the image shows ...").
- MMSM: :class:`~models.components.mmsm.MMSM` on the UNet block ``mmsm_block`` (mid block by
  default), ``e_6 = e_1 + f_DD(e_4)`` replacing the block's output (Eq. 12) in rows whose text
  condition is on; ``L_MMSM`` (Eq. 13) with the DEM side detached by default
  (``mmsm_detach``): Eq. 13 gives no direction, and with both sides trained ``L_MMSM`` alone is
  minimised by shrinking both (the stop-gradient of SimSiam-style alignment; a choice).
- DEM: the shared InstructPix2Pix core (:class:`~models.diffusion.EditDiffusion`) conditioned
  on the CLIP text encoder's embedding of ``dem_prompt`` (``{description}``: z_d, Eq. 3; the
  data's description in training). With ``blend_alpha`` the condition is LayerDiffusion's
  ``e_opt = α·ê_a + (1−α)·ê_b`` (Eq. 16, α = 0.7), ê_a / ê_b the embeddings of the object and
  background parts of the prompt (:func:`~models.components.dem.split_object_background`).
  Eq. 15's per-image optimisation of ê_a, ê_b is not run: ê = e (see the README). Losses:
  ``L_SDM`` (Eq. 14, on noised target latents); ``L_fg`` (Eq. 17) on the same prediction inside
  ``M_t``; ``L_bg`` (Eq. 18) outside ``M_r`` on noised *reference* (source) latents, as
  LayerDiffusion takes the background from the reference image (``bg_latents``); both with
  unsquared norms (:mod:`~models.components.attention_losses`). Masks are the data's
  ``fg_mask_key`` / ``bg_mask_key`` (synthetic: both ``mask``, the edit region: the changed
  object in the target and the reference); without one, ``L_fg`` covers the whole image and
  ``L_bg`` is 0. ``L_AS`` (Eq. 19) and ``L_AR`` (Eq. 20) on the cross-attention maps of the
  concept tokens (``concept_words`` found in the prompt), recorded at ``attention_resolution``
  (:func:`~models.components.attention_losses.install_recording`); for ``L_AR`` a second copy
  of the target latents is noised with the same ε at ``t − retention_stride`` (the next
  denoising step) and the maps at t, thresholded at ``retention_threshold``, are the proxy B_t.
- BLIP-2: ``Blip2ForConditionalGeneration`` from ``blip2_path``; ``edit`` returns its caption
  of each edited image; ``L_BLIP2`` is its LM loss on the target image and ``caption_key``.

Loss terms (Eq. 22, each weight 1 without stages): ``loss_mmt``, ``loss_mmsm``, ``loss_sdm``,
``loss_fg``, ``loss_bg``, ``loss_as``, ``loss_ar``, ``loss_blip2``; only terms whose weight is
not 0 are computed. Stage groups (Sec. 3.5): ``mmsm``, ``llm`` (the adapters), ``dem`` (the
UNet), ``blip2`` (Q-Former, query tokens, projection: BLIP-2's trained part).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from models.base import EditOutput
from models.components.attention_losses import (
    background_loss,
    blend_embeddings,
    foreground_loss,
    install_recording,
)
from models.components.dem import (
    attention_losses,
    concept_positions,
    last_text_token,
    split_object_background,
)
from models.components.mllm import PROMPT_TEMPLATE
from models.components.mmig_llm import DescriptionLLM
from models.components.mmsm import MMSM, UNetFeatureHook, mmsm_loss
from models.diffusion import uses_guidance
from models.inspix2pix import InsPix2Pix

LOSS_TERMS = ("loss_mmt", "loss_mmsm", "loss_sdm", "loss_fg", "loss_bg", "loss_as", "loss_ar",
              "loss_blip2")  # fmt: skip
DETACH = ("features", "text", "none")


class MMIG(InsPix2Pix):
    """MMIG (Eqs. 1-22); see the module docstring.

    Args:
        mllm_path: llava-hf LLaVA folder (or a causal LM folder with ``visual: false``).
        diffusion_path: InstructPix2Pix (or SD v1.5) diffusers folder: the DEM.
        blip2_path: ``Blip2ForConditionalGeneration`` folder + processor; ``None``: no captions.
        visual: the LLM sees the image.
        description_keys: batch fields holding the target description z_d (first present).
        caption_key: batch field BLIP-2 is trained to caption the target with.
        dem_prompt: the DEM's text, with ``{description}`` (z_d) and/or ``{instruction}``.
        prompt_template, chat_template, max_new_tokens, mllm_dtype: the LLM's prompt and
            decoding (:class:`DescriptionLLM`).
        adapter: MM-Adapter arguments (LaVIN: hidden 8, groups 2, dropout 0.1, scale 1,
            temperature 10).
        mmsm_dim, mmsm_heads: MMSM width and heads (not given by the paper).
        mmsm_block: the UNet block whose output is e_1 (``mid_block``: see
            :class:`UNetFeatureHook`).
        mmsm_detach: which side of Eq. 13 is a fixed target: ``features`` (e_2), ``text`` (e_3)
            or ``none``.
        blend_alpha: α of Eq. 16 (0.7); ``None``: the condition is the prompt's embedding.
        background_pattern: regex cutting a prompt into object and background text (not given
            by the paper).
        concept_words: the words whose tokens are A-STAR's concepts (not given by the paper;
            the synthetic data's objects are its shape names).
        attention_resolution: side of the maps recorded (Attend-and-Excite: 16 at 512 px;
            ``None``: every cross-attention layer).
        retention_threshold: A-STAR's proxy threshold (not given by the paper).
        retention_stride: timesteps between t and "t − 1" for L_AR (``None``: the sampler's
            spacing, num_train_timesteps // num_inference_steps).
        bg_latents: ``source`` (the reference image, LayerDiffusion) or ``target``.
        fg_mask_key, bg_mask_key: batch fields of M_t and M_r.
        blip2_max_new_tokens: caption length budget.
        unet_init_from: an editbench InsPix2Pix checkpoint whose UNet (and trained CLIP text
            encoder) start the DEM, as :class:`MGIE`'s.
        **kwargs: :class:`InsPix2Pix` / :class:`EditModel` arguments and ``stages``.
    """

    def __init__(
        self,
        mllm_path: str,
        diffusion_path: str,
        blip2_path: str | None = None,
        *,
        visual: bool = True,
        description_keys: Sequence[str] = ("expressive", "goal_caption"),
        caption_key: str = "goal_caption",
        dem_prompt: str = "{description}",
        prompt_template: str = PROMPT_TEMPLATE,
        chat_template: str | None = None,
        max_new_tokens: int = 64,
        mllm_dtype: str | None = None,
        adapter: dict | None = None,
        mmsm_dim: int = 256,
        mmsm_heads: int = 4,
        mmsm_block: str = "mid_block",
        mmsm_detach: str = "features",
        blend_alpha: float | None = 0.7,
        background_pattern: str | None = r"\s+on an?\s+",
        concept_words: list[str] | None = None,
        attention_resolution: int | None = 16,
        retention_threshold: float = 0.5,
        retention_stride: int | None = None,
        bg_latents: str = "source",
        fg_mask_key: str = "mask",
        bg_mask_key: str = "mask",
        blip2_max_new_tokens: int = 30,
        unet_init_from: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(diffusion_path, **kwargs)
        if mmsm_detach not in DETACH:
            raise ValueError(f"mmsm_detach must be one of {DETACH}, got {mmsm_detach!r}")
        if bg_latents not in ("source", "target"):
            raise ValueError(f"bg_latents must be 'source' or 'target', got {bg_latents!r}")
        if "{description}" not in dem_prompt and "{instruction}" not in dem_prompt:
            raise ValueError(f"dem_prompt needs {{description}} or {{instruction}}: {dem_prompt!r}")
        self.save_hyperparameters()
        self.mllm_path, self.blip2_path, self.visual = mllm_path, blip2_path, visual
        self.description_keys = list(description_keys)
        self.caption_key = caption_key
        self.dem_prompt = dem_prompt
        self.llm_config = {
            "visual": visual,
            "max_new_tokens": max_new_tokens,
            "prompt_template": prompt_template,
            "chat_template": chat_template,
            "torch_dtype": mllm_dtype,
            "adapter": dict(adapter or {}),
        }
        self.mmsm_config = {"dim": mmsm_dim, "num_heads": mmsm_heads}
        self.mmsm_block, self.mmsm_detach = mmsm_block, mmsm_detach
        self.blend_alpha, self.background_pattern = blend_alpha, background_pattern
        self.concept_words = list(concept_words or [])
        self.attention_resolution = attention_resolution
        self.retention_threshold, self.retention_stride = retention_threshold, retention_stride
        self.bg_latents, self.fg_mask_key, self.bg_mask_key = bg_latents, fg_mask_key, bg_mask_key
        self.blip2_max_new_tokens = blip2_max_new_tokens
        self.unet_init_from = unet_init_from
        self.mllm: DescriptionLLM | None = None
        self.mmsm: MMSM | None = None
        self.blip2 = None
        self.blip2_processor = None
        self._mmsm_rows: tuple | None = None  # (e_0, mask, rows on) for the next UNet call
        self._mmsm_out = None

    # ------------------------------------------------------------------ building
    def configure_model(self) -> None:
        if self.diffusion is not None:
            return
        super().configure_model()
        self.mllm = DescriptionLLM(self.mllm_path, **self.llm_config)
        unet = self.diffusion.unet
        width = _block_channels(unet, self.mmsm_block)
        self.mmsm = MMSM(self.mllm.hidden_size, width, **self.mmsm_config)
        self._feature_hook = UNetFeatureHook(unet, self.mmsm_block, transform=self._apply_mmsm)
        self._attention = install_recording(unet, self.attention_resolution)
        if self.blip2_path is not None:
            from transformers import Blip2ForConditionalGeneration, Blip2Processor

            self.blip2 = Blip2ForConditionalGeneration.from_pretrained(
                self.blip2_path, local_files_only=True
            )
            self.blip2_processor = Blip2Processor.from_pretrained(
                self.blip2_path, local_files_only=True
            )
            # BLIP-2's pretraining trains the Q-Former, query tokens and projection between a
            # frozen ViT and LLM; without stages (Eq. 22, end to end) they train here too.
            self.blip2.requires_grad_(False).eval()
            for module in self.stage_groups_blip2():
                module.requires_grad_(True)
            self.blip2.query_tokens.requires_grad_(True)
        self.frozen_modules = self._frozen_prefixes()
        if self.unet_init_from is not None:
            self.init_unet_from(self.unet_init_from)

    def _frozen_prefixes(self) -> tuple[str, ...]:
        prefixes = ["diffusion.vae"] + ([] if self.train_text_encoder else ["text_encoder"])
        prefixes += ["mllm." + p.rstrip(".") for p in self.mllm.frozen_prefixes()]
        if self.blip2 is not None:
            prefixes += ["blip2.vision_model", "blip2.language_model"]
        return tuple(prefixes)

    def stage_groups(self) -> dict[str, list[torch.nn.Module]]:
        groups = {
            "mmsm": [self.mmsm],
            "llm": self.mllm.adapter_modules(),
            "dem": [self.diffusion.unet],
            "blip2": self.stage_groups_blip2(),
        }
        return groups

    def stage_groups_blip2(self) -> list[torch.nn.Module]:
        """BLIP-2's trained part: the Q-Former and the projection (plus the query tokens)."""
        if self.blip2 is None:
            return []
        return [self.blip2.qformer, self.blip2.language_projection]

    def loss_terms(self) -> tuple[str, ...]:
        return LOSS_TERMS

    def apply_stage(self, stage) -> None:
        """The stage's groups; BLIP-2's query tokens (a bare parameter) go with ``blip2``."""
        super().apply_stage(stage)
        if self.blip2 is not None:
            self.blip2.query_tokens.requires_grad_("blip2" in stage.train)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.mllm is not None:
            self.mllm.train(mode)
        if self.blip2 is not None:
            self.blip2.eval()
            trains = any(p.requires_grad for p in self.blip2.qformer.parameters())
            self.blip2.qformer.train(mode and trains)
        return self

    def _trains(self, *modules) -> bool:
        return any(p.requires_grad for m in modules for p in m.parameters())

    # ------------------------------------------------------------------ MMSM inside the UNet
    def _apply_mmsm(self, e1: torch.Tensor) -> torch.Tensor:
        """The UNet block's output e_1 → e_6 (Eq. 12) in the rows whose text is on."""
        if self._mmsm_rows is None:
            return e1
        e0, mask, on = self._mmsm_rows
        if e0.shape[0] != e1.shape[0]:
            raise ValueError(f"MMSM has {e0.shape[0]} text rows for a UNet batch {e1.shape[0]}")
        out = self.mmsm(e0, e1, mask)
        self._mmsm_out = out
        return torch.where(on.view(-1, 1, 1, 1), out.e6, e1)

    # ------------------------------------------------------------------ text
    def descriptions(self, batch: dict) -> list[str]:
        """The data's target description z_d of each sample (first of ``description_keys``)."""
        for key in self.description_keys:
            values = batch.get(key)
            if values is not None and all(v is not None for v in values):
                return [str(v) for v in values]
        raise KeyError(
            f"MMIG trains on target descriptions: the batch has none of {self.description_keys} "
            f"for samples {batch['id'][:3]}"
        )

    def dem_prompts(self, descriptions: Sequence[str], instructions: Sequence[str]) -> list[str]:
        return [
            self.dem_prompt.replace("{description}", d).replace("{instruction}", i)
            for d, i in zip(descriptions, instructions, strict=True)
        ]

    def dem_condition(self, prompts: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
        """The DEM's condition ([B, 77, D]) and the texts whose tokens the concepts index:
        ``e_opt`` (Eq. 16) of the object and background texts, or the prompt's embedding."""
        if self.blend_alpha is None:
            return self.encode_text(prompts), list(prompts)
        parts = [split_object_background(p, self.background_pattern) for p in prompts]
        objects, backgrounds = [o for o, _ in parts], [b for _, b in parts]
        both = self.encode_text(objects + backgrounds)
        e_a, e_b = both.chunk(2)
        return blend_embeddings(e_a, e_b, self.blend_alpha), objects

    # ------------------------------------------------------------------ training
    def training_losses(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        on = {t: self.loss_weight(t) != 0 for t in LOSS_TERMS}
        source, target = batch["source"], batch["target"]
        descriptions = self.descriptions(batch)
        terms: dict[str, torch.Tensor] = {}
        extra: dict[str, torch.Tensor] = {}
        images = source if self.visual else None
        grad_llm = torch.is_grad_enabled() and self._trains(*self.mllm.adapter_modules())
        with torch.set_grad_enabled(grad_llm or (on["loss_mmt"] and torch.is_grad_enabled())):
            llm = self.mllm.describe_forward(images, batch["instruction"], descriptions)
        if on["loss_mmt"]:
            terms["loss_mmt"] = llm.loss
            extra["token_accuracy"] = llm.token_accuracy
        dem_terms = ("loss_mmsm", "loss_sdm", "loss_fg", "loss_bg", "loss_as", "loss_ar")
        if any(on[t] for t in dem_terms):
            prompts = self.dem_prompts(descriptions, batch["instruction"])
            terms.update(self._dem_losses(batch, prompts, llm.e_llm, llm.mask, on, generator))
        if on["loss_blip2"] and self.blip2 is not None:
            terms["loss_blip2"] = self.caption_loss(target, batch[self.caption_key])
        loss = self.weighted_loss(terms)
        logged = {k: v.detach() for k, v in terms.items()}
        return {"loss": loss, **logged, **{k: v.detach() for k, v in extra.items()}}

    def _dem_losses(self, batch, prompts, e_llm, e_mask, on, generator) -> dict:
        """One batched UNet call: rows [target z_t | source z_t (L_bg) | target z_{t−s} (L_AR)]."""
        diffusion = self.diffusion
        source, target = batch["source"], batch["target"]
        b = source.shape[0]
        with torch.set_grad_enabled(self.text_encoder_trains and torch.is_grad_enabled()):
            cond, concept_texts = self.dem_condition(prompts)
            null = self.null_text()
        with torch.no_grad():
            latents, image_latents = diffusion.encode_pair(target, source, generator)
            src_latents = None
            if on["loss_bg"] and self.bg_latents == "source":
                src_latents = diffusion.encode_target(source, generator)
        noise = randn_tensor(latents.shape, generator=generator, device=latents.device,
                             dtype=latents.dtype)  # fmt: skip
        scheduler = diffusion.noise_scheduler
        steps = scheduler.config.num_train_timesteps
        draw = generator.device if generator is not None else latents.device
        t = torch.randint(0, steps, (b,), generator=generator, device=draw).to(latents.device)
        text, image_latents = cond, image_latents
        if diffusion.conditioning_dropout_prob > 0:
            text, image_latents = diffusion.drop_conditions(cond, null, image_latents, generator)
        text_on = ~(text == null.expand_as(text).to(text.dtype)).flatten(1).all(1)
        rows = [(latents, t)]
        if on["loss_bg"]:
            rows.append((src_latents if src_latents is not None else latents, t))
        if on["loss_ar"]:
            stride = self.retention_stride or max(1, steps // self.num_inference_steps)
            rows.append((latents, (t - stride).clamp_min(0)))
        x0 = torch.cat([r[0] for r in rows])
        ts = torch.cat([r[1] for r in rows])
        eps = noise.repeat(len(rows), 1, 1, 1)
        noisy = scheduler.add_noise(x0, eps, ts)
        goal = eps if diffusion.prediction_type == "epsilon" else scheduler.get_velocity(x0, eps, ts)
        k = len(rows)
        model_input = torch.cat([noisy, image_latents.repeat(k, 1, 1, 1).to(noisy.dtype)], 1)
        self._mmsm_rows = (e_llm.repeat(k, 1, 1), e_mask.repeat(k, 1), text_on.repeat(k))
        record = on["loss_as"] or on["loss_ar"]
        try:
            with self._attention.record() if record else contextlib.nullcontext():
                pred = diffusion.unet(model_input, ts, encoder_hidden_states=text.repeat(k, 1, 1),
                                      return_dict=False)[0]  # fmt: skip
            mmsm_out, maps = self._mmsm_out, (self._attention.aggregate() if record else None)
        finally:
            self._mmsm_rows, self._mmsm_out = None, None
        pred, goal = pred.float(), goal.float()
        terms = {}
        if on["loss_sdm"]:
            terms["loss_sdm"] = F.mse_loss(pred[:b], goal[:b])
        if on["loss_mmsm"]:
            terms["loss_mmsm"] = self._mmsm_loss(mmsm_out, e_mask, text_on, b)
        if on["loss_fg"]:
            mask = batch.get(self.fg_mask_key)
            mask = torch.ones_like(source[:, :1]) if mask is None else mask
            terms["loss_fg"] = foreground_loss(goal[:b], pred[:b], mask)
        if on["loss_bg"]:
            mask = batch.get(self.bg_mask_key)
            mask = torch.ones_like(source[:, :1]) if mask is None else mask
            terms["loss_bg"] = background_loss(goal[b : 2 * b], pred[b : 2 * b], mask)
        if record:
            terms.update(self._attention_terms(maps, concept_texts, text_on, on, b))
        return terms

    def _mmsm_loss(self, out, mask, text_on, b) -> torch.Tensor:
        e3, e2 = out.e3[:b], out.e2[:b]
        if self.mmsm_detach == "features":
            e2 = e2.detach()
        elif self.mmsm_detach == "text":
            e3 = e3.detach()
        keep = text_on[:b]
        self._last_e2_norm = out.e2[:b].detach().norm(dim=-1).mean()
        if not bool(keep.any()):
            return e3.sum() * 0
        return mmsm_loss(e3[keep], e2[keep], mask[keep])

    def _attention_terms(self, maps, texts, text_on, on, b) -> dict:
        positions = concept_positions(self.tokenizer, texts, self.concept_words)
        positions = [p if bool(keep) else [] for p, keep in zip(positions, text_on, strict=True)]
        ends = last_text_token(self.tokenizer, texts)
        maps_next = maps[-b:] if on["loss_ar"] else None
        as_, ar = attention_losses(
            maps[:b], maps_next, positions, ends, threshold=self.retention_threshold
        )
        zero = maps.sum() * 0  # a term no sample can have: 0, on the graph
        terms = {}
        if on["loss_as"]:
            terms["loss_as"] = zero if as_ is None else as_
        if on["loss_ar"]:
            terms["loss_ar"] = zero if ar is None else ar
        return terms

    # ------------------------------------------------------------------ BLIP-2
    def _blip2_inputs(self, images: torch.Tensor, texts: Sequence[str], side: str) -> dict:
        processor = self.blip2_processor
        unit = ((images.detach().float() + 1) / 2).clamp(0, 1)
        processor.tokenizer.padding_side = side
        enc = processor(images=list(unit.cpu()), text=list(texts), return_tensors="pt",
                        padding=True, do_rescale=False)  # fmt: skip
        return {k: v.to(self.device) for k, v in enc.items()}

    def caption_loss(self, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """L_BLIP2: BLIP-2's LM loss of ``captions`` given ``images`` (the query tokens and
        padding unlabelled)."""
        enc = self._blip2_inputs(images, captions, "right")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        labels = labels.masked_fill(enc["input_ids"] == self.blip2.config.image_token_index, -100)
        return self.blip2(**enc, labels=labels).loss

    @torch.no_grad()
    def caption(self, images: torch.Tensor) -> list[str]:
        """d_new = BLIP2(I_new) (Eq. 4): greedy captions of images in [-1, 1]."""
        enc = self._blip2_inputs(images, [""] * images.shape[0], "left")
        out = self.blip2.generate(**enc, max_new_tokens=self.blip2_max_new_tokens,
                                  do_sample=False, num_beams=1)  # fmt: skip
        new = out[:, enc["input_ids"].shape[1] :]
        return [t.strip() for t in self.blip2_processor.batch_decode(new, skip_special_tokens=True)]

    # ------------------------------------------------------------------ inference
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
        """Eqs. 1-5: z_d and e_llm from the LLM, the DEM's αV/αX sampler with MMSM in the text
        branch, then BLIP-2's caption. ``expressive`` holds z_d."""
        source = source.to(self.device)
        llm = self.mllm.describe(source if self.visual else None, list(instructions))
        cond, _ = self.dem_condition(self.dem_prompts(llm.texts, instructions))
        gs = self.guidance_scale if guidance_scale is None else guidance_scale
        ig = self.image_guidance_scale if image_guidance_scale is None else image_guidance_scale
        b = source.shape[0]
        guided = uses_guidance(gs, ig)
        k = 3 if guided else 1
        on = torch.zeros(k * b, dtype=torch.bool, device=self.device)
        on[:b] = True
        self._mmsm_rows = (llm.e_llm.repeat(k, 1, 1), llm.mask.repeat(k, 1), on)
        try:
            images = self.render(
                source,
                cond,
                self.null_text(),
                num_inference_steps=num_inference_steps,
                guidance_scale=gs,
                image_guidance_scale=ig,
                generator=generator,
            )
        finally:
            self._mmsm_rows, self._mmsm_out = None, None
        captions = self.caption(images.clamp(-1, 1)) if self.blip2 is not None else None
        return EditOutput(images=images, expressive=llm.texts, caption=captions)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """The base's prediction record plus BLIP-2's ``caption`` of each edited image."""
        out = self.edit(batch["source"], batch["instruction"], **self._eval_kwargs(batch["id"]))
        return {
            "id": list(batch["id"]),
            "instruction": list(batch["instruction"]),
            "expressive": out.expressive,
            "caption": out.caption,
            "images": out.images.float().clamp(-1, 1).cpu(),
        }


def _block_channels(unet, name: str) -> int:
    """Output channels of a UNet block (MMSM's e_1 width)."""
    if name == "mid_block":
        return unet.config.block_out_channels[-1]
    resnets = getattr(unet.get_submodule(name), "resnets", None)
    if resnets:
        return resnets[-1].out_channels
    raise ValueError(f"cannot tell the output channels of UNet block {name!r}")
