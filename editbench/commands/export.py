"""``python -m editbench export``: the trained parts of a checkpoint as safetensors, with a JSON
that says what they are.

A ``fit`` checkpoint holds the trainable weights only (frozen pretrained weights are re-read
from their folders), next to optimizer state, loop state and pickled-free hyperparameters. For
sharing or serving, ``export`` writes one ``<part>.safetensors`` per trained part (the first
component of the parameter name, two for ``diffusion.*``: ``diffusion.unet``,
``text_encoder``, ``mllm``, ``edit_head``, ...), the EMA weights where the run kept them
(``--raw`` for the trained ones), and ``export.json``:

* ``model``: class path and constructor arguments (``init_args``) as the checkpoint saved them;
* ``base_paths``: every ``*_path`` / ``*_from`` argument with the SHA-256 fingerprint of its
  weight and config files (:func:`metrics.provenance.weights_sha256`), so the frozen parts the
  export does not hold are identified, not only named;
* ``parts``: per file its SHA-256, bytes, tensor and parameter counts;
* ``checkpoint``: the source file, its SHA-256, global step and whether EMA weights were used.

    python -m editbench export --ckpt_path runs/quickstart/checkpoints/last.ckpt --out exports/quickstart

Reload a part with ``safetensors.torch.load_file`` and ``load_state_dict`` on the same submodule.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from metrics.provenance import file_sha256, weights_sha256
from models.checkpoint import read_checkpoint

FORMAT = "editbench.export/1"


def part_name(key: str) -> str:
    """The part a parameter belongs to: ``diffusion.unet.conv_in.weight`` -> ``diffusion.unet``,
    ``mllm.new_rows`` -> ``mllm``."""
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] == "diffusion" and len(parts) > 2 else parts[0]


def split_parts(weights: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Weights grouped by :func:`part_name`, each keyed relative to its part (contiguous
    tensors, as safetensors stores them)."""
    grouped: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in weights.items():
        part = part_name(key)
        grouped[part][key[len(part) + 1 :]] = value.detach().contiguous()
    return dict(grouped)


def base_paths(init_args: dict) -> dict[str, dict]:
    """The model's pretrained-folder arguments with their fingerprints (``None`` where the path
    does not exist here: the export is still written, the JSON says the base is unverified)."""
    out = {}
    for name, value in sorted(init_args.items()):
        if not isinstance(value, str) or not (name.endswith("_path") or name.endswith("_from")):
            continue
        exists = Path(value).exists()
        out[name] = {"path": value, "sha256": weights_sha256(value) if exists else None}
    return out


def export(ckpt_path: str | Path, out: str | Path, ema: bool = True) -> dict:
    """Write the parts and ``export.json`` into ``out``; returns the JSON document."""
    checkpoint = read_checkpoint(ckpt_path)
    use_ema = ema and checkpoint.has_ema
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    init_args = checkpoint.init_args()
    parts = {}
    for part, tensors in sorted(split_parts(checkpoint.weights(ema=use_ema)).items()):
        path = out / f"{part}.safetensors"
        save_file(tensors, str(path), metadata={"format": FORMAT, "part": part})
        parts[part] = {
            "file": path.name,
            "sha256": file_sha256(path),
            "bytes": path.stat().st_size,
            "tensors": len(tensors),
            "parameters": sum(t.numel() for t in tensors.values()),
        }
    document = {
        "format": FORMAT,
        "model": {"class_path": checkpoint.class_path, "init_args": init_args},
        "base_paths": base_paths(init_args),
        "parts": parts,
        "checkpoint": {
            "path": str(checkpoint.path),
            "sha256": file_sha256(checkpoint.path),
            "global_step": checkpoint.global_step,
            "ema_weights": use_ema,
        },
    }
    (out / "export.json").write_text(json.dumps(document, indent=2, default=str) + "\n")
    return document


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m editbench export",
        description="Write a checkpoint's trained parts as safetensors with export.json.",
    )
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by fit")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument(
        "--raw", action="store_true", help="export the trained weights, not their EMA"
    )
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    document = export(args.ckpt_path, args.out, ema=not args.raw)
    total = sum(p["bytes"] for p in document["parts"].values())
    for part in document["parts"].values():
        print(f"{part['file']:<40}{part['parameters'] / 1e6:>10.2f} M params")
    print(f"wrote {len(document['parts'])} parts ({total / 2**20:.1f} MiB) and export.json to {args.out}")
    return 0
