"""The MLLM of MGIE (LLaVA) and LGIE (LLaMA) with N visual tokens ``[IMG0]..[IMG{N-1}]``.

MGIE (Fu et al., ICLR 2024), Sec. 3.2-3.3: the MLLM reads the image and the prompt
``what will this image be like if <instruction>`` and learns, by teacher forcing (L_ins,
Eq. 2), to answer with a concise expressive instruction followed by N visual tokens, whose
last-layer hidden states and word embeddings feed the edit head (Eq. 3). Only the word
embeddings and the LM head are trained (Sec. 4.1 "Implementation Details").

Facts taken from the released code (apple/ml-mgie: ``mgie_train.py``, ``mgie_llava.py``,
``demo.ipynb``), where the paper leaves them open:

- The tokens are added with ``add_tokens(..., special_tokens=True)`` after the LLaVA vocabulary
  and ``resize_token_embeddings`` is called with no further initialisation, so the new rows of
  both ``embed_tokens`` and the (untied) ``lm_head`` got the initialiser transformers used in
  2023 for freshly built embeddings: N(0, initializer_range²). ``new_token_init="normal"``
  does that explicitly; ``"mean"`` gives the mean of the existing rows (LLaVA's own choice
  for its image tokens).
- Training target: ``"<expressive> [IMG0] ... [IMG7]"`` then ``</s>``; the slow LLaMA tokenizer
  strips the spaces around added tokens, so the N tokens are consecutive. Labels cover the
  expressive text, the [IMG] tokens and ``</s>``; the prompt (and image) is ignored.
- Hidden states: ``p = index([IMG0]) - 1; hidden[p:p+8]``, both in training and at inference:
  the positions whose outputs *predict* ``[IMG0]..[IMG7]`` (the token before each [IMG]), taken
  after the final norm (the LM head's input). ``hidden_position="preceding"`` (the default)
  follows that, and is what released edit-head weights expect; ``"token"`` takes the [IMG]
  tokens' own positions (a literal reading of "the hidden state of [IMG]" in Eq. 3).
- The [IMG] embeddings given to the edit head are the input word embeddings of the N tokens.
- Inference: greedy decoding, ``max_new_tokens`` 96, ``no_repeat_ngram_size`` 3, then
  ``hidden[p:p+8]`` from the generation's hidden states, with the last 8 positions as fallback
  when ``[IMG0]`` was never generated. Here a row that did not generate all N tokens in order gets
  them appended after its text instead, and one extra forward pass over prompt + text + [IMG]
  tokens gives the hidden states (see :meth:`MLLM.generate`).
- Conversation (the defaults here): the release trains on LLaVA's ``vicuna_v1_1`` template
  (``mgie_train.py``: ``conv_templates["vicuna_v1_1"]`` for ``--version v1``; LLaVA commit
  7ace501 ``llava/conversation.py``: the system prompt below, roles ``USER``/``ASSISTANT``,
  separator " ", turns ended by ``</s>``) with the query
  ``"what will this image be like if '%s'\n<image>"`` (``mgie_train.py``
  ``LazySupervisedDataset``): the instruction in single quotes, the image after the text.
  One training sample is therefore
  ``"<system> USER: what will this image be like if '<instruction>'\n<image> ASSISTANT:
  <expressive> [IMG0] ... [IMG7]</s>"``; :data:`PROMPT_TEMPLATE` is the query's text and
  :data:`VISUAL_CHAT_TEMPLATE` the conversation around it. The release's ``<image>`` becomes
  ``<im_start>`` + 256 ``<im_patch>`` + ``<im_end>`` (LLaVA v1, ``mm_use_im_start_end``;
  ``demo.ipynb``). Here the folder is read in the llava-hf layout: a folder whose config has
  ``mm_use_im_start_end`` true (the release's LLaVA-7B-v1 after ``python -m editbench data
  convert-llava``, :mod:`models.components.llava_v1`) gets ``<image>`` replaced by
  ``<im_start>`` + the processor's image token (``<im_patch>``) + ``<im_end>``, which the
  processor then expands to 256 tokens, the release's prompt; in other llava-hf folders the
  processor expands ``<image>`` itself.
  LGIE (no release code) takes the same conversation without the image
  (:data:`TEXT_CHAT_TEMPLATE`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.components.expressive import image_placeholder
from models.components.lm_loading import (
    CastOutput,
    cast_input_to_weight,
    frozen_prefixes,
    load_language_model,
)

#: LLaVA's ``conv_vicuna_v1_1.system`` (LLaVA 7ace501, ``llava/conversation.py``), the
#: conversation the MGIE release trains and infers with (``mgie_train.py``, ``demo.ipynb``).
VICUNA_V1_1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
#: The release's query text (``mgie_train.py``, ``demo.ipynb``): the instruction in quotes.
PROMPT_TEMPLATE = "what will this image be like if '{instruction}'"
#: ``vicuna_v1_1.get_prompt()`` for one user turn and an open assistant turn (separator " "),
#: the image after the text as the release's query ``"...'%s'\n<image>"``.
VISUAL_CHAT_TEMPLATE = VICUNA_V1_1_SYSTEM + " USER: {prompt}\n<image> ASSISTANT:"
#: LGIE: the same conversation without the image.
TEXT_CHAT_TEMPLATE = VICUNA_V1_1_SYSTEM + " USER: {prompt} ASSISTANT:"
IGNORE_INDEX = -100
HIDDEN_POSITIONS = ("preceding", "token")
NEW_TOKEN_INITS = ("normal", "mean")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def img_tokens(n: int) -> list[str]:
    """The N visual tokens ``["[IMG0]", ..., f"[IMG{n-1}]"]``."""
    if n < 1:
        raise ValueError(f"num_img_tokens must be >= 1, got {n}")
    return [f"[IMG{i}]" for i in range(n)]


@dataclass
class MLLMOutput:
    """Teacher-forced pass: ``loss`` = L_ins (Eq. 2, mean CE over the target tokens),
    ``img_hidden``/``img_embeds`` ``[B, N, H]`` for the edit head, ``token_accuracy`` (detached)
    = share of target tokens whose greedy prediction is right."""

    loss: Tensor
    img_hidden: Tensor
    img_embeds: Tensor
    token_accuracy: Tensor


@dataclass
class MLLMGeneration:
    """Greedy inference: ``texts`` = expressive instructions (no [IMG]/special tokens),
    ``img_hidden``/``img_embeds`` ``[B, N, H]``, ``appended[i]`` = row i did not generate the N
    [IMG] tokens in order so they were appended, ``token_ids[i]`` = the kept generated tokens of
    row i followed by the N [IMG] ids (the sequence after the prompt that ``img_hidden`` came
    from)."""

    texts: list[str]
    img_hidden: Tensor
    img_embeds: Tensor
    appended: list[bool]
    token_ids: list[list[int]]


class MLLM(nn.Module):
    """LLaVA (``visual=True``, MGIE) or a causal LM (``visual=False``, LGIE) + [IMG] tokens.

    Args:
        path: a local transformers folder: ``LlavaForConditionalGeneration`` + its processor
            (llava-hf layout) when ``visual``, else a causal LM (LLaMA) + tokenizer.
        num_img_tokens: N (8 in MGIE, after GILL).
        visual: read the image (MGIE) or the instruction only (LGIE; ``images`` arguments are
            then ignored, so the same batches work for both).
        max_new_tokens: default generation budget (96: the release's ``demo.ipynb``).
        prompt_template: the prompt around the instruction (``{instruction}``).
        chat_template: the conversation around the prompt (``{prompt}``; with ``<image>`` when
            ``visual``); ``None`` takes :data:`VISUAL_CHAT_TEMPLATE` or :data:`TEXT_CHAT_TEMPLATE`.
        gradient_checkpointing: activation checkpointing on the LM (takes effect in train mode).
        torch_dtype: ``"bfloat16"``, ``"float16"``, ``"float32"`` or ``None`` (the folder's).
        no_repeat_ngram_size: greedy decoding's n-gram blocking (3 in the released demo; 0 off).
        hidden_position: ``"preceding"`` (released code) or ``"token"``; see the module doc.
        new_token_init: ``"normal"`` (released code) or ``"mean"``; see the module doc.
    """

    def __init__(
        self,
        path: str,
        *,
        num_img_tokens: int = 8,
        visual: bool = True,
        max_new_tokens: int = 96,
        prompt_template: str = PROMPT_TEMPLATE,
        chat_template: str | None = None,
        gradient_checkpointing: bool = False,
        torch_dtype: str | None = None,
        no_repeat_ngram_size: int = 0,
        hidden_position: str = "preceding",
        new_token_init: str = "normal",
    ) -> None:
        super().__init__()
        if hidden_position not in HIDDEN_POSITIONS:
            raise ValueError(f"hidden_position must be one of {HIDDEN_POSITIONS}")
        if new_token_init not in NEW_TOKEN_INITS:
            raise ValueError(f"new_token_init must be one of {NEW_TOKEN_INITS}")
        if torch_dtype is not None and torch_dtype not in DTYPES:
            raise ValueError(f"torch_dtype must be None or one of {sorted(DTYPES)}")
        self.path = str(path)
        self.num_img_tokens = num_img_tokens
        self.visual = visual
        self.max_new_tokens = max_new_tokens
        self.no_repeat_ngram_size = no_repeat_ngram_size
        self.hidden_position = hidden_position
        self.prompt_template = prompt_template
        self.chat_template = chat_template or (
            VISUAL_CHAT_TEMPLATE if visual else TEXT_CHAT_TEMPLATE
        )
        self._check_templates()

        self.model, self.processor, self.tokenizer = load_language_model(
            Path(path), visual, DTYPES.get(torch_dtype) if torch_dtype else None
        )
        self.image_text = self._image_text()
        self.img_token_ids: list[int] = self._add_img_tokens(new_token_init)
        self._freeze()
        self._compute_dtype = self.embed_tokens.weight.dtype
        self._add_dtype_casts()
        if gradient_checkpointing:
            self.model.activation_checkpointing_enable()

    # ------------------------------------------------------------------ setup

    def _check_templates(self) -> None:
        if "{instruction}" not in self.prompt_template:
            raise ValueError(f"prompt_template needs '{{instruction}}': {self.prompt_template!r}")
        if "{prompt}" not in self.chat_template:
            raise ValueError(f"chat_template needs '{{prompt}}': {self.chat_template!r}")
        if self.visual and "<image>" not in self.chat_template:
            raise ValueError(f"a visual chat_template needs '<image>': {self.chat_template!r}")

    def _image_text(self) -> str:
        """What the chat template's ``<image>`` becomes before the processor expands the
        processor's image token: that token, wrapped in ``<im_start>``/``<im_end>`` when the
        config says ``mm_use_im_start_end`` (LLaVA v1 as the MGIE release runs it,
        ``demo.ipynb``; a folder from ``data convert-llava``); ``<image>`` in llava-hf folders,
        so nothing changes there."""
        if self.processor is None:
            return "<image>"
        return image_placeholder(self.processor, self.model.config)

    def _add_img_tokens(self, init: str) -> list[int]:
        """Add the [IMG] tokens (after the vocabulary), size both embeddings to the tokenizer
        and initialise the new rows (only when the tokens are new to the tokenizer)."""
        names = img_tokens(self.num_img_tokens)
        vocab = self.tokenizer.get_vocab()
        present = [t for t in names if t in vocab]
        if present and len(present) != len(names):
            raise ValueError(f"{self.path}: the tokenizer has only some [IMG] tokens: {present}")
        self.tokenizer.add_tokens(names, special_tokens=True)
        ids = self.tokenizer.convert_tokens_to_ids(names)
        for name, token_id in zip(names, ids, strict=True):
            encoded = self.tokenizer.encode(name, add_special_tokens=False)
            if encoded != [token_id]:
                raise ValueError(f"{name} does not encode to one token: {encoded}")
        rows = self.model.get_input_embeddings().weight.shape[0]
        if len(self.tokenizer) > rows:
            self.model.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        if not present:
            self._init_rows(ids, init)
        return ids

    @torch.no_grad()
    def _init_rows(self, ids: list[int], init: str) -> None:
        index = torch.tensor(ids, device=self.device)
        weights = {id(w): w for w in self._embedding_weights()}.values()  # tied: once
        for weight in weights:
            if init == "mean":
                weight[index] = weight[: min(ids)].mean(0, keepdim=True).to(weight.dtype)
            else:
                std = self.model.config.get_text_config().initializer_range
                rows = torch.randn(len(ids), weight.shape[1], device=weight.device) * std
                weight[index] = rows.to(weight.dtype)

    def _add_dtype_casts(self) -> None:
        """Let the trainable embeddings be kept in float32 while the frozen model runs in
        bf16/fp16: the input embeddings' output is cast to the load dtype and the LM head's
        input to the head's dtype (both no-ops when the dtypes already agree)."""
        self.embed_tokens.register_forward_hook(CastOutput(self._compute_dtype))
        self.lm_head.register_forward_pre_hook(cast_input_to_weight)

    def _embedding_weights(self) -> list[nn.Parameter]:
        return [self.model.get_input_embeddings().weight, self.model.get_output_embeddings().weight]

    def _freeze(self) -> None:
        self.model.requires_grad_(False)
        for weight in self._embedding_weights():
            weight.requires_grad_(True)

    # ------------------------------------------------------------------ properties

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model was loaded in (the frozen layers' dtype)."""
        return self._compute_dtype

    @property
    def hidden_size(self) -> int:
        """Width H of the language model."""
        return self.model.config.get_text_config().hidden_size

    @property
    def embed_tokens(self) -> nn.Embedding:
        """The input word embeddings (trainable, whole vocabulary)."""
        return self.model.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """``embed_tokens`` and ``lm_head`` weights (once each if tied): the MLLM parameters MGIE
        trains."""
        return list({id(w): w for w in self._embedding_weights()}.values())

    def frozen_prefixes(self) -> list[str]:
        """State-dict prefixes (relative to this module) of everything frozen: vision tower,
        projector, LM layers, final norm; by structure, whatever the current ``requires_grad``
        flags. A submodule's prefix ends with ``.``; a lone frozen parameter is its full key;
        match with ``key.startswith(prefix)``."""
        trainable = {id(p) for p in self.trainable_parameters()}
        return frozen_prefixes(self, "", trainable)

    # ------------------------------------------------------------------ inputs

    def format_prompts(self, instructions: Sequence[str]) -> list[str]:
        """Instructions → full chat prompts (chat template around the prompt template)."""
        return [
            self.chat_template.replace(
                "{prompt}", self.prompt_template.replace("{instruction}", text.strip())
            )
            for text in instructions
        ]

    def preprocess_images(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in [-1, 1] → the vision tower's ``pixel_values`` (the processor's
        resize / center crop / normalise, batched; torchvision backends stay on the images'
        device)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] in [-1, 1], got {tuple(images.shape)}")
        unit = ((images.detach().float() + 1) / 2).clamp(0, 1)
        pixels = self.processor.image_processor(unit, do_rescale=False, return_tensors="pt")
        return pixels["pixel_values"].to(device=images.device, dtype=self.dtype)

    def encode_prompts(
        self, instructions: Sequence[str], images: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Left-padded ``input_ids``/``attention_mask`` of the prompts (+ ``pixel_values`` when
        visual; the processor expands ``<image>``), on this module's device."""
        ids, pixel_values = self._tokenize(self.format_prompts(instructions), images)
        input_ids, attention_mask = self._pad(ids, side="left")
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        if pixel_values is not None:
            out["pixel_values"] = pixel_values
        return out

    def _tokenize(
        self, texts: list[str], images: Tensor | None
    ) -> tuple[list[list[int]], Tensor | None]:
        """Unpadded token ids of each text (with BOS) and the pixel values."""
        if not self.visual:
            return self.tokenizer(texts)["input_ids"], None
        if images is None:
            raise ValueError("MLLM(visual=True) needs images: got images=None")
        if images.shape[0] != len(texts):
            raise ValueError(f"{images.shape[0]} images for {len(texts)} instructions")
        pixel_values = self.preprocess_images(images)
        texts = [text.replace("<image>", self.image_text) for text in texts]
        # The processor only needs the processed size to expand <image>: give it CPU zeros of
        # that size with every transform off, and keep our own (device) pixel values.
        dummy = torch.zeros(pixel_values.shape, dtype=torch.float32)
        enc = self.processor(
            text=texts,
            images=dummy,
            do_resize=False,
            do_center_crop=False,
            do_rescale=False,
            do_normalize=False,
        )
        return [list(map(int, row)) for row in enc["input_ids"]], pixel_values

    def _pad(self, rows: list[list[int]], *, side: str) -> tuple[Tensor, Tensor]:
        length = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
            ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
        return ids.to(self.device), mask.to(self.device)

    # ------------------------------------------------------------------ positions

    def find_img_positions(self, input_ids: Tensor) -> Tensor:
        """``[B, T]`` ids → ``[B, N]`` positions of ``[IMG0]..[IMG{N-1}]`` (first occurrence) in
        each row, whatever the padding; a row missing any raises ``ValueError``."""
        wanted = torch.tensor(self.img_token_ids, device=input_ids.device)
        hits = input_ids.unsqueeze(-1) == wanted  # [B, T, N]
        found = hits.any(dim=1)  # [B, N]
        if not bool(found.all()):
            row = int((~found).any(dim=1).nonzero()[0])
            missing = [img_tokens(self.num_img_tokens)[k] for k in (~found[row]).nonzero()[:, 0]]
            raise ValueError(f"input_ids row {row} lacks the visual tokens {missing}")
        return hits.int().argmax(dim=1)  # first True along T

    def _img_hidden(self, hidden: Tensor, input_ids: Tensor) -> Tensor:
        """Last-layer hidden states at the positions given by ``hidden_position``."""
        positions = self.find_img_positions(input_ids)
        if self.hidden_position == "preceding":
            if bool((positions == 0).any()):
                raise ValueError("an [IMG] token at position 0 has no preceding position")
            positions = positions - 1
        index = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        return hidden.gather(1, index)

    def img_embeds(self, batch_size: int) -> Tensor:
        """The [IMG] word embeddings ``[B, N, H]`` (differentiable w.r.t. ``embed_tokens``)."""
        ids = torch.tensor(self.img_token_ids, device=self.device)
        rows = F.embedding(ids, self.embed_tokens.weight)  # the weights' own dtype, no cast
        return rows.unsqueeze(0).expand(batch_size, -1, -1)

    # ------------------------------------------------------------------ forward

    def hidden_states(
        self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None = None
    ) -> Tensor:
        """Last-layer hidden states after the final norm (the LM head's input) ``[B, T, H]``.
        Position ids count only attended tokens, so left and right padding give the same
        states as an unpadded row."""
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        kwargs = {"pixel_values": pixel_values} if self.visual else {}
        out = self.model.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **kwargs,
        )
        return out.last_hidden_state

    def training_forward(
        self, images: Tensor | None, instructions: Sequence[str], targets: Sequence[str]
    ) -> MLLMOutput:
        """Teacher forcing on ``prompt + target + [IMG0..N-1] + eos`` (L_ins, Eq. 2).

        Labels are the target text, the N [IMG] tokens and eos; the prompt, image tokens and
        padding are ignored (-100). The target is tokenized together with the prompt (as it
        follows it at inference) and split at the prompt's length. Right padding.
        """
        inputs = self.training_inputs(images, instructions, targets)
        input_ids, label_ids = inputs["input_ids"], inputs["labels"]
        hidden = self.hidden_states(input_ids, inputs["attention_mask"], inputs.get("pixel_values"))
        loss, accuracy = labelled_lm_loss(hidden, label_ids, self.lm_head)
        return MLLMOutput(
            loss=loss,
            img_hidden=self._img_hidden(hidden, input_ids),
            img_embeds=self.img_embeds(len(input_ids)),
            token_accuracy=accuracy,
        )

    def training_inputs(
        self, images: Tensor | None, instructions: Sequence[str], targets: Sequence[str]
    ) -> dict[str, Tensor]:
        """The teacher-forced batch of :meth:`training_forward`: right-padded ``input_ids``
        (``prompt + target + [IMG0..N-1] + eos``), ``attention_mask``, ``labels`` (-100 on the
        prompt and padding) and ``pixel_values`` when visual. With the default templates a row is
        the release's training sample (``mgie_train.py``: the ``vicuna_v1_1`` conversation, the
        answer ``"<expressive> [IMG0] ... [IMG7]"`` and ``</s>``, labels from the answer on)."""
        if len(instructions) != len(targets):
            raise ValueError(f"{len(instructions)} instructions but {len(targets)} targets")
        prompts = self.format_prompts(instructions)
        prompt_ids, pixel_values = self._tokenize(prompts, images)
        joined = [
            p + " " + t.strip() if t.strip() else p for p, t in zip(prompts, targets, strict=True)
        ]
        joint_ids, _ = self._tokenize(joined, images)
        rows, labels = [], []
        for prompt, joint, target in zip(prompt_ids, joint_ids, targets, strict=True):
            answer = self._target_ids(prompt, joint, target) + self.img_token_ids
            answer = answer + [self.tokenizer.eos_token_id]
            rows.append(prompt + answer)
            labels.append([IGNORE_INDEX] * len(prompt) + answer)
        input_ids, attention_mask = self._pad(rows, side="right")
        out = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": self._pad_labels(labels, input_ids.shape[1]),
        }
        if pixel_values is not None:
            out["pixel_values"] = pixel_values
        return out

    def _target_ids(self, prompt: list[int], joint: list[int], target: str) -> list[int]:
        if joint[: len(prompt)] == prompt:
            ids = joint[len(prompt) :]
        else:  # the tokenizer merged across the boundary: tokenize the target on its own
            ids = self.tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]
        if ids and ids[-1] == self.tokenizer.eos_token_id:  # tokenizers that append eos
            ids = ids[:-1]
        return list(ids)

    def _pad_labels(self, labels: list[list[int]], length: int) -> Tensor:
        out = torch.full((len(labels), length), IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(labels):
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out.to(self.device)

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def generate(
        self,
        images: Tensor | None,
        instructions: Sequence[str],
        max_new_tokens: int | None = None,
    ) -> MLLMGeneration:
        """Greedy expressive instructions and the [IMG] hidden states for the edit head (no
        gradients; :meth:`derive` is the same with gradients through the last pass)."""
        return self.derive(images, instructions, max_new_tokens)

    def derive(
        self,
        images: Tensor | None,
        instructions: Sequence[str],
        max_new_tokens: int | None = None,
    ) -> MLLMGeneration:
        """Greedy expressive instructions and the [IMG] hidden states for the edit head.

        ``model.generate`` (KV cache, left padding) runs first. In each row the text is what
        comes before the first eos or [IMG] token; if the N [IMG] tokens follow it in order
        they are kept (anything after them dropped), otherwise they are appended
        (``appended``). One more forward pass over prompt + text + [IMG] tokens then gives the
        hidden states: simpler than reading them out of the generation steps, and the same
        thing for complete rows (the released code instead falls back to the last 8 positions
        when [IMG0] is missing). Outside :meth:`generate` that pass keeps its gradients: MGIE's
        "- L_ins" ablation trains the edit on the guidance the model derives itself.
        """
        enc = self.encode_prompts(instructions, images)
        kwargs = {}
        if self.no_repeat_ngram_size > 0:
            kwargs["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        # Decode in eval mode, with the KV cache: a model in train mode for gradient
        # checkpointing (MGIE's "- L_ins" training) would decode without it.
        training = self.model.training
        self.model.eval()
        try:
            sequences = self.model.generate(
                **enc,
                max_new_tokens=max_new_tokens or self.max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                **kwargs,
            )
        finally:
            self.model.train(training)
        generated = sequences[:, enc["input_ids"].shape[1] :].tolist()
        texts, kept, appended = [], [], []
        for row in generated:
            text_ids, complete = self._split_generated(row)
            texts.append(self.tokenizer.decode(text_ids, skip_special_tokens=True).strip())
            kept.append(text_ids + self.img_token_ids)
            appended.append(not complete)

        masks = enc["attention_mask"].bool()
        prompts = [ids[mask].tolist() for ids, mask in zip(enc["input_ids"], masks, strict=True)]
        rows = [p + k for p, k in zip(prompts, kept, strict=True)]
        input_ids, attention_mask = self._pad(rows, side="left")
        hidden = self.hidden_states(input_ids, attention_mask, enc.get("pixel_values"))
        return MLLMGeneration(
            texts=texts,
            img_hidden=self._img_hidden(hidden, input_ids),
            img_embeds=self.img_embeds(len(texts)),
            appended=appended,
            token_ids=kept,
        )

    def _split_generated(self, row: list[int]) -> tuple[list[int], bool]:
        """Generated ids → (text ids before the first eos/[IMG], whether the N [IMG] follow).
        A generated image token also ends the text: fed back in the second pass it would be
        taken for an image placeholder without image features."""
        stops = set(self.img_token_ids) | {self.tokenizer.eos_token_id}
        if self.visual and getattr(self.processor, "image_token_id", None) is not None:
            stops.add(self.processor.image_token_id)
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        complete = row[cut : cut + self.num_img_tokens] == self.img_token_ids
        return row[:cut], complete


def labelled_lm_loss(hidden: Tensor, labels: Tensor, lm_head: nn.Module) -> tuple[Tensor, Tensor]:
    """Next-token CE averaged over the labelled tokens (L_ins, Eq. 2) and the greedy accuracy
    on them, with ``lm_head`` applied only to the positions that predict a label.

    Position t predicts label t+1; -100 is ignored, whatever side the padding is on. The
    result equals cross-entropy over the full ``lm_head(hidden)`` logits with
    ``ignore_index=-100``, but only ``[n_labelled, V]`` logits exist: at 7B (V = 32k, a
    prompt of ~600 tokens with LLaVA-1.5's 576 image tokens, ~60 labelled) that is ~10x fewer
    float32 logits, and as many fewer in their gradient and the softmax.
    """
    shift_labels = labels[:, 1:]
    valid = shift_labels != IGNORE_INDEX
    if not bool(valid.any()):
        raise ValueError("no labelled target tokens in the batch")
    logits = lm_head(hidden[:, :-1][valid]).float()  # [n_labelled, V]
    targets = shift_labels[valid]
    loss = F.cross_entropy(logits, targets)
    with torch.no_grad():
        accuracy = (logits.argmax(-1) == targets).float().mean()
    return loss, accuracy
