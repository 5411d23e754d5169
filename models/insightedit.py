"""InsightEdit (Xu et al., CVPR 2025, arXiv 2411.17323; /work/shared/papers/insightedit.txt).

Comprehension: LLaVA reads the source image and the instruction and ends with r [MM] tokens
(r = 32, SmartEdit's count); ``h`` = the last-layer hidden states at the r [MM] positions
(SmartEdit: the Q-Former sees only those, /work/shared/REFERENCE.md "SmartEdit"). The LLM is
frozen and fine-tuned with LoRA (peft: r 8, alpha 16, dropout 0.05, ``q_proj``/``v_proj``,
SmartEdit's) on the language model only; the r new rows of ``embed_tokens`` and ``lm_head``
train as a separate small parameter (:class:`~models.components.mm_tokens.NewTokenRows`), so the
checkpoint holds them and not the vocabulary. ``L_LLM`` = the teacher-forced NLL of the r [MM]
tokens (not of ``</s>``; the paper: "negative log-likelihood of predicting the [MM] token").

Bridging (:mod:`models.components.bridging`): the text stream (Q-Former over ``h`` + BIM with
the source image's CLIP patch features) gives ``f_txt`` (the UNet's text condition) and ``v_txt``
(added right after ``conv_in``: SmartEdit's code, where the paper says "added to UNet input" once
and "concatenated" once); the image stream (IAA: Mapper → Linear → LayerNorm) gives ``f_img``,
with ``L_IAA = ||CLIP(I_tar) − Mapper(h)||²`` against the frozen CLIP vision model's image
embedding of the target. One CLIP vision model (``clip_path``, frozen, never saved) serves both
the IAA target and BIM's patch features of the source (SmartEdit takes the patch features from
CLIP ViT-L/14, the same model as LLaVA's tower; layer ``bim_feature_layer``, -2 = LLaVA's
``mm_vision_select_layer``, CLS dropped). Generation: decoupled cross-attention
(``Z = Attn(Q, K_txt, V_txt) + λ Attn(Q, K_img, V_img)``, λ = ``image_scale``, also an
``edit()`` argument) in an InstructPix2Pix UNet, InstructPix2Pix conditioning dropout dropping
``f_img`` on the same rows as the text (``EditDiffusion.loss(image_tokens=...)``), and the
guidance branches ``[cond, null, null]`` for ``f_img``.

Loss ``L = w_LLM L_LLM + w_IAA L_IAA + w_diff L_diff`` (+ ``w_align L_align`` in stage 1), each
weight a config field (1) times the current stage's weight (:mod:`models.stages`). Stage groups:
``qformer`` (Q-Former + queries), ``new_tokens``, ``lora``, ``unet`` (with the decoupled
attention's ``to_k_ip``/``to_v_ip``), ``iaa`` (mapper + projection), ``bim``. Loss terms:
``loss_llm``, ``loss_align``, ``loss_iaa``, ``loss_edit``. SmartEdit's stage 1 ("CE + MSE") is
``loss_llm`` (the LLM's CE on the [MM] tokens) + ``loss_align`` (MSE of the Q-Former output
against the frozen CLIP text encoder's features of ``align_text``: the instruction by default,
the text the LLM reads, as SmartEdit aligns the Q-Former with CLIP's features of the caption its
LLM reads, and the condition the InstructPix2Pix UNet was trained on). BIM runs when the
``bim`` group trains in the current stage (stages 1-2 without BIM, SmartEdit's), or as the
``use_bim`` field says. Without ``stages`` every group trains with L_LLM + L_IAA + L_diff
(stage 3's set); the alignment term is on only where a stage names it. InsightEdit's text says
only "three-stage training": the stages in the configs are SmartEdit's plus the image stream
from stage 2 (InsightEdit's addition).

Inference appends the r [MM] tokens to the prompt and reads ``h`` in one forward pass (what the
trained LLM generates after the prompt; no text is generated, so ``expressive`` is ``None``).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoImageProcessor, CLIPVisionModelWithProjection
from transformers.utils import logging as hf_logging

from models.base import EditOutput
from models.components.bridging import ImageStream, TextStream, iaa_loss
from models.components.decoupled_attention import (
    add_after_conv_in,
    guidance_image_tokens,
    image_tokens,
    install_decoupled_attention,
    set_image_scale,
)
from models.components.lm_loading import frozen_prefixes
from models.components.mllm import IGNORE_INDEX, MLLM, labelled_lm_loss
from models.components.mm_tokens import NewTokenRows, add_lora
from models.diffusion import uses_guidance
from models.inspix2pix import InsPix2Pix
from models.stages import STAGE_KEY, Stage

LOSS_TERMS = ("loss_llm", "loss_align", "loss_iaa", "loss_edit")
ALIGN_TEXTS = ("instruction", "goal_caption", "source_caption")


class InsightEdit(InsPix2Pix):
    """InsightEdit: LLaVA + [MM] tokens with LoRA, two-stream bridging, decoupled attention.

    Args:
        mllm_path: a LLaVA folder (llava-hf layout).
        diffusion_path: an InstructPix2Pix-style diffusers folder (SmartEdit starts from
            InstructDiffusion's); its frozen CLIP text encoder gives the null text (CLIP's ""),
            SmartEdit's) and the stage-1 alignment targets.
        clip_path: a CLIP folder (``CLIPModel`` or ``CLIPVisionModelWithProjection`` + image
            processor; CLIP ViT-L/14 in the paper); frozen.
        num_mm_tokens: r [MM] tokens (32, SmartEdit's).
        lora_r, lora_alpha, lora_dropout, lora_target_modules: peft ``LoraConfig`` fields
            (8, 16, 0.05, q_proj/v_proj: SmartEdit's).
        text_stream: :class:`TextStream` arguments other than the derived widths (default
            SmartEdit's sizes: 77 queries, 6 layers, 12 heads, BIM 1024/2048/2/8).
        num_image_tokens: N tokens of ``f_img`` (4, IP-Adapter's; the paper gives none).
        mapper_hidden_size: the IAA mapper's hidden width (``None``: CLIP's embedding width).
        use_image_stream: build IAA and the decoupled attention (False: the paper's "IAA ✗").
        image_scale: λ of the decoupled attention (1.0; the paper tunes it at inference).
        use_bim: run BIM (``None``: when the ``bim`` group trains in the current stage, else
            in the stage of the loaded checkpoint, else with no stages at all).
        bim_feature_layer: CLIP vision hidden-state layer of BIM's patch features.
        llm_loss_weight, align_loss_weight, iaa_loss_weight, edit_loss_weight: w_LLM, w_align,
            w_IAA, w_diff (1 each; multiplied by the stage's weight).
        align_text: the batch field whose CLIP text features the Q-Former output aligns to in
            stage 1 (``instruction``; a caption field falls back to the instruction where a
            sample has none).
        prompt_template, chat_template: the conversation (``{instruction}`` alone in LLaVA's
            vicuna_v1_1 conversation by default; not given by the paper, chosen).
        mllm_dtype: load the frozen LLaVA in bf16/fp16 (LoRA and new rows stay float32).
        gradient_checkpointing: activation checkpointing of the LLM and the UNet.
        unet_init_from: an editbench InsPix2Pix checkpoint whose UNet (and trained text
            encoder) initialise this one (the tiny preset starts from the quickstart model).
        **kwargs: :class:`InsPix2Pix` / :class:`EditModel` arguments and ``stages``.
    """

    def __init__(
        self,
        mllm_path: str,
        diffusion_path: str,
        clip_path: str,
        *,
        num_mm_tokens: int = 32,
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] | None = None,
        text_stream: dict | None = None,
        num_image_tokens: int = 4,
        mapper_hidden_size: int | None = None,
        use_image_stream: bool = True,
        image_scale: float = 1.0,
        use_bim: bool | None = None,
        bim_feature_layer: int = -2,
        llm_loss_weight: float = 1.0,
        align_loss_weight: float = 1.0,
        iaa_loss_weight: float = 1.0,
        edit_loss_weight: float = 1.0,
        align_text: str = "instruction",
        prompt_template: str = "{instruction}",
        chat_template: str | None = None,
        mllm_dtype: str | None = None,
        gradient_checkpointing: bool = False,
        unet_init_from: str | None = None,
        weight_decay: float = 0.0,
        **kwargs,
    ) -> None:
        if kwargs.get("train_text_encoder"):
            raise ValueError("InsightEdit keeps the CLIP text encoder frozen (null text, targets)")
        if align_text not in ALIGN_TEXTS:
            raise ValueError(f"align_text must be one of {ALIGN_TEXTS}, got {align_text!r}")
        super().__init__(diffusion_path, weight_decay=weight_decay, **kwargs)
        self.save_hyperparameters()
        self.mllm_path = mllm_path
        self.clip_path = clip_path
        self.num_mm_tokens = num_mm_tokens
        self.lora_config = {
            "r": lora_r,
            "alpha": lora_alpha,
            "dropout": lora_dropout,
            "target_modules": tuple(lora_target_modules or ("q_proj", "v_proj")),
        }
        self.text_stream_config = dict(text_stream or {})
        self.num_image_tokens = num_image_tokens
        self.mapper_hidden_size = mapper_hidden_size
        self.use_image_stream = use_image_stream
        self.image_scale = image_scale
        self.use_bim = use_bim
        self.bim_feature_layer = bim_feature_layer
        self.config_weights = {
            "loss_llm": llm_loss_weight,
            "loss_align": align_loss_weight,
            "loss_iaa": iaa_loss_weight if use_image_stream else 0.0,
            "loss_edit": edit_loss_weight,
        }
        self.align_text = align_text
        self.prompt_template = prompt_template
        self.chat_template = chat_template
        self.mllm_dtype = mllm_dtype
        self.gradient_checkpointing = gradient_checkpointing
        self.unet_init_from = unet_init_from
        self.mllm: MLLM | None = None
        self.mm_tokens: NewTokenRows | None = None
        self.text_stream: TextStream | None = None
        self.image_stream: ImageStream | None = None
        self.clip_vision: CLIPVisionModelWithProjection | None = None
        self.clip_processor = None
        self._lora: list[nn.Module] = []
        self._loaded_stage_train: tuple[str, ...] | None = None

    # ------------------------------------------------------------------ building
    def configure_model(self) -> None:
        if self.diffusion is not None:
            return
        super().configure_model()  # EditDiffusion + the frozen CLIP text encoder
        if self.unet_init_from is not None:
            self.init_unet_from(self.unet_init_from)
        self.mllm = MLLM(
            self.mllm_path,
            num_img_tokens=self.num_mm_tokens,
            visual=True,
            prompt_template=self.prompt_template,
            chat_template=self.chat_template,
            hidden_position="token",
            gradient_checkpointing=self.gradient_checkpointing,
            torch_dtype=self.mllm_dtype,
        )
        self._lora = add_lora(self.mllm.model.model.language_model, **self.lora_config)
        for module in self._lora:
            module.float()
        ids = self.mllm.img_token_ids
        if ids != list(range(ids[0], ids[0] + len(ids))):
            raise ValueError(f"{self.mllm_path}: the [MM] token ids are not consecutive: {ids}")
        self.mm_tokens = NewTokenRows(
            self.mllm.embed_tokens.weight[ids], self.mllm.lm_head.weight[ids], ids[0]
        )
        self.mm_tokens.attach(self.mllm.embed_tokens, self.mllm.lm_head)

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # a CLIPModel folder: its text weights go unused
        try:
            self.clip_vision = CLIPVisionModelWithProjection.from_pretrained(self.clip_path)
        finally:
            hf_logging.set_verbosity(verbosity)
        self.clip_vision.requires_grad_(False).eval()
        self.clip_processor = AutoImageProcessor.from_pretrained(self.clip_path)
        unet = self.diffusion.unet
        width = unet.config.cross_attention_dim
        self.text_stream = TextStream(
            self.mllm.hidden_size,
            hidden_size=width,
            image_feature_dim=self.clip_vision.config.hidden_size,
            unet_channels=unet.config.block_out_channels[0],
            num_tokens=self.num_mm_tokens,
            **self.text_stream_config,
        )
        if self.use_image_stream:
            self.image_stream = ImageStream(
                self.mllm.hidden_size,
                image_embed_dim=self.clip_vision.config.projection_dim,
                mapper_hidden_size=self.mapper_hidden_size,
                cross_attention_dim=width,
                num_tokens=self.num_image_tokens,
            )
            install_decoupled_attention(unet, self.num_image_tokens, self.image_scale)
        if self.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        lora = {id(p) for m in self._lora for p in m.parameters()}
        mllm_frozen = ["mllm." + p.rstrip(".") for p in frozen_prefixes(self.mllm, "", lora)]
        self.frozen_modules = ("diffusion.vae", "text_encoder", "clip_vision", *mllm_frozen)
        # Without stages every group trains (stage 3's set); a stage re-applies its own.
        self.requires_grad_(False)
        for modules in self.stage_groups().values():
            for module in modules:
                module.requires_grad_(True)
        self.text_stream.query.requires_grad_(True)

    def stage_groups(self) -> dict[str, list[nn.Module]]:
        """``qformer`` (+ the query parameter, :meth:`apply_stage`), ``new_tokens``, ``lora``,
        ``unet``, ``iaa``, ``bim``."""
        ts = self.text_stream
        return {
            "qformer": [ts.qformer],
            "new_tokens": [self.mm_tokens],
            "lora": list(self._lora),
            "unet": [self.diffusion.unet],
            "iaa": [self.image_stream] if self.image_stream is not None else [],
            "bim": [ts.bim_in, ts.image_in, ts.bim, ts.txt_out, ts.img_out],
        }

    def loss_terms(self) -> tuple[str, ...]:
        return LOSS_TERMS

    def apply_stage(self, stage: Stage) -> None:
        """:meth:`StagedModel.apply_stage`, plus the Q-Former's query parameter with ``qformer``."""
        super().apply_stage(stage)
        self.text_stream.query.requires_grad_("qformer" in stage.train)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.clip_vision is not None:
            self.clip_vision.eval()
        return self

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Remember the checkpoint's stage: evaluation runs BIM as that stage trained it."""
        record = checkpoint.get(STAGE_KEY)
        if record is not None:
            self._loaded_stage_train = tuple(record["stages"][record["index"]]["train"])
        super().on_load_checkpoint(checkpoint)

    # ------------------------------------------------------------------ state
    @property
    def bim_active(self) -> bool:
        if self.use_bim is not None:
            return self.use_bim
        if self.stage is not None:
            return "bim" in self.stage.train
        if self._loaded_stage_train is not None:
            return "bim" in self._loaded_stage_train
        return not self.stages or "bim" in self.stages[-1].train

    def term_weight(self, term: str) -> float:
        """The config weight times the stage's; the alignment term only where a stage sets it."""
        if term == "loss_align" and self.stage is None:
            return 0.0
        return self.config_weights[term] * self.loss_weight(term)

    def _mllm_trains(self) -> bool:
        params = [*self.mm_tokens.parameters(), *(p for m in self._lora for p in m.parameters())]
        return any(p.requires_grad for p in params)

    @property
    def latent_scale(self) -> int:
        return 2 ** (len(self.diffusion.vae.config.block_out_channels) - 1)

    # ------------------------------------------------------------------ forward parts
    def comprehend(
        self, source: torch.Tensor, instructions: Sequence[str], *, with_loss: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``h [B, r, H]`` (last-layer states at the r [MM] positions of prompt + [MM] tokens)
        and, ``with_loss``, L_LLM (teacher-forced NLL of the [MM] tokens) and its accuracy."""
        inputs = self.mllm.training_inputs(source, list(instructions), [""] * len(instructions))
        input_ids = inputs["input_ids"]
        with torch.set_grad_enabled(torch.is_grad_enabled() and self._mllm_trains()):
            hidden = self.mllm.hidden_states(
                input_ids, inputs["attention_mask"], inputs.get("pixel_values")
            )
            positions = self.mllm.find_img_positions(input_ids)
            h = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
            if not with_loss:
                return h.float(), None, None
            labels = inputs["labels"]
            labels = labels.masked_fill(labels == self.mllm.tokenizer.eos_token_id, IGNORE_INDEX)
            loss, accuracy = labelled_lm_loss(hidden, labels, self.mllm.lm_head)
        return h.float(), loss, accuracy

    def clip_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen CLIP vision on images in [-1, 1]: (image embeddings ``[B, E]``, patch features
        ``[B, P, C]`` of layer ``bim_feature_layer``, CLS dropped)."""
        unit = ((images.detach().float() + 1) / 2).clamp(0, 1)
        pixels = self.clip_processor(unit, do_rescale=False, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(device=images.device, dtype=self.clip_vision.dtype)
        with torch.no_grad():
            out = self.clip_vision(pixel_values=pixels, output_hidden_states=True)
        return out.image_embeds.float(), out.hidden_states[self.bim_feature_layer][:, 1:].float()

    def bridge(
        self, h: torch.Tensor, source: torch.Tensor, *, patches: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """``(f_txt, v_txt, f_img, q')`` from ``h`` (BIM reads the source's CLIP patches)."""
        bim = self.bim_active
        if bim and patches is None:
            patches = self.clip_images(source)[1]
        latent = tuple(s // self.latent_scale for s in source.shape[-2:])
        text = self.text_stream(h, patches, latent_size=latent, use_bim=bim)
        f_img = self.image_stream(h).f_img if self.image_stream is not None else None
        return text.f_txt, text.v_txt, f_img, text.q_prime

    def align_targets(self, batch: dict) -> torch.Tensor:
        """CLIP text features (the frozen encoder's last hidden states) of ``align_text``."""
        texts = batch.get(self.align_text) or [None] * len(batch["instruction"])
        texts = [t if t else i for t, i in zip(texts, batch["instruction"], strict=True)]
        with torch.no_grad():
            return self.encode_text(texts).float()

    def training_losses(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        source, instructions = batch["source"], batch["instruction"]
        on = {t: self.term_weight(t) for t in LOSS_TERMS}
        h, loss_llm, accuracy = self.comprehend(source, instructions, with_loss=bool(on["loss_llm"]))
        terms: dict[str, torch.Tensor] = {}
        logged: dict[str, torch.Tensor] = {}
        if loss_llm is not None:
            terms["loss_llm"] = loss_llm
            logged["token_accuracy"] = accuracy
        needs_clip = on["loss_iaa"] or (on["loss_edit"] and self.bim_active)
        embeds = patches = None
        if needs_clip:
            pair = torch.cat([batch["target"], source]) if on["loss_iaa"] else source
            embeds, patches = self.clip_images(pair.to(self.device))
            if on["loss_iaa"]:
                patches = patches[len(source) :]
                terms["loss_iaa"] = iaa_loss(self.image_stream.map(h), embeds[: len(source)])
        q_prime = None
        if on["loss_edit"]:
            f_txt, v_txt, f_img, q_prime = self.bridge(h, source, patches=patches)
            null_img = self.image_stream.null_tokens() if f_img is not None else None
            with add_after_conv_in(self.diffusion.unet, v_txt):
                out = self.diffusion.loss(
                    source,
                    batch["target"],
                    f_txt,
                    self.null_text(),
                    generator=generator,
                    image_tokens=f_img,
                    null_image_tokens=null_img,
                )
            terms["loss_edit"] = out.loss
        if on["loss_align"]:
            if q_prime is None:
                q_prime = self.text_stream.qformer_output(h)
            terms["loss_align"] = F.mse_loss(q_prime.float(), self.align_targets(batch))
        total = self.weighted_loss({k: self.config_weights[k] * v for k, v in terms.items()})
        return {"loss": total, **{k: v.detach() for k, v in terms.items()}, **logged}

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
        image_scale: float | None = None,
    ) -> EditOutput:
        """Edit with αV/αX guidance; ``image_scale`` is λ for this call (default the model's)."""
        source = source.to(self.device)
        h, _, _ = self.comprehend(source, instructions)
        f_txt, v_txt, f_img, _ = self.bridge(h, source)
        text_scale = self.guidance_scale if guidance_scale is None else guidance_scale
        image_gs = self.image_guidance_scale if image_guidance_scale is None else image_guidance_scale
        unet = self.diffusion.unet
        with ExitStack() as stack:
            if f_img is not None:
                guided = uses_guidance(text_scale, image_gs)
                null = self.image_stream.null_tokens()
                tokens = guidance_image_tokens(f_img, null) if guided else f_img
                stack.enter_context(image_tokens(unet, tokens))
                lam = self.image_scale if image_scale is None else image_scale
                set_image_scale(unet, lam)
                stack.callback(set_image_scale, unet, self.image_scale)
            stack.enter_context(add_after_conv_in(unet, v_txt))
            images = self.render(
                source,
                f_txt,
                self.null_text(),
                num_inference_steps=num_inference_steps,
                guidance_scale=text_scale,
                image_guidance_scale=image_gs,
                generator=generator,
            )
        return EditOutput(images=images, expressive=None)
