"""EditDataModule: the splits, paired transforms, collate and bad-sample policy every dataset shares.

A dataset subclass only says where its records come from (`build_records(split)`); this module
turns records into the sample dicts of the data contract (see DESIGN.md):
`id`, `source`, `target`, `instruction`, and `expressive`, `mask`, `source_caption`,
`goal_caption`, `session`, `turn`, `num_turns` where known. Evaluation samples (every split
but train) also carry the decoded images at their native size, `source_native`,
`target_native` (uint8 [3,H,W]) and `mask_native` (uint8 {0,1} [1,H,W]), which `collate` keeps
as lists; how a non-square image becomes the model's square input in evaluation is the
DataModule's `eval_resize` (see `datamodules.native`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import tv_tensors
from torchvision.transforms import v2

from datamodules.decode import decode
from datamodules.native import (
    EvalResize,
    align_to_source,
    as_native,
    check_eval_resize,
    eval_transform,
    model_box,
    native_box,
)
from datamodules.sampling import (
    EvalDistributedSampler,
    ResumableDataLoader,
    SeededSamples,
    process_layout,
    train_sampler,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
REQUIRED_KEYS = ("id", "source", "instruction")
PATH_KEYS = ("source", "target", "mask")
#: Per-sample strings carried into the batch; ``category`` is a benchmark's edit type or task
#: (ImgEdit's ``edit_type``, GEdit's ``task_type``, Emu Edit's ``task``), kept in a result
#: bundle's ``inputs.jsonl`` for the judge.
TEXT_KEYS = (
    "expressive",
    "source_caption",
    "goal_caption",
    "session",
    "previous_output_id",
    "category",
)
INT_KEYS = ("turn", "num_turns")
#: Keys ending in this hold native-size images (lists in a batch).
NATIVE_SUFFIX = "_native"


class BadSampleError(ValueError):
    """A sample whose image file is missing or cannot be decoded."""


@dataclass(frozen=True)
class SkippedSample:
    """Returned by `EditDataset` in place of a bad sample when `on_bad_sample="skip"`."""

    id: str
    reason: str


def required_keys(split: str) -> tuple[str, ...]:
    """Keys a manifest record must have in `split` (training also needs a `target`)."""
    return REQUIRED_KEYS + ("target",) if split == "train" else REQUIRED_KEYS


def read_jsonl_manifest(
    path: Path, root: Path, required: Sequence[str] = REQUIRED_KEYS
) -> list[dict]:
    """Read one JSON record per line; resolve `source`/`target`/`mask` against `root`.

    Blank lines are ignored. Raises FileNotFoundError naming `path` when it is missing, and
    ValueError naming the file, the line number and the problem (invalid JSON, not an object,
    a missing required key).
    """
    path, root = Path(path), Path(root)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    records = []
    for lineno, record in iter_jsonl(path):
        for key in required:
            if key not in record:
                raise ValueError(f"{path}, line {lineno}: missing required key {key!r}")
        for key in PATH_KEYS:
            if record.get(key) is not None:
                record[key] = str(root / record[key])  # an absolute path stays as it is
        records.append(record)
    return records


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) per non-blank line; ValueError naming the file and line for
    invalid JSON or a line that is not an object."""
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({err})") from err
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {lineno}: expected a JSON object")
            yield lineno, record


