"""``python -m editbench data inspect|verify -c CONFIG``: look at a configured dataset before
training on it.

``inspect`` prints per-split counts and the fields the samples carry and writes a PNG grid of a
few samples with their instructions. ``verify`` decodes every sample of every split (with a
progress bar), and reports the counts against the published ones, missing and undecodable files
(each with its split, row and id), duplicate ids and empty instructions; it can write a sha256
manifest of the files, and exits non-zero when anything is wrong.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from datamodules.base import SPLITS, BadSampleError, EditDataModule

PATH_KEYS = ("source", "target", "mask")


def load_datamodule(config: str, overrides: list[str]) -> EditDataModule:
    """The DataModule a fit config describes (the model is not built)."""
    from editbench.cli import EditbenchCLI

    class DataOnly(EditbenchCLI):
        def instantiate_classes(self) -> None:  # no trainer: the config may ask for GPUs
            self.config_init = self.parser.instantiate_classes(self.config)
            self.datamodule = self._get(self.config_init, "data")

    return DataOnly(args=["-c", config, *overrides], run=False).datamodule


def split_records(dm: EditDataModule) -> dict[str, list[dict]]:
    """Records of every split the dataset has (a split whose files are absent is reported)."""
    dm.prepare_data()
    out = {}
    for split in SPLITS:
        try:
            out[split] = dm.make_dataset(split).records
        except (FileNotFoundError, ValueError) as err:
            out[split] = err
    return out


def inspect(dm: EditDataModule, output: Path, per_split: int = 4) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = split_records(dm)
    summary, rows = {}, []
    for split, recs in records.items():
        if isinstance(recs, Exception):
            summary[split] = {"error": str(recs)}
            continue
        dataset = dm.make_dataset(split)
        first = dataset[0] if len(dataset) else {}
        summary[split] = {
            "count": len(dataset),
            "fields": sorted(k for k in first if not k.startswith("_"))
            if isinstance(first, dict)
            else [],
        }
        rows += [(split, dataset[i]) for i in range(min(per_split, len(dataset)))]
    if rows:
        fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.6 * len(rows)), squeeze=False)
        for (split, sample), ax_row in zip(rows, axes, strict=True):
            for ax, key in zip(ax_row, ("source", "target", "mask"), strict=True):
                ax.axis("off")
                if key in sample:
                    image = sample[key]
                    image = image.expand(3, -1, -1) if key == "mask" else (image + 1) / 2
                    ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
                    ax.set_title(f"{split} {key}", fontsize=7)
            ax_row[1].set_title(f"{sample['id']}: {sample['instruction'][:70]}", fontsize=7)
        fig.tight_layout()
        output.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(output, dpi=100)
        plt.close(fig)
        summary["grid"] = str(output)
    return summary


class _Checked(Dataset):
    """Decodes one sample and returns what verify needs, never raising for a bad file."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        record = self.dataset.records[index]
        problem = None
        try:
            sample = self.dataset[index]
            if not isinstance(sample, dict):  # a skipped sample
                problem = sample.reason
        except (BadSampleError, OSError, ValueError) as err:
            problem = str(err)
        return {
            "row": index,
            "id": str(record.get("id")),
            "instruction": str(record.get("instruction") or ""),
            "problem": problem,
        }


def verify(dm: EditDataModule, checksums: Path | None = None, num_workers: int = 0) -> dict:
    from tqdm.auto import tqdm

    report: dict = {"splits": {}, "problems": []}
    published = getattr(dm, "published_counts", None) or {}
    digests = {}
    for split, recs in split_records(dm).items():
        if isinstance(recs, Exception):
            report["splits"][split] = {"error": str(recs)}
            continue
        dataset = dm.make_dataset(split)
        loader = DataLoader(_Checked(dataset), batch_size=None, num_workers=num_workers)
        ids, empty = Counter(), []
        for item in tqdm(loader, desc=f"verify {split}", total=len(dataset)):
            ids[item["id"]] += 1
            if item["problem"]:
                report["problems"].append(
                    {
                        "split": split,
                        "row": item["row"],
                        "id": item["id"],
                        "problem": item["problem"],
                    }
                )
            if not item["instruction"].strip():
                empty.append(item["id"])
        duplicates = sorted(i for i, n in ids.items() if n > 1)
        for i in duplicates:
            report["problems"].append(
                {"split": split, "id": i, "problem": f"duplicate id ({ids[i]} samples)"}
            )
        for i in empty:
            report["problems"].append({"split": split, "id": i, "problem": "empty instruction"})
        entry = {"count": len(dataset)}
        if split in published:
            entry["published"] = published[split]
            if published[split] != len(dataset) and dm.max_samples is None:
                report["problems"].append(
                    {
                        "split": split,
                        "problem": f"{len(dataset)} samples, published {published[split]}",
                    }
                )
        report["splits"][split] = entry
        if checksums is not None:
            for record in dataset.records:
                for key in PATH_KEYS:
                    path = record.get(key)
                    if isinstance(path, str) and path not in digests and Path(path).is_file():
                        digests[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if checksums is not None:
        checksums.parent.mkdir(parents=True, exist_ok=True)
        checksums.write_text("".join(f"{h}  {p}\n" for p, h in sorted(digests.items())))
        report["checksums"] = str(checksums)
    report["ok"] = not report["problems"]
    return report


def main(args) -> int:
    dm = load_datamodule(args.config, args.overrides)
    if args.command == "inspect":
        print(json.dumps(inspect(dm, Path(args.output), args.per_split), indent=2))
        return 0
    report = verify(dm, Path(args.checksums) if args.checksums else None, args.num_workers)
    for problem in report["problems"][:50]:
        print(json.dumps(problem))
    if len(report["problems"]) > 50:
        print(f"... and {len(report['problems']) - 50} more problems")
    print(
        json.dumps(
            {k: v for k, v in report.items() if k != "problems"}
            | {"num_problems": len(report["problems"])},
            indent=2,
        )
    )
    return 0 if report["ok"] else 1
