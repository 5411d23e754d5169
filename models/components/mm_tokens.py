"""InsightEdit's LLM-side training parts: LoRA on the language model and the new [MM] token rows.

InsightEdit (/work/shared/papers/insightedit.txt, "Loss & Training": "LLM parameters frozen and
fine-tuned via LoRA") and SmartEdit, whose recipe it follows (/work/shared/REFERENCE.md,
"SmartEdit": LoRA r 8, alpha 16, dropout 0.05 on ``q_proj``/``v_proj``; the new token rows and
``lm_head`` train; vision tower and projector frozen):

- :func:`add_lora` injects peft's LoRA layers into the *language model only* (the vision tower
  has ``q_proj``/``v_proj`` too, which must stay untouched), with peft's
  ``inject_adapter_in_model`` (no ``PeftModel`` wrapper, so the host module keeps its API).
- :class:`NewTokenRows` holds the embedding and LM-head rows of the r new tokens as two small
  parameters ``[r, H]`` and splices them into the frozen ``embed_tokens`` / ``lm_head`` with
  forward hooks: the rows of the ids from ``first_id`` on (input side) and the logits columns
  ``first_id .. first_id + r`` (output side) come from these parameters. So only the new rows
  train (AdamW state for ``2 r H`` values, not the whole 32k-row vocabulary) and only they are
  saved; the full matrices stay frozen and are re-read from the model's path. Of the LM head
  only the new rows train (SmartEdit trains the whole ``lm_head``; training all 32k rows would
  put the vocabulary in every checkpoint, which the suite's checkpoint contract forbids).

Plain ``nn.Module`` s and functions: no Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import Tensor, nn
from torch.nn import functional as F


def add_lora(
    language_model: nn.Module,
    *,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
) -> list[nn.Module]:
    """Inject LoRA (``LoraConfig(r, lora_alpha, lora_dropout, target_modules)``) into
    ``language_model`` in place and return the LoRA modules (each layer's ``lora_A`` and
    ``lora_B``), the only trainable LLM weights. The base weights' keys gain ``.base_layer``
    (peft's layout); ``lora_B`` starts at zero, so the model is unchanged until it trains."""
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules)
    )
    inject_adapter_in_model(config, language_model)
    modules = [
        module
        for name, module in language_model.named_modules()
        if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B")
    ]
    if not modules:
        raise ValueError(f"add_lora: no module named {list(target_modules)} in the language model")
    return modules


class NewTokenRows(nn.Module):
    """Trainable rows of ``n`` new tokens (ids ``first_id .. first_id + n - 1``), spliced into a
    frozen input embedding and LM head by forward hooks (:meth:`attach`).

    Args:
        embed_rows: initial input-embedding rows ``[n, H]`` (copied).
        head_rows: initial LM-head rows ``[n, H]`` (copied).
        first_id: the first new token id; the new ids are consecutive.
    """

    def __init__(self, embed_rows: Tensor, head_rows: Tensor, first_id: int) -> None:
        super().__init__()
        if embed_rows.shape != head_rows.shape:
            raise ValueError(
                f"NewTokenRows: embedding rows {tuple(embed_rows.shape)} and head rows "
                f"{tuple(head_rows.shape)} differ"
            )
        self.first_id = int(first_id)
        self.embed = nn.Parameter(embed_rows.detach().clone().float())
        self.head = nn.Parameter(head_rows.detach().clone().float())
        self._handles: list = []

    @property
    def num_tokens(self) -> int:
        return self.embed.shape[0]

    def attach(self, embed_tokens: nn.Module, lm_head: nn.Module) -> None:
        """Register the hooks (after any hook already there, e.g. a dtype cast)."""
        self.detach_hooks()
        self._handles = [
            embed_tokens.register_forward_hook(self._embed_hook),
            lm_head.register_forward_hook(self._head_hook),
        ]

    def detach_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _embed_hook(self, module: nn.Module, args, output: Tensor) -> Tensor:
        ids = args[0]
        new = ids >= self.first_id
        if not bool(new.any()):
            return output
        index = (ids - self.first_id).clamp(0, self.num_tokens - 1)
        rows = F.embedding(index, self.embed).to(output.dtype)
        return torch.where(new.unsqueeze(-1), rows, output)

    def _head_hook(self, module: nn.Module, args, output: Tensor) -> Tensor:
        hidden = args[0]
        start, end = self.first_id, self.first_id + self.num_tokens
        new = F.linear(hidden.to(self.head.dtype), self.head).to(output.dtype)
        return torch.cat([output[..., :start], new, output[..., end:]], dim=-1)
