"""Iterative multi-turn editing (MagicBrush's "iterative" mode) inside test and predict."""

from __future__ import annotations

import lightning as L
import torch

from datamodules.magicbrush import apply_previous_outputs


class MultiTurnChaining(L.Callback):
    """Feed each turn the model's own output of the previous turn.

    A sample with a `previous_output_id` (MagicBrushDataModule with `test_mode: iterative`,
    whose loader yields turn 1 of every session first, then turn 2, ...) gets its `source`
    replaced by the model's prediction for that id before the step runs; each prediction is
    kept until the next turn has used it. Batches without the key pass through untouched, so the
    callback is always on. Predictions live on the process that made them: iterative mode needs
    one process (or a sampler that keeps a session on one rank).
    """

    def __init__(self) -> None:
        self.outputs: dict[str, torch.Tensor] = {}

    def _before(self, batch) -> None:
        if isinstance(batch, dict) and any(
            p is not None for p in batch.get("previous_output_id") or []
        ):
            apply_previous_outputs(batch, self.outputs)
            for previous in batch["previous_output_id"]:
                self.outputs.pop(previous, None)

    def _after(self, trainer, outputs, batch) -> None:
        """Keep the outputs of multi-turn samples while a later turn may need them (only in
        iterative mode when the DataModule says which mode it is in)."""
        if not isinstance(batch, dict) or "turn" not in batch or not isinstance(outputs, dict):
            return
        if getattr(trainer.datamodule, "test_mode", "iterative") != "iterative":
            return
        for sample_id, image in zip(outputs["id"], outputs["images"], strict=True):
            self.outputs[sample_id] = image.detach().float().cpu()

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.outputs.clear()

    on_predict_epoch_start = on_test_epoch_start

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._before(batch)

    def on_predict_batch_start(
        self, trainer, pl_module, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._before(batch)

    def on_test_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._after(trainer, outputs, batch)

    def on_predict_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._after(trainer, outputs, batch)
