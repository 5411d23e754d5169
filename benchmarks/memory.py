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


def checkpoint_sizes(trainable: int) -> dict[str, float]:
    """GiB on disk: a ``fit`` checkpoint holds the trainable weights (float32) and AdamW's two
    moments, not the frozen weights (models/base.py); an EMA adds one float32 copy; ``export``
    writes the trainable weights alone (editbench/commands/export.py)."""
    return {
        "checkpoint_gib": trainable * 12 / GIB,
        "checkpoint_with_ema_gib": trainable * 16 / GIB,
        "export_gib": trainable * 4 / GIB,
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
        **checkpoint_sizes(trainable),
    }


# --------------------------------------------------------------------------- InsightEdit


def insightedit_parameter_counts(
    llava_config: LlavaConfig = LLAVA_7B,
    unet_config: dict = SD15_UNET,
    vae_config: dict = SD15_VAE,
    *,
    num_mm_tokens: int = 32,
    lora_r: int = 8,
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj"),
    text_stream: dict | None = None,
    num_image_tokens: int = 4,
) -> dict[str, int]:
    """Parameter counts of InsightEdit's parts (``models/insightedit.py``, the 7B config of
    ``experiments/insightedit.yaml``), built on the meta device. Trainable: LoRA on the language
    model's ``q_proj``/``v_proj``, the r new rows of ``embed_tokens`` and ``lm_head``, the
    Q-Former + queries, BIM, IAA (mapper + ``ImageProjection``), the UNet with the decoupled
    attention's ``to_k_ip``/``to_v_ip``. Frozen: LLaVA-7B (with its whole vocabulary), a second
    CLIP ViT-L/14 vision model with projection (``clip_path``: IAA targets, BIM features), the
    CLIP-L text encoder of the diffusion folder (null text, stage-1 targets), the VAE."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionModelWithProjection

    from models.components.bridging import ImageStream, TextStream
    from models.components.decoupled_attention import install_decoupled_attention
    from models.components.mm_tokens import add_lora

    hidden = llava_config.text_config.hidden_size
    vision = llava_config.vision_config
    width = unet_config["cross_attention_dim"]
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(llava_config)
        llava.resize_token_embeddings(
            llava_config.text_config.vocab_size + num_mm_tokens, mean_resizing=False
        )
        lora = add_lora(llava.model.language_model, r=lora_r, target_modules=lora_targets)
        clip = CLIPVisionModelWithProjection(vision)
        text_encoder = CLIPTextModel(  # SD v1.x's CLIP ViT-L/14 text encoder
            CLIPTextConfig(
                hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, projection_dim=768,
            )  # fmt: skip
        )
        unet = UNet2DConditionModel.from_config(unet_config)
        baseline_unet = count(unet.parameters())
        install_decoupled_attention(unet, num_image_tokens)
        vae = AutoencoderKL.from_config(vae_config)
        stream = TextStream(
            hidden,
            hidden_size=width,
            image_feature_dim=vision.hidden_size,
            unet_channels=unet_config["block_out_channels"][0],
            **(text_stream or {}),
        )
        image = ImageStream(
            hidden, image_embed_dim=vision.projection_dim, cross_attention_dim=width,
            num_tokens=num_image_tokens,
        )  # fmt: skip
    lora_params = count(p for m in lora for p in m.parameters())
    bim = [stream.bim_in, stream.image_in, stream.bim, stream.txt_out, stream.img_out]
    return {
        "lora": lora_params,
        "new_token_rows": 2 * num_mm_tokens * hidden,
        "qformer": count(stream.qformer.parameters()) + stream.query.numel(),
        "bim": count(p for m in bim for p in m.parameters()),
        "iaa": count(image.parameters()),
        "unet": baseline_unet,
        "decoupled_attention": count(unet.parameters()) - baseline_unet,
        "mllm_frozen": count(llava.parameters()) - lora_params,
        "clip_vision_frozen": count(clip.parameters()),
        "text_encoder_frozen": count(text_encoder.parameters()),
        "vae_frozen": count(vae.parameters()),
    }


def insightedit_memory_report(counts: dict[str, int], frozen_bytes: int = 2) -> dict[str, float]:
    """GiB of weights, gradients and AdamW state in InsightEdit's stage 3 (every group trains;
    stage 1 trains only ``qformer`` and ``new_token_rows``): bytes as :func:`memory_report`."""
    frozen = sum(v for k, v in counts.items() if k.endswith("_frozen"))
    trainable = sum(v for k, v in counts.items() if not k.endswith("_frozen"))
    stage1 = counts["qformer"] + counts["new_token_rows"]
    return {
        "trainable_params": trainable,
        "frozen_params": frozen,
        "stage1_trainable_params": stage1,
        "frozen_weights_gib": frozen * frozen_bytes / GIB,
        "trainable_weights_gib": trainable * 4 / GIB,
        "gradients_gib": trainable * 4 / GIB,
        "adamw_state_gib": trainable * 8 / GIB,
        "stage1_adamw_state_gib": stage1 * 8 / GIB,
        "total_static_gib": (frozen * frozen_bytes + trainable * 16) / GIB,
        **checkpoint_sizes(trainable),
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
