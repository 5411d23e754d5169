"""Optimizers and schedules from config (issue 16 item 3): library schedulers reproduce the
suite's schedule formula and Hugging Face's, the optimizer callable keeps per-group rates, and
``bitsandbytes.optim.AdamW8bit`` trains through ``python -m editbench fit`` on CPU."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.optimization import (
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from models.optim import build_lr_scheduler, build_optimizer, check_schedule_name, optimizer_config


def suite_factor(step: int, warmup: int, total: float, cosine: bool) -> float:
    """The schedule the suite ran before it used torch's schedulers, written out: a warm-up of
    (step + 1) / warmup, then constant or a half cosine to zero at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if cosine and math.isfinite(total) and total > warmup:
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))
    return 1.0


def lrs(scheduler, optimizer, steps: int) -> list[list[float]]:
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return out


def two_groups():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    return [{"params": [a], "lr": 5e-4, "name": "mllm"}, {"params": [b], "name": "diffusion"}]


@pytest.mark.parametrize("name", ["cosine", "constant"])
@pytest.mark.parametrize(("warmup", "total"), [(0, 30), (1, 30), (5, 30), (5, math.inf), (7, 7)])
def test_torch_schedules_are_the_suite_formula(name, warmup, total):
    optimizer = build_optimizer(two_groups(), learning_rate=1e-4)
    scheduler = build_lr_scheduler(optimizer, name, warmup, total)
    got = lrs(scheduler, optimizer, 30)
    for step, (mllm, diffusion) in enumerate(got):
        factor = suite_factor(step, warmup, total, name == "cosine")
        assert mllm == pytest.approx(5e-4 * factor, rel=1e-6, abs=1e-15), step
        assert diffusion == pytest.approx(1e-4 * factor, rel=1e-6, abs=1e-15), step


@pytest.mark.parametrize(
    ("name", "reference"),
    [("diffusers.cosine", get_cosine_schedule_with_warmup), ("diffusers.linear", get_linear_schedule_with_warmup)],
)
def test_diffusers_schedules_are_the_hf_trainers(name, reference):
    """``diffusers.<name>`` is what transformers' Trainer runs for ``--lr_scheduler_type``
    (MGIE's release): the same learning rates, step for step."""
    ours = build_optimizer(two_groups(), learning_rate=1e-4)
    theirs = build_optimizer(two_groups(), learning_rate=1e-4)
    got = lrs(build_lr_scheduler(ours, name, 3, 20), ours, 20)
    want = lrs(reference(theirs, num_warmup_steps=3, num_training_steps=20), theirs, 20)
    flat = [lr for step in got for lr in step]
    assert flat == pytest.approx([lr for step in want for lr in step], rel=1e-12, abs=1e-15)
    assert got[0] == [0.0, 0.0]  # Hugging Face's warm-up starts at 0, the suite's at lr/warmup


def test_schedule_names_are_checked():
    assert check_schedule_name("diffusers.cosine_with_restarts")
    with pytest.raises(ValueError, match="'cosin' is not one of"):
        check_schedule_name("cosin")
    optimizer = build_optimizer(two_groups(), learning_rate=1e-4)
    with pytest.raises(ValueError, match="finite run length"):
        build_lr_scheduler(optimizer, "diffusers.cosine", 3, math.inf)


def test_an_optimizer_callable_keeps_each_groups_rate():
    """MGIE's two groups keep their rates under any optimizer; the callable's own lr (every
    LightningCLI callable carries one) is overridden by the model's."""
    import functools

    sgd = functools.partial(torch.optim.SGD, lr=123.0, momentum=0.9)
    optimizer = build_optimizer(two_groups(), learning_rate=1e-4, optimizer=sgd)
    assert isinstance(optimizer, torch.optim.SGD)
    assert [g["lr"] for g in optimizer.param_groups] == [5e-4, 1e-4]
    assert [g["momentum"] for g in optimizer.param_groups] == [0.9, 0.9]
    assert optimizer_config(sgd) == {
        "class_path": "torch.optim.sgd.SGD",
        "init_args": {"lr": 123.0, "momentum": 0.9},
    }
    default = build_optimizer(two_groups(), 1e-4, betas=(0.5, 0.6), weight_decay=0.25)
    assert isinstance(default, torch.optim.AdamW)
    assert default.param_groups[1]["betas"] == (0.5, 0.6)
    assert default.param_groups[1]["weight_decay"] == 0.25


@pytest.mark.slow
def test_adamw8bit_from_the_config_trains_and_resumes(tiny_dir, synthetic_root, tmp_path):
    """``--model.init_args.optimizer.class_path bitsandbytes.optim.AdamW8bit`` through ``fit``:
    the 8-bit state is what the checkpoint holds, the checkpoint loads with
    ``weights_only=True`` (no pickled callable in its hyperparameters), and ``--ckpt_path``
    resumes with it (LightningCLI parses the saved optimizer back)."""
    pytest.importorskip("bitsandbytes")
    from cli.test_checkpoint_cli import quickstart_args

    from editbench.cli import main

    args = quickstart_args(tiny_dir, synthetic_root, tmp_path)
    common = [
        *args,
        "--model.init_args.optimizer.class_path", "bitsandbytes.optim.AdamW8bit",
        "--model.init_args.optimizer.init_args.betas", "[0.9, 0.95]",
        "--model.init_args.optimizer.init_args.min_8bit_size", "1024",
    ]  # fmt: skip
    assert main(["fit", *common, "--trainer.max_steps", "2"]) == 0
    last = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["optimizer"]["class_path"].endswith("AdamW8bit")
    [state] = checkpoint["optimizer_states"]
    # bitsandbytes keeps its quantised moments under its own key in the state dict
    quantised = [s.get("__bnb_optimizer_quant_state__", s) for s in state["state"].values()]
    dtypes = {q["state1"].dtype for q in quantised if "state1" in q}
    assert torch.uint8 in dtypes  # 8-bit moments for the large tensors
    assert state["param_groups"][0]["betas"] == (0.9, 0.95)
    assert main(["fit", *common, "--trainer.max_steps", "4", "--ckpt_path", str(last)]) == 0
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 4
    steps = {int(s["step"]) for s in resumed["optimizer_states"][0]["state"].values()}
    assert steps == {4}  # the optimizer state went on from step 2, not from a fresh one
