"""``python -m editbench data inspect|verify -c CONFIG``: look at a configured dataset before
training on it.

``inspect`` prints per-split counts and the fields the samples carry and writes a PNG grid of a
few samples with their instructions. ``verify`` decodes every sample of every split (with a
progress bar), and reports the counts against the published ones, a split that cannot be
loaded (its error), missing and undecodable files (each with its split, row and id), duplicate
ids and empty instructions (read from the decoded sample, so IPr2Pr's `prompt.json` is read);
it can write a sha256 manifest of the files, and exits non-zero when anything is wrong.

Pair quality: for every sample with a mask, ``verify`` measures how much the pair changes
OUTSIDE the mask, the mean |target - source| over the pixels where the mask is 0, on [0, 1]
images at the source's native size (the target resized to it where sizes differ, as the
loaders do), averaged over channels. A well-aligned local edit scores near 0 (JPEG noise); a
large value flags a misregistered pair, a mask that misses the edit or a global change
labelled local. Per split, over distinct (source, target, mask) pairs (GIER gives one sample
per summary of a pair): the count, the mean and the worst pairs, each named by its first
sample's id (``--pair_quality FILE`` writes every sample's value as JSONL). Samples whose mask
covers the whole image have no outside and are not counted. No reference evaluator reports
this figure.

Several ``-c`` files layer in order, as in every other subcommand.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

from torch.utils.data import ConcatDataset, DataLoader, Dataset

from datamodules.base import SPLITS, BadSampleError, EditDataModule

PATH_KEYS = ("source", "target", "mask")
#: Worst pair-quality ids listed per split.
NUM_WORST = 5


def load_datamodule(configs: str | list[str], overrides: list[str]) -> EditDataModule:
    """The DataModule the fit config(s) describe, layered in order (the model is not built)."""
    from editbench.cli import EditbenchCLI

    class DataOnly(EditbenchCLI):
        def instantiate_classes(self) -> None:  # no trainer: the config may ask for GPUs
            self.config_init = self.parser.instantiate_classes(self.config)
            self.datamodule = self._get(self.config_init, "data")

    configs = [configs] if isinstance(configs, str) else list(configs)
    args = [arg for config in configs for arg in ("-c", config)]
    return DataOnly(args=[*args, *overrides], run=False).datamodule


def dataset_records(dataset) -> list[dict]:
    """The records of a split's dataset (a ConcatDataset's parts, in order)."""
    if isinstance(dataset, ConcatDataset):
        return [r for part in dataset.datasets for r in dataset_records(part)]
    return list(dataset.records)


def with_native(dataset) -> None:
    """Make a split's dataset (or every part of a ConcatDataset) add the native images."""
    if isinstance(dataset, ConcatDataset):
        for part in dataset.datasets:
            with_native(part)
    else:
        dataset.native = True


def split_records(
    dm: EditDataModule, splits: tuple[str, ...] = SPLITS
) -> dict[str, list[dict] | Exception]:
    """Records of each split, or the error that loading it raised."""
    return {
        split: value if isinstance(value, Exception) else dataset_records(value)
        for split, value in split_datasets(dm, splits).items()
    }


def split_datasets(dm: EditDataModule, splits: tuple[str, ...] = SPLITS) -> dict[str, Any]:
    """Each split's dataset (`make_dataset`), or the error that loading it raised."""
    dm.prepare_data()
    out: dict[str, Any] = {}
    for split in splits:
        try:
            out[split] = dm.make_dataset(split)
        except (FileNotFoundError, ValueError, KeyError, TypeError, OSError) as err:
            out[split] = err
    return out


