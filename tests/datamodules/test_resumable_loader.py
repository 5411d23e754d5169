"""The training loader's order, per-sample augmentation and mid-epoch position
(datamodules.sampling: TrainSampler, SeededSamples, ResumableDataLoader), without a Trainer;
the fits resumed through the Trainer are in tests/test_exact_resume.py."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, DistributedSampler

from datamodules.base import collate
from datamodules.sampling import ResumableDataLoader, TrainSampler, sample_seeds
from datamodules.synthetic import SyntheticEditDataModule

SEED = 5
N = 20  # training samples: 5 batches of 4


@pytest.fixture(autouse=True)
def run_seed(monkeypatch):
    """The run's seed, as ``seed_everything`` exports it."""
    monkeypatch.setenv("PL_GLOBAL_SEED", str(SEED))


def make_dm(root, layout=(1, 0), **kwargs) -> SyntheticEditDataModule:
    """The session's synthetic data (its sizes, so nothing is regenerated), N training
    samples, flips on; ``layout`` = (world size, rank) of a stand-in trainer."""
    defaults = dict(
        resolution=32, batch_size=4, num_workers=0, num_train=64, num_val=16, num_test=16,
        max_samples=N, random_flip=0.5,
    )  # fmt: skip
    dm = SyntheticEditDataModule(root=str(root), **(defaults | kwargs))
    if layout != (1, 0):
        dm.trainer = SimpleNamespace(world_size=layout[0], global_rank=layout[1])
    dm.setup("fit")
    return dm


def epoch_batches(loader, epoch: int, take: int | None = None) -> list[dict]:
    loader.sampler.set_epoch(epoch)
    out = []
    for batch in loader:
        out.append(batch)
        if take is not None and len(out) == take:
            break
    return out


def assert_same_batches(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a["id"] == b["id"]
        for key in ("source", "target", "mask"):
            assert torch.equal(a[key], b[key]), key


def test_order_is_torchs_permutation_and_augmentation_is_per_sample(synthetic_root):
    """Epoch e's order is torch's DistributedSampler's (randperm under seed + e); a sample's
    flip is drawn from its own seed, whoever loads it: the same tensors from the dataset read
    by hand under that seed, with no workers or two, on one rank or two."""
    dm = make_dm(synthetic_root)
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableDataLoader) and isinstance(loader.sampler, DistributedSampler)
    batches = epoch_batches(loader, 2)
    records = dm.datasets["train"].records
    order = torch.randperm(N, generator=torch.Generator().manual_seed(SEED + 2)).tolist()
    assert [i for b in batches for i in b["id"]] == [str(records[i]["id"]) for i in order]

    seeds = sample_seeds(SEED, 2, N)
    plain = make_dm(synthetic_root, random_flip=0.0).datasets["train"]
    flipped = 0
    by_id = {i: s for b in batches for i, s in zip(b["id"], b["source"], strict=True)}
    for index in range(N):
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(int(seeds[index]))
            sample = dm.datasets["train"][index]
        assert torch.equal(by_id[sample["id"]], sample["source"])
        unflipped = plain[index]["source"]
        flipped += torch.equal(sample["source"], unflipped.flip(-1)) and not torch.equal(
            sample["source"], unflipped
        )
    assert 0 < flipped < N  # flips on, and not all the same
    assert sample_seeds(SEED, 3, N).tolist() != seeds.tolist()  # new draws each epoch

    workers = make_dm(synthetic_root, num_workers=2).train_dataloader()
    assert_same_batches(epoch_batches(workers, 2), batches)
    two_ranks = [
        {i: s for b in epoch_batches(make_dm(synthetic_root, (2, r)).train_dataloader(), 2)
         for i, s in zip(b["id"], b["source"], strict=True)}
        for r in (0, 1)
    ]  # fmt: skip
    for shard in two_ranks:
        assert shard and all(torch.equal(s, by_id[i]) for i, s in shard.items())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_restored_loader_hands_out_the_rest_of_the_epoch(synthetic_root, num_workers):
    """2 batches of epoch 1 taken, the state saved; a new loader restored from it hands out
    batches 3-5 of the uninterrupted epoch 1 (ids and tensors), then a whole epoch 2."""
    reference = make_dm(synthetic_root, num_workers=num_workers).train_dataloader()
    epoch1, epoch2 = epoch_batches(reference, 1), epoch_batches(reference, 2)
    assert len(epoch1) == len(epoch2) == N // 4

    interrupted = make_dm(synthetic_root, num_workers=num_workers).train_dataloader()
    assert_same_batches(epoch_batches(interrupted, 1, take=2), epoch1[:2])
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "batches": 2, "batch_size": 4, "num_replicas": 1, "seed": SEED}

    restored = make_dm(synthetic_root, num_workers=num_workers).train_dataloader()
    restored.load_state_dict(state)
    assert len(restored) == N // 4  # Lightning counts the epoch's batches from its start
    assert_same_batches(epoch_batches(restored, 1), epoch1[2:])
    assert restored.state_dict()["batches"] == N // 4
    assert_same_batches(epoch_batches(restored, 2), epoch2)


