"""Validation, test and predict steps of :class:`models.base.EditModel` (its
``EvaluationMixin``): per-sample noise, the metric collection beside the copy-the-input
baseline, ``test_metrics.json`` and the result bundle.
"""

from __future__ import annotations

import math
import os
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info
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
from metrics.collection import JUDGED_OFFLINE
from metrics.distributed import is_distributed
from metrics.evaluation import EditEvaluator
from metrics.protocols import Protocol, get_protocol
from metrics.results import results_document, write_results

# Test results are torchmetrics values, already synced across processes by compute(); Lightning
# would recommend sync_dist for every one of them.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('test/")


def sample_generators(ids: Sequence[str], seed: int) -> list[torch.Generator]:
    """One CPU generator per sample, seeded from its id: an evaluation draws the same noise for
    a sample whatever its batch, its position in it or the number of processes."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(i.encode())) for i in ids]


class EvaluationMixin:
    """The evaluation hooks of :class:`models.base.EditModel` (a LightningModule); they read
    the settings its ``__init__`` stores (sampler, metrics, protocol, bundle images)."""

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

    def build_evaluator(self, offline_judges: bool = False) -> EditEvaluator:
        """The evaluator: the protocol's columns (or ``metrics``) plus ``extra_metrics``. With
        ``offline_judges`` (``test``), judge metrics (:data:`metrics.collection.JUDGED_OFFLINE`,
        VIEScore) are left out, kept in ``_judged_offline``: ``python -m editbench judge
        --bundle DIR`` scores them from the result bundle afterwards, so no GPU waits on HTTP
        inside ``test_step``. Evaluation during training keeps them in process."""
        protocol = self.evaluation_protocol()
        names = list(self.metric_names or protocol.columns)
        names += [n for n in self.extra_metrics if n not in names]
        kwargs = dict(self.metric_kwargs)
        if offline_judges:
            self._judged_offline = [n for n in names if n in JUDGED_OFFLINE]
            names = [n for n in names if n not in JUDGED_OFFLINE]
            kwargs = {k: v for k, v in kwargs.items() if k not in self._judged_offline}
            if not names:
                raise ValueError(
                    f"test: {self._judged_offline} are judged offline from the run's result "
                    "bundle (python -m editbench judge --bundle DIR); name at least one metric "
                    "that test computes itself (model.init_args.metrics)"
                )
        evaluator = EditEvaluator(
            protocol,
            names,
            metric_kwargs=kwargs,
            backbones=self.backbones,
            copy_baseline=self.copy_baseline,
        )
        return evaluator.to(self.device)

    def on_test_epoch_start(self) -> None:
        evaluator = self._evaluators["test"] = self.build_evaluator(offline_judges=True)
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
            judged = list(getattr(self, "_judged_offline", []))
            if judged:
                document["protocol"]["judged_offline"] = judged
                # The judge settings the run was configured with (an env var NAME, never a key):
                # `editbench judge` takes them as its defaults.
                document["protocol"]["judge_settings"] = {
                    name: dict(self.metric_kwargs.get(name) or {}) for name in judged
                }
            self._report(document, run["log_dir"])
            if run["log_dir"] is not None:
                if inputs:
                    write_inputs(run["log_dir"], inputs)
                recorded = evaluator.sample_reductions()
                others = [n for n in evaluator.names if n not in recorded]
                write_bundle(run["log_dir"], rows, recorded, others)
            if judged:
                self._announce_offline_judges(judged, run["log_dir"])

    def _announce_offline_judges(self, judged: list[str], log_dir: str | None) -> None:
        """Say how to judge this run (``test`` leaves judge metrics to the bundle's judge)."""
        names = ", ".join(judged)
        if log_dir is None or not self._bundle_save_images:
            print(
                f"{names}: judged offline from a result bundle with images, which this run did "
                "not write (set model.init_args.bundle_images true and a logger)",
                flush=True,
            )
            return
        print(
            f"{names}: judged offline from this run's bundle: python -m editbench judge "
            f"--bundle {log_dir}",
            flush=True,
        )

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
        names = sorted({k[len("test/") :] for k in results if not k.startswith("test/copy/")})
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
