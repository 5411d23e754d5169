"""MMIG (models/mmig.py): the DEM's text pieces, the MM-Adapter identity inside the model, MMSM
at initialisation, BLIP-2's captions, L_MMSM falling in stage 1, and through a real Trainer the
trainable set and AdamW state of each of the five stages (Sec. 3.5)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from transformers import (
    AutoTokenizer,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    LlavaForConditionalGeneration,
)

from datamodules.synthetic import SHAPES, SyntheticEditDataModule
from models.components.dem import concept_positions, split_object_background
from models.mmig import LOSS_TERMS, MMIG

STAGES = [
    {"name": "mmsm", "train": ["mmsm"], "losses": {"loss_mmsm": 1, "loss_sdm": 1}, "steps": 1},
    {"name": "mmsm_llm", "train": ["mmsm", "llm"],
     "losses": {"loss_mmt": 1, "loss_mmsm": 1, "loss_sdm": 1}, "steps": 1},
    {"name": "mmsm_dem", "train": ["mmsm", "dem"],
     "losses": {"loss_mmsm": 1, "loss_sdm": 1, "loss_fg": 1, "loss_bg": 1, "loss_as": 1,
                "loss_ar": 1}, "steps": 1},
    {"name": "llm_mmsm_dem", "train": ["llm", "mmsm", "dem"],
     "losses": {"loss_mmt": 1, "loss_sdm": 1, "loss_fg": 1, "loss_bg": 1}, "steps": 1},
    {"name": "end_to_end", "train": ["llm", "mmsm", "dem", "blip2"],
     "losses": {t: 1.0 for t in LOSS_TERMS}},
]  # fmt: skip


def make_model(tiny_dir, **kwargs) -> MMIG:
    args = dict(
        blip2_path=str(tiny_dir / "blip2"),
        mmsm_dim=32,
        attention_resolution=8,
        concept_words=list(SHAPES),
        chat_template="USER: {prompt}\n<image> ASSISTANT:",
        max_new_tokens=6,
        blip2_max_new_tokens=5,
        num_inference_steps=2,
    )
    args.update(kwargs)
    model = MMIG(str(tiny_dir / "llava"), str(tiny_dir / "instruct-pix2pix"), **args)
    model.configure_model()
    return model


@pytest.fixture(scope="module")
def batch(synthetic_root):
    dm = SyntheticEditDataModule(
        root=str(synthetic_root), resolution=32, batch_size=4, num_train=64, num_val=16,
        num_test=16, num_workers=0,
    )  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


# ------------------------------------------------------------------ text pieces


def test_split_object_background_by_hand():
    text = "the image shows a red circle in the top left on a plain beige background"
    assert split_object_background(text, r"\s+on an?\s+") == (
        "the image shows a red circle in the top left",
        "plain beige background",
    )
    # the last match: an object "on a" something keeps its words in the object part
    assert split_object_background("a cat on a mat on an old rug", r"\s+on an?\s+") == (
        "a cat on a mat",
        "old rug",
    )
    assert split_object_background("make it brighter", r"\s+on an?\s+") == ("make it brighter",) * 2
    assert split_object_background("x on a y", None) == ("x on a y", "x on a y")


def test_concept_positions_against_the_tokens(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "instruct-pix2pix", subfolder="tokenizer")
    prompts = ["move the red circle to the top left", "a blue square and a green circle", "darken"]
    got = concept_positions(tokenizer, prompts, ["circle", "square"])
    for prompt, positions in zip(prompts, got, strict=True):
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(prompt)["input_ids"])
        expected = [i for i, t in enumerate(tokens) if t in ("circle</w>", "square</w>")]
        assert positions == expected
    assert [len(p) for p in got] == [1, 2, 0]
    assert concept_positions(tokenizer, prompts, None) == [[], [], []]


# ------------------------------------------------------------------ inside the model


def test_adapters_are_the_identity_at_init_and_e_llm(tiny_dir, batch):
    """e_llm = the plain LLaVA's last hidden states at the answer's positions."""
    model = make_model(tiny_dir, blip2_path=None)
    llm = model.mllm
    texts = list(batch["expressive"][:2])
    out = llm.describe_forward(batch["source"][:2], batch["instruction"][:2], texts)
    inputs = llm.training_inputs(batch["source"][:2], batch["instruction"][:2], texts)
    plain = LlavaForConditionalGeneration.from_pretrained(tiny_dir / "llava").eval()
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        hidden = plain.model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"],
            position_ids=positions,
        ).last_hidden_state
    for i in range(2):
        keep = inputs["labels"][i] != -100
        n = int(keep.sum())
        torch.testing.assert_close(out.e_llm[i, :n], hidden[i][keep], rtol=1e-5, atol=1e-5)
        assert out.mask[i, :n].all() and not out.mask[i, n:].any()
    # only θ_a can train, and there is one adapter per LLaMA block
    trainable = {n for n, p in llm.named_parameters() if p.requires_grad}
    assert trainable and all("mm_adapter" in n for n in trainable)
    assert len(llm.adapters.adapters) == plain.config.text_config.num_hidden_layers


def test_mmsm_at_init_leaves_the_edit_unchanged_and_captions(tiny_dir, batch):
    """MMSM's decoder starts at zero, so the edit is the DEM's own; the captions are BLIP-2's
    own greedy generation from the library model."""
    model = make_model(tiny_dir).eval()
    source, instructions = batch["source"][:2], batch["instruction"][:2]
    out = model.edit(source, instructions, generator=torch.Generator().manual_seed(3))
    cond, _ = model.dem_condition(model.dem_prompts(out.expressive, instructions))
    with torch.no_grad():
        plain = model.render(source, cond, model.null_text(),
                             generator=torch.Generator().manual_seed(3))  # fmt: skip
    torch.testing.assert_close(out.images, plain)
    assert len(out.expressive) == 2 and len(out.caption) == 2
    blip = Blip2ForConditionalGeneration.from_pretrained(tiny_dir / "blip2").eval()
    processor = Blip2Processor.from_pretrained(tiny_dir / "blip2")
    processor.tokenizer.padding_side = "left"
    unit = ((out.images.clamp(-1, 1) + 1) / 2).clamp(0, 1)
    enc = processor(images=list(unit), text=["", ""], return_tensors="pt", do_rescale=False)
    with torch.no_grad():
        ids = blip.generate(**enc, max_new_tokens=5, do_sample=False)
    expected = processor.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert out.caption == [t.strip() for t in expected]


def test_all_terms_finite_and_only_weighted_terms_computed(tiny_dir, batch):
    model = make_model(tiny_dir, conditioning_dropout_prob=0.0)
    model.train()
    out = model.training_losses(batch, generator=torch.Generator().manual_seed(0))
    assert set(LOSS_TERMS) <= set(out)
    assert all(torch.isfinite(v) for v in out.values())
    total = sum(out[t] for t in LOSS_TERMS)  # without stages every weight is 1 (Eq. 22)
    torch.testing.assert_close(out["loss"].detach(), total)
    # every sample names at least one shape, so L_AR is on; L_fg / L_bg are norms (> 0)
    assert out["loss_ar"] > 0 and out["loss_fg"] > 0 and out["loss_bg"] >= 0
    staged = make_model(tiny_dir, blip2_path=None, stages=STAGES[:1])
    staged.enter_stage(0)
    only = staged.training_losses(batch, generator=torch.Generator().manual_seed(0))
    assert set(only) == {"loss", "loss_mmsm", "loss_sdm"}
    torch.testing.assert_close(only["loss"].detach(), only["loss_mmsm"] + only["loss_sdm"])


@pytest.mark.slow
def test_mmsm_loss_falls_in_stage_one(tiny_dir, synthetic_root):
    """Stage 1 (MMSM alone, L_MMSM + L_SDM) on the tiny synthetic data. e_2 is the detached
    target (``mmsm_detach: features``) but the domain encoder still learns from L_SDM, so e_2
    first grows and L_MMSM with it, then the MLP catches up: L_MMSM ends well below its peak,
    and e_2 does not collapse to zero (which both sides trained on L_MMSM alone could do)."""
    torch.manual_seed(0)
    model = make_model(tiny_dir, blip2_path=None, stages=STAGES[:1])
    model.enter_stage(0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(p) for p in model.mmsm.parameters()}
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    dm = SyntheticEditDataModule(
        root=str(synthetic_root), resolution=32, batch_size=16, num_train=64, num_val=16,
        num_test=16, num_workers=0,
    )  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    losses, norms = [], []
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        for batch in dm.train_dataloader():
            out = model.training_losses(batch, generator=generator)
            optimizer.zero_grad()
            out["loss"].backward()
            optimizer.step()
            losses.append(float(out["loss_mmsm"]))
            norms.append(float(model._last_e2_norm))
    peak, last = max(losses), sum(losses[-4:]) / 4
    assert losses.index(peak) < len(losses) - 4 and last < 0.5 * peak, losses
    assert norms[-1] > norms[0] > 0, norms


# ------------------------------------------------------------------ stages through a Trainer


class Record(L.Callback):
    """At each step: the stage, the trainable parameters, the optimizer's parameters and (after
    the step) the parameters holding AdamW state."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        optimizer = trainer.optimizers[0]
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        with_state = {id(p) for p, s in optimizer.state.items() if s}
        trainable = {id(p) for p in pl_module.parameters() if p.requires_grad}
        self.steps.append((pl_module.stage_index, trainable, in_optimizer, with_state))


@pytest.mark.slow
def test_each_stage_trains_its_groups_with_fresh_adamw(tiny_dir, synthetic_root):
    model = make_model(tiny_dir, stages=STAGES)
    dm = SyntheticEditDataModule(
        root=str(synthetic_root), resolution=32, batch_size=2, num_train=64, num_val=16,
        num_test=16, num_workers=0,
    )  # fmt: skip
    record = Record()
    trainer = L.Trainer(
        max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, limit_val_batches=0, callbacks=[record],
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    assert [s[0] for s in record.steps] == [0, 1, 2, 3, 4]
    groups = model.stage_groups()
    for (_, trainable, in_optimizer, with_state), stage in zip(record.steps, STAGES, strict=True):
        expected = {id(p) for g in stage["train"] for m in groups[g] for p in m.parameters()}
        if "blip2" in stage["train"]:
            expected.add(id(model.blip2.query_tokens))
        assert trainable == expected, stage["name"]
        assert in_optimizer == expected, stage["name"]  # AdamW rebuilt over exactly these
        assert with_state and with_state <= expected, stage["name"]
