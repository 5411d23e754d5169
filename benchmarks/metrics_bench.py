"""CPU cost of each edit metric per image, and how much of it is the backbone's forward pass.

    python benchmarks/metrics_bench.py [--n 64] [--resolution 256] [--batch 16] [--repeats 3]
                                       [--backbones tiny|full] [--threads T] [--output FILE]

Every metric of :mod:`metrics` is updated with ``n`` random image pairs at ``resolution`` in
batches of ``batch`` and then computed. Reported per metric (medians over ``repeats``):

- ``update_ms_per_image``: wall time (``time.perf_counter``) of all updates / ``n``;
  ``update_cpu_ms_per_image``: the same in process CPU time (``time.process_time``, all
  threads, so about ``threads`` x wall when the kernels parallelise);
- ``compute_ms``: one ``compute()`` (FID's matrix square root is here, independent of ``n``);
- ``forward_ms_per_image`` / ``forward_cpu_ms_per_image`` and ``forward_share``: the
  backbone's forward pass alone on the same images, already preprocessed outside the timer
  (CLIP image/text towers, the DINO ViT, LPIPS's AlexNet, the Inception net of FID/KID with its
  own resize to 299), and its share of the update's CPU time (CPU time: on a shared machine,
  waiting for a core inflates wall times). The rest is preprocessing (resize, crop, normalise,
  tokenise) and the metric's bookkeeping.

Backbones are random, built in a temporary folder (nothing is downloaded): ``--backbones tiny``
(default) uses the test suite's tiny CLIP (32 px, width 32) and DINO (224 px, width 32);
``--backbones full`` uses the architectures of the paper metrics, CLIP ViT-B/32 and DINO
ViT-S/16 (random weights: the speed is the architecture's). LPIPS always runs torchvision's
AlexNet and FID/KID torch-fidelity's Inception-v3 (2048 features), both with random weights:
the Inception net is built with its weight loading skipped and saved to a file that FID/KID
then read as the offline weights, exactly as they would read the real ones.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import string
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metrics import (  # noqa: E402
    CTS,
    CVS,
    DINO,
    FID,
    KID,
    L1,
    LPIPS,
    SSIM,
    CLIPDirectionalSimilarity,
    CLIPImageSimilarity,
    MaskedL1,
)
from metrics.features import (  # noqa: E402
    load_clip,
    load_dino,
    preprocess_magicbrush_dino,
    preprocess_with_processor,
)
from metrics.fid import INCEPTION_WEIGHTS_FILE  # noqa: E402
from metrics.pixel import prepare_pair, to_unit_range  # noqa: E402

CAPTIONS = ["a red square on a lawn", "a blue car at night", "two green birds", "a snowy street"]

# (vision, text) transformer sizes: hidden, intermediate, layers, heads (+ patch for vision).
CLIP_SIZES = {
    "tiny": dict(image=32, patch=8, vision=(32, 64, 2, 4), text=(32, 64, 2, 4), projection=16),
    "full": dict(  # CLIP ViT-B/32 (MagicBrush's CLIP-I / CLIP-T backbone)
        image=224, patch=32, vision=(768, 3072, 12, 12), text=(512, 2048, 12, 8), projection=512
    ),
}
DINO_SIZES = {"tiny": (32, 64, 2, 4), "full": (384, 1536, 12, 6)}  # full: DINO ViT-S/16


# ----------------------------------------------------------------------------- backbones


def _layers(hidden: int, intermediate: int, layers: int, heads: int) -> dict[str, int]:
    return dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
    )


def build_clip(out: Path, size: str) -> Path:
    """A random CLIPModel of the given size + a CLIPProcessor with a character-level tokenizer."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    spec = CLIP_SIZES[size]
    chars = string.ascii_lowercase
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({f"{c}</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    text = dict(
        vocab_size=len(vocab),
        max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        **_layers(*spec["text"]),
    )
    vision = dict(image_size=spec["image"], patch_size=spec["patch"], **_layers(*spec["vision"]))
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec["projection"])
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(out)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec["image"]},
        crop_size={"height": spec["image"], "width": spec["image"]},
    )
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def build_dino(out: Path, size: str) -> Path:
    """A random ViT of the given size at 224 px, patch 16 (DINO ViT-S/16's layout for ``full``)."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(image_size=224, patch_size=16, **_layers(*DINO_SIZES[size]))
    ViTModel(config).save_pretrained(out)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(out)
    return out


def build_random_inception(out: Path) -> Path | None:
    """torch-fidelity's Inception-v3 with random weights, saved under the file name FID/KID
    expect; None if torch-fidelity cannot be built this way."""
    try:
        import torch_fidelity.feature_extractor_inceptionv3 as tfi

        cls = tfi.FeatureExtractorInceptionV3
        # Skip the download and the weight loading: the layers keep their random initialisation.
        with (
            mock.patch.object(tfi, "load_state_dict_from_url", lambda *a, **k: {}),
            mock.patch.object(cls, "load_state_dict", lambda self, *a, **k: None, create=True),
        ):
            torch.manual_seed(0)
            net = cls("inception-v3-compat", ["2048"])
    except Exception as err:  # noqa: BLE001 - any failure means "use the fallback"
        print(f"random Inception-v3 not constructible ({err}); FID/KID use a small conv net")
        return None
    path = out / INCEPTION_WEIGHTS_FILE
    torch.save(net.state_dict(), path)
    return path


class SmallFeatures(torch.nn.Module):
    """Fallback FID/KID features when Inception cannot be built: 2 strided convs + pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, stride=2, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(32, 64, 3, stride=2, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )
        self.num_features = 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float())


# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    """A metric, the batch fields its update takes, and a backbone-forward-only closure maker
    (inputs prepared outside the timer); ``forward`` is None for backbone-free metrics."""

    name: str
    metric: Any
    keys: tuple[str, ...]
    forward: Callable[[dict], Callable[[], Any]] | None = None


def _clip_image_forward(clip_path: str, *keys: str) -> Callable[[dict], Callable[[], Any]]:
    def prepare(batch: dict) -> Callable[[], Any]:
        model, processor = load_clip(clip_path)
        pixels = preprocess_with_processor(torch.cat([batch[k] for k in keys]), processor)
        return lambda: model.get_image_features(pixel_values=pixels)

    return prepare


def _clip_text_tokens(clip_path: str, captions: list[str]) -> dict[str, torch.Tensor]:
    _, processor = load_clip(clip_path)
    tokens = processor.tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
    return {k: tokens[k] for k in ("input_ids", "attention_mask")}


def _clip_image_text_forward(
    clip_path: str, image_keys: tuple[str, ...], text_keys: tuple[str, ...]
) -> Callable[[dict], Callable[[], Any]]:
    images = _clip_image_forward(clip_path, *image_keys)

    def prepare(batch: dict) -> Callable[[], Any]:
        model, _ = load_clip(clip_path)
        image_forward = images(batch)
        tokens = _clip_text_tokens(clip_path, [c for k in text_keys for c in batch[k]])
        return lambda: (image_forward(), model.get_text_features(**tokens))

    return prepare


def _dino_forward(dino_path: str) -> Callable[[dict], Callable[[], Any]]:
    def prepare(batch: dict) -> Callable[[], Any]:
        model, _ = load_dino(dino_path)
        pixels = preprocess_magicbrush_dino(torch.cat([batch["preds"], batch["target"]]))
        return lambda: model(pixel_values=pixels)

    return prepare


def _lpips_forward(metric: LPIPS) -> Callable[[dict], Callable[[], Any]]:
    network = metric.lpips_net

    def prepare(batch: dict) -> Callable[[], Any]:
        preds01, target01 = prepare_pair(batch["preds"], batch["target"])
        scaled = [network.scaling_layer(x * 2 - 1) for x in (preds01, target01)]
        return lambda: [network.net(x) for x in scaled]

    return prepare


def _feature_forward(metric: Any, as_uint8: bool) -> Callable[[dict], Callable[[], Any]]:
    """FID feeds torch-fidelity's Inception uint8 images; KID's wrapper takes [0, 1] floats."""

    def prepare(batch: dict) -> Callable[[], Any]:
        images = to_unit_range(torch.cat([batch["target"], batch["preds"]]))
        if as_uint8:
            images = (images * 255).byte()
        return lambda: metric.inception(images)

    return prepare


def build_cases(folder: Path, backbones: str, n: int) -> tuple[list[Case], dict[str, str]]:
    """Every metric on random backbones written to ``folder``; also a description of them."""
    clip = str(build_clip(folder / "clip", backbones))
    dino = str(build_dino(folder / "dino", backbones))
    inception = build_random_inception(folder)
    torch.manual_seed(0)
    lpips = LPIPS(net="alex", weights_path="random")
    if inception is not None:
        fid = FID(feature=2048, weights_path=str(inception))
        kid = KID(feature=2048, weights_path=str(inception), subset_size=min(1000, n))
        fid_forward, kid_forward = _feature_forward(fid, True), _feature_forward(kid, False)
    else:
        fid, kid = FID(feature=SmallFeatures()), KID(feature=SmallFeatures(), subset_size=n)
        fid_forward = kid_forward = _feature_forward(fid, False)
    clip_name = {"tiny": "tiny CLIP (32 px, width 32)", "full": "CLIP ViT-B/32 architecture"}
    dino_name = {"tiny": "tiny ViT (224 px, width 32)", "full": "DINO ViT-S/16 architecture"}
    described = {
        "clip": clip_name[backbones] + ", random weights",
        "dino": dino_name[backbones] + ", random weights",
        "lpips": "torchvision AlexNet, random weights; lpips v0.1 linear heads",
        "fid_kid": (
            "torch-fidelity Inception-v3 (2048), random weights"
            if inception is not None
            else "fallback: 2-conv net (64 features); Inception-v3 not constructible offline"
        ),
    }
    pair = ("preds", "target")
    cases = [
        Case("L1", L1(), pair),
        Case("L1_edit", MaskedL1(), ("preds", "target", "mask")),
        Case("SSIM", SSIM(), pair),
        Case("LPIPS", lpips, pair, _lpips_forward(lpips)),
        Case("DINO", DINO(dino), pair, _dino_forward(dino)),
        Case("CVS", CVS(clip), pair, _clip_image_forward(clip, "preds", "target")),
        Case(
            "CTS",
            CTS(clip),
            ("preds", "goal_caption"),
            _clip_image_text_forward(clip, ("preds",), ("goal_caption",)),
        ),
        Case(
            "CLIP_direction",
            CLIPDirectionalSimilarity(clip),
            ("source", "preds", "source_caption", "goal_caption"),
            _clip_image_text_forward(clip, ("source", "preds"), ("source_caption", "goal_caption")),
        ),
        Case(
            "CLIP_image",
            CLIPImageSimilarity(clip),
            ("source", "preds"),
            _clip_image_forward(clip, "source", "preds"),
        ),
        Case("FID", fid, pair, fid_forward),
        Case("KID", kid, pair, kid_forward),
    ]
    return cases, described


# ----------------------------------------------------------------------------- timing


def make_batches(n: int, resolution: int, batch: int) -> list[dict]:
    """``n`` random samples (images in [-1, 1], a rectangular mask, captions) in batches."""
    gen = torch.Generator().manual_seed(0)
    batches = []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        target = torch.rand(b, 3, resolution, resolution, generator=gen) * 2 - 1
        noise = torch.rand(b, 3, resolution, resolution, generator=gen) * 2 - 1
        mask = torch.zeros(b, 1, resolution, resolution)
        mask[..., resolution // 4 : resolution // 2, resolution // 4 : resolution // 2] = 1
        batches.append(
            {
                "source": torch.rand(b, 3, resolution, resolution, generator=gen) * 2 - 1,
                "target": target,
                "preds": (0.7 * target + 0.3 * noise).clamp(-1, 1),
                "mask": mask,
                "source_caption": [CAPTIONS[(start + i) % 4] for i in range(b)],
                "goal_caption": [CAPTIONS[(start + i + 1) % 4] for i in range(b)],
            }
        )
    return batches


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(case: Case, batches: list[dict], repeats: int) -> dict[str, float | None]:
    """Medians over ``repeats`` of the update, compute and backbone-forward times."""
    n = sum(len(b["source_caption"]) for b in batches)
    metric = case.metric

    def update_all() -> None:
        for b in batches:
            metric.update(*(b[k] for k in case.keys))

    metric.update(*(batches[0][k] for k in case.keys))  # warm-up: backbone load, caches
    update_wall, update_cpu, compute_wall = [], [], []
    for _ in range(repeats):
        metric.reset()
        wall, cpu = timed(update_all)
        update_wall.append(wall)
        update_cpu.append(cpu)
        compute_wall.append(timed(metric.compute)[0])
    result: dict[str, float | None] = {
        "update_ms_per_image": 1e3 * statistics.median(update_wall) / n,
        "update_cpu_ms_per_image": 1e3 * statistics.median(update_cpu) / n,
        "compute_ms": 1e3 * statistics.median(compute_wall),
        "forward_ms_per_image": None,
        "forward_cpu_ms_per_image": None,
        "forward_share": None,
    }
    if case.forward is not None:
        closures = [case.forward(b) for b in batches]
        closures[0]()  # warm-up
        times = [timed(lambda: [f() for f in closures]) for _ in range(repeats)]
        forward_wall = statistics.median(t[0] for t in times)
        forward_cpu = statistics.median(t[1] for t in times)
        result["forward_ms_per_image"] = 1e3 * forward_wall / n
        result["forward_cpu_ms_per_image"] = 1e3 * forward_cpu / n
        # CPU time, not wall: on a shared machine waiting for a core inflates wall times.
        result["forward_share"] = forward_cpu / statistics.median(update_cpu)
    return result


def format_table(results: dict[str, dict[str, float | None]]) -> str:
    def num(value: float | None, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    header = (
        "| metric | update ms/img | update CPU ms/img | compute ms | forward CPU ms/img "
        "| forward share (CPU) |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(
            f"| {name} | {num(r['update_ms_per_image'], '.2f')} | "
            f"{num(r['update_cpu_ms_per_image'], '.2f')} | {num(r['compute_ms'], '.1f')} | "
            f"{num(r['forward_cpu_ms_per_image'], '.2f')} | {num(r['forward_share'], '.0%')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=64, help="images (pairs) per measurement")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backbones", choices=("tiny", "full"), default="tiny")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--only", nargs="*", default=None, help="metric names to run")
    parser.add_argument("--output", default=None, help="also write the JSON result here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = make_batches(args.n, args.resolution, args.batch)
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        cases, described = build_cases(Path(folder), args.backbones, args.n)
        results = {
            case.name: measure(case, batches, args.repeats)
            for case in cases
            if not args.only or case.name in args.only
        }
    report = {
        "config": {
            "n": args.n,
            "resolution": args.resolution,
            "batch": args.batch,
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "processor": platform.processor(),
            "backbones": described,
        },
        "results": results,
    }
    print(format_table(results))
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
