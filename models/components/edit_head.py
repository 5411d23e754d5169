"""MGIE's edit head T: the [IMG] tokens of the MLLM → the diffusion model's text condition.

MGIE (Fu et al., ICLR 2024), Sec. 3.2 Eq. 3 and Appendix B: T is a small sequence-to-sequence
Transformer (after GILL's mapper) that reads ``e[IMG] + h[IMG]`` (word embedding plus last-layer
hidden state of the N visual tokens) and, conditioned on L = 77 learnable queries, produces the
visual imagination U = {u_1..u_L}, u in R^768 for Stable Diffusion v1.5's cross-attention.

Structure and parameter names follow the released ``EditMapper`` of apple/ml-mgie, so its
``edit_head.*`` weights in ``mllm.pt`` load 1:1 (see :mod:`models.components.mgie_release`):

- ``llm2hid``: Linear(H → d_model) applied to ``hidden + embeds``;
- ``query``: a ``[1, L, d_model]`` parameter drawn from N(0, 1) (``torch.randn``);
- ``mapper``: ``nn.Transformer(batch_first=True, norm_first=True, d_model=512, nhead=4, 4+4
  layers, ff 2048, dropout 0)``, the N tokens into the encoder and the queries into the decoder,
  with no masks (the decoder is not causal: the ``{u1..u_{t-1}}`` of Eq. 3 is the paper's
  notation, the released code decodes all 77 queries at once). ``nn.Transformer`` ends both
  stacks with a LayerNorm (``mapper.encoder.norm``, ``mapper.decoder.norm``), as released;
- ``hid2feat``: Linear(d_model → 768).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn


class EditHead(nn.Module):
    """MGIE's edit head (Eq. 3): ``hid2feat(mapper(llm2hid(h + e), queries))``.

    Args:
        llm_hidden_size: width H of the MLLM (4096 for LLaVA-7B).
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout: the
            ``nn.Transformer`` (released: 512, 4, 4, 4, 2048, 0.0).
        num_queries: L, the number of learned queries = condition tokens (77, CLIP's length).
        output_dim: width of each condition token (768, SD v1.5's cross-attention width).
        norm_first: pre-norm Transformer layers (``True`` in the released mapper).
    """

    def __init__(
        self,
        llm_hidden_size: int = 4096,
        *,
        d_model: int = 512,
        nhead: int = 4,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        dim_feedforward: int = 2048,
        num_queries: int = 77,
        output_dim: int = 768,
        dropout: float = 0.0,
        norm_first: bool = True,
    ) -> None:
        super().__init__()
        self.llm_hidden_size = llm_hidden_size
        self.num_queries = num_queries
        self.output_dim = output_dim
        self.llm2hid = nn.Linear(llm_hidden_size, d_model)
        self.query = nn.Parameter(torch.randn(1, num_queries, d_model))
        with warnings.catch_warnings():
            # nested tensors are never used with norm_first; torch warns about it on every build
            warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
            self.mapper = nn.Transformer(
                d_model=d_model,
                nhead=nhead,
                num_encoder_layers=num_encoder_layers,
                num_decoder_layers=num_decoder_layers,
                dim_feedforward=dim_feedforward,
                dropout=dropout,
                batch_first=True,
                norm_first=norm_first,
            )
        self.hid2feat = nn.Linear(d_model, output_dim)

    def forward(self, img_hidden: Tensor, img_embeds: Tensor) -> Tensor:
        """``[B, N, H]`` hidden states and ``[B, N, H]`` (or broadcastable ``[1, N, H]``,
        ``[N, H]``) [IMG] embeddings → condition ``[B, num_queries, output_dim]`` (Eq. 3)."""
        self._check("img_hidden", img_hidden)
        self._check("img_embeds", img_embeds)
        dtype = self.llm2hid.weight.dtype
        tokens = img_hidden.to(dtype) + img_embeds.to(dtype)
        if tokens.dim() == 2:
            tokens = tokens.unsqueeze(0)
        hid = self.llm2hid(tokens)
        queries = self.query.expand(hid.shape[0], -1, -1)
        return self.hid2feat(self.mapper(hid, queries))

    def null_condition(self, img_embeds: Tensor) -> Tensor:
        """The edit head on zero hidden states: MGIE's null condition for conditioning dropout
        and classifier-free guidance (``edit_head(zeros, emb)`` in the released code)."""
        self._check("img_embeds", img_embeds)
        return self(torch.zeros_like(img_embeds), img_embeds)

    def _check(self, name: str, x: Tensor) -> None:
        if x.dim() not in (2, 3) or x.shape[-1] != self.llm_hidden_size:
            raise ValueError(
                f"EditHead: {name} must be [B, N, {self.llm_hidden_size}] (llm_hidden_size), "
                f"got {tuple(x.shape)}"
            )
