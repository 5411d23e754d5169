"""Per-sample values of the per-image metrics, recorded by the metric's own ``update``.

A metric that is a mean over images of a per-image value (L1, L1_edit, SSIM, PSNR, LPIPS,
DINO, CVS, CTS, the CLIP directional and image similarities) computes that per-image value once
in ``update``; it adds it to its ``"sum"``-reduced states and, when recording is switched on
(:func:`record_samples`, which :class:`metrics.evaluation.EditEvaluator` does for a test run),
also hands the same tensor to :meth:`SampleRecorder.record`. The rows of a result bundle
(:mod:`metrics.bundle`) come from there, so the aggregate and the rows cannot drift apart.

Each recorded value is a dict of floats per image: ``value`` (the per-image value; ``None``
for an image the metric does not score, e.g. an empty mask under ``L1_edit``) and, for a metric
that is not a plain mean of ``value`` (PSNR with ``reduction="pooled"``), the sums it needs
(``sse``, ``n``). :data:`REDUCTIONS` names how each reduction recomputes the aggregate from the
rows (:func:`reduce_rows`).

Set-level metrics (FID, KID) and VIEScore record nothing: their cells are not recomputable
from per-sample rows, and the report says so.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor

#: How a metric's aggregate follows from its rows: ``mean`` of ``value`` over rows whose value
#: is not None; ``pooled_psnr``: ``10 log10(1 / (sum sse / sum n))``.
REDUCTIONS = ("mean", "pooled_psnr")


class SampleRecorder:
    """Mixin for a torchmetrics ``Metric`` whose ``update`` can keep its per-image values.

    Recording is off until :func:`record_samples` switches it on; :meth:`take_samples` returns
    and forgets what was recorded since the last call; ``reset()`` forgets it too.
    """

    #: How the aggregate follows from the rows (see :data:`REDUCTIONS`).
    sample_reduction: str = "mean"

    def record(self, value: Tensor, valid: Tensor | None = None, **extra: Tensor) -> None:
        """Keep per-image ``value`` ``[B]`` (``valid`` False -> None) and ``extra`` columns."""
        if not self.__dict__.get("_recording", False):
            return
        values = value.detach().double().cpu().reshape(-1).tolist()
        keep = [True] * len(values) if valid is None else valid.detach().cpu().reshape(-1).tolist()
        columns = {k: v.detach().double().cpu().reshape(-1).tolist() for k, v in extra.items()}
        pending = self.__dict__.setdefault("_samples", [])
        for i, v in enumerate(values):
            row: dict[str, Any] = {"value": v if keep[i] else None}
            row.update({k: c[i] for k, c in columns.items()})
            pending.append(row)

    def take_samples(self) -> list[dict[str, Any]]:
        """The values recorded since the last call, in update order (then forgotten)."""
        pending = self.__dict__.get("_samples", [])
        self.__dict__["_samples"] = []
        return pending

    def reset(self) -> None:
        self.__dict__["_samples"] = []
        super().reset()  # type: ignore[misc]


def record_samples(metric: Any, on: bool = True) -> bool:
    """Switch recording on (or off) for ``metric``; returns whether it records per-sample
    values at all (False for metrics that are not :class:`SampleRecorder`)."""
    if not isinstance(metric, SampleRecorder):
        return False
    metric.__dict__["_recording"] = on
    metric.__dict__["_samples"] = []
    return True


def reduce_rows(rows: Iterable[Mapping[str, Any]], reduction: str = "mean") -> float:
    """The aggregate of one metric's rows, the metric's way (nan when no row is scored)."""
    rows = list(rows)
    if reduction == "mean":
        values = [r["value"] for r in rows if r.get("value") is not None]
        return math.fsum(values) / len(values) if values else math.nan
    if reduction == "pooled_psnr":
        sse = math.fsum(float(r["sse"]) for r in rows)
        n = sum(int(r["n"]) for r in rows)
        if n == 0:
            return math.nan
        return math.inf if sse == 0 else 10 * math.log10(n / sse)
    raise ValueError(f"unknown reduction {reduction!r}; known: {REDUCTIONS}")


def scored_values(rows: Sequence[Mapping[str, Any]]) -> list[float]:
    """The per-image values of rows that were scored (``value`` not None)."""
    return [float(r["value"]) for r in rows if r.get("value") is not None]


__all__ = ["REDUCTIONS", "SampleRecorder", "record_samples", "reduce_rows", "scored_values"]
