"""What autograd saves for the backward pass, measured: the activation half of the training
memory estimate (:mod:`editbench.memory`).

:func:`saved_activations` runs a forward pass under ``torch.autograd.graph.saved_tensors_hooks``
and sums the bytes of every tensor saved for the backward pass, each storage once, the weights
left out. It works on the ``meta`` device (shapes, no storage), so a 7B model's layers cost no
memory; :func:`fused_attention` makes attention save what a fused GPU kernel saves (no
attention matrix). Calls of checkpointable layers are attributed to themselves with their
inputs, which gives the figure under gradient checkpointing
(:attr:`Activations.checkpointed`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

#: Layers diffusers and transformers recompute under gradient checkpointing.
CHECKPOINT_UNITS = ("LlamaDecoderLayer", "BasicTransformerBlock", "ResnetBlock2D")


@dataclass
class Activations:
    """Bytes saved for the backward pass by one call: outside any checkpointable unit, inside
    each unit call, and the units' tensor inputs (what checkpointing keeps)."""

    outside: dict[int, int] = field(default_factory=dict)
    units: list[dict[int, int]] = field(default_factory=list)
    boundaries: dict[int, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Without checkpointing: every saved storage once."""
        merged = dict(self.outside)
        for unit in self.units:
            merged.update(unit)
        return sum(merged.values())

    @property
    def checkpointed(self) -> int:
        """With checkpointing: the saved storages outside the units and the units' inputs
        (each once), plus the largest unit's own (recomputed one unit at a time)."""
        kept = {**self.outside, **self.boundaries}
        return sum(kept.values()) + max((sum(u.values()) for u in self.units), default=0)


def _storage(tensor: torch.Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage._cdata, storage.nbytes()


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False):
    """SDPA as a fused kernel (PyTorch's CPU flash attention, which has a meta kernel): saves
    q, k, v, the output and the log-sum-exp, as CUDA's flash/memory-efficient kernels do."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill(
            ~attn_mask, float("-inf")
        )
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
    )[0]


@contextmanager
def fused_attention():
    """``F.scaled_dot_product_attention`` as :func:`_fused_sdpa` (meta otherwise picks the math
    backend, which saves the attention matrix that GPUs never hold)."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def saved_activations(
    fn: Callable[[], object],
    *,
    exclude: Iterable[nn.Module] = (),
    units: Sequence[type[nn.Module]] = (),
) -> Activations:
    """Bytes of the tensors autograd saves for the backward pass while ``fn()`` runs
    (``torch.autograd.graph.saved_tensors_hooks``), each storage once; the parameters and
    buffers of ``exclude`` are weights, not activations, and are left out. Calls of
    ``units`` (outermost only) are attributed to themselves, and their tensor inputs recorded
    as boundaries, for :attr:`Activations.checkpointed`."""
    skip = {_storage(t)[0] for m in exclude for t in (*m.parameters(), *m.buffers())}
    result = Activations()
    keep: list[torch.Tensor] = []  # storages stay alive (their ids unique) until the end
    depth = [0]

    def record(tensor: torch.Tensor, into: dict[int, int]) -> None:
        key, nbytes = _storage(tensor)
        if key not in skip:
            into[key] = nbytes
            keep.append(tensor)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        record(tensor, result.units[-1] if depth[0] else result.outside)
        return tensor

    def pre_hook(module, args, kwargs):
        if depth[0] == 0:
            result.units.append({})
            for value in (*args, *kwargs.values()):
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    record(value, result.boundaries)
        depth[0] += 1

    def post_hook(module, args, kwargs, output):
        depth[0] -= 1

    with ExitStack() as stack:
        for module in {id(m): m for m in exclude}.values():
            for sub in module.modules():
                if units and isinstance(sub, tuple(units)):
                    stack.enter_context(sub.register_forward_pre_hook(pre_hook, with_kwargs=True))
                    stack.enter_context(sub.register_forward_hook(post_hook, with_kwargs=True))
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
        output = fn()
    del output
    keep.clear()
    return result


def unet_activations(unet: nn.Module, resolution: int, *, image_tokens: int = 0) -> Activations:
    """One training sample through ``unet`` at ``resolution`` px (latent ``resolution / 8``,
    the model's input channels, a 77-token condition of the cross-attention width; plus
    ``image_tokens`` decoupled image tokens), on the UNet's device and dtype."""
    weight = next(unet.parameters())
    options = {"device": weight.device, "dtype": weight.dtype}
    size = resolution // 8
    sample = torch.randn(1, unet.config.in_channels, size, size, **options)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, **options)
    condition = (text, [torch.randn(1, image_tokens, text.shape[-1], **options)]) if image_tokens \
        else text
    timestep = torch.tensor([500], device=weight.device)

    def step():
        out = unet(sample, timestep, condition).sample
        return F.mse_loss(out.float(), torch.zeros_like(out, dtype=torch.float32))

    return saved_activations(step, exclude=[unet], units=unit_classes(CHECKPOINT_UNITS))


#: Layer names (as ``editbench.strategies.LAYERS``, which imports Lightning) -> import paths.
LAYER_PATHS = {
    "LlamaDecoderLayer": "transformers.models.llama.modeling_llama.LlamaDecoderLayer",
    "CLIPEncoderLayer": "transformers.models.clip.modeling_clip.CLIPEncoderLayer",
    "BasicTransformerBlock": "diffusers.models.attention.BasicTransformerBlock",
    "ResnetBlock2D": "diffusers.models.resnet.ResnetBlock2D",
}


def unit_classes(names: Sequence[str]) -> tuple[type[nn.Module], ...]:
    """The layer classes named in ``names`` (keys of :data:`LAYER_PATHS`)."""
    classes = []
    for name in names:
        module, _, attr = LAYER_PATHS[name].rpartition(".")
        classes.append(getattr(importlib.import_module(module), attr))
    return tuple(classes)


def llm_activations(language_model: nn.Module, lm_head: nn.Module, seq_len: int) -> Activations:
    """One sample of ``seq_len`` tokens through the LLM's layers and head with the causal-LM
    loss, its input embeddings requiring gradients (MGIE's trainable embeddings, InsightEdit's
    new token rows): every layer saves its activations although its weights are frozen."""
    weight = lm_head.weight
    embeds = torch.randn(1, seq_len, weight.shape[1], device=weight.device, dtype=weight.dtype,
                         requires_grad=True)
    labels = torch.zeros(1, seq_len, dtype=torch.long, device=weight.device)

    def step():
        hidden = language_model(inputs_embeds=embeds).last_hidden_state
        logits = lm_head(hidden).float()
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())

    return saved_activations(step, exclude=[language_model, lm_head],
                             units=unit_classes(CHECKPOINT_UNITS))
