"""The paper configs as the releases set them (issue 13, item 5): each value the issue names, the
global batch stated once and the gradient accumulation computed from it (a jsonargparse link in
``EditbenchCLI``), and the evaluation diffs ``experiments/eval/*.yaml`` layered on any model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from editbench.cli import EditbenchCLI, device_count, gradient_accumulation, main

REPO = Path(__file__).resolve().parents[2]
EXP = REPO / "experiments"
#: Paper config -> (global batch, per-GPU batch, GPUs) as its paper states them.
PAPER_BATCH = {
    "inspix2pix.yaml": (1024, 32, 8),  # InstructPix2Pix: 1,024 = 32 x accumulate 4 x 8 GPUs
    "mgie_e2e.yaml": (128, 16, 8),  # MGIE Sec. 4.1: 128 on 8 A100s
    "lgie_e2e.yaml": (128, 16, 8),
}
EVAL = {
    "evr": "datamodules.evr.EVRDataModule",
    "gier": "datamodules.gier.GIERDataModule",
    "ma5k": "datamodules.ma5k.MA5kDataModule",
    "magicbrush": "datamodules.magicbrush.MagicBrushDataModule",
    "ipr2pr": "datamodules.ipr2pr.IPr2PrDataModule",
    "emu_edit": "datamodules.emu_edit.EmuEditDataModule",
    "gedit": "datamodules.gedit.GEditBenchDataModule",
    "imgedit": "datamodules.imgedit.ImgEditBenchDataModule",
    "reason_edit": "datamodules.reason_edit.ReasonEditDataModule",
}
#: The protocol each eval diff sets (None: the DataModule's, GEdit's follows its language,
#: Reason-Edit's its scenarios).
EVAL_PROTOCOL = {name: name for name in EVAL} | {
    "emu_edit": "emu-edit",
    "gedit": None,
    "reason_edit": None,
}
#: The model input side of an eval diff where it is not 512 (SmartEdit edits Reason-Edit at 256).
EVAL_RESOLUTION = {"reason_edit": 256}
TINY_MODELS = ["inspix2pix.yaml", "mgie_e2e.yaml", "lgie_e2e.yaml"]


class ParseOnly(EditbenchCLI):
    """The CLI's parser and links, without building the trainer, model or data."""

    def instantiate_classes(self) -> None:
        pass


def parsed(*args: str):
    """The parsed config (links applied) of ``-c`` files and flags, as ``fit`` would see it."""
    return ParseOnly(args=list(args), run=False).config


def printed(capsys, subcommand: str, *args: str) -> dict:
    """``python -m editbench <subcommand> ... --print_config`` as YAML."""
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, *args, "--print_config"])
    captured = capsys.readouterr()
    assert exit_info.value.code in (0, None), captured.err
    return yaml.safe_load(captured.out)


def layers(config: Path) -> list[str]:
    """``-c base -c diff`` for a diff file (first line ``# base: FILE``), else ``-c config``."""
    first = config.read_text().splitlines()[0]
    bases = first.split(":", 1)[1].split() if first.startswith("# base:") else []  # one or more
    base = [arg for base in bases for arg in ("-c", str(REPO / base))]
    return [*base, "-c", str(config)]


# ----------------------------------------------------------------- the computed accumulation


@pytest.mark.parametrize(
    ("global_batch", "batch", "devices", "nodes", "expected"),
    [
        (1024, 32, 8, 1, 4),  # InstructPix2Pix as released
        (1024, 32, 4, 1, 8),
        (1024, 32, "8", 1, 4),
        (1024, 32, [0, 1, 2, 3], 1, 8),
        (1024, 32, "0,1", 2, 8),
        (128, 16, 8, 1, 1),  # MGIE
        (128, 16, 1, 1, 8),
        (128, 16, 4, 2, 1),
        (None, 16, "auto", 1, 1),  # no global batch: no accumulation
    ],
)
def test_gradient_accumulation_by_hand(global_batch, batch, devices, nodes, expected):
    assert gradient_accumulation(global_batch, batch, devices, nodes) == expected


def test_device_count_reads_what_the_trainer_will_start():
    assert [device_count(d) for d in (8, "4", [0, 2], "0,1,", (3,))] == [8, 4, 2, 2, 1]
    assert [device_count(d) for d in ("auto", -1, "-1", 0)] == [None] * 4


def test_gradient_accumulation_errors_name_the_numbers():
    with pytest.raises(
        ValueError, match=r"1024 .* batch_size 32 x trainer.devices 3 x trainer.num_nodes 1 = 96"
    ):
        gradient_accumulation(1024, 32, 3, 1)
    with pytest.raises(ValueError, match=r"global_batch_size 128 .* trainer.devices is 'auto'"):
        gradient_accumulation(128, 16, "auto", 1)


