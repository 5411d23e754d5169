"""Tiny, real, deterministic checkpoint folders for the CPU presets (`data make-tiny`).

`make_tiny(out)` writes six folders that the ordinary `from_pretrained` code of diffusers and
transformers loads offline, laid out like the checkpoints the paper configs name:

| folder               | stands in for                    | written with                              |
| -------------------- | -------------------------------- | ----------------------------------------- |
| `instruct-pix2pix/`  | `timbrooks/instruct-pix2pix`     | `StableDiffusionInstructPix2PixPipeline`  |
| `stable-diffusion/`  | `runwayml/stable-diffusion-v1-5` | `StableDiffusionPipeline` (4-ch UNet)     |
| `llava/`             | LLaVA-7B (llava-hf layout)       | `LlavaForConditionalGeneration` + processor |
| `llama/`             | LLaMA-7B                         | `LlamaForCausalLM` + tokenizer            |
| `clip/`              | `openai/clip-vit-base-patch32`   | `CLIPModel` + `CLIPProcessor`             |
| `t5/`                | `google/flan-t5-base`            | `T5ForConditionalGeneration` + tokenizer  |
| `blip2/`             | `Salesforce/blip2-opt-2.7b`      | `Blip2ForConditionalGeneration` (OPT) + `Blip2Processor` |

and `manifest.json` last (what was made, the VAE fit, library versions).

Weights are random (seeded) except the VAE, which is fitted for a fixed number of steps to
reconstruct synthetic images (`datamodules.synthetic.sample_images`), because a latent
diffusion model can never edit better than its autoencoder reconstructs; its
`scaling_factor` is 1/std of its latents on held-out images, as Stable Diffusion chose
0.18215. Tokenizers are trained with `tokenizers` on `datamodules.synthetic.text_corpus()`:
a CLIP-style BPE (lower case, `</w>` end-of-word suffix, CLIP's vocabulary layout) for the
diffusion text encoder and CLIP, and a byte-level BPE for LLaVA, LLaMA and T5. Both start from
the full byte alphabet, so no text maps to an unknown token.

Same seed and arguments give identical weights and tokenizer files. Called again on a
complete folder with the same seed/resolution/vae_steps it returns the manifest at once;
different arguments raise an error naming the folder and the field. Folders added to the set
later (:data:`ADDED_FOLDERS`: `blip2/`) depend on no other folder, so an older complete folder
gets just them built and its manifest extended, instead of a rebuild.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from editbench.tiny_diffusion import (
    DEFAULT_VAE_STEPS,
    Log,
    _fit_vae,
    _text_encoder,
    _unet,
    _vae,
    reconstruction_l1,
)
from editbench.tiny_language import (
    BLIP2_QUERY_TOKENS,
    _llama_config,
    _make_blip2,
    _make_clip,
    _make_llava,
    _make_t5,
)
from editbench.tiny_tokenizers import (
    IMAGE_TOKEN,
    _check_tokenizer,
    _lm_tokenizer,
    _t5_tokenizer,
    _train_clip_tokenizer,
    _write_clip_vocab_files,
    unknown_tokens,
)

FORMAT_VERSION = 1
FOLDERS = ("instruct-pix2pix", "stable-diffusion", "llava", "llama", "clip", "t5", "blip2")
#: Folders added after the first format: built on their own into an older complete folder.
ADDED_FOLDERS = ("blip2",)
MANIFEST = "manifest.json"

# Stable Diffusion's noise schedule, as both reference folders ship it.
SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
}

#: The public names (the builders' parts live in tiny_tokenizers, tiny_diffusion, tiny_language).
__all__ = [
    "ADDED_FOLDERS",
    "BLIP2_QUERY_TOKENS",
    "DEFAULT_VAE_STEPS",
    "FOLDERS",
    "FORMAT_VERSION",
    "MANIFEST",
    "load_manifest",
    "make_tiny",
    "reconstruction_l1",
    "unknown_tokens",
]


# --------------------------------------------------------------------------- public entry


def make_tiny(
    out: str | Path,
    *,
    seed: int = 0,
    resolution: int = 32,
    vae_steps: int = DEFAULT_VAE_STEPS,
    overwrite: bool = False,
    log: Log = print,
) -> dict:
    """Write the tiny checkpoint folders under `out` and return the manifest.

    `resolution` is the diffusion side's image size (VAE `sample_size`, UNet latents at
    resolution // 2); the LLaVA and CLIP vision towers always take 32 px images, as their
    processors resize to. `vae_steps` is a fixed step count, not a time budget, so the fitted
    VAE is the same on every run (on the same torch build and thread count).

    With `overwrite=False` a complete `out/manifest.json` made with the same `seed`,
    `resolution` and `vae_steps` (and the same corpus) is returned without rebuilding; one
    made with other values raises `ValueError` naming the folder and the field. A folder
    without a manifest (an interrupted build) is rebuilt.
    """
    out = Path(out)
    if resolution % 8 or resolution < 16:
        raise ValueError(f"resolution must be a multiple of 8 and at least 16, got {resolution}")
    if vae_steps < 0:
        raise ValueError(f"vae_steps must be >= 0, got {vae_steps}")

    from datamodules.synthetic import text_corpus

    corpus = text_corpus()
    wanted = {
        "format": FORMAT_VERSION,
        "seed": seed,
        "resolution": resolution,
        "vae_steps": vae_steps,
        "corpus_sha256": _corpus_digest(corpus),
    }
    if not overwrite:
        existing = _existing_manifest(out, wanted)
        missing = [n for n in ADDED_FOLDERS if existing is not None and not _has(out, existing, n)]
        if missing:
            return _add_folders(out, corpus, existing, missing, log)
        if existing is not None:
            log(f"tiny: {out} is up to date (seed {seed}, {resolution}px, {vae_steps} VAE steps)")
            return existing

    return _build(out, corpus, wanted, log)


def load_manifest(out: str | Path) -> dict:
    """The manifest of a tiny folder (raises FileNotFoundError when it was never completed)."""
    return json.loads((Path(out) / MANIFEST).read_text())


# --------------------------------------------------------------------------- idempotence


def _corpus_digest(corpus: list[str]) -> str:
    return hashlib.sha256("\n".join(corpus).encode()).hexdigest()


def _existing_manifest(out: Path, wanted: dict) -> dict | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # half-written: rebuild
    if not all((out / name).is_dir() for name in FOLDERS if name not in ADDED_FOLDERS):
        return None
    for field, value in wanted.items():
        if manifest.get(field) == value:
            continue
        if field == "corpus_sha256":
            made = "from another synthetic text corpus (corpus_sha256 differs)"
            asked = "with today's datamodules.synthetic.text_corpus()"
        else:
            made = f"with {field}={manifest.get(field)!r}"
            asked = f"with {field}={value!r}"
        raise ValueError(
            f"{out} holds tiny checkpoints made {made} (see {path}), but make_tiny was "
            f"called {asked}; pass overwrite=True to rebuild it, or choose another folder"
        )
    return manifest


# --------------------------------------------------------------------------- seeding


def _derive_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"editbench-tiny:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


@contextmanager
def _seeded(seed: int, name: str) -> Iterator[None]:
    """Seed torch's global RNG (used by module initialisers) without leaking the state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_derive_seed(seed, name))
        yield


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(_derive_seed(seed, name))


