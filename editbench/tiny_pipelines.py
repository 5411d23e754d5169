"""Tiny random diffusers editing pipelines for tests (:class:`models.pipeline_baseline.PipelineBaseline`).

Each builder writes a folder with ``DiffusionPipeline.save_pretrained`` (``model_index.json``
plus one subfolder per component), shaped like the released pipelines but with a few thousand
random weights, so the baseline wrapper loads them exactly as it would load
``timbrooks/instruct-pix2pix``, ``diffusers/sdxl-instructpix2pix-768``,
``black-forest-labs/FLUX.1-Kontext-dev`` or ``Qwen/Qwen-Image-Edit``:

- :func:`make_tiny_sdxl_instruct_pix2pix`: two CLIP text encoders (the second with projection),
  an 8-channel SDXL UNet with ``text_time`` added conditioning, an SD VAE;
- :func:`make_tiny_flux_kontext`: CLIP + T5 text encoders, a Flux transformer with guidance
  embedding (the guidance-distilled "dev" model), a 4-latent-channel VAE;
- :func:`make_tiny_qwen_image_edit`: a Qwen2.5-VL text encoder with its processor, a QwenImage
  transformer and its causal 3D VAE;
- :func:`write_ldm_instruct_pix2pix`: the InstructPix2Pix folder of :func:`editbench.tiny.make_tiny`
  as one original-layout (CompVis LDM) ``.safetensors`` file, the format of the InstructPix2Pix
  and MagicBrush releases (``instruct-pix2pix-00-22000.ckpt``,
  ``MagicBrush-epoch-52-step-4999.ckpt``), for diffusers' ``from_single_file``. diffusers ships
  only the reading direction; the writer here inverts its key layout (see
  :func:`ldm_unet_key_map`).

The CLIP and T5 tokenizers are the tiny ones of ``make_tiny`` (``instruct-pix2pix/tokenizer``,
``t5``); the Qwen2 tokenizer is byte-level with no merges plus the chat/vision special tokens
the Qwen-Image-Edit prompt template uses.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

#: Special tokens of the Qwen-Image-Edit prompt template (Qwen2.5-VL's chat and vision markers).
QWEN_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip


def _clip_text(tokenizer, hidden: int, *, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=hidden,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _sd_vae(latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        mid_block_add_attention=False,
        **extra,
    )


def make_tiny_sdxl_instruct_pix2pix(out: str | Path, clip_tokenizer: str | Path, seed: int = 0) -> Path:
    """StableDiffusionXLInstructPix2PixPipeline folder: the UNet takes 8 input channels (noisy
    latent + image latent), cross-attends to the two encoders' concatenated states (32 + 32) and
    adds ``text_time`` embeddings of the pooled text (32) and 6 size ids (6 x 8)."""
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLInstructPix2PixPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTokenizer

    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=8,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        use_linear_projection=True,
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    pipe = StableDiffusionXLInstructPix2PixPipeline(
        vae=_sd_vae(),
        text_encoder=_clip_text(tokenizer, 32),
        text_encoder_2=_clip_text(tokenizer, 32, projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.save_pretrained(out)
    return Path(out)


def make_tiny_flux_kontext(
    out: str | Path, clip_tokenizer: str | Path, t5_tokenizer: str | Path, seed: int = 0
) -> Path:
    """FluxKontextPipeline folder: Flux transformer with guidance embedding (FLUX.1 Kontext
    [dev] is guidance-distilled), joint attention on T5 states (32), pooled CLIP text (32)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxKontextPipeline,
        FluxTransformer2DModel,
    )
    from transformers import AutoTokenizer, CLIPTokenizer, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer)
    tokenizer_2 = AutoTokenizer.from_pretrained(t5_tokenizer)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
        )
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxKontextPipeline(
        scheduler=scheduler,
        vae=_sd_vae(4, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False,
                    use_post_quant_conv=False),
        text_encoder=_clip_text(tokenizer, 32),
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.save_pretrained(out)
    return Path(out)


def qwen_tokenizer():
    """Byte-level Qwen2 tokenizer: 256 byte symbols, no merges, the template's special tokens."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=4096)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIALS[1:])})
    tokenizer.add_special_tokens({"pad_token": "<|endoftext|>"})
    tokenizer.padding_side = "right"
    return tokenizer


def make_tiny_qwen_image_edit(out: str | Path, seed: int = 0) -> Path:
    """QwenImageEditPipeline folder: Qwen2.5-VL (2 layers, width 16, M-RoPE sections 1/1/2) whose
    image processor caps the image at 8 x 8 patches of 14 px, a QwenImage transformer and
    the causal 3D VAE (z 4, scale factor 8, as the release's: the ~1 MP source the
    pipeline encodes becomes 64 x 64 packed tokens)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
            "rope_theta": 1000000.0,
            "max_position_embeddings": 4096,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": 16,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    image_processor = Qwen2VLImageProcessor(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
    )
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
    )
    pipe = QwenImageEditPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=processor,
        transformer=transformer,
    )
    pipe.save_pretrained(out)
    return Path(out)


