"""Training randomness per rank and the EMA of the trainable weights (issue 13, items 2 and 4),
through the Trainer. ``last.ckpt``, the EMA in ``test``/``predict``/``edit`` and the checkpoint
reader through the CLI: tests/cli/test_checkpoint_cli.py."""

from __future__ import annotations

import os
import socket
import sys
import traceback
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # spawned children import this module before the test's setup
    sys.path.insert(0, str(REPO))

from datamodules.synthetic import SyntheticEditDataModule  # noqa: E402
from models.inspix2pix import InsPix2Pix  # noqa: E402

WORLD_SIZE = 2
BATCH = 4


# ----------------------------------------------------------------------------- helpers


class OrderedData(SyntheticEditDataModule):
    """The synthetic data with the training batches in file order (no shuffle), so two runs
    (one resumed) see the same batches whatever the global RNG did."""

    def train_dataloader(self) -> DataLoader:
        loader = super().train_dataloader()
        return DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            shuffle=False,
            drop_last=True,
            collate_fn=loader.collate_fn,
        )


def make_data(root, ordered: bool = False, **kwargs) -> SyntheticEditDataModule:
    cls = OrderedData if ordered else SyntheticEditDataModule
    return cls(
        root=str(root),
        resolution=32,
        batch_size=BATCH,
        num_workers=0,
        num_train=64,
        num_val=16,
        num_test=16,
        **kwargs,
    )


def make_model(tiny, **kwargs) -> InsPix2Pix:
    return InsPix2Pix(
        diffusion_path=str(Path(tiny) / "instruct-pix2pix"),
        learning_rate=1e-2,
        weight_decay=0.0,
        num_inference_steps=2,
        **kwargs,
    )


