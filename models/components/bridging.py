"""InsightEdit's two-stream bridging module: [MM] hidden states → UNet conditions.

InsightEdit (Xu et al., CVPR 2025, arXiv 2411.17323; /work/shared/papers/insightedit.txt, "Two-Stream
Bridging Mechanism") bridges the MLLM and the diffusion model with two streams:

- **Text stream** (:class:`TextStream`): a Q-Former with learned queries reads the last-layer
  hidden states ``h [B, r, H]`` of the r [MM] tokens, ``q' = Q_beta(q, h)``; then BIM (the
  bidirectional interaction module) exchanges information both ways between ``q'`` and the
  source image's CLIP patch features, giving the text condition ``f_txt`` and the text-aware
  visual feature ``v_txt`` that is added to the UNet's feature map. InsightEdit released no model
  code; every size below is SmartEdit's (TencentARC/SmartEdit, /work/shared/REFERENCE.md
  "SmartEdit"), which InsightEdit builds on.
- **Image stream** (:class:`ImageStream`, the Image Alignment Adapter, IAA): an MLP ``Mapper``
  from ``h`` to one vector in CLIP's image-embedding space (``R^{r x 4096} → R^{1 x 768}`` in the
  paper), trained with ``L_IAA = ||CLIP(I_tar) − Mapper(h)||²`` (:func:`iaa_loss`), then expanded
  to N tokens ``f_img`` (``R^{N x 768}``) by Linear + LayerNorm (the paper's figure; diffusers'
  ``ImageProjection`` is exactly that) for the decoupled cross-attention
  (:mod:`models.components.decoupled_attention`).

Plain ``nn.Module`` s: no Lightning, no loading; the caller owns the MLLM, CLIP and the UNet.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from diffusers.models.embeddings import ImageProjection
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import Blip2QFormerConfig, Blip2QFormerModel, SamMaskDecoderConfig
from transformers.models.sam.modeling_sam import SamPositionalEmbedding, SamTwoWayTransformer


@dataclass
class TextStreamOutput:
    """``f_txt [B, Q, D]``: the UNet's text condition; ``v_txt [B, C_unet, h, w]`` (``None``
    without BIM): added right after ``conv_in``; ``q_prime [B, Q, D]``: the Q-Former output
    (what SmartEdit's stage 1 aligns with CLIP text features)."""

    f_txt: Tensor
    v_txt: Tensor | None
    q_prime: Tensor


class TextStream(nn.Module):
    """Q-Former + BIM (InsightEdit's textual branch; sizes from SmartEdit's release).

    Q-Former: transformers' ``Blip2QFormerModel`` (BERT-base width 768, 12 heads, FFN 3072,
    6 layers, cross-attention to ``h`` every 2nd layer, encoder width = the LLM's hidden size;
    BLIP-2's query-only layers, so no word/position embeddings and no text FFN, as SmartEdit
    strips them) over ``num_queries`` = 77 learned queries drawn from N(0, 0.02²) (SmartEdit's
    ``sd_query_tokens``; 77 x 768 is the shape of CLIP-L text features, the UNet's condition).
    Dropout 0.1 is BERT-base's, which SmartEdit's Q-Former config inherits.

    BIM (``use_bim``): transformers' ``SamTwoWayTransformer`` (SAM's two-way transformer: depth 2,
    width 1024, MLP 2048, 8 heads, attention downsample 2) between ``Linear(768→1024)(q')`` (the
    sparse "point" tokens) and the source image's CLIP patch features (the dense image tokens,
    16 x 16 x 1024 for CLIP ViT-L/14 at 224 px; ``Linear(C→1024)`` first where C differs, the
    identity otherwise, as in SmartEdit where C = 1024). The dense positional encoding is SAM's
    random Fourier features, computed by transformers' ``SamPositionalEmbedding`` at the cell
    centres of the grid, with scale 1 (SAM's ``PositionEmbeddingRandom`` default) and its Gaussian
    matrix re-registered as a persistent buffer: fixed, never trained, saved with the state dict,
    as SmartEdit keeps ``pe_layer.positional_encoding_gaussian_matrix``. Outputs (SmartEdit):

    - ``f_txt = q' + 0.5 · Linear_zero(1024→768)(queries_out)``;
    - ``v_txt = Conv1x1_zero(1024→C_unet)(bilinear(keys_out → latent size))`` (16→32 at 256 px),
      to be added to the UNet sample after ``conv_in`` (``add_after_conv_in``).

    Both output projections start at zero (weights and biases), so switching BIM on (stage 3)
    leaves the UNet's input and condition unchanged until training moves them. With
    ``use_bim = False`` (stages 1-2) ``f_txt = q'`` and ``v_txt = None``; the BIM weights exist
    either way, so one state dict serves every stage. ``use_bim`` is a plain attribute the stage
    mechanism may flip.

    Args:
        llm_hidden_size: H, the width of the [MM] hidden states (4096 for LLaVA-7B).
        num_queries: learned queries = condition tokens (77).
        hidden_size, num_attention_heads, intermediate_size, num_hidden_layers,
            cross_attention_frequency, dropout: the Q-Former (768, 12, 3072, 6, 2, 0.1).
        image_feature_dim: C of the CLIP patch features (1024 for CLIP ViT-L/14).
        bim_hidden_size, bim_mlp_dim, bim_num_layers, bim_num_heads, bim_downsample_rate: the
            two-way transformer (1024, 2048, 2, 8, 2).
        unet_channels: the UNet's ``conv_in`` output channels (320 for SD 1.x).
        latent_size: default spatial size of ``v_txt`` (32: 256 px / 8, SmartEdit's).
        pe_scale: std of the random Fourier matrix (1.0, SAM's default).
        use_bim: run BIM in ``forward``.
        standardize_h: standardise ``h`` over the batch, each feature of each [MM] slot on its
            own (a ``BatchNorm1d`` over the flattened ``r x H`` values, without affine, running
            statistics at evaluation), before the Q-Former reads it; needs ``num_tokens``. Not
            SmartEdit's: for the tiny preset, whose random 32-wide LLM gives [MM] states that
            vary across samples by 7% of their magnitude, so the Q-Former learned only the
            per-position mean of its alignment target. Slots differ in their means, so one
            statistic per feature pooled over the slots does not help (held-out alignment MSE
            0.298 against the mean's 0.294); per slot it does (0.160; README, "Tiny InsightEdit").
        num_tokens: r, the number of [MM] slots (only with ``standardize_h``).
    """

    def __init__(
        self,
        llm_hidden_size: int = 4096,
        *,
        num_queries: int = 77,
        hidden_size: int = 768,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        num_hidden_layers: int = 6,
        cross_attention_frequency: int = 2,
        dropout: float = 0.1,
        image_feature_dim: int = 1024,
        bim_hidden_size: int = 1024,
        bim_mlp_dim: int = 2048,
        bim_num_layers: int = 2,
        bim_num_heads: int = 8,
        bim_downsample_rate: int = 2,
        unet_channels: int = 320,
        latent_size: int = 32,
        pe_scale: float = 1.0,
        use_bim: bool = True,
        standardize_h: bool = False,
        num_tokens: int | None = None,
    ) -> None:
        super().__init__()
        if bim_hidden_size % 2:
            raise ValueError(
                f"bim_hidden_size must be even (sin and cos halves), got {bim_hidden_size}"
            )
        self.llm_hidden_size = llm_hidden_size
        self.num_queries = num_queries
        self.hidden_size = hidden_size
        self.latent_size = latent_size
        self.use_bim = use_bim

        qformer_config = Blip2QFormerConfig(
            hidden_size=hidden_size,
            num_attention_heads=num_attention_heads,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            cross_attention_frequency=cross_attention_frequency,
            encoder_hidden_size=llm_hidden_size,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
        )
        self.qformer = Blip2QFormerModel(qformer_config)
        if standardize_h and not num_tokens:
            raise ValueError("TextStream: standardize_h needs num_tokens (r, the [MM] slots)")
        self.num_tokens = num_tokens
        self.h_norm = (
            nn.BatchNorm1d(num_tokens * llm_hidden_size, affine=False) if standardize_h else None
        )
        self.query = nn.Parameter(torch.empty(1, num_queries, hidden_size))
        nn.init.normal_(self.query, mean=0.0, std=qformer_config.initializer_range)

        # BIM
        self.bim_in = nn.Linear(hidden_size, bim_hidden_size)  # SmartEdit's modulate_head
        self.image_in = (
            nn.Identity()
            if image_feature_dim == bim_hidden_size
            else nn.Linear(image_feature_dim, bim_hidden_size)
        )
        sam_config = SamMaskDecoderConfig(
            hidden_size=bim_hidden_size,
            mlp_dim=bim_mlp_dim,
            num_hidden_layers=bim_num_layers,
            num_attention_heads=bim_num_heads,
            attention_downsample_rate=bim_downsample_rate,
        )
        sam_config._attn_implementation = "sdpa"
        self.bim = SamTwoWayTransformer(sam_config)
        self.pe = SamPositionalEmbedding(
            SimpleNamespace(scale=pe_scale, num_pos_feats=bim_hidden_size // 2)
        )
        gaussian = self.pe.positional_embedding.detach().clone()
        del self.pe.positional_embedding
        self.pe.register_buffer("positional_embedding", gaussian)
        # SmartEdit's dimension_reduction_head_qformer_out and dimension_reduction_head_zeroconv
        self.txt_out = nn.Linear(bim_hidden_size, hidden_size)
        self.img_out = nn.Conv2d(bim_hidden_size, unet_channels, kernel_size=1)
        for module in (self.txt_out, self.img_out):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    def queries(self, batch_size: int) -> Tensor:
        """The learned queries expanded to ``[B, Q, D]``."""
        return self.query.expand(batch_size, -1, -1)

    def qformer_output(self, h: Tensor, mask: Tensor | None = None) -> Tensor:
        """``q' = Q_beta(q, h)``: ``[B, r, H]`` hidden states (``mask [B, r]``, 1 = attend) →
        ``[B, Q, D]`` (InsightEdit, "Textual Branch")."""
        if h.dim() != 3 or h.shape[-1] != self.llm_hidden_size:
            raise ValueError(
                f"TextStream: h must be [B, r, {self.llm_hidden_size}] (llm_hidden_size), "
                f"got {tuple(h.shape)}"
            )
        if self.h_norm is not None:
            if h.shape[1] != self.num_tokens:
                raise ValueError(
                    f"TextStream: standardize_h was built for {self.num_tokens} [MM] slots, "
                    f"h has {h.shape[1]}"
                )
            h = self.h_norm(h.flatten(1)).view_as(h)
        return self.qformer(
            query_embeds=self.queries(h.shape[0]),
            encoder_hidden_states=h,
            encoder_attention_mask=mask,
        ).last_hidden_state

    def dense_positional_encoding(self, height: int, width: int) -> Tensor:
        """SAM's random Fourier encoding of the ``height x width`` grid's cell centres, in
        ``[0, 1]²`` (x, y), → ``[1, C_bim, height, width]``."""
        device = self.pe.positional_embedding.device
        ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
        xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        coords = torch.stack([grid_x, grid_y], dim=-1)
        return self.pe(coords).permute(2, 0, 1).unsqueeze(0)

    def bidirectional(
        self, q_prime: Tensor, image_features: Tensor, latent_size: int | tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """BIM: ``(f_txt, v_txt)`` from ``q' [B, Q, D]`` and CLIP patch features
        (``[B, C, h, w]``, or ``[B, h·w, C]`` with a square grid)."""
        grid = self._image_grid(image_features)
        batch, _, height, width = grid.shape
        dtype = self.bim_in.weight.dtype
        points = self.bim_in(q_prime.to(dtype)).unsqueeze(1)  # [B, 1, Q, C]: one "point batch"
        pe = self.dense_positional_encoding(height, width).to(dtype).expand(batch, -1, -1, -1)
        queries_out, keys_out = self.bim(points, grid, pe, None)
        f_txt = q_prime + 0.5 * self.txt_out(queries_out.squeeze(1))
        keys = keys_out.squeeze(1).transpose(1, 2).reshape(batch, -1, height, width)
        size = (latent_size, latent_size) if isinstance(latent_size, int) else tuple(latent_size)
        keys = F.interpolate(keys, size=size, mode="bilinear", align_corners=False)
        return f_txt, self.img_out(keys)

    def forward(
        self,
        h: Tensor,
        image_features: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        latent_size: int | tuple[int, int] | None = None,
        use_bim: bool | None = None,
    ) -> TextStreamOutput:
        """``h [B, r, H]`` ([MM] hidden states, optional ``mask [B, r]``) and, with BIM, the source
        image's CLIP patch features → :class:`TextStreamOutput`. ``latent_size`` is the UNet
        latent's (h, w) (an int for square), default ``self.latent_size``; ``use_bim`` overrides
        the attribute for one call."""
        q_prime = self.qformer_output(h, mask)
        bim = self.use_bim if use_bim is None else use_bim
        if not bim:
            return TextStreamOutput(f_txt=q_prime, v_txt=None, q_prime=q_prime)
        if image_features is None:
            raise ValueError("TextStream: BIM needs the source image's CLIP patch features")
        f_txt, v_txt = self.bidirectional(q_prime, image_features, latent_size or self.latent_size)
        return TextStreamOutput(f_txt=f_txt, v_txt=v_txt, q_prime=q_prime)

    def _image_grid(self, features: Tensor) -> Tensor:
        """``[B, C, h, w]`` or ``[B, h·w, C]`` (square) → ``[B, C_bim, h, w]`` (projected)."""
        if features.dim() == 3:
            batch, tokens, _ = features.shape
            side = int(round(tokens**0.5))
            if side * side != tokens:
                raise ValueError(
                    f"TextStream: {tokens} patch tokens do not form a square grid; "
                    f"pass [B, C, h, w] features"
                )
            tokens_last = features
            height = width = side
        elif features.dim() == 4:
            batch, _, height, width = features.shape
            tokens_last = features.flatten(2).transpose(1, 2)
        else:
            raise ValueError(
                f"TextStream: image features must be 3-D or 4-D, got {features.dim()}-D"
            )
        projected = self.image_in(tokens_last.to(self.bim_in.weight.dtype))
        return projected.transpose(1, 2).reshape(batch, -1, height, width)


@dataclass
class ImageStreamOutput:
    """``embeds [B, E]``: ``Mapper(h)`` in CLIP's image-embedding space (what ``L_IAA``
    compares); ``f_img [B, N, D]``: the image tokens for the decoupled cross-attention."""

    embeds: Tensor
    f_img: Tensor


class ImageStream(nn.Module):
    """InsightEdit's Image Alignment Adapter (IAA): ``Mapper(h)`` → ``ImageProjection`` → ``f_img``.

    - Pooling: the paper maps ``h ∈ R^{r x 4096}`` to ``R^{1 x 768}`` without saying how the r
      tokens are reduced; here the mean over the r [MM] tokens (over the unmasked ones when a
      ``mask`` is given), then the MLP.
    - Mapper: the paper says "MLP"; here two layers with a GELU, ``Linear(H→M) → GELU →
      Linear(M→E)``, with hidden width M = E by default (the shape of LLaVA-1.5's ``mlp2x_gelu``
      projector; the paper gives no width).
    - E = 768: CLIP ViT-L/14's image-embedding (projection) width, the paper's ``R^{1 x 768}``.
    - Expansion: diffusers' ``ImageProjection(E, cross_attention_dim, num_image_text_embeds=N)``,
      Linear → reshape to N tokens → LayerNorm (the paper's figure: Mapper → Linear → LayerNorm).
      N = 4 by default, IP-Adapter's token count (the paper leaves N open).

    Args:
        llm_hidden_size: H (4096 for LLaVA-7B).
        image_embed_dim: E, CLIP's image-embedding width (768).
        mapper_hidden_size: M (default E).
        cross_attention_dim: the UNet's cross-attention width D (768 for SD 1.x).
        num_tokens: N image tokens.
    """

    def __init__(
        self,
        llm_hidden_size: int = 4096,
        *,
        image_embed_dim: int = 768,
        mapper_hidden_size: int | None = None,
        cross_attention_dim: int = 768,
        num_tokens: int = 4,
    ) -> None:
        super().__init__()
        self.llm_hidden_size = llm_hidden_size
        self.image_embed_dim = image_embed_dim
        self.num_tokens = num_tokens
        hidden = mapper_hidden_size or image_embed_dim
        self.mapper = nn.Sequential(
            nn.Linear(llm_hidden_size, hidden), nn.GELU(), nn.Linear(hidden, image_embed_dim)
        )
        self.projection = ImageProjection(
            image_embed_dim=image_embed_dim,
            cross_attention_dim=cross_attention_dim,
            num_image_text_embeds=num_tokens,
        )

    def map(self, h: Tensor, mask: Tensor | None = None) -> Tensor:
        """``Mapper(h)``: ``[B, r, H]`` (``mask [B, r]``, 1 = keep) → ``[B, E]``, mean over r."""
        if h.dim() != 3 or h.shape[-1] != self.llm_hidden_size:
            raise ValueError(
                f"ImageStream: h must be [B, r, {self.llm_hidden_size}] (llm_hidden_size), "
                f"got {tuple(h.shape)}"
            )
        h = h.to(self.mapper[0].weight.dtype)
        if mask is None:
            pooled = h.mean(dim=1)
        else:
            weights = mask.to(h.dtype).unsqueeze(-1)
            pooled = (h * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return self.mapper(pooled)

    def expand(self, embeds: Tensor) -> Tensor:
        """``[B, E]`` → ``f_img [B, N, D]`` (``ImageProjection``: Linear → LayerNorm)."""
        return self.projection(embeds)

    def null_tokens(self, batch_size: int = 1) -> Tensor:
        """The null image condition ``[B, N, D]``: the projection of a zero CLIP embedding,
        ``ImageProjection(0)``. IP-Adapter drops the image condition in training by zeroing the
        CLIP embedding and uses the projection of zeros as its unconditional tokens at inference;
        the same null in training dropout and in the guidance branches keeps the null branch in
        distribution (see ``decoupled_attention.guidance_image_tokens``)."""
        weight = self.projection.image_embeds.weight
        zeros = torch.zeros(
            batch_size, self.image_embed_dim, device=weight.device, dtype=weight.dtype
        )
        return self.expand(zeros)

    def forward(self, h: Tensor, mask: Tensor | None = None) -> ImageStreamOutput:
        embeds = self.map(h, mask)
        return ImageStreamOutput(embeds=embeds, f_img=self.expand(embeds))


def iaa_loss(pred: Tensor, clip_image_embeds: Tensor) -> Tensor:
    """``L_IAA = ||CLIP(I_tar) − Mapper(h)||²`` (InsightEdit, "IAA Alignment Loss").

    The mean over the batch and the E embedding dimensions (``F.mse_loss``), not the sum: the
    paper writes a squared norm, whose sum over 768 dimensions would outweigh the (mean)
    diffusion loss by that factor at the default weights of 1; the mean is SmartEdit's reduction
    for its own stage-1 MSE alignment and keeps the loss independent of the width. The target is
    CLIP's image embedding of the goal image as the vision model returns it (projected, not
    normalised, as IP-Adapter consumes it); it is detached here, CLIP being frozen.
    """
    if pred.shape != clip_image_embeds.shape:
        raise ValueError(
            f"iaa_loss: prediction {tuple(pred.shape)} and CLIP target "
            f"{tuple(clip_image_embeds.shape)} differ"
        )
    return F.mse_loss(pred.float(), clip_image_embeds.detach().float())
