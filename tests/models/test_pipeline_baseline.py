"""PipelineBaseline: released diffusers editing pipelines as EditModels, on tiny random folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from editbench import tiny_pipelines as tp
from models.base import sample_generators
from models.pipeline_baseline import PipelineBaseline, pipeline_class_name

INSTRUCTIONS = ["make the square red", "add a blue circle"]
IDS = ["s0", "s1"]


@pytest.fixture(scope="session")
def ip2p_dir(tiny_dir):
    return tiny_dir / "instruct-pix2pix"


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_dir, tmp_path_factory):
    """Builds one tiny pipeline folder (or the single file) on first request."""
    out = tmp_path_factory.mktemp("tiny_pipelines")
    built: dict = {}

    def get(name: str):
        if name not in built:
            built.update(tp.make_tiny_pipelines(out, tiny_dir, [name]))
        return built[name]

    return get


def sources(n: int = 2, size: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return torch.rand(n, 3, size, size, generator=generator) * 2 - 1


def test_sd_instruct_pix2pix_equals_the_diffusers_pipeline(ip2p_dir):
    """The wrapper's edit = StableDiffusionInstructPix2PixPipeline called directly on the [0, 1]
    images with the same per-sample generators (numpy output, compared on [0, 1])."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    model = PipelineBaseline(
        str(ip2p_dir), num_inference_steps=3, guidance_scale=6.0, image_guidance_scale=1.3
    )
    source = sources()
    ours = model.edit(source, INSTRUCTIONS, generator=sample_generators(IDS, 0)).images
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(ip2p_dir)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(
        prompt=INSTRUCTIONS,
        image=(source + 1) / 2,
        num_inference_steps=3,
        guidance_scale=6.0,
        image_guidance_scale=1.3,
        generator=sample_generators(IDS, 0),
        output_type="np",
    ).images
    ours01 = ((ours + 1) / 2).permute(0, 2, 3, 1).numpy()
    assert ours.shape == source.shape
    np.testing.assert_allclose(ours01, reference, atol=1e-5)
    assert not np.allclose(ours01, ((source + 1) / 2).permute(0, 2, 3, 1).numpy(), atol=1e-2)


def test_guidance_arguments_reach_the_pipeline(ip2p_dir):
    """αV is the pipeline's image_guidance_scale: another value gives another edit."""
    model = PipelineBaseline(str(ip2p_dir), num_inference_steps=2)
    source = sources(1)
    a = model.edit(source, INSTRUCTIONS[:1], generator=sample_generators(IDS[:1], 0)).images
    b = model.edit(
        source, INSTRUCTIONS[:1], image_guidance_scale=2.5, generator=sample_generators(IDS[:1], 0)
    ).images
    again = model.edit(source, INSTRUCTIONS[:1], generator=sample_generators(IDS[:1], 0)).images
    assert torch.equal(a, again)
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("key", "expected"),
    [  # Stable Diffusion v1 (2 layers per block; up blocks UpBlock2D then 3 x CrossAttnUpBlock2D)
        ("conv_in.weight", "input_blocks.0.0.weight"),
        ("time_embedding.linear_2.bias", "time_embed.2.bias"),
        ("down_blocks.0.resnets.1.norm1.weight", "input_blocks.2.0.in_layers.0.weight"),
        ("down_blocks.1.attentions.1.proj_in.weight", "input_blocks.5.1.proj_in.weight"),
        ("down_blocks.1.resnets.0.conv_shortcut.weight", "input_blocks.4.0.skip_connection.weight"),
        ("down_blocks.2.downsamplers.0.conv.weight", "input_blocks.9.0.op.weight"),
        ("mid_block.resnets.1.conv2.bias", "middle_block.2.out_layers.3.bias"),
        (
            "mid_block.attentions.0.transformer_blocks.0.norm1.weight",
            "middle_block.1.transformer_blocks.0.norm1.weight",
        ),
        ("up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.1.conv.weight"),
        ("up_blocks.1.upsamplers.0.conv.weight", "output_blocks.5.2.conv.weight"),
        ("up_blocks.3.resnets.2.time_emb_proj.weight", "output_blocks.11.0.emb_layers.1.weight"),
        ("conv_norm_out.weight", "out.0.weight"),
    ],
)
def test_ldm_unet_names_of_stable_diffusion_v1(key, expected):
    assert tp.ldm_unet_key_map({key: None}, 2, [False, True, True, True])[key] == expected


