"""MGIE / LGIE on the tiny checkpoints: losses, trainable sets, sampler parity, checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import StableDiffusionInstructPix2PixPipeline

from models.mgie import LGIE, MGIE

INSTRUCTIONS = ["make the red circle blue", "remove the green square"]
EXPRESSIVE = ["the circle turns blue", "the square is gone and the background shows"]


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear")


def tiny_head() -> dict:
    return {"edit_head_dim": 32, "edit_head_heads": 4, "edit_head_layers": 1, "edit_head_ff": 64}


def build(tiny_dir, cls=MGIE, llm="llava", **kwargs):
    torch.manual_seed(0)
    model = cls(
        mllm_path=str(tiny_dir / llm),
        diffusion_path=str(tiny_dir / "instruct-pix2pix"),
        max_new_tokens=6,
        **tiny_head(),
        **kwargs,
    )
    model.configure_model()
    return model


def batch(n: int = 2) -> dict:
    return {
        "id": [f"s{i}" for i in range(n)],
        "source": smooth_images(n),
        "target": smooth_images(n, seed=1),
        "instruction": INSTRUCTIONS[:n],
        "expressive": EXPRESSIVE[:n],
    }


@pytest.fixture(scope="module")
def mgie(tiny_dir):
    return build(tiny_dir)


def test_loss_is_weighted_sum_and_only_trainables_get_gradients(tiny_dir):
    model = build(tiny_dir, instruction_loss_weight=1.0, edit_loss_weight=0.5)
    model.train()
    losses = model.training_losses(batch(), generator=torch.Generator().manual_seed(0))
    expected = losses["loss_ins"] + 0.5 * losses["loss_edit"]
    assert torch.allclose(losses["loss"], expected, atol=1e-6)
    losses["loss"].backward()

    trainable = {id(p) for g in model.param_groups() for p in g["params"]}
    expected_trainable = (
        {id(p) for p in model.mllm.trainable_parameters()}
        | {id(p) for p in model.edit_head.parameters()}
        | {id(p) for p in model.diffusion.unet.parameters()}
    )
    assert trainable == expected_trainable
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if id(p) in trainable:
            continue
        assert p.grad is None, f"frozen {name} got a gradient"
    # Every trainable part is reached by the loss.
    assert model.mllm.embed_tokens.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.edit_head.parameters())
    assert model.diffusion.unet.conv_in.weight.grad.abs().sum() > 0

    groups = model.param_groups()
    assert [g["lr"] for g in groups] == [5e-4, model.learning_rate] == [5e-4, 1e-4]
    optimizer = torch.optim.AdamW(groups)
    optimizer.step()
    assert {id(p) for p in optimizer.state} == trainable  # no state for frozen weights


def test_without_instruction_loss_the_mllm_learns_only_through_the_edit(tiny_dir):
    model = build(tiny_dir, instruction_loss_weight=0.0)
    model.train()
    losses = model.training_losses(batch(), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(losses["loss"], 0.5 * losses["loss_edit"], atol=1e-6)
    assert losses["loss_ins"] > 0  # still measured and logged


def test_derived_targets_train_the_edit_on_the_models_own_guidance(tiny_dir):
    """MGIE Table 7 "- L_ins" (train_targets derived): no expressive targets are read; the
    edit trains on the guidance the MLLM derives (greedy, max_new_tokens), and L_edit alone
    reaches the word embeddings (through the [IMG] inputs) and the edit head."""
    model = build(tiny_dir, instruction_loss_weight=0.0, train_targets="derived")
    model.train()
    data = batch()
    del data["expressive"]  # no summarised targets in training
    losses = model.training_losses(data, generator=torch.Generator().manual_seed(0))
    assert set(losses) == {"loss", "loss_edit", "guidance_tokens"}
    assert torch.allclose(losses["loss"], 0.5 * losses["loss_edit"], atol=1e-6)
    # with max_new_tokens 6 and a random tiny LLM, the guidance is 1..6 tokens per row
    assert 0 < losses["guidance_tokens"] <= 6
    losses["loss"].backward()
    embed = model.mllm.embed_tokens.weight.grad
    assert embed is not None and embed[model.mllm.img_token_ids].abs().sum() > 0
    assert all(p.grad is not None for p in model.edit_head.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train_targets": "derived"}, "instruction_loss_weight 0"),
        (
            {"train_targets": "derived", "instruction_loss_weight": 0.0, "guidance": "text"},
            "edit_head",
        ),
        ({"train_targets": "summaries"}, "train_targets must be one of"),
    ],
)
def test_derived_targets_need_no_instruction_loss(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MGIE(mllm_path="unused", diffusion_path="unused", **kwargs)


def test_conversation_options_reach_the_mllm(tiny_dir):
    """``prompt_template``, ``chat_template``, ``hidden_position`` and ``new_token_init`` are
    MGIE fields (so YAML can set them) and are what its MLLM runs with."""
    model = build(
        tiny_dir,
        prompt_template="edit: {instruction}",
        chat_template="USER: <image>\n{prompt} ASSISTANT:",
        hidden_position="token",
        new_token_init="mean",
    )
    mllm = model.mllm
    assert mllm.format_prompts(["make it red"]) == ["USER: <image>\nedit: make it red ASSISTANT:"]
    assert mllm.hidden_position == "token"
    rows = mllm.embed_tokens.weight[mllm.img_token_ids]
    mean = mllm.embed_tokens.weight[: min(mllm.img_token_ids)].mean(0)
    torch.testing.assert_close(rows, mean.expand_as(rows))
    # the defaults: the release's conversation (models/components/mllm.py)
    default = build(tiny_dir).mllm
    assert default.format_prompts(["make it red"])[0].endswith(
        "USER: what will this image be like if 'make it red'\n<image> ASSISTANT:"
    )
    assert default.hidden_position == "preceding"


def test_missing_expressive_is_a_clear_error(mgie):
    data = batch()
    del data["expressive"]
    with pytest.raises(KeyError, match="expressive_path"):
        mgie.training_losses(data)


def test_sampler_matches_pipeline_with_prompt_embeds(mgie, tiny_dir):
    """Given the same edit-head embeddings, MGIE's sampler = the diffusers pipeline called with
    prompt_embeds / negative_prompt_embeds, which is how the official demo renders."""
    mgie.eval()
    source = smooth_images(2)
    generation = mgie.mllm.generate(source, INSTRUCTIONS)
    with torch.no_grad():
        cond, null = mgie.guidance_from(generation.img_hidden, generation.img_embeds)
    kwargs = {"num_inference_steps": 6, "guidance_scale": 7.5, "image_guidance_scale": 1.5}
    ours = mgie.render(source, cond, null, generator=torch.Generator().manual_seed(7), **kwargs)
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
        tiny_dir / "instruct-pix2pix", safety_checker=None, requires_safety_checker=False
    )
    pipe.unet.load_state_dict(mgie.diffusion.unet.state_dict())
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        prompt_embeds=cond,
        negative_prompt_embeds=null.expand_as(cond),
        image=(source + 1) / 2,
        generator=torch.Generator().manual_seed(7),
        output_type="pt",
        **kwargs,
    ).images
    ours01 = (ours / 2 + 0.5).clamp(0, 1)
    assert (ours01 - ref).abs().max().item() <= 1e-4
    # Not vacuous: other guidance changes the image.
    other = mgie.render(
        source, cond.flip(0), null, generator=torch.Generator().manual_seed(7), **kwargs
    )
    assert (other - ours).abs().max() > 1e-3


def test_edit_returns_expressive_instructions_and_is_batch_independent(mgie):
    mgie.eval()
    from models.base import sample_generators

    source = smooth_images(2)
    kwargs = {"num_inference_steps": 3}
    both = mgie.edit(source, INSTRUCTIONS, generator=sample_generators(["a", "b"], 0), **kwargs)
    assert isinstance(both.expressive, list) and len(both.expressive) == 2
    assert all(isinstance(t, str) for t in both.expressive)
    one = mgie.edit(source[1:], INSTRUCTIONS[1:], generator=sample_generators(["b"], 0), **kwargs)
    assert one.expressive == both.expressive[1:]
    assert (one.images - both.images[1:]).abs().max() < 1e-4


def test_checkpoint_keeps_trainables_only_and_reloads_strictly(tiny_dir, mgie):
    checkpoint = {"state_dict": mgie.state_dict()}
    mgie.on_save_checkpoint(checkpoint)
    keys = set(checkpoint["state_dict"])
    trainable = {n for n, p in mgie.named_parameters() if p.requires_grad}
    assert trainable <= keys
    assert not any(k.startswith(("diffusion.vae.", "mllm.model.model.language_model.layers"))
                   for k in keys)
    assert not any("vision_tower" in k for k in keys)
    fresh = build(tiny_dir)
    saved = copy.deepcopy(checkpoint)
    fresh.on_load_checkpoint(saved)
    fresh.load_state_dict(saved["state_dict"], strict=True)
    for name, p in fresh.named_parameters():
        assert torch.equal(p, dict(mgie.named_parameters())[name])


def test_lgie_is_text_only(tiny_dir):
    model = build(tiny_dir, cls=LGIE, llm="llama")
    assert not model.visual
    model.train()
    losses = model.training_losses(batch(), generator=torch.Generator().manual_seed(0))
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.edit_head.parameters())
    assert all(p.grad is None for n, p in model.mllm.named_parameters() if not p.requires_grad)
    model.eval()
    out = model.edit(smooth_images(1), INSTRUCTIONS[:1], num_inference_steps=2)
    assert out.images.shape == (1, 3, 32, 32) and len(out.expressive) == 1
    with pytest.raises(ValueError, match="text-only"):
        LGIE(str(tiny_dir / "llama"), str(tiny_dir / "instruct-pix2pix"), visual=True)


def test_ft_guidance_trains_only_the_unet_on_expressive_text(tiny_dir):
    model = build(tiny_dir, guidance="text")
    assert model.edit_head is None and model.text_encoder is not None
    groups = model.param_groups()
    assert len(groups) == 1 and groups[0]["name"] == "diffusion"
    assert {id(p) for p in groups[0]["params"]} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    model.train()
    model.training_losses(batch())["loss"].backward()
    assert all(p.grad is None for p in model.mllm.parameters())
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    assert all(k.startswith("diffusion.unet.") for k in checkpoint["state_dict"])
    model.eval()
    out = model.edit(smooth_images(1), INSTRUCTIONS[:1], num_inference_steps=2)
    assert len(out.expressive) == 1


def test_fz_has_nothing_to_train(tiny_dir):
    model = build(tiny_dir, guidance="text", train_unet=False)
    assert model.param_groups() == []


def test_memory_accounting_counts_what_the_module_trains(tiny_dir, mgie):
    """benchmarks/memory.py's meta-device counts (used for the 7B numbers) equal the real
    module's trainable and frozen parameter counts on the tiny configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import LlavaConfig

    from benchmarks.memory import memory_report, mgie_parameter_counts

    folder = tiny_dir / "instruct-pix2pix"
    head = tiny_head()
    counts = mgie_parameter_counts(
        LlavaConfig.from_pretrained(tiny_dir / "llava"),
        dict(UNet2DConditionModel.load_config(folder / "unet")),
        dict(AutoencoderKL.load_config(folder / "vae")),
        edit_head={
            "d_model": head["edit_head_dim"],
            "nhead": head["edit_head_heads"],
            "num_encoder_layers": head["edit_head_layers"],
            "num_decoder_layers": head["edit_head_layers"],
            "dim_feedforward": head["edit_head_ff"],
        },
    )
    trainable = sum(p.numel() for g in mgie.param_groups() for p in g["params"])
    report = memory_report(counts)
    assert report["trainable_params"] == trainable
    frozen_mllm = sum(p.numel() for p in mgie.mllm.parameters() if not p.requires_grad)
    assert counts["mllm_frozen"] == frozen_mllm
    assert counts["vae_frozen"] == sum(p.numel() for p in mgie.diffusion.vae.parameters())
    assert report["adamw_state_gib"] == pytest.approx(trainable * 8 / 1024**3)


