"""Exponential moving average of a model's trainable weights.

InstructPix2Pix trained with an EMA of its UNet (its ``configs/train.yaml``: ``use_ema: true``,
latent-diffusion's ``LitEma`` at decay 0.9999) and evaluates the averaged weights; diffusers'
``train_instruct_pix2pix.py`` does the same with ``--use_ema`` (``EMAModel``, decay 0.9999).
:class:`TrainableEMA` wraps diffusers' :class:`~diffusers.training_utils.EMAModel` over the
parameters that train, and only those: the frozen VAE, CLIP or 7B LLM layers are never copied.

Decay schedule (``EMAModel`` without warm-up): at the k-th update (k = 1, 2, ...)
``d_k = min(decay, (1 + s) / (10 + s))`` with ``s = k - 1``, and ``d_1 = 0`` (the first update
copies the weights); ``shadow <- shadow - (1 - d_k) * (shadow - weight)``. ``LitEma`` uses the
same form one update earlier (``s = k``).

The state is saved in checkpoints under :data:`models.checkpoint.EMA_KEY`, with the averages
keyed by parameter name (``EMAModel`` keeps a positional list), so a checkpoint can be read
without building the model and a mismatch names the weight.

This lives in ``models`` rather than as an ``editbench`` callback because the checkpoint hooks
that save and restore it, and every evaluation path that swaps the averages in (``test``,
``predict``, ``validate``, ``edit``, ``sweep``, ``init_from``), belong to the model, and
``models`` never imports ``editbench``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel

from models.checkpoint import CheckpointMismatchError, check_ema

#: The decay InstructPix2Pix trained with (LitEma's and EMAModel's default).
PAPER_DECAY = 0.9999


class TrainableEMA:
    """diffusers' ``EMAModel`` over named trainable parameters.

    Args:
        named_parameters: ``(name, parameter)`` pairs, the names being state-dict keys.
        decay: the maximal decay (``ema_decay`` of the model).
    """

    def __init__(self, named_parameters: Sequence[tuple[str, torch.nn.Parameter]], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.names = [name for name, _ in named_parameters]
        self.parameters = [param for _, param in named_parameters]
        if not self.parameters:
            raise ValueError("the EMA has no trainable parameters to track")
        self.decay = decay
        # foreach: one fused update per step over all tensors (the UNet has hundreds).
        self.model = EMAModel(self.parameters, decay=decay, foreach=True)

    @property
    def optimization_step(self) -> int:
        """How many updates the average has seen."""
        return self.model.optimization_step

    @property
    def num_values(self) -> int:
        return sum(p.numel() for p in self.parameters)

    def step(self) -> None:
        """One update from the current weights (call after each optimizer step)."""
        self.model.step(self.parameters)

    def shadow(self) -> dict[str, torch.Tensor]:
        """The averaged weights by name (references, not copies)."""
        return dict(zip(self.names, self.model.shadow_params, strict=True))

    def state_dict(self) -> dict:
        """``EMAModel.state_dict()`` with ``shadow_params`` keyed by parameter name."""
        state = self.model.state_dict()
        state["shadow_params"] = self.shadow()
        return state

    def load_state_dict(self, state: dict, source: str | Path = "checkpoint") -> None:
        """Restore a saved state (resume). The configured ``decay`` wins over the saved one;
        the tracked weights must be the same names and shapes."""
        shadow = check_ema(state, source)
        missing = sorted(set(self.names) - set(shadow))
        unknown = sorted(set(shadow) - set(self.names))
        if missing or unknown:
            raise CheckpointMismatchError(
                f"{source}: its EMA tracks other weights than this model trains (missing "
                f"{missing[:3]}, unknown {unknown[:3]}); resume with the same trainable parts"
            )
        tensors = []
        for name, param in zip(self.names, self.parameters, strict=True):
            value = shadow[name]
            if value.shape != param.shape:
                raise CheckpointMismatchError(
                    f"{source}: EMA entry {name} has shape {tuple(value.shape)}, the weight "
                    f"{tuple(param.shape)}"
                )
            tensors.append(value.to(device=param.device, dtype=param.dtype))
        restored = {k: v for k, v in state.items() if k != "shadow_params"}
        restored["decay"] = self.decay
        restored["shadow_params"] = tensors
        self.model.load_state_dict(restored)
