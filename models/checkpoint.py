"""The one reader of editbench checkpoints.

Every place that opens a checkpoint written by ``python -m editbench fit`` goes through
:func:`read_checkpoint`: the CLI's ``--ckpt_path`` defaults, the ``edit``/``sweep`` commands,
``init_from`` and MGIE's ``unet_init_from``. It loads with ``torch.load(weights_only=True)``
(tensors and plain values only, never arbitrary pickled code), names the file in every error,
and hands back what the callers need: the trainable weights, the model's and the DataModule's
hyperparameters, the global step and the EMA state (:mod:`models.ema`).

A checkpoint holds the trainable weights only (frozen pretrained weights are re-read from their
paths). When the run kept an exponential moving average of them, the file also holds it under
:data:`EMA_KEY`, keyed by the same parameter names; :meth:`EditCheckpoint.weights` substitutes
those averages for the raw weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

#: The checkpoint entry of the EMA state: diffusers ``EMAModel.state_dict()`` with its
#: ``shadow_params`` as a ``{parameter name: tensor}`` dict instead of a positional list.
EMA_KEY = "ema"


class CheckpointMismatchError(ValueError):
    """A file that is not a checkpoint of this model: unreadable, not written by ``fit``, or
    without the trainable weights (or EMA entries) the model expects."""


@dataclass(frozen=True)
class EditCheckpoint:
    """What :func:`read_checkpoint` returns.

    Attributes:
        path: the file.
        state_dict: the trainable weights as saved (the raw, not averaged, weights).
        hparams: the model's hyperparameters as LightningCLI saved them (``_class_path`` and
            ``_instantiator`` included).
        datamodule_hparams: the DataModule's hyperparameters (same layout), or ``{}``.
        ema: the EMA state (see :data:`EMA_KEY`), or ``None`` when the run kept none.
        global_step: the optimizer step the checkpoint was written at (``None`` if absent).
        raw: everything ``torch.load`` returned (optimizer states, loops, callbacks, ...).
    """

    path: Path
    state_dict: dict[str, torch.Tensor]
    hparams: dict
    datamodule_hparams: dict
    ema: dict | None
    global_step: int | None
    raw: dict

    @property
    def class_path(self) -> str | None:
        """The model class LightningCLI recorded (``models.inspix2pix.InsPix2Pix``)."""
        return self.hparams.get("_class_path")

    @property
    def has_ema(self) -> bool:
        return self.ema is not None

    def init_args(self, data: bool = False) -> dict:
        """The model's (or with ``data``, the DataModule's) constructor arguments, without
        LightningCLI's private ``_class_path``/``_instantiator`` entries."""
        hparams = self.datamodule_hparams if data else self.hparams
        return {k: v for k, v in hparams.items() if k not in ("_class_path", "_instantiator")}

    def weights(self, ema: bool = True) -> dict[str, torch.Tensor]:
        """The trainable weights to load: with ``ema`` and an EMA in the file, the averaged
        weights replace the raw ones (entries the EMA does not track stay raw)."""
        if ema and self.ema is not None:
            return ema_weights(self.state_dict, self.ema, self.path)
        return dict(self.state_dict)

    def submodule(self, prefix: str, ema: bool = True) -> dict[str, torch.Tensor]:
        """The weights under ``prefix`` (e.g. ``"diffusion.unet."``), the prefix removed."""
        return {k[len(prefix) :]: v for k, v in self.weights(ema).items() if k.startswith(prefix)}


def ema_weights(
    state_dict: dict[str, torch.Tensor], ema: dict, source: str | Path = "checkpoint"
) -> dict[str, torch.Tensor]:
    """``state_dict`` with the EMA's averaged tensors in place of the raw ones; every EMA entry
    must name a saved trainable weight of the same shape."""
    shadow = check_ema(ema, source)
    unknown = sorted(set(shadow) - set(state_dict))
    if unknown:
        raise CheckpointMismatchError(
            f"{source}: the EMA tracks {len(unknown)} weights the checkpoint does not hold "
            f"(e.g. {', '.join(unknown[:3])})"
        )
    for name, value in shadow.items():
        if value.shape != state_dict[name].shape:
            raise CheckpointMismatchError(
                f"{source}: EMA entry {name} has shape {tuple(value.shape)}, the weight "
                f"{tuple(state_dict[name].shape)}"
            )
    return {**state_dict, **shadow}


def check_ema(ema: object, source: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` averages of an EMA entry, or an error naming ``source``."""
    shadow = ema.get("shadow_params") if isinstance(ema, dict) else None
    if not isinstance(shadow, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in shadow.items()
    ):
        raise CheckpointMismatchError(
            f"{source}: its {EMA_KEY!r} entry is not an editbench EMA state (a dict whose "
            f"'shadow_params' maps parameter names to tensors)"
        )
    return shadow


def read_checkpoint(
    path: str | Path, *, what: str = "checkpoint", hint: str = ""
) -> EditCheckpoint:
    """Read an editbench (Lightning) checkpoint on the CPU with ``weights_only=True``.

    Args:
        path: the ``.ckpt`` file.
        what: how the errors name the file (``"init_from checkpoint"``, ...).
        hint: appended to the not-found error (how to make the file).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        CheckpointMismatchError: it cannot be read as a checkpoint, holds no ``state_dict`` of
            tensors, or its EMA entry is malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found" + (f" ({hint})" if hint else ""))
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointMismatchError(
            f"{what} {path} could not be read as a checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    state = raw.get("state_dict") if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointMismatchError(
            f"{what} {path} is not a Lightning checkpoint (no 'state_dict' of tensors); was it "
            f"written by `python -m editbench fit`?"
        )
    ema = raw.get(EMA_KEY)
    if ema is not None:
        check_ema(ema, path)
    step = raw.get("global_step")
    return EditCheckpoint(
        path=path,
        state_dict=state,
        hparams=dict(raw.get("hyper_parameters") or {}),
        datamodule_hparams=dict(raw.get("datamodule_hyper_parameters") or {}),
        ema=ema,
        global_step=int(step) if step is not None else None,
        raw=raw,
    )
