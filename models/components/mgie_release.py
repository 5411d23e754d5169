"""Load the released MGIE weights (apple/ml-mgie ``mllm.pt`` / ``unet.pt``) into our modules.

The release (``mgie_7b.tar.gz``) holds two files that ml-mgie's ``extract_ckpt.ipynb`` wrote with
``torch.save`` from the trained ``LlavaLlamaForCausalLM`` (all tensors cast to float16):

- ``mllm.pt``: every key containing ``embed_tokens``, ``lm_head`` or ``edit_head``:
  ``model.embed_tokens.weight`` and ``lm_head.weight`` (``[V + 8, 4096]``, V = the vocabulary of
  the original LLaVA-7B-v1 tokenizer, the 8 [IMG] rows last) and ``edit_head.*`` (the
  ``EditMapper``: ``llm2hid``, ``query``, ``mapper`` (``nn.Transformer``), ``hid2feat``). The demo
  also reads ``ckpt['emb']``, the 8 [IMG] embeddings given to the edit head; it is optional here
  (``extract_ckpt.ipynb`` as published does not write it) and is checked against the [IMG] rows
  of ``model.embed_tokens.weight`` when present.
- ``unet.pt``: the trained 8-channel UNet's state dict, keys with ``unet.`` stripped, i.e. a
  diffusers ``UNet2DConditionModel`` state dict.

Both are plain dicts of tensors, so ``torch.load(..., weights_only=True)`` reads them; a file
holding other pickled objects is refused with an error that says so (we never unpickle code).

The embedding rows follow the *original* LLaVA-7B-v1 tokenizer (32,003 tokens: LLaMA's 32,000 +
``<im_patch>``, ``<im_start>``, ``<im_end>``; ``[IMG0]`` = 32003 in the released demo), so they
apply to the release's own LLaVA-7B-v1 (README: LLaVA-Lightning-7B-delta-v1-1 on LLaMA-7B), read
after ``python -m editbench data convert-llava`` has rewritten its original layout as llava-hf
without changing a weight or a token id (:mod:`models.components.llava_v1`): 32003 + 8 rows,
the [IMG] rows last. Other llava-hf models (e.g. ``llava-hf/llava-1.5-7b-hf``, 32064 rows) have
another vocabulary, and ``apply_release`` says so with the expected and found shapes instead of
copying misaligned rows. ``unet.pt`` goes into the 8-channel UNet of the InstructPix2Pix folder
(``diffusion_path``), whose VAE, text encoder and Euler ancestral scheduler the demo samples
with (``experiments/mgie_release.yaml``).
"""

from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

    from models.components.edit_head import EditHead
    from models.components.mllm import MLLM

EMBED_KEY = "model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"
EDIT_HEAD_PREFIX = "edit_head."
IMG_EMBEDS_KEY = "emb"


@dataclass
class ReleaseWeights:
    """The released tensors, official names stripped to what each module expects:
    ``edit_head`` keys without ``edit_head.`` (e.g. ``llm2hid.weight``), ``unet`` keys as in a
    diffusers UNet; ``img_embeds`` is the optional ``emb`` entry (``[1, N, H]`` or ``[N, H]``)."""

    embed_tokens: Tensor
    lm_head: Tensor
    edit_head: dict[str, Tensor]
    unet: dict[str, Tensor] | None
    img_embeds: Tensor | None = None


def load_release(mllm_pt: str, unet_pt: str | None) -> ReleaseWeights:
    """Read the released ``mllm.pt`` (and ``unet.pt`` if given) on the CPU."""
    state = _load_state(mllm_pt)
    for key in (EMBED_KEY, LM_HEAD_KEY):
        if key not in state:
            raise KeyError(f"{mllm_pt}: missing key {key!r} (found {_preview(state)})")
    edit_head = {
        k[len(EDIT_HEAD_PREFIX) :]: v for k, v in state.items() if k.startswith(EDIT_HEAD_PREFIX)
    }
    if not edit_head:
        raise KeyError(f"{mllm_pt}: no {EDIT_HEAD_PREFIX}* keys (found {_preview(state)})")
    return ReleaseWeights(
        embed_tokens=state[EMBED_KEY],
        lm_head=state[LM_HEAD_KEY],
        edit_head=edit_head,
        unet=_load_state(unet_pt) if unet_pt is not None else None,
        img_embeds=state.get(IMG_EMBEDS_KEY),
    )