def outside_mask_change(sample: dict) -> float | None:
    """Mean |target - source| on [0, 1] where the native mask is 0 (None without a mask, a
    target, or any pixel outside the mask); see the module docstring."""
    source, target = sample.get("source_native"), sample.get("target_native")
    mask = sample.get("mask_native")
    if source is None or target is None or mask is None:
        return None
    outside = mask[0] == 0
    if not bool(outside.any()):
        return None
    diff = (target.float() - source.float()).abs().mean(dim=0) / 255.0
    return float(diff[outside].mean())


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

    def __len__(self) -> int:
        return len(self.dataset)

    def __init__(self, dataset, records: list[dict]) -> None:
        self.dataset = dataset
        self.records = records

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        problem, instruction, outside = None, record.get("instruction"), None
        try:
            sample = self.dataset[index]
            if not isinstance(sample, dict):  # a skipped sample
                problem = sample.reason
            else:
                instruction = sample.get("instruction")
                outside = outside_mask_change(sample)
        except (BadSampleError, OSError, ValueError, KeyError, TypeError) as err:
            problem = str(err)
        pair = [record.get(k) for k in ("source", "target", "mask", "mask_ids", "mask_global")]
        return {
            "row": index,
            "id": str(record.get("id")),
            "pair": json.dumps(pair, default=str),
            "instruction": str(instruction or ""),
            "problem": problem,
            "outside_mask_change": outside,
        }


def verify(
    dm: EditDataModule,
    checksums: Path | None = None,
    num_workers: int = 0,
    splits: tuple[str, ...] = SPLITS,
    pair_quality: Path | None = None,
) -> dict:
    from tqdm.auto import tqdm

    report: dict = {"splits": {}, "problems": []}
    published = getattr(dm, "published_counts", None) or {}
    digests = {}
    quality_lines: list[str] = []
    for split, dataset in split_datasets(dm, splits).items():
        if isinstance(dataset, Exception):
            message = f"cannot load the split: {type(dataset).__name__}: {dataset}"
            report["splits"][split] = {"error": message}
            report["problems"].append({"split": split, "problem": message})
            continue
        recs = dataset_records(dataset)
        with_native(dataset)
        loader = DataLoader(_Checked(dataset, recs), batch_size=None, num_workers=num_workers)
        ids, empty, outside, by_pair = Counter(), [], {}, {}
        for item in tqdm(loader, desc=f"verify {split}", total=len(dataset)):
            ids[item["id"]] += 1
            if item["outside_mask_change"] is not None:
                outside[item["id"]] = float(item["outside_mask_change"])
                by_pair.setdefault(item["pair"], (item["id"], outside[item["id"]]))
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
        entry: dict = {"count": len(dataset)}
        if by_pair:
            values = [v for _, v in by_pair.values()]
            worst = sorted(by_pair.values(), key=lambda iv: -iv[1])[:NUM_WORST]
            entry["outside_mask_change"] = {
                "pairs": len(values),
                "mean": sum(values) / len(values),
                "worst": [{"id": i, "value": v} for i, v in worst],
            }
            quality_lines += [
                json.dumps({"split": split, "id": i, "outside_mask_change": v})
                for i, v in outside.items()
            ]
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
            for record in recs:
                for key in PATH_KEYS:
                    path = record.get(key)
                    if isinstance(path, str) and path not in digests and Path(path).is_file():
                        digests[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if checksums is not None:
        checksums.parent.mkdir(parents=True, exist_ok=True)
        checksums.write_text("".join(f"{h}  {p}\n" for p, h in sorted(digests.items())))
        report["checksums"] = str(checksums)
    if pair_quality is not None:
        pair_quality.parent.mkdir(parents=True, exist_ok=True)
        pair_quality.write_text("".join(line + "\n" for line in quality_lines))
        report["pair_quality"] = str(pair_quality)
    report["ok"] = not report["problems"]
    return report


def main(args) -> int:
    dm = load_datamodule(args.config, args.overrides)
    if args.command == "inspect":
        print(json.dumps(inspect(dm, Path(args.output), args.per_split), indent=2))
        return 0
    report = verify(
        dm,
        Path(args.checksums) if args.checksums else None,
        args.num_workers,
        tuple(args.splits),
        Path(args.pair_quality) if args.pair_quality else None,
    )
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
