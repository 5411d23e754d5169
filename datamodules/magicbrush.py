"""MagicBrush (Zhang et al., 2023): manually annotated single- and multi-turn edits.

Two native layouts are read as they are released:

* **train / val**: the Hugging Face parquet release (`osunlp/MagicBrush`), shards
  `root/data/train-*.parquet` and `root/data/dev-*.parquet` (globs configurable). Columns
  `img_id`, `turn_index` (from 1), `source_img`, `mask_img` (white = edit region),
  `instruction`, `target_img`; images are `{bytes, path}` structs. The shards are opened with
  the `datasets` library from local files only (the first `setup` converts each shard to an
  Arrow file under `cache_dir`, memory-mapped afterwards); images stay encoded until
  `__getitem__`. Split "train" = the train shards (8,807 turns in the release), "val" = the
  dev shards (528 turns). `num_turns` of a train/val sample is the largest `turn_index` of its
  `img_id` in the same split.
* **test**: the test folder `root/test/` (`test_dir`) of the MagicBrush repository:
  `edit_sessions.json` = `{img_id: [{input, mask, output, instruction}, ...]}` (turn k is
  list entry k-1; file names inside `images/<img_id>/`), `global_descriptions.json` =
  `{img_id: {"<id>-input.png": caption, "<id>-output<k>.png": caption, ...}}` and
  `local_descriptions.json` = `{img_id: {"<id>-output<k>.png": caption}}` (the structure the
  official `evaluation/image_eval.py` indexes as `captions[img_id][output_name]`).

Every sample carries `session` (= `img_id`), `turn` (from 1) and `num_turns`; ids are
`magicbrush/<img_id>/<turn>`.

Test captions: `goal_caption` is the caption of the turn's ground-truth output, from the GLOBAL
descriptions by default (`caption_source="global"`: MGIE's "global caption alignment" and the
default of MagicBrush's evaluation script; the `magicbrush` protocol); `caption_source="local"`
takes the local ones (the MagicBrush paper's CLIP-T; the `magicbrush-paper` protocol). The two
disagree, a known source of mismatched numbers (MagicBrush issue 17); the protocol checks that
the data's source is its own. `source_caption` is the global
description of the turn's input image where the file has one.

Multi-turn test modes (`test_mode`):

* `"independent"`: the source of turn k is the ground-truth output of turn k-1 (the input image
  for turn 1), i.e. the `input` file that `edit_sessions.json` names, exactly as the official
  script's independent pass reads it. Predictions are named `<id>_1.png`, `<id>_inde_<k>.png`.
* `"iterative"`: the source of turn k ≥ 2 is the model's own output of turn k-1, which the data
  module cannot know. Samples of turn k ≥ 2 carry `previous_output_id`, the id of the sample
  whose prediction must replace `source`; until replaced, `source` holds the ground-truth
  previous output (the independent input) as a placeholder. Records are ordered by
  (session, turn), and the test/predict loader batches turn by turn (all turn-1 samples, then
  all turn-2 samples, ...; `TurnBatchSampler`), so a sample's predecessor was always predicted
  in an earlier batch. A test loop keeps `{id: prediction}` for the batches so far and calls
  `apply_previous_outputs(batch, predictions)` before editing; a prediction of turn k is only
  needed until turn k+1 of its session is done. Predictions are named `<id>_1.png`,
  `<id>_iter_<k>.png` (`official_output_name`), so they can be scored by MagicBrush's own
  `image_eval.py`.

Masks: decoded as 8-bit greyscale; pixels ≥ 128 (white) are the edit region (1 in the sample).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Sampler

from .base import EditDataModule
from .hf_table import TableDataset, check_unique, open_tables, table_files
from .sampling import EvalDistributedSampler, process_layout

log = logging.getLogger(__name__)

DATASET = "magicbrush"
PARQUET_COLUMNS = ("img_id", "turn_index", "source_img", "mask_img", "instruction", "target_img")
#: Record key → parquet image column.
IMAGE_COLUMNS = {"source": "source_img", "target": "target_img", "mask": "mask_img"}
SESSION_KEYS = ("input", "mask", "output", "instruction")


def sample_id(img_id: str, turn: int) -> str:
    """The id of turn `turn` (from 1) of session `img_id`: `magicbrush/<img_id>/<turn>`."""
    return f"{DATASET}/{img_id}/{int(turn)}"


def parse_id(sample_id: str) -> tuple[str, int]:
    """`magicbrush/<img_id>/<turn>` → (img_id, turn)."""
    dataset, img_id, turn = sample_id.split("/")
    if dataset != DATASET:
        raise ValueError(f"not a MagicBrush id: {sample_id!r}")
    return img_id, int(turn)


def official_output_name(
    img_id: str, turn: int, mode: Literal["independent", "iterative"] = "independent"
) -> str:
    """MagicBrush's file name for the prediction of `turn` (from 1) of session `img_id`.

    `<id>_1.png` for turn 1 (shared by both modes), `<id>_inde_<k>.png` (independent) or
    `<id>_iter_<k>.png` (iterative) for k ≥ 2. The official evaluation expects the files in
    `<generated_path>/<img_id>/`.
    """
    turn = int(turn)
    if turn < 1:
        raise ValueError(f"turns count from 1, got {turn}")
    if mode not in ("independent", "iterative"):
        raise ValueError(f"mode must be 'independent' or 'iterative', got {mode!r}")
    if turn == 1:
        return f"{img_id}_1.png"
    return f"{img_id}_{'inde' if mode == 'independent' else 'iter'}_{turn}.png"


def official_output_path(
    sample_id: str, mode: Literal["independent", "iterative"] = "independent"
) -> str:
    """`<img_id>/<official_output_name>` for a sample id, relative to the generated folder."""
    img_id, turn = parse_id(sample_id)
    return f"{img_id}/{official_output_name(img_id, turn, mode)}"


def apply_previous_outputs(
    batch: dict[str, Any], predictions: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    """Replace `source` by the model's previous-turn output (iterative mode), in place.

    For every sample with a `previous_output_id`, `batch["source"][i]` becomes
    `predictions[previous_output_id]` (a [3,H,W] tensor in [-1,1] of the batch's size, on any
    device). Samples without one (turn 1) keep their source. Raises KeyError naming the
    missing ids when a prediction is not there yet.
    """
    previous = batch.get("previous_output_id") or []
    wanted = [(i, p) for i, p in enumerate(previous) if p is not None]
    if not wanted:
        return batch
    missing = [p for _, p in wanted if p not in predictions]
    if missing:
        raise KeyError(f"no prediction yet for previous turn(s) {missing}")
    source = batch["source"].clone()
    for i, p in wanted:
        source[i] = predictions[p].to(device=source.device, dtype=source.dtype)
    batch["source"] = source
    return batch


class TurnBatchSampler(Sampler[list[int]]):
    """Batches of indices of one turn each, turn 1 first: a turn's predecessor is always in an
    earlier batch. Within a turn the record order is kept.

    Args:
        turns: the turn (from 1) of every record, by index.
        batch_size: at most this many indices per batch.
        indices: the indices to batch (default all): this process's share of the split, whole
            sessions (:class:`~datamodules.sampling.EvalDistributedSampler`).
    """

    def __init__(
        self, turns: Sequence[int], batch_size: int, indices: Sequence[int] | None = None
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.turns = [int(t) for t in turns]
        self.batch_size = batch_size
        self.indices = list(range(len(self.turns)) if indices is None else indices)

    def _batches(self) -> list[list[int]]:
        batches = []
        for turn in sorted({self.turns[i] for i in self.indices}):
            indices = [i for i in self.indices if self.turns[i] == turn]
            batches += [
                indices[s : s + self.batch_size] for s in range(0, len(indices), self.batch_size)
            ]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


def _undecoded(table: Any) -> Any:
    """``table`` with its image columns kept as ``{bytes, path}`` structs (decoded per sample
    by :class:`~datamodules.hf_table.TableDataset`)."""
    import datasets

    for column in IMAGE_COLUMNS.values():
        table = table.cast_column(column, datasets.Image(decode=False))
    return table


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"MagicBrush test file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


class MagicBrushDataModule(EditDataModule):
    """MagicBrush train/dev parquet shards and the multi-turn test set (see module docstring).

    Args:
        root: the MagicBrush folder: `data/*.parquet` (HF release) and `test/` (test layout).
        resolution: side of the square crops fed to the model.
        random_flip: horizontal flip probability for training. 0 by default: instructions
            name left/right ("put a hat on the man on the left"), which a flip would make wrong.
        train_files: glob of the train shards, relative to `root` (or absolute).
        val_files: glob of the dev shards used as the "val" split, relative to `root`.
        test_dir: the test folder (`edit_sessions.json`, descriptions, `images/`), relative
            to `root` (or absolute).
        test_mode: "independent" (source of turn k = ground-truth output of turn k-1) or
            "iterative" (source of turn k = the model's output of turn k-1, substituted by the
            test loop via `previous_output_id`; turn-by-turn batches).
        caption_source: descriptions the test `goal_caption` comes from: "global" (MGIE's
            tables, the official script's default) or "local" (the MagicBrush paper's CLIP-T).
        cache_dir: where `datasets` keeps the Arrow copies of the shards (None: its default
            cache, `HF_DATASETS_CACHE`).
        **kwargs: the shared :class:`EditDataModule` fields (batch sizes, workers, crop,
            `max_samples`, `on_bad_sample`, `predict_split`, `expressive_path`, ...).
    """

    protocol = "magicbrush"
    #: Turns per split in the public release (train/dev parquet, test sessions).
    published_counts = {"train": 8807, "val": 528, "test": 1053}
    dataset_class = TableDataset

    def __init__(
        self,
        root: str,
        resolution: int = 256,
        random_flip: float = 0.0,
        train_files: str = "data/train-*.parquet",
        val_files: str = "data/dev-*.parquet",
        test_dir: str = "test",
        test_mode: Literal["independent", "iterative"] = "independent",
        caption_source: Literal["local", "global"] = "global",
        cache_dir: str | None = None,
        **kwargs,
    ) -> None:
        if test_mode not in ("independent", "iterative"):
            raise ValueError(f"test_mode must be 'independent' or 'iterative', got {test_mode!r}")
        if caption_source not in ("local", "global"):
            raise ValueError(f"caption_source must be 'local' or 'global', got {caption_source!r}")
        super().__init__(root=root, resolution=resolution, random_flip=random_flip, **kwargs)
        self.train_files = train_files
        self.val_files = val_files
        self.test_dir = test_dir
        self.test_mode = test_mode
        self.caption_source = caption_source
        self.cache_dir = cache_dir
        self._shards: dict[str, list[tuple[str, Any]]] = {}

    # ----------------------------------------------------------------- parquet (train / val)

    def shard_paths(self, split: str) -> list[str]:
        """Sorted shard files of `split` ("train" or "val"); FileNotFoundError if none match."""
        pattern = self.train_files if split == "train" else self.val_files
        return table_files(self.root, pattern, f"MagicBrush {split} shard")

    def _open_shards(self, split: str) -> list[tuple[str, Any]]:
        """(path, datasets.Dataset with undecoded images) per shard of `split`, cached."""
        if split not in self._shards:
            opened = open_tables(
                self.shard_paths(split), PARQUET_COLUMNS, "MagicBrush shard", self.cache_dir
            )
            self._shards[split] = [(path, _undecoded(table)) for path, table in opened]
        return self._shards[split]

    def _parquet_records(self, split: str) -> list[dict]:
        records: list[dict] = []
        for shard, (path, table) in enumerate(self._open_shards(split)):
            columns = table.select_columns(["img_id", "turn_index", "instruction"]).data
            img_ids = columns.column("img_id").to_pylist()
            turns = columns.column("turn_index").to_pylist()
            instructions = columns.column("instruction").to_pylist()
            for row, (img_id, turn, instruction) in enumerate(
                zip(img_ids, turns, instructions, strict=True)
            ):
                for key, value in (("img_id", img_id), ("turn_index", turn)):
                    if value is None:
                        raise ValueError(f"MagicBrush shard {path}, row {row}: {key} is null")
                if not isinstance(instruction, str) or not instruction.strip():
                    raise ValueError(f"MagicBrush shard {path}, row {row}: empty instruction")
                img_id = str(img_id)
                where = f"{path}[row {row}]"
                records.append(
                    {
                        "id": sample_id(img_id, turn),
                        "source": f"{where}.source_img",
                        "target": f"{where}.target_img",
                        "mask": f"{where}.mask_img",
                        "instruction": instruction,
                        "session": img_id,
                        "turn": int(turn),
                        "table": shard,
                        "row": row,
                        "columns": IMAGE_COLUMNS,
                    }
                )
        num_turns: dict[str, int] = {}
        for record in records:
            num_turns[record["session"]] = max(num_turns.get(record["session"], 0), record["turn"])
        for record in records:
            record["num_turns"] = num_turns[record["session"]]
        return records

    # ----------------------------------------------------------------- test folder

    def test_root(self) -> Path:
        return Path(self.root) / self.test_dir

    def _test_records(self) -> list[dict]:
        folder = self.test_root()
        sessions_path = folder / "edit_sessions.json"
        sessions = _read_json(sessions_path)
        global_desc = _read_json(folder / "global_descriptions.json")
        local_desc = _read_json(folder / "local_descriptions.json")
        goal_desc = local_desc if self.caption_source == "local" else global_desc
        if not isinstance(sessions, dict):
            raise ValueError(f"{sessions_path}: expected an object {{img_id: [turns]}}")
        records: list[dict] = []
        for img_id, turns in sessions.items():
            if not isinstance(turns, list) or not turns:
                raise ValueError(f"{sessions_path}, session {img_id!r}: expected a list of turns")
            images = folder / "images" / str(img_id)
            for turn, entry in enumerate(turns, start=1):
                where = f"{sessions_path}, session {img_id!r}, turn {turn}"
                if not isinstance(entry, dict):
                    raise ValueError(f"{where}: expected an object")
                for key in SESSION_KEYS:
                    if not entry.get(key):
                        raise ValueError(f"{where}: missing key {key!r}")
                record = {
                    "id": sample_id(img_id, turn),
                    "source": str(images / entry["input"]),
                    "target": str(images / entry["output"]),
                    "mask": str(images / entry["mask"]),
                    "instruction": entry["instruction"],
                    "session": str(img_id),
                    "turn": turn,
                    "num_turns": len(turns),
                }
                goal = goal_desc.get(str(img_id), {}).get(entry["output"])
                if goal is not None:
                    record["goal_caption"] = goal
                source_caption = global_desc.get(str(img_id), {}).get(entry["input"])
                if source_caption is not None:
                    record["source_caption"] = source_caption
                if self.test_mode == "iterative" and turn > 1:
                    record["previous_output_id"] = sample_id(img_id, turn - 1)
                records.append(record)
        return records

    # ----------------------------------------------------------------- datamodule

    def build_records(self, split: str) -> list[dict]:
        """train/val: one record per parquet row; test: one per turn of `edit_sessions.json`."""
        if split in ("train", "val"):
            records = self._parquet_records(split)
        elif split == "test":
            records = self._test_records()
        else:
            raise ValueError(f"unknown split {split!r} (train, val or test)")
        check_unique(records, f"MagicBrush (split {split!r})")
        return records

    def eval_groups(self, split: str) -> list | None:
        """In iterative mode a session stays on one process: turn k is edited from the same
        process's output of turn k-1."""
        if split != "test" or self.test_mode != "iterative":
            return None
        return [r["session"] for r in self.datasets[split].records]

    def prediction_path(self, sample_id: str) -> str:
        """Where `predict` writes a test prediction: MagicBrush's official file name for this
        module's `test_mode` (`<img_id>/<img_id>_1.png`, `..._inde_<k>.png`, `..._iter_<k>.png`),
        so MagicBrush's own evaluation script can read the folder."""
        return official_output_path(sample_id, self.test_mode)

    def dataset_kwargs(self, split: str) -> dict[str, Any]:
        return {"tables": self._open_shards(split) if split in ("train", "val") else ()}

    def _loader(self, split: str, train: bool) -> DataLoader:
        if split != "test" or self.test_mode != "iterative":
            return super()._loader(split, train)
        if split not in self.datasets:
            self.datasets[split] = self.make_dataset(split)
        dataset = self.datasets[split]
        world_size, rank = process_layout(self.trainer)
        shard = EvalDistributedSampler(dataset, world_size, rank, self.eval_groups(split))
        sampler = TurnBatchSampler(
            [r["turn"] for r in dataset.records],
            self.eval_batch_size or self.batch_size,
            indices=shard.indices,
        )
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate_fn,
        )
