"""InsightEdit on the tiny checkpoints: shapes, L_LLM, trainable sets per stage (LoRA and the new
token rows only on the LLM side), conditioning dropout, λ = 0, ``v_txt`` at init, L_IAA
learning, checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from torch.nn import functional as F
from transformers import CLIPModel, CLIPProcessor, CLIPTextModel, CLIPTokenizer

from models.components.decoupled_attention import add_after_conv_in
from models.insightedit import InsightEdit
from models.stages import parse_stages

R = 4  # [MM] tokens
TEXT_STREAM = {
    "num_queries": 77,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "bim_hidden_size": 32,
    "bim_mlp_dim": 64,
    "bim_num_heads": 4,
}
PAPER_STAGES = [  # SmartEdit's stages (+ IAA from stage 2), as experiments/insightedit.yaml
    {"name": "align", "train": ["qformer", "new_tokens"],
     "losses": {"loss_llm": 1.0, "loss_align": 1.0}, "steps": 1},
    {"name": "edit", "train": ["qformer", "new_tokens", "lora", "unet", "iaa"],
     "losses": {"loss_llm": 1.0, "loss_iaa": 1.0, "loss_edit": 1.0}, "steps": 1},
    {"name": "bim", "train": ["qformer", "new_tokens", "lora", "unet", "iaa", "bim"],
     "losses": {"loss_llm": 1.0, "loss_iaa": 1.0, "loss_edit": 1.0}},
]  # fmt: skip
INSTRUCTIONS = ["make the red circle blue", "remove the green square"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(tiny_dir, **kwargs) -> InsightEdit:
    torch.manual_seed(0)
    kwargs.setdefault("num_inference_steps", 2)
    model = InsightEdit(
        mllm_path=str(tiny_dir / "llava"),
        diffusion_path=str(tiny_dir / "instruct-pix2pix"),
        clip_path=str(tiny_dir / "clip"),
        num_mm_tokens=R,
        text_stream=TEXT_STREAM,
        **kwargs,
    )
    model.configure_model()
    return model


def images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=(32, 32), mode="bilinear")


def batch(n: int = 2) -> dict:
    return {
        "id": [f"s{i}" for i in range(n)],
        "source": images(n, 0),
        "target": images(n, 1),
        "instruction": INSTRUCTIONS[:n],
    }


@pytest.fixture(scope="module")
def model(tiny_dir):
    return build(tiny_dir).eval()


def test_shapes_and_edit(model):
    src = batch()["source"]
    h, _, _ = model.comprehend(src, INSTRUCTIONS)
    assert h.shape == (2, R, model.mllm.hidden_size)
    f_txt, v_txt, f_img, q_prime = model.bridge(h, src)
    width = model.diffusion.unet.config.cross_attention_dim
    assert f_txt.shape == q_prime.shape == (2, 77, width)
    assert v_txt.shape == (2, model.diffusion.unet.config.block_out_channels[0], 16, 16)
    assert f_img.shape == (2, 4, width)
    out = model.edit(src, INSTRUCTIONS, generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 3, 32, 32) and out.expressive is None
    assert torch.isfinite(out.images).all()


def test_llm_loss_is_nll_of_the_mm_tokens(model):
    """L_LLM against the plain LlavaForConditionalGeneration forward (the new rows spliced in by
    the hooks): cross-entropy at the positions that predict the r [MM] tokens only."""
    src = batch()["source"]
    _, loss, _ = model.comprehend(src, INSTRUCTIONS, with_loss=True)
    inputs = model.mllm.training_inputs(src, INSTRUCTIONS, ["", ""])
    with torch.no_grad():
        logits = model.mllm.model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"],
        ).logits
    ids = inputs["input_ids"]
    nll = []
    for row in range(2):
        for pos in (ids[row] >= model.mm_tokens.first_id).nonzero()[:, 0].tolist():
            nll.append(F.cross_entropy(logits[row, pos - 1], ids[row, pos]))
    assert len(nll) == 2 * R
    assert torch.allclose(loss, torch.stack(nll).mean(), atol=1e-5)


def test_new_rows_are_spliced_into_embeddings_and_head(model):
    mllm, rows = model.mllm, model.mm_tokens
    ids = torch.tensor([[1, rows.first_id, rows.first_id + R - 1]])
    embedded = mllm.embed_tokens(ids)
    assert torch.equal(embedded[0, 1], rows.embed[0].detach())
    assert torch.equal(embedded[0, 2], rows.embed[R - 1].detach())
    assert torch.equal(embedded[0, 0], mllm.embed_tokens.weight[1])
    hidden = torch.randn(3, mllm.hidden_size)
    logits = mllm.lm_head(hidden)
    start = rows.first_id
    assert torch.allclose(logits[:, start : start + R], hidden @ rows.head.detach().T, atol=1e-6)
    assert torch.allclose(logits[:, :start], hidden @ mllm.lm_head.weight[:start].T, atol=1e-6)


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("index", [0, 1, 2])
def test_trainable_set_per_stage_and_adamw_state(tiny_dir, index):
    model = build(tiny_dir, stages=PAPER_STAGES)
    model.enter_stage(index)
    model.train()
    names = trainable_names(model)
    groups = set(PAPER_STAGES[index]["train"])
    prefixes = {
        "qformer": ("text_stream.qformer.", "text_stream.query"),
        "new_tokens": ("mm_tokens.",),
        "unet": ("diffusion.unet.",),
        "iaa": ("image_stream.",),
        "bim": tuple(f"text_stream.{m}." for m in ("bim_in", "bim", "txt_out", "img_out")),
    }
    expected = {
        n
        for n, _ in model.named_parameters()
        if any(n.startswith(prefixes[g]) for g in groups if g in prefixes)
        or ("lora" in groups and ".lora_" in n)
    }
    assert names == expected
    # LoRA is the only trainable LLM weight; the vocabulary matrices never train.
    assert all(".lora_" in n for n in names if n.startswith("mllm."))
    assert not model.mllm.embed_tokens.weight.requires_grad
    assert not model.mllm.lm_head.weight.requires_grad
    assert model.bim_active == ("bim" in groups)

    embed_before = model.mllm.embed_tokens.weight.detach().clone()
    rows_before = model.mm_tokens.embed.detach().clone()
    optimizer = torch.optim.AdamW(model.param_groups()[0]["params"], lr=1e-2)
    losses = model.training_losses(batch(), generator=torch.Generator().manual_seed(0))
    assert set(losses) - {"loss", "token_accuracy"} == set(PAPER_STAGES[index]["losses"])
    losses["loss"].backward()
    for name, p in model.named_parameters():
        if name not in names:
            assert p.grad is None, f"frozen {name} got a gradient"
    optimizer.step()
    state = {id(p) for p in optimizer.state}
    assert state == {id(p) for n, p in model.named_parameters() if n in names}
    assert torch.equal(model.mllm.embed_tokens.weight, embed_before)
    assert not torch.equal(model.mm_tokens.embed, rows_before)  # the new rows learn


def test_stage_one_alignment_is_mse_to_clip_text_of_the_instruction(tiny_dir):
    model = build(tiny_dir, stages=PAPER_STAGES)
    model.enter_stage(0)
    model.eval()
    b = batch()
    losses = model.training_losses(b, generator=torch.Generator().manual_seed(0))
    path = tiny_dir / "instruct-pix2pix"
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").eval()
    tokens = tokenizer(INSTRUCTIONS, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        clip = encoder(tokens.input_ids).last_hidden_state
        h, llm, _ = model.comprehend(b["source"], INSTRUCTIONS, with_loss=True)
        q_prime = model.text_stream.qformer_output(h)
    assert torch.allclose(losses["loss_align"], ((q_prime - clip) ** 2).mean(), atol=1e-6)
    assert torch.allclose(losses["loss"], losses["loss_align"] + llm, atol=1e-5)


def test_image_tokens_drop_on_the_rows_whose_text_drops(tiny_dir):
    model = build(tiny_dir, conditioning_dropout_prob=0.3)
    seen = []

    def record(module, args, kwargs):
        seen.append(kwargs["encoder_hidden_states"])

    handle = model.diffusion.unet.register_forward_pre_hook(record, with_kwargs=True)
    text = torch.randn(16, 77, 64)
    tokens = torch.randn(16, 4, 64)
    null_text, null_img = torch.zeros(1, 77, 64), torch.full((1, 4, 64), 7.0)
    src = images(16, 3)
    generator = torch.Generator().manual_seed(1)
    model.diffusion.loss(
        src, src, text, null_text, generator, image_tokens=tokens, null_image_tokens=null_img
    )
    handle.remove()
    got_text, (got_img,) = seen[0]
    dropped_text = (got_text == 0).flatten(1).all(1)
    dropped_img = (got_img == 7.0).flatten(1).all(1)
    assert torch.equal(dropped_text, dropped_img)
    assert 0 < int(dropped_text.sum()) < 16
    # the same draw as the text-only loss: drop_conditions on the same generator state
    reference, _ = model.diffusion.drop_conditions(
        text, null_text, torch.zeros(16, 4, 16, 16), torch.Generator().manual_seed(1)
    )
    assert torch.equal((reference == 0).flatten(1).all(1).sum(), dropped_text.sum())


def test_lambda_zero_equals_the_plain_unet_on_f_txt(model):
    """edit(image_scale=0) = the sampler on a UNet copy with diffusers' default processors,
    conditioned on f_txt (+ v_txt) alone; λ = 1 differs."""
    b = batch()
    src = b["source"]
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    ours = model.edit(src, INSTRUCTIONS, generator=gen(), image_scale=0.0).images
    with torch.no_grad():
        h, _, _ = model.comprehend(src, INSTRUCTIONS)
        f_txt, v_txt, _, _ = model.bridge(h, src)
    plain = copy.deepcopy(model.diffusion)
    plain.unet.set_attn_processor(AttnProcessor2_0())
    with torch.no_grad(), add_after_conv_in(plain.unet, v_txt):
        reference = plain.sample(
            src, f_txt, model.null_text(), num_inference_steps=2, generator=gen()
        )
    assert torch.allclose(ours, reference, atol=1e-5)
    with torch.no_grad():  # a visible image stream: perturb f_img's projection
        for proc in model.diffusion.unet.attn_processors.values():
            if hasattr(proc, "to_v_ip"):
                proc.to_v_ip[0].weight.mul_(3.0)
    try:
        other = model.edit(src, INSTRUCTIONS, generator=gen(), image_scale=1.0).images
    finally:
        with torch.no_grad():
            for proc in model.diffusion.unet.attn_processors.values():
                if hasattr(proc, "to_v_ip"):
                    proc.to_v_ip[0].weight.div_(3.0)
    assert not torch.allclose(other, reference, atol=1e-3)
    assert all(
        p.scale == [model.image_scale]
        for p in model.diffusion.unet.attn_processors.values()
        if hasattr(p, "to_v_ip")
    )


def test_v_txt_is_zero_at_init_and_leaves_the_unet_output_unchanged(model):
    src = batch()["source"]
    with torch.no_grad():
        h, _, _ = model.comprehend(src, INSTRUCTIONS)
        _, v_txt, _, _ = model.bridge(h, src)
        assert torch.count_nonzero(v_txt) == 0
        unet = model.diffusion.unet
        x = torch.randn(2, 8, 16, 16)
        text = torch.randn(2, 77, 64)
        cond = (text, [torch.randn(2, 4, 64)])
        plain = unet(x, 10, encoder_hidden_states=cond).sample
        with add_after_conv_in(unet, v_txt):
            hooked = unet(x, 10, encoder_hidden_states=cond).sample
        assert torch.equal(plain, hooked)
        with add_after_conv_in(unet, torch.ones_like(v_txt)):  # the hook does act
            assert not torch.allclose(unet(x, 10, encoder_hidden_states=cond).sample, plain)


def test_iaa_loss_falls_on_synthetic_data(tiny_dir, synthetic_root):
    """Only the IAA group trains: L_IAA (against CLIPModel.get_image_features of the target)
    falls by half on 16 synthetic training samples."""
    from datamodules.synthetic import SyntheticEditDataModule

    data = SyntheticEditDataModule(
        root=str(synthetic_root), resolution=32, batch_size=16, num_train=64, num_val=16,
        num_test=16, num_workers=0,
    )  # fmt: skip
    data.setup("fit")
    b = next(iter(data.train_dataloader()))
    model = build(tiny_dir, stages=[{"name": "iaa", "train": ["iaa"], "losses": {"loss_iaa": 1.0}}])
    model.enter_stage(0)
    model.train()
    clip = CLIPModel.from_pretrained(tiny_dir / "clip").eval()
    processor = CLIPProcessor.from_pretrained(tiny_dir / "clip")
    pixels = processor(
        images=list(((b["target"] + 1) / 2).clamp(0, 1)), do_rescale=False, return_tensors="pt"
    )["pixel_values"]
    with torch.no_grad():
        target = clip.get_image_features(pixel_values=pixels)
        target = getattr(target, "pooler_output", target)
        h, _, _ = model.comprehend(b["source"], b["instruction"])
    first = model.training_losses(b)["loss_iaa"]
    assert torch.allclose(first, F.mse_loss(model.image_stream.map(h), target), atol=1e-4)
    optimizer = torch.optim.AdamW(model.param_groups()[0]["params"], lr=3e-3)
    for _ in range(60):
        optimizer.zero_grad()
        model.training_losses(b)["loss"].backward()
        optimizer.step()
    last = model.training_losses(b)["loss_iaa"]
    assert last < 0.5 * first


def test_checkpoint_keeps_trainables_only_and_reloads_strictly(tiny_dir, model):
    trained = build(tiny_dir, stages=PAPER_STAGES)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad or p is trained.mm_tokens.embed:
                p.add_(0.01 * torch.randn_like(p))
    checkpoint = {"state_dict": trained.state_dict()}
    trained.on_save_checkpoint(checkpoint)
    keys = checkpoint["state_dict"].keys()
    allowed = ("mm_tokens.", "text_stream.", "image_stream.", "diffusion.unet.")
    assert all(k.startswith(allowed) or ".lora_" in k for k in keys), sorted(keys)[:5]
    assert any(".lora_A." in k for k in keys) and any(".to_k_ip." in k for k in keys)
    assert "mm_tokens.embed" in keys and "mm_tokens.head" in keys
    assert not any("embed_tokens" in k or "lm_head" in k or "vision" in k for k in keys)
    n_saved = sum(checkpoint["state_dict"][k].numel() for k in keys)
    n_trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    buffers = trained.text_stream.pe.positional_embedding.numel()
    assert n_saved == n_trainable + buffers

    fresh = build(tiny_dir, stages=PAPER_STAGES)
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    for a, b in zip(fresh.state_dict().values(), trained.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # stage 3's BIM is used in evaluation after loading a stage-3 checkpoint
    checkpoint["stage"] = {"index": 1, "name": "edit", "stages": parse_stages(PAPER_STAGES)}
    checkpoint["stage"]["stages"] = [s.to_dict() for s in checkpoint["stage"]["stages"]]
    fresh.on_load_checkpoint(checkpoint)
    assert fresh.bim_active is False


def test_unet_init_from_loads_before_the_decoupled_attention(tiny_dir, tmp_path):
    plain = build(tiny_dir, use_image_stream=False)
    state = {
        f"diffusion.unet.{k}": v + 0.5 for k, v in plain.diffusion.unet.state_dict().items()
    }
    path = tmp_path / "ip2p.ckpt"
    torch.save({"state_dict": state}, path)
    model = build(tiny_dir, unet_init_from=str(path))
    layer = model.diffusion.unet.mid_block.attentions[0].transformer_blocks[0].attn2
    assert torch.equal(layer.to_k.weight, state[
        "diffusion.unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    ])  # fmt: skip
    assert torch.equal(layer.processor.to_k_ip[0].weight, layer.to_k.weight)
    assert plain.image_stream is None and model.image_stream is not None
    assert "loss_iaa" not in plain.training_losses(batch())


def test_memory_accounting_counts_what_the_module_trains(tiny_dir, model):
    """benchmarks/memory.py's InsightEdit counts, at the tiny sizes, against the built module."""
    from transformers import LlavaConfig

    from benchmarks.memory import insightedit_parameter_counts

    unet = model.diffusion.unet
    base = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    counts = insightedit_parameter_counts(
        LlavaConfig.from_pretrained(tiny_dir / "llava"),
        base,
        dict(model.diffusion.vae.config),
        num_mm_tokens=R,
        text_stream=TEXT_STREAM,
    )
    groups = model.stage_groups()
    built = {
        "lora": sum(p.numel() for m in groups["lora"] for p in m.parameters()),
        "new_token_rows": sum(p.numel() for p in model.mm_tokens.parameters()),
        "qformer": sum(p.numel() for p in groups["qformer"][0].parameters())
        + model.text_stream.query.numel(),
        "bim": sum(p.numel() for m in groups["bim"] for p in m.parameters()),
        "iaa": sum(p.numel() for p in model.image_stream.parameters()),
        "unet": sum(p.numel() for n, p in unet.named_parameters() if "_ip." not in n),
        "decoupled_attention": sum(p.numel() for n, p in unet.named_parameters() if "_ip." in n),
    }
    assert {k: counts[k] for k in built} == built
    assert sum(built.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)
