"""editbench/memory.py: parameter counts of the paper architectures against published figures,
the saved-activation measurement against hand counts and real tensors, the byte accounting."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn

from editbench import memory
from editbench.activations import saved_activations, unet_activations
from editbench.memory import (
    GIB,
    Measurement,
    PartCount,
    Setup,
    estimate,
    fits,
    max_batch_per_gpu,
    on_meta,
)

# Published parameter counts (independent of this code):
LLAMA_7B = 6_738_415_616  # LLaMA-7B (Meta's release; HF LlamaForCausalLM, vocab 32,000)
SD15_UNET = 859_520_964  # Stable Diffusion v1.5 UNet, 4 input channels (diffusers)
CLIP_L14_VISION = 303_179_776  # CLIP ViT-L/14 vision tower without the 1024x768 projection
SD_VAE = 83_653_863  # Stable Diffusion's AutoencoderKL


def llama_by_formula(vocab: int, d: int = 4096, ff: int = 11008, layers: int = 32) -> int:
    """Embeddings + head (untied) + per layer q,k,v,o (4 d^2), gate/up/down (3 d ff) and two
    RMSNorms, + the final norm."""
    return 2 * vocab * d + layers * (4 * d * d + 3 * d * ff + 2 * d) + d


def test_llama_formula_is_the_published_count():
    assert llama_by_formula(32000) == LLAMA_7B


@pytest.mark.slow
def test_architectures_on_meta_have_the_published_counts():
    from transformers import CLIPVisionModel, LlamaForCausalLM

    llama = on_meta(lambda: LlamaForCausalLM(memory.llama_7b_config(32000)))
    assert memory.count(llama) == LLAMA_7B
    unet4 = on_meta(lambda: memory.sd15_unet(4))
    assert memory.count(unet4) == SD15_UNET
    assert memory.count(on_meta(lambda: memory.sd15_unet(8))) == SD15_UNET + 4 * 320 * 3 * 3
    vision = on_meta(lambda: CLIPVisionModel(memory.clip_vit_l14_vision_config(224)))
    assert memory.count(vision) == CLIP_L14_VISION
    # 336 px only adds position embeddings: (24^2 + 1 - (16^2 + 1)) x 1024
    vision336 = on_meta(lambda: CLIPVisionModel(memory.clip_vit_l14_vision_config(336)))
    assert memory.count(vision336) == CLIP_L14_VISION + (576 - 256) * 1024
    assert memory.count(on_meta(memory.sd_vae)) == SD_VAE


def test_recorded_counts_are_the_published_ones():
    """The recorded measurements (which the CLI and the presets use) hold the published counts
    plus exactly what each model adds."""
    parts = {m: {p.name: p for p in memory.MEASURED[m].parts} for m in memory.MODELS}
    unet8 = SD15_UNET + 11_520
    for model in ("MGIE", "LGIE", "InsPix2Pix"):
        assert parts[model]["unet"].params == parts[model]["unet"].trainable == unet8
        assert parts[model]["vae"].params == SD_VAE and parts[model]["vae"].trainable == 0
    # LGIE: LLaMA-7B with 8 new rows in embed_tokens and lm_head, which train
    assert parts["LGIE"]["llm"].params == llama_by_formula(32008)
    assert parts["LGIE"]["llm"].trainable == 2 * 32008 * 4096
    # MGIE: LLaVA's tower (+ its projector, linear_1 1024->4096 and the identity linear_2)
    projector = 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert parts["MGIE"]["vision"].params == CLIP_L14_VISION + projector
    assert parts["MGIE"]["llm"].params == llama_by_formula(32011)
    assert parts["MGIE"]["llm"].trainable == 2 * 32011 * 4096
    # the edit head (Appendix B): Linear(4096, 512), 77 queries, nn.Transformer(512, 4 heads,
    # 4 + 4 layers, ff 2048) with its two final norms, Linear(512, 768)
    attention, ff, norm = 4 * 512 * 512 + 4 * 512, 2 * 512 * 2048 + 2048 + 512, 2 * 512
    transformer = 4 * (attention + ff + 2 * norm) + 4 * (2 * attention + ff + 3 * norm) + 2 * norm
    edit_head = 4096 * 512 + 512 + 77 * 512 + transformer + 512 * 768 + 768
    assert parts["MGIE"]["edit_head"].params == parts["MGIE"]["edit_head"].trainable == edit_head
    # InsightEdit: LoRA r 8 on q_proj and v_proj of 32 layers: 2 x 2 x (4096 x 8) each
    assert parts["InsightEdit"]["llm"].trainable == 32 * 2 * 2 * 4096 * 8
    assert parts["InsightEdit"]["new_tokens"].trainable == 2 * 32 * 4096
    assert parts["InsightEdit"]["clip_vision"].params == CLIP_L14_VISION + 1024 * 768
    # the decoupled attention's bias-free to_k_ip/to_v_ip (768 -> width) in the 16
    # cross-attention layers: widths 320 x (2 down + 3 up), 640 x (2 + 3), 1280 x (2 + 1 mid + 3)
    widths = 320 * 5 + 640 * 5 + 1280 * 6
    assert parts["InsightEdit"]["unet"].params == unet8 + 2 * 768 * widths


class Block(nn.Module):
    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return self.down(nn.functional.gelu(self.up(x)))


def test_saved_bytes_equal_the_hand_count():
    """Two blocks Linear(4, 16) -> GELU -> Linear(16, 4) on x [2, 4] float32: each block saves
    its input (32 B, for the weight gradient), GELU's input [2, 16] (128 B) and the second
    Linear's input [2, 16] (128 B); the weights are not activations."""
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block())
    x = torch.randn(2, 4, requires_grad=True)
    acts = saved_activations(lambda: model(x).sum(), exclude=[model], units=(Block,))
    assert acts.total == 2 * (32 + 128 + 128)
    assert [sum(u.values()) for u in acts.units] == [288, 288]
    # checkpointed: the two blocks' inputs (x and block 1's output) + one block recomputed
    assert acts.checkpointed == 32 + 32 + 288
    assert acts.checkpointed < acts.total


