"""MGIE and LGIE (Fu et al., "Guiding Instruction-based Image Editing via Multimodal Large
Language Models", ICLR 2024).

MGIE (Sec. 3.2-3.3): an MLLM reads the image and the instruction and answers, after the prompt
``what will this image be like if <instruction>``, with a concise expressive instruction
followed by N visual tokens ``[IMG0]..[IMG{N-1}]`` (Eq. 1-2). The conversation is the
release's (``mgie_train.py``): LLaVA's ``vicuna_v1_1`` template with its system prompt, the
instruction in single quotes and the image after the text (``prompt_template``,
``chat_template``; :mod:`models.components.mllm`). The edit head T turns the
last-layer hidden states of the [IMG] tokens (plus their word embeddings) into 77 guidance
vectors U (Eq. 3), which replace the CLIP text condition of the InstructPix2Pix diffusion model
F (Eq. 4-5). Training is end to end (Eq. 6)::

    L_all = w_ins * L_ins + w_edit * L_edit,   w_ins = 1, w_edit = 0.5

L_ins is teacher-forced cross-entropy on the expressive instruction and the [IMG] tokens;
L_edit the diffusion loss of the core (:meth:`EditDiffusion.loss`) conditioned on U, with the
conditioning dropout whose null condition is T applied to zero hidden states (the released
code's null prompt). Trainable: the MLLM's word embeddings and LM head, the edit head, the
UNet; frozen: the vision tower, projector, LLM layers, VAE (no gradients, no optimizer state,
not saved). Two AdamW groups: 5e-4 for the MLLM side (the edit head lives in the MLLM in the
released code, ``mllm.pt``) and 1e-4 for the diffusion model.

LGIE (Sec. 4.1 baseline) is the same model on a text-only LLM (LLaMA): ``visual=False``.

The FZ / FT / E2E ablation (Table 3) is ``guidance``: ``edit_head`` (E2E) or ``text``, where
the generated expressive instruction goes through the diffusion folder's CLIP text encoder as
text (FT trains the UNet on the data's expressive instructions; FZ trains nothing and is
test-only). Table 5's instruction encoders (InsPix2Pix + EncLLaMA / EncLLaVA) are ``encoder``:
no generation and no L_ins; the frozen LLM's last-layer hidden states of the prompt (its last
``num_queries`` positions), through a trained linear projection, replace the CLIP text
condition. Inference: greedy decoding with the KV cache (``max_new_tokens``), the [IMG] tokens
appended when not generated, then the αV/αX sampler; ``edit`` returns the expressive
instructions too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from models.components.edit_head import EditHead
from models.components.expressive import (
    TEXT_PROMPT_TEMPLATE,
    ExpressivePipeline,
    NarrationConfig,
    SummarizerConfig,
    config_from,
)
from models.components.mllm import MLLM, PROMPT_TEMPLATE
from models.inspix2pix import InsPix2Pix

Guidance = Literal["edit_head", "text", "encoder"]
GUIDANCES = ("edit_head", "text", "encoder")
TrainTargets = Literal["data", "derived"]
TRAIN_TARGETS = ("data", "derived")


class MGIE(InsPix2Pix):
    """MGIE: MLLM-guided image editing, trained end to end.

    Args:
        mllm_path: a LLaVA folder (llava-hf layout), or a causal LM folder when not ``visual``.
        diffusion_path: an InstructPix2Pix (or SD v1.5) diffusers folder, as for InsPix2Pix.
        visual: MGIE (the MLLM sees the image) or LGIE (instruction only).
        guidance: ``edit_head`` (E2E), ``text`` (FT/FZ: the expressive instruction as CLIP
            text) or ``encoder`` (Table 5: the LLM's hidden states of the instruction, projected).
        num_img_tokens: N visual tokens (8).
        max_new_tokens: greedy decoding budget of the expressive instruction at inference
            (96, the released ``demo.ipynb``).
        no_repeat_ngram_size: n-gram blocking in decoding (3, the released ``demo.ipynb``;
            0 off).
        instruction_loss_weight: w_ins (0 with ``train_targets: derived`` is the paper's
            "- L_ins" ablation, Table 7).
        edit_loss_weight: w_edit (0.5).
        mllm_learning_rate: the learning rate of the MLLM side (word embeddings, LM head,
            edit head); ``learning_rate`` is the diffusion model's.
        weight_decay: AdamW weight decay of both groups: 0, as the release trains (README's
            training command, ``--weight_decay 0.``); a decay would shrink every row of the
            32k-row ``embed_tokens``/``lm_head``, not only the rows the data uses.
        train_mllm: train the word embeddings, LM head and edit head (E2E); False for FT/FZ.
        train_unet: train the UNet (False for FZ).
        train_llm: also train the LLM's transformer layers and final norm (not the vision tower
            or projector). Not in the paper, whose LLaVA is pre-trained and stays frozen: for
            the tiny preset, whose random 2-layer LLM cannot route the instruction and image
            into the [IMG] positions while frozen.
        edit_head_dim, edit_head_heads, edit_head_layers, edit_head_ff, num_queries: the edit
            head (Appendix B: 512, 4, 4 encoder + 4 decoder layers, 2048, 77 queries); its
            output width is the UNet's cross-attention width.
        gradient_checkpointing: activation checkpointing of the LLM and the UNet.
        mllm_dtype: load the frozen MLLM in ``bfloat16``/``float16`` (the trainable word
            embeddings and LM head stay float32); use with ``trainer.precision: bf16-mixed``.
        release_mllm, release_unet: the official MGIE files (``mllm.pt``, ``unet.pt``) applied
            on top of ``mllm_path`` (LLaVA-7B) and ``diffusion_path`` (SD v1.5 widened).
        unet_init_from: an editbench InsPix2Pix checkpoint whose UNet initialises this one
            (e.g. the tiny preset starts from the quickstart model, as MGIE starts from a
            pre-trained diffusion model); where that model trained its CLIP text encoder and
            this one uses one (FT/FZ, ``align_loss_weight``), the encoder is taken too.
        align_loss_weight: weight of GILL's L_gen, the MSE between the edit head's condition
            and the frozen CLIP text encoder's embedding of the instruction (Koh et al.,
            2023, whose mapper MGIE's edit head is). 0 in MGIE (Eq. 6); it gives the edit head
            a condition the UNet already reads from the first step.
        prompt_template: the prompt around the instruction (default the release's query text,
            ``what will this image be like if '<instruction>'``: ``mgie_train.py``).
        chat_template: the conversation around the prompt, with ``{prompt}`` (and ``<image>``
            when visual); ``None``: the release's ``vicuna_v1_1`` conversation, the image after
            the text (MGIE), or the same without the image (LGIE); see
            :mod:`models.components.mllm`.
        hidden_position: ``preceding`` (the release: the states that predict the [IMG]
            tokens) or ``token``; see :class:`MLLM`.
        new_token_init: ``normal`` (the release) or ``mean``; see :class:`MLLM`.
        train_targets: what the [IMG] tokens follow in training. ``data``: the data's
            (summarised) expressive instruction, teacher-forced (L_ins). ``derived``: MGIE
            Table 7's "- L_ins": no summaries in training; the MLLM derives its own, full guidance
            (greedy, up to ``max_new_tokens``, no gradient) and L_edit trains through one
            forward pass over prompt + guidance + [IMG] tokens ("Without L_ins, it will derive
            full but lengthy guidance to lead L_edit", Appendix). Needs
            ``instruction_loss_weight`` 0 and ``guidance`` ``edit_head``.
        narration, summarizer: FZ/FT (``guidance: text``) at test time: the frozen MLLM
            narrates the edit and the summariser shortens it before CLIP, as ``data
            expressive`` wrote the training targets (Table 3, footnote 3: "concise summarized
            expressive instructions"; :mod:`models.components.expressive`). ``narration``:
            ``prompt_template``, ``max_new_tokens``, ``cut_at``, ``max_sentences`` (default the
            release's ``process_data.ipynb``; LGIE's prompt without the image); ``summarizer``:
            ``path`` (a local Flan-T5 folder), ``template``, ``num_beams``, ``min_length``,
            ``max_length``, ``no_repeat_ngram_size``, ``dtype``. Without ``summarizer`` the
            text is the MLLM's own generation in the training conversation (not the paper's).
        **kwargs: :class:`InsPix2Pix` / :class:`EditModel` arguments.
    """

    def __init__(
        self,
        mllm_path: str,
        diffusion_path: str,
        *,
        visual: bool = True,
        guidance: Guidance = "edit_head",
        num_img_tokens: int = 8,
        max_new_tokens: int = 96,
        no_repeat_ngram_size: int = 3,
        instruction_loss_weight: float = 1.0,
        edit_loss_weight: float = 0.5,
        mllm_learning_rate: float = 5e-4,
        weight_decay: float = 0.0,
        train_mllm: bool = True,
        train_unet: bool = True,
        train_llm: bool = False,
        edit_head_dim: int = 512,
        edit_head_heads: int = 4,
        edit_head_layers: int = 4,
        edit_head_ff: int = 2048,
        num_queries: int = 77,
        gradient_checkpointing: bool = False,
        mllm_dtype: str | None = None,
        release_mllm: str | None = None,
        release_unet: str | None = None,
        unet_init_from: str | None = None,
        align_loss_weight: float = 0.0,
        prompt_template: str = PROMPT_TEMPLATE,
        chat_template: str | None = None,
        hidden_position: str = "preceding",
        new_token_init: str = "normal",
        train_targets: TrainTargets = "data",
        narration: dict | None = None,
        summarizer: dict | None = None,
        **kwargs,
    ) -> None:
        super().__init__(diffusion_path, weight_decay=weight_decay, **kwargs)
        if guidance not in GUIDANCES:
            raise ValueError(f"guidance must be one of {GUIDANCES}, got {guidance!r}")
        if train_targets not in TRAIN_TARGETS:
            raise ValueError(f"train_targets must be one of {TRAIN_TARGETS}, got {train_targets!r}")
        if train_targets == "derived" and (instruction_loss_weight != 0 or guidance != "edit_head"):
            raise ValueError(
                "train_targets 'derived' (MGIE Table 7, '- L_ins') trains without targets: it "
                f"needs instruction_loss_weight 0 (got {instruction_loss_weight}) and guidance "
                f"'edit_head' (got {guidance!r})"
            )
        if guidance == "text" and kwargs.get("train_text_encoder"):
            raise ValueError("guidance 'text' keeps InsPix2Pix's CLIP text encoder frozen")
        self.save_hyperparameters()
        self.mllm_path = mllm_path
        self.visual = visual
        self.guidance = guidance
        self.num_img_tokens = num_img_tokens
        self.max_new_tokens = max_new_tokens
        self.no_repeat_ngram_size = no_repeat_ngram_size
        self.instruction_loss_weight = instruction_loss_weight
        self.edit_loss_weight = edit_loss_weight
        self.mllm_learning_rate = mllm_learning_rate
        self.train_mllm = train_mllm and guidance == "edit_head"
        self.train_unet = train_unet
        self.train_llm = train_llm and self.train_mllm
        self.edit_head_config = {
            "d_model": edit_head_dim,
            "nhead": edit_head_heads,
            "num_encoder_layers": edit_head_layers,
            "num_decoder_layers": edit_head_layers,
            "dim_feedforward": edit_head_ff,
            "num_queries": num_queries,
        }
        self.gradient_checkpointing = gradient_checkpointing
        self.mllm_dtype = mllm_dtype
        self.release_mllm = release_mllm
        self.release_unet = release_unet
        self.unet_init_from = unet_init_from
        self.align_loss_weight = align_loss_weight
        self.prompt_template = prompt_template
        self.chat_template = chat_template
        self.hidden_position = hidden_position
        self.new_token_init = new_token_init
        self.train_targets = train_targets
        self.expressive_pipeline = self._expressive_pipeline(narration, summarizer)
        self.mllm: MLLM | None = None
        self.edit_head: EditHead | None = None
        self.instruction_projection: torch.nn.Linear | None = None

    def _expressive_pipeline(
        self, narration: dict | None, summarizer: dict | None
    ) -> ExpressivePipeline | None:
        if summarizer is None:
            if narration is not None:
                raise ValueError("narration needs a summarizer (model.init_args.summarizer)")
            return None
        if self.guidance != "text":
            raise ValueError(
                f"narration/summarizer are FZ/FT's test-time pipeline (guidance 'text'); "
                f"guidance is {self.guidance!r}"
            )
        narration = dict(narration or {})
        if not self.visual:
            narration.setdefault("prompt_template", TEXT_PROMPT_TEMPLATE)
        return ExpressivePipeline(
            config_from(NarrationConfig, narration, "model.init_args.narration"),
            config_from(SummarizerConfig, summarizer, "model.init_args.summarizer"),
            option="model.init_args.summarizer.path",
        )

    # ------------------------------------------------------------------ building
    @property
    def uses_text_encoder(self) -> bool:
        return self.guidance == "text" or self.align_loss_weight > 0

    def configure_model(self) -> None:
        if self.diffusion is not None:
            return
        super().configure_model()
        self.mllm = MLLM(
            self.mllm_path,
            num_img_tokens=self.num_img_tokens,
            visual=self.visual,
            max_new_tokens=self.max_new_tokens,
            prompt_template=self.prompt_template,
            chat_template=self.chat_template,
            hidden_position=self.hidden_position,
            new_token_init=self.new_token_init,
            gradient_checkpointing=self.gradient_checkpointing,
            torch_dtype=self.mllm_dtype,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
        )
        for weight in self.mllm.trainable_parameters():
            weight.data = weight.data.float()  # trainable weights stay float32 under bf16
            weight.requires_grad_(self.train_mllm)
        for weight in self._llm_layer_parameters():
            weight.requires_grad_(self.train_llm)
        self.mllm.eval()
        if self.guidance == "edit_head":
            width = self.diffusion.unet.config.cross_attention_dim
            self.edit_head = EditHead(
                self.mllm.hidden_size, output_dim=width, **self.edit_head_config
            )
            self.edit_head.requires_grad_(self.train_mllm)
        elif self.guidance == "encoder":
            width = self.diffusion.unet.config.cross_attention_dim
            self.instruction_projection = torch.nn.Linear(self.mllm.hidden_size, width)
            self.instruction_projection.requires_grad_(self.train_unet)
        self.diffusion.unet.requires_grad_(self.train_unet)
        if self.gradient_checkpointing:
            self.diffusion.unet.enable_gradient_checkpointing()
        self.frozen_modules = self._frozen_prefixes()
        if self.release_mllm is not None or self.release_unet is not None:
            self._apply_release()
        if self.unet_init_from is not None:
            self.init_unet_from(self.unet_init_from)

    def _llm_prefixes(self) -> list[str]:
        """State-dict prefixes (in ``self.mllm``) of the LLM's layers and final norm."""
        return [
            p
            for p in self.mllm.frozen_prefixes()
            if "vision" not in p and "projector" not in p
        ]

    def _llm_layer_parameters(self) -> list[torch.nn.Parameter]:
        prefixes = tuple(self._llm_prefixes())
        return [p for n, p in self.mllm.named_parameters() if n.startswith(prefixes)]

    def _frozen_prefixes(self) -> tuple[str, ...]:
        prefixes = ["diffusion.vae"]
        if self.text_encoder is not None:
            prefixes.append("text_encoder")
        if not self.train_unet:
            prefixes += ["diffusion.unet", "instruction_projection"]
        if self.train_mllm:
            llm = set(self._llm_prefixes()) if self.train_llm else set()
            prefixes += [
                "mllm." + p.rstrip(".") for p in self.mllm.frozen_prefixes() if p not in llm
            ]
        else:
            prefixes += ["mllm", "edit_head"]
        return tuple(prefixes)

    def _apply_release(self) -> None:
        from models.components.mgie_release import apply_release, load_release

        if self.release_mllm is None:
            raise ValueError("release_unet needs release_mllm (the official mllm.pt) too")
        weights = load_release(self.release_mllm, self.release_unet)
        apply_release(self.mllm, self.edit_head, self.diffusion.unet, weights)
        rank_zero_info(f"applied the MGIE release {self.release_mllm} / {self.release_unet}")

    def train(self, mode: bool = True):
        """The MLLM (only its embeddings and head train; no dropout in frozen layers) and the
        frozen parts stay in eval mode."""
        super().train(mode)
        if self.mllm is not None:
            self.mllm.eval()
            if self.gradient_checkpointing and mode:
                self.mllm.model.train()  # checkpointing only runs in train mode; dropout is 0
        return self

    def param_groups(self) -> list[dict]:
        """Two AdamW groups (Sec. 4.1): the MLLM side at ``mllm_learning_rate`` (word
        embeddings, LM head, edit head) and the diffusion model at ``learning_rate``."""
        groups = []
        if self.train_mllm:
            mllm = self.mllm.trainable_parameters() + list(self.edit_head.parameters())
            if self.train_llm:
                mllm += self._llm_layer_parameters()
            groups.append({"params": mllm, "lr": self.mllm_learning_rate, "name": "mllm"})
        if self.train_unet:
            unet = list(self.diffusion.unet.parameters())
            if self.instruction_projection is not None:
                unet += list(self.instruction_projection.parameters())
            groups.append({"params": unet, "lr": self.learning_rate, "name": "diffusion"})
        return groups

    # ------------------------------------------------------------------ conditions
    def _images_for_mllm(self, source: torch.Tensor) -> torch.Tensor | None:
        return source if self.visual else None

    def guidance_from(self, img_hidden: torch.Tensor, img_embeds: torch.Tensor):
        """The edit head's condition U [B, 77, D] and its null condition [1, 77, D] (the head on
        zero hidden states)."""
        cond = self.edit_head(img_hidden, img_embeds)
        null = self.edit_head.null_condition(img_embeds[:1])
        return cond, null

    def encode_instructions(self, source: torch.Tensor, instructions: Sequence[str]):
        """Table 5's instruction encoder: the frozen LLM's last-layer hidden states of the last
        ``num_queries`` prompt positions, projected to the UNet's width; null = the empty
        instruction (on a grey image for LLaVA). Returns (cond [B, L, D], null [1, L, D])."""
        length = self.edit_head_config["num_queries"]

        def encode(texts: list[str], images: torch.Tensor | None) -> torch.Tensor:
            enc = self.mllm.encode_prompts(texts, images)
            with torch.no_grad():
                hidden = self.mllm.hidden_states(
                    enc["input_ids"], enc["attention_mask"], enc.get("pixel_values")
                )
            # Padding positions are zeros, so a row's condition does not depend on its batch.
            hidden = hidden * enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            hidden = hidden[:, -length:]  # left padding: the instruction ends every row
            if hidden.shape[1] < length:
                hidden = torch.nn.functional.pad(hidden, (0, 0, length - hidden.shape[1], 0))
            return self.instruction_projection(hidden.to(self.instruction_projection.weight))

        images = self._images_for_mllm(source)
        cond = encode(list(instructions), images)
        # The null condition must not depend on the batch: the empty instruction on a grey image.
        null = encode([""], None if images is None else torch.zeros_like(images[:1]))
        return cond, null

    def training_losses(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        if self.guidance == "encoder":  # Table 5: no expressive instruction, no L_ins
            cond, null = self.encode_instructions(batch["source"], batch["instruction"])
            out = self.diffusion.loss(
                batch["source"], batch["target"], cond, null, generator=generator
            )
            return {"loss": out.loss, "loss_edit": out.loss.detach()}
        if self.train_targets == "derived":  # Table 7 "- L_ins": the model's own guidance
            return self._derived_losses(batch, generator)
        if "expressive" not in batch or any(e is None for e in batch["expressive"]):
            raise KeyError(
                "MGIE trains on expressive instructions: the batch has no 'expressive' for "
                f"samples {batch['id'][:3]}; set data.init_args.expressive_path to the JSONL of "
                "`python -m editbench data expressive`"
            )
        source, target = batch["source"], batch["target"]
        if self.guidance == "text":  # FT: InsPix2Pix on the expressive instruction as text
            text = self.encode_text(batch["expressive"])
            out = self.diffusion.loss(source, target, text, self.null_text(), generator=generator)
            return {"loss": out.loss, "loss_edit": out.loss.detach()}
        mllm_out = self.mllm.training_forward(
            self._images_for_mllm(source), batch["instruction"], batch["expressive"]
        )
        cond, null = self.guidance_from(mllm_out.img_hidden, mllm_out.img_embeds)
        edit = self.diffusion.loss(source, target, cond, null, generator=generator)
        loss = self.instruction_loss_weight * mllm_out.loss + self.edit_loss_weight * edit.loss
        terms = {
            "loss_ins": mllm_out.loss.detach(),
            "loss_edit": edit.loss.detach(),
            "token_accuracy": mllm_out.token_accuracy.detach(),
        }
        if self.align_loss_weight > 0:
            with torch.no_grad():
                clip = self.encode_text(batch["instruction"])
            align = torch.nn.functional.mse_loss(cond.float(), clip.float())
            loss = loss + self.align_loss_weight * align
            terms["loss_align"] = align.detach()
        return {"loss": loss, **terms}

    def _derived_losses(self, batch: dict, generator: torch.Generator | None) -> dict:
        """MGIE Table 7 "- L_ins": no expressive targets; the edit head reads the [IMG] states
        after the guidance the MLLM derives itself, and only L_edit trains."""
        source = batch["source"]
        derived = self.mllm.derive(self._images_for_mllm(source), list(batch["instruction"]))
        cond, null = self.guidance_from(derived.img_hidden, derived.img_embeds)
        edit = self.diffusion.loss(source, batch["target"], cond, null, generator=generator)
        tokens = sum(len(ids) - self.num_img_tokens for ids in derived.token_ids)
        return {
            "loss": self.edit_loss_weight * edit.loss,
            "loss_edit": edit.loss.detach(),
            "guidance_tokens": torch.tensor(tokens / len(derived.token_ids), device=self.device),
        }

    # ------------------------------------------------------------------ evaluation
    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._expressive_metrics = {
            "expressive_token_accuracy": MeanMetric().to(self.device),
            "expressive_loss": MeanMetric().to(self.device),
            "expressive_match": MeanMetric().to(self.device),
        }

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        """The edit metrics, plus how well the expressive instructions match the data's:
        teacher-forced token accuracy and L_ins, and the share of ground-truth tokens the
        greedy generation reproduces at their position (``expressive_match``)."""
        out = super().test_step(batch, batch_idx)
        if self.guidance == "edit_head" and batch.get("expressive") is not None:
            metrics = self._expressive_metrics
            images = self._images_for_mllm(batch["source"])
            forced = self.mllm.training_forward(images, batch["instruction"], batch["expressive"])
            n = len(batch["id"])
            metrics["expressive_token_accuracy"].update(forced.token_accuracy, weight=n)
            metrics["expressive_loss"].update(forced.loss, weight=n)
            for generated, truth in zip(out["expressive"], batch["expressive"], strict=True):
                metrics["expressive_match"].update(self._token_match(generated, truth))
        return out

    def _token_match(self, generated: str, truth: str) -> torch.Tensor:
        """Share of the ground truth's tokens that the generation has at the same position."""
        tokenize = self.mllm.tokenizer
        want = tokenize(truth.strip(), add_special_tokens=False)["input_ids"]
        got = tokenize(generated.strip(), add_special_tokens=False)["input_ids"]
        hits = sum(a == b for a, b in zip(got, want, strict=False))
        return torch.tensor(hits / max(len(want), 1), device=self.device)

    def extra_test_results(self) -> dict[str, float]:
        # compute() syncs across processes: every rank calls it for every metric, whether or
        # not it saw a sample (a rank may hold no test sample with an expressive instruction).
        metrics = getattr(self, "_expressive_metrics", {})
        results = {f"test/{name}": float(metric.compute()) for name, metric in metrics.items()}
        return {k: v for k, v in results.items() if math.isfinite(v)}

    def conditions(self, source: torch.Tensor, instructions: Sequence[str]):
        """The guidance of an edit: the edit head on the generated [IMG] states (E2E), the
        generated expressive instruction as CLIP text (FT/FZ) or the projected hidden states
        (encoder); returns (cond, null, expressive instructions or None)."""
        if self.guidance == "encoder":
            return (*self.encode_instructions(source, instructions), None)
        if self.guidance == "text" and self.expressive_pipeline is not None:
            texts = self.expressive_texts(source, instructions)
            return self.encode_text(texts), self.null_text(), texts
        generation = self.mllm.generate(self._images_for_mllm(source), list(instructions))
        if self.guidance == "edit_head":
            cond, null = self.guidance_from(generation.img_hidden, generation.img_embeds)
        else:
            cond, null = self.encode_text(generation.texts), self.null_text()
        return cond, null, generation.texts


    def expressive_texts(self, source: torch.Tensor, instructions: Sequence[str]) -> list[str]:
        """FZ/FT's concise expressive instructions: the frozen MLLM's narration, cut and
        summarised as ``data expressive`` does (:class:`ExpressivePipeline`)."""
        processor = self.mllm.processor if self.visual else self.mllm.tokenizer
        out = self.expressive_pipeline(
            self.mllm.model, processor, self._images_for_mllm(source), list(instructions)
        )
        return out.summaries


class LGIE(MGIE):
    """LGIE (MGIE Sec. 4.1): MGIE on a text-only LLM (LLaMA) that never sees the image."""

    def __init__(self, mllm_path: str, diffusion_path: str, *, visual: bool = False, **kwargs):
        if visual:
            raise ValueError("LGIE is the text-only variant: visual must be False")
        super().__init__(mllm_path, diffusion_path, visual=False, **kwargs)
