"""``python -m editbench memory``: the training memory per GPU of a paper config, and the memory
presets ``experiments/presets/{24gb,40gb,80gb}.yaml`` (issue 16, item 5).

    python -m editbench memory -c experiments/mgie_e2e.yaml                      # breakdown
    python -m editbench memory -c experiments/mgie_e2e.yaml -c experiments/presets/24gb.yaml
    python -m editbench memory --table                                           # README table
    python -m editbench memory --write-presets experiments/presets               # the presets

The numbers are estimates computed on the CPU (:mod:`editbench.memory`: parameter counts of the
architectures built on the meta device, activations measured there); no GPU measured them.

A preset is a config layered after a model config. Its ``memory_preset.models`` has one entry
per model class (``MGIE``, ``LGIE``, ``InsightEdit``, ``InsPix2Pix``); :func:`apply_memory_preset`
turns the entry of the model being run into ``--data.init_args.batch_size``,
``--trainer.strategy``, ``--model.init_args.optimizer``, ``--model.init_args.mllm_dtype`` and
``--model.init_args.gradient_checkpointing`` right after the preset on the command line, so the
global-batch link (editbench/cli.py) sees the preset's batch and any later file or flag (an
explicit ``--data.init_args.batch_size``) still wins.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import yaml

PRESET_KEY = "memory_preset"
PRESET_GPU_GB = (24, 40, 80)
NUM_GPUS = 8
#: The paper config of each model (global batch, weight decay).
PAPER_CONFIGS = {
    "MGIE": "experiments/mgie_e2e.yaml",
    "LGIE": "experiments/lgie_e2e.yaml",
    "InsightEdit": "experiments/insightedit.yaml",
    "InsPix2Pix": "experiments/inspix2pix.yaml",
}
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
FSDP_CLASS = "editbench.strategies.LayerFSDP"
ADAMW8BIT = "bitsandbytes.optim.AdamW8bit"


class MemoryPresetError(ValueError):
    """A preset that cannot apply to the model being run."""


def _config_files(argv: Sequence[str]) -> list[tuple[int, str]]:
    """(index after the option, path) of every ``-c``/``--config`` file in ``argv``."""
    files = []
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            files.append((i + 2, argv[i + 1]))
        elif arg.startswith("--config="):
            files.append((i + 1, arg.split("=", 1)[1]))
    return files


def _load(path: str) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return {}  # LightningCLI reports the file itself
    return data if isinstance(data, dict) else {}


def _class_name(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("class_path")
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                return _class_name(yaml.safe_load(text))
            except yaml.YAMLError:
                return None
        return text.rsplit(".", 1)[-1] or None
    return None


def model_class(argv: Sequence[str]) -> str | None:
    """The model class name the command line runs (the last config file or flag naming it)."""
    name = None
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            found = _class_name(_load(argv[i + 1]).get("model"))
        elif arg.startswith("--config="):
            found = _class_name(_load(arg.split("=", 1)[1]).get("model"))
        elif arg in ("--model", "--model.class_path") and i + 1 < len(argv):
            found = _class_name(argv[i + 1])
        elif arg.startswith(("--model=", "--model.class_path=")):
            found = _class_name(arg.split("=", 1)[1])
        else:
            found = None
        name = found or name
    return name


def preset_entry(preset: dict, model: str, where: str) -> dict:
    """The entry of ``model`` in a ``memory_preset`` block; an error naming ``where`` (the
    preset file) and the model when it has none."""
    models = preset.get("models") or {}
    if model not in models:
        raise MemoryPresetError(
            f"{where}: memory_preset has no entry for the model {model!r} (it has "
            f"{sorted(models)}); run without the preset or add an entry"
        )
    return models[model]


def preset_flags(entry: dict) -> list[str]:
    """The command-line flags of one preset entry."""
    flags = ["--data.init_args.batch_size", str(int(entry["batch_size"]))]
    if entry.get("strategy") is not None:
        flags += ["--trainer.strategy", json.dumps(entry["strategy"])]
    if entry.get("optimizer") is not None:
        flags += ["--model.init_args.optimizer", json.dumps(entry["optimizer"])]
    if entry.get("mllm_dtype") is not None:
        flags += ["--model.init_args.mllm_dtype", str(entry["mllm_dtype"])]
    if entry.get("gradient_checkpointing") is not None:
        flags += ["--model.init_args.gradient_checkpointing",
                  json.dumps(bool(entry["gradient_checkpointing"]))]
    return flags


def apply_memory_preset(argv: Sequence[str]) -> list[str]:
    """``argv`` with the preset entry of the model being run inserted right after the last
    config file holding a ``memory_preset`` (unchanged without one)."""
    argv = list(argv)
    if not argv or argv[0] not in LIGHTNING_COMMANDS:
        return argv
    # a run's saved config.yaml holds `memory_preset: null` when it ran without one
    found = [(end, path) for end, path in _config_files(argv) if _load(path).get(PRESET_KEY)]
    if not found:
        return argv
    end, path = found[-1]
    model = model_class(argv)
    if model is None:
        return argv  # LightningCLI reports the missing model
    entry = preset_entry(_load(path)[PRESET_KEY], model, path)
    return [*argv[:end], *preset_flags(entry), *argv[end:]]


# ----------------------------------------------------------------------------- presets
def _paper(model: str) -> dict:
    return _load(PAPER_CONFIGS[model])


def setup_of(model: str, entry: dict):
    """The :class:`editbench.memory.Setup` a preset entry trains with."""
    from editbench.memory import HAS_CHECKPOINTING, Setup

    strategy = entry.get("strategy")
    fsdp = isinstance(strategy, dict) and strategy.get("class_path") == FSDP_CLASS
    optimizer = (entry.get("optimizer") or {}).get("class_path")
    checkpointing = fsdp or bool(entry.get("gradient_checkpointing", HAS_CHECKPOINTING[model]))
    return Setup(model, "fsdp" if fsdp else "ddp",
                 "adamw8bit" if optimizer == ADAMW8BIT else "adamw", checkpointing)


def preset_entries(gpu_gb: float, num_gpus: int = NUM_GPUS) -> dict[str, dict]:
    """Every model's preset entry for GPUs of ``gpu_gb`` GiB (:func:`choose_setup`)."""
    from editbench.activations import CHECKPOINT_UNITS
    from editbench.memory import FSDP_UNITS, HAS_CHECKPOINTING, choose_setup

    entries = {}
    for model in PAPER_CONFIGS:
        setup, batch = choose_setup(model, gpu_gb, num_gpus)
        entry: dict = {"batch_size": batch}
        if setup.strategy == "fsdp":
            entry["strategy"] = {"class_path": FSDP_CLASS, "init_args": {
                "wrap_layers": list(FSDP_UNITS), "checkpoint_layers": list(CHECKPOINT_UNITS),
                "state_dict_type": "full", "sharding_strategy": "FULL_SHARD",
                "use_orig_params": True}}
            if model != "InsPix2Pix":  # one dtype per FSDP unit: the frozen LLM in float32
                entry["mllm_dtype"] = "float32"
        if setup.optimizer == "adamw8bit":
            decay = _paper(model).get("model", {}).get("init_args", {}).get("weight_decay", 0.01)
            entry["optimizer"] = {"class_path": ADAMW8BIT, "init_args": {"weight_decay": decay}}
        if HAS_CHECKPOINTING[model]:
            entry["gradient_checkpointing"] = True
        entries[model] = entry
    return entries