def test_test_step_reports_expressive_accuracy(tiny_dir, synthetic_root, tmp_path):
    """`test` on synthetic data reports the teacher-forced token accuracy, L_ins and the
    generated-vs-ground-truth token match of the expressive instructions."""
    import lightning as L

    from datamodules.synthetic import SyntheticEditDataModule

    model = build(tiny_dir, num_inference_steps=2)
    data = SyntheticEditDataModule(
        root=str(synthetic_root),
        resolution=32,
        eval_batch_size=8,
        num_workers=0,
        max_samples=8,
        num_train=64,
        num_val=16,
        num_test=16,
    )
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    results = trainer.test(model, datamodule=data, verbose=False)[0]
    for key in ("expressive_token_accuracy", "expressive_loss", "expressive_match"):
        assert f"test/{key}" in results
    assert 0.0 <= results["test/expressive_token_accuracy"] <= 1.0
    assert results["test/expressive_loss"] > 0
    assert "test/L1_edit" in results and "test/copy/L1_edit" in results


@pytest.mark.parametrize("cls,llm", [(MGIE, "llava"), (LGIE, "llama")], ids=["llava", "llama"])
def test_encoder_guidance_is_table5_instruction_encoder(tiny_dir, cls, llm):
    """InsPix2Pix + Enc{LLaVA,LLaMA}: only the UNet and the projection train, the condition is
    the projected hidden states of the prompt, and edits are independent of the batch."""
    model = build(tiny_dir, cls=cls, llm=llm, guidance="encoder", num_queries=16)
    trainable = {id(p) for g in model.param_groups() for p in g["params"]}
    assert trainable == {id(p) for p in model.diffusion.unet.parameters()} | {
        id(p) for p in model.instruction_projection.parameters()
    }
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}
    model.train()
    model.training_losses(batch())["loss"].backward()
    assert model.instruction_projection.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.mllm.parameters())

    model.eval()
    source = smooth_images(2)
    cond, null = model.encode_instructions(source, INSTRUCTIONS)
    assert cond.shape == (2, 16, model.diffusion.unet.config.cross_attention_dim)
    assert null.shape == (1, *cond.shape[1:])
    # Independent reference: the projection of the last 16 hidden states of one prompt alone.
    enc = model.mllm.encode_prompts(INSTRUCTIONS[1:], source[1:] if model.visual else None)
    with torch.no_grad():
        hidden = model.mllm.hidden_states(
            enc["input_ids"], enc["attention_mask"], enc.get("pixel_values")
        )
        alone = model.instruction_projection(hidden[:, -16:])
    assert torch.allclose(cond[1:], alone, atol=1e-5)
    from models.base import sample_generators

    both = model.edit(source, INSTRUCTIONS, num_inference_steps=2,
                      generator=sample_generators(["a", "b"], 0)).images
    one = model.edit(source[1:], INSTRUCTIONS[1:], num_inference_steps=2,
                     generator=sample_generators(["b"], 0)).images
    assert (both[1:] - one).abs().max() < 1e-4
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    assert all(k.startswith(("diffusion.unet.", "instruction_projection."))
               for k in checkpoint["state_dict"])


