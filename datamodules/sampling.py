"""Samplers that split a split across processes the way an evaluation needs.

Lightning's ``DistributedSampler`` pads every rank to the same length by repeating samples, so
1,053 MagicBrush turns on 8 GPUs are scored as 1,056, and it deals indices out one by one, so
the turns of a session land on different ranks. The evaluation samplers here give every index
to exactly one rank (no padding, no repeats) and keep a group (a MagicBrush session, whose turn
k needs turn k-1's output in iterative mode) on one rank.

The DataModule builds these itself (it knows the Trainer's world size and rank), so the loaders
are the same under any ``Trainer(use_distributed_sampler=...)``: Lightning leaves a loader whose
sampler is a ``DistributedSampler`` as it is. Training uses :class:`TrainSampler`, with one
process too: its order is a function of (seed, epoch), so a fit resumes mid-epoch exactly.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler


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


def sample_seeds(seed: int, epoch: int, size: int) -> torch.Tensor:
    """The augmentation seed of every dataset index in epoch ``epoch`` of a run seeded
    ``seed``: ``size`` int64 values drawn by a CPU generator seeded with the first 63-bit word of
    numpy's ``SeedSequence([seed, epoch])``. A function of (seed, epoch, index) only, so a
    sample's random crop and flip do not depend on the worker, the rank, the number of
    processes or where a resumed run restarted."""
    word = int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]) >> 1
    generator = torch.Generator().manual_seed(word)
    return torch.randint(0, 2**62, (size,), generator=generator, dtype=torch.int64)


class TrainSampler(DistributedSampler):
    """The training sampler of every fit (one process or several): torch's shuffling
    ``DistributedSampler`` (epoch ``e``'s order is ``randperm`` under seed ``seed + e``, rank
    ``r`` takes every ``num_replicas``-th position from ``r``), which yields
    ``(index, augmentation seed)`` pairs (:func:`sample_seeds`) and can start an epoch part-way.

    Deterministic in (seed, epoch), so a resumed fit recomputes the permutation and only needs
    the number of samples consumed (:class:`ResumableDataLoader` counts and
    checkpoints them); the fit loop calls ``set_epoch``. A loop without Lightning sees the same
    order every pass unless it calls ``set_epoch`` itself, as with torch's sampler.

    Args:
        dataset: the training dataset.
        num_replicas: the number of processes.
        rank: this process's rank.
        seed: the run's seed.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self._skip = 0

    def skip_next(self, count: int) -> None:
        """Leave out the first ``count`` samples of this rank's share in the next pass only."""
        if count < 0:
            raise ValueError(f"cannot skip {count} samples")
        self._skip = count

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        indices = list(super().__iter__())
        skip, self._skip = self._skip, 0
        seeds = sample_seeds(self.seed, self.epoch, len(self.dataset)).tolist()
        return iter([(i, seeds[i]) for i in indices[skip:]])


def train_sampler(dataset: Dataset, num_replicas: int, rank: int) -> TrainSampler:
    """The training sampler of a fit: :class:`TrainSampler` seeded with the run's seed
    (``PL_GLOBAL_SEED``, which ``seed_everything`` sets; 0 without one). A
    ``DistributedSampler``, so Lightning keeps it under any ``use_distributed_sampler``."""
    seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    return TrainSampler(dataset, num_replicas=num_replicas, rank=rank, seed=seed)


class SeededSamples(Dataset):
    """A training dataset read with the ``(index, seed)`` keys of :class:`TrainSampler`: each
    sample's random draws (the random crop and flip, IPr2Pr's image pair) come from torch's CPU
    generator seeded with its seed, restored afterwards, so they are the same in the main
    process or any worker, and a resumed fit augments as the uninterrupted one. A plain index
    reads the sample with the generator as it is.

    Args:
        dataset: the training dataset (an ``EditDataset`` or a ``ConcatDataset`` of them).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            return self.dataset[index]


class ResumableDataLoader(DataLoader):
    """The training DataLoader: one Lightning checkpoints mid-epoch and resumes exactly.

    It implements Lightning's ``_Stateful`` protocol (``state_dict``/``load_state_dict``; the
    fit loop saves the state beside its own and restores it before the first batch). The state
    is the epoch and the number of batches handed out in it; since :class:`TrainSampler`'s
    order and augmentation seeds are functions of (seed, epoch), the resumed loader skips that
    many batches' samples and hands out the rest of the epoch as the uninterrupted one, with any
    number of workers (nothing of a worker's state matters) and processes (every rank hands
    out as many batches; rank 0's count is saved).

    The count is of batches this loader yielded, which under Lightning's fetcher of a loader of
    known length is the batches the fit loop took (no look-ahead): a checkpoint written after
    batch ``k`` of the epoch (``every_n_train_steps``, a mid-epoch validation, the SLURM
    requeue) resumes at ``k + 1``. A state of another epoch than the one the fit loop sets, or
    of a whole epoch, skips nothing.

    Args:
        dataset: a :class:`SeededSamples`.
        sampler: a :class:`TrainSampler`.
        batch_size: samples per batch (with ``drop_last``, so skipped samples are whole
            batches).
        **kwargs: the other ``DataLoader`` arguments.
    """

    def __init__(
        self, dataset: Dataset, *, sampler: TrainSampler, batch_size: int, **kwargs: Any
    ) -> None:
        if not isinstance(sampler, TrainSampler):
            raise TypeError(f"ResumableDataLoader needs a TrainSampler, got {type(sampler)}")
        super().__init__(dataset, sampler=sampler, batch_size=batch_size, **kwargs)
        if not self.drop_last:
            raise ValueError("ResumableDataLoader drops the last partial batch (drop_last=True)")
        self._epoch = 0
        self._batches = 0
        self._resume: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        # A generator: the sampler's pass starts at the first batch requested, after the fit
        # loop's set_epoch (Lightning creates the first iterator before it sets the epoch).
        sampler: TrainSampler = self.sampler  # type: ignore[assignment]
        epoch, start = sampler.epoch, 0
        resume, self._resume = self._resume, None
        if resume is not None and resume["epoch"] == epoch and 0 < resume["batches"] < len(self):
            start = resume["batches"]
        sampler.skip_next(start * self.batch_size)  # type: ignore[operator]
        self._epoch, self._batches = epoch, start
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Where the loader is: ``epoch``, ``batches`` handed out in it, and what fixes the
        order (``seed``, ``batch_size``, ``num_replicas``)."""
        sampler: TrainSampler = self.sampler  # type: ignore[assignment]
        return {
            "epoch": self._epoch,
            "batches": self._batches,
            "batch_size": int(self.batch_size),  # type: ignore[arg-type]
            "num_replicas": sampler.num_replicas,
            "seed": sampler.seed,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state``'s position in its epoch (applied to the next pass over that
        epoch). Another seed, batch size or number of processes gives another order: the
        position is kept, with a warning that the remaining batches are not the original ones."""
        sampler: TrainSampler = self.sampler  # type: ignore[assignment]
        now = {"batch_size": self.batch_size, "num_replicas": sampler.num_replicas, "seed": sampler.seed}
        changed = {k: (state.get(k), v) for k, v in now.items() if state.get(k, v) != v}
        if changed:
            shown = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            rank_zero_warn(
                f"the training data is resumed with another {shown}: the rest of epoch "
                f"{state['epoch']} is not the batches the interrupted run would have seen"
            )
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}