def preset_yaml(gpu_gb: int, num_gpus: int = NUM_GPUS) -> str:
    """The text of ``experiments/presets/<gpu_gb>gb.yaml``."""
    from editbench.memory import estimate

    entries = preset_entries(gpu_gb, num_gpus)
    lines = [
        "# base: experiments/mgie_e2e.yaml",
        f"# Memory preset for {gpu_gb} GB GPUs ({gpu_gb} GiB each), {num_gpus} per run: bf16-mixed,",
        "# gradient checkpointing, the frozen VAE in float32 (the suite never casts it), 8-bit AdamW",
        "# where AdamW's states do not fit, FSDP where one GPU cannot hold the model; the batch",
        "# per GPU is the largest the estimate fits that divides the paper's global batch / 8.",
        "# Layer it after a paper config:",
        "#   python -m editbench fit -c experiments/mgie_e2e.yaml -c "
        f"experiments/presets/{gpu_gb}gb.yaml",
        "# An explicit --data.init_args.batch_size (or --trainer.strategy ...) after it wins.",
        "# Generated by `python -m editbench memory --write-presets experiments/presets`",
        "# (editbench/memory.py; estimated on the CPU, not measured on a GPU). Do not edit by hand:",
        "# tests/cli/test_memory_cli.py compares it with the estimator.",
        "trainer:",
        "  precision: bf16-mixed",
        f"{PRESET_KEY}:",
        f"  gpu_gb: {gpu_gb}",
        f"  num_gpus: {num_gpus}",
        "  models:",
    ]
    for model, entry in entries.items():
        est = estimate(setup_of(model, entry), num_gpus)
        lines.append(f"    # {model}: estimated peak {est.peak(entry['batch_size']) / 2**30:.1f} GiB")
        block = yaml.safe_dump({model: entry}, sort_keys=False, default_flow_style=False)
        lines += ["    " + line for line in block.splitlines()]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- reports
