"""Lightning's sharded strategies for the 7B configs, with the layers to wrap named in YAML.

Lightning's ``FSDPStrategy`` takes its auto-wrap and activation-checkpointing policies as sets
of module classes, which a config cannot spell. :class:`LayerFSDP` is that strategy with the
classes given by name (:data:`LAYERS`): by default every LLaMA decoder layer (the 32 of
LLaVA-7B's Vicuna) and every transformer block of the UNet (diffusers' ``BasicTransformerBlock``,
16 in SD v1.5) is its own FSDP unit and recomputes its activations in the backward pass; the
full (unsharded) state dict is gathered on save, so checkpoints stay the trainable-only files
every other strategy writes (models/base.py). Used by ``experiments/strategies/fsdp.yaml``.

DeepSpeed ZeRO-2 is Lightning's ``DeepSpeedStrategy(stage=2)`` as is
(``experiments/strategies/deepspeed_zero2.yaml``); ``deepspeed`` is not in the default
requirements (README, "Strategies").
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

#: Layer names usable in configs -> their classes' import paths.
LAYERS = {
    "LlamaDecoderLayer": "transformers.models.llama.modeling_llama.LlamaDecoderLayer",
    "CLIPEncoderLayer": "transformers.models.clip.modeling_clip.CLIPEncoderLayer",
    "BasicTransformerBlock": "diffusers.models.attention.BasicTransformerBlock",
    "ResnetBlock2D": "diffusers.models.resnet.ResnetBlock2D",
}
DEFAULT_LAYERS = ("LlamaDecoderLayer", "BasicTransformerBlock")


def layer_classes(names: Sequence[str]) -> set[type[nn.Module]]:
    """The classes of ``names`` (keys of :data:`LAYERS` or full import paths)."""
    classes = set()
    for name in names:
        path = LAYERS.get(name, name)
        module, _, attr = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as err:
            raise ValueError(
                f"unknown layer {name!r}: use one of {sorted(LAYERS)} or a full import path"
            ) from err
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(f"layer {name!r} ({path}) is not an nn.Module class")
        classes.add(cls)
    return classes


class LayerFSDP(FSDPStrategy):
    """``FSDPStrategy`` wrapping and checkpointing the named layers.

    Args:
        wrap_layers: layers that become FSDP units (``auto_wrap_policy``).
        checkpoint_layers: layers whose activations are recomputed in the backward pass
            (``activation_checkpointing_policy``); ``[]`` for none.
        state_dict_type: ``full`` (default: one file, as every strategy writes) or ``sharded``.
        sharding_strategy: FSDP's (``FULL_SHARD``, ``SHARD_GRAD_OP``, ``HYBRID_SHARD``, ...).
        use_orig_params: FSDP's; ``True`` lets frozen and trainable parameters share a unit
            (MGIE's LLM layers are frozen while its embeddings train).
        **kwargs: the other ``FSDPStrategy`` arguments (``cpu_offload``, ...).
    """

    def __init__(
        self,
        wrap_layers: Sequence[str] = DEFAULT_LAYERS,
        checkpoint_layers: Sequence[str] = DEFAULT_LAYERS,
        state_dict_type: str = "full",
        sharding_strategy: str = "FULL_SHARD",
        use_orig_params: bool = True,
        **kwargs,
    ) -> None:
        self.wrap_layers = list(wrap_layers)
        self.checkpoint_layers = list(checkpoint_layers)
        super().__init__(
            auto_wrap_policy=layer_classes(self.wrap_layers),
            activation_checkpointing_policy=layer_classes(self.checkpoint_layers) or None,
            state_dict_type=state_dict_type,
            sharding_strategy=sharding_strategy,
            use_orig_params=use_orig_params,
            **kwargs,
        )
