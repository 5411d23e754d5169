"""InsPix2Pix and the diffusion core against diffusers' own pipeline and training recipe."""

from __future__ import annotations

import copy

import diffusers
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel

from benchmarks.reference import reference_ip2p_loss
from models.diffusion import EditDiffusion
from models.inspix2pix import InsPix2Pix

PROMPTS = ["make the red circle blue", "remove the green square"]


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(
        low, size=(size, size), mode="bilinear", align_corners=False
    )


def build(path, **kwargs) -> InsPix2Pix:
    model = InsPix2Pix(diffusion_path=str(path), **kwargs)
    model.configure_model()
    return model.eval()


@pytest.mark.parametrize(
    "scheduler",
    [None, "DDIMScheduler", "DPMSolverMultistepScheduler"],
    ids=["euler_ancestral", "ddim", "dpmpp"],
)
def test_edit_matches_diffusers_pipeline(tiny_dir, scheduler):
    """Same folder, scheduler, seed, steps and scales → the pipeline's images within 1e-4."""
    path = tiny_dir / "instruct-pix2pix"
    model = build(path, scheduler=scheduler)
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
        path, safety_checker=None, requires_safety_checker=False
    )
    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    source = smooth_images(2)
    kwargs = {"num_inference_steps": 8, "guidance_scale": 7.5, "image_guidance_scale": 1.5}
    ours = model.edit(source, PROMPTS, generator=torch.Generator().manual_seed(42), **kwargs).images
    ref = pipe(
        prompt=PROMPTS,
        image=(source + 1) / 2,
        generator=torch.Generator().manual_seed(42),
        output_type="pt",
        **kwargs,
    ).images
    ours01 = (ours / 2 + 0.5).clamp(0, 1)
    assert ours01.shape == ref.shape
    assert (ours01 - ref).abs().max().item() <= 1e-4
    # The edit must depend on the instruction and on the seed, or the parity above is vacuous.
    other = model.edit(
        source, PROMPTS[::-1], generator=torch.Generator().manual_seed(42), **kwargs
    ).images
    assert (other - ours).abs().max() > 1e-3


def test_single_branch_when_guidance_is_off(tiny_dir):
    """αX ≤ 1 disables guidance in the pipeline; ours must follow the same rule."""
    path = tiny_dir / "instruct-pix2pix"
    model = build(path)
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
        path, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    source = smooth_images(1)
    kwargs = {"num_inference_steps": 4, "guidance_scale": 1.0, "image_guidance_scale": 1.5}
    ours = model.edit(
        source, PROMPTS[:1], generator=torch.Generator().manual_seed(3), **kwargs
    ).images
    ref = pipe(
        prompt=PROMPTS[:1],
        image=(source + 1) / 2,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
        **kwargs,
    ).images
    assert ((ours / 2 + 0.5).clamp(0, 1) - ref).abs().max().item() <= 1e-4


def test_one_batched_unet_call_per_step(tiny_dir):
    model = build(tiny_dir / "instruct-pix2pix")
    calls = []
    handle = model.diffusion.unet.register_forward_hook(
        lambda m, args, out: calls.append(args[0].shape[0])
    )
    model.edit(
        smooth_images(2), PROMPTS, num_inference_steps=5, generator=torch.Generator().manual_seed(0)
    )
    handle.remove()
    assert calls == [6] * 5  # three branches × batch 2, once per step


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_loss_matches_reference_recipe(tiny_dir, prediction_type):
    """Same generator → the same loss as the diffusers example's step, ε and v."""
    path = tiny_dir / "instruct-pix2pix"
    model = build(path, prediction_type=prediction_type, conditioning_dropout_prob=0.3)
    source, target = smooth_images(8, seed=1), smooth_images(8, seed=2)
    prompts = PROMPTS * 4
    ours = model.training_losses(
        {"source": source, "target": target, "instruction": prompts},
        generator=torch.Generator().manual_seed(7),
    )["loss"]
    noise_scheduler = DDPMScheduler.from_pretrained(
        path, subfolder="scheduler", prediction_type=prediction_type
    )
    ref = reference_ip2p_loss(
        model.diffusion.unet,
        model.diffusion.vae,
        model.text_encoder,
        model.tokenizer,
        noise_scheduler,
        source,
        target,
        prompts,
        dropout_prob=0.3,
        generator=torch.Generator().manual_seed(7),
    )
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_conditioning_dropout_rule():
    """r < 2p drops text, p ≤ r < 3p drops the image: check against the drawn r."""
    diffusion = EditDiffusion.__new__(EditDiffusion)
    torch.nn.Module.__init__(diffusion)
    diffusion.conditioning_dropout_prob = 0.05
    n = 20000
    text = torch.ones(n, 2, 3)
    null = torch.zeros(1, 2, 3)
    image = torch.ones(n, 4, 2, 2)
    r = torch.rand(n, generator=torch.Generator().manual_seed(5))
    out_text, out_image = diffusion.drop_conditions(
        text, null, image, torch.Generator().manual_seed(5)
    )
    text_dropped = out_text[:, 0, 0] == 0
    image_dropped = out_image[:, 0, 0, 0] == 0
    assert torch.equal(text_dropped, r < 0.1)
    assert torch.equal(image_dropped, (r >= 0.05) & (r < 0.15))
    both = (text_dropped & image_dropped).float().mean().item()
    assert abs(both - 0.05) < 0.01
    assert abs((text_dropped & ~image_dropped).float().mean().item() - 0.05) < 0.01
    assert abs((image_dropped & ~text_dropped).float().mean().item() - 0.05) < 0.01


