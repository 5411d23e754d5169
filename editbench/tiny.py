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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

FORMAT_VERSION = 1
FOLDERS = ("instruct-pix2pix", "stable-diffusion", "llava", "llama", "clip", "t5", "blip2")
#: Folders added after the first format: built on their own into an older complete folder.
ADDED_FOLDERS = ("blip2",)
BLIP2_QUERY_TOKENS = 4
MANIFEST = "manifest.json"

DEFAULT_VAE_STEPS = 400  # ~0.24 s a step on 2 cores: ~100 s to held-out L1 ~0.035 (32 px)
VAE_BATCH = 64
VAE_LR = 1e-3
VAE_KL_WEIGHT = 1e-6
VAE_POOL = 2048  # training images drawn once from sample_images(seed)
VAE_HELDOUT = 256  # held-out images from sample_images(seed + HELDOUT_SEED_OFFSET)
HELDOUT_SEED_OFFSET = 1_000_003

TEXT_HIDDEN = 64  # CLIP text encoder width = UNet cross_attention_dim
CLIP_MAX_LENGTH = 77
LM_MAX_LENGTH = 512
BPE_VOCAB_SIZE = 4096  # an upper bound; the trainer stops when the corpus has no pair left

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
LM_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")  # LLaMA's ids 0, 1, 2 (+ a pad token)
T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # T5's ids 0, 1, 2
IMAGE_TOKEN = "<image>"

# Stable Diffusion's noise schedule, as both reference folders ship it.
SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
}

Log = Callable[[str], Any]


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


# --------------------------------------------------------------------------- tokenizers


def _byte_alphabet() -> list[str]:
    """The 256 byte-level characters in CLIP's vocabulary order (GPT-2's bytes-to-unicode map:
    the printable bytes stand for themselves, the other bytes map to U+0100 onwards)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]


def _merges_of(tokenizer) -> list[tuple[str, str]]:
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def _train_clip_tokenizer(corpus: list[str]):
    """CLIP tokenizer trained on the corpus, in CLIP's vocabulary layout.

    The training pipeline reuses `CLIPTokenizer`'s own normaliser and pre-tokeniser (NFC,
    whitespace, lower case; CLIP's split regex; byte level), so training and use split text
    the same way. Vocabulary: 256 bytes, the same with `</w>`, one entry per merge, then
    `<|startoftext|>` and `<|endoftext|>`, as in `openai/clip-vit-base-patch32`.
    """
    from tokenizers import Tokenizer, models, trainers
    from transformers import CLIPTokenizer

    reference = CLIPTokenizer().backend_tokenizer
    trainer_tok = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    trainer_tok.normalizer = reference.normalizer
    trainer_tok.pre_tokenizer = reference.pre_tokenizer
    alphabet = _byte_alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        special_tokens=[],
        show_progress=False,
    )
    trainer_tok.train_from_iterator(corpus, trainer)
    merges = _merges_of(trainer_tok)
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += [CLIP_BOS, CLIP_EOS]
    vocab = {}
    for token in tokens:  # defensive: a repeated token keeps its first id
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def _write_clip_vocab_files(tokenizer, folder: Path) -> None:
    """vocab.json and merges.txt beside tokenizer.json, as the reference folders have them
    (transformers 5 writes only tokenizer.json; the slow-format files load on their own)."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    vocab = dict(state["vocab"])
    for added in tokenizer.backend_tokenizer.get_added_tokens_decoder().values():
        vocab.setdefault(added.content, len(vocab))
    vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    lines = ["#version: 0.2"]
    lines += [m if isinstance(m, str) else " ".join(m) for m in state["merges"]]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n")


