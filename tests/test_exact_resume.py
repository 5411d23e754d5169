"""Exact mid-epoch resume (issue 16, item 2), through the Trainer on the tiny InsPix2Pix and the
synthetic data: a fit of 12 steps over epochs of 5 batches, and the same fit resumed from the
checkpoint ``ModelCheckpoint(every_n_train_steps=7)`` wrote at step 7 (batch 3 of epoch 2),
end with the same weights (1e-6), the same logged per-step losses (the CSV logger's
``metrics.csv``), the same batches in the same order, the same learning rates, EMA and stage.
"""

from __future__ import annotations

import csv
import os
import socket
import sys
import traceback
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.types import _Stateful
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # spawned children import this module before the test's setup
    sys.path.insert(0, str(REPO))

from datamodules.concat import ConcatEditDataModule  # noqa: E402
from datamodules.synthetic import SyntheticEditDataModule  # noqa: E402
from models.inspix2pix import InsPix2Pix  # noqa: E402

BATCH = 4
EPOCH = 5  # batches an epoch: 20 training samples
STEPS = 12  # not a multiple of EPOCH
STOP = 7  # the interruption, mid-epoch (batch 3 of epoch 2)
SEED = 3
NOT_RESUMABLE = "not resumable"
STAGES = [  # the boundary (step 9) falls after the interruption
    {"name": "text", "train": ["text_encoder"], "losses": {"loss_edit": 1.0}, "steps": 9},
    {"name": "unet", "train": ["unet"], "losses": {"loss_edit": 1.0}},
]


def synthetic(root, samples: int = 4 * EPOCH, **kwargs) -> SyntheticEditDataModule:
    """The fixture's synthetic data (its sizes, so nothing is regenerated), ``samples``
    training samples, random flips on."""
    defaults = dict(
        resolution=32, batch_size=BATCH, num_workers=0, num_train=64, num_val=16, num_test=16,
        max_samples=samples, random_flip=0.5,
    )  # fmt: skip
    return SyntheticEditDataModule(root=str(root), **(defaults | kwargs))


def make_data(root, concat: bool = False, **kwargs):
    if not concat:
        return synthetic(root, **kwargs)
    members = [synthetic(root, 12), synthetic(root, 8, random_flip=0.0)]
    return ConcatEditDataModule(members, resolution=32, batch_size=BATCH, **kwargs)


class Record(L.Callback):
    """Per optimizer step: the batch's ids, the loss, the learning rate used, the EMA's
    update count, the stage."""

    def __init__(self) -> None:
        self.steps: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1  # the step just taken
        ema = pl_module._ema
        self.steps[step] = {
            "ids": list(batch["id"]),
            "loss": float(outputs["loss"]),
            "lr": trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0],
            "ema_updates": None if ema is None else ema.optimization_step,
            "stage": getattr(pl_module, "stage_index", None),
        }


