"""Data-side scale and speed: IPr2Pr indexing at the real release's size, record memory of a
growing manifest, and loader throughput (512 px JPEG pairs to 256 px) against bare
decode-resize-crop loops with torchvision's ``decode_image`` (the reference: the loader should be
within 5% of it) and with PIL, at 1, 2 and 4 workers.

    python benchmarks/data_bench.py [--prompts 313010] [--images 512] [--loader-only]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2 import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.folder import FolderEditDataModule  # noqa: E402
from datamodules.ipr2pr import IPr2PrDataModule  # noqa: E402


def ipr2pr_index(root: Path, n: int) -> dict:
    """seeds.json with n prompts, every folder present (empty): time and peak Python memory of
    building the three splits' records."""
    root.mkdir(parents=True)
    names = [f"{i:07d}" for i in range(n)]
    for name in names:
        (root / name).mkdir()
    (root / "seeds.json").write_text(json.dumps([[name, [1, 2, 3]] for name in names]))
    dm = IPr2PrDataModule(root=str(root), report_dir=str(root.parent / "reports"))
    tracemalloc.start()
    start = time.perf_counter()
    counts = {split: len(dm.build_records(split)) for split in ("train", "val", "test")}
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "prompts": n,
        "index_s": round(seconds, 2),
        "peak_mib": round(peak / 2**20, 1),
        "counts": counts,
    }


def manifest_memory(root: Path, rows: int) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    with (root / f"m{rows}.jsonl").open("w") as f:
        for i in range(rows):
            f.write(
                json.dumps(
                    {
                        "source": f"in/{i}.jpg",
                        "target": f"out/{i}.jpg",
                        "instruction": f"edit number {i}",
                    }
                )
                + "\n"
            )
    dm = FolderEditDataModule(root=str(root), manifest=f"m{rows}.jsonl")
    tracemalloc.start()
    records = dm.build_records("train")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "rows": rows,
        "train_records": len(records),
        "peak_mib": round(peak / 2**20, 1),
        "bytes_per_row": round(peak / rows),
    }


class BareDecodeResize(Dataset):
    """The reference: decode source and target, resize the shorter side, center crop; with
    torchvision's ``decode_image`` (libjpeg-turbo into the tensor) or PIL's decoder."""

    def __init__(self, pairs, resolution, decoder: str = "torchvision"):
        self.pairs, self.resolution, self.decoder = pairs, resolution, decoder

    def __len__(self):
        return len(self.pairs)

    def _decode(self, path) -> torch.Tensor:
        if self.decoder == "torchvision":
            return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
        with Image.open(path) as image:
            return F.pil_to_tensor(image.convert("RGB"))

    def __getitem__(self, i):
        out = []
        for path in self.pairs[i]:
            x = self._decode(path)
            x = F.center_crop(F.resize(x, self.resolution, antialias=True), self.resolution)
            out.append(x.float() / 127.5 - 1)
        return out


def write_pairs(root: Path, images: int, size: int = 512) -> list[tuple[Path, Path]]:
    """``images`` JPEG pairs of ``size`` px (IPr2Pr's 512) and a FolderEditDataModule manifest."""
    rng = np.random.default_rng(0)
    (root / "in").mkdir(parents=True)
    (root / "out").mkdir()
    lines, pairs = [], []
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x, y, (x + y) // 2], axis=-1) % 256
    for i in range(images):
        for side in ("in", "out"):
            noise = rng.integers(0, 48, size=base.shape)
            pixels = np.clip(base + noise, 0, 255).astype("uint8")
            Image.fromarray(pixels).save(root / side / f"{i}.jpg", quality=90)
        lines.append(
            json.dumps({"source": f"in/{i}.jpg", "target": f"out/{i}.jpg", "instruction": "x"})
        )
        pairs.append((root / "in" / f"{i}.jpg", root / "out" / f"{i}.jpg"))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return pairs


def throughput(
    root: Path,
    images: int,
    resolution: int = 256,
    workers: tuple[int, ...] = (1, 2, 4),
    repeats: int = 5,
) -> list[dict]:
    """Samples/s of the DataModule's train loader (one pass, no flips or random crops) against
    bare decode-resize-crop loops over the same files, per worker count. The loaders run
    ``repeats`` times, interleaved; the rates are the best pass of each, and the ratio is the
    median over the repeats of the loader's rate over the bare loop's in the same repeat (with
    the lowest and highest), so a load spike on a shared machine moves one pair, not the
    result."""
    pairs = write_pairs(root, images)
    results = []
    for n in workers:
        dm = FolderEditDataModule(
            root=str(root),
            resolution=resolution,
            batch_size=32,
            num_workers=n,
            val_fraction=0.0,
            test_fraction=0.0,
            random_flip=0.0,
            random_crop=False,
        )
        dm.setup("fit")
        loaders = {
            "editbench": DataLoader(
                dm.datasets["train"], batch_size=32, num_workers=n, collate_fn=dm.collate_fn
            ),
            "bare_torchvision": DataLoader(
                BareDecodeResize(pairs, resolution, "torchvision"), batch_size=32, num_workers=n
            ),
            "bare_pil": DataLoader(
                BareDecodeResize(pairs, resolution, "pil"), batch_size=32, num_workers=n
            ),
        }
        rates = {name: [] for name in loaders}
        for _ in range(repeats):
            for name, loader in loaders.items():
                start = time.perf_counter()
                count = sum(
                    len(b["id"]) if isinstance(b, dict) else len(b[0]) for b in loader
                )
                rates[name].append(count / (time.perf_counter() - start))
        best = {k: max(v) for k, v in rates.items()}
        paired = sorted(
            a / b for a, b in zip(rates["editbench"], rates["bare_torchvision"], strict=True)
        )
        results.append(
            {
                "images": images,
                "resolution": resolution,
                "workers": n,
                **{f"{k}_samples_per_s": round(v, 1) for k, v in best.items()},
                "ratio_vs_torchvision": round(float(np.median(paired)), 3),
                "ratio_range": [round(paired[0], 3), round(paired[-1], 3)],
                "repeats": repeats,
                "pil_vs_torchvision": round(best["bare_pil"] / best["bare_torchvision"], 3),
            }
        )
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=313010)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--loader-only", action="store_true", help="only the loader throughput")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result = {"loader": throughput(tmp / "pairs", args.images)}
        if not args.loader_only:
            result["ipr2pr_index"] = [
                ipr2pr_index(tmp / f"ipr2pr{n}", n) for n in (10_000, args.prompts)
            ]
            result["manifest_memory"] = [
                manifest_memory(tmp / "manifest", n) for n in (10_000, 300_000)
            ]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
