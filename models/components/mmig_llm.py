"""MMIG's multimodal LLM (Sec. 3.1, Eqs. 1, 6-8): LLaVA (or LLaMA) with MM-Adapters.

``z_d = f_llm(f_clip(x), w)`` (Eq. 1): the LLM reads the image x and the prompt w and answers
with a description z_d of the target image; its text embeddings ``e_llm`` go to MMSM (Eq. 2).
Mixture-of-Modality Adaptation (LaVIN, MMIG's [3]) puts a router adapter before the attention of
every decoder block (:func:`~models.components.mm_adapter.insert_mm_adapters`, Eq. 6), and only
the adaptation parameters θ_a train under ``L_MMT`` (Eq. 7), the next-token loss of the
ground-truth response R (Eq. 8), here the target description.

Built on :class:`~models.components.mllm.MLLM` (loading offline, prompts, padding, the labelled
LM loss) with no visual [IMG] tokens (``num_img_tokens`` 0): a training row is
``prompt + z_d + </s>`` with labels on ``z_d + </s>``; inference decodes greedily (Eq. 1,
``num_beams`` 1), then one forward pass over ``prompt + z_d + </s>`` gives ``e_llm``.

``e_llm`` (MMSM's ``e_0``) is not defined further by the paper: here it is the last-layer
hidden states (after the final norm) at the answer's positions, ``z_d``'s tokens and the closing
``</s>``, ``[B, L, H]`` right-padded with a mask; the same positions in teacher forcing and at
inference, so MMSM sees the same kind of input in both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.components.mllm import IGNORE_INDEX, MLLM, PROMPT_TEMPLATE, labelled_lm_loss
from models.components.mm_adapter import MMAdapters, adapter_parameters, insert_mm_adapters


@dataclass
class DescriptionOutput:
    """``loss`` = L_MMT (mean CE over the answer tokens; None at inference), ``texts`` the
    descriptions z_d (None in teacher forcing), ``e_llm`` ``[B, L, H]`` and ``mask`` ``[B, L]``
    (1 = answer token), ``token_accuracy`` (detached; None at inference)."""

    e_llm: Tensor
    mask: Tensor
    loss: Tensor | None = None
    token_accuracy: Tensor | None = None
    texts: list[str] | None = None


def gather_rows(hidden: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """The positions ``keep`` ``[B, T]`` of ``hidden`` ``[B, T, H]``, packed to the left:
    ``[B, max kept, H]`` (zeros after a row's end) and its mask ``[B, max kept]``."""
    counts = keep.sum(1)
    length = max(int(counts.max()), 1)
    out = hidden.new_zeros(hidden.shape[0], length, hidden.shape[-1])
    mask = torch.zeros(hidden.shape[0], length, dtype=torch.long, device=hidden.device)
    for i in range(hidden.shape[0]):
        n = int(counts[i])
        out[i, :n] = hidden[i][keep[i]]
        mask[i, :n] = 1
    return out, mask


class DescriptionLLM(MLLM):
    """The multimodal LLM of MMIG: LLaVA (``visual``) or LLaMA + MM-Adapters (Eqs. 1, 6-8).

    Args:
        path: a local llava-hf LLaVA folder (``visual``) or a causal LM folder.
        visual: read the image (MMIG) or not.
        max_new_tokens: greedy decoding budget of z_d.
        prompt_template: the prompt around the instruction w (``{instruction}``); the paper
            gives none, the default is the suite's MGIE query.
        chat_template: the conversation around the prompt (``None``: :class:`MLLM`'s).
        torch_dtype: dtype of the frozen LLM (the adapters stay float32).
        adapter: :func:`insert_mm_adapters` arguments (``hidden_dim`` 8, ``groups`` 2,
            ``dropout`` 0.1, ``scale`` 1, ``temperature`` 10: LaVIN's values).
    """

    def __init__(
        self,
        path: str,
        *,
        visual: bool = True,
        max_new_tokens: int = 64,
        prompt_template: str = PROMPT_TEMPLATE,
        chat_template: str | None = None,
        torch_dtype: str | None = None,
        adapter: dict | None = None,
    ) -> None:
        super().__init__(
            path,
            num_img_tokens=0,
            visual=visual,
            max_new_tokens=max_new_tokens,
            prompt_template=prompt_template,
            chat_template=chat_template,
            torch_dtype=torch_dtype,
        )
        #: The inserted adapters (hooks on each block's input RMSNorm) and their router state.
        self.adapters: MMAdapters = insert_mm_adapters(self.model, freeze=True, **(adapter or {}))

    def _add_img_tokens(self, init: str) -> list[int]:
        """MMIG adds no tokens to the vocabulary."""
        return []

    def _freeze(self) -> None:
        self.model.requires_grad_(False)  # the adapters, inserted afterwards, train

    def trainable_parameters(self) -> list[nn.Parameter]:
        """θ_a (Eq. 7): the adapters, routers and the modality embedding."""
        return adapter_parameters(self.model)

    def adapter_modules(self) -> list[nn.Module]:
        """The modules holding θ_a (for a stage group)."""
        return [*self.adapters.adapters, self.adapters.embedding]

    def train(self, mode: bool = True):
        """The frozen LLM stays in eval mode; the adapters follow ``mode`` while they train."""
        super().train(False)
        trains = any(p.requires_grad for p in self.trainable_parameters())
        for module in self.adapter_modules():
            module.train(mode and trains)
        return self

    # ------------------------------------------------------------------ training

    def describe_forward(
        self, images: Tensor | None, instructions: Sequence[str], descriptions: Sequence[str]
    ) -> DescriptionOutput:
        """Teacher forcing on ``prompt + z_d + </s>``: L_MMT (Eqs. 7-8) and e_llm."""
        inputs = self.training_inputs(images, instructions, descriptions)
        input_ids, labels = inputs["input_ids"], inputs["labels"]
        hidden = self.hidden_states(input_ids, inputs["attention_mask"], inputs.get("pixel_values"))
        loss, accuracy = labelled_lm_loss(hidden, labels, self.lm_head)
        e_llm, mask = gather_rows(hidden, labels != IGNORE_INDEX)
        return DescriptionOutput(e_llm=e_llm, mask=mask, loss=loss, token_accuracy=accuracy)

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def describe(
        self,
        images: Tensor | None,
        instructions: Sequence[str],
        max_new_tokens: int | None = None,
    ) -> DescriptionOutput:
        """z_d by greedy decoding (Eq. 1) with the KV cache, cut at the first ``</s>``; then
        e_llm from one forward pass over ``prompt + z_d + </s>``."""
        enc = self.encode_prompts(instructions, images)
        sequences = self.model.generate(
            **enc,
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        generated = sequences[:, enc["input_ids"].shape[1] :].tolist()
        eos = self.tokenizer.eos_token_id
        answers = [self._split_generated(row)[0] + [eos] for row in generated]
        texts = [
            self.tokenizer.decode(ids[:-1], skip_special_tokens=True).strip() for ids in answers
        ]
        masks = enc["attention_mask"].bool()
        prompts = [ids[m].tolist() for ids, m in zip(enc["input_ids"], masks, strict=True)]
        rows = [p + a for p, a in zip(prompts, answers, strict=True)]
        input_ids, attention_mask = self._pad(rows, side="right")
        hidden = self.hidden_states(input_ids, attention_mask, enc.get("pixel_values"))
        keep = torch.zeros_like(attention_mask, dtype=torch.bool)
        for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
            keep[i, len(prompt) : len(prompt) + len(answer)] = True
        e_llm, mask = gather_rows(hidden, keep)
        return DescriptionOutput(e_llm=e_llm, mask=mask, texts=texts)
