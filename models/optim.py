"""Optimizer and learning-rate schedule of a training run, from config.

The optimizer is a callable from the config (LightningCLI's ``OptimizerCallable``: any
``torch.optim`` class, ``bitsandbytes.optim.AdamW8bit``, ...) applied to the model's parameter
groups; ``None`` is AdamW with the model's ``adam_betas`` and ``weight_decay``. Every group gets
an explicit ``lr`` (its own, e.g. MGIE's MLLM group, else the model's ``learning_rate``), so a
stage's learning rate and per-group rates work with any optimizer; an ``lr`` among the callable's
own arguments is overridden.

Schedules are library schedulers, stepped once per optimizer step:

* ``constant`` / ``cosine``: torch's ``LinearLR`` warm-up from ``1/warmup`` (the first step
  already trains at ``lr/warmup``), then ``ConstantLR(factor=1)`` or ``CosineAnnealingLR`` to
  zero at the end of the run, chained by ``SequentialLR``;
* ``diffusers.<name>``: ``diffusers.optimization.get_scheduler(<name>, ...)`` with any of its
  ``SchedulerType`` names (``cosine``, ``linear``, ``constant_with_warmup``,
  ``cosine_with_restarts``, ``polynomial``). These are Hugging Face's schedules, the ones
  ``transformers.Trainer`` runs for ``--lr_scheduler_type`` (MGIE's and SmartEdit's releases):
  their warm-up starts at 0 (``step / warmup``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence

import torch
from diffusers.optimization import SchedulerType, get_scheduler

DIFFUSERS_PREFIX = "diffusers."
SUITE_SCHEDULES = ("constant", "cosine")

OptimizerFactory = Callable[[Iterable], torch.optim.Optimizer]


def check_schedule_name(name: str) -> str:
    """``name`` if it is a schedule :func:`build_lr_scheduler` knows, else a ValueError listing
    the valid names."""
    diffusers_names = [DIFFUSERS_PREFIX + t.value for t in SchedulerType]
    if name in SUITE_SCHEDULES or name in diffusers_names:
        return name
    raise ValueError(
        f"lr_schedule {name!r} is not one of {list(SUITE_SCHEDULES) + diffusers_names}"
    )


def build_optimizer(
    groups: Sequence[dict],
    learning_rate: float,
    optimizer: OptimizerFactory | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """The optimizer over ``groups``, each with an explicit ``lr`` (its own or
    ``learning_rate``); ``optimizer=None`` is ``torch.optim.AdamW(betas, weight_decay)``."""
    groups = [dict(g, lr=g.get("lr", learning_rate)) for g in groups]
    if optimizer is None:
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, weight_decay=weight_decay)
    built = optimizer(groups)
    if not isinstance(built, torch.optim.Optimizer):
        raise TypeError(f"the optimizer callable returned {type(built).__name__}, not an Optimizer")
    return built


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, name: str, warmup: int, total: float
) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule ``name`` over a run of ``total`` optimizer steps (``inf`` when unbounded)
    with ``warmup`` warm-up steps; see the module docstring for the names."""
    check_schedule_name(name)
    if name.startswith(DIFFUSERS_PREFIX):
        needs_total = name != DIFFUSERS_PREFIX + "constant_with_warmup"
        if needs_total and not math.isfinite(total):
            raise ValueError(
                f"lr_schedule {name!r} needs a finite run length: set trainer.max_steps or "
                "max_epochs"
            )
        return get_scheduler(
            name[len(DIFFUSERS_PREFIX):],
            optimizer,
            num_warmup_steps=warmup,
            num_training_steps=int(total) if math.isfinite(total) else None,
        )
    sched = torch.optim.lr_scheduler
    if name == "cosine" and math.isfinite(total) and total > warmup:
        after = sched.CosineAnnealingLR(optimizer, T_max=int(total) - warmup, eta_min=0.0)
    else:  # constant, or a cosine over a run of unknown length (as constant)
        after = sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup <= 0:
        return after
    ramp = sched.LinearLR(
        optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=max(warmup - 1, 0)
    )
    return sched.SequentialLR(optimizer, [ramp, after], milestones=[warmup])


def optimizer_config(factory: OptimizerFactory | None) -> dict | None:
    """The config (``class_path``/``init_args``) of a LightningCLI optimizer callable, for
    checkpoint hyperparameters: a checkpoint holds no pickled callables, so it loads with
    ``weights_only=True`` and LightningCLI can parse it back as the same callable."""
    if factory is None or isinstance(factory, dict):
        return factory
    if isinstance(factory, type):
        cls, kwargs = factory, {}
    elif isinstance(factory, functools.partial):
        classes = [a for a in (factory.func, *factory.args) if isinstance(a, type)]
        if not classes:
            raise TypeError(f"cannot describe the optimizer callable {factory!r}")
        cls, kwargs = classes[-1], dict(factory.keywords)
    else:
        raise TypeError(f"cannot describe the optimizer callable {factory!r}")
    init_args = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}
