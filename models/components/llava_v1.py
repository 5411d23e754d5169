"""Convert the original LLaVA v1 layout (the MLLM of the MGIE release) to the llava-hf layout.

The MGIE release (apple/ml-mgie README) runs on "LLaVA-7B-v1": liuhaotian's
``LLaVA-Lightning-7B-delta-v1-1`` applied to LLaMA-7B, saved by LLaVA commit 7ace501 as a
``LlavaLlamaForCausalLM``. Its folder (facts from ml-mgie's ``mgie_llava.py``, ``demo.ipynb``):

- ``config.json``: ``model_type: "llava"``, the LLaMA fields (``hidden_size``,
  ``num_hidden_layers``, ..., ``vocab_size`` 32003), ``mm_vision_tower`` (CLIP ViT-L/14, a name
  or a path), ``mm_hidden_size`` 1024, ``mm_vision_select_layer`` -2,
  ``mm_use_im_start_end`` true, ``use_mm_proj`` true;
- weights (``pytorch_model*.bin`` or ``*.safetensors``, with or without an index):
  ``model.embed_tokens.weight``, ``model.layers.N.*``, ``model.norm.weight``,
  ``lm_head.weight`` and ``model.mm_projector.{weight,bias}``, ONE ``nn.Linear`` 1024 -> 4096;
  the CLIP vision tower is loaded from ``mm_vision_tower`` (a checkpoint that holds
  ``model.vision_tower.*`` keys supplies it instead);
- the tokenizer: LLaMA's 32,000 tokens + ``<im_patch>`` 32000, ``<im_start>`` 32001,
  ``<im_end>`` 32002 (so the demo's ``[IMG0]`` is 32003).

The model reads ``CLIPVisionModel(images).hidden_states[mm_vision_select_layer][:, 1:]`` (the
patches, no CLS), applies ``mm_projector`` and puts the result in place of the embeddings of
the ``<im_patch>`` tokens, which the prompt carries as ``<im_start>`` + 256 ``<im_patch>`` +
``<im_end>`` (``demo.ipynb``); ``<im_start>``/``<im_end>`` are ordinary embedding rows.

:func:`convert_llava_v1` writes the same model as a ``LlavaForConditionalGeneration`` +
``LlavaProcessor`` folder, which :class:`models.components.mllm.MLLM` reads:
``image_token_index`` = the id of ``<im_patch>``, ``vision_feature_layer`` =
``mm_vision_select_layer``, ``vision_feature_select_strategy`` ``"default"`` (CLS dropped).
llava-hf's projector has two layers (``linear_1`` -> act -> ``linear_2``); here
``linear_1`` = ``mm_projector``, ``projector_hidden_act`` ``"linear"`` (the identity) and
``linear_2`` = the identity matrix with a zero bias, so the projector is exactly the one
Linear of the original (the identity costs one H x H matmul per image and no precision: its
products are exact in any float dtype). ``mm_use_im_start_end`` is kept in the saved config, so
the MLLM wraps the image token in ``<im_start>``/``<im_end>`` as the release's prompt does.
The tokenizer is the source's own (ids unchanged; checked after the reload).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor

IM_PATCH, IM_START, IM_END = "<im_patch>", "<im_start>", "<im_end>"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: LLaMA fields of the original config that make the llava-hf ``text_config``.
TEXT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
)
#: Source key prefixes -> llava-hf (transformers 5) prefixes.
PREFIXES = (
    ("model.mm_projector.", "model.multi_modal_projector.linear_1."),
    ("model.vision_tower.", "model.vision_tower."),
    ("model.", "model.language_model."),
    ("lm_head.", "lm_head."),
)
#: Buffers old checkpoints saved that today's modules recompute: checked, then dropped.
ROTARY = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
POSITION_IDS = "embeddings.position_ids"


class LlavaConversionError(ValueError):
    """The source folder is not the original LLaVA v1 layout, or its files disagree."""


def convert_llava_v1(
    src: str | Path,
    out: str | Path,
    vision: str | Path | None = None,
    dtype: str | None = None,
) -> dict:
    """Write the original-layout LLaVA v1 folder ``src`` to ``out`` in the llava-hf layout.

    Args:
        src: the original folder (config.json with ``mm_vision_tower``, weights, tokenizer).
        out: the folder to write (``config.json``, safetensors, processor and tokenizer files,
            ``conversion.json``).
        vision: a local CLIP folder (``CLIPModel`` or ``CLIPVisionModel`` + image processor);
            default the source's ``mm_vision_tower`` when that is a local folder.
        dtype: ``float16``/``bfloat16``/``float32``; default the dtype of the source weights.

    Returns the summary also written to ``out/conversion.json``. Raises
    :class:`LlavaConversionError` naming the key and file when a source key is unused or a
    needed one is missing, and ``FileNotFoundError`` for absent folders.
    """
    from transformers import CLIPVisionConfig, LlavaConfig

    src, out = Path(src), Path(out)
    if out.exists() and any(out.iterdir()):
        raise LlavaConversionError(f"{out}: output folder is not empty; choose a new one")
    source = _read_config(src)
    vision_dir = _vision_folder(src, source, vision)
    if dtype is not None and dtype not in DTYPES:
        raise LlavaConversionError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    vision_config = CLIPVisionConfig.from_pretrained(vision_dir, local_files_only=True)
    if source.get("mm_hidden_size", vision_config.hidden_size) != vision_config.hidden_size:
        raise LlavaConversionError(
            f"{src}/config.json: mm_hidden_size {source['mm_hidden_size']} but the vision tower "
            f"{vision_dir} has hidden_size {vision_config.hidden_size}"
        )
    tokenizer = _source_tokenizer(src)
    if len(tokenizer) != source.get("vocab_size"):
        raise LlavaConversionError(
            f"{src}: the tokenizer has {len(tokenizer)} tokens but config.json says vocab_size "
            f"{source.get('vocab_size')} (the release's [IMG] rows follow the vocabulary)"
        )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (IM_PATCH, IM_START, IM_END)}

    weights, origin = _load_weights(src)
    target_dtype = DTYPES[dtype] if dtype else weights["model.embed_tokens.weight"].dtype
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=_text_config(source, src),
        image_token_index=ids[IM_PATCH],
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
        projector_hidden_act="linear",
        vision_feature_select_strategy="default",
        vision_feature_layer=source.get("mm_vision_select_layer", -1),
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
        mm_use_im_start_end=bool(source.get("mm_use_im_start_end", False)),
    )
    config.dtype = target_dtype
    state = _llava_hf_state(config, weights, origin, vision_dir, src)
    state = {k: v.to(target_dtype).contiguous() for k, v in state.items()}

    from huggingface_hub import save_torch_state_dict

    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_torch_state_dict(state, out, max_shard_size="5GB")
    _save_processor(out, vision_dir, vision_config, tokenizer, ids[IM_PATCH])
    summary = {
        "source": str(src),
        "vision": str(vision_dir),
        "dtype": str(target_dtype).removeprefix("torch."),
        "source_files": sorted({str(f.name) for f in origin.values()}),
        "tensors": len(state),
        "vocab_size": config.text_config.vocab_size,
        "token_ids": ids,
        "image_seq_length": config.image_seq_length,
        "mm_use_im_start_end": config.mm_use_im_start_end,
        "projector": "linear_1 = mm_projector; act linear; linear_2 = identity, zero bias",
    }
    (out / "conversion.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ----------------------------------------------------------------------------- config


def _read_config(src: Path) -> dict:
    file = src / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{src}: no config.json (expected an original LLaVA v1 folder)")
    config = json.loads(file.read_text())
    if "text_config" in config:
        raise LlavaConversionError(
            f"{file}: already the llava-hf layout (it has text_config); use the folder as is"
        )
    if config.get("model_type") != "llava" or "mm_vision_tower" not in config:
        raise LlavaConversionError(
            f"{file}: not the original LLaVA v1 layout (model_type 'llava' with "
            f"mm_vision_tower); found model_type {config.get('model_type')!r}"
        )
    if not config.get("use_mm_proj", False):
        raise LlavaConversionError(f"{file}: use_mm_proj is not true (no mm_projector)")
    return config


def _vision_folder(src: Path, config: dict, vision: str | Path | None) -> Path:
    name = config.get("mm_vision_tower")
    if vision is None:
        if name and Path(name).is_dir():
            return Path(name)
        raise LlavaConversionError(
            f"{src}/config.json names the vision tower {name!r}, which is not a local folder: "
            f"pass --vision DIR (a local copy of {name}, a CLIP folder with its image processor)"
        )
    folder = Path(vision)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: vision folder without config.json (a CLIP folder)")
    return folder


def _text_config(source: dict, src: Path):
    from transformers import LlamaConfig

    fields = {k: source[k] for k in TEXT_FIELDS if source.get(k) is not None}
    pad = source.get("pad_token_id")
    if isinstance(pad, int) and 0 <= pad < source["vocab_size"]:
        fields["pad_token_id"] = pad  # LLaMA-1 configs say -1: none
    try:
        return LlamaConfig(tie_word_embeddings=False, **fields)
    except (TypeError, ValueError) as err:
        raise LlavaConversionError(f"{src}/config.json: bad LLaMA fields: {err}") from err


def _source_tokenizer(src: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{src}: cannot read the tokenizer: {err}") from err
    vocab = tokenizer.get_vocab()
    absent = [t for t in (IM_PATCH, IM_START, IM_END) if t not in vocab]
    if absent:
        raise LlavaConversionError(
            f"{src}: the tokenizer lacks {absent} (LLaVA v1 adds <im_patch>, <im_start>, <im_end>)"
        )
    return tokenizer


# ----------------------------------------------------------------------------- weights


def _weight_files(src: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (src / index).is_file():
            names = set(json.loads((src / index).read_text())["weight_map"].values())
            return [src / n for n in sorted(names)]
    for pattern in (
        "model.safetensors",
        "pytorch_model.bin",
        "*.safetensors",
        "pytorch_model*.bin",
    ):
        files = sorted(src.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(f"{src}: no weights (pytorch_model*.bin or *.safetensors)")


def _load_file(file: Path) -> dict[str, Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"{file}: weight file named by the index is missing")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(file)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a pre-zipfile torch.save cannot be memory-mapped
        state = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise LlavaConversionError(f"{file}: expected a state dict, got {type(state).__name__}")
    return state


def _load_weights(src: Path) -> tuple[dict[str, Tensor], dict[str, Path]]:
    """All source tensors and the file each came from."""
    weights, origin = {}, {}
    for file in _weight_files(src):
        for key, value in _load_file(file).items():
            if key in weights:
                raise LlavaConversionError(f"{key!r} is in both {origin[key]} and {file}")
            weights[key], origin[key] = value, file
    for key in ("model.embed_tokens.weight", "model.mm_projector.weight"):
        if key not in weights:
            raise LlavaConversionError(f"{src}: missing key {key!r} (files {_names(origin)})")
    return weights, origin


def _names(origin: dict[str, Path]) -> list[str]:
    return sorted({f.name for f in origin.values()})


def _check_buffer(key: str, value: Tensor, expected: Tensor, file: Path) -> None:
    if value.shape != expected.shape or not torch.allclose(value.float(), expected, atol=1e-4):
        raise LlavaConversionError(
            f"{file}: {key!r} differs from the value transformers recomputes "
            f"({tuple(value.shape)} vs {tuple(expected.shape)}); another RoPE base or positions?"
        )


def _llava_hf_state(config, weights, origin, vision_dir: Path, src: Path) -> dict[str, Tensor]:
    """The llava-hf state dict: every expected key filled, every source key used (or a
    recomputed buffer checked and dropped), shapes checked; errors name key and file."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        expected = {
            k: tuple(v.shape) for k, v in LlavaForConditionalGeneration(config).state_dict().items()
        }
    text = config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))

    state: dict[str, Tensor] = {}
    unused = []
    for key, value in weights.items():
        if ROTARY.match(key):
            _check_buffer(key, value, inv_freq, origin[key])
            continue
        if key.endswith(POSITION_IDS):
            _check_buffer(
                key, value, torch.arange(value.shape[-1]).expand_as(value).float(), origin[key]
            )
            continue
        target = _target_key(key)
        if target is None or target not in expected:
            unused.append(f"{key} ({origin[key].name})")
            continue
        state[target] = value
    if unused:
        raise LlavaConversionError(
            f"{src}: {len(unused)} source keys have no place in LlavaForConditionalGeneration: "
            f"{unused[:10]}"
        )
    linear_2 = "model.multi_modal_projector.linear_2."
    hidden = text.hidden_size
    state[linear_2 + "weight"] = torch.eye(hidden)
    state[linear_2 + "bias"] = torch.zeros(hidden)
    if not any(k.startswith("model.vision_tower.") for k in state):
        state.update(_vision_state(vision_dir))
    missing = sorted(set(expected) - set(state))
    if missing:
        raise LlavaConversionError(
            f"{src}: missing keys (files {_names(origin)}): {missing[:10]}"
            + (f" ... ({len(missing)} in all)" if len(missing) > 10 else "")
        )
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise LlavaConversionError(
                f"{src}: {key!r} has shape {tuple(state[key].shape)}, the config needs {shape}"
            )
    return state


