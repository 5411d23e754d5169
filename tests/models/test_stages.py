"""The staged curriculum (models/stages.py): parsing, stage_at, and through a real Trainer the
trainable set, AdamW state, frozen groups, loss weights, resume and the separate-runs form.
The CLI form on the tiny InsPix2Pix: tests/cli/test_stages_cli.py."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from models.base import EditModel
from models.checkpoint import CheckpointMismatchError
from models.stages import Stage, StagedModel, StageError, parse_stages, stage_at

# ----------------------------------------------------------------------------- parsing


def test_parse_stages_from_plain_dicts():
    stages = parse_stages(
        [
            {"name": "align", "train": ["a"], "losses": {"loss_x": 1}, "steps": 3},
            {
                "name": "joint",
                "train": ["a", "b"],
                "losses": {"loss_y": 0.5},
                "learning_rate": 1e-5,
            },
        ]
    )
    assert stages == [
        Stage("align", ("a",), {"loss_x": 1.0}, steps=3),
        Stage("joint", ("a", "b"), {"loss_y": 0.5}, learning_rate=1e-5),
    ]
    assert parse_stages(None) == []
    assert parse_stages([{"train": ["a"]}])[0].name == "stage1"


@pytest.mark.parametrize(
    ("stages", "words"),
    [
        ([{"name": "s1", "train": ["a"], "steps": 2, "epochs": 1}], ["'s1'", "stages[0]", "not both"]),
        ([{"name": "s1", "train": ["a"]}, {"name": "s2", "train": ["a"]}], ["'s1'", "length"]),
        ([{"name": "s1", "train": ["a"], "step": 2}], ["'s1'", "unknown key 'step'"]),
        ([{"name": "s1", "train": "a"}], ["'s1'", ".train"]),
        ([{"name": "s1", "steps": 0}], ["'s1'", ".steps", "positive"]),
        ([{"name": "s1", "losses": {"loss_x": "big"}}], ["'s1'", "losses.loss_x"]),
        ([{"name": "s1", "steps": 2}, {"name": "s1"}], ["stages[1]", "'s1'", "earlier"]),
        ([{"name": "s1", "steps": 2}, {"name": "s2", "epochs": 1}, {"name": "s3"}],
         ["'s2'", ".epochs", "one unit"]),
        ([{"name": "s1", "train": ["zz"]}], ["'s1'", ".train", "unknown group 'zz'", "a, b"]),
        ([{"name": "s1", "losses": {"loss_q": 1}}], ["'s1'", ".losses", "unknown loss term"]),
    ],
)  # fmt: skip
def test_parse_errors_name_the_stage_and_key(stages, words):
    with pytest.raises(StageError) as err:
        parse_stages(stages, groups=["a", "b"], loss_terms=["loss_x", "loss_y"])
    for word in words:
        assert word in str(err.value)


def test_stage_at_steps_and_epochs():
    by_steps = parse_stages([{"steps": 2}, {"steps": 3}, {}])
    got = [stage_at(by_steps, step, epoch=99) for step in range(8)]
    assert got == [0, 0, 1, 1, 1, 2, 2, 2]
    by_epochs = parse_stages([{"epochs": 1}, {"epochs": 2}, {}])
    got = [stage_at(by_epochs, global_step=99, epoch=e) for e in range(5)]
    assert got == [0, 1, 1, 2, 2]
    assert stage_at(parse_stages([{}]), 10**6, 10**6) == 0


# ----------------------------------------------------------------------------- a small model

STAGES = [
    {"name": "s1", "train": ["a"], "losses": {"loss_x": 1.0}, "steps": 3},
    {"name": "s2", "train": ["b", "c"], "losses": {"loss_y": 0.5, "loss_z": 2.0}, "steps": 3,
     "learning_rate": 0.05},
    {"name": "s3", "train": ["a", "c"], "losses": {"loss_x": 1.0, "loss_z": 1.0}},
]  # fmt: skip


class Toy(StagedModel, EditModel):
    """Three Linear groups after a frozen backbone; ``c`` is also listed frozen (as a model's
    ``train_text_encoder: false`` would), which stages must override in checkpoints."""

    frozen_modules = ("backbone", "c")

    def __init__(self, **kwargs) -> None:
        super().__init__(**{"learning_rate": 0.01, **kwargs})
        torch.manual_seed(0)
        self.backbone = nn.Linear(4, 4).requires_grad_(False)
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1)
        self.last_terms: dict[str, torch.Tensor] = {}

    def stage_groups(self):
        return {"a": [self.a], "b": [self.b], "c": [self.c]}

    def loss_terms(self):
        return ("loss_x", "loss_y", "loss_z")

    def training_losses(self, batch, generator=None):
        x = torch.randn(8, 4, generator=generator)
        h = self.b(torch.tanh(self.a(self.backbone(x))))
        terms = {
            "loss_x": h.pow(2).mean(),
            "loss_y": (h - 1).abs().mean(),
            "loss_z": self.c(h).pow(2).mean(),
        }
        self.last_terms = {k: v.detach().clone() for k, v in terms.items()}
        return {"loss": self.weighted_loss(terms), **self.last_terms}


def loader(n: int = 10) -> DataLoader:
    return DataLoader([{"id": str(i)} for i in range(n)], batch_size=2)


def trainer(tmp_path=None, **kwargs) -> L.Trainer:
    callbacks = kwargs.pop("callbacks", [])
    if tmp_path is not None:
        callbacks.append(
            L.pytorch.callbacks.ModelCheckpoint(
                dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}"
            )
        )
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=tmp_path is not None,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
        **kwargs,
    )


class Recorder(L.Callback):
    """Per micro-batch: stage, trainable names, AdamW state names, lr, weights, loss."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        names = {id(p): n for n, p in module.named_parameters()}
        optimizer = trainer.optimizers[0]
        self.rows.append(
            {
                "step": trainer.global_step,
                "stage": module.stage_index,
                "trainable": {n for n, p in module.named_parameters() if p.requires_grad},
                "in_optimizer": {names[id(p)] for g in optimizer.param_groups for p in g["params"]},
                "state": {names[id(p)] for p in optimizer.state},
                "lr": optimizer.param_groups[0]["lr"],
                "weights": {n: p.detach().clone() for n, p in module.named_parameters()},
                "loss": outputs["loss"].detach().clone(),
                "terms": dict(module.last_terms),
                "weights_of_terms": dict(module.loss_weights),
            }
        )


