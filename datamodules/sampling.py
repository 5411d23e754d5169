"""Samplers that split a split across processes the way an evaluation needs.

Lightning's ``DistributedSampler`` pads every rank to the same length by repeating samples, so
1,053 MagicBrush turns on 8 GPUs are scored as 1,056, and it deals indices out one by one, so
the turns of a session land on different ranks. The evaluation samplers here give every index
to exactly one rank (no padding, no repeats) and keep a group (a MagicBrush session, whose turn
k needs turn k-1's output in iterative mode) on one rank.

The DataModule builds these itself (it knows the Trainer's world size and rank), so the loaders
are the same under any ``Trainer(use_distributed_sampler=...)``: Lightning leaves a loader whose
sampler is a ``DistributedSampler`` as it is.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

from torch.utils.data import Dataset, DistributedSampler


def process_layout(trainer: Any) -> tuple[int, int]:
    """``(world_size, global_rank)`` of the Trainer driving a DataModule; ``(1, 0)`` without
    one (the ``data`` commands, a loader built by hand)."""
    if trainer is None:
        return 1, 0
    return int(getattr(trainer, "world_size", 1)), int(getattr(trainer, "global_rank", 0))


def assign_groups(groups: Sequence[Hashable], num_replicas: int) -> list[int]:
    """The rank of every index: each group whole on one rank, groups taken in order of first
    appearance and each given to the rank with the fewest samples so far (ties: lowest rank).

    Deterministic, so every process computes the same assignment without communicating.
    """
    sizes: dict[Hashable, int] = {}
    for group in groups:
        sizes[group] = sizes.get(group, 0) + 1
    load = [0] * num_replicas
    rank_of: dict[Hashable, int] = {}
    for group, size in sizes.items():
        rank = min(range(num_replicas), key=lambda r: (load[r], r))
        rank_of[group] = rank
        load[rank] += size
    return [rank_of[g] for g in groups]


class EvalDistributedSampler(DistributedSampler):
    """Every index of the dataset on exactly one rank, in dataset order, never padded.

    Args:
        dataset: the evaluation dataset.
        num_replicas: the number of processes.
        rank: this process's rank.
        groups: an optional group key per index (e.g. a MagicBrush session); a group's indices
            all go to one rank (:func:`assign_groups`). Without groups indices are dealt
            round-robin (``rank, rank + W, ...``), as Lightning's predict sampler does.

    Ranks may hold different numbers of samples (and batches): nothing in an evaluation step
    may be a collective; results are gathered once, at the end of the epoch.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int,
        rank: int,
        groups: Sequence[Hashable] | None = None,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        n = len(dataset)
        if groups is None:
            self.indices = list(range(rank, n, num_replicas))
        else:
            if len(groups) != n:
                raise ValueError(f"{len(groups)} group keys for a dataset of {n} samples")
            owner = assign_groups(groups, num_replicas)
            self.indices = [i for i in range(n) if owner[i] == rank]
        self.num_samples = len(self.indices)
        self.total_size = n

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def train_sampler(dataset: Dataset, num_replicas: int, rank: int) -> DistributedSampler:
    """The training sampler of a multi-process fit: torch's shuffling ``DistributedSampler``
    seeded with the run's seed (``PL_GLOBAL_SEED``, which ``seed_everything`` sets), as
    Lightning would inject it; the fit loop calls its ``set_epoch``."""
    seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    return DistributedSampler(
        dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed
    )
