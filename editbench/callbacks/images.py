"""Image grids (source | prediction | target) with their instructions in TensorBoard."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torchvision.utils import make_grid


def edit_grid(
    source: torch.Tensor, prediction: torch.Tensor, target: torch.Tensor | None
) -> torch.Tensor:
    """One row per sample: source | prediction | target, as a [3, H, W] image in [0, 1]."""
    columns = [source, prediction] + ([target] if target is not None else [])
    rows = torch.stack([c.float().cpu() for c in columns], dim=1).flatten(0, 1)
    return make_grid((rows.clamp(-1, 1) + 1) / 2, nrow=len(columns), padding=2, pad_value=1.0)


def grid_caption(batch: dict, n: int, expressive: list[str] | None) -> str:
    """Markdown lines `id: instruction` (and the expressive instruction where made)."""
    lines = []
    for i in range(n):
        line = f"{i + 1}. `{batch['id'][i]}`: {batch['instruction'][i]}"
        if expressive is not None:
            line += f"  \n   → {expressive[i]}"
        lines.append(line)
    return "\n".join(lines)


class EditImageLogger(L.Callback):
    """Every ``every_n_steps`` training steps, and on the first validation batch of every
    validation run, edit the first ``num_images`` samples with the model's evaluation settings
    and log the grid and the instructions to TensorBoard.

    Args:
        every_n_steps: training steps between grids (0 disables the training grids).
        num_images: rows per grid.
        num_inference_steps: sampler steps for the grids (``None``: the model's
            ``val_num_inference_steps``, else 20).
    """

    def __init__(
        self, every_n_steps: int = 500, num_images: int = 4, num_inference_steps: int | None = None
    ) -> None:
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.num_inference_steps = num_inference_steps

    def _log(self, trainer: L.Trainer, pl_module, batch: dict, tag: str) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers or not trainer.is_global_zero:
            return
        from models.base import sample_generators

        n = min(self.num_images, len(batch["id"]))
        steps = self.num_inference_steps or getattr(pl_module, "val_num_inference_steps", 0) or 20
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            out = pl_module.edit(
                batch["source"][:n],
                batch["instruction"][:n],
                num_inference_steps=steps,
                generator=sample_generators(batch["id"][:n], pl_module.eval_seed),
            )
        pl_module.train(was_training)
        target = batch["target"][:n] if "target" in batch else None
        grid = edit_grid(batch["source"][:n], out.images, target)
        caption = grid_caption(batch, n, out.expressive)
        for logger in loggers:
            logger.experiment.add_image(f"{tag}/edits", grid, trainer.global_step)
            logger.experiment.add_text(f"{tag}/instructions", caption, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and step > 0:
            self._log(trainer, pl_module, batch, "train")

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if batch_idx == 0 and not trainer.sanity_checking and trainer.state.fn == "fit":
            self._log(trainer, pl_module, batch, "val")
