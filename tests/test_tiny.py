"""The tiny checkpoint folders load through the ordinary from_pretrained code and run."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file

from datamodules.synthetic import sample_images, text_corpus
from editbench import tiny
from editbench.tiny import FOLDERS, make_tiny

STEPS = 8  # enough to show the fit working, small enough for a fast suite


def _build(out: Path, seed: int = 0, vae_steps: int = STEPS) -> dict:
    return make_tiny(out, seed=seed, vae_steps=vae_steps, log=lambda _msg: None)


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tiny") / "ckpt"
    return out, _build(out)


@pytest.fixture(scope="session")
def folder(built) -> Path:
    return built[0]


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return text_corpus()


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.rglob("*.safetensors")):
        rel = path.relative_to(folder).as_posix()
        for key, value in load_file(path).items():
            tensors[f"{rel}:{key}"] = value
    return tensors


def _text_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix != ".safetensors" and p.name != tiny.MANIFEST
    }


def _image() -> torch.Tensor:
    return sample_images(1, 32, seed=123)  # [1, 3, 32, 32] in [-1, 1]


# --------------------------------------------------------------------------- manifest


def test_manifest_describes_every_folder(built):
    out, manifest = built
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert (manifest["seed"], manifest["resolution"], manifest["vae_steps"]) == (0, 32, STEPS)
    assert set(manifest["folders"]) == set(FOLDERS)
    classes = {name: entry["class"] for name, entry in manifest["folders"].items()}
    assert classes == {
        "instruct-pix2pix": "StableDiffusionInstructPix2PixPipeline",
        "stable-diffusion": "StableDiffusionPipeline",
        "llava": "LlavaForConditionalGeneration",
        "llama": "LlamaForCausalLM",
        "clip": "CLIPModel",
        "t5": "T5ForConditionalGeneration",
        "blip2": "Blip2ForConditionalGeneration",
    }
    for entry in manifest["folders"].values():
        assert entry["parameters"] > 10_000 and entry["bytes"] > 10_000
    assert manifest["total_bytes"] < 20 * 2**20  # a few MB
    assert {"torch", "diffusers", "transformers", "tokenizers"} <= set(manifest["versions"])
    fit = manifest["vae_fit"]
    assert fit["steps"] == STEPS and fit["batch"] == 64
    for name in ("instruct-pix2pix", "stable-diffusion"):
        vae_config = json.loads((out / name / "vae" / "config.json").read_text())
        assert vae_config["scaling_factor"] == fit["scaling_factor"]
        assert vae_config["latent_channels"] == 4


# --------------------------------------------------------------------------- diffusion


def test_instruct_pix2pix_pipeline_edits(folder):
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(folder / "instruct-pix2pix")
    assert pipe.unet.config.in_channels == 8 and pipe.unet.config.out_channels == 4
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 64
    assert pipe.unet.config.sample_size == 16
    assert isinstance(pipe.scheduler, EulerAncestralDiscreteScheduler)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.tokenizer.model_max_length == 77
    image = (_image() + 1) / 2  # the pipeline takes [0, 1] tensors
    result = pipe(
        "make the red circle blue",
        image=image,
        num_inference_steps=2,
        guidance_scale=7.5,
        image_guidance_scale=1.5,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert result.shape == (1, 3, 32, 32)
    assert torch.isfinite(result).all()


def test_stable_diffusion_folder_shares_all_but_the_unet(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder / "stable-diffusion")
    assert pipe.unet.config.in_channels == 4
    assert type(pipe.scheduler).__name__ in {"PNDMScheduler", "DDIMScheduler"}
    ip2p, sd = folder / "instruct-pix2pix", folder / "stable-diffusion"
    for part in ("vae", "text_encoder"):
        a, b = _tensors(ip2p / part), _tensors(sd / part)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert _text_files(ip2p / "tokenizer") == _text_files(sd / "tokenizer")
    unet_ip2p, unet_sd = _tensors(ip2p / "unet"), _tensors(sd / "unet")
    key = next(k for k in unet_sd if k.endswith("conv_in.weight"))
    assert unet_ip2p[key].shape[1] == 8 and unet_sd[key].shape[1] == 4
    images = pipe(
        "a red circle", num_inference_steps=2, height=32, width=32, output_type="pt"
    ).images
    assert images.shape == (1, 3, 32, 32)


def test_vae_fit_lowers_heldout_reconstruction_error(built):
    from diffusers import AutoencoderKL

    out, manifest = built
    fit = manifest["vae_fit"]
    assert fit["heldout_l1_after"] < 0.8 * fit["heldout_l1_before"]
    heldout = sample_images(64, 32, seed=fit["heldout_seed"])
    fitted = AutoencoderKL.from_pretrained(out / "instruct-pix2pix" / "vae")
    with tiny._seeded(0, "vae"):
        unfitted = tiny._vae(32)
    after = tiny.reconstruction_l1(fitted, heldout)
    before = tiny.reconstruction_l1(unfitted, heldout)
    assert after < 0.8 * before
    assert after == pytest.approx(fit["heldout_l1_after"], rel=0.15)
    latents = fitted.encode(heldout).latent_dist.mode() * fitted.config.scaling_factor
    assert latents.std().item() == pytest.approx(1.0, rel=0.15)


# --------------------------------------------------------------------------- tokenizers


def test_tokenizers_cover_the_corpus(folder, corpus):
    from transformers import AutoTokenizer, CLIPTokenizer

    loaded = {
        "ip2p": CLIPTokenizer.from_pretrained(folder / "instruct-pix2pix" / "tokenizer"),
        "clip": AutoTokenizer.from_pretrained(folder / "clip"),
        "llava": AutoTokenizer.from_pretrained(folder / "llava"),
        "llama": AutoTokenizer.from_pretrained(folder / "llama"),
        "t5": AutoTokenizer.from_pretrained(folder / "t5"),
    }
    for name, tokenizer in loaded.items():
        assert tokenizer.unk_token_id is not None, name
        assert tiny.unknown_tokens(tokenizer, corpus) == [], name
    # CLIP's layout: 256 bytes, 256 bytes</w>, merges, then the two specials
    clip = loaded["ip2p"]
    assert clip.convert_ids_to_tokens([0, 256]) == ["!", "!</w>"]
    assert clip.bos_token == "<|startoftext|>" and clip.eos_token == "<|endoftext|>"
    assert clip.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [
        len(clip) - 2,
        len(clip) - 1,
    ]
    ids = clip("Make the RED circle blue")["input_ids"]
    assert ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id
    assert clip.decode(ids, skip_special_tokens=True) == "make the red circle blue"
    llama = loaded["llama"]
    assert llama.padding_side == "left" == loaded["llava"].padding_side
    assert llama.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<pad>"]) == [0, 1, 2, 3]
    assert llama("add a star")["input_ids"][0] == llama.bos_token_id
    assert "<image>" not in llama.get_vocab()
    llava = loaded["llava"]
    assert llava.convert_tokens_to_ids("<image>") == len(llama)
    assert not any(t.startswith("[IMG") for t in llava.get_vocab())
    t5 = loaded["t5"]
    assert t5.convert_tokens_to_ids(["<pad>", "</s>", "<unk>"]) == [0, 1, 2]
    assert t5("add a star")["input_ids"][-1] == t5.eos_token_id


def test_clip_tokenizer_vocab_files_match_tokenizer_json(folder, corpus, tmp_path):
    """vocab.json + merges.txt alone (the reference folders' format) tokenize identically."""
    from transformers import CLIPTokenizer

    source = folder / "instruct-pix2pix" / "tokenizer"
    slow = tmp_path / "tokenizer"
    shutil.copytree(source, slow)
    (slow / "tokenizer.json").unlink()
    a = CLIPTokenizer.from_pretrained(source)
    b = CLIPTokenizer.from_pretrained(slow)
    assert len(a) == len(b)
    sample = corpus[::50]
    assert a(sample)["input_ids"] == b(sample)["input_ids"]


# --------------------------------------------------------------------------- language/vision


def _pil(image: torch.Tensor):
    from PIL import Image

    array = ((image[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    return Image.fromarray(array)


def test_llava_forward_and_generate(folder):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(folder / "llava").eval()
    processor = AutoProcessor.from_pretrained(folder / "llava")
    assert type(processor).__name__ == "LlavaProcessor"
    prompts = [
        "USER: <image>\nwhat will this image be like if make the red circle blue ASSISTANT:",
        "USER: <image>\nwhat will this image be like if remove the star ASSISTANT:",
    ]
    image = _pil(_image())
    inputs = processor(images=[image, image], text=prompts, padding=True, return_tensors="pt")
    image_id = model.config.image_token_id
    assert (inputs["input_ids"] == image_id).sum(dim=1).tolist() == [16, 16]
    assert inputs["attention_mask"][:, -1].all()  # left padding
    with torch.no_grad():
        output = model(**inputs, output_hidden_states=True)
    assert len(output.hidden_states) == 3
    assert output.hidden_states[-1].shape == (*inputs["input_ids"].shape, 32)
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape[0] == 2 and generated.shape[1] <= inputs["input_ids"].shape[1] + 5
    again = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(generated, again)
    assert isinstance(processor.batch_decode(generated, skip_special_tokens=True)[0], str)


def test_llama_generates_text(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder / "llama")
    model = AutoModelForCausalLM.from_pretrained(folder / "llama").eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.get_input_embeddings().weight.data_ptr() != model.lm_head.weight.data_ptr()
    inputs = tokenizer(
        ["what will this image be like if", "add a green star"], padding=True, return_tensors="pt"
    )
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    assert out.shape[0] == 2 and prompt_length < out.shape[1] <= prompt_length + 4
    assert all(isinstance(t, str) for t in tokenizer.batch_decode(out, skip_special_tokens=True))


def test_clip_features(folder):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder / "clip").eval()
    processor = CLIPProcessor.from_pretrained(folder / "clip")
    inputs = processor(
        text=["a red circle", "a blue square on a plain white background"],
        images=[_pil(_image())],
        padding=True,
        return_tensors="pt",
    )
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs["pixel_values"])
        text = model.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        )
    # transformers 5 returns a model output whose pooler_output is the projected embedding
    image = getattr(image, "pooler_output", image)
    text = getattr(text, "pooler_output", text)
    assert image.shape == (1, 32) and text.shape == (2, 32)


def test_t5_summarises(folder):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder / "t5")
    model = AutoModelForSeq2SeqLM.from_pretrained(folder / "t5").eval()
    assert type(model).__name__ == "T5ForConditionalGeneration"
    inputs = tokenizer(
        ["summarize: the image shows a red circle in the center", "summarize: add a star"],
        padding=True,
        return_tensors="pt",
    )
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] <= 7
    assert (out[:, 0] == model.config.decoder_start_token_id).all()
    assert all(isinstance(t, str) for t in tokenizer.batch_decode(out, skip_special_tokens=True))


