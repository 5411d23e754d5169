"""Checkpoint hooks of :class:`models.base.EditModel` (its ``CheckpointingMixin``): trainable
weights only in checkpoints, ``init_from``, EMA weights (:mod:`models.ema`) kept, resumed and
preferred for evaluation.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from models.checkpoint import (
    EMA_KEY,
    CheckpointMismatchError,
    EditCheckpoint,
    ema_weights,
    read_checkpoint,
)
from models.ema import TrainableEMA
from models.optim import optimizer_config


class CheckpointingMixin:
    """The checkpoint and EMA hooks of :class:`models.base.EditModel` (a LightningModule);
    they read ``frozen_modules``, ``init_from``, ``ema_decay`` and ``prefer_ema_weights``."""

    def on_fit_start(self) -> None:
        if self.init_from is not None and self.trainer.ckpt_path is None:
            self.load_initial_weights(self.init_from)

    def on_train_start(self) -> None:
        """Start the EMA (``ema_decay``) once the weights are final: initialised, or restored on
        resume (which some strategies do after ``on_fit_start``), when it continues from the
        checkpoint's state."""
        self._training_seed = None  # read this run's seed
        resume, self._ema_resume_state = self._ema_resume_state, None
        self._ema = None
        if self.ema_decay is None:
            if resume is not None:
                rank_zero_warn("the checkpoint holds an EMA, but ema_decay is null: none is kept")
            return
        named = [
            (name, param)
            for name, param in self.named_parameters()
            if param.requires_grad and not self._is_frozen_key(name)
        ]
        self._ema = TrainableEMA(named, self.ema_decay)
        if resume is not None:
            self._ema.load_state_dict(resume, source=self.trainer.ckpt_path or "checkpoint")
            rank_zero_info(
                f"EMA resumed at update {self._ema.optimization_step} (decay {self.ema_decay})"
            )
        else:
            rank_zero_info(
                f"EMA of {len(named)} trainable tensors ({self._ema.num_values:,} values), "
                f"decay {self.ema_decay}"
            )

    def load_initial_weights(self, path: str | Path) -> None:
        """Load the trainable weights of checkpoint ``path`` (strictly: every trainable weight
        must be there, nothing unknown may be); its EMA weights when it has them and
        ``prefer_ema_weights``."""
        checkpoint = read_checkpoint(path, what="init_from checkpoint")
        use_ema = self.prefer_ema_weights and checkpoint.has_ema
        state = {"state_dict": checkpoint.weights(ema=use_ema)}
        self.on_load_checkpoint(state)
        self.load_state_dict(state["state_dict"], strict=True)
        kind = " (its EMA weights)" if use_ema else ""
        rank_zero_info(f"initialised {type(self).__name__} from {path}{kind}")

    def load_weights_from(self, checkpoint: EditCheckpoint) -> None:
        """Load a checkpoint read by :func:`models.checkpoint.read_checkpoint` for use outside
        the Trainer (``edit``, ``sweep``): its EMA weights when it has them and
        ``prefer_ema_weights`` (``uses_ema_weights`` says which)."""
        state = {"state_dict": dict(checkpoint.state_dict)}
        if checkpoint.ema is not None:
            state[EMA_KEY] = checkpoint.ema
        self.on_load_checkpoint(state)
        self.load_state_dict(state["state_dict"], strict=True)

    def _is_frozen_key(self, key: str) -> bool:
        return any(key == m or key.startswith(m + ".") for m in self.frozen_modules)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep trainable weights only: frozen pretrained weights are re-read from their paths.
        The EMA, if kept, is saved beside them (:data:`models.checkpoint.EMA_KEY`)."""
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in state.items() if not self._is_frozen_key(k)}
        if self._ema is not None:
            checkpoint[EMA_KEY] = self._ema.state_dict()
        hparams = checkpoint.get("hyper_parameters")
        if hparams is not None and hparams.get("optimizer") is not None:
            checkpoint["hyper_parameters"] = dict(
                hparams, optimizer=optimizer_config(hparams["optimizer"])
            )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Complete a trainable-only checkpoint with the frozen weights already loaded from their
        paths, so loading stays strict: a missing trainable or an unknown weight is an error.

        A checkpoint's EMA: resuming ``fit`` loads the raw weights and hands the EMA state to
        :meth:`on_train_start`; every other load (``test``, ``predict``, ``validate``,
        ``edit``) loads the EMA weights instead of the raw ones when ``prefer_ema_weights``.
        """
        ema = checkpoint.get(EMA_KEY)
        trainer = self._trainer
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            self._ema_resume_state = ema
            self.uses_ema_weights = False
        else:
            self.uses_ema_weights = ema is not None and self.prefer_ema_weights
            if self.uses_ema_weights:
                source = getattr(trainer, "ckpt_path", None) or "checkpoint"
                checkpoint["state_dict"] = ema_weights(checkpoint["state_dict"], ema, source)
        current = self.state_dict()
        expected = {k for k in current if not self._is_frozen_key(k)}
        missing = sorted(expected - set(checkpoint["state_dict"]))
        if missing:
            shown = ", ".join(missing[:5])
            raise CheckpointMismatchError(
                f"checkpoint lacks {len(missing)} trainable weights of {type(self).__name__} "
                f"(e.g. {shown}); was it written by another model or configuration?"
            )
        for key, value in current.items():
            if self._is_frozen_key(key):
                checkpoint["state_dict"].setdefault(key, value)
