"""Collectives the evaluator needs so that every process reaches every sync in the same order.

``Metric.compute()`` is a collective under DDP (torchmetrics gathers the states of every rank
before computing), so a metric must be computed on every rank or on none, whatever each rank
saw. Two helpers make that possible:

- :func:`global_counts`: one ``all_reduce`` of a count vector, so every rank knows which
  aggregations saw samples anywhere.
- :func:`align_list_states`: list states are gathered one list element at a time. With
  ``dist_reduce_fx=None`` (torchmetrics' KID keeps its features so) the list is not
  concatenated first, so ranks that ran different numbers of ``update`` calls make different
  numbers of gathers (a crash or a hang); and an empty ``cat`` list becomes ``torch.tensor([])``
  (1-D) while the other ranks hold ``[N, D]`` tensors, whose shapes ``gather_all_tensors``
  cannot gather together. This concatenates every list state to exactly one tensor per rank,
  an empty rank taking a ``[0, D]`` tensor of the others' shape and dtype (one gathered
  descriptor per state), so every rank makes one gather per state and the gather pads and
  trims as it does for any uneven split.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

#: Longest state rank the descriptor carries (features are [N, D]; images [N, C, H, W]).
_MAX_DIMS = 6
_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
)


def is_distributed(metric: Metric | None = None) -> bool:
    """Whether compute() syncs: a process group is up (and ``metric`` syncs on compute)."""
    if metric is not None:
        if not metric.sync_on_compute:
            return False
        available = metric.distributed_available_fn
        return bool(available()) if callable(available) else False
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def global_counts(local: list[int], device: torch.device) -> list[int]:
    """The element-wise sum of ``local`` over all processes (``local`` itself when not
    distributed): one ``all_reduce``, called by every rank."""
    counts = torch.tensor(local, dtype=torch.long, device=device)
    if is_distributed():
        torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM)
    return [int(c) for c in counts.tolist()]


def _descriptor(value: list[Tensor], device: torch.device) -> Tensor:
    """``[has_data, dtype index, ndim, dims...]`` of the first tensor of a list state."""
    out = torch.zeros(3 + _MAX_DIMS, dtype=torch.long, device=device)
    first = next((t for t in value if isinstance(t, Tensor)), None)
    if first is None or first.ndim > _MAX_DIMS:
        return out
    out[0] = 1
    out[1] = _DTYPES.index(first.dtype) if first.dtype in _DTYPES else 0
    out[2] = first.ndim
    out[3 : 3 + first.ndim] = torch.tensor(first.shape, dtype=torch.long)
    return out


def align_list_states(metric: Metric) -> None:
    """Make every list state of ``metric`` exactly one tensor, ``[0, *trailing]`` shaped like
    the other ranks' where this rank has none (see the module docstring). A collective: call
    it on every rank, for the same metrics in the same order, right before
    ``metric.compute()``. Nothing happens when not distributed."""
    if not is_distributed(metric):
        return
    group = metric.process_group
    for attr in metric._reductions:
        value = getattr(metric, attr)
        if not isinstance(value, list):
            continue
        descriptors = gather_all_tensors(_descriptor(value, metric.device), group=group)
        if value:
            setattr(metric, attr, [dim_zero_cat(value)])
            continue
        shaped = next((d for d in descriptors if int(d[0]) == 1), None)
        if shaped is None:  # empty everywhere: every rank sends the same empty tensor
            continue
        ndim = int(shaped[2])
        trailing = [int(s) for s in shaped[4 : 3 + ndim]]
        dtype = _DTYPES[int(shaped[1])]
        setattr(metric, attr, [torch.empty((0, *trailing), dtype=dtype, device=metric.device)])
