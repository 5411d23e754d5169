"""The same predictions evaluated in 1 process and in 2 DDP processes (CPU, gloo) give the same
value for every metric.

One spawn of 2 processes evaluates every metric twice, on an even (4 + 4) and an uneven (5 + 3)
split of a fixed batch of 8 random images; ``compute()`` syncs the states across the ranks.
The reference is the same metrics updated with all 8 images in this (undistributed) process.
Backbones are tiny and random: a CLIP and a DINO ViT saved here, LPIPS with a seeded random
AlexNet, FID/KID on a fixed random conv feature module.
"""

from __future__ import annotations

import json
import math
import os
import socket
import string
import sys
import traceback
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # spawned children import this module before the test's setup
    sys.path.insert(0, str(REPO))

N_IMAGES = 8
SIZE = 64
SPLITS = {"even": (4, 4), "uneven": (5, 3)}
WORLD_SIZE = 2
TIMEOUT_S = 300
CAPTION_WORDS = ["a red square", "a blue circle", "two green stars", "a cat", "the night sky"]


class TinyFeatures(nn.Module):
    """A fixed random conv + ReLU + global average pool, ``[N, 3, H, W]`` in [0, 1] -> ``[N, 16]``:
    the injected feature extractor of FID and KID (the same weights in every process)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 16, kernel_size=3, stride=2, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen))
            self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=gen) * 0.1)
        self.requires_grad_(False)
        self.num_features = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x.float())).mean(dim=(2, 3))


# ----------------------------------------------------------------------------- backbones


def save_tiny_clip(out: Path) -> Path:
    """A tiny random CLIPModel (32 px, patch 8, width 32) + a character-level CLIPProcessor."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    chars = string.ascii_lowercase
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({f"{c}</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    text = dict(
        vocab_size=len(vocab),
        max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        **layers,
    )
    vision = dict(image_size=32, patch_size=8, **layers)
    torch.manual_seed(0)
    CLIPModel(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    ).save_pretrained(out)
    CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=CLIPTokenizer(vocab=vocab, merges=[]),
    ).save_pretrained(out)
    return out


def save_tiny_dino(out: Path) -> Path:
    """A tiny random ViT (224 px as MagicBrush's DINO transform feeds, patch 16, width 32)."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=224,
        patch_size=16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    ViTModel(config).save_pretrained(out)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(out)
    return out


# ----------------------------------------------------------------------------- the evaluation


def make_batch() -> dict:
    """The fixed batch: source, preds and target images in [-1, 1], masks (one empty) and
    captions. Built from a seeded generator, so every process holds the same batch."""
    gen = torch.Generator().manual_seed(1234)

    def images() -> torch.Tensor:
        return torch.rand(N_IMAGES, 3, SIZE, SIZE, generator=gen) * 2 - 1

    source, target = images(), images()
    preds = (0.6 * target + 0.4 * images()).clamp(-1, 1)
    mask = torch.zeros(N_IMAGES, 1, SIZE, SIZE)
    corners = torch.randint(0, SIZE // 2, (N_IMAGES, 2), generator=gen)
    for i, (top, left) in enumerate(corners.tolist()):
        if i != 6:  # image 6 (on rank 1 in both splits) has an empty mask
            mask[i, :, top : top + SIZE // 3, left : left + SIZE // 4] = 1
    words = len(CAPTION_WORDS)
    return {
        "source": source,
        "preds": preds,
        "target": target,
        "mask": mask,
        "source_caption": [CAPTION_WORDS[i % words] for i in range(N_IMAGES)],
        "goal_caption": [CAPTION_WORDS[(3 * i + 1) % words] for i in range(N_IMAGES)],
    }


def build_metrics(backbones: Path) -> dict:
    """name -> (metric, the batch keys its ``update`` takes, in order, from the registry)."""
    from metrics import (
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
    from metrics.collection import metric_inputs

    clip, dino = backbones / "clip", backbones / "dino"
    torch.manual_seed(0)  # the random LPIPS backbone: the same in every process
    metrics = {
        "L1": L1(),
        "L1_edit": MaskedL1(),
        "SSIM": SSIM(),
        "LPIPS": LPIPS(net="alex", weights_path="random"),
        "DINO": DINO(dino),
        "CVS": CVS(clip),
        "CTS": CTS(clip),
        "CLIP_direction": CLIPDirectionalSimilarity(clip),
        "CLIP_image": CLIPImageSimilarity(clip),
        "FID": FID(feature=TinyFeatures()),
        # subset_size = all images: every KID subset is the whole set, whatever the RNG draws.
        "KID": KID(feature=TinyFeatures(), subsets=3, subset_size=N_IMAGES),
    }
    return {name: (metric, metric_inputs(name, metric)) for name, metric in metrics.items()}


def evaluate(backbones: Path, batch: dict, index: slice) -> dict[str, float]:
    """Update every metric with ``batch[index]`` and compute (synced when distributed)."""
    from metrics.evaluation import flatten_value

    results = {}
    with torch.no_grad():
        for name, (metric, keys) in build_metrics(backbones).items():
            metric.update(*(batch[k][index] for k in keys))
            results |= flatten_value(name, metric.compute())  # KID: name, name_std
    return results


def local_l1(batch: dict, index: slice) -> float:
    """L1 of this rank's images only (no sync): must differ from the synced value."""
    from metrics import L1

    metric = L1(sync_on_compute=False)
    metric.update(batch["preds"][index], batch["target"][index])
    return float(metric.compute())


