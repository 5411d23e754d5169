"""Editing quality during training: the test protocol on a fixed small subset every N steps.

The training loss says little about how well a model edits (tiny MGIE's loss was level while
its edits tied copying the input; README, "Tiny MGIE"). This callback edits the first
``num_samples`` samples of a split every ``every_n_steps`` optimizer steps, with the model's
test sampler and per-sample seeds, scores them with the model's own test evaluator (its
protocol's metrics, a judge such as VIEScore included, and the copy-the-input baseline) and
logs ``eval_subset/<metric>`` and ``eval_subset/copy/<metric>`` to the run's loggers, so
TensorBoard shows editing quality over time beside the loss.

Under several processes each rank edits its share of the subset (``subset[rank::world]``) and
the metrics sync once, so the numbers equal one process's; every rank reaches every collective.
The scores equal what ``test`` gives on the same samples with the same weights (tested).
"""

from __future__ import annotations

import lightning as L
import torch

from datamodules.base import collate


class EvalDuringTraining(L.Callback):
    """Score a fixed subset every ``every_n_steps`` optimizer steps.

    Args:
        every_n_steps: the period in optimizer steps (the first evaluation is after step N).
        num_samples: the subset: the first N samples of ``split``.
        split: the DataModule split to draw from (``val`` by default; ``test`` works too).
        batch_size: samples per ``edit`` call.
        num_inference_steps: sampler steps (``None``: the model's test setting).
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        num_samples: int = 16,
        split: str = "val",
        batch_size: int = 8,
        num_inference_steps: int | None = None,
    ) -> None:
        if every_n_steps <= 0 or num_samples <= 0:
            raise ValueError("every_n_steps and num_samples must be positive")
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.split = split
        self.batch_size = batch_size
        self.num_inference_steps = num_inference_steps
        self._done_at: int | None = None

    def _subset(self, trainer: L.Trainer) -> list[dict]:
        datamodule = trainer.datamodule
        if self.split not in datamodule.datasets:
            datamodule.datasets[self.split] = datamodule.make_dataset(self.split)
        dataset = datamodule.datasets[self.split]
        count = min(self.num_samples, len(dataset))
        indices = range(trainer.global_rank, count, trainer.world_size)
        return [dataset[i] for i in indices]

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, model) -> dict[str, float]:
        """The subset's scores with the model's current weights (a collective under DDP)."""
        evaluator = model.build_evaluator()
        evaluator.prefix = "eval_subset"
        samples = self._subset(trainer)
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(samples), self.batch_size):
                batch = collate(samples[start : start + self.batch_size])
                if not batch["id"]:
                    continue
                batch = {
                    k: v.to(model.device) if isinstance(v, torch.Tensor) else v
                    for k, v in batch.items()
                }
                kwargs = model._eval_kwargs(batch["id"], self.num_inference_steps)
                out = model.edit(batch["source"], batch["instruction"], **kwargs)
                evaluator.update(batch, out.images)
            return evaluator.compute()
        finally:
            model.train(was_training)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or step == self._done_at:
            return  # accumulation repeats a global step over its micro-batches
        self._done_at = step
        results = self.evaluate(trainer, pl_module)
        finite = {k: v for k, v in results.items() if v == v}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(finite, step=step)
