"""EditModel: what every editing model in the suite shares.

Subclasses build their networks in ``configure_model`` and implement ``training_losses`` and
``edit``; this base turns those into Lightning's training, validation, test and predict steps,
logs every loss term, evaluates the metric collection beside the copy-the-input baseline,
writes ``test_metrics.json`` and keeps only trainable weights in checkpoints. The evaluation
hooks live in :mod:`models.base_evaluation`, the checkpoint and EMA hooks in
:mod:`models.base_checkpointing` (mixins of :class:`EditModel`).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torchmetrics import MetricCollection

from metrics.evaluation import EditEvaluator
from models.base_checkpointing import CheckpointingMixin
from models.base_evaluation import EvaluationMixin, sample_generators
from models.checkpoint import CheckpointMismatchError
from models.diffusion import training_seeds
from models.ema import TrainableEMA
from models.optim import build_lr_scheduler, build_optimizer, check_schedule_name

#: Names other modules import from here (sample_generators and CheckpointMismatchError are
#: defined in models.base_evaluation and models.checkpoint).
__all__ = ["CheckpointMismatchError", "EditModel", "EditOutput", "sample_generators"]


@dataclass
class EditOutput:
    """What ``edit`` returns: images in [-1, 1] and, where the model makes them, the
    expressive instructions it derived (MGIE, LGIE; MMIG's target description z_d) and a
    caption of each edited image (MMIG's BLIP-2, Eq. 4)."""

    images: torch.Tensor
    expressive: list[str] | None = None
    caption: list[str] | None = None


class EditModel(EvaluationMixin, CheckpointingMixin, L.LightningModule):
    """Base LightningModule of the editing models.

    Args:
        learning_rate: the learning rate (of the diffusion side; models with several
            parameter groups add their own rates; a stage may set its own).
        optimizer: the optimizer class and its arguments from the config (LightningCLI's
            ``OptimizerCallable``, e.g. ``class_path: bitsandbytes.optim.AdamW8bit``), applied
            to the model's parameter groups, each at its own or ``learning_rate`` (an ``lr``
            among its arguments is overridden); ``None``: AdamW with ``adam_betas`` and
            ``weight_decay`` (:mod:`models.optim`).
        weight_decay: AdamW weight decay (the default optimizer's).
        adam_betas: AdamW betas (the default optimizer's).
        warmup_steps: linear warm-up steps of the learning rate.
        warmup_ratio: the warm-up as a share of the run's optimizer steps instead
            (``trainer.estimated_stepping_batches``, which follows ``max_epochs``/``max_steps``,
            the data and the accumulation): ``ceil(ratio x total)`` steps, as Hugging Face's
            ``TrainingArguments.get_warmup_steps`` (the MGIE release's ``--warmup_ratio 0.03``).
            Not with ``warmup_steps``.
        lr_schedule: ``constant`` or ``cosine`` (to zero at the end of training) after a
            linear warm-up from ``1/warmup`` (torch's schedulers), or ``diffusers.<name>``, any
            schedule of ``diffusers.optimization.get_scheduler`` (Hugging Face's, as
            ``transformers.Trainer``'s ``--lr_scheduler_type``: warm-up from 0); see
            :mod:`models.optim`.
        num_inference_steps: sampler steps in test and predict.
        guidance_scale: αX, the text guidance scale.
        image_guidance_scale: αV, the image guidance scale.
        eval_seed: seed of the per-sample noise in validation, test and predict.
        val_num_inference_steps: sampler steps for the edits sampled during validation
            (0 computes only the validation loss).
        metrics: test metric names; ``None`` takes the columns of the data's evaluation
            protocol (:mod:`metrics.protocols`: MGIE's per-dataset columns).
        extra_metrics: metrics added to the protocol's (e.g. ``FID``, ``KID``, ``VIEScore``).
        metric_kwargs: constructor arguments per metric name.
        backbones: backbone folders/files by kind (``clip``, ``dino``, ``lpips``,
            ``inception``), shared by the metrics that use them and never saved in
            checkpoints; default: the protocol's folders under ``$EDITBENCH_BACKBONES``
            (``clip-vit-base-patch32`` and ``dino-vits16``, MagicBrush's; ``ipr2pr``:
            ``clip-vit-large-patch14``, InstructPix2Pix's) and the torch hub cache.
        protocol: evaluation protocol name overriding the DataModule's (``None``: the data's).
        aggregation: the MagicBrush turn aggregation of ``test/<metric>`` and the table
            (``all``, ``final`` or ``turn1``); ``None``: the setting of the data's test mode
            (independent: MagicBrush's single-turn = ``all``; iterative: multi-turn =
            ``final``).
        copy_baseline: also score the copy-the-input baseline (``test/copy/*``).
        val_metrics: metrics of the edits sampled in validation (``None``: ``L1``, ``SSIM`` and,
            with edit masks, ``L1_edit``).
        check_finite: stop with an error naming the loss term and samples when a loss is not
            finite, instead of training on NaNs.
        init_from: a checkpoint of this model whose trainable weights initialise ``fit``
            (fine-tuning, e.g. MGIE Table 2: IPr2Pr pre-training, then each dataset). Unlike
            ``--ckpt_path`` it restores no optimizer state, step or epoch; a resumed run
            (``--ckpt_path``) ignores it.
        ema_decay: keep an exponential moving average of the trainable weights with this
            maximal decay (diffusers' ``EMAModel`` schedule, :mod:`models.ema`), updated after
            every optimizer step and saved in checkpoints; ``None`` (default) keeps none.
            InstructPix2Pix trained with one at 0.9999 (``models.ema.PAPER_DECAY``).
        prefer_ema_weights: when a checkpoint holds EMA weights, ``test``, ``predict``,
            ``validate``, ``edit`` and ``init_from`` use them (False: the raw trained weights);
            ``uses_ema_weights`` tells which were loaded.
        bundle_images: write the edited images into ``test``'s result bundle
            (``images/<id>.png``, :mod:`metrics.bundle`): True, False, or None for "when the
            split has at most ``metrics.bundle.IMAGE_LIMIT`` (500) samples"; the environment
            variable ``EDITBENCH_BUNDLE_IMAGES`` (1/0) overrides it.
    """

    #: Prefixes of submodules whose weights are frozen, re-read from their paths on load and
    #: left out of checkpoints.
    frozen_modules: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        learning_rate: float = 1e-4,
        optimizer: OptimizerCallable | None = None,
        weight_decay: float = 1e-2,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        warmup_ratio: float | None = None,
        lr_schedule: str = "constant",
        num_inference_steps: int = 100,
        guidance_scale: float = 7.5,
        image_guidance_scale: float = 1.5,
        eval_seed: int = 0,
        val_num_inference_steps: int = 0,
        metrics: list[str] | None = None,
        extra_metrics: list[str] | None = None,
        metric_kwargs: dict[str, dict] | None = None,
        backbones: dict[str, str] | None = None,
        protocol: str | None = None,
        aggregation: str | None = None,
        copy_baseline: bool = True,
        val_metrics: list[str] | None = None,
        check_finite: bool = True,
        init_from: str | None = None,
        ema_decay: float | None = None,
        prefer_ema_weights: bool = True,
        bundle_images: bool | None = None,
    ) -> None:
        super().__init__()
        check_schedule_name(lr_schedule)
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or null, got {ema_decay}")
        self.learning_rate = learning_rate
        self.optimizer_factory = optimizer
        self.weight_decay = weight_decay
        self.adam_betas = tuple(adam_betas)
        if warmup_ratio is not None:
            if not 0.0 <= warmup_ratio < 1.0:
                raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
            if warmup_steps:
                raise ValueError(
                    f"give warmup_steps ({warmup_steps}) or warmup_ratio ({warmup_ratio}), not both"
                )
        self.warmup_steps = warmup_steps
        self.warmup_ratio = warmup_ratio
        self.lr_schedule = lr_schedule
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.image_guidance_scale = image_guidance_scale
        self.eval_seed = eval_seed
        self.val_num_inference_steps = val_num_inference_steps
        self.metric_names = list(metrics) if metrics is not None else None
        self.extra_metrics = list(extra_metrics or [])
        self.metric_kwargs = dict(metric_kwargs or {})
        self.backbones = dict(backbones or {})
        self.protocol_name = protocol
        self.aggregation = aggregation
        self.copy_baseline = copy_baseline
        self.val_metric_names = list(val_metrics) if val_metrics is not None else None
        self.check_finite = check_finite
        self.init_from = init_from
        self.ema_decay = ema_decay
        self.prefer_ema_weights = prefer_ema_weights
        self.bundle_images = bundle_images
        # set per test run by on_test_epoch_start
        self._bundle_dir: str | None = None
        self._bundle_save_images = False
        self._bundle_inputs: list[dict] = []
        #: Whether the weights loaded from a checkpoint for evaluation are its EMA weights.
        self.uses_ema_weights = False
        self._ema: TrainableEMA | None = None
        self._ema_resume_state: dict | None = None
        self._training_seed: int | None = None
        self.val_metrics: MetricCollection | None = None
        # Plain attributes, not submodules: metric backbones never enter the state dict.
        self._evaluators: dict[str, EditEvaluator] = {}

    # ----------------------------------------------------------------- to implement
    def training_losses(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        """Loss terms of a batch; must contain ``loss`` (the total the optimizer sees)."""
        raise NotImplementedError

    def edit(
        self,
        source: torch.Tensor,
        instructions: Sequence[str],
        *,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> EditOutput:
        """Edit ``source`` images ([-1, 1]) following ``instructions``."""
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups; by default one group of every trainable parameter."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    # ----------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        if not batch["id"]:  # every sample of the batch was skipped (on_bad_sample: skip)
            return None
        generator, global_seed = self.training_generator(batch_idx)
        with self._seeded_global_rng(global_seed):
            losses = self.training_losses(batch, generator=generator)
        self._check_finite(losses, batch)
        bs = len(batch["id"])
        for name, value in losses.items():
            key = "train/loss" if name == "loss" else f"train/{name}"
            self.log(key, value, prog_bar=name == "loss", batch_size=bs)
        if batch.get("skipped_ids"):
            self.log(
                "train/skipped_samples",
                float(len(batch["skipped_ids"])),
                reduce_fx="sum",
                on_step=True,
                on_epoch=True,
                batch_size=bs,
            )
        return losses["loss"]

    @property
    def training_seed(self) -> int:
        """The run's seed: the one ``seed_everything`` set (LightningCLI's ``seed_everything``,
        exported as ``PL_GLOBAL_SEED``), else 0 (as the DataModules' training sampler)."""
        if self._training_seed is None:
            self._training_seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        return self._training_seed

    def training_generator(self, batch_idx: int) -> tuple[torch.Generator, int]:
        """The random source of one training micro-batch: a generator on the model's device and
        a seed for torch's global generator, both derived from (run seed, global rank, global
        step, micro-batch within the step) by :func:`models.diffusion.training_seeds`. Ranks
        draw differently; a resumed run draws what the uninterrupted one would."""
        trainer = self._trainer
        accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1) if trainer else 1
        seeds = training_seeds(
            self.training_seed, self.global_rank, self.global_step, batch_idx % accumulate
        )
        return torch.Generator(device=self.device).manual_seed(seeds[0]), seeds[1]

    @contextlib.contextmanager
    def _seeded_global_rng(self, seed: int):
        """Torch's global generators (CPU and this process's GPU) seeded with ``seed`` for the
        step and restored afterwards: module dropout and other global draws are per rank and
        step too, and the data pipeline's draws are left untouched."""
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.random.default_generator.manual_seed(seed)
            for index in cuda:
                torch.cuda.default_generators[index].manual_seed(seed)
            yield

    def optimizer_step(self, *args, **kwargs) -> None:
        """Lightning's step, then the EMA update (before any callback sees the step, so a
        checkpoint written at this step holds the average of this step's weights)."""
        super().optimizer_step(*args, **kwargs)
        if self._ema is not None:
            self._ema.step()

    def _check_finite(self, losses: dict, batch: dict) -> None:
        if not self.check_finite:
            return
        for name, value in losses.items():
            if not torch.isfinite(value).all():
                ids = ", ".join(batch["id"][:8])
                raise FloatingPointError(
                    f"non-finite {name} ({value.item()}) at global step {self.global_step} on the "
                    f"batch with ids [{ids}{', ...' if len(batch['id']) > 8 else ''}]; lower the "
                    f"learning rate, check the data, or set model.init_args.check_finite=false"
                )

    def configure_optimizers(self):
        groups = [g for g in self.param_groups() if g["params"]]
        if not groups:
            raise ValueError(f"{type(self).__name__} has no trainable parameters")
        optimizer = build_optimizer(
            groups,
            self.learning_rate,
            self.optimizer_factory,
            betas=self.adam_betas,
            weight_decay=self.weight_decay,
        )
        total = self.schedule_length()
        scheduler = build_lr_scheduler(
            optimizer, self.lr_schedule, self.resolve_warmup_steps(total), total
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def schedule_length(self) -> float:
        """Optimizer steps the learning-rate schedule spans: the run's
        (``trainer.estimated_stepping_batches``); a staged model's, its stage's."""
        return self.trainer.estimated_stepping_batches if self._trainer is not None else 0

    def resolve_warmup_steps(self, total: float) -> int:
        """``warmup_steps``, or ``ceil(warmup_ratio x total)`` for a run of ``total`` optimizer
        steps (Hugging Face ``TrainingArguments.get_warmup_steps``); kept in
        ``self.resolved_warmup_steps``."""
        warmup = self.warmup_steps
        if self.warmup_ratio is not None:
            if not math.isfinite(total) or total <= 0:
                raise ValueError(
                    f"warmup_ratio {self.warmup_ratio} needs a finite run length, but the trainer "
                    f"estimates {total} optimizer steps: set trainer.max_epochs or max_steps"
                )
            warmup = math.ceil(total * self.warmup_ratio)
        self.resolved_warmup_steps = warmup
        return warmup
