"""Data-side scale and speed: IPr2Pr indexing at the real release's size, record memory of a
growing manifest, and loader throughput against a bare decode-and-resize loop.

    python benchmarks/data_bench.py [--prompts 313010] [--images 512]
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
    """The reference: decode source and target, resize the shorter side, center crop."""

    def __init__(self, pairs, resolution):
        self.pairs, self.resolution = pairs, resolution

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        out = []
        for path in self.pairs[i]:
            with Image.open(path) as image:
                x = F.pil_to_tensor(image.convert("RGB"))
            x = F.center_crop(F.resize(x, self.resolution, antialias=True), self.resolution)
            out.append(x.float() / 127.5 - 1)
        return out


def throughput(
    root: Path, images: int, resolution: int = 256, workers: int = 2, repeats: int = 2
) -> dict:
    rng = np.random.default_rng(0)
    (root / "in").mkdir(parents=True)
    (root / "out").mkdir()
    lines, pairs = [], []
    for i in range(images):
        for side in ("in", "out"):
            Image.fromarray((rng.random((320, 384, 3)) * 255).astype("uint8")).save(
                root / side / f"{i}.jpg", quality=90
            )
        lines.append(
            json.dumps({"source": f"in/{i}.jpg", "target": f"out/{i}.jpg", "instruction": "x"})
        )
        pairs.append((root / "in" / f"{i}.jpg", root / "out" / f"{i}.jpg"))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    dm = FolderEditDataModule(
        root=str(root),
        resolution=resolution,
        batch_size=32,
        num_workers=workers,
        val_fraction=0.0,
        test_fraction=0.0,
        random_flip=0.0,
        random_crop=False,
    )
    dm.setup("fit")
    ours = DataLoader(
        dm.datasets["train"], batch_size=32, num_workers=workers, collate_fn=dm.collate_fn
    )
    bare = DataLoader(BareDecodeResize(pairs, resolution), batch_size=32, num_workers=workers)
    rates = {"editbench": [], "bare": []}
    for _ in range(repeats):
        for name, loader in (("editbench", ours), ("bare", bare)):
            start = time.perf_counter()
            n = sum(
                len(batch["id"]) if isinstance(batch, dict) else len(batch[0]) for batch in loader
            )
            rates[name].append(n / (time.perf_counter() - start))
    best = {k: max(v) for k, v in rates.items()}
    return {
        "images": images,
        "resolution": resolution,
        "workers": workers,
        "editbench_samples_per_s": round(best["editbench"], 1),
        "bare_samples_per_s": round(best["bare"], 1),
        "ratio": round(best["editbench"] / best["bare"], 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=313010)
    parser.add_argument("--images", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result = {
            "ipr2pr_index": [ipr2pr_index(tmp / f"ipr2pr{n}", n) for n in (10_000, args.prompts)],
            "manifest_memory": [manifest_memory(tmp / "manifest", n) for n in (10_000, 300_000)],
            "loader": throughput(tmp / "pairs", args.images),
        }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
