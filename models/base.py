"""EditModel: what every editing model in the suite shares.

Subclasses build their networks in ``configure_model`` and implement ``training_losses`` and
``edit``; this base turns those into Lightning's training, validation, test and predict steps,
logs every loss term, evaluates the metric collection beside the copy-the-input baseline,
writes ``test_metrics.json`` and keeps only trainable weights in checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import MetricCollection

from metrics import edit_metrics, update_edit_metrics
from metrics.bundle import (
    IMAGE_LIMIT,
    SOURCES,
    TARGETS,
    input_rows,
    save_images,
    write_bundle,
    write_inputs,
)
from metrics.distributed import is_distributed
from metrics.evaluation import EditEvaluator
from metrics.protocols import Protocol, get_protocol
from metrics.results import results_document, write_results
from models.checkpoint import (
    EMA_KEY,
    CheckpointMismatchError,
    EditCheckpoint,
    ema_weights,
    read_checkpoint,
)
from models.diffusion import training_seeds
from models.ema import TrainableEMA
from models.optim import (
    build_lr_scheduler,
    build_optimizer,
    check_schedule_name,
    optimizer_config,
)

# Test results are torchmetrics values, already synced across processes by compute(); Lightning
# would recommend sync_dist for every one of them.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('test/")


@dataclass
class EditOutput:
    """What ``edit`` returns: images in [-1, 1] and, where the model makes them, the
    expressive instructions it derived (MGIE, LGIE; MMIG's target description z_d) and a
    caption of each edited image (MMIG's BLIP-2, Eq. 4)."""

    images: torch.Tensor
    expressive: list[str] | None = None
    caption: list[str] | None = None


def sample_generators(ids: Sequence[str], seed: int) -> list[torch.Generator]:
    """One CPU generator per sample, seeded from its id: an evaluation draws the same noise for
    a sample whatever its batch, its position in it or the number of processes."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(i.encode())) for i in ids]


class EditModel(L.LightningModule):
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

    # ----------------------------------------------------------------- evaluation
    def _eval_kwargs(self, ids: Sequence[str], steps: int | None = None) -> dict:
        return {
            "num_inference_steps": steps or self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "image_guidance_scale": self.image_guidance_scale,
            "generator": sample_generators(ids, self.eval_seed),
        }

    def _val_metrics_for(self, batch: dict) -> MetricCollection:
        names = self.val_metric_names
        if names is None:
            names = ["L1", "L1_edit", "SSIM"] if "mask" in batch else ["L1", "SSIM"]
        return edit_metrics(names).to(self.device)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        bs = len(batch["id"])
        generator = torch.Generator(device="cpu").manual_seed(self.eval_seed + batch_idx)
        with torch.no_grad():
            losses = self.training_losses(batch, generator=generator)
        for name, value in losses.items():
            key = "val/loss" if name == "loss" else f"val/{name}"
            self.log(key, value, prog_bar=name == "loss", batch_size=bs, sync_dist=True)
        if self.val_num_inference_steps > 0 and "target" in batch:
            if self.val_metrics is None:
                self.val_metrics = self._val_metrics_for(batch)
            out = self.edit(
                batch["source"],
                batch["instruction"],
                **self._eval_kwargs(batch["id"], self.val_num_inference_steps),
            )
            update_edit_metrics(self.val_metrics, out.images, batch["target"], batch.get("mask"))

    def on_validation_epoch_end(self) -> None:
        if self.val_metrics is not None:
            values = self.val_metrics.compute()
            self.log_dict({f"val/{k}": v for k, v in values.items()})
            self.val_metrics.reset()

    def evaluation_protocol(self) -> Protocol:
        """The protocol of the test data: ``protocol`` if set, else the DataModule's."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        name = self.protocol_name or getattr(datamodule, "protocol", None) or "generic"
        protocol = get_protocol(name).for_data(datamodule)
        return protocol.with_aggregation(self.aggregation) if self.aggregation else protocol

    def build_evaluator(self) -> EditEvaluator:
        """The test evaluator: the protocol's columns (or ``metrics``) plus ``extra_metrics``."""
        protocol = self.evaluation_protocol()
        names = list(self.metric_names or protocol.columns)
        names += [n for n in self.extra_metrics if n not in names]
        evaluator = EditEvaluator(
            protocol,
            names,
            metric_kwargs=self.metric_kwargs,
            backbones=self.backbones,
            copy_baseline=self.copy_baseline,
        )
        return evaluator.to(self.device)

    def on_test_epoch_start(self) -> None:
        evaluator = self._evaluators["test"] = self.build_evaluator()
        evaluator.record_samples()
        # trainer.log_dir is a collective (a broadcast): read it here, on every process.
        self._bundle_dir = self.trainer.log_dir
        choice = os.environ.get("EDITBENCH_BUNDLE_IMAGES", "").strip()
        images = self.bundle_images if not choice else choice.lower() not in ("0", "false", "no")
        if images is None:
            loaders = self.trainer.test_dataloaders
            loader = loaders[0] if isinstance(loaders, list | tuple) and loaders else loaders
            try:
                size = len(loader.dataset)
            except (AttributeError, TypeError):
                size = 0
            images = 0 < size <= IMAGE_LIMIT
        self._bundle_save_images = bool(images) and self._bundle_dir is not None
        self._bundle_inputs = []

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        if "target" not in batch and self._evaluators["test"].protocol.reference != "source":
            raise ValueError(
                "the test split has no target images and its protocol scores against targets; "
                "use `predict` to only edit, or a protocol with reference 'source'"
            )
        out = self.edit(batch["source"], batch["instruction"], **self._eval_kwargs(batch["id"]))
        self._evaluators["test"].update(batch, out.images)
        if self._bundle_save_images:
            ids = list(batch["id"])
            save_images(self._bundle_dir, ids, out.images)
            save_images(self._bundle_dir, ids, batch["source"], SOURCES)
            if "target" in batch:
                save_images(self._bundle_dir, ids, batch["target"], TARGETS)
            self._bundle_inputs += input_rows(batch, self._evaluators["test"].protocol.name)
        return {"id": list(batch["id"]), "images": out.images, "expressive": out.expressive}

    def on_test_epoch_end(self) -> None:
        evaluator = self._evaluators.pop("test", None)
        if evaluator is None:
            return
        # Every process takes part in every collective here (the metrics' sync with the sample
        # counts, the log dir's broadcast), in the same order. The results document needs
        # none (the counts are those of compute()) and hashes backbone weights, so only rank 0
        # builds, prints and writes it.
        results = evaluator.compute() | self.extra_test_results()
        self.log_dict({k: v for k, v in results.items() if math.isfinite(v)}, sync_dist=False)
        run = self._run_record()
        rows = evaluator.samples()  # a collective: every rank's per-sample rows, deduplicated
        inputs = self._gathered_inputs() if self._bundle_save_images else []
        if self.trainer.is_global_zero:
            document = results_document(
                evaluator,
                results,
                model=self,
                datamodule=getattr(self.trainer, "datamodule", None),
                run=run,
            )
            self._report(document, run["log_dir"])
            if run["log_dir"] is not None:
                if inputs:
                    write_inputs(run["log_dir"], inputs)
                recorded = evaluator.sample_reductions()
                others = [n for n in evaluator.names if n not in recorded]
                write_bundle(run["log_dir"], rows, recorded, others)

    def _gathered_inputs(self) -> list[dict]:
        """Every process's bundle input rows (a collective under DDP: one
        ``all_gather_object``, reached on every rank since all save images or none)."""
        if not is_distributed():
            return list(self._bundle_inputs)
        gathered: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, self._bundle_inputs)
        return [row for rows in gathered for row in rows or []]

    def extra_test_results(self) -> dict[str, float]:
        """Model-specific test results (``test/<name>``) added to the metrics, e.g. MGIE's
        expressive-instruction accuracy; computed on every process (they may sync)."""
        return {}

    def _run_record(self) -> dict:
        trainer = self.trainer
        logger = trainer.logger
        return {
            "name": getattr(logger, "name", None) if logger is not None else None,
            "version": getattr(logger, "version", None) if logger is not None else None,
            "log_dir": trainer.log_dir,
            "ckpt_path": trainer.ckpt_path,
            "seed": self.eval_seed,
            "sampler": self.sampler_record(),
            "precision": str(trainer.precision),
            "world_size": trainer.world_size,
            "ema_weights": self.uses_ema_weights,
        }

    def sampler_record(self) -> dict:
        """How ``test`` sampled, for the results document's ``run.sampler``; models with other
        samplers (a wrapped pipeline) override it."""
        scheduler = getattr(getattr(self, "diffusion", None), "scheduler", None)
        return {
            "scheduler": type(scheduler).__name__ if scheduler is not None else None,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "image_guidance_scale": self.image_guidance_scale,
        }

    def _report(self, document: dict, log_dir: str | None) -> None:
        results = document["metrics"]
        names = sorted({k[len("test/"):] for k in results if not k.startswith("test/copy/")})
        width = max(len(n) for n in names) + 2
        lines = [f"{'metric':<{width}}{'model':>10}{'copy input':>12}"]
        for n in names:
            lines.append(
                f"{n:<{width}}{results.get(f'test/{n}', float('nan')):>10.4f}"
                f"{results.get(f'test/copy/{n}', float('nan')):>12.4f}"
            )
        protocol = document["protocol"]
        lines.append(
            f"protocol {protocol['name']} ({protocol['aggregation']}), "
            f"{protocol['num_samples']} samples"
        )
        print("\n".join(lines), flush=True)
        if log_dir is not None:
            path = write_results(Path(log_dir) / "test_metrics.json", document)
            rank_zero_info(f"wrote {path}")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        out = self.edit(batch["source"], batch["instruction"], **self._eval_kwargs(batch["id"]))
        return {
            "id": list(batch["id"]),
            "instruction": list(batch["instruction"]),
            "expressive": out.expressive,
            "images": out.images.float().clamp(-1, 1).cpu(),
        }

    # ----------------------------------------------------------------- checkpoints
    def on_fit_start(self) -> None:
        if self.init_from is not None and self.trainer.ckpt_path is None:
            self.load_initial_weights(self.init_from)

    def on_train_start(self) -> None:
        """Start the EMA (``ema_decay``) once the weights are final: initialised, or restored on
        resume (which some strategies do after ``on_fit_start``), when it continues from the
        checkpoint's state."""
        self._training_seed = None  # read this run's seed
        resume, self._ema_resume_state = self._ema_resume_state, None
        self._ema = None
        if self.ema_decay is None:
            if resume is not None:
                rank_zero_warn("the checkpoint holds an EMA, but ema_decay is null: none is kept")
            return
        named = [
            (name, param)
            for name, param in self.named_parameters()
            if param.requires_grad and not self._is_frozen_key(name)
        ]
        self._ema = TrainableEMA(named, self.ema_decay)
        if resume is not None:
            self._ema.load_state_dict(resume, source=self.trainer.ckpt_path or "checkpoint")
            rank_zero_info(
                f"EMA resumed at update {self._ema.optimization_step} (decay {self.ema_decay})"
            )
        else:
            rank_zero_info(
                f"EMA of {len(named)} trainable tensors ({self._ema.num_values:,} values), "
                f"decay {self.ema_decay}"
            )

    def load_initial_weights(self, path: str | Path) -> None:
        """Load the trainable weights of checkpoint ``path`` (strictly: every trainable weight
        must be there, nothing unknown may be); its EMA weights when it has them and
        ``prefer_ema_weights``."""
        checkpoint = read_checkpoint(path, what="init_from checkpoint")
        use_ema = self.prefer_ema_weights and checkpoint.has_ema
        state = {"state_dict": checkpoint.weights(ema=use_ema)}
        self.on_load_checkpoint(state)
        self.load_state_dict(state["state_dict"], strict=True)
        kind = " (its EMA weights)" if use_ema else ""
        rank_zero_info(f"initialised {type(self).__name__} from {path}{kind}")

    def load_weights_from(self, checkpoint: EditCheckpoint) -> None:
        """Load a checkpoint read by :func:`models.checkpoint.read_checkpoint` for use outside
        the Trainer (``edit``, ``sweep``): its EMA weights when it has them and
        ``prefer_ema_weights`` (``uses_ema_weights`` says which)."""
        state = {"state_dict": dict(checkpoint.state_dict)}
        if checkpoint.ema is not None:
            state[EMA_KEY] = checkpoint.ema
        self.on_load_checkpoint(state)
        self.load_state_dict(state["state_dict"], strict=True)

    def _is_frozen_key(self, key: str) -> bool:
        return any(key == m or key.startswith(m + ".") for m in self.frozen_modules)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep trainable weights only: frozen pretrained weights are re-read from their paths.
        The EMA, if kept, is saved beside them (:data:`models.checkpoint.EMA_KEY`)."""
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in state.items() if not self._is_frozen_key(k)}
        if self._ema is not None:
            checkpoint[EMA_KEY] = self._ema.state_dict()
        hparams = checkpoint.get("hyper_parameters")
        if hparams is not None and hparams.get("optimizer") is not None:
            checkpoint["hyper_parameters"] = dict(
                hparams, optimizer=optimizer_config(hparams["optimizer"])
            )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Complete a trainable-only checkpoint with the frozen weights already loaded from their
        paths, so loading stays strict: a missing trainable or an unknown weight is an error.

        A checkpoint's EMA: resuming ``fit`` loads the raw weights and hands the EMA state to
        :meth:`on_train_start`; every other load (``test``, ``predict``, ``validate``,
        ``edit``) loads the EMA weights instead of the raw ones when ``prefer_ema_weights``.
        """
        ema = checkpoint.get(EMA_KEY)
        trainer = self._trainer
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            self._ema_resume_state = ema
            self.uses_ema_weights = False
        else:
            self.uses_ema_weights = ema is not None and self.prefer_ema_weights
            if self.uses_ema_weights:
                source = getattr(trainer, "ckpt_path", None) or "checkpoint"
                checkpoint["state_dict"] = ema_weights(checkpoint["state_dict"], ema, source)
        current = self.state_dict()
        expected = {k for k in current if not self._is_frozen_key(k)}
        missing = sorted(expected - set(checkpoint["state_dict"]))
        if missing:
            shown = ", ".join(missing[:5])
            raise CheckpointMismatchError(
                f"checkpoint lacks {len(missing)} trainable weights of {type(self).__name__} "
                f"(e.g. {shown}); was it written by another model or configuration?"
            )
        for key, value in current.items():
            if self._is_frozen_key(key):
                checkpoint["state_dict"].setdefault(key, value)
