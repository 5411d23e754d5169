"""TensorBoard's dashboard layout of an editbench run.

TensorBoard's *Custom Scalars* tab shows charts grouped as a layout says (the layout is a
summary the run writes once; every chart is a list of tag regexes drawn together). The groups:

* **Losses**: the training loss and each of its terms (``train/loss*``), and the validation
  losses (``val/loss*``);
* **Optimization**: the learning rate of every parameter group (``lr-*``, Lightning's
  ``LearningRateMonitor``), the curriculum stage (``train/stage``), skipped samples;
* **Metrics**: one chart per metric, with its copy-the-input baseline and the other
  aggregations (``val/L1``, ``test/L1``, ``test/copy/L1``, ``test/final/L1``, ...). Each run
  (one dataset or protocol per ``test``) is a separate series, so the runs of one model on
  several datasets sit side by side;
* the image grids (``train/edits``, ``val/edits``: source | edit | target, instructions under
  ``*/instructions``) are in the *Images* and *Text* tabs, which custom scalars cannot hold.

    tensorboard --logdir runs      # then the "Custom Scalars" tab
"""

from __future__ import annotations

import re

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from metrics import METRICS

#: Metrics drawn beside the registered ones (computed by the evaluator, not registered).
EXTRA_METRICS = ("L1_edit", "VIEScore_SC", "VIEScore_PQ", "VIEScore_O")


def metric_chart(name: str) -> list[str]:
    """Tag regexes of one metric over validation/test, its copy baseline and aggregations."""
    metric = re.escape(name)
    return [rf"^(val|test|eval_subset)/{metric}$", rf"^(val|test|eval_subset)/[^/]+/{metric}$"]


def dashboard_layout(metric_names: list[str] | None = None) -> dict:
    """The custom-scalars layout: ``{group: {chart: ["Multiline", [tag regexes]]}}``."""
    names = sorted(set(metric_names or METRICS) | set(EXTRA_METRICS))
    return {
        "Losses": {
            "training loss and its terms": ["Multiline", [r"^train/loss"]],
            "validation losses": ["Multiline", [r"^val/loss"]],
        },
        "Optimization": {
            "learning rate per parameter group": ["Multiline", [r"^lr-"]],
            "curriculum stage": ["Multiline", [r"^train/stage$"]],
            "skipped samples": ["Multiline", [r"^train/skipped_samples"]],
        },
        "Metrics": {name: ["Multiline", metric_chart(name)] for name in names},
    }


class TensorBoardLayout(L.Callback):
    """Writes :func:`dashboard_layout` into every TensorBoard logger of the run, once."""

    def __init__(self) -> None:
        self._written: set[int] = set()

    @rank_zero_only
    def _write(self, trainer: L.Trainer) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and id(logger) not in self._written:
                logger.experiment.add_custom_scalars(dashboard_layout())
                self._written.add(id(logger))

    def on_fit_start(self, trainer, pl_module) -> None:
        self._write(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._write(trainer)

    def on_test_start(self, trainer, pl_module) -> None:
        self._write(trainer)