def breakdown(model: str, setup, gpu_gb: float, num_gpus: int) -> str:
    """The estimate of one setup as text lines."""
    from editbench.memory import estimate, max_batch_per_gpu, measurement

    m = measurement(model, setup.resolution)
    est = estimate(setup, num_gpus)
    batch = max_batch_per_gpu(setup, gpu_gb, num_gpus)
    gib = 2**30
    rows = [
        f"{model}: {m.params() / 1e9:.3f} B parameters, {m.params(True) / 1e6:.1f} M trainable "
        f"({setup.strategy}, {setup.optimizer}, checkpointing "
        f"{'on' if setup.checkpointing else 'off'}, {num_gpus} GPU(s) of {gpu_gb:g} GiB)",
        *(f"  {p.name:<14}{p.params:>15,} params {p.trainable:>15,} trainable" for p in m.parts),
        f"  weights              {est.weights / gib:8.2f} GiB",
        f"  gradients            {est.grads / gib:8.2f} GiB",
        f"  optimizer states     {est.optimizer / gib:8.2f} GiB",
        f"  autocast copies      {est.autocast / gib:8.2f} GiB",
        f"  activations/sample   {est.activations_per_sample / gib:8.3f} GiB",
        f"  overhead (batch 1)   {est.overhead(1) / gib:8.2f} GiB",
        f"  peak at batch 1      {est.peak(1) / gib:8.2f} GiB",
        f"  max batch per GPU    {batch}",
    ]
    return "\n".join(rows)


def table(num_gpus: int = NUM_GPUS) -> str:
    """The README table: model x 24/40/80 GB presets."""
    from editbench.memory import GLOBAL_BATCH, estimate, max_batch_per_gpu

    head = ("| model | GPU | batch/GPU | strategy | optimizer | accumulation (8 GPUs) | "
            "peak (GiB) | largest batch that fits |")
    rows = [head, "|---|---|---|---|---|---|---|---|"]
    for gpu_gb in PRESET_GPU_GB:
        for model, entry in preset_entries(gpu_gb, num_gpus).items():
            setup = setup_of(model, entry)
            batch = entry["batch_size"]
            accumulation = GLOBAL_BATCH[model] // (batch * num_gpus)
            peak = estimate(setup, num_gpus).peak(batch) / 2**30
            strategy = "FSDP" if setup.strategy == "fsdp" else "DDP"
            optimizer = "AdamW8bit" if setup.optimizer == "adamw8bit" else "AdamW"
            largest = max_batch_per_gpu(setup, gpu_gb, num_gpus)
            rows.append(f"| {model} | {gpu_gb} GB | {batch} | {strategy} | {optimizer} | "
                        f"{accumulation} (global {GLOBAL_BATCH[model]}) | {peak:.1f} | "
                        f"{largest} |")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m editbench memory",
        description="Estimated training memory per GPU (computed on the CPU, not measured).",
    )
    parser.add_argument("-c", "--config", action="append", default=[],
                        help="a model config, then optionally a preset (experiments/presets/)")
    parser.add_argument("--gpus", type=int, default=None,
                        help="GPUs in the run (default: the preset's, else trainer.devices, else 1)")
    parser.add_argument("--gpu-gb", type=float, default=None,
                        help="GPU memory in GiB (default: the preset's, else 80)")
    parser.add_argument("--table", action="store_true", help="the Markdown table of the presets")
    parser.add_argument("--write-presets", metavar="DIR",
                        help="write 24gb.yaml, 40gb.yaml, 80gb.yaml into DIR")
    return parser


def main(argv: Sequence[str]) -> int:
    from editbench.commands.expressive import CommandInputError
    from editbench.memory import HAS_CHECKPOINTING, MODELS, Setup

    args = build_parser().parse_args(list(argv))
    if args.write_presets:
        out = Path(args.write_presets)
        out.mkdir(parents=True, exist_ok=True)
        for gpu_gb in PRESET_GPU_GB:
            (out / f"{gpu_gb}gb.yaml").write_text(preset_yaml(gpu_gb, args.gpus or NUM_GPUS))
            print(f"wrote {out / f'{gpu_gb}gb.yaml'}")
    if args.table:
        print(table(args.gpus or NUM_GPUS))
    if not args.config:
        if not (args.table or args.write_presets):
            raise CommandInputError("memory: give -c <model config> [-c <preset>], or --table")
        return 0
    argv_like = [x for path in args.config for x in ("-c", path)]
    model = model_class(argv_like)
    if model not in MODELS:
        raise CommandInputError(f"memory: the configs name no model of {MODELS} (got {model!r})")
    merged: dict = {}
    preset, preset_path = None, None
    for path in args.config:
        data = _load(path)
        if data.get(PRESET_KEY):
            preset, preset_path = data[PRESET_KEY], path
        for key in ("trainer", "model"):
            merged.setdefault(key, {}).update(data.get(key) or {})
    if preset is not None:
        setup = setup_of(model, preset_entry(preset, model, preset_path))
        gpus = args.gpus or preset.get("num_gpus") or NUM_GPUS
        gpu_gb = args.gpu_gb or preset.get("gpu_gb")
    else:
        init = (merged.get("model") or {}).get("init_args") or {}
        checkpointing = bool(init.get("gradient_checkpointing")) and HAS_CHECKPOINTING[model]
        setup = Setup(model, checkpointing=checkpointing)
        devices = (merged.get("trainer") or {}).get("devices")
        gpus = args.gpus or (devices if isinstance(devices, int) else 1)
        gpu_gb = args.gpu_gb or 80
    print(breakdown(model, setup, gpu_gb, gpus))
    return 0