def params_of(*groups: str) -> set[str]:
    return {f"{g}.{w}" for g in groups for w in ("weight", "bias")}


TRAINS = [params_of("a"), params_of("b", "c"), params_of("a", "c")]


def test_trainable_set_adamw_state_frozen_groups_and_loss_weights():
    recorder = Recorder()
    model = Toy(stages=STAGES)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer(max_steps=8, callbacks=[recorder]).fit(model, loader())
    rows = recorder.rows
    assert [r["stage"] for r in rows] == [0, 0, 0, 1, 1, 1, 2, 2]
    previous = before
    for row in rows:
        trains = TRAINS[row["stage"]]
        assert row["trainable"] == trains
        assert row["in_optimizer"] == trains
        assert row["state"] == trains  # no stale state of earlier stages, none for frozen ones
        for name, value in row["weights"].items():
            same = torch.equal(value, previous[name])
            assert same == (name not in trains), (row["step"], name)
        previous = row["weights"]
        # terms that are off contribute nothing: the loss is the hand-weighted sum of the on ones
        weights = STAGES[row["stage"]]["losses"]
        expected = sum(w * row["terms"][t] for t, w in weights.items())
        torch.testing.assert_close(row["loss"], expected, rtol=0, atol=1e-7)
        assert row["weights_of_terms"] == {t: weights.get(t, 0.0) for t in Toy().loss_terms()}
    assert [r["lr"] for r in rows] == [0.01] * 3 + [0.05] * 3 + [0.01] * 2
    assert torch.equal(rows[-1]["weights"]["backbone.weight"], before["backbone.weight"])


def test_boundaries_fall_on_optimizer_steps_under_accumulation():
    recorder = Recorder()
    stages = [dict(STAGES[0], steps=2), STAGES[2]]
    trainer(max_steps=4, accumulate_grad_batches=2, callbacks=[recorder]).fit(
        Toy(stages=stages), loader(16)
    )
    assert [r["stage"] for r in recorder.rows] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [r["step"] for r in recorder.rows] == [0, 1, 1, 2, 2, 3, 3, 4]


def test_epoch_boundaries():
    recorder = Recorder()
    stages = [
        dict(STAGES[0], steps=None, epochs=1),
        dict(STAGES[1], steps=None, epochs=1),
        STAGES[2],
    ]
    trainer(max_epochs=3, callbacks=[recorder]).fit(Toy(stages=stages), loader(6))
    assert [r["stage"] for r in recorder.rows] == [0] * 3 + [1] * 3 + [2] * 3