# --------------------------------------------------------------------------- single-file LDM

#: ResNet parameter names, diffusers -> CompVis LDM UNet (the inverse of the renames diffusers'
#: ``update_unet_resnet_ldm_to_diffusers`` applies).
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
#: VAE mid-block attention names, diffusers -> LDM (``to_out.0`` was LDM's 1x1 ``proj_out``).
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_resnet(rest: str) -> str:
    name, _, param = rest.partition(".")
    return f"{_UNET_RESNET.get(name, name)}.{param}"


def ldm_unet_key_map(state: dict, layers_per_block: int, has_attention: list[bool]) -> dict:
    """diffusers UNet2DConditionModel keys -> LDM ``model.diffusion_model.`` keys.

    LDM numbers the UNet's layers flat: ``input_blocks.0`` is ``conv_in``; down block i's
    resnet j is ``input_blocks.{1 + i(L+1) + j}.0`` (its attention ``.1``) and its downsampler
    ``input_blocks.{1 + i(L+1) + L}.0.op``; the mid block is ``middle_block.0/1/2``; up block
    i's resnet j (L+1 per block) is ``output_blocks.{i(L+1) + j}.0`` (attention ``.1``), its
    upsampler the next module of the block's last layer (``.1.conv``, or ``.2.conv`` after an
    attention); ``time_embed.0/2``, ``out.0/2``, ``label_emb.0.0/0.2`` (SDXL's
    ``add_embedding``). ``has_attention[i]``: up block i has attentions.
    """
    L = layers_per_block
    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
    }
    mapping = {}
    for key in state:
        module, _, param = key.rpartition(".")
        if module in fixed:
            mapping[key] = f"{fixed[module]}.{param}"
            continue
        m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
        if m:
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = 1 + i * (L + 1) + j
            mapping[key] = (
                f"input_blocks.{index}.0.{_rename_resnet(rest)}"
                if kind == "resnets"
                else f"input_blocks.{index}.1.{rest}"
            )
            continue
        m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key)
        if m:
            mapping[key] = f"input_blocks.{1 + int(m[1]) * (L + 1) + L}.0.op.{m[2]}"
            continue
        m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
        if m:
            kind, j, rest = m[1], int(m[2]), m[3]
            if kind == "resnets":
                mapping[key] = f"middle_block.{2 * j}.{_rename_resnet(rest)}"
            else:
                mapping[key] = f"middle_block.1.{rest}"
            continue
        m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
        if m:
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = i * (L + 1) + j
            mapping[key] = (
                f"output_blocks.{index}.0.{_rename_resnet(rest)}"
                if kind == "resnets"
                else f"output_blocks.{index}.1.{rest}"
            )
            continue
        m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key)
        if m:
            i = int(m[1])
            slot = 2 if has_attention[i] else 1
            mapping[key] = f"output_blocks.{i * (L + 1) + L}.{slot}.conv.{m[2]}"
            continue
        raise KeyError(f"no LDM name for UNet weight {key!r}")
    return mapping