def apply_release(
    mllm: MLLM,
    edit_head: EditHead,
    unet: UNet2DConditionModel | None,
    weights: ReleaseWeights,
) -> None:
    """Copy released weights into the modules (cast to their dtypes), after checking every
    shape: the embedding rows must be the MLLM's vocabulary (base vocabulary + N [IMG] tokens,
    the [IMG] rows last), the edit head and UNet keys must match exactly."""
    _check_img_rows_last(mllm)
    pairs = [
        (EMBED_KEY, mllm.embed_tokens.weight, weights.embed_tokens),
        (LM_HEAD_KEY, mllm.lm_head.weight, weights.lm_head),
    ]
    for key, target, source in pairs:
        _check_shape(key, tuple(target.shape), source, hint=_vocab_hint(mllm))
    _check_img_embeds(mllm, weights)
    _check_state(EDIT_HEAD_PREFIX, edit_head, weights.edit_head)
    if unet is not None:
        if weights.unet is None:
            raise ValueError("apply_release: a UNet was given but the weights have no unet.pt")
        _check_state("unet.", unet, weights.unet)
    with torch.no_grad():
        for _, target, source in pairs:
            target.copy_(source)
        edit_head.load_state_dict(weights.edit_head, strict=True)  # casts to the module dtype
        if unet is not None:
            unet.load_state_dict(weights.unet, strict=True)


# ----------------------------------------------------------------------------- reading


def _load_state(path: str) -> dict[str, Tensor]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: released MGIE weight file not found")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{file}: not a plain state dict of tensors (torch.load(weights_only=True) refused "
            f"it; arbitrary pickled objects are never loaded): {err}"
        ) from err
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{file}: expected a dict of name -> tensor, got {type(state).__name__}")
    return state


def _preview(state: dict, n: int = 5) -> str:
    keys = sorted(state)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} keys)" if len(keys) > n else "")


# ----------------------------------------------------------------------------- checks


def _vocab_hint(mllm: MLLM) -> str:
    n = mllm.num_img_tokens
    base = mllm.embed_tokens.weight.shape[0] - n
    return f"(LLaVA vocabulary {base} + {n} [IMG] tokens, hidden {mllm.hidden_size})"


def _check_shape(key: str, expected: tuple, source: Tensor, hint: str = "") -> None:
    if tuple(source.shape) != expected:
        raise ValueError(
            f"released weight {key!r}: expected shape {expected} {hint}".rstrip()
            + f", found {tuple(source.shape)}"
        )


def _check_img_rows_last(mllm: MLLM) -> None:
    rows = mllm.embed_tokens.weight.shape[0]
    last = list(range(rows - mllm.num_img_tokens, rows))
    if mllm.img_token_ids != last:
        raise ValueError(
            f"apply_release: the release keeps the [IMG] rows last ({last}), but this MLLM's "
            f"[IMG] ids are {mllm.img_token_ids}"
        )


def _check_img_embeds(mllm: MLLM, weights: ReleaseWeights) -> None:
    """The optional ``emb`` entry must be the [IMG] rows of ``embed_tokens`` (warn if not)."""
    if weights.img_embeds is None:
        return
    n, h = mllm.num_img_tokens, mllm.hidden_size
    emb = weights.img_embeds
    if emb.dim() == 3 and emb.shape[0] == 1:
        emb = emb[0]
    _check_shape(IMG_EMBEDS_KEY, (n, h), emb, hint="(or (1, N, H): the [IMG] embeddings)")
    rows = weights.embed_tokens[-n:].float()
    diff = (emb.float() - rows).abs().max().item()
    if diff > 1e-3 * max(1.0, rows.abs().max().item()):
        warnings.warn(
            f"released '{IMG_EMBEDS_KEY}' differs from the [IMG] rows of {EMBED_KEY} (max "
            f"|diff| {diff:.3g}); the edit head will get the rows of {EMBED_KEY}",
            stacklevel=3,
        )


def _check_state(prefix: str, module: nn.Module, state: dict[str, Tensor]) -> None:
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(
            f"released {prefix}* weights do not match {type(module).__name__}: "
            f"missing {[prefix + k for k in missing][:10]}, "
            f"unexpected {[prefix + k for k in unexpected][:10]}"
        )
    for key, shape in expected.items():
        _check_shape(prefix + key, shape, state[key])