def _train_byte_bpe(corpus: list[str], specials: tuple[str, ...]):
    """A byte-level BPE `tokenizers.Tokenizer` (GPT-2 style) trained on the corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(specials),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def _lm_tokenizer(corpus: list[str], *, image_token: bool):
    """The LLaMA/LLaVA tokenizer: `<s>` prepended (as LLaMA does), left padding for batched
    generation, `<image>` appended as a special token for LLaVA."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = _train_byte_bpe(corpus, LM_SPECIALS)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    extra = {}
    if image_token:
        tokenizer.add_special_tokens([IMAGE_TOKEN])
        extra["extra_special_tokens"] = {"image_token": IMAGE_TOKEN}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        model_max_length=LM_MAX_LENGTH,
        **extra,
    )


def _t5_tokenizer(corpus: list[str]):
    """The T5 tokenizer: `<pad>` 0, `</s>` 1, `<unk>` 2, `</s>` appended, right padding."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = _train_byte_bpe(corpus, T5_SPECIALS)
    eos = tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="right",
        model_max_length=LM_MAX_LENGTH,
    )


def unknown_tokens(tokenizer, corpus: list[str]) -> list[str]:
    """Corpus sentences that contain the unknown token or do not survive a round trip."""
    bad = []
    unk = tokenizer.unk_token_id
    is_clip = type(tokenizer).__name__ == "CLIPTokenizer"
    for sentence in corpus:
        ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
        text = tokenizer.decode(ids, skip_special_tokens=False)
        if is_clip:  # lower case, and the decoder puts a space after every word piece
            same = text.replace(" ", "") == sentence.lower().replace(" ", "")
        else:
            same = text == sentence
        if unk in ids or not same:
            bad.append(sentence)
    return bad


def _check_tokenizer(name: str, tokenizer, corpus: list[str]) -> None:
    bad = unknown_tokens(tokenizer, corpus)
    if bad:
        raise RuntimeError(
            f"tiny {name} tokenizer maps {len(bad)} corpus sentences to unknown tokens "
            f"(first: {bad[0]!r})"
        )


# --------------------------------------------------------------------------- diffusion parts


def _vae(resolution: int):
    """SD's AutoencoderKL shrunk: (16, 32) channels, one layer per block, 4 latent channels
    (32 px -> 16x16 latents). No attention in the mid blocks: at this size it cost 20% more
    per step on 2 cores and fitted no better."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=resolution,
        mid_block_add_attention=False,
    )


