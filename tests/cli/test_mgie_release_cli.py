"""The released MGIE as released, on tiny stand-ins: ``data convert-llava`` on a tiny
original-layout LLaVA v1, then ``test`` with ``experiments/tiny/mgie_release.yaml`` and a
fabricated ``mllm.pt`` / ``unet.pt`` (tests/fixtures/llava_v1.py), without ``--ckpt_path``;
and the UNet in use is the release's, run as ml-mgie's ``demo.ipynb`` runs it
(``StableDiffusionInstructPix2PixPipeline`` of the InstructPix2Pix folder with ``unet.pt``
loaded, ``prompt_embeds`` / ``negative_prompt_embeds`` from the edit head)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from fixtures import layouts
from fixtures.llava_v1 import write_llava_v1, write_release

from editbench.cli import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "experiments" / "tiny" / "mgie_release.yaml"
EVAL = REPO / "experiments" / "tiny" / "eval" / "magicbrush.yaml"


@pytest.fixture(scope="module")
def release(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("mgie_release")
    src = write_llava_v1(tiny_dir, root / "LLaVA-7B-v1", vision_tower=False)
    args = ["data", "convert-llava", "--src", str(src), "--out", str(root / "hf")]
    assert main([*args, "--vision", str(tiny_dir / "clip")]) == 0
    unet = UNet2DConditionModel.from_pretrained(tiny_dir / "instruct-pix2pix", subfolder="unet")
    source = json.loads((src / "config.json").read_text())
    mllm_pt, unet_pt = write_release(
        root / "mgie_7b",
        vocab=source["vocab_size"],
        hidden=source["hidden_size"],
        unet_state=unet.state_dict(),
        output_dim=unet.config.cross_attention_dim,
    )
    return {"src": src, "hf": root / "hf", "mllm": mllm_pt, "unet": unet_pt}


def overrides(release: dict, tiny_dir: Path) -> list[str]:
    return [
        "--model.init_args.mllm_path", str(release["hf"]),
        "--model.init_args.diffusion_path", str(tiny_dir / "instruct-pix2pix"),
        "--model.init_args.release_mllm", str(release["mllm"]),
        "--model.init_args.release_unet", str(release["unet"]),
        "--model.init_args.num_inference_steps", "2",
        "--model.init_args.max_new_tokens", "8",
    ]  # fmt: skip


def test_convert_errors_exit_non_zero(release, tiny_dir, tmp_path, capsys):
    args = ["data", "convert-llava", "--src", str(release["src"]), "--out", str(tmp_path / "o")]
    assert main(args) == 2  # mm_vision_tower is a hub name here and no --vision was given
    assert "--vision" in capsys.readouterr().err
    assert main([*args[:3], str(release["hf"]), *args[4:]]) == 2  # already llava-hf
    assert "already the llava-hf layout" in capsys.readouterr().err


def test_release_is_scored_without_a_checkpoint(release, tiny_dir, tmp_path):
    from fixtures.backbones import save_tiny_clip, save_tiny_dino

    root = layouts.write_magicbrush(tmp_path / "magicbrush")
    backbones = {
        "clip": str(save_tiny_clip(tmp_path / "clip")),
        "dino": str(save_tiny_dino(tmp_path / "dino")),
    }
    save = tmp_path / "runs"
    argv = [
        "test", "-c", str(CONFIG), "-c", str(EVAL), *overrides(release, tiny_dir),
        "--model.init_args.backbones", json.dumps(backbones),
        "--data.init_args.root", str(root),
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(save),
    ]  # fmt: skip
    assert main(argv) == 0
    (path,) = sorted(save.glob("*/version_*/test_metrics.json"))
    document = json.loads(path.read_text())
    assert document["protocol"]["name"] == "magicbrush"
    for column in document["protocol"]["columns"]:
        assert math.isfinite(document["metrics"][f"test/{column}"]), column


def test_unet_in_use_is_the_released_one_run_as_the_demo(release, tiny_dir):
    """The model the YAML builds carries unet.pt exactly and, given the edit head's
    embeddings, renders what demo.ipynb's pipeline renders with unet.pt loaded."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from models.mgie import MGIE

    init_args = yaml.safe_load(CONFIG.read_text())["model"]["init_args"]
    for flag, value in zip(overrides(release, tiny_dir)[::2], overrides(release, tiny_dir)[1::2],
                           strict=True):  # fmt: skip
        key = flag.removeprefix("--model.init_args.")
        init_args[key] = int(value) if value.isdigit() else value
    model = MGIE(**init_args)
    model.configure_model()
    model.eval()

    released = torch.load(release["unet"], weights_only=True)
    state = model.diffusion.unet.state_dict()
    assert set(state) == set(released)
    assert all(torch.equal(state[k], released[k].float()) for k in state)
    assert type(model.diffusion.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert model.mllm.image_text == "<im_start><im_patch><im_end>"

    g = torch.Generator().manual_seed(0)
    low = torch.rand(1, 3, 4, 4, generator=g) * 2 - 1
    source = torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear")
    generation = model.mllm.generate(source, ["make the red circle blue"])
    with torch.no_grad():
        cond, null = model.guidance_from(generation.img_hidden, generation.img_embeds)
    kwargs = {"num_inference_steps": 2, "guidance_scale": 7.5, "image_guidance_scale": 1.5}
    ours = model.render(source, cond, null, generator=torch.Generator().manual_seed(7), **kwargs)

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
        tiny_dir / "instruct-pix2pix", safety_checker=None, requires_safety_checker=False
    )
    pipe.unet.load_state_dict(torch.load(release["unet"], weights_only=True))  # demo.ipynb
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        image=(source + 1) / 2,
        prompt_embeds=cond,
        negative_prompt_embeds=null.expand_as(cond),
        generator=torch.Generator().manual_seed(7),
        output_type="pt",
        **kwargs,
    ).images
    assert ((ours / 2 + 0.5).clamp(0, 1) - ref).abs().max().item() <= 1e-4
    # Not vacuous: the folder's own UNet renders another image.
    plain = StableDiffusionInstructPix2PixPipeline.from_pretrained(
        tiny_dir / "instruct-pix2pix", safety_checker=None, requires_safety_checker=False
    )
    plain.set_progress_bar_config(disable=True)
    other = plain(
        image=(source + 1) / 2,
        prompt_embeds=cond,
        negative_prompt_embeds=null.expand_as(cond),
        generator=torch.Generator().manual_seed(7),
        output_type="pt",
        **kwargs,
    ).images
    assert (other - ref).abs().max().item() > 1e-3
