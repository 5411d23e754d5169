"""``python -m editbench``: LightningCLI (fit, validate, test, predict) plus the suite's own
subcommands (``edit``, ``data``, ``benchmark``)."""

from __future__ import annotations

import importlib
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from datamodules.base import BadSampleError, EditDataModule
from editbench.callbacks import EditImageLogger, EditPredictionWriter, MultiTurnChaining
from editbench.commands.expressive import CommandInputError
from editbench.commands.report import ReportError
from models.base import CheckpointMismatchError, EditModel

# main() hands LightningCLI an explicit argument list (after the checkpoint defaults), which is
# intended; Lightning would warn about it on every run.
warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")


class EditbenchCLI(LightningCLI):
    """LightningCLI over every :class:`EditModel` and :class:`EditDataModule` (subclass mode),
    with OmegaConf interpolation in configs, the image logger and prediction writer always
    present (configurable as ``image_logger.*`` and ``prediction_writer.*``) and the seed saved
    in the run's ``config.yaml``."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        super().__init__(
            EditModel,
            EditDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            parser_kwargs={"parser_mode": "omegaconf"},
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": [LearningRateMonitor(logging_interval="step"), MultiTurnChaining()]},
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )

    def _parse_ckpt_path(self) -> None:
        """Lightning would overwrite the parsed model with the checkpoint's hyperparameters, so
        ``test --ckpt_path X --model.init_args.guidance_scale 3`` would silently test at the
        trained value. :func:`main` instead puts the checkpoint's model and data *before* the
        user's arguments, so a config file or an explicit flag wins."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(EditImageLogger, "image_logger")
        parser.add_lightning_class_args(EditPredictionWriter, "prediction_writer")


def checkpoint_defaults(argv: Sequence[str]) -> list[str]:
    """``--model``/``--data`` arguments rebuilding what a checkpoint's run used, for
    ``validate``/``test``/``predict`` with ``--ckpt_path`` (or its abbreviation ``--ckpt``).

    They go before the user's arguments: the checkpoint supplies every field, and a ``-c``
    file or a flag overrides any of them (an evaluation at another αX needs no new config).
    """
    if not argv or argv[0] not in ("validate", "test", "predict"):
        return []
    path = None
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name in ("--ckpt_path", "--ckpt"):
            path = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    if path is None or not Path(path).is_file():
        return []
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    extra = []
    for key, flag in (("hyper_parameters", "--model"), ("datamodule_hyper_parameters", "--data")):
        hparams = dict(checkpoint.get(key) or {})
        hparams.pop("_instantiator", None)
        class_path = hparams.pop("_class_path", None)
        if class_path:
            extra += [flag, json.dumps({"class_path": class_path, "init_args": hparams})]
    return extra


#: editbench's own subcommands: name -> module with ``main(argv) -> int``, imported on use.
EXTRA_COMMANDS = {
    "edit": "editbench.commands.edit",
    "data": "editbench.commands.data",
    "benchmark": "editbench.commands.benchmark",
    "sweep": "editbench.commands.sweep",
    "report": "editbench.commands.report",
}

EXTRA_HELP = """
editbench's own subcommands (each has --help):
  edit        edit one image with a trained checkpoint
  data        synth | make-tiny | inspect | verify | expressive: datasets and tiny checkpoints
  benchmark   edit latency and training-step time against plain diffusers references
  sweep       the αV trade-off of checkpoints: CLIP directional vs image similarity (CSV, plot)
  report      aggregate test_metrics.json of several runs into the paper's table layout
"""


#: Errors that are the user's input, not a bug: printed as one line, exit status 2.
USER_ERRORS = (
    FileNotFoundError,
    NotADirectoryError,
    BadSampleError,
    FloatingPointError,
    CheckpointMismatchError,
    MisconfigurationException,
    CommandInputError,
    ReportError,
)


def main(argv: Sequence[str] | None = None) -> int:
    from_sys = argv is None
    argv = list(sys.argv[1:] if from_sys else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if argv and argv[0] in EXTRA_COMMANDS:
            module = importlib.import_module(EXTRA_COMMANDS[argv[0]])
            return module.main(argv[1:]) or 0
        if not argv or argv[0] in ("-h", "--help"):
            print(EXTRA_HELP)
        defaults = checkpoint_defaults(argv)
        if defaults:
            argv = [argv[0], *defaults, *argv[1:]]
            from_sys = False
        EditbenchCLI(args=None if from_sys else argv)
    except USER_ERRORS as err:
        if os.environ.get("EDITBENCH_TRACEBACK"):
            raise
        print(f"editbench: error: {err}", file=sys.stderr)
        print("(set EDITBENCH_TRACEBACK=1 for the full traceback)", file=sys.stderr)
        return 2
    return 0