# --------------------------------------------------------------------------- determinism, reuse


def test_same_seed_same_files_other_seed_other_weights(built, tmp_path):
    out, _ = built
    again, other = tmp_path / "again", tmp_path / "other"
    _build(again)
    _build(other, seed=1, vae_steps=1)  # any fit: every random part differs already
    reference = _tensors(out)
    same = _tensors(again)
    assert reference.keys() == same.keys() and len(reference) > 100
    assert all(torch.equal(reference[k], same[k]) for k in reference)
    assert _text_files(out) == _text_files(again)  # tokenizers, configs
    different = _tensors(other)
    assert different.keys() == reference.keys()
    for part in ("instruct-pix2pix/unet/", "instruct-pix2pix/vae/", "llava/", "t5/", "clip/"):
        keys = [  # random or fitted tensors (norm weights start as ones in every build)
            k for k in reference if k.startswith(part) and reference[k].float().std() > 0
        ]
        assert keys and not any(torch.equal(reference[k], different[k]) for k in keys), part
    tokenizer_files = [n for n in _text_files(out) if "tokenizer" in n or n.endswith(".txt")]
    assert tokenizer_files
    assert all(_text_files(out)[n] == _text_files(other)[n] for n in tokenizer_files)


def test_existing_folder_is_reused_quickly(built):
    out, manifest = built
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    messages = []
    start = time.perf_counter()
    again = make_tiny(out, vae_steps=STEPS, log=messages.append)
    assert time.perf_counter() - start < 5
    assert again == manifest
    assert "up to date" in messages[0]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"seed": 1}, "seed"),
        ({"vae_steps": STEPS + 1}, "vae_steps"),
        ({"resolution": 64}, "resolution"),
    ],
)
def test_mismatched_folder_raises(built, kwargs, field):
    out, _ = built
    args = {"vae_steps": STEPS, **kwargs}
    with pytest.raises(ValueError, match=field) as error:
        make_tiny(out, log=lambda _msg: None, **args)
    assert str(out) in str(error.value) and "overwrite" in str(error.value)


