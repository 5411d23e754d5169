"""Test-only parts the SLURM jobs of test_slurm_cluster.py import (``PYTHONPATH`` holds this
folder): an InsPix2Pix whose training draws depend on the sample, not on the process, and a
callback that paces a fit so a signal can be sent between steps.

InsPix2Pix draws a micro-batch's VAE posterior sample, noise, timesteps and conditioning dropout
from one generator per (seed, global rank, step, micro-batch) (``models.diffusion.training_seeds``),
so a 2-process run and a 1-process run with the same global batch draw different numbers by
design and their losses agree only in distribution. To compare the two exactly, this subclass
draws each sample's numbers from a generator keyed by (seed, sample id, step) with the same
``training_seeds``, whatever process holds the sample: the global batch's loss (the mean over
its samples) and its gradient (DDP's mean over ranks of per-rank means, equal per-rank batches)
are then those of one process holding the whole batch. ``train/loss_global`` logs that global
mean on every layout (``sync_dist``: the mean over ranks).
"""

from __future__ import annotations

import time
import zlib

import lightning as L
import torch

from models.diffusion import training_seeds
from models.inspix2pix import InsPix2Pix

PER_SAMPLE_KEYS = ("source", "target", "instruction")


class SampleKeyedInsPix2Pix(InsPix2Pix):
    def training_losses(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        parts = []
        for i, sample_id in enumerate(batch["id"]):
            key = zlib.crc32(str(sample_id).encode())
            seed = training_seeds(self.training_seed, key, self.global_step)[0]
            one = {k: batch[k][i : i + 1] for k in PER_SAMPLE_KEYS}
            draw = torch.Generator(device=self.device).manual_seed(seed)
            parts.append(super().training_losses(one, generator=draw))
        return {k: torch.stack([p[k] for p in parts]).mean() for k in parts[0]}

    def training_step(self, batch: dict, batch_idx: int):
        loss = super().training_step(batch, batch_idx)
        self.log("train/loss_global", loss.detach(), sync_dist=True, batch_size=len(batch["id"]))
        return loss


class Pace(L.Callback):
    """Prints ``pace: step N`` (rank 0, flushed, so the job's output shows progress) after every
    optimizer step, then sleeps ``seconds`` on every rank. The test sends SIGUSR1 right after
    seeing the line, so it lands while the ranks sleep, outside any collective: Lightning saves
    the hpc checkpoint inside the signal handler, and that save has a barrier."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero:
            print(f"pace: step {trainer.global_step}", flush=True)
        if self.seconds:
            time.sleep(self.seconds)