def ldm_vae_key_map(state: dict, num_blocks: int) -> dict:
    """diffusers AutoencoderKL keys -> LDM ``first_stage_model.`` keys: ``down_blocks.i.resnets.j``
    is ``down.i.block.j``, decoder ``up_blocks.i`` is ``up.{n-1-i}`` (LDM counts the decoder
    from the lowest resolution up), ``mid_block.resnets.0/1`` is ``mid.block_1/2``, the mid
    attention ``mid.attn_1``, ``conv_shortcut`` is ``nin_shortcut``, ``conv_norm_out`` is
    ``norm_out``."""
    mapping = {}
    for key in state:
        new = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(
            r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new
        )
        m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.", new)
        if m:
            block = num_blocks - 1 - int(m[1])
            part = "block." if m[2] == "resnets" else "upsample."
            new = f"decoder.up.{block}.{part}" + new[m.end():]
        new = re.sub(r"mid_block\.resnets\.(\d)\.", lambda g: f"mid.block_{int(g[1]) + 1}.", new)
        if ".mid_block.attentions.0." in new:
            head, rest = new.split(".mid_block.attentions.0.")
            module, _, param = rest.rpartition(".")
            new = f"{head}.mid.attn_1.{_VAE_ATTENTION[module]}.{param}"
        mapping[key] = new
    return mapping


def ldm_instruct_pix2pix_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a diffusers InstructPix2Pix folder in the CompVis LDM layout of
    ``instruct-pix2pix-00-22000.ckpt``: ``model.diffusion_model.*`` (UNet),
    ``first_stage_model.*`` (VAE; attention projections as 1x1 convolutions),
    ``cond_stage_model.transformer.text_model.*`` (the CLIP text model)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    out: dict[str, torch.Tensor] = {}
    unet_state = unet.state_dict()
    has_attention = ["CrossAttn" in t for t in unet.config.up_block_types]
    mapping = ldm_unet_key_map(unet_state, unet.config.layers_per_block, has_attention)
    for key, value in unet_state.items():
        out["model.diffusion_model." + mapping[key]] = value
    vae_state = vae.state_dict()
    for key, new in ldm_vae_key_map(vae_state, len(vae.config.down_block_types)).items():
        value = vae_state[key]
        if ".attn_1." in new and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out["first_stage_model." + new] = value
    for key, value in text.state_dict().items():
        # The releases hold transformers' CLIPTextModel keys as they were, under `text_model.`
        # (transformers >= 5.6 flattened the class; diffusers' reader strips it again).
        key = key if key.startswith("text_model.") else "text_model." + key
        out["cond_stage_model.transformer." + key] = value
    return {k: v.contiguous() for k, v in out.items()}


def write_ldm_instruct_pix2pix(folder: str | Path, path: str | Path) -> Path:
    """Write :func:`ldm_instruct_pix2pix_state_dict` of ``folder`` to ``path`` (safetensors),
    a single-file checkpoint for ``StableDiffusionInstructPix2PixPipeline.from_single_file``."""
    from safetensors.torch import save_file

    save_file(ldm_instruct_pix2pix_state_dict(folder), str(path))
    return Path(path)


# --------------------------------------------------------------------------- all of them

#: Folder (or file) names under ``make_tiny_pipelines``'s output.
TINY_PIPELINES = {
    "sdxl": "sdxl-instruct-pix2pix",
    "flux": "flux-kontext",
    "qwen": "qwen-image-edit",
    "single_file": "instruct-pix2pix-ldm.safetensors",
}


def make_tiny_pipelines(out: str | Path, tiny: str | Path, names=tuple(TINY_PIPELINES)) -> dict:
    """Build the ``names`` of :data:`TINY_PIPELINES` under ``out`` from a ``make_tiny`` folder
    ``tiny`` (its CLIP / T5 tokenizers and its InstructPix2Pix); returns name -> path."""
    out, tiny = Path(out), Path(tiny)
    out.mkdir(parents=True, exist_ok=True)
    clip = tiny / "instruct-pix2pix" / "tokenizer"
    builders = {
        "sdxl": lambda p: make_tiny_sdxl_instruct_pix2pix(p, clip),
        "flux": lambda p: make_tiny_flux_kontext(p, clip, tiny / "t5"),
        "qwen": make_tiny_qwen_image_edit,
        "single_file": lambda p: write_ldm_instruct_pix2pix(tiny / "instruct-pix2pix", p),
    }
    return {name: builders[name](out / TINY_PIPELINES[name]) for name in names}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m editbench.tiny_pipelines", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--tiny", default=".cache/editbench/tiny", help="`data make-tiny` output")
    parser.add_argument("--out", default=".cache/editbench/tiny-pipelines")
    parser.add_argument("--only", nargs="+", choices=list(TINY_PIPELINES), default=None)
    args = parser.parse_args(argv)
    for name, path in make_tiny_pipelines(args.out, args.tiny, args.only or TINY_PIPELINES).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