def fit(tiny, root, out: Path, *, ckpt_path=None, data=None, model=None, trainer=None):
    """One fit to STEPS steps, checkpoints at step STOP (and at the epoch end, step 5) in
    ``out/ckpt``, the CSV log in ``out/log``; returns (trainer, model, recorder, warnings)."""
    data, model, trainer = data or {}, model or {}, trainer or {}
    L.seed_everything(SEED)
    recorder = Record()
    callbacks = [
        recorder,
        ModelCheckpoint(out / "ckpt", "{step}", every_n_train_steps=STOP, save_top_k=-1),
        ModelCheckpoint(out / "epoch", "{step}", every_n_train_steps=EPOCH, save_top_k=-1),
    ]
    settings = dict(
        accelerator="cpu", devices=1, max_steps=STEPS, limit_val_batches=0,
        num_sanity_val_steps=0, log_every_n_steps=1, logger=CSVLogger(out, name="log"),
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    trainer = L.Trainer(**(settings | trainer))
    module = InsPix2Pix(
        diffusion_path=str(Path(tiny) / "instruct-pix2pix"), learning_rate=1e-2,
        weight_decay=0.0, num_inference_steps=2, warmup_steps=3, lr_schedule="cosine", **model,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=make_data(root, **data), ckpt_path=ckpt_path)
    os.environ.pop("PL_GLOBAL_SEED", None)
    return trainer, module, recorder, [str(w.message) for w in caught]


def logged_losses(trainer) -> dict[int, float]:
    """``train/loss`` by step from the CSV logger's ``metrics.csv``."""
    path = Path(trainer.logger.log_dir) / "metrics.csv"
    with path.open() as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r["train/loss"]}


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def weights(model) -> dict[str, torch.Tensor]:
    """Every weight a checkpoint holds (the trainable set changes with stages)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def check_same_run(full, resumed, start: int = STOP) -> None:
    """The resumed fit (from step ``start``) repeats the uninterrupted one's steps
    ``start..STEPS-1``."""
    (t_full, m_full, r_full, _), (t_res, m_res, r_res, caught) = full, resumed
    assert t_res.global_step == t_full.global_step == STEPS
    assert not any(NOT_RESUMABLE in w for w in caught), [w for w in caught if NOT_RESUMABLE in w]
    assert isinstance(t_res.train_dataloader, _Stateful)
    assert sorted(r_res.steps) == list(range(start, STEPS))
    for step in range(start, STEPS):
        a, b = r_full.steps[step], r_res.steps[step]
        assert a["ids"] == b["ids"], f"step {step}: other batch"
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12, abs=0), f"step {step}: lr"
        assert (a["ema_updates"], a["stage"]) == (b["ema_updates"], b["stage"]), step
    full_log, res_log = logged_losses(t_full), logged_losses(t_res)
    assert sorted(full_log) == list(range(STEPS)) and sorted(res_log) == list(range(start, STEPS))
    for step, value in res_log.items():
        assert value == pytest.approx(full_log[step], rel=1e-6, abs=1e-7), f"step {step}"
    a, b = weights(m_full), weights(m_res)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)


@pytest.fixture
def no_seed_env():
    saved = os.environ.get("PL_GLOBAL_SEED")
    yield
    os.environ.pop("PL_GLOBAL_SEED", None)
    if saved is not None:
        os.environ["PL_GLOBAL_SEED"] = saved


def stop_checkpoint(out: Path, step: int = STOP, folder: str = "ckpt") -> Path:
    return out / folder / f"step={step}.ckpt"


# ----------------------------------------------------------------------------- one process


@pytest.mark.slow
def test_resume_mid_epoch_with_ema(tiny_dir, synthetic_root, tmp_path, no_seed_env):
    """No workers, EMA on: same batches, losses, lr, EMA and weights; the checkpoint holds the
    loader's position (epoch 1, 2 batches in) and a mid-epoch EMA of 7 updates."""
    kw = dict(model={"ema_decay": 0.5})
    full = fit(tiny_dir, synthetic_root, tmp_path / "full", **kw)
    ckpt = stop_checkpoint(tmp_path / "full")
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    position = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert position == [
        {"epoch": 1, "batches": STOP - EPOCH, "batch_size": BATCH, "num_replicas": 1, "seed": SEED}
    ]
    assert saved["ema"]["optimization_step"] == STOP
    resumed = fit(tiny_dir, synthetic_root, tmp_path / "resumed", ckpt_path=ckpt, **kw)
    check_same_run(full, resumed)
    assert full[2].steps[STEPS - 1]["ema_updates"] == STEPS
    shadow_full, shadow_res = full[1]._ema.shadow(), resumed[1]._ema.shadow()
    for name, value in shadow_full.items():
        torch.testing.assert_close(shadow_res[name], value, rtol=0, atol=1e-6, msg=name)
    # A shuffled order and live flips: the interruption is not trivially exact.
    ids = full[2].steps
    assert ids[0]["ids"] + ids[1]["ids"] != sorted(ids[0]["ids"] + ids[1]["ids"])
    assert ids[0]["ids"] != ids[EPOCH]["ids"]  # a new permutation each epoch


@pytest.mark.slow
def test_resume_mid_epoch_with_workers(tiny_dir, synthetic_root, tmp_path, no_seed_env):
    """Two persistent workers (which prefetch past the checkpoint): the same run, from the
    mid-epoch checkpoint and from the one written on the last batch of epoch 1 (step 5)."""
    kw = dict(data={"num_workers": 2})
    full = fit(tiny_dir, synthetic_root, tmp_path / "full", **kw)
    resumed = fit(
        tiny_dir, synthetic_root, tmp_path / "res", ckpt_path=stop_checkpoint(tmp_path / "full"), **kw
    )
    check_same_run(full, resumed)
    at_end = stop_checkpoint(tmp_path / "full", EPOCH, "epoch")
    check_same_run(full, fit(tiny_dir, synthetic_root, tmp_path / "end", ckpt_path=at_end, **kw), EPOCH)