def test_stable_diffusion_folder_is_widened(tiny_dir):
    """A 4-channel SD UNet gains 4 zero-initialised input channels: with any image latent it
    computes exactly what the original UNet computes on the noisy latent alone."""
    sd_path = tiny_dir / "stable-diffusion"
    original = UNet2DConditionModel.from_pretrained(sd_path, subfolder="unet")
    assert original.config.in_channels == 4
    model = build(sd_path)
    unet = model.diffusion.unet
    assert unet.config.in_channels == 8 and unet.conv_in.in_channels == 8
    torch.testing.assert_close(unet.conv_in.weight[:, :4], original.conv_in.weight)
    assert unet.conv_in.weight[:, 4:].abs().max() == 0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    image = torch.randn(2, 4, 16, 16, generator=g)
    text = torch.randn(2, 77, original.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        ref = original(x, 10, encoder_hidden_states=text).sample
        ours = unet(torch.cat([x, image], 1), 10, encoder_hidden_states=text).sample
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_frozen_weights_get_no_gradient_and_stay_out_of_checkpoints(tiny_dir):
    model = build(tiny_dir / "instruct-pix2pix")
    model.train()
    batch = {
        "source": smooth_images(2),
        "target": smooth_images(2, seed=3),
        "instruction": PROMPTS,
        "id": ["a", "b"],
    }
    model.training_losses(batch)["loss"].backward()
    assert all(p.grad is None for p in model.diffusion.vae.parameters())
    assert all(p.grad is None for p in model.text_encoder.parameters())
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in model.diffusion.unet.parameters()
    )
    params = {id(p) for g in model.param_groups() for p in g["params"]}
    assert params == {id(p) for p in model.diffusion.unet.parameters()}
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and all(
        k.startswith("diffusion.unet.") for k in checkpoint["state_dict"]
    )
    # Loading completes the frozen part from the paths and stays strict.
    fresh = build(tiny_dir / "instruct-pix2pix")
    saved = copy.deepcopy(checkpoint)
    fresh.on_load_checkpoint(saved)
    fresh.load_state_dict(saved["state_dict"], strict=True)
    bad = {"state_dict": {k: v for k, v in checkpoint["state_dict"].items() if "conv_in" not in k}}
    with pytest.raises(ValueError, match="lacks 2 trainable weights"):
        fresh.on_load_checkpoint(bad)


def test_missing_folder_names_the_path(tmp_path):
    model = InsPix2Pix(diffusion_path=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        model.configure_model()


def test_non_finite_loss_stops_with_the_term_and_sample_ids(tiny_dir):
    model = build(tiny_dir / "instruct-pix2pix")
    model.train()
    source = smooth_images(2)
    source[1, 0, 0, 0] = float("nan")
    batch = {"source": source, "target": smooth_images(2, seed=3), "instruction": PROMPTS,
             "id": ["sample-a", "sample-b"], "skipped_ids": []}  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"non-finite loss .*sample-a, sample-b"):
        model.training_step(batch, 0)
    model.check_finite = False
    assert not torch.isfinite(model.training_step(batch, 0))


def test_float32_vae_computes_in_float32_under_bf16_autocast(tiny_dir):
    """The memory presets keep the VAE in float32 under bf16-mixed: its encode and decode run
    outside autocast (as the plain AutoencoderKL in float32 computes them), while the same
    VAE called directly under autocast would run in bf16 and differ."""
    diffusion = build(tiny_dir / "instruct-pix2pix").diffusion
    vae = diffusion.vae
    images = smooth_images(2)
    latents = torch.randn(2, vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_cond = vae.encode(images).latent_dist.mode()
        want_image = vae.decode(latents / vae.config.scaling_factor).sample
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got_cond = diffusion.encode_condition(images)
            got_image = diffusion.decode(latents)
            bf16_image = vae.decode(latents / vae.config.scaling_factor).sample
    assert got_cond.dtype == got_image.dtype == torch.float32
    torch.testing.assert_close(got_cond, want_cond, rtol=0, atol=0)
    torch.testing.assert_close(got_image, want_image, rtol=0, atol=0)
    assert bf16_image.dtype == torch.bfloat16 or not torch.equal(bf16_image.float(), want_image)