def test_ldm_vae_names():
    mapping = tp.ldm_vae_key_map(
        {
            k: None
            for k in (
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                "encoder.down_blocks.0.downsamplers.0.conv.bias",
                "decoder.up_blocks.0.resnets.2.norm1.weight",
                "decoder.up_blocks.1.upsamplers.0.conv.weight",
                "decoder.mid_block.resnets.1.conv1.weight",
                "encoder.mid_block.attentions.0.to_out.0.weight",
                "decoder.conv_norm_out.bias",
            )
        },
        num_blocks=4,
    )
    assert list(mapping.values()) == [
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.0.downsample.conv.bias",
        "decoder.up.3.block.2.norm1.weight",
        "decoder.up.2.upsample.conv.weight",
        "decoder.mid.block_2.conv1.weight",
        "encoder.mid.attn_1.proj_out.weight",
        "decoder.norm_out.bias",
    ]


def test_single_file_checkpoint_loads_the_folder_weights(ip2p_dir, tiny_pipeline):
    """The LDM-layout file read by from_single_file (configs from the folder, offline) holds
    every weight of the folder's UNet, VAE and text encoder, and edits identically."""
    single = tiny_pipeline("single_file")
    keys = tp.ldm_instruct_pix2pix_state_dict(ip2p_dir)
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in keys)
    folder = PipelineBaseline(str(ip2p_dir), num_inference_steps=2)
    from_file = PipelineBaseline(str(ip2p_dir), single_file=str(single), num_inference_steps=2)
    for name in ("unet", "vae", "text_encoder"):
        a = getattr(folder.pipeline, name).state_dict()
        b = getattr(from_file.pipeline, name).state_dict()
        assert a.keys() == b.keys(), name
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}.{key}"
    source = sources()
    x = folder.edit(source, INSTRUCTIONS, generator=sample_generators(IDS, 0)).images
    y = from_file.edit(source, INSTRUCTIONS, generator=sample_generators(IDS, 0)).images
    torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("ip2p", {}),
        ("sdxl", {"guidance_scale": 3.0}),
        ("flux", {"guidance_scale": 2.5}),
        pytest.param(
            "qwen", {"true_cfg_scale": 4.0, "negative_prompt": " "}, marks=pytest.mark.slow
        ),
    ],
)
def test_edits_do_not_depend_on_the_batch(name, kwargs, ip2p_dir, tiny_pipeline):
    """Batch of 2 vs each sample alone, same per-sample generators: the same images."""
    path = ip2p_dir if name == "ip2p" else tiny_pipeline(name)
    model = PipelineBaseline(str(path), num_inference_steps=2, **kwargs)
    source = sources()
    both = model.edit(source, INSTRUCTIONS, generator=sample_generators(IDS, 0)).images
    assert both.shape == source.shape and both.min() >= -1 and both.max() <= 1
    for i in range(2):
        alone = model.edit(
            source[i : i + 1], INSTRUCTIONS[i : i + 1], generator=sample_generators(IDS[i : i + 1], 0)
        ).images
        torch.testing.assert_close(alone[0], both[i], atol=1e-4, rtol=0)
    assert (both[0] - both[1]).abs().max() > 1e-3


def test_class_name_comes_from_model_index(ip2p_dir, tmp_path):
    assert pipeline_class_name(ip2p_dir) == "StableDiffusionInstructPix2PixPipeline"
    assert PipelineBaseline(str(ip2p_dir)).resolve_class_name() == pipeline_class_name(ip2p_dir)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        pipeline_class_name(tmp_path)
    with pytest.raises(ValueError, match="not supported"):
        PipelineBaseline(str(ip2p_dir), pipeline_class="StableDiffusionPipeline").resolve_class_name()


def test_nothing_trains_and_nothing_is_checkpointed(ip2p_dir):
    model = PipelineBaseline(str(ip2p_dir))
    model.configure_model()
    assert not any(p.requires_grad for p in model.parameters())
    state = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(state)
    assert state["state_dict"] == {}
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match="does not train"):
        model.setup("fit")
    model.setup("test")  # evaluation is fine
