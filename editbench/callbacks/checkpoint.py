"""``last.ckpt`` at the final step of every fit."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class FinalStepCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` always holds the final global step.

    With ``every_n_train_steps=500, save_last=True`` and ``max_steps=1200``, Lightning 2.6's
    ``ModelCheckpoint`` writes ``last.ckpt`` only beside a periodic save (its ``on_train_end``
    saves one only when nothing was saved at all), so ``last.ckpt`` holds step 1,000 and the
    last 200 steps are lost. Lightning has no option for it (``every_n_epochs`` cannot be
    combined with ``every_n_train_steps``); this subclass writes ``last.ckpt`` once more at the
    end of ``fit`` when the final step has not been saved. Every argument is
    ``ModelCheckpoint``'s; ``save_last="link"`` is refused (the link would point at the older
    periodic file).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.save_last == "link":
            raise ValueError(
                "FinalStepCheckpoint needs save_last: true, not 'link' (a link would point at "
                "the last periodic checkpoint, not the final step)"
            )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if (
            self.save_last
            and not trainer.fast_dev_run
            and self._last_global_step_saved != trainer.global_step
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
