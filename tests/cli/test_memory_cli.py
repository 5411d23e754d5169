"""The memory presets through the CLI (experiments/presets/*.yaml, issue 16 item 5) and
``python -m editbench memory``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from editbench.cli import EditbenchCLI, main
from editbench.commands import memory as command
from editbench.commands.memory import (
    ADAMW8BIT,
    PAPER_CONFIGS,
    MemoryPresetError,
    apply_memory_preset,
    preset_yaml,
    setup_of,
)
from editbench.memory import GLOBAL_BATCH, divisor_batch, fits, max_batch_per_gpu

REPO = Path(__file__).resolve().parents[2]
PRESETS = {gb: REPO / "experiments" / "presets" / f"{gb}gb.yaml" for gb in (24, 40, 80)}


class ParseOnly(EditbenchCLI):
    """The CLI's parser and links, without building the trainer, model or data."""

    def instantiate_classes(self) -> None:
        pass


def fit_config(*args: str):
    """What ``python -m editbench fit <args>`` parses (the preset applied as main() does)."""
    argv = apply_memory_preset(["fit", *args])
    return ParseOnly(args=argv[1:], run=False).config


def entry(gb: int, model: str) -> dict:
    return yaml.safe_load(PRESETS[gb].read_text())["memory_preset"]["models"][model]


def test_presets_are_the_generated_files():
    """The YAML cannot drift from the estimator: each file is what --write-presets writes."""
    for gb, path in PRESETS.items():
        assert path.read_text() == preset_yaml(gb), f"regenerate {path}"


@pytest.mark.parametrize("gb", sorted(PRESETS))
@pytest.mark.parametrize("model", sorted(PAPER_CONFIGS))
def test_preset_batch_is_the_estimators(gb, model):
    """The batch is max_batch_per_gpu rounded down to a divisor of global / 8; max + 1 does
    not fit by the estimate, and the batch leaves the paper's global batch whole."""
    values = entry(gb, model)
    setup = setup_of(model, values)
    largest = max_batch_per_gpu(setup, gb, 8)
    assert values["batch_size"] == divisor_batch(largest, GLOBAL_BATCH[model], 8) >= 1
    assert fits(setup, gb, 8, largest) and not fits(setup, gb, 8, largest + 1)
    assert GLOBAL_BATCH[model] % (values["batch_size"] * 8) == 0


def test_global_batches_are_the_paper_configs():
    for model, config in PAPER_CONFIGS.items():
        assert yaml.safe_load((REPO / config).read_text())["global_batch_size"] == GLOBAL_BATCH[model]


CASES = [(gb, model) for gb in sorted(PRESETS) for model in sorted(PAPER_CONFIGS)]


@pytest.mark.parametrize(("gb", "model"), [pytest.param(*c, marks=[] if c == (24, "MGIE")
                                                        else [pytest.mark.slow]) for c in CASES])
def test_preset_resolves_through_the_cli(gb, model):
    """Each model x preset: the batch, the accumulation to the paper's global batch on 8
    devices, the strategy and the optimizer the preset names."""
    values = entry(gb, model)
    cfg = fit_config("-c", str(REPO / PAPER_CONFIGS[model]), "-c", str(PRESETS[gb]),
                     "--trainer.devices", "8")
    batch = values["batch_size"]
    assert cfg.data.init_args.batch_size == batch
    assert cfg.trainer.accumulate_grad_batches * batch * 8 == GLOBAL_BATCH[model]
    assert cfg.trainer.precision == "bf16-mixed"
    optimizer = cfg.model.init_args.optimizer
    if "optimizer" in values:
        assert optimizer.class_path == ADAMW8BIT == values["optimizer"]["class_path"]
    else:
        assert optimizer is None  # the model's own AdamW
    strategy = cfg.trainer.strategy
    if "strategy" in values:
        assert strategy.class_path == "editbench.strategies.LayerFSDP"
    else:
        assert strategy == "ddp"
    if "mllm_dtype" in values:
        assert cfg.model.init_args.mllm_dtype == "float32"
    if values.get("gradient_checkpointing"):
        assert cfg.model.init_args.gradient_checkpointing is True