# --------------------------------------------------------------------------- added folders


def _has(out: Path, manifest: dict, name: str) -> bool:
    return (out / name).is_dir() and name in manifest.get("folders", {})


def _build_added(out: Path, corpus: list[str], seed: int, name: str) -> tuple[dict, dict]:
    """Build one of :data:`ADDED_FOLDERS`: (its manifest entry, its tokenizer entry)."""
    if name != "blip2":
        raise ValueError(f"no builder for tiny folder {name!r}")
    with _seeded(seed, "blip2"):
        model, processor = _make_blip2(corpus)
    entry = _save_model(model, out / name, processor)
    tokenizer = processor.tokenizer
    return entry, {
        "vocab_size": len(tokenizer),
        "used_by": [name],
        "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        "num_query_tokens": BLIP2_QUERY_TOKENS,
    }


def _add_folders(out: Path, corpus: list[str], manifest: dict, names: list[str], log: Log) -> dict:
    """Add the missing :data:`ADDED_FOLDERS` to a complete older folder; extend its manifest."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        manifest = dict(manifest)
        manifest["folders"] = dict(manifest.get("folders", {}))
        manifest["tokenizers"] = dict(manifest.get("tokenizers", {}))
        for name in names:
            if (out / name).exists():
                shutil.rmtree(out / name)
            entry, tokenizer = _build_added(out, corpus, manifest["seed"], name)
            manifest["folders"][name] = entry
            manifest["tokenizers"][name] = tokenizer
            log(f"tiny: added {name}/ to {out}")
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()
    manifest["total_bytes"] = sum(m["bytes"] for m in manifest["folders"].values())
    manifest["versions"] = _versions()
    _write_manifest(out, manifest)
    return manifest


def _write_manifest(out: Path, manifest: dict) -> None:
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(out / MANIFEST)


# --------------------------------------------------------------------------- build


def _num_params(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _versions() -> dict:
    import diffusers
    import safetensors
    import tokenizers
    import transformers

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
    }


def _build(out: Path, corpus: list[str], wanted: dict, log: Log) -> dict:
    import transformers
    from diffusers import (
        EulerAncestralDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionInstructPix2PixPipeline,
        StableDiffusionPipeline,
    )
    from transformers import LlamaForCausalLM

    seed, resolution, vae_steps = wanted["seed"], wanted["resolution"], wanted["vae_steps"]
    start = time.perf_counter()
    timings: dict[str, float] = {}
    made: dict[str, dict] = {}

    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # no manifest until everything is written
    for name in FOLDERS:
        if (out / name).exists():
            shutil.rmtree(out / name)
    log(f"tiny: building tiny checkpoints in {out} (seed {seed}, {resolution}px)")
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # untrained-model chatter
    transformers.logging.disable_progress_bar()  # "Writing model shards" for 300 kB files
    try:
        # tokenizers
        t0 = time.perf_counter()
        clip_tokenizer = _train_clip_tokenizer(corpus)
        llama_tokenizer = _lm_tokenizer(corpus, image_token=False)
        llava_tokenizer = _lm_tokenizer(corpus, image_token=True)
        t5_tokenizer = _t5_tokenizer(corpus)
        for name, tok in [
            ("CLIP", clip_tokenizer),
            ("LLaMA", llama_tokenizer),
            ("LLaVA", llava_tokenizer),
            ("T5", t5_tokenizer),
        ]:
            _check_tokenizer(name, tok, corpus)
        timings["tokenizers"] = time.perf_counter() - t0
        log(
            f"tiny: tokenizers trained on {len(corpus)} sentences: CLIP vocab "
            f"{len(clip_tokenizer)}, byte-level vocab {len(llama_tokenizer)}"
        )

        # the shared diffusion parts, the VAE fitted
        t0 = time.perf_counter()
        with _seeded(seed, "vae"):
            vae = _vae(resolution)
        with _seeded(seed, "text_encoder"):
            text_encoder = _text_encoder(clip_tokenizer)
        text_encoder.requires_grad_(False)
        timings["init"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        generator = _generator(seed, "vae-fit")
        vae_fit = _fit_vae(
            vae, seed=seed, resolution=resolution, steps=vae_steps, generator=generator, log=log
        )
        timings["vae_fit"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        with _seeded(seed, "unet-ip2p"):
            unet8 = _unet(8, resolution)
        pipe = StableDiffusionInstructPix2PixPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=clip_tokenizer,
            unet=unet8,
            scheduler=EulerAncestralDiscreteScheduler(**SD_SCHEDULE),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        made["instruct-pix2pix"] = _save_pipeline(
            pipe, out / "instruct-pix2pix", vae, text_encoder, unet8
        )

        with _seeded(seed, "unet-sd"):
            unet4 = _unet(4, resolution)
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=clip_tokenizer,
            unet=unet4,
            scheduler=PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        made["stable-diffusion"] = _save_pipeline(
            pipe, out / "stable-diffusion", vae, text_encoder, unet4
        )
        timings["diffusion_folders"] = time.perf_counter() - t0

        # language and vision-language models
        t0 = time.perf_counter()
        with _seeded(seed, "llava"):
            llava, llava_processor = _make_llava(llava_tokenizer)
        made["llava"] = _save_model(llava, out / "llava", llava_processor)
        with _seeded(seed, "llama"):
            llama = LlamaForCausalLM(_llama_config(llama_tokenizer))
        made["llama"] = _save_model(llama, out / "llama", llama_tokenizer)
        with _seeded(seed, "clip"):
            clip, clip_processor = _make_clip(clip_tokenizer)
        made["clip"] = _save_model(clip, out / "clip", clip_processor)
        with _seeded(seed, "t5"):
            t5 = _make_t5(t5_tokenizer)
        made["t5"] = _save_model(t5, out / "t5", t5_tokenizer)
        added_tokenizers = {}
        for name in ADDED_FOLDERS:
            made[name], added_tokenizers[name] = _build_added(out, corpus, seed, name)
        timings["language_folders"] = time.perf_counter() - t0
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()

    total_bytes = sum(m["bytes"] for m in made.values())
    timings["total"] = time.perf_counter() - start
    manifest = {
        **wanted,
        "corpus_sentences": len(corpus),
        "folders": made,
        "total_bytes": total_bytes,
        "tokenizers": {
            "clip": {
                "vocab_size": len(clip_tokenizer),
                "used_by": ["instruct-pix2pix", "stable-diffusion", "clip"],
            },
            "byte_level": {"vocab_size": len(llama_tokenizer), "used_by": ["llama"]},
            "byte_level+image": {
                "vocab_size": len(llava_tokenizer),
                "used_by": ["llava"],
                "image_token_id": llava_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
            },
            "t5": {"vocab_size": len(t5_tokenizer), "used_by": ["t5"]},
            **added_tokenizers,
        },
        "vae_fit": vae_fit,
        "seconds": {k: round(v, 2) for k, v in timings.items()},
        "versions": _versions(),
    }
    _write_manifest(out, manifest)
    log(
        f"tiny: wrote {', '.join(FOLDERS)} ({total_bytes / 2**20:.1f} MiB) in "
        f"{timings['total']:.0f} s"
    )
    return manifest


def _save_pipeline(pipe, folder: Path, *modules) -> dict:
    pipe.save_pretrained(folder, safe_serialization=True)
    _write_clip_vocab_files(pipe.tokenizer, folder / "tokenizer")
    return {
        "class": type(pipe).__name__,
        "components": {
            name: type(module).__name__
            for name, module in pipe.components.items()
            if module is not None
        },
        "parameters": _num_params(*modules),
        "bytes": _folder_bytes(folder),
    }


def _save_model(model, folder: Path, preprocessor) -> dict:
    model.save_pretrained(folder, safe_serialization=True)
    preprocessor.save_pretrained(folder)
    if type(preprocessor).__name__ == "CLIPProcessor":
        _write_clip_vocab_files(preprocessor.tokenizer, folder)
    return {
        "class": type(model).__name__,
        "preprocessor": type(preprocessor).__name__,
        "parameters": _num_params(model),
        "bytes": _folder_bytes(folder),
    }