def test_train_llm_adds_the_language_layers_but_not_the_vision_side(tiny_dir):
    model = build(tiny_dir, train_llm=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for g in model.param_groups() for n, p in model.named_parameters()
                         if any(p is q for q in g["params"])}
    assert any(".language_model.layers." in n for n in trainable)
    assert not any("vision_tower" in n or "multi_modal_projector" in n for n in trainable)
    model.train()
    model.training_losses(batch())["loss"].backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    keys = set(checkpoint["state_dict"])
    assert trainable <= keys and not any("vision_tower" in k for k in keys)


def test_align_loss_is_gill_mse_to_the_clip_text_condition(tiny_dir):
    model = build(tiny_dir, align_loss_weight=2.0)
    assert model.text_encoder is not None and "text_encoder" in model.frozen_modules
    model.train()
    data = batch()
    losses = model.training_losses(data, generator=torch.Generator().manual_seed(0))
    rest = losses["loss"] - losses["loss_ins"] - 0.5 * losses["loss_edit"]
    assert torch.allclose(rest, 2.0 * losses["loss_align"], atol=1e-5)
    with torch.no_grad():
        forced = model.mllm.training_forward(data["source"], data["instruction"], data["expressive"])
        cond, _ = model.guidance_from(forced.img_hidden, forced.img_embeds)
        clip = model.encode_text(data["instruction"])
    expected = ((cond - clip) ** 2).mean()
    assert torch.allclose(losses["loss_align"], expected, atol=1e-5)
    losses["loss"].backward()
    assert all(p.grad is None for p in model.text_encoder.parameters())


def test_unet_init_from_also_takes_a_trained_text_encoder(tiny_dir, tmp_path):
    donor = build(tiny_dir, guidance="text")
    state = {f"diffusion.unet.{k}": v + 0.01 for k, v in donor.diffusion.unet.state_dict().items()}
    state |= {f"text_encoder.{k}": v + 0.02 for k, v in donor.text_encoder.state_dict().items()}
    path = tmp_path / "ip2p.ckpt"
    torch.save({"state_dict": state}, path)
    model = build(tiny_dir, guidance="text", unet_init_from=str(path))
    for k, v in model.text_encoder.state_dict().items():
        assert torch.equal(v, state[f"text_encoder.{k}"])
    for k, v in model.diffusion.unet.state_dict().items():
        assert torch.equal(v, state[f"diffusion.unet.{k}"])
