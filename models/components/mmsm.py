"""MMIG's multi-modality mutual support module (MMSM, Sec. 3.2, Eqs. 9-13, Figure 3).

MMSM lets the LLM's text embeddings steer a feature map inside the diffusion editing model
(DEM): ``v_M = f_MMSM(e_llm, v_DEM)`` (Eq. 2). The paper's symbols, and what they are here:

- ``e_0``: the text embeddings of the LLM (``e_llm``), ``[B, L, d_llm]`` with a padding mask;
- ``e_3 = f_MLP(e_0)`` (Eq. 9): a two-layer MLP d_llm → d → d with GELU (the paper names only an
  MLP; this is LLaVA-1.5's ``mlp2x_gelu`` projector shape), ``[B, L, d]``;
- ``e_1``: the DEM feature map, ``[B, C, h, w]`` (by default the UNet mid block's output, see
  :class:`UNetFeatureHook`);
- ``e_2 = f_DE(e_1)`` (Eq. 10), the domain encoder: GroupNorm → SiLU → 3x3 conv C → d, the h·w
  positions flattened to tokens ``[B, h·w, d]``;
- ``e_4 = f_CA(e_2, e_3)`` (Eq. 11): cross attention, queries from the image tokens ``e_2``,
  keys/values from the text tokens ``e_3`` (so that e_4 keeps e_2's layout and can be decoded
  back to a map), pre-norm with a residual (Transformer convention: ``e_2 + MHA(LN(e_2), LN(e_3))``),
  ``torch.nn.MultiheadAttention``;
- ``e_6 = e_1 + f_DD(e_4)`` (Eq. 12), the domain decoder: LayerNorm → Linear d → C, reshaped to
  ``[B, C, h, w]``. Its Linear starts at zero (ControlNet's zero convolution), so that
  ``e_6 = e_1`` when MMSM is first inserted and the pretrained UNet is undisturbed;
- ``L_MMSM = ½ (e_3 − e_2)²`` (Eq. 13). e_3 has L text tokens and e_2 has h·w positions, so the
  paper's element-wise difference is not defined as written: here each side is averaged over its
  tokens (text padding excluded) to one d-vector per sample, and the loss is the **mean** over
  batch and the d channels of ``½ (mean_L e_3 − mean_hw e_2)²``.

The architectures of the MLP, domain encoder/decoder and attention are not given by the paper
(no code was released); widths and heads are constructor arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn


@dataclass
class MMSMOutput:
    """The paper's intermediate tensors (Eqs. 9-13) and the loss."""

    e6: Tensor  # [B, C, h, w], fed back into the DEM
    e2: Tensor  # [B, h*w, d]
    e3: Tensor  # [B, L, d]
    e4: Tensor  # [B, h*w, d]
    loss: Tensor  # L_MMSM, scalar


def _groups(channels: int, wanted: int = 32) -> int:
    g = min(wanted, channels)
    while channels % g:
        g -= 1
    return g


class MMSM(nn.Module):
    """Eqs. 9-13: ``e_6 = e_1 + f_DD(f_CA(f_DE(e_1), f_MLP(e_0)))`` and ``L_MMSM``.

    Args:
        text_dim: width of the LLM text embeddings e_0 (d_llm).
        feature_channels: channels C of the DEM feature map e_1.
        dim: MMSM width d (of e_2, e_3, e_4).
        num_heads: heads of the cross attention.
        dropout: attention dropout.
    """

    def __init__(
        self,
        text_dim: int,
        feature_channels: int,
        dim: int = 256,
        num_heads: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.feature_channels = feature_channels
        self.mlp = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.domain_encoder = nn.Sequential(
            nn.GroupNorm(_groups(feature_channels), feature_channels),
            nn.SiLU(),
            nn.Conv2d(feature_channels, dim, kernel_size=3, padding=1),
        )
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.cross_attention = nn.MultiheadAttention(
            dim, num_heads, dropout=dropout, batch_first=True
        )
        self.domain_decoder = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, feature_channels))
        nn.init.zeros_(self.domain_decoder[-1].weight)
        nn.init.zeros_(self.domain_decoder[-1].bias)

    def encode_text(self, e0: Tensor) -> Tensor:
        """e_3 = f_MLP(e_0) (Eq. 9): ``[B, L, d_llm]`` → ``[B, L, d]``."""
        return self.mlp(e0.to(self.mlp[0].weight.dtype))

    def encode_features(self, e1: Tensor) -> Tensor:
        """e_2 = f_DE(e_1) (Eq. 10): ``[B, C, h, w]`` → ``[B, h·w, d]``."""
        return self.domain_encoder(e1.to(self.mlp[0].weight.dtype)).flatten(2).transpose(1, 2)

    def forward(self, e0: Tensor, e1: Tensor, text_mask: Tensor | None = None) -> MMSMOutput:
        """``e0`` ``[B, L, d_llm]``, ``e1`` ``[B, C, h, w]``, ``text_mask`` ``[B, L]`` (1 = real
        token, 0 = padding; None = all real) → :class:`MMSMOutput` (e_6 in ``e1``'s dtype)."""
        if e1.shape[1] != self.feature_channels:
            raise ValueError(
                f"e_1 has {e1.shape[1]} channels, MMSM expects {self.feature_channels}"
            )
        b, c, h, w = e1.shape
        e3 = self.encode_text(e0)
        e2 = self.encode_features(e1)
        pad = None if text_mask is None else ~text_mask.bool()
        kv = self.norm_kv(e3)
        attended, _ = self.cross_attention(
            self.norm_q(e2), kv, kv, key_padding_mask=pad, need_weights=False
        )
        e4 = e2 + attended
        delta = self.domain_decoder(e4).transpose(1, 2).reshape(b, c, h, w)
        e6 = e1 + delta.to(e1.dtype)
        return MMSMOutput(e6=e6, e2=e2, e3=e3, e4=e4, loss=mmsm_loss(e3, e2, text_mask))