def test_explicit_batch_flag_wins():
    cfg = fit_config("-c", str(REPO / PAPER_CONFIGS["MGIE"]), "-c", str(PRESETS[24]),
                     "--data.init_args.batch_size", "2", "--trainer.devices", "8")
    assert cfg.data.init_args.batch_size == 2
    assert cfg.trainer.accumulate_grad_batches == 128 // (2 * 8)


def test_main_applies_the_preset(capsys):
    """``fit --print_config`` through main(): the preset's batch is what the run sees."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(REPO / PAPER_CONFIGS["InsPix2Pix"]), "-c", str(PRESETS[80]),
              "--print_config"])
    assert exit_info.value.code in (0, None)
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["data"]["init_args"]["batch_size"] == entry(80, "InsPix2Pix")["batch_size"]
    assert shown["memory_preset"]["gpu_gb"] == 80


def test_a_model_without_an_entry_is_a_clear_error(tmp_path, capsys):
    preset = tmp_path / "only_ip2p.yaml"
    preset.write_text("memory_preset:\n  gpu_gb: 24\n  models:\n    InsPix2Pix:\n"
                      "      batch_size: 4\n")
    args = ["fit", "-c", str(REPO / PAPER_CONFIGS["MGIE"]), "-c", str(preset)]
    with pytest.raises(MemoryPresetError, match="only_ip2p.yaml.*'MGIE'"):
        apply_memory_preset(args)
    assert main(args) == 2
    assert "no entry for the model 'MGIE'" in capsys.readouterr().err


def test_without_a_preset_argv_is_unchanged(tmp_path):
    args = ["fit", "-c", str(REPO / PAPER_CONFIGS["MGIE"]), "--data.init_args.batch_size", "3"]
    assert apply_memory_preset(args) == args
    saved = tmp_path / "config.yaml"  # a run's saved config, which ran without a preset
    saved.write_text("memory_preset: null\nmodel:\n  class_path: models.mgie.MGIE\n")
    assert apply_memory_preset(["fit", "-c", str(saved)]) == ["fit", "-c", str(saved)]
    assert apply_memory_preset(["edit", "-c", str(PRESETS[24])]) == ["edit", "-c", str(PRESETS[24])]


def test_memory_table_has_the_preset_numbers(capsys):
    assert main(["memory", "--table"]) == 0
    out = capsys.readouterr().out
    for gb in PRESETS:
        for model in PAPER_CONFIGS:
            values = entry(gb, model)
            row = next(line for line in out.splitlines()
                       if line.startswith(f"| {model} | {gb} GB | "))
            assert row.split("|")[3].strip() == str(values["batch_size"])
            accumulation = GLOBAL_BATCH[model] // (values["batch_size"] * 8)
            assert row.split("|")[6].strip().startswith(str(accumulation))


def test_memory_breakdown_of_a_config_and_preset(capsys):
    args = ["memory", "-c", str(REPO / PAPER_CONFIGS["MGIE"]), "-c", str(PRESETS[24])]
    assert main(args) == 0
    out = capsys.readouterr().out
    for label in ("weights", "gradients", "optimizer states", "activations/sample", "overhead",
                  "max batch per GPU"):
        assert label in out
    values = entry(24, "MGIE")
    largest = max_batch_per_gpu(setup_of("MGIE", values), 24, 8)
    assert out.rstrip().endswith(f"max batch per GPU    {largest}")


def test_memory_without_arguments_is_a_usage_error(capsys):
    assert main(["memory"]) == 2
    assert "give -c" in capsys.readouterr().err


def test_write_presets(tmp_path):
    assert command.main(["--write-presets", str(tmp_path)]) == 0
    for gb, path in PRESETS.items():
        assert (tmp_path / f"{gb}gb.yaml").read_text() == path.read_text()