def make_trainer(max_steps: int, callbacks=(), **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        limit_train_batches=2,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(callbacks=list(callbacks), **(defaults | kwargs))


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class RecordDraws(L.Callback):
    """Records, per training step, the generator the model hands its loss (its seed) and the
    noise and timesteps the training scheduler receives."""

    def __init__(self) -> None:
        self.draws: list[dict] = []

    def on_train_start(self, trainer, pl_module) -> None:
        add_noise = pl_module.diffusion.noise_scheduler.add_noise
        losses = pl_module.training_losses

        def training_losses(batch, generator=None):
            self.draws.append({"step": trainer.global_step, "seed": generator.initial_seed()})
            return losses(batch, generator=generator)

        def record_add_noise(latents, noise, timesteps):
            self.draws[-1].update(noise=noise.detach().clone(), timesteps=timesteps.clone())
            return add_noise(latents, noise, timesteps)

        pl_module.training_losses = training_losses
        pl_module.diffusion.noise_scheduler.add_noise = record_add_noise


def fit_and_record(tiny, root, seed: int, **trainer_kwargs) -> list[dict]:
    """Two training steps through the Trainer, seeded as LightningCLI seeds a run."""
    L.seed_everything(seed, workers=True)
    recorder = RecordDraws()
    trainer = make_trainer(2, [recorder], **trainer_kwargs)
    trainer.fit(make_model(tiny), datamodule=make_data(root))
    return recorder.draws


def ddp_rank(rank: int, port: int, tiny: str, root: str, out: str, seed: int) -> None:
    """One of the two processes: the environment a launcher (torchrun, SLURM) gives a rank, so
    Lightning's ``ddp`` strategy joins the group instead of spawning."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(WORLD_SIZE),
        NODE_RANK="0",
        LOCAL_RANK=str(rank),
        HF_HUB_OFFLINE="1",
    )
    try:
        torch.set_num_threads(1)
        draws = fit_and_record(tiny, root, seed, strategy="ddp", devices=WORLD_SIZE)
        torch.save(draws, Path(out) / f"rank{rank}.pt")
    except BaseException:
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference_seed(seed: int, rank: int, step: int) -> int:
    """The generator seed of a step by the documented rule: numpy's SeedSequence over
    (run seed, rank, step, micro-batch 0), first 64-bit word."""
    return int(np.random.SeedSequence([seed, rank, step, 0]).generate_state(2, np.uint64)[0])


@pytest.fixture
def restore_seed_env():
    """``seed_everything`` exports PL_GLOBAL_SEED; keep it out of the other tests."""
    saved = os.environ.get("PL_GLOBAL_SEED")
    yield
    if saved is None:
        os.environ.pop("PL_GLOBAL_SEED", None)
    else:
        os.environ["PL_GLOBAL_SEED"] = saved


# ----------------------------------------------------------------------------- randomness


def test_training_step_draws_only_from_its_step_generator(tiny_dir, synthetic_root):
    """Everything random in a training step comes from (seed, rank, step): the global RNG's
    state neither changes the loss nor is consumed by the step."""
    model = make_model(tiny_dir)
    model.configure_model()
    data = make_data(synthetic_root)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    losses = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        losses.append(model.training_step(batch, 0).detach())
        assert torch.equal(torch.get_rng_state(), before), "the step consumed the global RNG"
    assert torch.equal(losses[0], losses[1])
    # The same loss from the documented seed rule (PL_GLOBAL_SEED unset: seed 0, rank 0, step 0).
    generator = torch.Generator().manual_seed(reference_seed(model.training_seed, 0, 0))
    expected = model.training_losses(batch, generator=generator)["loss"]
    assert torch.equal(losses[0], expected.detach())
    other = model.training_losses(
        batch, generator=torch.Generator().manual_seed(reference_seed(model.training_seed, 1, 0))
    )["loss"]
    assert not torch.equal(other, expected)


@pytest.mark.slow
def test_ranks_draw_differently_and_one_process_reproduces_rank_0(
    tiny_dir, synthetic_root, tmp_path, restore_seed_env
):
    """2 gloo processes through the Trainer (``strategy="ddp"``): the ranks' noise and
    timesteps differ; a 1-process run with the same seed draws rank 0's numbers bit for bit;
    another seed draws others."""
    import torch.multiprocessing as mp

    seed = 7
    context = mp.get_context("spawn")
    port = free_port()
    procs = [
        context.Process(
            target=ddp_rank,
            args=(rank, port, str(tiny_dir), str(synthetic_root), str(tmp_path), seed),
        )
        for rank in range(WORLD_SIZE)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    errors = [f.read_text() for f in sorted(tmp_path.glob("rank*.err"))]
    assert not errors, errors[0]
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]

    for rank, draws in enumerate(ranks):
        assert [d["step"] for d in draws] == [0, 1]
        assert [d["seed"] for d in draws] == [reference_seed(seed, rank, s) for s in (0, 1)]
    for a, b in zip(*ranks, strict=True):
        assert not torch.equal(a["noise"], b["noise"])
        assert not torch.equal(a["timesteps"], b["timesteps"])

    single = fit_and_record(tiny_dir, synthetic_root, seed)
    assert len(single) == 2
    for a, b in zip(single, ranks[0], strict=True):
        assert a["seed"] == b["seed"]
        assert torch.equal(a["noise"], b["noise"]) and torch.equal(a["timesteps"], b["timesteps"])

    other = fit_and_record(tiny_dir, synthetic_root, seed + 1)
    for a, b in zip(other, single, strict=True):
        assert not torch.equal(a["noise"], b["noise"])


# ----------------------------------------------------------------------------- EMA, Trainer

DECAY = 0.25  # small, so the cap min(decay, (1 + s) / (10 + s)) binds within 4 steps


class RecordWeights(L.Callback):
    """The trainable weights at the start and after every optimizer step."""

    def __init__(self) -> None:
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.snapshots = [trainable(pl_module)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.snapshots.append(trainable(pl_module))


@pytest.fixture(scope="module")
def ema_runs(tiny_dir, synthetic_root, tmp_path_factory):
    """An uninterrupted 4-step fit with an EMA, and the same fit stopped at step 2 and resumed
    to step 4; the checkpoints of both. One batch an epoch: Lightning 2.6 resumes a fit that
    ended on ``max_steps`` at the restored batch index of a new epoch, which with longer epochs
    feeds other batches than the uninterrupted run (a data-order matter, not the EMA's)."""
    out = tmp_path_factory.mktemp("ema")
    L.seed_everything(0)
    recorder = RecordWeights()
    trainer = make_trainer(4, [recorder], limit_train_batches=1)
    model = make_model(tiny_dir, ema_decay=DECAY)
    trainer.fit(model, datamodule=make_data(synthetic_root, ordered=True))
    trainer.save_checkpoint(out / "full.ckpt")

    L.seed_everything(0)
    first = make_trainer(2, limit_train_batches=1)
    first.fit(make_model(tiny_dir, ema_decay=DECAY), datamodule=make_data(synthetic_root, True))
    first.save_checkpoint(out / "mid.ckpt")
    L.seed_everything(0)
    second = make_trainer(4, limit_train_batches=1)
    resumed = make_model(tiny_dir, ema_decay=DECAY)
    second.fit(resumed, datamodule=make_data(synthetic_root, True), ckpt_path=out / "mid.ckpt")
    second.save_checkpoint(out / "resumed.ckpt")
    os.environ.pop("PL_GLOBAL_SEED", None)
    return {"model": model, "snapshots": recorder.snapshots, "out": out, "resumed": resumed}


@pytest.mark.slow
def test_ema_equals_the_hand_computed_average(ema_runs):
    """The stored EMA after 4 steps is diffusers' EMAModel rule computed here by hand:
    d_k = 0 at the first update, else min(decay, (1 + s) / (10 + s)) with s = k - 1."""
    snapshots = ema_runs["snapshots"]
    assert len(snapshots) == 5
    shadow = dict(snapshots[0])
    for k, weights in enumerate(snapshots[1:], start=1):
        s = k - 1
        d = 0.0 if s <= 0 else min(DECAY, (1 + s) / (10 + s))
        shadow = {n: shadow[n] - (1 - d) * (shadow[n] - weights[n]) for n in shadow}
    saved = torch.load(ema_runs["out"] / "full.ckpt", map_location="cpu", weights_only=True)
    ema = saved["ema"]
    assert ema["optimization_step"] == 4 and ema["decay"] == DECAY
    # Trainable weights only: the frozen VAE and CLIP text encoder are never copied.
    assert set(ema["shadow_params"]) == set(shadow)
    assert all(n.startswith("diffusion.unet.") for n in shadow)
    assert set(shadow) <= set(saved["state_dict"])
    moved = 0
    for name, expected in shadow.items():
        torch.testing.assert_close(ema["shadow_params"][name], expected, rtol=1e-5, atol=1e-7)
        moved += not torch.equal(expected, snapshots[-1][name])
    assert moved > len(shadow) // 2, "the average should differ from the final weights"


@pytest.mark.slow
def test_resume_restores_the_ema(ema_runs):
    """Stopped at step 2 and resumed to 4: the same EMA (and weights) as the uninterrupted
    fit; a fresh average after the resume would differ."""
    out = ema_runs["out"]
    full = torch.load(out / "full.ckpt", map_location="cpu", weights_only=True)
    mid = torch.load(out / "mid.ckpt", map_location="cpu", weights_only=True)
    resumed = torch.load(out / "resumed.ckpt", map_location="cpu", weights_only=True)
    assert mid["ema"]["optimization_step"] == 2
    assert resumed["global_step"] == full["global_step"] == 4
    assert resumed["ema"]["optimization_step"] == 4
    for name, value in full["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name
    for name, value in full["ema"]["shadow_params"].items():
        assert torch.equal(resumed["ema"]["shadow_params"][name], value), name
    assert ema_runs["resumed"].uses_ema_weights is False  # fit trains the raw weights


def test_final_step_checkpoint_refuses_a_link():
    from editbench.callbacks import FinalStepCheckpoint

    with pytest.raises(ValueError, match="link"):
        FinalStepCheckpoint(save_last="link", every_n_train_steps=2)
