"""The user's own editing pairs, listed in a JSONL or CSV manifest under `root`.

Manifest rows: `source`, `target`, `instruction` (required), `mask`, `expressive`,
`source_caption`, `goal_caption`, `id` (optional); other columns are ignored. Image paths are
relative to `root` (an absolute path stays as it is). `.csv` files (by extension) are read with
the `csv` module (header row = column names; an empty cell counts as absent); anything else is
read as JSONL (one object per line, blank lines ignored).

Ids: a row without `id` gets `<source as written>#<line>`, the row's line number in its
manifest (CSV: the header is line 1, so the first row is line 2). It is stable as long as the
row stays on the same line; give an explicit `id` column for ids that survive editing the file.
Ids must be unique within a manifest (duplicates raise a ValueError listing them).

Splits, either:

* per-split manifests (`train_manifest`, `val_manifest`, `test_manifest`): when any of them is
  set, each split reads only its own file, and asking for a split without one is a ValueError;
* or a seeded split of the one `manifest`: every record is ranked by
  `sha256(f"{split_seed}:{id}")`; the first `round(test_fraction * N)` are "test", the next
  `round(val_fraction * N)` "val", the rest "train" (rounding half up). The splits are disjoint,
  cover the manifest, depend only on the ids, `split_seed` and the fractions (not on the row
  order), and keep manifest order inside each split.

Bad input: a missing manifest raises FileNotFoundError naming it; a bad row (CSV header without
a required column, invalid JSON, a missing/empty required key, a non-string value) raises
ValueError naming the file, the line and the key. `mask` must be on every row or on none (the
collate stacks masks per batch): a manifest with some masks raises ValueError listing the
lines without one. Image files are not checked up front: a
missing or undecodable image follows `on_bad_sample` when it is read.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from pathlib import Path

from .base import EditDataModule, iter_jsonl

REQUIRED = ("source", "target", "instruction")
OPTIONAL = ("mask", "expressive", "source_caption", "goal_caption", "id")
PATHS = ("source", "target", "mask")


def _rows_csv(path: Path):
    """(line number, dict without empty cells) per data row; checks the header first."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        for key in REQUIRED:
            if key not in header:
                raise ValueError(f"{path}, line 1: header lacks required column {key!r}")
        start = 2
        for row in reader:
            yield start, {k: v for k, v in row.items() if k is not None and v not in (None, "")}
            start = reader.line_num + 1


def read_manifest(path: str | Path, root: str | Path) -> list[dict]:
    """Records of a JSONL or CSV manifest (see module docstring), paths resolved on `root`."""
    path, root = Path(path), Path(root)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    rows = _rows_csv(path) if path.suffix.lower() == ".csv" else iter_jsonl(path)
    records, lines = [], []
    for lineno, row in rows:
        record: dict = {}
        for key in REQUIRED + OPTIONAL:
            value = row.get(key)
            if value is None:
                if key in REQUIRED:
                    raise ValueError(f"{path}, line {lineno}: missing required key {key!r}")
                continue
            if key == "id" and isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str):
                raise ValueError(
                    f"{path}, line {lineno}: key {key!r} must be a string, got "
                    f"{type(value).__name__}"
                )
            if key in REQUIRED and not value.strip():
                raise ValueError(f"{path}, line {lineno}: empty value for key {key!r}")
            record[key] = value
        record.setdefault("id", f"{record['source']}#{lineno}")
        for key in PATHS:
            if key in record:
                record[key] = str(root / record[key])
        records.append(record)
        lines.append(lineno)
    duplicates = sorted(i for i, n in Counter(r["id"] for r in records).items() if n > 1)
    if duplicates:
        raise ValueError(f"{path}: duplicate ids {duplicates}")
    without = [line for line, r in zip(lines, records, strict=True) if "mask" not in r]
    if without and len(without) < len(records):  # a batch must have masks for all or none
        raise ValueError(
            f"{path}: 'mask' is given on some rows but missing on line(s) {without[:10]}"
            f"{' ...' if len(without) > 10 else ''}; give a mask on every row or on none"
        )
    return records


def _half_up(x: float) -> int:
    return int(x + 0.5)


def seeded_split(
    records: list[dict], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[dict]]:
    """{"train", "val", "test"} lists from ranking the ids by sha256(f"{seed}:{id}")."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    n = len(records)
    num_test, num_val = _half_up(test_fraction * n), _half_up(val_fraction * n)
    if n and num_test + num_val >= n:
        raise ValueError(
            f"{n} records leave no training data with val_fraction={val_fraction}, "
            f"test_fraction={test_fraction}"
        )

    def rank(index: int) -> bytes:
        return hashlib.sha256(f"{seed}:{records[index]['id']}".encode()).digest()

    order = sorted(range(n), key=rank)
    which = {i: "test" for i in order[:num_test]}
    which.update({i: "val" for i in order[num_test : num_test + num_val]})
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for index, record in enumerate(records):
        splits[which.get(index, "train")].append(record)
    return splits


class FolderEditDataModule(EditDataModule):
    """Your own (source, target, instruction) pairs from a manifest (see module docstring).

    Args:
        root: folder the manifests and image paths are relative to.
        resolution: side of the square crops fed to the model.
        manifest: the one manifest (`.jsonl` or `.csv`, relative to `root`) that the seeded
            split divides; unused when a per-split manifest is set.
        train_manifest: manifest of the train split (switches to per-split manifests).
        val_manifest: manifest of the val split (switches to per-split manifests).
        test_manifest: manifest of the test split (switches to per-split manifests).
        val_fraction: share of `manifest` records in "val" (seeded split).
        test_fraction: share of `manifest` records in "test" (seeded split).
        split_seed: seed of the split's hash ranking.
        **kwargs: the shared :class:`EditDataModule` fields (batch sizes, workers, crop,
            `max_samples`, `on_bad_sample`, `predict_split`, `expressive_path`, ...).
    """

    protocol = "generic"

    def __init__(
        self,
        root: str,
        resolution: int = 256,
        manifest: str = "manifest.jsonl",
        train_manifest: str | None = None,
        val_manifest: str | None = None,
        test_manifest: str | None = None,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        split_seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(root=root, resolution=resolution, **kwargs)
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        self.manifest = manifest
        self.train_manifest = train_manifest
        self.val_manifest = val_manifest
        self.test_manifest = test_manifest
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self._split_cache: dict[str, list[dict]] | None = None

    def per_split_manifests(self) -> dict[str, str | None] | None:
        """{split: manifest or None} when per-split manifests are in use, else None."""
        given = {"train": self.train_manifest, "val": self.val_manifest, "test": self.test_manifest}
        return given if any(v is not None for v in given.values()) else None

    def build_records(self, split: str) -> list[dict]:
        """Records of `split` from its own manifest or from the seeded split of `manifest`."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"unknown split {split!r} (train, val or test)")
        root = Path(self.root)
        per_split = self.per_split_manifests()
        if per_split is not None:
            name = per_split[split]
            if name is None:
                raise ValueError(
                    f"no manifest for split {split!r}: per-split manifests are in use, "
                    f"set {split}_manifest"
                )
            return read_manifest(root / name, root)
        if self._split_cache is None:
            records = read_manifest(root / self.manifest, root)
            self._split_cache = seeded_split(
                records, self.val_fraction, self.test_fraction, self.split_seed
            )
        return [dict(r) for r in self._split_cache[split]]
