"""The DEM's losses on attention maps and noise predictions (MMIG Sec. 3.3, Eqs. 16-20).

- :class:`RecordingAttnProcessor`, :func:`install_recording`, :class:`AttentionStore`,
  :func:`concept_maps`: the UNet's cross-attention probabilities of the concept tokens, captured
  as in diffusers' Attend-and-Excite pipeline (the pattern A-STAR builds on; REFERENCE.md "MMIG's
  building blocks"): a processor per cross-attention layer installed with ``set_attn_processor``
  that computes the probabilities with ``attn.get_attention_scores`` (the SDPA processors never
  materialise them), heads averaged, maps of one resolution (16 x 16 for SD at 512 px) averaged
  over layers, the start token dropped and the text tokens softmaxed after ×100, then a 3x3
  Gaussian smoothing with σ = 0.5.
- :func:`segregation_loss` (L_AS, Eq. 19) and :func:`retention_loss` (L_AR, Eq. 20): A-STAR
  (Agarwal et al., ICCV 2023). A-STAR released no code; its retention threshold is not public
  and is an argument here ("not given by the paper").
- :func:`foreground_loss` (L_fg, Eq. 17) and :func:`background_loss` (L_bg, Eq. 18).
- :func:`blend_embeddings` (Eq. 16, LayerDiffusion's object/background blend).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import Tensor
from torchvision.transforms.v2 import functional as TF


class AttentionStore:
    """Cross-attention maps recorded by :class:`RecordingAttnProcessor` during a UNet call.

    ``maps[name]`` is layer ``name``'s attention probability ``[B, L, h, w]`` (averaged over
    heads; L text tokens; autograd graph kept, so losses on it train the UNet or the latents).
    A layer records only when ``recording`` is on and, if ``resolution`` is set, its map is
    ``resolution`` x ``resolution`` (square latents are assumed). A later call of the same layer
    overwrites its entry; :meth:`reset` clears them (once per denoising step).
    """

    def __init__(self, resolution: int | None = 16) -> None:
        self.resolution = resolution
        self.recording = False
        self.maps: dict[str, Tensor] = {}
        self._unet = None
        self._original: dict | None = None

    def wants(self, num_positions: int) -> bool:
        if not self.recording:
            return False
        return self.resolution is None or num_positions == self.resolution**2

    def reset(self) -> None:
        self.maps = {}

    @contextmanager
    def record(self, reset: bool = True) -> Iterator[AttentionStore]:
        """Record during the ``with`` block (clearing old maps first unless ``reset=False``)."""
        if reset:
            self.reset()
        previous, self.recording = self.recording, True
        try:
            yield self
        finally:
            self.recording = previous

    def aggregate(self) -> Tensor:
        """Average of the recorded layers' maps, ``[B, L, res, res]`` (Attend-and-Excite's
        ``aggregate_attention``); all recorded maps must share one size."""
        if not self.maps:
            raise RuntimeError(
                "no attention maps recorded: is recording on, and does the UNet have "
                f"cross-attention at resolution {self.resolution}?"
            )
        sizes = {tuple(m.shape[-2:]) for m in self.maps.values()}
        if len(sizes) > 1:
            raise ValueError(f"maps of several sizes {sorted(sizes)}: set a resolution")
        return torch.stack(list(self.maps.values())).mean(0)

    def remove(self) -> None:
        """Put back the processors the UNet had before :func:`install_recording`."""
        if self._unet is not None and self._original is not None:
            self._unet.set_attn_processor(self._original)
        self._unet = self._original = None


class RecordingAttnProcessor:
    """Cross-attention processor that records its probabilities into an :class:`AttentionStore`.

    When the store does not want this layer's map the call goes to ``fallback`` (the SDPA
    processor by default), so the output is the plain UNet's exactly. When it records, the
    attention is computed as diffusers' ``AttnProcessor`` does (``get_attention_scores``, then
    ``bmm`` with the values), which agrees with SDPA to float rounding.
    """

    def __init__(self, store: AttentionStore, name: str, fallback=None) -> None:
        self.store = store
        self.name = name
        self.fallback = fallback if fallback is not None else AttnProcessor2_0()

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor:
        ndim = hidden_states.ndim
        positions = (
            hidden_states.shape[-2] * hidden_states.shape[-1]
            if ndim == 4
            else hidden_states.shape[1]
        )
        if encoder_hidden_states is None or not self.store.wants(positions):
            return self.fallback(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, tokens = encoder_hidden_states.shape[:2]
        attention_mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, attention_mask)  # [B*heads, N, L]
        self._store(probs, attn.heads, batch)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _store(self, probs: Tensor, heads: int, batch: int) -> None:
        n, length = probs.shape[1:]
        side = round(n**0.5)
        if side * side != n:
            raise ValueError(f"{n} query positions are not a square map")
        maps = probs.reshape(batch, heads, n, length).mean(1)  # heads averaged
        self.store.maps[self.name] = maps.transpose(1, 2).reshape(batch, length, side, side)


def install_recording(unet, resolution: int | None = 16) -> AttentionStore:
    """Give every cross-attention layer (``attn2``) of ``unet`` a :class:`RecordingAttnProcessor`
    through ``set_attn_processor``; self-attention keeps its processor. ``resolution`` is the map
    side to record (Attend-and-Excite: 16 for SD at 512 px) or None for all layers. Returns the
    store (recording off until :meth:`AttentionStore.record`); ``store.remove()`` uninstalls."""
    store = AttentionStore(resolution)
    original = dict(unet.attn_processors)
    processors = {}
    for name, proc in original.items():
        if name.endswith("attn2.processor"):
            processors[name] = RecordingAttnProcessor(store, name.removesuffix(".processor"), proc)
        else:
            processors[name] = proc
    if not any(isinstance(p, RecordingAttnProcessor) for p in processors.values()):
        raise ValueError("the UNet has no cross-attention (attn2) layers to record")
    unet.set_attn_processor(processors)
    store._unet, store._original = unet, original
    return store


def concept_maps(
    maps: Tensor,
    token_indices: Sequence[int] | Tensor,
    *,
    softmax_scale: float | None = 100.0,
    last_token: int | None = None,
    smooth_sigma: float | None = 0.5,
) -> Tensor:
    """Concept-token maps ``[B, K, h, w]`` from aggregated maps ``[B, L, h, w]``.

    Attend-and-Excite's processing: with ``softmax_scale`` the text tokens 1..``last_token``
    (exclusive; the start token 0 is dropped, padding after the end token can be cut with
    ``last_token``) are softmaxed over the token axis after multiplying by the scale; then the
    chosen tokens (indices into the full sequence, ``[K]`` for all samples or ``[B, K]``) are
    taken and, with ``smooth_sigma``, smoothed by a 3x3 Gaussian (torchvision, reflect padding).
    ``softmax_scale=None`` and ``smooth_sigma=None`` give the raw probabilities.
    """
    b = maps.shape[0]
    index = torch.as_tensor(token_indices, device=maps.device, dtype=torch.long)
    if index.ndim == 1:
        index = index.expand(b, -1)
    if softmax_scale is not None:
        last = maps.shape[1] if last_token is None else last_token
        if (index < 1).any() or (index >= last).any():
            raise ValueError(f"concept tokens must lie in 1..{last - 1}")
        maps = torch.softmax(maps[:, 1:last] * softmax_scale, dim=1)
        index = index - 1
    picked = maps.gather(1, index[:, :, None, None].expand(-1, -1, *maps.shape[-2:]))
    if smooth_sigma is not None:
        picked = TF.gaussian_blur(picked, kernel_size=[3, 3], sigma=[smooth_sigma, smooth_sigma])
    return picked


def _batched(maps: Tensor) -> Tensor:
    if maps.ndim == 3:
        maps = maps.unsqueeze(0)
    if maps.ndim != 4:
        raise ValueError(f"expected maps [B, K, h, w] or [K, h, w], got {tuple(maps.shape)}")
    return maps


def segregation_loss(maps: Tensor, eps: float = 1e-8) -> Tensor:
    """L_AS (Eq. 19): ``Σ_{m>n} Σ_ij min(A^m, A^n) / Σ_ij (A^m + A^n)`` over concept pairs.

    ``maps`` ``[B, K, h, w]`` (or ``[K, h, w]``), one map per concept; summed over pairs, mean
    over the batch. Identical maps give 0.5 per pair, disjoint maps 0. ``eps`` in the
    denominator (not in Eq. 19) keeps two all-zero maps defined (0).
    """
    maps = _batched(maps).float()
    k = maps.shape[1]
    m, n = torch.triu_indices(k, k, offset=1, device=maps.device)
    a, b = maps[:, m], maps[:, n]  # [B, pairs, h, w]
    ratio = torch.minimum(a, b).sum((-2, -1)) / ((a + b).sum((-2, -1)) + eps)
    return ratio.sum(1).mean()


def retention_loss(
    maps_prev: Tensor,
    maps_now: Tensor,
    threshold: float = 0.5,
    *,
    relative: bool = True,
    eps: float = 1e-8,
) -> Tensor:
    """L_AR (Eq. 20): ``Σ_m 1 − Σ_ij min(A^m_{t−1}, B^m_t) / (Σ_ij (A^m_{t−1} + B^m_t) + ε)``.

    ``maps_prev`` are the concept maps of the previous denoising step t; ``B_t`` is their binary
    mask ``maps_prev ≥ threshold`` (with ``relative``, of each map divided by its maximum), a
    detached proxy ground truth. ``maps_now`` are the maps ``A_{t−1}`` of the current step, which
    the loss pulls towards B. Shapes ``[B, K, h, w]`` (or ``[K, h, w]``); summed over concepts,
    mean over the batch. The threshold is not given by A-STAR (no code released): a config
    field. Identical 0/1 maps (so B = A) give 0.5 per concept; ``eps`` makes all-zero maps
    defined (loss 1 per concept).
    """
    prev, now = _batched(maps_prev).detach().float(), _batched(maps_now).float()
    if relative:
        prev = prev / prev.amax((-2, -1), keepdim=True).clamp_min(eps)
    proxy = ((prev >= threshold) & (prev > 0)).to(now.dtype)  # an all-zero map has no mask
    ratio = torch.minimum(now, proxy).sum((-2, -1)) / ((now + proxy).sum((-2, -1)) + eps)
    return (1 - ratio).sum(1).mean()


def resize_mask(mask: Tensor, size: Sequence[int], mode: str = "nearest") -> Tensor:
    """An image mask ``[B, 1, H, W]`` (or ``[B, H, W]``) in {0, 1} at the latent size ``(h, w)``.

    ``"nearest"`` (the default, as masked diffusion losses usually downsample) keeps it binary;
    ``"area"`` gives the covered fraction of each latent cell instead.
    """
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask.float()
    return F.interpolate(mask.float(), size=tuple(size), mode=mode)


def _masked_norm(target: Tensor, pred: Tensor, mask: Tensor, mode: str) -> Tensor:
    m = resize_mask(mask, target.shape[-2:], mode).to(target.device)
    diff = m * (target.float() - pred.float())
    return torch.linalg.vector_norm(diff.flatten(1), dim=1).mean()


def foreground_loss(
    target: Tensor, pred: Tensor, target_mask: Tensor, mask_mode: str = "nearest"
) -> Tensor:
    """L_fg (Eq. 17): ``E ‖M_t ∗ (ε − f_θ(x_t, t, e_opt))‖``.

    ``target`` is the diffusion target ε (or v for v-prediction) ``[B, C, h, w]``, ``pred`` the
    UNet's prediction conditioned on e_opt (Eq. 16), ``target_mask`` M_t the object mask of the
    *target* image ``[B, 1, H, W]`` (resized with :func:`resize_mask`, broadcast over channels).
    The norm is the unsquared L2 norm of each sample's masked residual (Eqs. 17-18 drop the
    square of Eqs. 14-15), averaged over the batch (the expectation); it grows with the square
    root of the latent size, unlike a mean.
    """
    return _masked_norm(target, pred, target_mask, mask_mode)


def background_loss(
    target: Tensor, pred: Tensor, reference_mask: Tensor, mask_mode: str = "nearest"
) -> Tensor:
    """L_bg (Eq. 18): ``E ‖(1 − M_r) ∗ (ε − f_θ(x_t, t, e_opt))‖``.

    As :func:`foreground_loss`, but masked by the *background* of the reference (input) image:
    ``reference_mask`` is M_r, the object mask of the reference image, and the loss uses
    ``1 − M_r`` (resized first, then complemented).
    """
    m = resize_mask(reference_mask, target.shape[-2:], mask_mode)
    return _masked_norm(target, pred, 1 - m, mask_mode)


def blend_embeddings(e_a: Tensor, e_b: Tensor, alpha: float = 0.7) -> Tensor:
    """``e_opt = α · ê_a + (1 − α) · ê_b`` (Eq. 16): ê_a the optimised object-attribute
    embedding, ê_b the background one; α = 0.7 (the paper's value)."""
    return alpha * e_a + (1 - alpha) * e_b