TINY_UNET = {
    "sample_size": 4, "in_channels": 8, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": (32, 64), "cross_attention_dim": 32, "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
}


def test_meta_measurement_equals_the_real_one():
    """A tiny 8-channel UNet on CPU with real tensors (PyTorch's CPU flash attention) saves
    what its meta copy saves under :func:`memory.fused_attention`."""
    torch.manual_seed(0)
    real = UNet2DConditionModel(**TINY_UNET)
    meta = on_meta(lambda: UNet2DConditionModel(**TINY_UNET))
    resolution = 32
    measured_real = unet_activations(real, resolution)
    with memory.fused_attention():
        measured_meta = unet_activations(meta, resolution)
    assert measured_real.total > 0
    assert measured_meta.total == measured_real.total
    assert measured_meta.checkpointed == measured_real.checkpointed
    assert measured_real.checkpointed < measured_real.total
    # activations grow with the latent's area: 4x the pixels, more than 3x the bytes
    bigger = unet_activations(real, 2 * resolution)
    assert bigger.total > 3 * measured_real.total
    # the text condition's width reaches every cross-attention: a real, not a shape-only, run
    assert measured_real.units and all(sum(u.values()) > 0 for u in measured_real.units)


TOY = Measurement(
    "InsPix2Pix", 256,
    (PartCount("a", 1000, 600, 2, unit_params=800, unit_trainable=500, largest_unit=100),),
    {"x": (1000, 100)},
)


def test_byte_accounting_by_hand(monkeypatch):
    """1,000 parameters, 600 trainable (float32), 400 frozen at 2 B; 800 inside FSDP units
    (500 trainable), the largest unit 100."""
    monkeypatch.setitem(memory.MEASURED, "InsPix2Pix", TOY)
    ddp = estimate(Setup("InsPix2Pix", "ddp", "adamw", checkpointing=False), 8)
    assert ddp.weights == 600 * 4 + 400 * 2
    assert ddp.grads == 600 * 4 * 2  # + DDP's bucket copy
    assert ddp.optimizer == 600 * 8
    assert ddp.autocast == 600 * 2
    assert ddp.activations_per_sample == 1000
    static = 3200 + 4800 + 4800 + 1200
    assert ddp.peak(3) == static + 3000 + memory.FIXED_OVERHEAD + int(0.1 * (static + 3000))
    zero2 = estimate(Setup("InsPix2Pix", "zero2", "adamw8bit"), 4)
    assert zero2.weights == 3200 and zero2.activations_per_sample == 100
    assert zero2.grads == 600 * 4 // 4
    assert zero2.optimizer == int((2 + 8 / 2048) * 600 / 4)
    fsdp = estimate(Setup("InsPix2Pix", "fsdp", "adamw"), 4)
    # under FSDP every weight is float32 (one dtype per flattened unit)
    assert fsdp.weights == int(800 * 4 / 4 + 200 * 4 + 2 * 2 * 100)
    assert fsdp.grads == int(4 * (500 / 4 + 100))  # the root unit's 100 trainable stay whole


@pytest.mark.parametrize("model", memory.MODELS)
@pytest.mark.parametrize("gpu_gb", [24, 40, 80])
def test_max_batch_fits_and_one_more_does_not(model, gpu_gb):
    setup = Setup(model, "fsdp", "adamw8bit")
    batch = max_batch_per_gpu(setup, gpu_gb, 8)
    assert batch >= 1
    assert fits(setup, gpu_gb, 8, batch) and not fits(setup, gpu_gb, 8, batch + 1)
    assert estimate(setup, 8).peak(batch) <= gpu_gb * GIB


def test_the_reference_repos_oom_at_batch_one_on_24gb():
    """The issue's report: MGIE with plain AdamW under DDP does not fit one sample in 24 GB."""
    assert max_batch_per_gpu(Setup("MGIE", "ddp", "adamw"), 24, 8) == 0
    assert max_batch_per_gpu(Setup("InsightEdit", "ddp", "adamw"), 24, 8) == 0


def test_checkpointing_and_sharding_lower_the_peak():
    for model in memory.MODELS:
        with_ckpt = estimate(Setup(model, checkpointing=True), 8)
        without = estimate(Setup(model, checkpointing=False), 8)
        assert with_ckpt.activations_per_sample < without.activations_per_sample
        assert estimate(Setup(model, "fsdp"), 8).peak(1) < estimate(Setup(model), 8).peak(1)
        assert estimate(Setup(model, optimizer="adamw8bit"), 8).optimizer < with_ckpt.optimizer


@pytest.mark.slow
@pytest.mark.parametrize("model", memory.MODELS)
def test_recorded_measurements_are_a_fresh_measurement(model):
    fresh = memory.measure(model)
    recorded = memory.MEASURED[model]
    assert fresh.parts == recorded.parts
    assert {k: tuple(v) for k, v in fresh.activations.items()} == {
        k: tuple(v) for k, v in recorded.activations.items()
    }
    assert dataclasses.asdict(fresh)["resolution"] == 256