def _unet(in_channels: int, resolution: int):
    """0.73M parameters; cross-attention only in the 8x8 mid block (the CPU sweet spot)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=resolution // 2,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def _text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=TEXT_HIDDEN,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


@torch.no_grad()
def reconstruction_l1(vae, images: torch.Tensor, batch: int = 128) -> float:
    """Mean |x̂ − x| on [0, 1] images, x̂ decoded from the posterior mode (x in [-1, 1])."""
    was_training = vae.training
    vae.eval()
    total = 0.0
    for chunk in images.split(batch):
        latents = vae.encode(chunk).latent_dist.mode()
        recon = vae.decode(latents).sample.clamp(-1, 1)
        total += (recon - chunk).abs().sum().item() / 2
    vae.train(was_training)
    return total / images.numel()


@torch.no_grad()
def _latent_std(vae, images: torch.Tensor, batch: int = 128) -> float:
    vae.eval()
    latents = torch.cat([vae.encode(c).latent_dist.mode() for c in images.split(batch)])
    return latents.std().item()


def _fit_vae(vae, *, seed: int, resolution: int, steps: int, log: Log) -> dict:
    """AdamW 1e-3, batch 64, MSE + 1e-6·KL for a fixed number of steps (deterministic)."""
    from datamodules.synthetic import sample_images

    t0 = time.perf_counter()
    pool = sample_images(VAE_POOL, resolution, seed)
    heldout = sample_images(VAE_HELDOUT, resolution, seed + HELDOUT_SEED_OFFSET)
    data_s = time.perf_counter() - t0
    before = reconstruction_l1(vae, heldout)
    generator = _generator(seed, "vae-fit")
    optimizer = torch.optim.AdamW(vae.parameters(), lr=VAE_LR)
    vae.train()
    t0, cpu0 = time.perf_counter(), time.process_time()
    loss = torch.tensor(float("nan"))
    for step in range(1, steps + 1):
        index = torch.randint(len(pool), (VAE_BATCH,), generator=generator)
        images = pool[index]
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(recon, images) + VAE_KL_WEIGHT * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps:
            elapsed = time.perf_counter() - t0
            log(f"tiny: VAE step {step}/{steps} loss {loss.item():.4f} ({elapsed:.0f} s)")
    fit_s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    vae.eval()
    vae.requires_grad_(False)
    after = reconstruction_l1(vae, heldout)
    scaling_factor = round(1.0 / _latent_std(vae, heldout), 5)
    vae.register_to_config(scaling_factor=scaling_factor)
    log(
        f"tiny: VAE fitted in {fit_s:.0f} s: held-out recon L1 {before:.4f} -> {after:.4f}, "
        f"scaling_factor {scaling_factor}"
    )
    return {
        "steps": steps,
        "batch": VAE_BATCH,
        "lr": VAE_LR,
        "kl_weight": VAE_KL_WEIGHT,
        "train_images": VAE_POOL,
        "train_seed": seed,
        "heldout_images": VAE_HELDOUT,
        "heldout_seed": seed + HELDOUT_SEED_OFFSET,
        "final_loss": round(loss.item(), 6) if steps else None,
        "data_seconds": round(data_s, 2),
        "seconds": round(fit_s, 2),
        "seconds_per_step": round(fit_s / steps, 4) if steps else None,
        "cpu_seconds": round(cpu_s, 2),  # all threads; wall time suffers on a shared machine
        "threads": torch.get_num_threads(),
        "heldout_l1_before": round(before, 5),
        "heldout_l1_after": round(after, 5),
        "scaling_factor": scaling_factor,
        "scaling_factor_from": "1/std of the posterior-mode latents of the held-out images",
    }


# --------------------------------------------------------------------------- language/vision


def _clip_vision_config(**overrides):
    from transformers import CLIPVisionConfig

    kwargs = dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
        hidden_act="quick_gelu",
    )
    kwargs.update(overrides)
    return CLIPVisionConfig(**kwargs)


def _image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def _llama_config(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=LM_MAX_LENGTH,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _make_llava(tokenizer):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = _clip_vision_config()
    config = LlavaConfig(
        vision_config=vision,
        text_config=_llama_config(tokenizer),
        image_token_id=image_token_id,
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,  # CLS dropped
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )
    model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(
        image_processor=_image_processor(),
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token; "default" drops it again
    )
    return model, processor


def _make_clip(tokenizer):
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = CLIPConfig(
        text_config=text, vision_config=_clip_vision_config().to_dict(), projection_dim=32
    )
    processor = CLIPProcessor(image_processor=_image_processor(), tokenizer=tokenizer)
    return CLIPModel(config), processor


def _make_blip2(corpus: list[str]):
    """BLIP-2 with an OPT language model (the captioner `Salesforce/blip2-opt-2.7b` shrunk):
    ViT 32 px / patch 8 / width 32, a 2-layer Q-Former with cross-attention in every layer,
    4 query tokens, a 2-layer OPT. The processor adds `<image>` to the byte-level tokenizer
    (as an `AddedToken`: a tokenizer whose `image_token` is a plain string breaks
    `Blip2Processor` in transformers 5.23) and `image_token_index` points at it: with the
    default None `generate` crashes (REFERENCE.md, "MMIG's building blocks")."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
    )

    tokenizer = _lm_tokenizer(corpus, image_token=False)
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        num_query_tokens=BLIP2_QUERY_TOKENS,
    )
    vision = Blip2VisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    qformer = Blip2QFormerConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        cross_attention_frequency=1,
    )
    text = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=LM_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=BLIP2_QUERY_TOKENS,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    return Blip2ForConditionalGeneration(config), processor


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


def _make_t5(tokenizer):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",  # Flan-T5
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5ForConditionalGeneration(config)


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
        vae_fit = _fit_vae(vae, seed=seed, resolution=resolution, steps=vae_steps, log=log)
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