def mmsm_loss(e3: Tensor, e2: Tensor, text_mask: Tensor | None = None) -> Tensor:
    """L_MMSM (Eq. 13) as ``mean_{b,d} ½ (mean_L e_3 − mean_hw e_2)²``, padding excluded from
    the text mean (see the module docstring for why the token axes are averaged)."""
    if text_mask is None:
        text = e3.mean(1)
    else:
        m = text_mask.to(e3.dtype).unsqueeze(-1)
        text = (e3 * m).sum(1) / m.sum(1).clamp_min(1.0)
    return 0.5 * (text.float() - e2.mean(1).float()).pow(2).mean()


class UNetFeatureHook:
    """Capture, and optionally replace, the output of one named UNet block (MMSM's e_1 → e_6).

    ``block`` is a submodule name of the UNet (``"mid_block"``, ``"up_blocks.0"``, ...). The
    default is the mid block: its output is the UNet's lowest-resolution, most semantic map
    (8x8x1280 for SD at 512 px, cheap to attend over: 64 positions), it passes through every up
    block so a change there reaches the whole decoder, and it is a single tensor (a down block
    also returns its skip features, which a replacement would leave unchanged); ControlNet adds
    its control there too. Its channel count is ``unet.config.block_out_channels[-1]``.

    After each UNet call ``feature`` holds the block's original output (e_1). When
    ``transform`` is set, the block's output is replaced by ``transform(e_1)`` (e_6); for a
    block returning a tuple the first element is replaced.
    """

    def __init__(
        self,
        unet: nn.Module,
        block: str = "mid_block",
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.block = block
        self.module = unet.get_submodule(block)
        self.transform = transform
        self.feature: Tensor | None = None
        self._handle = self.module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args, output):
        first = output[0] if isinstance(output, tuple) else output
        self.feature = first
        if self.transform is None:
            return None
        new = self.transform(first)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def remove(self) -> None:
        self._handle.remove()


class MMSMHook(UNetFeatureHook):
    """Runs an :class:`MMSM` inside the UNet: set the text with :meth:`condition` before a UNet
    call; the block's output becomes e_6 and ``output`` holds the :class:`MMSMOutput` (for
    L_MMSM). Without a text condition the block is left as it is."""

    def __init__(self, unet: nn.Module, mmsm: MMSM, block: str = "mid_block") -> None:
        super().__init__(unet, block, transform=self._apply)
        self.mmsm = mmsm
        self.e0: Tensor | None = None
        self.text_mask: Tensor | None = None
        self.output: MMSMOutput | None = None

    def condition(self, e0: Tensor | None, text_mask: Tensor | None = None) -> None:
        self.e0, self.text_mask = e0, text_mask

    def _apply(self, e1: Tensor) -> Tensor:
        if self.e0 is None:
            self.output = None
            return e1
        if self.e0.shape[0] != e1.shape[0]:
            raise ValueError(
                f"MMSM text batch {self.e0.shape[0]} != UNet batch {e1.shape[0]} (a guidance "
                f"call that stacks branches must condition each branch's rows itself)"
            )
        self.output = self.mmsm(self.e0, e1, self.text_mask)
        return self.output.e6