def run_rank(rank: int, port: int, backbones: str, out: str) -> None:
    """One DDP process: both splits, results to ``<out>/rank<r>.json`` (a traceback to
    ``rank<r>.err`` on failure)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE
        )
        batch = make_batch()
        results = {}
        for split, sizes in SPLITS.items():
            start = sum(sizes[:rank])
            index = slice(start, start + sizes[rank])
            results[split] = evaluate(Path(backbones), batch, index)
            results[split]["local_L1"] = local_l1(batch, index)
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
        dist.barrier()
    except Exception:
        Path(out, f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ddp(backbones: Path, out: Path) -> list[dict]:
    """Spawn the 2 ranks, wait (with a timeout, so a stuck collective fails the test)."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    port = free_port()
    procs = [
        context.Process(target=run_rank, args=(rank, port, str(backbones), str(out)))
        for rank in range(WORLD_SIZE)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(TIMEOUT_S)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    errors = [p.read_text() for p in sorted(out.glob("rank*.err"))]
    codes = [p.exitcode for p in procs]
    assert not errors and codes == [0] * WORLD_SIZE, f"exit codes {codes}\n" + "\n".join(errors)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]


# ----------------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def backbones(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("backbones")
    save_tiny_clip(root / "clip")
    save_tiny_dino(root / "dino")
    return root


def close(name: str, got: float, expected: float, scale: float) -> bool:
    """1e-5 for the per-image means; 1e-4 relative for FID and KID (float sums of features
    in another order); KID's std is ~0 on both sides (every subset is the whole set)."""
    if name.startswith("KID_std"):
        return abs(got - expected) <= 1e-4 * abs(scale) + 1e-9
    if name in ("FID", "KID"):
        return math.isclose(got, expected, rel_tol=1e-4, abs_tol=1e-9)
    return math.isclose(got, expected, rel_tol=1e-5, abs_tol=1e-6)


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(backbones, tmp_path):
    batch = make_batch()
    single = evaluate(backbones, batch, slice(None))
    names = {
        "L1", "L1_edit", "SSIM", "LPIPS", "DINO", "CVS", "CTS", "CLIP_direction", "CLIP_image",
        "FID", "KID", "KID_std",
    }  # fmt: skip
    assert set(single) == names
    assert all(math.isfinite(v) for v in single.values()), single
    assert single["FID"] > 1e-3 and single["KID"] > 1e-6  # not a degenerate comparison

    ranks = run_ddp(backbones, tmp_path)
    mismatches = []
    for split in SPLITS:
        for rank, results in enumerate(ranks):
            for name in names:
                got, expected = results[split][name], single[name]
                if not close(name, got, expected, single.get("KID", 1.0)):
                    mismatches.append(
                        f"{split} rank {rank} {name}: {got!r} vs 1 process {expected!r}"
                    )
            # Each rank saw only its share: unsynced, its L1 differs; synced, it is the global one.
            assert not math.isclose(results[split]["local_L1"], single["L1"], rel_tol=1e-4)
    assert not mismatches, "\n".join(mismatches)
