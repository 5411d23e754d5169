"""EditModel: what every editing model in the suite shares.

Subclasses build their networks in ``configure_model`` and implement ``training_losses`` and
``edit``; this base turns those into Lightning's training, validation, test and predict steps,
logs every loss term, evaluates the metric collection beside the copy-the-input baseline,
writes ``test_metrics.json`` and keeps only trainable weights in checkpoints.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MetricCollection

from metrics import edit_metrics, update_edit_metrics
from metrics.evaluation import EditEvaluator
from metrics.protocols import Protocol, get_protocol
from metrics.results import results_document, write_results


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not hold this model's trainable weights."""


@dataclass
class EditOutput:
    """What ``edit`` returns: images in [-1, 1] and, where the model makes them, the
    expressive instructions it derived (MGIE, LGIE)."""

    images: torch.Tensor
    expressive: list[str] | None = None


def sample_generators(ids: Sequence[str], seed: int) -> list[torch.Generator]:
    """One CPU generator per sample, seeded from its id: an evaluation draws the same noise for
    a sample whatever its batch, its position in it or the number of processes."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(i.encode())) for i in ids]


class EditModel(L.LightningModule):
    """Base LightningModule of the editing models.

    Args:
        learning_rate: AdamW learning rate (of the diffusion side; models with several
            parameter groups add their own rates).
        weight_decay: AdamW weight decay.
        adam_betas: AdamW betas.
        warmup_steps: linear warm-up steps of the learning rate.
        lr_schedule: ``constant`` or ``cosine`` (to zero at the end of training) after warm-up.
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
            checkpoints; default ``$EDITBENCH_BACKBONES/{clip-vit-base-patch32,dino-vits16}``
            and the torch hub cache.
        protocol: evaluation protocol name overriding the DataModule's (``None``: the data's).
        aggregation: the MagicBrush turn aggregation of ``test/<metric>`` and the table
            (``single``, ``final`` or ``all``); ``None``: the protocol's default.
        copy_baseline: also score the copy-the-input baseline (``test/copy/*``).
        val_metrics: metrics of the edits sampled in validation (``None``: ``L1``, ``SSIM`` and,
            with edit masks, ``L1_edit``).
        check_finite: stop with an error naming the loss term and samples when a loss is not
            finite, instead of training on NaNs.
        init_from: a checkpoint of this model whose trainable weights initialise ``fit``
            (fine-tuning, e.g. MGIE Table 2: IPr2Pr pre-training, then each dataset). Unlike
            ``--ckpt_path`` it restores no optimizer state, step or epoch; a resumed run
            (``--ckpt_path``) ignores it.
    """

    #: Prefixes of submodules whose weights are frozen, re-read from their paths on load and
    #: left out of checkpoints.
    frozen_modules: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        learning_rate: float = 1e-4,
        weight_decay: float = 1e-2,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
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
    ) -> None:
        super().__init__()
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.adam_betas = tuple(adam_betas)
        self.warmup_steps = warmup_steps
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
        losses = self.training_losses(batch)
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
        optimizer = torch.optim.AdamW(
            groups, lr=self.learning_rate, betas=self.adam_betas, weight_decay=self.weight_decay
        )
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 0
        warmup, cosine = self.warmup_steps, self.lr_schedule == "cosine"

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if cosine and math.isfinite(total) and total > warmup:
                progress = min(1.0, (step - warmup) / (total - warmup))
                return 0.5 * (1.0 + math.cos(math.pi * progress))
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

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
        protocol = get_protocol(name)
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
        self._evaluators["test"] = self.build_evaluator()

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        if "target" not in batch:
            raise ValueError("the test split has no target images; use `predict` to only edit")
        out = self.edit(batch["source"], batch["instruction"], **self._eval_kwargs(batch["id"]))
        self._evaluators["test"].update(batch, out.images)
        return {"id": list(batch["id"]), "images": out.images, "expressive": out.expressive}

    def on_test_epoch_end(self) -> None:
        evaluator = self._evaluators.pop("test", None)
        if evaluator is None:
            return
        results = evaluator.compute() | self.extra_test_results()
        self.log_dict({k: v for k, v in results.items() if math.isfinite(v)}, sync_dist=False)
        if self.trainer.is_global_zero:
            document = results_document(
                evaluator,
                results,
                model=self,
                datamodule=getattr(self.trainer, "datamodule", None),
                run=self._run_record(),
            )
            self._report(document)

    def extra_test_results(self) -> dict[str, float]:
        """Model-specific test results (``test/<name>``) added to the metrics, e.g. MGIE's
        expressive-instruction accuracy; computed on every process (they may sync)."""
        return {}

    def _run_record(self) -> dict:
        trainer = self.trainer
        logger = trainer.logger
        scheduler = getattr(getattr(self, "diffusion", None), "scheduler", None)
        return {
            "name": getattr(logger, "name", None) if logger is not None else None,
            "version": getattr(logger, "version", None) if logger is not None else None,
            "log_dir": trainer.log_dir,
            "ckpt_path": trainer.ckpt_path,
            "seed": self.eval_seed,
            "sampler": {
                "scheduler": type(scheduler).__name__ if scheduler is not None else None,
                "num_inference_steps": self.num_inference_steps,
                "guidance_scale": self.guidance_scale,
                "image_guidance_scale": self.image_guidance_scale,
            },
            "precision": str(trainer.precision),
            "world_size": trainer.world_size,
        }

    def _report(self, document: dict) -> None:
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
        log_dir = self.trainer.log_dir
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

    def load_initial_weights(self, path: str | Path) -> None:
        """Load the trainable weights of checkpoint ``path`` (strictly: every trainable weight
        must be there, nothing unknown may be)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"init_from checkpoint {path} not found")
        checkpoint = {"state_dict": torch.load(path, map_location="cpu", weights_only=True)["state_dict"]}
        self.on_load_checkpoint(checkpoint)
        self.load_state_dict(checkpoint["state_dict"], strict=True)
        rank_zero_info(f"initialised {type(self).__name__} from {path}")

    def _is_frozen_key(self, key: str) -> bool:
        return any(key == m or key.startswith(m + ".") for m in self.frozen_modules)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep trainable weights only: frozen pretrained weights are re-read from their paths."""
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in state.items() if not self._is_frozen_key(k)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Complete a trainable-only checkpoint with the frozen weights already loaded from their
        paths, so loading stays strict: a missing trainable or an unknown weight is an error."""
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