def _target_key(key: str) -> str | None:
    if key.startswith("model.vision_tower."):
        rest = key[len("model.vision_tower.") :]
        rest = rest[2:] if rest.startswith("0.") else rest  # a ModuleList([CLIPVisionModel])
        return "model.vision_tower." + rest
    for old, new in PREFIXES:
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def _vision_state(vision_dir: Path) -> dict[str, Tensor]:
    import transformers
    from transformers import CLIPVisionModel

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # a CLIPModel folder's text weights go unused
    bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.disable_progress_bar()
    try:
        tower, info = CLIPVisionModel.from_pretrained(
            vision_dir, local_files_only=True, output_loading_info=True
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()
    if info["missing_keys"]:
        raise LlavaConversionError(
            f"{vision_dir}: the vision tower weights lack {sorted(info['missing_keys'])[:10]}"
        )
    return {"model.vision_tower." + k: v for k, v in tower.state_dict().items()}


# ----------------------------------------------------------------------------- processor


def _save_processor(out: Path, vision_dir: Path, vision_config, tokenizer, patch_id: int) -> None:
    """LlavaProcessor: the vision folder's CLIPImageProcessor, the source tokenizer,
    ``<im_patch>`` as the image token; reloaded with AutoProcessor to check the ids."""
    from transformers import AutoProcessor, CLIPImageProcessor, LlavaProcessor

    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor.from_pretrained(vision_dir, local_files_only=True),
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy="default",
        image_token=IM_PATCH,
        num_additional_image_tokens=1,  # the CLS position, which "default" drops again
    )
    processor.save_pretrained(out)
    reloaded = AutoProcessor.from_pretrained(out, local_files_only=True)
    if reloaded.image_token != IM_PATCH or reloaded.image_token_id != patch_id:
        raise LlavaConversionError(
            f"{out}: the reloaded processor's image token is {reloaded.image_token!r} "
            f"(id {reloaded.image_token_id}), not {IM_PATCH!r} ({patch_id})"
        )
    if reloaded.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise LlavaConversionError(f"{out}: the saved tokenizer's ids differ from the source's")
