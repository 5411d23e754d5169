"""MMIG's MM-Adapter: LaVIN's router adapter in every decoder block of the LLM (Eqs. 6-8).

MMIG (Sec. 3.1) takes Mixture-of-Modality Adaptation from LaVIN (Luo et al., 2023, "Cheap and
quick"): ``Z' = Z + s · router(f_a1(Z), f_a2(Z); w)`` (Eq. 6), with two RepAdapters f_a1, f_a2
and routing weights w; only the adaptation parameters θ_a train in L_MMT (Eq. 7, the LM loss of
Eq. 8). The paper gives no sizes; these are the values of LaVIN's release
(``lavin/mm_adapter.py``, ``RepAdapter_Router``; /work/shared/REFERENCE.md "MMIG's building
blocks"):

- one down-projection d → 8 shared by both adapters (Xavier-uniform weight, zero bias), then
  dropout 0.1;
- two up-projections 8 → d in 2 groups, weights and biases zero: the adapter is the identity at
  initialisation;
- routing weights ``w = softmax(Linear(d → 2)(z_0) / t)``, t = 10 (LaVIN's default and ScienceQA
  value; its 13B instruction script uses 5), scale s = 1; ``Z' = Z + s · (w_0 · f_a1 + w_1 · f_a2)``.
- placement: before the attention of each decoder block, on the output of the block's input
  RMSNorm; the block's residual keeps the un-adapted input (LaVIN's ``forward_llama_attn``).
  Here a forward hook on ``input_layernorm`` returns the adapted output, so transformers' code
  is untouched and the pretrained weights keep their names.

Routing input (the one departure from LaVIN). LaVIN prepends a modality embedding
(``nn.Embedding(2, d)``: 0 = text only, 1 = image + text) as the sequence's first token and each
block's router reads ``x[:, 0]``, that token's normalised hidden state. Here the sequence is left
unchanged (positions, attention masks, labels and the KV cache of ``generate`` stay those of the
plain model) and each block's router reads its own input RMSNorm applied to the modality
embedding itself. In LaVIN the first token sits at position 0 and under the causal mask attends
only to itself, so its hidden state in every block is a function of the modality alone; in both
versions the routing weights are therefore per-sample, per-block constants chosen by the
modality. What is lost is the other tokens attending to the modality token. A side benefit:
during cached decoding ``x[:, 0]`` would be the newest token, the modality embedding is not.

LaVIN also trains its visual projector and puts router adapters in every CLIP block
(``--visual_adapter_type router``); MMIG's Figure 2 shows the MM-Adapter in the LLM only, which
is what :func:`insert_mm_adapters` does (the projector is the caller's choice).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

#: Substring of every parameter name that :func:`adapter_parameters` treats as trainable
#: (LaVIN's ``learnable_keys=['adapter']``).
ADAPTER_KEY = "mm_adapter"

#: LaVIN's modality indices.
TEXT_ONLY, IMAGE_TEXT = 0, 1


class RepAdapterRouter(nn.Module):
    """Two RepAdapters sharing a down-projection, mixed by a softmax router (Eq. 6).

    Args:
        dim: width d of the features Z.
        hidden_dim: bottleneck width (LaVIN: 8).
        groups: groups of the two up-projections (LaVIN: 2).
        dropout: dropout after the down-projection (LaVIN: 0.1).
        scale: s of Eq. 6 (LaVIN: 1).
        temperature: t of the router softmax (LaVIN: 10).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int = 8,
        groups: int = 2,
        dropout: float = 0.1,
        scale: float = 1.0,
        temperature: float = 10.0,
    ) -> None:
        super().__init__()
        if hidden_dim % groups or dim % groups:
            raise ValueError(
                f"hidden_dim {hidden_dim} and dim {dim} must divide by groups {groups}"
            )
        self.scale = scale
        self.temperature = temperature
        # 1x1 convolutions = (grouped) linear maps over the feature axis, as in LaVIN
        self.down = nn.Conv1d(dim, hidden_dim, kernel_size=1)
        self.up1 = nn.Conv1d(hidden_dim, dim, kernel_size=1, groups=groups)
        self.up2 = nn.Conv1d(hidden_dim, dim, kernel_size=1, groups=groups)
        self.dropout = nn.Dropout(dropout)
        self.router = nn.Linear(dim, 2)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        for up in (self.up1, self.up2):
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)

    def route(self, z0: Tensor) -> Tensor:
        """Routing weights ``softmax(router(z0) / t)``: ``[B, d]`` → ``[B, 2]``, rows sum to 1."""
        return torch.softmax(self.router(z0.to(self.router.weight.dtype)) / self.temperature, -1)

    def forward(self, z: Tensor, weights: Tensor | None = None) -> Tensor:
        """``Z' = Z + s · (w_0 · f_a1(Z) + w_1 · f_a2(Z))`` for ``z`` of shape ``[B, T, d]``.

        ``weights`` ``[B, 2]`` (or ``[1, 2]``); without it the router reads ``z[:, 0]`` (LaVIN's
        standalone behaviour). Computed in the adapter's dtype, returned in ``z``'s.
        """
        if weights is None:
            weights = self.route(z[:, 0])
        x = z.to(self.down.weight.dtype).transpose(1, 2)  # [B, d, T]
        h = self.dropout(self.down(x))
        w = weights.to(x.dtype)
        mixed = w[:, 0, None, None] * self.up1(h) + w[:, 1, None, None] * self.up2(h)
        return (x + self.scale * mixed).transpose(1, 2).to(z.dtype)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a LLaMA-style LM (modules with ``input_layernorm`` and
    ``self_attn``): all of a ``LlamaForCausalLM``, only the language model's in a
    ``LlavaForConditionalGeneration`` (CLIP's blocks have ``layer_norm1`` instead)."""
    layers = [
        m for m in model.modules() if hasattr(m, "input_layernorm") and hasattr(m, "self_attn")
    ]
    if not layers:
        raise ValueError(f"no decoder blocks with input_layernorm in {type(model).__name__}")
    return layers


class MMAdapters:
    """The adapters inserted by :func:`insert_mm_adapters` and the modality that routes them.

    ``set_modality`` (or the ``modality`` context manager) chooses the modality index per sample
    (``[B]`` ints, or one int for the whole batch) for the following forward passes;
    ``last_weights[i]`` holds block i's routing weights ``[B, 2]`` of the latest pass.
    """

    def __init__(
        self,
        model: nn.Module,
        adapters: list[RepAdapterRouter],
        embedding: nn.Embedding,
        default_modality: int,
    ) -> None:
        self.model = model
        self.adapters = adapters
        self.embedding = embedding
        self.default_modality = default_modality
        self._modality: Tensor | int | None = None
        self.last_weights: list[Tensor | None] = [None] * len(adapters)
        self._handles: list = []

    def set_modality(self, modality: Tensor | int | None) -> None:
        """Modality index per sample (``TEXT_ONLY`` = 0, ``IMAGE_TEXT`` = 1); None = default."""
        self._modality = modality

    @contextmanager
    def modality(self, modality: Tensor | int | None) -> Iterator[MMAdapters]:
        previous = self._modality
        self._modality = modality
        try:
            yield self
        finally:
            self._modality = previous

    def _routing_input(self, batch: int, device: torch.device) -> Tensor:
        modality = self.default_modality if self._modality is None else self._modality
        ids = torch.as_tensor(modality, device=device, dtype=torch.long).reshape(-1)
        emb = self.embedding(ids.to(self.embedding.weight.device))
        if emb.shape[0] == 1 and batch != 1:
            emb = emb.expand(batch, -1)
        elif emb.shape[0] != batch:
            raise ValueError(f"{emb.shape[0]} modality indices for a batch of {batch}")
        return emb

    def _hook(self, index: int):
        adapter = self.adapters[index]

        def hook(norm: nn.Module, args, output: Tensor) -> Tensor:
            emb = self._routing_input(output.shape[0], output.device)
            # the block's own RMSNorm on the routing input, as LaVIN's router reads a normed
            # token; .forward, not __call__, so that this hook does not fire on itself
            z0 = norm.forward(emb.to(output.dtype)[:, None])[:, 0]
            weights = adapter.route(z0)
            self.last_weights[index] = weights
            return adapter(output, weights)

        return hook

    def remove(self) -> None:
        """Take the hooks out (the adapter modules stay attached but no longer run)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def insert_mm_adapters(
    model: nn.Module,
    *,
    hidden_dim: int = 8,
    groups: int = 2,
    dropout: float = 0.1,
    scale: float = 1.0,
    temperature: float = 10.0,
    default_modality: int | None = None,
    freeze: bool = True,
    dtype: torch.dtype = torch.float32,
) -> MMAdapters:
    """Put a :class:`RepAdapterRouter` before the attention of every decoder block of ``model``.

    ``model`` is a transformers ``LlamaForCausalLM`` (or any LLaMA-style LM) or a
    ``LlavaForConditionalGeneration`` (only its language model is adapted). Each block gets the
    submodule ``mm_adapter`` and a forward hook on its ``input_layernorm``; the modality
    embedding ``nn.Embedding(2, d)`` becomes ``model.mm_adapter_modality``. With ``freeze``
    every other parameter stops requiring gradients (LaVIN trains only ``adapter`` keys; see
    :func:`adapter_parameters`). Adapters are kept in ``dtype`` (float32) whatever the LM's.
    ``default_modality`` routes calls made without :meth:`MMAdapters.set_modality`; None picks
    ``IMAGE_TEXT`` for a model with a ``vision_tower`` and ``TEXT_ONLY`` otherwise.
    """
    layers = decoder_layers(model)
    dim = layers[0].input_layernorm.weight.shape[-1]
    device = layers[0].input_layernorm.weight.device
    if freeze:
        model.requires_grad_(False)
    adapters = []
    for layer in layers:
        adapter = RepAdapterRouter(dim, hidden_dim, groups, dropout, scale, temperature)
        layer.mm_adapter = adapter.to(device=device, dtype=dtype)
        adapters.append(layer.mm_adapter)
    model.mm_adapter_modality = nn.Embedding(2, dim).to(device=device, dtype=dtype)
    if default_modality is None:
        visual = any(name.endswith("vision_tower") for name, _ in model.named_modules())
        default_modality = IMAGE_TEXT if visual else TEXT_ONLY
    handle = MMAdapters(model, adapters, model.mm_adapter_modality, default_modality)
    for i, layer in enumerate(layers):
        handle._handles.append(layer.input_layernorm.register_forward_hook(handle._hook(i)))
    for p in adapter_parameters(model):
        p.requires_grad_(True)
    return handle


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """θ_a of Eq. 7: the parameters whose name contains ``mm_adapter`` (adapters, routers and
    the modality embedding)."""
    return [p for name, p in model.named_parameters() if ADAPTER_KEY in name]