@pytest.mark.parametrize("config", sorted(PAPER_BATCH))
@pytest.mark.parametrize(("devices", "nodes"), [(None, None), (4, None), (2, 2), (1, None)])
def test_paper_global_batch_is_computed_not_hand_edited(config, devices, nodes):
    global_batch, batch, gpus = PAPER_BATCH[config]
    flags = [] if devices is None else ["--trainer.devices", str(devices)]
    flags += [] if nodes is None else ["--trainer.num_nodes", str(nodes)]
    cfg = parsed("-c", str(EXP / config), *flags)
    devices, nodes = devices or gpus, nodes or 1
    assert cfg.global_batch_size == global_batch
    assert cfg.data.init_args.batch_size == batch
    # the CLI keeps `--trainer.devices 4` as the string "4", as Lightning accepts it
    assert device_count(cfg.trainer.devices) == devices and cfg.trainer.num_nodes == nodes
    accumulation = cfg.trainer.accumulate_grad_batches
    assert accumulation == global_batch // (batch * devices * nodes)
    assert batch * devices * nodes * accumulation == global_batch


def test_print_config_on_the_cli_follows_the_device_flag(capsys):
    """``fit --print_config`` shows what the link reads; the derived accumulation itself is a
    link target, which jsonargparse leaves out of printed configs (so they stay reusable)."""
    shown = printed(capsys, "fit", "-c", str(EXP / "inspix2pix.yaml"), "--trainer.devices", "4")
    assert shown["global_batch_size"] == 1024
    assert int(shown["trainer"]["devices"]) == 4
    assert shown["data"]["init_args"]["batch_size"] == 32
    assert "accumulate_grad_batches" not in shown["trainer"]
    cfg = parsed("-c", str(EXP / "inspix2pix.yaml"), "--trainer.devices", "4")
    assert cfg.trainer.accumulate_grad_batches == 8


