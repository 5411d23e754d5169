"""InsightEdit's generation-side plumbing: decoupled cross-attention and the ``v_txt`` residual.

Decoupled cross-attention (InsightEdit, "Decoupled Cross-Attention Generation", after
IP-Adapter): every UNet cross-attention layer attends separately to the text condition ``f_txt``
and to the image tokens ``f_img``,

    Z = Attention(Q, K_txt, V_txt) + λ · Attention(Q, K_img, V_img),

with λ adjustable at inference. diffusers 0.42's ``IPAdapterAttnProcessor2_0`` computes exactly
this before the layer's ``to_out`` (/work/shared/REFERENCE.md, "Decoupled cross-attention in
diffusers 0.42"); :func:`install_decoupled_attention` puts one on every cross-attention layer
through ``unet.set_attn_processor`` and :func:`set_image_scale` sets λ.

Calling convention (diffusers'): the image tokens travel with the text as
``encoder_hidden_states=(text [B, L, D], [f_img [B, N, D]])`` (:func:`pack_condition`, or the
:func:`image_tokens` context manager for callers such as ``EditDiffusion`` that pass a plain
tensor). Never call a UNet with these processors on a plain tensor outside :func:`image_tokens`:
diffusers then treats the last N text tokens as image tokens (a deprecated fallback).

``v_txt`` (BIM's text-aware visual feature) is added to the UNet sample right after
``conv_in``, as SmartEdit's ``UNet2DConditionModel_ZeroConv`` does (``sample = conv_in(sample) +
v_txt``; InsightEdit's text says "added to UNet input" in one place and "concatenated" in another:
this follows SmartEdit's code), through a forward hook on ``unet.conv_in``
(:func:`add_after_conv_in`), without editing diffusers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor2_0,
    IPAdapterAttnProcessor2_0,
)
from torch import Tensor, nn

_SUFFIX = ".processor"


def cross_attention_layers(unet: nn.Module) -> dict[str, Attention]:
    """The UNet's cross-attention layers (``attn2`` of every transformer block), by the key
    ``unet.attn_processors`` uses for their processor."""
    layers = {}
    for key in unet.attn_processors:
        module = unet.get_submodule(key[: -len(_SUFFIX)])
        if isinstance(module, Attention) and module.is_cross_attention:
            layers[key] = module
    return layers


def install_decoupled_attention(
    unet: nn.Module, num_tokens: int = 4, scale: float = 1.0
) -> nn.ModuleDict:
    """Put diffusers' ``IPAdapterAttnProcessor2_0`` on every cross-attention layer of ``unet``.

    Each processor's ``to_k_ip``/``to_v_ip`` start as copies of the layer's ``to_k``/``to_v``
    weights (IP-Adapter's training code does this; diffusers leaves them at PyTorch's random
    init), so at λ = 1 the image stream initially reads ``f_img`` through the text stream's own
    projections. Self-attention layers keep their processor (diffusers' default
    ``AttnProcessor2_0`` on a fresh UNet; a leftover IP-Adapter processor there is reset to it).
    Calling it again replaces the processors with fresh ones.

    ``num_tokens`` is N, the image-token count (only diffusers' deprecated plain-tensor path reads
    it); ``scale`` is λ. The processors become submodules of the UNet (state-dict keys
    ``...attn2.processor.to_k_ip.0.weight``), so they train and save with it; the returned
    ``ModuleDict`` (keys: the layer path with ``.`` → ``__``) is for selecting their parameters;
    do not also register it as a submodule, or the state dict holds them twice.
    """
    cross = cross_attention_layers(unet)
    if not cross:
        raise ValueError("install_decoupled_attention: the UNet has no cross-attention layer")
    processors: dict[str, nn.Module] = {}
    installed = nn.ModuleDict()
    for key, current in unet.attn_processors.items():
        layer = cross.get(key)
        if layer is None:
            processors[key] = (
                AttnProcessor2_0() if isinstance(current, IPAdapterAttnProcessor2_0) else current
            )
            continue
        weight_k, weight_v = layer.to_k.weight, layer.to_v.weight
        processor = IPAdapterAttnProcessor2_0(
            hidden_size=weight_k.shape[0],
            cross_attention_dim=weight_k.shape[1],
            num_tokens=(num_tokens,),
            scale=scale,
        ).to(device=weight_k.device, dtype=weight_k.dtype)
        with torch.no_grad():
            processor.to_k_ip[0].weight.copy_(weight_k)
            processor.to_v_ip[0].weight.copy_(weight_v)
        processors[key] = processor
        installed[key[: -len(_SUFFIX)].replace(".", "__")] = processor
    unet.set_attn_processor(processors)  # empties the dict it is given: built fresh per call
    return installed


def decoupled_processors(unet: nn.Module) -> list[IPAdapterAttnProcessor2_0]:
    """The decoupled-attention processors currently installed on ``unet``."""
    return [p for p in unet.attn_processors.values() if isinstance(p, IPAdapterAttnProcessor2_0)]


def set_image_scale(unet: nn.Module, scale: float) -> int:
    """Set λ on every decoupled-attention processor (diffusers' ``set_ip_adapter_scale`` is a
    pipeline method; on a bare UNet the processor's ``scale`` list is the knob). λ = 0 skips the
    image stream, so the UNet computes exactly what it does with default processors on the text
    condition. Returns how many processors were set."""
    processors = decoupled_processors(unet)
    if not processors:
        raise ValueError("set_image_scale: no decoupled attention installed on this UNet")
    for processor in processors:
        processor.scale = [float(scale)] * len(processor.num_tokens)
    return len(processors)


def pack_condition(text: Tensor, image_tokens: Tensor) -> tuple[Tensor, list[Tensor]]:
    """``encoder_hidden_states`` for a UNet with decoupled attention: ``(text, [image_tokens])``,
    text ``[B, L, D]`` and image tokens ``[B, N, D]`` (diffusers' IP-Adapter convention)."""
    if text.shape[0] != image_tokens.shape[0]:
        raise ValueError(
            f"pack_condition: text batch {text.shape[0]} != image-token batch {image_tokens.shape[0]}"
        )
    return text, [image_tokens.to(text.dtype)]


def guidance_image_tokens(f_img: Tensor, null_img: Tensor) -> Tensor:
    """Image tokens for the three classifier-free-guidance branches: ``[cond, null, null]``.

    ``EditDiffusion.sample`` batches the branches as ``[(c_I, c_T), (c_I, ∅), (∅, ∅)]``
    (InstructPix2Pix's Eq. 3). ``f_img`` comes from the MLLM's reading of the instruction, so it
    belongs to the instruction condition c_T: only the first branch carries it (the issue's
    ``[cond, null, null]``). ``null_img`` (``[1 or B, N, D]``) is ``ImageStream.null_tokens()``,
    the projection of a zero CLIP embedding, IP-Adapter's unconditional image tokens, rather
    than zero tokens: zero tokens would silence the image stream (``to_k_ip(0) = to_v_ip(0) =
    0``), a state the UNet never sees in training when dropout uses the projected null.
    """
    null = null_img.expand(f_img.shape[0], -1, -1).to(f_img.dtype)
    return torch.cat([f_img, null, null])


@contextmanager
def image_tokens(unet: nn.Module, tokens: Tensor) -> Iterator[None]:
    """Within the block, every ``unet(...)`` call that passes ``encoder_hidden_states`` as a plain
    tensor gets ``(text, [tokens])`` instead (a forward pre-hook on the UNet), so code written for
    a plain UNet, such as ``EditDiffusion.loss``/``sample``, drives the decoupled attention
    unchanged. ``tokens`` is ``[B, N, D]`` with the UNet call's batch (for guidance:
    :func:`guidance_image_tokens`); it is cast to the text's dtype per call."""

    def pack(module, args, kwargs):
        text = kwargs.get("encoder_hidden_states")
        if text is None and len(args) > 2:
            text, args = args[2], (*args[:2], *args[3:])
        if text is None or isinstance(text, tuple):
            return None
        kwargs["encoder_hidden_states"] = pack_condition(text, tokens)
        return args, kwargs

    handle = unet.register_forward_pre_hook(pack, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class ConvInResidual:
    """Forward hook for ``unet.conv_in`` that adds a feature map to its output.

    SmartEdit's ``UNet2DConditionModel_ZeroConv.forward`` computes ``sample = conv_in(sample) +
    two_way_image_features_zero_conv``; the hook does the same on diffusers' unmodified UNet.
    ``feature`` is ``[b, C, h, w]`` with b equal to the UNet call's batch or dividing it: a
    batch of k·b (the three guidance branches) gets the feature tiled k times, as SmartEdit's
    sampler adds ``torch.cat([v_txt] * 3)`` to every branch.
    """

    def __init__(self, feature: Tensor | None = None) -> None:
        self.feature = feature

    def __call__(self, module: nn.Module, args, output: Tensor) -> Tensor | None:
        if self.feature is None:
            return None
        feature = self.feature
        if feature.shape[1:] != output.shape[1:]:
            raise ValueError(
                f"add_after_conv_in: feature {tuple(feature.shape[1:])} does not match conv_in's "
                f"output {tuple(output.shape[1:])}"
            )
        if output.shape[0] != feature.shape[0]:
            if output.shape[0] % feature.shape[0]:
                raise ValueError(
                    f"add_after_conv_in: batch {output.shape[0]} is no multiple of the "
                    f"feature's {feature.shape[0]}"
                )
            feature = feature.repeat(output.shape[0] // feature.shape[0], 1, 1, 1)
        return output + feature.to(output.dtype)


@contextmanager
def add_after_conv_in(unet: nn.Module, v_txt: Tensor | None) -> Iterator[ConvInResidual]:
    """Within the block, the UNet adds ``v_txt`` to its sample right after ``conv_in``
    (:class:`ConvInResidual`); ``None`` adds nothing (stages without BIM). The hook is removed
    on exit, so the feature is set per call and never outlives it."""
    residual = ConvInResidual(v_txt)
    handle = unet.conv_in.register_forward_hook(residual)
    try:
        yield residual
    finally:
        handle.remove()
