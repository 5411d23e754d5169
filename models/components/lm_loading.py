"""Loading and hooks of the language models behind :class:`models.components.mllm.MLLM`:
the LLaVA / LLaMA folders read offline, the dtype casts that let float32 trainable embeddings
sit in a bf16 model, and the state-dict prefixes of the frozen part."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn


class CastOutput:
    """Forward hook: cast a module's output to a fixed dtype (picklable, unlike a lambda)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __call__(self, module: nn.Module, args, output: Tensor) -> Tensor:
        return output.to(self.dtype)


def cast_input_to_weight(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: cast the first input to the module's weight dtype."""
    return (args[0].to(module.weight.dtype), *args[1:])


def frozen_prefixes(module: nn.Module, prefix: str, trainable: set[int]) -> list[str]:
    """Largest submodules (and lone parameters) holding none of the ``trainable`` parameters."""
    if not any(id(p) in trainable for p in module.parameters()):
        return [prefix] if module.state_dict() else []
    out = [
        prefix + name
        for name, p in module.named_parameters(recurse=False)
        if id(p) not in trainable
    ]
    for name, child in module.named_children():
        out += frozen_prefixes(child, f"{prefix}{name}.", trainable)
    return out


def load_language_model(path: Path, visual: bool, dtype: torch.dtype | None):
    """(model, processor or None, tokenizer) from a local folder, offline."""
    kind = "LLaVA (llava-hf layout, e.g. llava-hf/llava-1.5-7b-hf)" if visual else "LLaMA"
    hint = (
        f"{path}: MLLM path must be a local {kind} folder with config.json, the weights and "
        f"the {'processor' if visual else 'tokenizer'} files (or run "
        "`python -m editbench data make-tiny` and use its "
        f"{'llava' if visual else 'llama'}/ folder)"
    )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(hint)
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type")
    if visual and model_type != "llava":
        raise FileNotFoundError(f"{hint}; found model_type {model_type!r}, not 'llava'")
    if visual and "text_config" not in config and "mm_vision_tower" in config:
        raise FileNotFoundError(
            f"{path}: this is the original LLaVA v1 layout (LlavaLlamaForCausalLM, "
            f"mm_vision_tower {config['mm_vision_tower']!r}), which transformers would silently "
            "build as a random default model; convert it first: `python -m editbench data "
            f"convert-llava --src {path} --vision <CLIP folder> --out <new folder>`"
        )
    from transformers import (
        AutoModelForCausalLM,
        AutoProcessor,
        AutoTokenizer,
        LlavaForConditionalGeneration,
    )

    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        if visual:
            model = LlavaForConditionalGeneration.from_pretrained(path, **kwargs)
            processor = AutoProcessor.from_pretrained(path, local_files_only=True)
            tokenizer = processor.tokenizer
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            processor = None
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise FileNotFoundError(f"{hint}: {err}") from err
    tokenizer.padding_side = "left"  # batched generation
    if tokenizer.pad_token is None:  # LLaMA ships none; the released code pads with unk
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return model, processor, tokenizer