def read_json_list(path: Path, what: str = "split file") -> list:
    """Load a JSON file that must hold a list; FileNotFoundError/ValueError naming `path`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list, got {type(data).__name__}")
    return data


def read_expressive(path: Path) -> dict[str, str | dict[str, str]]:
    """`{id: expressive}` from a JSONL file of `{"id", "expressive"}` objects; errors name the
    file and line.

    A line may also carry `seed` (IPr2Pr's original layout, where an id is a prompt folder
    holding one image pair per seed and `data expressive` writes one instruction per pair, as
    the MGIE release's `process_data.ipynb` does per `<prompt>_<seed>`): such ids map to
    `{str(seed): expressive}`. An id written both with and without a seed is an error.
    """
    table: dict[str, str | dict[str, str]] = {}
    for lineno, record in enumerate(
        read_jsonl_manifest(path, path.parent, required=("id", "expressive")), start=1
    ):
        key, text = str(record["id"]), str(record["expressive"])
        seed = record.get("seed")
        previous = table.get(key)
        if previous is not None and (seed is None) != isinstance(previous, str):
            raise ValueError(
                f"{path}, line {lineno}: id {key!r} is written both with and without a 'seed'"
            )
        if seed is None:
            table[key] = text
        else:
            table.setdefault(key, {})[str(seed)] = text  # type: ignore[index]
    return table


def build_transform(
    resolution: int,
    train: bool,
    random_crop: bool,
    random_flip: float,
    eval_resize: EvalResize = "resize",
):
    """The square model input; one call transforms source, target and mask together.

    Training: resize the shorter side, crop a square (random or centre), maybe flip.
    Evaluation: `eval_resize` (see `datamodules.native`): "resize" squashes the whole image,
    "pad" letterboxes it, "center_crop" resizes the shorter side and crops the centre.
    Source, target (`tv_tensors.Image`) and mask (`tv_tensors.Mask`, resized with nearest
    interpolation) passed together receive the same crop and flip.
    """
    if not train:
        return eval_transform(resolution, eval_resize)
    crop = v2.RandomCrop(resolution) if random_crop else v2.CenterCrop(resolution)
    steps = [v2.Resize(resolution, antialias=True), crop]
    if train and random_flip > 0:
        steps.append(v2.RandomHorizontalFlip(p=random_flip))
    return v2.Compose(steps)


def _to_unit_range(image: torch.Tensor) -> torch.Tensor:
    """uint8 [3,H,W] → float32 in [-1, 1] (a plain tensor)."""
    return image.as_subclass(torch.Tensor).float() / 127.5 - 1.0


class EditDataset(Dataset):
    """Records → contract sample dicts, with paired transforms and the bad-sample policy.

    Args:
        records: dicts with `id`, `source` path, `instruction`, optional `target`/`mask`
            paths and text/int fields.
        transform: a torchvision v2 transform applied to (source, target, mask) together.
        split: split name, used in error messages. Samples of every split but "train" also
            carry the decoded images before the transform: `source_native`, `target_native`
            (uint8 [3,H,W]) and `mask_native` (uint8 {0,1} [1,H,W]) where those exist.
        on_bad_sample: "error" raises BadSampleError; "skip" returns a SkippedSample.

    A target or mask of another size than the source is resized to the source's size before
    anything else (`datamodules.native.align_to_source`: bilinear as T2ONet's loader, masks
    nearest), so `target_native` is the resized target.
    """

    def __init__(
        self,
        records: list[dict],
        transform,
        split: str,
        on_bad_sample: Literal["error", "skip"] = "error",
    ) -> None:
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        self.records = records
        self.transform = transform
        self.split = split
        self.on_bad_sample = on_bad_sample
        #: Add the `*_native` images (evaluation splits).
        self.native = split != "train"
        #: (resolution, eval_resize) when the model input is not the whole image squashed
        #: ("pad", "center_crop"): samples then say where their content sits (`model_box`) and
        #: which native region the model saw (`native_box`), for scoring on the native frame.
        self.boxes: tuple[int, EvalResize] | None = None

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, index: int, key: str, mode: str) -> torch.Tensor:
        """Decode `record[key]` as a uint8 [C,H,W] tensor, or raise BadSampleError."""
        record = self.records[index]
        path = record[key]
        try:
            return decode(path, mode)
        except (OSError, ValueError, SyntaxError) as err:  # missing, truncated, undecodable
            raise BadSampleError(
                f"cannot read {key} image {path} (split {self.split!r}, row {index}, "
                f"id {record.get('id')!r}): {type(err).__name__}: {err}"
            ) from err

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:
        record = self.records[index]
        try:
            images = {"source": tv_tensors.Image(self._load(index, "source", "RGB"))}
            if record.get("target") is not None:
                images["target"] = tv_tensors.Image(self._load(index, "target", "RGB"))
            if record.get("mask") is not None:
                images["mask"] = tv_tensors.Mask(self._load(index, "mask", "L"))
        except BadSampleError as err:
            if self.on_bad_sample == "skip":
                return SkippedSample(str(record.get("id")), str(err))
            raise
        images = align_to_source(images)
        natives = (
            {f"{k}_native": as_native(v, binary=k == "mask") for k, v in images.items()}
            if self.native
            else {}
        )
        images = self.transform(images)
        sample: dict[str, Any] = {
            "id": str(record["id"]),
            "source": _to_unit_range(images["source"]),
        }
        if "target" in images:
            sample["target"] = _to_unit_range(images["target"])
        sample["instruction"] = str(record["instruction"])
        if "mask" in images:
            sample["mask"] = (images["mask"].as_subclass(torch.Tensor) >= 128).float()
        for key in TEXT_KEYS:
            if record.get(key) is not None:
                sample[key] = str(record[key])
        for key in INT_KEYS:
            if record.get(key) is not None:
                sample[key] = int(record[key])
        sample.update(natives)
        if self.boxes is not None and natives:
            resolution, mode = self.boxes
            height, width = natives["source_native"].shape[-2:]
            sample["model_box"] = model_box(height, width, resolution, mode)
            sample["native_box"] = native_box(height, width, resolution, mode)
        return sample


def collate(samples: Iterable[dict[str, Any] | SkippedSample]) -> dict[str, Any]:
    """Stack tensors, keep strings/ints as lists; drop skipped samples into `skipped_ids`.

    `*_native` images (sizes differ) stay lists of tensors. A key that only some samples have
    becomes a list with None for the others (other tensors must be in every sample). If every
    sample was skipped the batch has `id == []` and no tensors.
    """
    samples = list(samples)
    kept = [s for s in samples if not isinstance(s, SkippedSample)]
    batch: dict[str, Any] = {}
    for key in dict.fromkeys(k for s in kept for k in s):
        values = [s.get(key) for s in kept]
        if key.endswith(NATIVE_SUFFIX):
            batch[key] = values
        elif any(isinstance(v, torch.Tensor) for v in values):
            if any(v is None for v in values):
                missing = [s["id"] for s in kept if key not in s]
                raise ValueError(f"tensor {key!r} missing in samples {missing}")
            # default_collate stacks straight into shared memory inside a worker, saving a
            # copy of every batch on its way to the main process (about 10% of loader speed).
            batch[key] = default_collate(values)
        else:
            batch[key] = values
    batch.setdefault("id", [])
    batch["skipped_ids"] = [s.id for s in samples if isinstance(s, SkippedSample)]
    return batch


class EditDataModule(L.LightningDataModule):
    """Base DataModule: subclasses implement `build_records(split)` and set `protocol`.

    Args:
        root: dataset folder.
        resolution: side of the square crops fed to the model.
        batch_size: training batch size.
        eval_batch_size: batch size for val/test/predict (defaults to `batch_size`).
        num_workers: DataLoader worker processes (workers persist across epochs when > 0).
        random_flip: horizontal flip probability for training (0 disables it).
        random_crop: random (True) or center (False) training crop after the resize.
        max_samples: keep only the first N records of each split (None keeps all).
        on_bad_sample: "error" raises BadSampleError on a missing or undecodable image;
            "skip" drops the sample, lists its id in the batch's `skipped_ids` and counts it
            in `num_skipped`.
        predict_split: the split `predict` runs on.
        expressive_path: a JSONL file of `{"id": ..., "expressive": ...}` lines (as
            `python -m editbench data expressive` writes) that fills each sample's `expressive`
            instruction by id; a sample whose id is absent is an error naming it, unless
            `on_missing_expressive="keep"` (the sample keeps what its dataset gave it).
        on_missing_expressive: "error" or "keep", for ids absent from `expressive_path`.
        eval_resize: how a val/test/predict image becomes the square model input:
            "resize" (default) squashes the whole image to resolution x resolution, so the
            whole image is edited and scored; "pad" letterboxes it (aspect kept, black
            borders); "center_crop" resizes the shorter side and crops the centre (training's
            geometry without the randomness; only the crop is scored). Evaluation samples also
            carry the images at their native size (`source_native`, `target_native`,
            `mask_native`), against which predictions are scored after
            `datamodules.native.prediction_to_native`. Training keeps its (random) crop.
    """

    protocol: str = "generic"
    #: How samples become a batch (a subclass may swap it, as ConcatEditDataModule does).
    collate_fn = staticmethod(collate)
    #: Samples per split in the dataset's public release, checked by `data verify` (None: unknown).
    published_counts: dict[str, int] | None = None
    #: The Dataset class over records (a subclass may decode masks or read parquet rows).
    dataset_class: type[EditDataset] = EditDataset

    def __init__(
        self,
        root: str,
        resolution: int = 256,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        random_flip: float = 0.5,
        random_crop: bool = True,
        max_samples: int | None = None,
        on_bad_sample: Literal["error", "skip"] = "error",
        predict_split: str = "test",
        expressive_path: str | None = None,
        on_missing_expressive: Literal["error", "keep"] = "error",
        eval_resize: EvalResize = "resize",
    ) -> None:
        super().__init__()
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        self.eval_resize = check_eval_resize(eval_resize)
        self.save_hyperparameters()
        self.root = root
        self.resolution = resolution
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.random_flip = random_flip
        self.random_crop = random_crop
        self.max_samples = max_samples
        self.on_bad_sample = on_bad_sample
        self.predict_split = predict_split
        self.expressive_path = expressive_path
        self.on_missing_expressive = on_missing_expressive
        self._expressive: dict[str, str] | None = None
        self.datasets: dict[str, EditDataset] = {}
        self.num_skipped = 0
        self.skipped_ids: list[str] = []

    def build_records(self, split: str) -> list[dict]:
        """Records of `split` (`id`, `source`, `instruction`, optional paths and texts)."""
        raise NotImplementedError

    def splits_for(self, stage: str | None) -> tuple[str, ...]:
        """Splits the Lightning `stage` needs (all of train/val/test for None)."""
        return {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": (self.predict_split,),
        }.get(stage, SPLITS)

    def dataset_kwargs(self, split: str) -> dict[str, Any]:
        """Extra constructor arguments of `dataset_class` for `split` (none by default)."""
        return {}

    def make_dataset(self, split: str) -> EditDataset:
        """A `dataset_class` over the (capped) records of `split`, with expressive
        instructions attached and the split's transform."""
        records = self.build_records(split)
        if self.max_samples is not None:
            records = records[: self.max_samples]
        if self.expressive_path is not None:
            records = self.attach_expressive(records, split)
        train = split == "train"
        transform = build_transform(
            self.resolution, train, self.random_crop, self.random_flip, self.eval_resize
        )
        dataset = self.dataset_class(
            records, transform, split, self.on_bad_sample, **self.dataset_kwargs(split)
        )
        if not train and self.eval_resize != "resize":
            dataset.boxes = (self.resolution, self.eval_resize)
        return dataset

    def attach_expressive(self, records: list[dict], split: str) -> list[dict]:
        """Fill `expressive` of each record from `expressive_path`, by sample id.

        Per-seed entries (see :func:`read_expressive`) go to records that draw one of several
        image pairs (`seeds`, IPr2Pr's original layout): the record keeps only the seeds that
        have an instruction, in their order, and carries `expressive_by_seed`, so the dataset
        draws only pairs with an instruction and returns the one of the pair it drew. A record
        none of whose seeds is in the file counts as missing.
        """
        if self._expressive is None:
            self._expressive = read_expressive(Path(self.expressive_path))
        table = self._expressive
        out, missing = [], []
        for r in records:
            entry = table.get(str(r["id"]))
            if entry is None:
                missing.append(r["id"])
                out.append(r)
            elif isinstance(entry, str):
                out.append({**r, "expressive": entry})
            elif "seeds" not in r:
                raise ValueError(
                    f"{self.expressive_path}: id {r['id']!r} has per-seed expressive "
                    f"instructions but the {split!r} records of {type(self).__name__} have no "
                    "seeds (only IPr2Pr's original layout does)"
                )
            else:
                kept = [s for s in r["seeds"] if str(s) in entry]
                if not kept:
                    missing.append(r["id"])
                    out.append(r)
                else:
                    out.append({**r, "seeds": kept, "expressive_by_seed": entry})
        if missing and self.on_missing_expressive == "error":
            shown = ", ".join(map(str, missing[:5]))
            raise ValueError(
                f"{self.expressive_path} has no expressive instruction for {len(missing)} of the "
                f"{len(records)} {split!r} samples (e.g. {shown}); write them with "
                f"`python -m editbench data expressive` or set on_missing_expressive: keep"
            )
        return out

    def setup(self, stage: str | None = None) -> None:
        for split in self.splits_for(stage):
            if split not in self.datasets:
                self.datasets[split] = self.make_dataset(split)

    def eval_groups(self, split: str) -> list | None:
        """Group keys of `split`'s samples that must stay on one process in a multi-process
        evaluation (None: no constraint). MagicBrush's iterative mode keeps a session whole."""
        return None

    def _loader(self, split: str, train: bool) -> DataLoader:
        """The split's loader. Training: a `datamodules.sampling.ResumableDataLoader` over a
        `TrainSampler` (torch's shuffling `DistributedSampler`, one process too, with per-sample
        augmentation seeds), which a checkpoint written mid-epoch resumes exactly. Under several
        processes evaluation gives every sample to exactly one process, unpadded
        (`datamodules.sampling.EvalDistributedSampler`), so each sample is scored and written
        once."""
        if split not in self.datasets:
            self.datasets[split] = self.make_dataset(split)
        dataset = self.datasets[split]
        world_size, rank = process_layout(self.trainer)
        if train:
            return ResumableDataLoader(
                SeededSamples(dataset),
                sampler=train_sampler(dataset, world_size, rank),
                batch_size=self.batch_size,
                drop_last=True,
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
                collate_fn=self.collate_fn,
            )
        sampler = None
        if world_size > 1:
            sampler = EvalDistributedSampler(dataset, world_size, rank, self.eval_groups(split))
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size or self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate_fn,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_split, train=False)

    def count_skipped(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Add the batch's `skipped_ids` to `num_skipped` / `skipped_ids` and log them."""
        ids = batch.get("skipped_ids") or []
        if ids:
            self.num_skipped += len(ids)
            self.skipped_ids.extend(ids)
            log.warning("skipped %d bad sample(s): %s", len(ids), ", ".join(ids))
        return batch

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count skipped samples in the main process (collate runs in the workers)."""
        if isinstance(batch, dict):
            self.count_skipped(batch)
        return batch