def test_ranks_resume_their_own_shares(synthetic_root):
    """Two ranks: each restored from rank 0's state hands out the rest of its own share."""
    for rank in (0, 1):
        reference = epoch_batches(make_dm(synthetic_root, (2, rank)).train_dataloader(), 0)
        assert len(reference) == N // 2 // 4
        restored = make_dm(synthetic_root, (2, rank)).train_dataloader()
        restored.load_state_dict(
            {"epoch": 0, "batches": 1, "batch_size": 4, "num_replicas": 2, "seed": SEED}
        )
        assert_same_batches(epoch_batches(restored, 0), reference[1:])


def test_a_state_of_another_epoch_skips_nothing(synthetic_root):
    """A position in epoch 0 applies to epoch 0 only; a whole epoch is no position."""
    reference = epoch_batches(make_dm(synthetic_root).train_dataloader(), 1)
    loader = make_dm(synthetic_root).train_dataloader()
    loader.load_state_dict({"epoch": 0, "batches": 3, "batch_size": 4, "num_replicas": 1, "seed": SEED})
    assert_same_batches(epoch_batches(loader, 1), reference)
    loader.load_state_dict({"epoch": 1, "batches": N // 4, "batch_size": 4, "num_replicas": 1, "seed": SEED})
    assert_same_batches(epoch_batches(loader, 1), reference)


def test_another_batch_size_or_seed_warns(synthetic_root):
    loader = make_dm(synthetic_root).train_dataloader()
    state = {"epoch": 0, "batches": 1, "batch_size": 2, "num_replicas": 1, "seed": SEED + 1}
    with pytest.warns(UserWarning, match=r"batch_size 2 -> 4, seed 6 -> 5"):
        loader.load_state_dict(state)
    assert len(epoch_batches(loader, 0)) == N // 4 - 1


def test_loader_needs_a_train_sampler_and_drop_last(synthetic_root):
    dataset = make_dm(synthetic_root).datasets["train"]
    with pytest.raises(TypeError, match="TrainSampler"):
        ResumableDataLoader(dataset, sampler=DistributedSampler(dataset, 1, 0), batch_size=4)
    with pytest.raises(ValueError, match="drop_last"):
        ResumableDataLoader(dataset, sampler=TrainSampler(dataset), batch_size=4)


# ----------------------------------------------------------------------------- through the Trainer


class _Probe(L.LightningModule):
    """One weight; records each step's batch ids and the data's mean."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[int, list[str]] = {}

    def training_step(self, batch, batch_idx):
        self.seen[self.global_step] = list(batch["id"])
        return ((batch["target"] - batch["source"]).mean() - self.weight) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _PlainLoader(SyntheticEditDataModule):
    """The training data in a plain shuffling DataLoader (what Lightning cannot resume)."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.datasets["train"], batch_size=4, shuffle=True, drop_last=True, collate_fn=collate
        )


def _fit(dm, out, max_steps: int, ckpt_path=None) -> tuple[_Probe, list[str]]:
    model = _Probe()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[ModelCheckpoint(out, "{step}", every_n_train_steps=7, save_top_k=-1)],
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model, [str(w.message) for w in caught]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_trainer_resumes_mid_epoch_without_the_warning(synthetic_root, tmp_path, num_workers):
    """A fit of 12 steps (epochs of 5) and the same fit resumed from the step-7 checkpoint
    take the same batches at steps 7-11, and Lightning does not warn that the loader is not
    resumable; a plain DataLoader resumed the same way is warned about."""
    full, _ = _fit(make_dm(synthetic_root, num_workers=num_workers), tmp_path / "a", 12)
    ckpt = tmp_path / "a" / "step=7.ckpt"
    resumed, caught = _fit(make_dm(synthetic_root, num_workers=num_workers), tmp_path / "b", 12, ckpt)
    assert sorted(resumed.seen) == list(range(7, 12))
    assert {s: full.seen[s] for s in range(7, 12)} == resumed.seen
    assert not [w for w in caught if "not resumable" in w]
    assert torch.equal(resumed.weight, full.weight)

    plain = dict(root=str(synthetic_root), resolution=32, num_train=64, num_val=16, num_test=16)
    _fit(_PlainLoader(**plain, max_samples=N), tmp_path / "c", 7)
    _, caught = _fit(_PlainLoader(**plain, max_samples=N), tmp_path / "d", 8, tmp_path / "c" / "step=7.ckpt")
    assert [w for w in caught if "not resumable" in w]