def test_indivisible_global_batch_is_an_error_naming_the_numbers(capsys):
    """At parse time, before anything is built (``--print_config`` prints without the links)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(EXP / "inspix2pix.yaml"), "--trainer.devices", "3"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "global_batch_size 1024" in err and "trainer.devices 3" in err and "= 96" in err


def test_accumulation_cannot_be_set_by_hand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(EXP / "mgie_e2e.yaml"), "--trainer.accumulate_grad_batches", "2"])
    assert exit_info.value.code != 0
    assert "accumulate_grad_batches" in capsys.readouterr().err


DIFFS = sorted(
    p
    for folder in (EXP, EXP / "ablations", EXP / "finetune")
    for p in folder.glob("*.yaml")
    if p.read_text().startswith("# base:")
)


@pytest.mark.parametrize("diff", DIFFS, ids=lambda p: str(p.relative_to(EXP)))
def test_every_paper_diff_keeps_a_computed_global_batch(diff):
    cfg = parsed(*layers(diff))
    batch, devices, nodes = (
        cfg.data.init_args.batch_size,
        device_count(cfg.trainer.devices),
        cfg.trainer.num_nodes,
    )
    # a stated global batch: MGIE's 128 (and the fine-tuning diffs'), InstructPix2Pix's 1024,
    # MMIG's 32 (not given by its paper)
    assert cfg.global_batch_size in (32, 128, 1024)
    assert batch * devices * nodes * cfg.trainer.accumulate_grad_batches == cfg.global_batch_size


def test_fit_trains_with_the_computed_accumulation(tiny_dir, synthetic_root, tmp_path):
    """Through the real ``fit``: a global batch of 8 from batches of 4 on one process is two
    batches per optimizer step."""
    args = [
        "fit",
        "-c", str(EXP / "tiny" / "inspix2pix.yaml"),
        "--global_batch_size", "8",
        "--model.init_args.diffusion_path", str(tiny_dir / "instruct-pix2pix"),
        "--data.init_args.root", str(synthetic_root),
        "--data.init_args.num_train", "64",
        "--data.init_args.num_val", "16",
        "--data.init_args.num_test", "16",
        "--data.init_args.batch_size", "4",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.max_steps", "2",
        "--trainer.limit_val_batches", "0",
        "--trainer.enable_checkpointing", "false",
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    cli = EditbenchCLI(args=args)
    assert cli.trainer.accumulate_grad_batches == 2
    assert cli.trainer.global_step == 2
    assert cli.trainer.fit_loop.epoch_loop.batch_progress.total.completed == 4


# ----------------------------------------------------------------- the released settings


@pytest.mark.parametrize("config", sorted(PAPER_BATCH))
def test_paper_configs_carry_the_released_values(config, capsys):
    shown = printed(capsys, "fit", "-c", str(EXP / config))
    model, data = shown["model"]["init_args"], shown["data"]["init_args"]
    # InstructPix2Pix and MGIE sample with Euler ancestral, not the SD folder's PNDM.
    assert model["scheduler"] == "EulerAncestralDiscreteScheduler"
    assert "stable-diffusion-v1-5" in model["diffusion_path"]
    # Training pairs whose instructions name left and right are not flipped.
    assert data["random_flip"] == 0.0
    assert data["resolution"] == 256
    if config == "inspix2pix.yaml":  # configs/train.yaml of the release
        assert model["learning_rate"] == 1e-4 and model["warmup_steps"] == 0
        assert model["weight_decay"] == 1e-2
    else:  # MGIE's release: README training command and demo.ipynb
        assert model["weight_decay"] == 0.0
        assert model["max_new_tokens"] == 96 and model["no_repeat_ngram_size"] == 3
        # release README: --lr_scheduler_type cosine --warmup_ratio 0.03
        assert model["lr_schedule"] == "diffusers.cosine" and model["warmup_ratio"] == 0.03
        assert model["warmup_steps"] == 0
        assert model["mllm_learning_rate"] == 5e-4 and model["learning_rate"] == 1e-4
        # MGIE Appendix, "Training Cost": 26 epochs; the step count is computed, not set
        assert shown["trainer"]["max_epochs"] == 26 and shown["trainer"]["max_steps"] == -1
        # mgie_train.py: the query "what will this image be like if '%s'\n<image>" in LLaVA's
        # vicuna_v1_1 conversation (chat_template null = models/components/mllm.py's default)
        assert model["prompt_template"] == "what will this image be like if '{instruction}'"
        assert model["chat_template"] is None and model["train_targets"] == "data"
        assert (model["hidden_position"], model["new_token_init"]) == ("preceding", "normal")


def test_mgie_class_defaults_are_the_release_values():
    """Without a config, MGIE/LGIE decode and decay as the release does."""
    from models.mgie import LGIE, MGIE

    for cls in (MGIE, LGIE):
        model = cls(mllm_path="unused", diffusion_path="unused")
        assert (model.max_new_tokens, model.no_repeat_ngram_size) == (96, 3)
        assert (
            model.weight_decay == 0.0 and model.scheduler_name == "EulerAncestralDiscreteScheduler"
        )


@pytest.mark.parametrize("name", ["mgie", "lgie"])
def test_no_lins_ablation_is_the_papers(name, capsys):
    """MGIE Table 7 "- L_ins": no instruction loss, no summarised targets (the model derives its
    own guidance) and no cut of that guidance at test time: the release's narration budget of
    1,024 new tokens (process_data.ipynb), not E2E's 96 (demo.ipynb) or a 32-token cut; the tiny
    counterpart the same with 128."""
    for folder, budget, base_budget in ((EXP, 1024, 96), (EXP / "tiny", 128, 24)):
        diff = folder / "ablations" / f"{name}_no_lins.yaml"
        model = printed(capsys, "fit", *layers(diff))["model"]["init_args"]
        assert model["instruction_loss_weight"] == 0.0
        assert model["train_targets"] == "derived"
        assert model["max_new_tokens"] == budget
        assert model["edit_loss_weight"] == 0.5
        base = printed(capsys, "fit", "-c", str(folder / f"{name}_e2e.yaml"))["model"]
        assert base["init_args"]["max_new_tokens"] == base_budget
        assert base["init_args"]["train_targets"] == "data"


@pytest.mark.slow
def test_warmup_ratio_is_a_share_of_the_estimated_steps(tiny_dir, synthetic_root, tmp_path):
    """Through the real ``fit`` on the tiny InsPix2Pix, trained by epochs as the MGIE configs:
    64 samples / batch 4 = 16 steps per epoch, 3 epochs = 48 optimizer steps, and a warm-up
    ratio of 0.03 (the MGIE release's) is ceil(0.03 x 48) = ceil(1.44) = 2 steps, as HF's
    Trainer counts (rounding would give 1)."""
    args = [
        "fit",
        "-c", str(EXP / "tiny" / "inspix2pix.yaml"),
        "--model.init_args.diffusion_path", str(tiny_dir / "instruct-pix2pix"),
        "--model.init_args.warmup_steps", "0",
        "--model.init_args.warmup_ratio", "0.03",
        "--model.init_args.lr_schedule", "cosine",
        "--data.init_args.root", str(synthetic_root),
        "--data.init_args.num_train", "64",
        "--data.init_args.num_val", "16",
        "--data.init_args.num_test", "16",
        "--data.init_args.batch_size", "4",
        "--data.init_args.num_workers", "0",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.max_steps", "-1",
        "--trainer.max_epochs", "3",
        "--trainer.limit_val_batches", "0",
        "--trainer.enable_checkpointing", "false",
        "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks", "[]",
    ]  # fmt: skip
    cli = EditbenchCLI(args=args)
    assert cli.trainer.estimated_stepping_batches == 48
    assert cli.trainer.global_step == 48
    assert cli.model.resolved_warmup_steps == 2 == math.ceil(0.03 * 48)
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    # torch's warm-up (LinearLR over the 2 warm-up steps), then the cosine to zero at step 48
    assert isinstance(scheduler, torch.optim.lr_scheduler.SequentialLR)
    assert scheduler._milestones == [2]
    base = cli.model.learning_rate
    assert scheduler.get_last_lr()[0] == pytest.approx(base * 0.5 * (1 + math.cos(math.pi)), abs=1e-12)


def test_warmup_ratio_errors_name_the_values():
    from models.inspix2pix import InsPix2Pix

    with pytest.raises(ValueError, match="not both"):
        InsPix2Pix("unused", warmup_steps=450, warmup_ratio=0.03)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        InsPix2Pix("unused", warmup_ratio=3.0)
    model = InsPix2Pix("unused", warmup_ratio=0.03)
    with pytest.raises(ValueError, match="max_epochs or max_steps"):
        model.resolve_warmup_steps(float("inf"))


def test_tiny_mgie_configs_switch_off_ngram_blocking(capsys):
    """The synthetic expressive instructions repeat trigrams, so the tiny presets do not block."""
    for name in ("mgie_e2e.yaml", "lgie_e2e.yaml"):
        model = printed(capsys, "fit", "-c", str(EXP / "tiny" / name))["model"]["init_args"]
        assert model["no_repeat_ngram_size"] == 0 and model["weight_decay"] == 0.0
        assert model["scheduler"] == "EulerAncestralDiscreteScheduler"


# ----------------------------------------------------------------- evaluation diffs


@pytest.mark.parametrize("dataset", sorted(EVAL))
@pytest.mark.parametrize("config", sorted(PAPER_BATCH))
def test_eval_diff_scores_any_model_config(config, dataset, capsys):
    """``test -c <model> -c experiments/eval/<dataset>.yaml`` switches data and protocol and
    keeps the model; no global batch, so any device count evaluates."""
    args = [
        "-c", str(EXP / config),
        "-c", str(EXP / "eval" / f"{dataset}.yaml"),
        "--trainer.devices", "3",
    ]  # fmt: skip
    shown = printed(capsys, "test", *args)
    data, model = shown["data"], shown["model"]
    assert data["class_path"] == EVAL[dataset]
    assert data["init_args"]["resolution"] == EVAL_RESOLUTION.get(dataset, 512)
    assert data["init_args"]["expressive_path"] is None
    assert model["init_args"]["protocol"] == EVAL_PROTOCOL[dataset]
    assert shown["global_batch_size"] is None
    base = printed(capsys, "test", "-c", str(EXP / config))["model"]
    assert model["class_path"] == base["class_path"]
    assert model["init_args"]["diffusion_path"] == base["init_args"]["diffusion_path"]
    if dataset == "magicbrush":
        assert data["init_args"]["test_mode"] == "independent"
    # with the links applied (which --print_config skips): no accumulation, no divisibility error
    assert parsed(*args).trainer.accumulate_grad_batches == 1


@pytest.mark.parametrize("dataset", sorted(EVAL))
@pytest.mark.parametrize("config", TINY_MODELS)
def test_tiny_eval_diff_parses_on_tiny_model_configs(config, dataset, capsys):
    args = [
        "-c", str(EXP / "tiny" / config),
        "-c", str(EXP / "tiny" / "eval" / f"{dataset}.yaml"),
        "--data.init_args.root", "/some/where",
    ]  # fmt: skip
    shown = printed(capsys, "test", *args)
    assert shown["data"]["class_path"] == EVAL[dataset]
    assert shown["data"]["init_args"]["root"] == "/some/where"
    assert shown["data"]["init_args"]["resolution"] == 32
    assert shown["model"]["init_args"]["protocol"] == EVAL_PROTOCOL[dataset]


def test_eval_and_tiny_eval_diffs_match():
    """Every paper eval diff has a tiny counterpart switching to the same data class."""
    paper = {p.stem: yaml.safe_load(p.read_text()) for p in (EXP / "eval").glob("*.yaml")}
    tiny = {p.stem: yaml.safe_load(p.read_text()) for p in (EXP / "tiny" / "eval").glob("*.yaml")}
    assert set(paper) == set(tiny) == set(EVAL)
    for name in EVAL:
        assert paper[name]["data"]["class_path"] == tiny[name]["data"]["class_path"] == EVAL[name]
        assert paper[name]["model"] == tiny[name]["model"]


# The tiny eval diffs also run (test and predict, every protocol column) on each dataset's
# native-layout fixture in tests/cli/test_native_layouts.py.
