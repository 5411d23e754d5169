"""Staged curricula: which modules train and which loss terms are on, stage by stage.

InsightEdit trains in three stages (SmartEdit's: alignment; + LoRA + UNet; + BIM, see
``/work/shared/REFERENCE.md``, "SmartEdit") and MMIG in five (its Section 3.5: MMSM; + LLM;
MMSM + DEM; LLM + MMSM + DEM; end to end). Both are a ``stages:`` list among the model's
constructor arguments, parsed here into :class:`Stage` values; :class:`StagedModel` is the
model-side contract and drives the schedule through Lightning's hooks.

One ``fit`` runs the whole list: at fit start and at every boundary the model applies the stage
(``requires_grad`` per module group, the loss weights) and Lightning rebuilds AdamW over exactly
the parameters that now train (``trainer.strategy.setup_optimizers``), so no state of a
parameter that stopped training survives and new ones start fresh; the learning-rate schedule
(warm-up, cosine) restarts with each stage and spans that stage, as a separate run of it would.
Boundaries are optimizer steps (``trainer.global_step``, so gradient accumulation never splits a
stage) or epochs. A stage can also run as its own ``fit``: a ``stages:`` list holding only that
stage plus ``init_from: <previous stage's checkpoint>``. That works because, with stages, every
module of every declared group is kept in checkpoints (only what no group holds stays frozen and
is re-read from its path), so any stage's checkpoint initialises any other strictly.

This module imports no Lightning: the hooks below reach the trainer only through the model's
``trainer`` attribute.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

#: Checkpoint entry recording the stage a checkpoint was written in.
STAGE_KEY = "stage"

_FIELDS = ("name", "train", "losses", "steps", "epochs", "learning_rate")


class StageError(ValueError):
    """A malformed ``stages:`` list; the message names the stage and the key."""


@dataclass(frozen=True)
class Stage:
    """One stage of a curriculum.

    Attributes:
        name: the stage's name (recorded in checkpoints, shown in logs).
        train: names of the module groups that train (:meth:`StagedModel.stage_groups`);
            every other parameter of the model is frozen.
        losses: loss-term weights; a term not named is off (weight 0).
        steps: length in optimizer steps, or
        epochs: length in epochs (``None`` for both only on the last stage, which runs to the
            end of the fit). A list uses one unit throughout.
        learning_rate: AdamW's learning rate in this stage (SmartEdit: 2e-4 in stage 1, 1e-5
            after); ``None`` keeps the model's ``learning_rate``. Parameter groups that set
            their own ``lr`` keep it.
    """

    name: str
    train: tuple[str, ...]
    losses: dict[str, float] = field(default_factory=dict)
    steps: int | None = None
    epochs: int | None = None
    learning_rate: float | None = None

    @property
    def length(self) -> int | None:
        return self.steps if self.steps is not None else self.epochs

    def to_dict(self) -> dict:
        return {k: (list(v) if k == "train" else v) for k, v in asdict(self).items()}


def _where(index: int, raw: Mapping | Stage) -> str:
    name = raw.name if isinstance(raw, Stage) else raw.get("name")
    return f"stage {name!r} (stages[{index}])" if name else f"stages[{index}]"


def _length(value, key: str, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StageError(f"{where}.{key}: must be a positive integer, got {value!r}")
    return value


def parse_stage(raw: Mapping | Stage, index: int = 0) -> Stage:
    """One stage from a plain dict as YAML gives it (``name``, ``train``, ``losses``, ``steps``
    or ``epochs``, optional ``learning_rate``)."""
    if isinstance(raw, Stage):
        return raw
    where = _where(index, raw) if isinstance(raw, Mapping) else f"stages[{index}]"
    if not isinstance(raw, Mapping):
        raise StageError(f"{where}: must be a mapping with name/train/losses/steps, got {raw!r}")
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise StageError(f"{where}: unknown key {unknown[0]!r}; a stage has {', '.join(_FIELDS)}")
    name = raw.get("name") or f"stage{index + 1}"
    train = raw.get("train") or []
    if isinstance(train, str) or not all(isinstance(g, str) for g in train):
        raise StageError(f"{where}.train: must be a list of group names, got {train!r}")
    losses = raw.get("losses") or {}
    if not isinstance(losses, Mapping):
        raise StageError(f"{where}.losses: must map loss terms to weights, got {losses!r}")
    weights = {}
    for term, weight in losses.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise StageError(f"{where}.losses.{term}: weight must be a number, got {weight!r}")
        weights[str(term)] = float(weight)
    steps = _length(raw.get("steps"), "steps", where)
    epochs = _length(raw.get("epochs"), "epochs", where)
    if steps is not None and epochs is not None:
        raise StageError(f"{where}: give steps or epochs, not both")
    lr = raw.get("learning_rate")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0):
        raise StageError(f"{where}.learning_rate: must be a positive number, got {lr!r}")
    return Stage(
        name=str(name),
        train=tuple(train),
        losses=weights,
        steps=steps,
        epochs=epochs,
        learning_rate=None if lr is None else float(lr),
    )


def parse_stages(
    raw: Sequence[Mapping | Stage] | None,
    groups: Iterable[str] | None = None,
    loss_terms: Iterable[str] | None = None,
) -> list[Stage]:
    """A ``stages:`` list from YAML, validated: every stage but the last has a length, all
    lengths in one unit, names unique; with ``groups``/``loss_terms`` (the model's), every
    group and loss term named must exist. Errors name the stage and the key."""
    if raw is None:
        return []
    if isinstance(raw, (str, Mapping)):
        raise StageError(f"stages: must be a list of stages, got {raw!r}")
    stages = [parse_stage(item, i) for i, item in enumerate(raw)]
    seen: set[str] = set()
    unit = None
    for i, stage in enumerate(stages):
        where = _where(i, stage)
        if stage.name in seen:
            raise StageError(f"{where}.name: {stage.name!r} is used by an earlier stage")
        seen.add(stage.name)
        if stage.length is None and i < len(stages) - 1:
            raise StageError(
                f"{where}: only the last stage may leave out its length; give steps or epochs"
            )
        this = "steps" if stage.steps is not None else "epochs" if stage.epochs else None
        if this and unit and this != unit:
            raise StageError(
                f"{where}.{this}: the stages before give {unit}; use one unit for the whole list"
            )
        unit = unit or this
    if groups is not None or loss_terms is not None:
        validate_stages(stages, groups, loss_terms)
    return stages


def validate_stages(
    stages: Sequence[Stage], groups: Iterable[str] | None, loss_terms: Iterable[str] | None
) -> None:
    """Every group and loss term a stage names is one the model declares."""
    known_groups = None if groups is None else list(groups)
    known_terms = None if loss_terms is None else list(loss_terms)
    for i, stage in enumerate(stages):
        where = _where(i, stage)
        for group in stage.train if known_groups is not None else ():
            if group not in known_groups:
                raise StageError(
                    f"{where}.train: unknown group {group!r}; the model's groups are "
                    f"{', '.join(known_groups)}"
                )
        for term in stage.losses if known_terms is not None else ():
            if term not in known_terms:
                raise StageError(
                    f"{where}.losses: unknown loss term {term!r}; the model's terms are "
                    f"{', '.join(known_terms)}"
                )


def stage_at(stages: Sequence[Stage], global_step: int, epoch: int) -> int:
    """Index of the stage that optimizer step ``global_step`` (the number of steps done) of
    epoch ``epoch`` belongs to: stage i covers the steps (or epochs) from the sum of the
    lengths before it; past the last boundary, the last stage."""
    if not stages:
        raise StageError("stages: the list is empty")
    position = epoch if any(s.epochs is not None for s in stages) else global_step
    end = 0
    for i, stage in enumerate(stages[:-1]):
        end += stage.length
        if position < end:
            return i
    return len(stages) - 1


def stage_start(stages: Sequence[Stage], index: int) -> int:
    """Where stage ``index`` starts, in the list's unit (steps or epochs)."""
    return sum(s.length for s in stages[:index])


class StagedModel:
    """Mixin of an :class:`~models.base.EditModel` trained in stages (put it first among the
    bases: ``class InsightEdit(StagedModel, EditModel)``).

    A model declares :meth:`stage_groups` and :meth:`loss_terms`, and weights its loss terms
    with :attr:`loss_weights` (or :meth:`weighted_loss`) in ``training_losses``.

    Args:
        stages: the curriculum, a list of dicts as :class:`Stage` describes (``None`` or empty:
            no stages; the model's own ``requires_grad`` and every loss weight 1). Not with
            ``ema_decay``: an average over a trainable set that changes is not kept.
        **kwargs: the other model arguments.
    """

    def __init__(self, *args, stages: list[dict] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stages: list[Stage] = parse_stages(stages)
        if self.stages and getattr(self, "ema_decay", None) is not None:
            raise StageError("stages: not with ema_decay (the trainable set changes by stage)")
        #: Index of the stage applied (``None`` before the first).
        self.stage_index: int | None = None
        #: Loss-term weights of the current stage (empty without stages: every weight 1).
        self.loss_weights: dict[str, float] = {}
        self._resume_stage: int | None = None
        self._group_prefixes: tuple[str, ...] | None = None

    # ------------------------------------------------------------------ to declare
    def stage_groups(self) -> dict[str, list[nn.Module]]:
        """Group name → the modules it trains (built modules only)."""
        raise NotImplementedError(f"{type(self).__name__} declares no stage groups")

    def loss_terms(self) -> tuple[str, ...]:
        """Names of the loss terms the stages weight (keys of ``training_losses``)."""
        raise NotImplementedError(f"{type(self).__name__} declares no loss terms")

    # ------------------------------------------------------------------ applying
    @property
    def stage(self) -> Stage | None:
        return None if self.stage_index is None else self.stages[self.stage_index]

    def loss_weight(self, term: str) -> float:
        """The weight of ``term`` now: the stage's (0 if it does not name it), 1 without
        stages."""
        if self.stage_index is None:
            return 1.0
        return self.loss_weights.get(term, 0.0)

    def weighted_loss(self, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``sum(w_t * term_t)`` over the terms that are on; a term that is off is left out
        entirely (not even multiplied by 0, so it adds no graph and no NaN)."""
        total = None
        for name, value in terms.items():
            weight = self.loss_weight(name)
            if weight:
                total = weight * value if total is None else total + weight * value
        if total is None:
            raise StageError(
                f"stage {getattr(self.stage, 'name', None)!r}: no loss term is on "
                f"(terms {', '.join(terms)})"
            )
        return total

    def apply_stage(self, stage: Stage) -> None:
        """Freeze every parameter, then unfreeze the modules of the stage's groups; set
        :attr:`loss_weights`."""
        groups = self.stage_groups()
        validate_stages([stage], groups, self.loss_terms())
        self.requires_grad_(False)
        for name in stage.train:
            for module in groups[name]:
                module.requires_grad_(True)
        self.loss_weights = {t: float(stage.losses.get(t, 0.0)) for t in self.loss_terms()}
        self._group_prefixes = self._prefixes(groups)

    def enter_stage(self, index: int) -> None:
        """Apply stage ``index`` (validating the whole list against the model the first time)."""
        if self.stage_index is None:
            validate_stages(self.stages, self.stage_groups(), self.loss_terms())
        self.apply_stage(self.stages[index])
        self.stage_index = index
        if getattr(self, "training", False):
            self.train(True)  # the model's own mode rules (frozen parts in eval) for the new set

    def _prefixes(self, groups: Mapping[str, list[nn.Module]]) -> tuple[str, ...]:
        members = {id(m) for modules in groups.values() for m in modules}
        return tuple(n for n, m in self.named_modules() if id(m) in members)

    def _is_frozen_key(self, key: str) -> bool:
        """With stages, a frozen prefix does not cover a module of any declared group: those
        are saved in every checkpoint of every stage."""
        if not super()._is_frozen_key(key):
            return False
        if not self.stages:
            return True
        prefixes = self._group_prefixes
        if prefixes is None:  # not cached before the modules are built
            prefixes = self._prefixes(self.stage_groups())
        return not any(key == p or key.startswith(p + ".") for p in prefixes)

    # ------------------------------------------------------------------ Lightning hooks
    def _current_stage(self) -> int:
        trainer = self.trainer
        return stage_at(self.stages, trainer.global_step, trainer.current_epoch)

    def configure_optimizers(self):
        """AdamW and its schedule over the current stage's trainable parameters: at fit start
        the stage of the trainer's counters, on resume the stage the checkpoint was written in
        (restored before its optimizer state is loaded)."""
        if not self.stages:
            return super().configure_optimizers()
        index, self._resume_stage = (
            self._resume_stage if self._resume_stage is not None else self._current_stage(),
            None,
        )
        self.enter_stage(index)
        lr, stage = self.learning_rate, self.stages[index]
        if stage.learning_rate is not None:
            self.learning_rate = stage.learning_rate
        try:
            return super().configure_optimizers()
        finally:
            self.learning_rate = lr

    def schedule_length(self) -> float:
        """Optimizer steps of the current stage (the learning-rate schedule spans it)."""
        total = super().schedule_length()
        if not self.stages or self.stage_index is None:
            return total
        stage, trainer = self.stages[self.stage_index], self.trainer
        per_epoch = 1
        if any(s.epochs is not None for s in self.stages):
            batches = trainer.num_training_batches
            accumulate = max(1, int(trainer.accumulate_grad_batches or 1))
            per_epoch = -(-batches // accumulate) if batches != float("inf") else float("inf")
        if stage.length is not None:
            return stage.length * per_epoch
        return max(0, total - stage_start(self.stages, self.stage_index) * per_epoch)

    def on_train_batch_start(self, batch, batch_idx: int):
        """At a boundary (the first micro-batch of the stage's first optimizer step) apply the
        next stage and rebuild the optimizers and schedulers; log ``train/stage``."""
        result = super().on_train_batch_start(batch, batch_idx)
        if self.stages:
            index = self._current_stage()
            if index != self.stage_index:
                strategy = self.trainer.strategy
                if "DeepSpeed" in type(strategy).__name__:  # its engine owns the optimizer
                    raise StageError(
                        f"stage {self.stages[index].name!r}: DeepSpeed cannot rebuild its "
                        f"optimizer within a fit; run each stage as its own fit (init_from)"
                    )
                strategy.setup_optimizers(self.trainer)  # calls configure_optimizers
            self.log("train/stage", float(self.stage_index), on_step=True, batch_size=1)
        return result

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Trainable weights (every declared group with stages) and the stage record."""
        if self.stages:
            self._group_prefixes = self._prefixes(self.stage_groups())
        super().on_save_checkpoint(checkpoint)
        if self.stages and self.stage_index is not None:
            checkpoint[STAGE_KEY] = {
                "index": self.stage_index,
                "name": self.stages[self.stage_index].name,
                "stages": [s.to_dict() for s in self.stages],
            }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resuming ``fit``: take the stage the checkpoint was written in (its optimizer state
        holds that stage's parameters). Lightning restores the model before it calls
        ``configure_optimizers``; with a strategy that restores afterwards, rebuild here."""
        record = checkpoint.get(STAGE_KEY)
        trainer = self._trainer
        fitting = trainer is not None and getattr(trainer.state.fn, "value", None) == "fit"
        if record is not None and fitting and self.stages:
            index, name = int(record["index"]), record.get("name")
            if index >= len(self.stages) or self.stages[index].name != name:
                names = [s.name for s in self.stages]
                raise StageError(
                    f"the checkpoint was written in stage {name!r} (index {index}), but this "
                    f"run's stages are {names}: resume with the same stages: list, or start the "
                    f"next stage as its own fit with init_from"
                )
            if self.stage_index is None:
                self._resume_stage = index
            elif self.stage_index != index:
                self._resume_stage = index
                trainer.strategy.setup_optimizers(trainer)
        if self.stages:
            self._group_prefixes = self._prefixes(self.stage_groups())
        super().on_load_checkpoint(checkpoint)
