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

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from datamodules.base import BadSampleError, EditDataModule
from editbench.callbacks import EditImageLogger, EditPredictionWriter, MultiTurnChaining
from editbench.callbacks.dashboard import TensorBoardLayout
from editbench.commands.expressive import CommandInputError
from editbench.commands.memory import MemoryPresetError, apply_memory_preset
from editbench.commands.report import ReportError
from models.base import CheckpointMismatchError, EditModel
from models.checkpoint import read_checkpoint

# main() hands LightningCLI an explicit argument list (after the checkpoint defaults), which is
# intended; Lightning would warn about it on every run.
warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")


def device_count(devices: int | str | Sequence[int] | None) -> int | None:
    """Processes per node that ``Trainer(devices=...)`` starts, when the value states it
    (``4``, ``"4"``, ``[0, 1]``, ``"0,1"``); ``None`` for ``"auto"`` and ``-1`` (known only
    once the accelerator is up)."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str):
        text = devices.strip()
        if "," in text:
            return len([d for d in text.split(",") if d.strip()])
        if not text.lstrip("-").isdigit():
            return None
        devices = int(text)
    if isinstance(devices, int) and devices > 0:
        return devices
    return None


def gradient_accumulation(global_batch_size, batch_size, devices, num_nodes) -> int:
    """``trainer.accumulate_grad_batches`` = global batch / (per-process batch x processes),
    the linked value of ``global_batch_size``; 1 when no global batch is given. A global batch
    that the per-step batch does not divide, or a device count not known before the run
    (``"auto"``), is an error naming the numbers."""
    if global_batch_size is None:
        return 1
    count = device_count(devices)
    nodes = int(num_nodes or 1)
    if count is None:
        raise ValueError(
            f"global_batch_size {global_batch_size} needs an explicit process count: "
            f"trainer.devices is {devices!r}; give --trainer.devices N (or --global_batch_size null)"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"global_batch_size {global_batch_size} needs data.init_args.batch_size")
    per_step = batch_size * count * nodes
    if global_batch_size < 1 or global_batch_size % per_step:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not a multiple of data batch_size "
            f"{batch_size} x trainer.devices {count} x trainer.num_nodes {nodes} = {per_step}"
            f" (to evaluate only, pass --global_batch_size null)"
        )
    return global_batch_size // per_step


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
            trainer_defaults={
                "callbacks": [
                    LearningRateMonitor(logging_interval="step"),
                    MultiTurnChaining(),
                    TensorBoardLayout(),
                ],
                # The DataModules split the data across processes themselves (evaluation
                # unpadded, MagicBrush sessions whole: datamodules/sampling.py).
                "use_distributed_sampler": False,
            },
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )

    def _instantiate_trainer(self, config: dict, callbacks: list) -> Trainer:
        """Rich's progress bar (fit, validate, test, predict) unless the config disables the bar
        or names its own."""
        given = [*(config.get("callbacks") or []), *callbacks]
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in given
        ):
            callbacks = [*callbacks, RichProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def _parse_ckpt_path(self) -> None:
        """Lightning would overwrite the parsed model with the checkpoint's hyperparameters, so
        ``test --ckpt_path X --model.init_args.guidance_scale 3`` would silently test at the
        trained value. :func:`main` instead puts the checkpoint's model and data *before* the
        user's arguments, so a config file or an explicit flag wins."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(EditImageLogger, "image_logger")
        parser.add_lightning_class_args(EditPredictionWriter, "prediction_writer")
        # A paper's global batch is stated once; the accumulation follows from the per-GPU
        # batch and the process count, so `--trainer.devices 4` keeps the paper's batch.
        parser.add_argument(
            "--global_batch_size",
            type=int | None,
            default=None,
            help="Samples per optimizer step over all processes; trainer.accumulate_grad_batches "
            "is derived as global_batch_size / (data batch_size * trainer.devices * "
            "trainer.num_nodes), and must divide (null: no accumulation; the evaluation diffs "
            "set null, so test/predict run on any device count).",
        )
        parser.link_arguments(
            ("global_batch_size", "data.init_args.batch_size", "trainer.devices", "trainer.num_nodes"),
            "trainer.accumulate_grad_batches",
            compute_fn=gradient_accumulation,
        )
        # experiments/presets/*.yaml: per-model batch/strategy/optimizer, applied by main()
        # (editbench/commands/memory.py) before parsing; kept here so the key parses and saves.
        parser.add_argument(
            "--memory_preset",
            type=dict | None,
            default=None,
            help="A memory preset (experiments/presets/*.yaml): per model class its per-GPU "
            "batch, strategy and optimizer, applied before parsing (python -m editbench memory).",
        )


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
        return []  # Lightning's own values (`last`, `best`) or its error for a missing file
    checkpoint = read_checkpoint(path, what="--ckpt_path")
    extra = []
    for data, flag in ((False, "--model"), (True, "--data")):
        hparams = checkpoint.datamodule_hparams if data else checkpoint.hparams
        class_path = hparams.get("_class_path")
        if class_path:
            init_args = checkpoint.init_args(data=data)
            extra += [flag, json.dumps({"class_path": class_path, "init_args": init_args})]
    return extra


#: editbench's own subcommands: name -> module with ``main(argv) -> int``, imported on use.
EXTRA_COMMANDS = {
    "edit": "editbench.commands.edit",
    "data": "editbench.commands.data",
    "benchmark": "editbench.commands.benchmark",
    "sweep": "editbench.commands.sweep",
    "report": "editbench.commands.report",
    "demo": "editbench.commands.demo",
    "export": "editbench.commands.export",
    "judge": "editbench.commands.judge",
    "memory": "editbench.commands.memory",
}

EXTRA_HELP = """
editbench's own subcommands (each has --help):
  edit        edit one image with a trained checkpoint
  data        synth | make-tiny | inspect | verify | expressive: datasets and tiny checkpoints
  benchmark   edit latency and training-step time against plain diffusers references
  sweep       the αV trade-off of checkpoints: CLIP directional vs image similarity (CSV, plot)
  report      aggregate test_metrics.json of several runs into the paper's table layout
  demo        an interactive editing page (Gradio) for a checkpoint or config, on localhost
  export      a checkpoint's trained parts as safetensors + export.json (what, from which bases)
  judge       VIEScore or ImgEdit's judge of a test run's result bundle, offline (judge.jsonl)
  memory      estimated training memory per GPU of a config; the memory presets' table
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
    MemoryPresetError,
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
        # A memory preset's entry for the model (batch, strategy, optimizer) after its -c file.
        preset = apply_memory_preset(argv)
        if preset != argv:
            argv, from_sys = preset, False
        EditbenchCLI(args=None if from_sys else argv)
    except USER_ERRORS as err:
        if os.environ.get("EDITBENCH_TRACEBACK"):
            raise
        print(f"editbench: error: {err}", file=sys.stderr)
        print("(set EDITBENCH_TRACEBACK=1 for the full traceback)", file=sys.stderr)
        return 2
    return 0
