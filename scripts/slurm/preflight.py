"""Run by ``scripts/slurm/{fit,test}.sbatch`` before ``srun``: check SLURM's allocation against
the run's config, once, and print the arguments that put the run in its fixed folder.

    python scripts/slurm/preflight.py --run-dir DIR [--version NAME] -- fit -c CONFIG [args]

The config is resolved exactly as ``python -m editbench`` will resolve it (its own parser, through
``--print_config``: every ``-c`` file, flag and checkpoint default applied). Then:

1. **Layout.** Lightning's ``SLURMEnvironment`` takes its ranks from SLURM, one task per device:
   SLURM's nodes must equal ``trainer.num_nodes`` and its tasks per node ``trainer.devices``
   (and, when SLURM allocated GPUs, at least that many GPUs per node). A disagreement exits
   with status 2 and one message naming both values, before any task starts or any model is
   loaded (Lightning's own check, ``SLURMEnvironment.validate_settings``, runs only once the
   model is built, in every task).
2. **Run folder.** One argument per line on stdout: ``--trainer.default_root_dir DIR`` (where
   Lightning writes ``hpc_ckpt_<n>.ckpt`` on SIGUSR1 and where it looks for one on start, so a
   requeued job resumes by itself), and for a TensorBoard/CSV logger (or Lightning's default
   one) ``save_dir`` DIR and, with ``--version``, that fixed version, so the requeued job logs
   into the same folder. The template puts them before the user's arguments (those win).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
#: Loggers whose folder is ``save_dir/name/version`` (Lightning's file loggers).
FOLDER_LOGGERS = ("TensorBoardLogger", "CSVLogger")
DEFAULT_LOGGER = "lightning.pytorch.loggers.TensorBoardLogger"


class LayoutError(ValueError):
    """SLURM's allocation and the config's trainer disagree."""


def tasks_per_node(env: dict[str, str]) -> int | None:
    """Tasks on every node of the job, from ``SLURM_TASKS_PER_NODE`` (``"2(x3)"``, ``"2,1"``),
    else ``SLURM_NTASKS_PER_NODE``; an uneven layout is an error (DDP wants the same number
    of processes on every node)."""
    text = env.get("SLURM_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE")
    if not text:
        return None
    counts = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match is None:
            raise LayoutError(f"cannot read SLURM_TASKS_PER_NODE={text!r}")
        counts.add(int(match.group(1)))
    if len(counts) != 1:
        raise LayoutError(
            f"SLURM gave the nodes different task counts (SLURM_TASKS_PER_NODE={text}); "
            "submit with --ntasks-per-node"
        )
    return counts.pop()


def check_layout(trainer: dict, env: dict[str, str]) -> str:
    """Compare ``trainer.num_nodes`` / ``trainer.devices`` (and GPUs) with the SLURM job in
    ``env``; return a one-line summary, raise :class:`LayoutError` naming both values."""
    from editbench.cli import device_count

    devices_value = trainer.get("devices", "auto")
    devices = device_count(devices_value)
    nodes = int(trainer.get("num_nodes") or 1)
    slurm_nodes = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    slurm_tasks = tasks_per_node(env)
    if slurm_nodes is None or slurm_tasks is None:
        raise LayoutError("not inside a SLURM job (no SLURM_JOB_NUM_NODES / SLURM_TASKS_PER_NODE)")
    problems = []
    if int(slurm_nodes) != nodes:
        problems.append(
            f"SLURM allocated {slurm_nodes} node(s) (--nodes) but the config has "
            f"trainer.num_nodes={nodes}"
        )
    if devices is None:
        problems.append(
            f"the config has trainer.devices={devices_value!r}; under SLURM state it as a number "
            f"(= --ntasks-per-node, here {slurm_tasks})"
        )
    elif devices != slurm_tasks:
        problems.append(
            f"SLURM runs {slurm_tasks} task(s) per node (--ntasks-per-node) but the config has "
            f"trainer.devices={devices}"
        )
    gpus = env.get("SLURM_GPUS_ON_NODE")
    accelerator = str(trainer.get("accelerator", "auto"))
    if gpus is not None and accelerator in ("gpu", "cuda") and devices and int(gpus) < devices:
        problems.append(
            f"SLURM allocated {gpus} GPU(s) per node (--gres) but the config has "
            f"trainer.devices={devices}"
        )
    if problems:
        raise LayoutError(
            "; ".join(problems) + ". Submit with --nodes N --ntasks-per-node D matching the "
            "config (or pass --trainer.num_nodes / --trainer.devices after the config)."
        )
    return f"{nodes} node(s) x {slurm_tasks} task(s), as the config's trainer"


def run_dir_args(config: dict, run_dir: str, version: str | None) -> list[str]:
    """The arguments that put the run (root dir, logger) in ``run_dir``; see the module doc."""
    args = ["--trainer.default_root_dir", run_dir]
    logger = config.get("trainer", {}).get("logger")
    if logger is None or logger is True:  # Lightning's default logger
        init = {"save_dir": run_dir, "name": "lightning_logs"}
        if version is not None:
            init["version"] = version
        args += ["--trainer.logger", json.dumps({"class_path": DEFAULT_LOGGER, "init_args": init})]
    elif isinstance(logger, dict) and str(logger.get("class_path", "")).endswith(FOLDER_LOGGERS):
        args += ["--trainer.logger.init_args.save_dir", run_dir]
        if version is not None and (logger.get("init_args") or {}).get("version") is None:
            args += ["--trainer.logger.init_args.version", version]
    else:
        print(
            "preflight: the logger is not a TensorBoard/CSV logger; its folder is left as "
            "configured (hpc checkpoints still go to the run folder)",
            file=sys.stderr,
        )
    return args


def resolve(argv: list[str]) -> dict:
    """The run's config as ``python -m editbench <argv>`` resolves it (``--print_config``)."""
    from editbench.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            status = main([*argv, "--print_config"])
        except SystemExit as stop:  # --print_config exits after printing
            status = stop.code or 0
    if status:
        sys.stderr.write(out.getvalue())
        raise SystemExit(status)
    return yaml.safe_load(out.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, help="the experiment's fixed folder")
    parser.add_argument("--version", help="a fixed logger version (fit: the requeued job's)")
    parser.add_argument("cli", nargs=argparse.REMAINDER, help="-- then the editbench arguments")
    args = parser.parse_args(argv)
    cli = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
    if not cli:
        parser.error("give the editbench arguments after --")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = resolve(cli)
    try:
        summary = check_layout(config.get("trainer", {}), dict(os.environ))
    except LayoutError as err:
        print(f"editbench slurm: error: {err}", file=sys.stderr)
        return 2
    print(f"preflight: {summary}; run folder {args.run_dir}", file=sys.stderr)
    print("\n".join(run_dir_args(config, args.run_dir, args.version)))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
