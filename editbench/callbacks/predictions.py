"""Write ``predict`` outputs: one PNG per sample named by its id, plus a JSONL index."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from torchvision.utils import save_image


class EditPredictionWriter(BasePredictionWriter):
    """Save each edited image as ``<output_dir>/<id>.png`` (or under the name the DataModule's
    ``prediction_path(id)`` gives, e.g. MagicBrush's official ``<img_id>/<img_id>_iter_2.png``)
    and append ``id``, ``instruction``,
    ``image`` and (where the model makes them) ``expressive`` and ``caption`` to
    ``predictions.jsonl``. Several
    processes each write ``predictions.rank<k>.jsonl`` (the DataModule gives every sample to one
    process), and rank 0 joins them into ``predictions.jsonl`` at the end, ordered by rank.

    Args:
        output_dir: where to write; ``None`` is ``<log dir>/predictions``.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir

    def _dir(self, trainer: L.Trainer) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(trainer.log_dir or ".") / "predictions"

    def on_predict_start(self, trainer, pl_module) -> None:
        # trainer.log_dir is a collective (a broadcast): read it once here, on every process,
        # never per batch (processes may hold different numbers of batches).
        out = self._out = self._dir(trainer)
        out.mkdir(parents=True, exist_ok=True)
        name = (
            "predictions.jsonl"
            if trainer.world_size == 1
            else f"predictions.rank{trainer.global_rank}.jsonl"
        )
        self._index = out / name
        self._index.write_text("")

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        out = self._out
        with self._index.open("a") as index:
            name = getattr(trainer.datamodule, "prediction_path", None)
            for i, sample_id in enumerate(prediction["id"]):
                path = out / (name(sample_id) if name is not None else f"{sample_id}.png")
                path.parent.mkdir(parents=True, exist_ok=True)
                save_image((prediction["images"][i] + 1) / 2, path)
                record = {
                    "id": sample_id,
                    "instruction": prediction["instruction"][i],
                    "image": str(path.relative_to(out)),
                }
                if prediction.get("expressive") is not None:
                    record["expressive"] = prediction["expressive"][i]
                if prediction.get("caption") is not None:  # MMIG's BLIP-2 caption (Eq. 4)
                    record["caption"] = prediction["caption"][i]
                index.write(json.dumps(record) + "\n")

    def on_predict_end(self, trainer, pl_module) -> None:
        if trainer.world_size == 1:
            return
        trainer.strategy.barrier("editbench-predictions")
        if trainer.is_global_zero:
            out = self._out
            parts = [out / f"predictions.rank{r}.jsonl" for r in range(trainer.world_size)]
            with (out / "predictions.jsonl").open("w") as joined:
                for part in parts:
                    joined.write(part.read_text())
                    part.unlink()