def final_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("resume_step", [3, 4])  # at the boundary, in the middle of stage 2
def test_resume_in_stage_two_equals_the_uninterrupted_run(tmp_path, resume_step):
    stages = STAGES[:2] + [dict(STAGES[2], name="s3")]
    full = Toy(stages=stages)
    trainer(tmp_path / "full", max_steps=8).fit(full, loader())
    ckpt = tmp_path / "full" / f"step={resume_step}.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["stage"]["index"] == (0 if resume_step == 3 else 1)
    assert saved["stage"]["name"] == ("s1" if resume_step == 3 else "s2")
    assert set(saved["state_dict"]) == params_of("a", "b", "c")  # c: a group, so saved
    resumed = Toy(stages=stages)
    recorder = Recorder()
    trainer(max_steps=8, callbacks=[recorder]).fit(resumed, loader(), ckpt_path=ckpt)
    assert recorder.rows[0]["state"] == TRAINS[1]
    for key, value in final_weights(full).items():
        torch.testing.assert_close(final_weights(resumed)[key], value, rtol=0, atol=1e-7)


def test_resume_with_other_stages_is_refused(tmp_path):
    trainer(tmp_path, max_steps=4).fit(Toy(stages=STAGES), loader())
    renamed = [dict(s, name=f"x{i}") for i, s in enumerate(STAGES)]
    with pytest.raises(StageError, match="'s2'"):
        trainer(max_steps=6).fit(Toy(stages=renamed), loader(), ckpt_path=tmp_path / "step=4.ckpt")


def test_separate_runs_form(tmp_path):
    first = Toy(stages=[dict(STAGES[0], steps=None)])
    trainer(tmp_path / "one", max_steps=3).fit(first, loader())
    ckpt = tmp_path / "one" / "step=3.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    # every group any stage trains is in the stage-1 checkpoint, the frozen backbone is not
    assert set(saved["state_dict"]) == params_of("a", "b", "c")
    assert saved["stage"] == {"index": 0, "name": "s1", "stages": saved["stage"]["stages"]}
    after_one = final_weights(first)
    assert not torch.equal(after_one["a.weight"], final_weights(Toy())["a.weight"])

    second = Toy(stages=[dict(STAGES[1], steps=None)], init_from=str(ckpt))
    recorder = Recorder()
    trainer(max_steps=2, callbacks=[recorder]).fit(second, loader())
    assert recorder.rows[0]["trainable"] == TRAINS[1]
    end = final_weights(second)
    torch.testing.assert_close(end["a.weight"], after_one["a.weight"], rtol=0, atol=0)
    torch.testing.assert_close(end["backbone.weight"], after_one["backbone.weight"], rtol=0, atol=0)
    assert not torch.equal(end["b.weight"], after_one["b.weight"])

    # init_from is strict: a checkpoint without a group's weights is refused
    del saved["state_dict"]["c.weight"]
    torch.save(saved, tmp_path / "partial.ckpt")
    partial = Toy(stages=[dict(STAGES[1], steps=None)], init_from=str(tmp_path / "partial.ckpt"))
    with pytest.raises(CheckpointMismatchError, match="c.weight"):
        trainer(max_steps=1).fit(partial, loader())


def test_without_stages_nothing_changes():
    model = Toy()
    assert model.loss_weight("loss_z") == 1.0
    assert not model._is_frozen_key("a.weight") and model._is_frozen_key("c.weight")
    with pytest.raises(StageError, match="ema_decay"):
        Toy(stages=STAGES, ema_decay=0.9)


def test_the_learning_rate_schedule_restarts_and_spans_each_stage():
    recorder = Recorder()
    stages = [dict(STAGES[0], steps=2), dict(STAGES[2], learning_rate=0.02)]
    trainer(max_steps=6, callbacks=[recorder]).fit(
        Toy(stages=stages, lr_schedule="cosine"), loader()
    )
    # the lr after each step's scheduler update: cosine over stage 1's 2 steps down to 0, then
    # from stage 2's own rate over its 4 steps (the run's 6 minus 2) down to 0
    cosine = [0.01 * 0.5 * (1 + math.cos(math.pi * k / 2)) for k in (1, 2)]
    cosine += [0.02 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in (1, 2, 3, 4)]
    assert [r["lr"] for r in recorder.rows] == pytest.approx(cosine, abs=1e-12)