def test_changed_corpus_raises(built, monkeypatch):
    import datamodules.synthetic

    out, _ = built
    monkeypatch.setattr(datamodules.synthetic, "text_corpus", lambda: ["a new phrase"])
    with pytest.raises(ValueError, match="corpus") as error:
        make_tiny(out, vae_steps=STEPS, log=lambda _msg: None)
    assert str(out) in str(error.value)


def test_incomplete_or_overwritten_folder_is_rebuilt(built, tmp_path, monkeypatch):
    out, manifest = built
    calls = []
    monkeypatch.setattr(tiny, "_build", lambda out, corpus, wanted, log: calls.append(out) or {})
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert make_tiny(copy, vae_steps=STEPS, log=lambda _msg: None) == manifest
    assert calls == []
    make_tiny(copy, vae_steps=STEPS, overwrite=True, log=lambda _msg: None)
    make_tiny(copy, seed=5, vae_steps=STEPS, overwrite=True, log=lambda _msg: None)
    assert calls == [copy, copy]
    shutil.rmtree(copy / "llava")  # a folder gone: not complete
    make_tiny(copy, vae_steps=STEPS, log=lambda _msg: None)
    (copy / "manifest.json").unlink()  # interrupted before the manifest
    make_tiny(copy, vae_steps=STEPS, log=lambda _msg: None)
    assert calls == [copy] * 4


def test_seeding_leaves_global_rng_alone():
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    with tiny._seeded(0, "unet-ip2p"):
        tiny._unet(8, 32)
    assert torch.equal(torch.rand(3), expected)
