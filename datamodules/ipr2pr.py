"""IPr2Pr (InstructPix2Pix generated data) in its two native layouts.

`layout="original"` reads the release as the InstructPix2Pix authors ship it::

    root/seeds.json                   [[prompt_dir, [seed, ...]], ...]  (sorted)
    root/<prompt_dir>/prompt.json     {"edit": ..., "input": ..., "output": ...}
                                      (InstructPix2Pix's own generator writes the input
                                      caption as "caption": either key is read)
    root/<prompt_dir>/<seed>_0.jpg    input image
    root/<prompt_dir>/<seed>_1.jpg    edited image

`layout="parquet"` reads the Hugging Face release (`timbrooks/instructpix2pix-clip-filtered`):
`root/**/*.parquet` shards with columns `original_prompt`, `original_image`, `edit_prompt`,
`edited_prompt`, `edited_image` (images stored as `{bytes, path}` structs, as `datasets` writes
them).

Both give contract samples (see DESIGN.md): `instruction` = the edit, `source_caption` = the
input caption, `goal_caption` = the output caption where present.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from datamodules.decode import decode

from .base import BadSampleError, EditDataModule, EditDataset, SkippedSample, read_json_list

log = logging.getLogger(__name__)

#: Columns a parquet shard must have / may have.
PARQUET_REQUIRED = ("original_image", "edited_image", "edit_prompt")
PARQUET_OPTIONAL = ("original_prompt", "edited_prompt")
#: File the missing prompt folders are listed in, inside `report_dir`.
MISSING_REPORT_NAME = "ipr2pr_missing_prompts.txt"


def split_bounds(n: int) -> tuple[int, int]:
    """The (train_end, val_end) boundaries of the 0.9 / 0.05 / 0.05 split of `n` entries.

    train = entries [0, floor(0.9 n)), val = [floor(0.9 n), floor(0.95 n)), test = the rest,
    i.e. cumulative fractions with floor, as the InstructPix2Pix training code splits
    `seeds.json`. Integer arithmetic (`9n // 10`, `19n // 20`) gives the same boundaries as the
    original float expression for every n up to 10^6 (checked) without rounding surprises.
    Note val has floor(0.95 n) - floor(0.9 n) entries, which can differ by one from
    floor(0.05 n) (e.g. n = 19: 17 / 1 / 1); for the full release (n = 313,010) it is
    281,709 / 15,650 / 15,651.
    """
    return 9 * n // 10, 19 * n // 20


def input_caption(prompt: dict) -> str | None:
    """The input caption of a `prompt.json`: `input` (the released data) or `caption`.

    InstructPix2Pix's text generator (`dataset_creation/generate_txt_dataset.py`) writes
    prompt records as `{caption, edit, output, url}`, and `generate_img_dataset.py` dumps the
    record it is given into `prompt.json` unchanged, so data generated with its own pipeline
    carries `caption` where the release has `input`.
    """
    value = prompt.get("input")
    return value if value is not None else prompt.get("caption")


class _PinnedRecords(Sequence):
    """`records` with one index replaced by its resolved record (for one `__getitem__` call)."""

    def __init__(self, records: Sequence[dict], index: int, resolved: dict) -> None:
        self._records = records
        self._index = index
        self._resolved = resolved

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index):  # type: ignore[override]
        return self._resolved if index == self._index else self._records[index]


class _ResolvingDataset(EditDataset):
    """An EditDataset whose records are resolved into image/text records at access time.

    `resolve(index)` turns the stored record into an ordinary EditDataset record (paths and
    texts); `EditDataset.__getitem__` then loads, transforms and builds the sample as for any
    dataset. A BadSampleError from `resolve` follows the `on_bad_sample` policy.
    """

    def resolve(self, index: int) -> dict:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:
        try:
            resolved = self.resolve(index)
        except BadSampleError as err:
            if self.on_bad_sample == "skip":
                return SkippedSample(str(self.records[index].get("id")), str(err))
            raise
        records = self.records
        self.records = _PinnedRecords(records, index, resolved)
        try:
            sample = super().__getitem__(index)
        finally:
            self.records = records
        if isinstance(sample, dict) and resolved.get("seed") is not None:
            sample["seed"] = int(resolved["seed"])  # which image pair of the prompt folder
        return sample


class IPr2PrDataset(_ResolvingDataset):
    """The original layout: one record per prompt folder, seed and prompt.json at access time.

    Records hold `id`, `prompt_dir` (absolute) and `seeds`. In training (`random_seed=True`)
    each access draws one seed uniformly with torch's global RNG (which the DataLoader seeds
    per worker); otherwise the first seed is used. `prompt.json` is read here, not at index
    time, so indexing 313k prompts reads no per-prompt file. Samples carry the drawn `seed`.

    Expressive instructions are per image pair (the MGIE release's `process_data.ipynb` writes
    one per `<prompt>_<seed>`): with a per-seed `expressive_path`, the DataModule leaves in
    `seeds` only the pairs that have an instruction and attaches `expressive_by_seed`, so a
    sample's `expressive` always describes the pair whose images it returns (pairs without an
    instruction are never drawn).

    Args:
        records: dicts with `id`, `prompt_dir` and a non-empty `seeds` list.
        transform: the paired torchvision v2 transform.
        split: split name, for error messages.
        on_bad_sample: "error" raises BadSampleError (also for a missing or invalid
            prompt.json), "skip" returns a SkippedSample.
        random_seed: draw a random seed per access (train) or use the first one.
    """

    def __init__(
        self,
        records: list[dict],
        transform,
        split: str,
        on_bad_sample: Literal["error", "skip"] = "error",
        random_seed: bool = False,
    ) -> None:
        super().__init__(records, transform, split, on_bad_sample)
        self.random_seed = random_seed

    def choose_seed(self, seeds: Sequence[int]) -> int:
        if self.random_seed and len(seeds) > 1:
            return seeds[int(torch.randint(len(seeds), ()).item())]
        return seeds[0]

    def resolve(self, index: int) -> dict:
        record = self.records[index]
        prompt_dir = Path(record["prompt_dir"])
        where = f"(split {self.split!r}, row {index}, id {record['id']!r})"
        prompt_file = prompt_dir / "prompt.json"
        try:
            with prompt_file.open(encoding="utf-8") as f:
                prompt = json.load(f)
        except OSError as err:
            raise BadSampleError(
                f"cannot read {prompt_file} {where}: {type(err).__name__}: {err}"
            ) from err
        except json.JSONDecodeError as err:
            raise BadSampleError(f"{prompt_file} is not valid JSON {where}: {err}") from err
        if not isinstance(prompt, dict) or prompt.get("edit") is None:
            raise BadSampleError(f"{prompt_file}: missing required key 'edit' {where}")
        seed = self.choose_seed(record["seeds"])
        return {
            "id": record["id"],
            "source": str(prompt_dir / f"{seed}_0.jpg"),
            "target": str(prompt_dir / f"{seed}_1.jpg"),
            "instruction": prompt["edit"],
            "source_caption": input_caption(prompt),
            "goal_caption": prompt.get("output"),
            "expressive": (record.get("expressive_by_seed") or {}).get(
                str(seed), record.get("expressive")
            ),
            "seed": seed,
        }


class IPr2PrParquetDataset(_ResolvingDataset):
    """The parquet layout: rows of a `datasets.Dataset`, images decoded from bytes at access.

    Records hold `id` and `row` (the row in `table`, the shards concatenated in `shards`
    order). Images are `{bytes, path}` structs (or raw bytes); `path` is used only when `bytes`
    is empty (relative paths are taken relative to the shard's folder). Error messages name the
    shard file and the row inside it.

    Args:
        records: dicts with `id` and `row`.
        table: a `datasets.Dataset` over all shards, image columns not decoded.
        shards: shard files, in the order they were concatenated.
        offsets: first row of each shard in `table` (same length as `shards`).
        transform: the paired torchvision v2 transform.
        split: split name, for error messages.
        on_bad_sample: "error" raises BadSampleError, "skip" returns a SkippedSample.
    """

    def __init__(
        self,
        records: list[dict],
        transform,
        split: str,
        on_bad_sample: Literal["error", "skip"] = "error",
        *,
        table,
        shards: Sequence[str],
        offsets: Sequence[int],
    ) -> None:
        super().__init__(records, transform, split, on_bad_sample)
        self.table = table
        self.shards = list(shards)
        self.offsets = list(offsets)

    def locate(self, row: int) -> tuple[str, int]:
        """(shard file, row inside the shard) of a row of `table`."""
        shard = bisect.bisect_right(self.offsets, row) - 1
        return self.shards[shard], row - self.offsets[shard]

    def resolve(self, index: int) -> dict:
        record = self.records[index]
        shard, shard_row = self.locate(record["row"])
        where = f"{shard}, row {shard_row}"
        try:
            row = self.table[record["row"]]
        except Exception as err:  # an unreadable cache/shard
            raise BadSampleError(
                f"cannot read {where} (split {self.split!r}, id {record['id']!r}): "
                f"{type(err).__name__}: {err}"
            ) from err
        if row.get("edit_prompt") is None:
            raise BadSampleError(f"{where}: empty 'edit_prompt' (id {record['id']!r})")
        return {
            "id": record["id"],
            "source": f"{where}, column original_image",
            "target": f"{where}, column edited_image",
            "instruction": row["edit_prompt"],
            "source_caption": row.get("original_prompt"),
            "goal_caption": row.get("edited_prompt"),
            "expressive": record.get("expressive"),
            "_images": {"source": row["original_image"], "target": row["edited_image"]},
            "_shard": shard,
        }

    def _load(self, index: int, key: str, mode: str) -> torch.Tensor:
        """Decode the `key` image of the resolved record from its bytes (or path)."""
        record = self.records[index]
        value = record["_images"].get(key)
        try:
            if isinstance(value, dict):
                data, path = value.get("bytes"), value.get("path")
            else:
                data, path = value, None
            if data:
                return decode(data, mode)
            if path:
                return decode(Path(record["_shard"]).parent / path, mode)
            raise ValueError("no image bytes or path stored")
        except (OSError, ValueError, SyntaxError, TypeError) as err:
            raise BadSampleError(
                f"cannot decode {key} image ({record[key]}; split {self.split!r}, "
                f"id {record.get('id')!r}): {type(err).__name__}: {err}"
            ) from err


class IPr2PrDataModule(EditDataModule):
    """InstructPix2Pix's generated editing data, original folder layout or HF parquet shards.

    Original layout (see the module docstring):

    - Splits: 0.9 / 0.05 / 0.05 by `seeds.json` order with floor, cumulative: train = the first
      floor(0.9 n) entries, val = entries up to floor(0.95 n), test = the rest (`split_bounds`),
      n = the FULL `seeds.json` list, so every prompt keeps its split and id even when folders
      are missing.
    - One sample per prompt folder, id `ipr2pr/<prompt_dir>`. Train draws one random seed per
      access (torch RNG, so DataLoader worker seeding applies); val/test use the first seed.
    - Indexing reads `seeds.json` and scans `root` once (one `os.scandir`, no image or
      prompt.json reads), so 313k prompts index in seconds. `prompt.json` is read when a
      sample is loaded; a missing file or `edit` key raises BadSampleError naming the file
      (or skips the sample with `on_bad_sample="skip"`).
    - Prompt folders listed in `seeds.json` but absent (10,434 in the CLIP-filtered release)
      are counted, logged, listed one per line in `<report_dir>/ipr2pr_missing_prompts.txt`
      and left out (`on_missing_prompt="skip_and_report"`), or raise (`"error"`).

    Parquet layout: every `root/**/*.parquet` shard (sorted by path) is read with
    `datasets.load_dataset("parquet", ...)` from local files; the first load converts the shards
    to Arrow files in the datasets cache (`parquet_cache_dir`), later loads memory-map them.
    Image columns are not decoded at index time; bytes are decoded in `__getitem__`. Ids are
    `ipr2pr/<shard path relative to root, without .parquet>/<row in shard>`. The release has
    only a train split: val/test are held-out fractions drawn with a seeded permutation of all
    rows (`torch.randperm` with `parquet_split_seed`): the first floor(test_fraction * n)
    permuted rows are test, the next floor(val_fraction * n) val, the rest train (each split
    in row order). With both fractions 0 (the default) everything is train, `fit` sets up
    only train, and asking for val/test raises a ValueError.

    Args:
        root: dataset folder (`seeds.json` and the prompt folders, or the parquet shards).
        layout: "original" (seeds.json + prompt folders) or "parquet" (HF shards).
        on_missing_prompt: original layout: "skip_and_report" leaves out prompt folders that
            seeds.json lists but root lacks (and writes their names to the report);
            "error" raises naming their count and the first few.
        report_dir: folder for `ipr2pr_missing_prompts.txt` (relative paths are relative to the
            working directory).
        parquet_val_fraction: parquet layout: fraction of rows held out as val.
        parquet_test_fraction: parquet layout: fraction of rows held out as test.
        parquet_split_seed: parquet layout: seed of the held-out permutation.
        parquet_cache_dir: parquet layout: `datasets` cache folder for the Arrow conversion
            (None: the datasets default, `HF_DATASETS_CACHE`).
        **kwargs: the shared :class:`EditDataModule` fields (resolution, batch sizes, workers,
            crop/flip, `max_samples`, `on_bad_sample` (also covers a missing or invalid
            prompt.json), `expressive_path`, ...).
    """

    protocol = "ipr2pr"
    #: Prompts per split of the full original release (313,010 prompts; the CLIP-filtered
    #: release lacks 10,434 folders, which `verify` then reports as a difference).
    published_counts = {"train": 281709, "val": 15650, "test": 15651}

    def __init__(
        self,
        root: str,
        layout: Literal["original", "parquet"] = "original",
        on_missing_prompt: Literal["skip_and_report", "error"] = "skip_and_report",
        report_dir: str = "editbench_reports",
        parquet_val_fraction: float = 0.0,
        parquet_test_fraction: float = 0.0,
        parquet_split_seed: int = 0,
        parquet_cache_dir: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(root=root, **kwargs)
        if layout not in ("original", "parquet"):
            raise ValueError(f"layout must be 'original' or 'parquet', got {layout!r}")
        if on_missing_prompt not in ("skip_and_report", "error"):
            raise ValueError(
                f"on_missing_prompt must be 'skip_and_report' or 'error', got {on_missing_prompt!r}"
            )
        for name, value in (
            ("parquet_val_fraction", parquet_val_fraction),
            ("parquet_test_fraction", parquet_test_fraction),
        ):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if parquet_val_fraction + parquet_test_fraction >= 1.0:
            raise ValueError("parquet_val_fraction + parquet_test_fraction must be below 1")
        self.layout = layout
        self.on_missing_prompt = on_missing_prompt
        self.report_dir = report_dir
        self.parquet_val_fraction = parquet_val_fraction
        self.parquet_test_fraction = parquet_test_fraction
        self.parquet_split_seed = parquet_split_seed
        self.parquet_cache_dir = parquet_cache_dir
        #: Prompt folders seeds.json lists but root lacks (original layout, after indexing).
        self.missing_prompts: list[str] = []
        self.missing_report: Path | None = None
        self._index: dict[str, list[dict]] | None = None
        self._parquet: dict[str, Any] | None = None

    # ------------------------------------------------------------------ original layout

    def _read_seeds(self) -> list[tuple[str, list[int]]]:
        path = Path(self.root) / "seeds.json"
        data = read_json_list(path, "seeds.json")
        entries = []
        for row, entry in enumerate(data):
            ok = (
                isinstance(entry, (list, tuple))
                and len(entry) == 2
                and isinstance(entry[0], str)
                and isinstance(entry[1], list)
                and len(entry[1]) > 0
            )
            if not ok:
                raise ValueError(
                    f"{path}, entry {row}: expected [prompt_dir, [seed, ...]] with at least "
                    f"one seed, got {str(entry)[:200]}"
                )
            entries.append((entry[0], entry[1]))
        return entries

    def _write_missing_report(self, missing: list[str]) -> Path:
        folder = Path(self.report_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / MISSING_REPORT_NAME
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(f"{name}\n" for name in missing), encoding="utf-8")
        os.replace(tmp, path)
        return path

    def index_original(self) -> dict[str, list[dict]]:
        """Records of all three splits (computed once): see the class docstring."""
        if self._index is not None:
            return self._index
        root = Path(self.root)
        entries = self._read_seeds()
        with os.scandir(root) as it:
            present = {entry.name for entry in it if entry.is_dir()}
        missing = [name for name, _ in entries if name not in present]
        if missing:
            if self.on_missing_prompt == "error":
                raise FileNotFoundError(
                    f"{len(missing)} prompt folder(s) listed in {root / 'seeds.json'} are "
                    f"missing under {root}, e.g. {', '.join(missing[:5])} "
                    "(on_missing_prompt='skip_and_report' leaves them out)"
                )
            self.missing_report = self._write_missing_report(missing)
            log.warning(
                "IPr2Pr: %d of %d prompt folders listed in seeds.json are missing under %s; "
                "left out, listed in %s",
                len(missing),
                len(entries),
                root,
                self.missing_report,
            )
        self.missing_prompts = missing
        train_end, val_end = split_bounds(len(entries))
        bounds = {"train": (0, train_end), "val": (train_end, val_end), "test": (val_end, None)}
        index = {}
        for split, (start, stop) in bounds.items():
            index[split] = [
                {"id": f"ipr2pr/{name}", "prompt_dir": str(root / name), "seeds": list(seeds)}
                for name, seeds in entries[start:stop]
                if name in present
            ]
        self._index = index
        return index

    # ------------------------------------------------------------------ parquet layout

    def parquet_shards(self) -> list[Path]:
        """Every `root/**/*.parquet`, sorted by path."""
        root = Path(self.root)
        if not root.is_dir():
            raise FileNotFoundError(f"IPr2Pr parquet root not found: {root}")
        shards = sorted(root.rglob("*.parquet"))
        if not shards:
            raise FileNotFoundError(f"no *.parquet shards under {root}")
        return shards

    def index_parquet(self) -> dict[str, Any]:
        """Open the shards with `datasets` (once) and split their rows; see the class docstring."""
        if self._parquet is not None:
            return self._parquet
        import datasets
        import pyarrow.parquet as pq

        shards = self.parquet_shards()
        offsets, total = [], 0
        for shard in shards:
            try:
                meta = pq.read_metadata(shard)
            except Exception as err:
                raise ValueError(f"{shard}: not a readable parquet file ({err})") from err
            names = set(meta.schema.to_arrow_schema().names)
            absent = [c for c in PARQUET_REQUIRED if c not in names]
            if absent:
                raise ValueError(f"{shard}: missing column(s) {absent} (has {sorted(names)})")
            offsets.append(total)
            total += meta.num_rows
        table = datasets.load_dataset(
            "parquet",
            data_files=[str(s) for s in shards],
            split="train",
            cache_dir=self.parquet_cache_dir,
        )
        if len(table) != total:
            raise ValueError(
                f"datasets read {len(table)} rows from {len(shards)} shards under {self.root}, "
                f"their metadata says {total}"
            )
        for column in ("original_image", "edited_image"):
            if isinstance(table.features[column], datasets.Image):
                table = table.cast_column(column, datasets.Image(decode=False))
        root = Path(self.root)
        names = [shard.relative_to(root).with_suffix("").as_posix() for shard in shards]
        n_test = math.floor(self.parquet_test_fraction * total)
        n_val = math.floor(self.parquet_val_fraction * total)
        generator = torch.Generator().manual_seed(self.parquet_split_seed)
        perm = torch.randperm(total, generator=generator)
        rows = {
            "test": sorted(perm[:n_test].tolist()),
            "val": sorted(perm[n_test : n_test + n_val].tolist()),
            "train": sorted(perm[n_test + n_val :].tolist()),
        }
        records = {}
        for split, split_rows in rows.items():
            recs = []
            for row in split_rows:
                shard = bisect.bisect_right(offsets, row) - 1
                recs.append({"id": f"ipr2pr/{names[shard]}/{row - offsets[shard]}", "row": row})
            records[split] = recs
        self._parquet = {
            "table": table,
            "shards": [str(s) for s in shards],
            "offsets": offsets,
            "records": records,
        }
        return self._parquet

    # ------------------------------------------------------------------ DataModule

    def prepare_data(self) -> None:
        """Parquet layout: convert the shards to the datasets cache once (rank 0)."""
        if self.layout == "parquet":
            self.index_parquet()

    def splits_for(self, stage: str | None) -> tuple[str, ...]:
        """As the base, but parquet `fit` without a val fraction sets up train only."""
        splits = super().splits_for(stage)
        if self.layout == "parquet" and stage == "fit" and self.parquet_val_fraction == 0:
            splits = tuple(s for s in splits if s != "val")
        return splits

    def build_records(self, split: str) -> list[dict]:
        """Records of `split`: prompt folders (original) or parquet rows (see class docstring)."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"unknown split {split!r} (train, val or test)")
        if self.layout == "original":
            return self.index_original()[split]
        records = self.index_parquet()["records"][split]
        if not records:
            fraction = {"val": "parquet_val_fraction", "test": "parquet_test_fraction"}
            hint = (
                f"the parquet release has only a train split; set {fraction[split]} > 0 to "
                "hold out a fraction of the rows"
                if split in fraction
                else "every row is held out as val/test"
            )
            raise ValueError(f"IPr2Pr parquet split {split!r} under {self.root} is empty: {hint}")
        return records

    @property
    def dataset_class(self) -> type[EditDataset]:
        return IPr2PrDataset if self.layout == "original" else IPr2PrParquetDataset

    def dataset_kwargs(self, split: str) -> dict[str, Any]:
        if self.layout == "original":
            return {"random_seed": split == "train"}
        parquet = self.index_parquet()
        return {"table": parquet["table"], "shards": parquet["shards"], "offsets": parquet["offsets"]}
