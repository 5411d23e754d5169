"""Memory accounting of MGIE's E2E training from parameter counts (MGIE Sec. 4.1, issue 3).

The networks are built on the ``meta`` device from their configs (no weights, no memory), then
split as MGIE trains them: the word embeddings, LM head, edit head and UNet are trainable;
the vision tower, projector, LLM layers and VAE are frozen. Bytes per parameter:

* frozen weights: their storage dtype (bf16 with ``mllm_dtype: bfloat16``; no gradient, no
  optimizer state);
* trainable weights: float32 weight + float32 gradient + AdamW's two float32 moments
  (``exp_avg``, ``exp_avg_sq``) = 16 bytes, of which the optimizer state is 8.

Activations are not counted (they depend on batch, resolution and checkpointing): measure them
on a GPU with ``torch.cuda.max_memory_allocated``.

    python benchmarks/memory.py              # LLaVA-7B + SD v1.5 (the paper's config)
    python benchmarks/memory.py --json
"""

from __future__ import annotations

import argparse
import json

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from models.components.edit_head import EditHead

GIB = 1024**3

#: LLaVA-7B (Vicuna-7B + CLIP ViT-L/14 at 224 px), as MGIE's released code uses.
LLAVA_7B = LlavaConfig(
    text_config=LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=2048,
    ),
    vision_config=CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        projection_dim=768,
    ),
    projector_hidden_act="gelu",
    tie_word_embeddings=False,
)

#: Stable Diffusion v1.5's UNet (widened to 8 input channels) and VAE.
SD15_UNET = {
    "sample_size": 32,
    "in_channels": 8,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD15_VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
}


def count(parameters) -> int:
    return sum(p.numel() for p in parameters)


def mgie_parameter_counts(
    llava_config: LlavaConfig,
    unet_config: dict,
    vae_config: dict,
    *,
    num_img_tokens: int = 8,
    edit_head: dict | None = None,
) -> dict[str, int]:
    """Parameter counts of MGIE's parts, built on the meta device."""
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(llava_config)
        vocab = llava_config.text_config.vocab_size + num_img_tokens
        llava.resize_token_embeddings(vocab, mean_resizing=False)
        hidden = llava_config.text_config.hidden_size
        head = EditHead(hidden, output_dim=unet_config["cross_attention_dim"], **(edit_head or {}))
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
    embed = count(llava.get_input_embeddings().parameters())
    lm_head = count(llava.get_output_embeddings().parameters())
    return {
        "embed_tokens": embed,
        "lm_head": lm_head,
        "edit_head": count(head.parameters()),
        "unet": count(unet.parameters()),
        "mllm_frozen": count(llava.parameters()) - embed - lm_head,
        "vae_frozen": count(vae.parameters()),
    }


def memory_report(counts: dict[str, int], frozen_bytes: int = 2) -> dict[str, float]:
    """GiB of weights, gradients and AdamW state under MGIE's trainable/frozen split."""
    trainable = counts["embed_tokens"] + counts["lm_head"] + counts["edit_head"] + counts["unet"]
    frozen = counts["mllm_frozen"] + counts["vae_frozen"]
    return {
        "trainable_params": trainable,
        "frozen_params": frozen,
        "frozen_weights_gib": frozen * frozen_bytes / GIB,
        "trainable_weights_gib": trainable * 4 / GIB,
        "gradients_gib": trainable * 4 / GIB,
        "adamw_state_gib": trainable * 8 / GIB,
        "frozen_gradients_gib": 0.0,
        "frozen_adamw_state_gib": 0.0,
        "total_static_gib": (frozen * frozen_bytes + trainable * 16) / GIB,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_img_tokens", type=int, default=8)
    parser.add_argument("--frozen_bytes", type=int, default=2, help="2 = bf16, 4 = fp32")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    counts = mgie_parameter_counts(
        LLAVA_7B, SD15_UNET, SD15_VAE, num_img_tokens=args.num_img_tokens
    )
    report = memory_report(counts, args.frozen_bytes)
    if args.json:
        print(json.dumps({"params": counts, "memory": report}, indent=2))
        return 0
    for name, value in counts.items():
        print(f"{name:<14}{value / 1e6:>12.1f} M params")
    for name, value in report.items():
        unit = "" if name.endswith("params") else " GiB"
        shown = f"{value / 1e6:.1f} M" if name.endswith("params") else f"{value:.2f}"
        print(f"{name:<24}{shown:>10}{unit}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
