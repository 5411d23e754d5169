"""Create the tiny checkpoints a tiny config points at, before the model is built."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class EnsureTinyAssets(L.Callback):
    """Run ``make-tiny`` on the first process if its folder is missing or incomplete.

    Lightning calls ``setup`` after the DataModule's ``prepare_data`` and before the model's
    ``configure_model``, so a fresh machine can go from nothing to training in one command.
    A complete folder made with the same arguments is reused at once.

    Args:
        out: the folder ``python -m editbench data make-tiny --out`` would write.
        seed: seed of the random weights, tokenizers and the VAE fit.
        resolution: image size of the tiny models.
        vae_steps: optimisation steps of the tiny VAE fit (``None``: make-tiny's default).
    """

    def __init__(
        self,
        out: str = ".cache/editbench/tiny",
        seed: int = 0,
        resolution: int = 32,
        vae_steps: int | None = None,
    ) -> None:
        self.out = out
        self.seed = seed
        self.resolution = resolution
        self.vae_steps = vae_steps

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            from editbench.tiny import make_tiny

            kwargs = {} if self.vae_steps is None else {"vae_steps": self.vae_steps}
            manifest = make_tiny(
                Path(self.out),
                seed=self.seed,
                resolution=self.resolution,
                log=rank_zero_info,
                **kwargs,
            )
            del manifest
        trainer.strategy.barrier("editbench_tiny_assets")