@pytest.mark.slow
def test_resume_before_a_stage_boundary(tiny_dir, synthetic_root, tmp_path, no_seed_env):
    """A staged curriculum (text encoder for 9 steps, then the UNet): interrupted in stage 1,
    resumed, it enters stage 2 at step 9 as the uninterrupted fit does."""
    kw = dict(model={"stages": STAGES})
    full = fit(tiny_dir, synthetic_root, tmp_path / "full", **kw)
    ckpt = stop_checkpoint(tmp_path / "full")
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["stage"]["index"] == 0
    resumed = fit(tiny_dir, synthetic_root, tmp_path / "res", ckpt_path=ckpt, **kw)
    check_same_run(full, resumed)
    stages = [resumed[2].steps[s]["stage"] for s in range(STOP, STEPS)]
    assert stages == [0, 0, 1, 1, 1]


@pytest.mark.slow
def test_resume_a_concatenation(tiny_dir, synthetic_root, tmp_path, no_seed_env):
    """ConcatEditDataModule (12 + 8 samples): the mixture's order resumes too. Its
    checkpoint names the members by class and arguments (a weights-only load refuses
    pickled DataModules)."""
    kw = dict(data={"concat": True})
    full = fit(tiny_dir, synthetic_root, tmp_path / "full", **kw)
    ckpt = stop_checkpoint(tmp_path / "full")
    members = torch.load(ckpt, weights_only=True)["datamodule_hyper_parameters"]["datamodules"]
    assert [m["class_path"] for m in members] == ["datamodules.synthetic.SyntheticEditDataModule"] * 2
    assert [m["init_args"]["max_samples"] for m in members] == [12, 8]
    resumed = fit(tiny_dir, synthetic_root, tmp_path / "res", ckpt_path=ckpt, **kw)
    check_same_run(full, resumed)


# ----------------------------------------------------------------------------- DDP

WORLD_SIZE = 2


def ddp_rank(rank: int, port: int, tiny: str, root: str, out: str) -> None:
    """One of two gloo processes (the environment a launcher gives a rank): the uninterrupted
    fit, then the fit resumed from its step-STOP checkpoint; saves what each step saw."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD_SIZE),
        NODE_RANK="0", LOCAL_RANK=str(rank), HF_HUB_OFFLINE="1",
    )  # fmt: skip
    try:
        torch.set_num_threads(1)
        out = Path(out)
        kw = dict(trainer={"strategy": "ddp", "devices": WORLD_SIZE})
        runs = {}
        for name, ckpt in (("full", None), ("resumed", stop_checkpoint(out / "full"))):
            trainer, model, recorder, caught = fit(tiny, root, out / name, ckpt_path=ckpt, **kw)
            runs[name] = {
                "steps": recorder.steps, "weights": weights(model), "warnings": caught,
                "loader": trainer.train_dataloader.state_dict(),
            }  # fmt: skip
        torch.save(runs, out / f"rank{rank}.pt")
    except BaseException:
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_resume_mid_epoch_under_ddp(tiny_dir, synthetic_root, tmp_path):
    """2 gloo processes (epochs of 10 samples a rank, 2 batches, so step 7 is mid-epoch too):
    each rank resumes its own share of the epoch; the same losses, weights on every rank."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    port = free_port()
    args = (port, str(tiny_dir), str(synthetic_root), str(tmp_path))
    procs = [context.Process(target=ddp_rank, args=(r, *args)) for r in range(WORLD_SIZE)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=900)
    errors = [f.read_text() for f in sorted(tmp_path.glob("rank*.err"))]
    assert not errors, errors[0]
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    saved = torch.load(stop_checkpoint(tmp_path / "full"), map_location="cpu", weights_only=True)
    per_rank = 4 * EPOCH // WORLD_SIZE // BATCH  # batches a rank hands out per epoch
    position = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (position["epoch"], position["batches"]) == divmod(STOP, per_rank)
    assert position["num_replicas"] == WORLD_SIZE
    for runs in ranks:
        full, resumed = runs["full"], runs["resumed"]
        assert not any(NOT_RESUMABLE in w for w in resumed["warnings"])
        assert sorted(resumed["steps"]) == list(range(STOP, STEPS))
        for step in range(STOP, STEPS):
            a, b = full["steps"][step], resumed["steps"][step]
            assert a["ids"] == b["ids"], step
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7), step
            assert b["lr"] == pytest.approx(a["lr"], rel=1e-12, abs=0), step
        for name, value in full["weights"].items():
            torch.testing.assert_close(resumed["weights"][name], value, rtol=0, atol=1e-6)
    # the ranks saw different samples and hold the same weights
    assert ranks[0]["full"]["steps"][STOP]["ids"] != ranks[1]["full"]["steps"][STOP]["ids"]
    for name, value in ranks[0]["resumed"]["weights"].items():
        assert torch.equal(ranks[1]["resumed"]["weights"][name], value), name
