"""The Emu Edit test set (Sheynin et al., "Emu Edit: Precise Image Editing via Recognition and
Generation Tasks", CVPR 2024), read as its Hugging Face release ``facebook/emu_edit_test_set``.

Layout (the dataset card's ``dataset_info``, https://huggingface.co/datasets/facebook/emu_edit_test_set):
parquet shards ``data/validation-*.parquet`` (2,022 rows) and ``data/test-*.parquet`` (3,589
rows), columns ``instruction`` (string), ``image`` (Image: ``{bytes, path}``), ``task``
(string: background, global, style, remove, add, local, texture), ``split`` (string), ``idx``
(int64), ``hash`` (string), ``input_caption`` (string), ``output_caption`` (string). The card
lists no edited image: the set has NO ground-truth targets, so it is scored against the input
(the ``emu-edit`` protocol, ``reference: source``: CLIP direction between the captions' and the
images' change, CLIP-I and L1 and DINO of the edit against the input, CLIP-T of the edit against
``output_caption``). Meta's generations (``facebook/emu_edit_test_set_generations``) name the
splits the other way round (validation 3,589, test 2,022); ``emu_split`` picks the card's name.

Samples: ``id`` = ``emu_edit/<idx>``, ``source`` = ``image``, ``instruction``,
``source_caption`` = ``input_caption``, ``goal_caption`` = ``output_caption`` (the record also
keeps ``task``, the edit category). Only the "test" split exists here (it is a test set). A row with a null image or an empty text column is an
error naming the shard and row.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from .base import EditDataModule
from .hf_table import TableDataset, check_unique, open_tables, read_columns, table_files

log = logging.getLogger(__name__)

DATASET = "emu_edit"
TEXT_COLUMNS = ("instruction", "task", "input_caption", "output_caption")
COLUMNS = (*TEXT_COLUMNS, "image", "idx", "hash", "split")
#: Rows per split on the dataset card.
CARD_COUNTS = {"test": 3589, "validation": 2022}
#: The seven edit categories of the card.
TASKS = ("background", "global", "style", "remove", "add", "local", "texture")


class EmuEditDataModule(EditDataModule):
    """The Emu Edit test set (see the module docstring) as the "test" split.

    Args:
        root: the dataset folder (a local copy of the Hub repository).
        resolution: side of the square model input.
        emu_split: which of the card's splits is served as "test": "test" (3,589 rows) or
            "validation" (2,022).
        files: glob of the shards relative to ``root`` (default ``data/<emu_split>-*.parquet``).
        cache_dir: where ``datasets`` keeps the Arrow copies of the shards.
        skip_identical_captions: leave out the rows whose ``output_caption`` equals their
            ``input_caption`` (CLIP direction is undefined there, and CLIP-T then scores the
            unedited caption; ICEdit's evaluation drops them, issue River-Zhang/ICEdit#69).
            Off by default (the card's rows as released); the count left out is logged and
            kept in ``skipped_rows``.
        **kwargs: the shared :class:`EditDataModule` fields.
    """

    protocol = "emu-edit"
    dataset_class = TableDataset

    def __init__(
        self,
        root: str,
        resolution: int = 256,
        emu_split: Literal["test", "validation"] = "test",
        files: str | None = None,
        cache_dir: str | None = None,
        skip_identical_captions: bool = False,
        random_flip: float = 0.0,
        **kwargs,
    ) -> None:
        if emu_split not in CARD_COUNTS:
            raise ValueError(f"emu_split must be one of {sorted(CARD_COUNTS)}, got {emu_split!r}")
        super().__init__(root=root, resolution=resolution, random_flip=random_flip, **kwargs)
        self.emu_split = emu_split
        self.files = files or f"data/{emu_split}-*.parquet"
        self.cache_dir = cache_dir
        self.skip_identical_captions = skip_identical_captions
        self.skipped_rows: list[str] = []
        self.published_counts = None if skip_identical_captions else {"test": CARD_COUNTS[emu_split]}
        self._tables: list[tuple[str, Any]] | None = None

    def tables(self) -> list[tuple[str, Any]]:
        if self._tables is None:
            paths = table_files(self.root, self.files, "Emu Edit parquet")
            self._tables = open_tables(paths, COLUMNS, "Emu Edit shard", self.cache_dir)
        return self._tables

    def build_records(self, split: str) -> list[dict]:
        if split != "test":
            raise ValueError(
                f"the Emu Edit test set has only a 'test' split (no targets to train on), got "
                f"{split!r}"
            )
        records = []
        for index, (path, table) in enumerate(self.tables()):
            rows = read_columns(path, table, TEXT_COLUMNS, ("image",), ("idx",), "Emu Edit shard")
            for row in rows:
                records.append(
                    {
                        "id": f"{DATASET}/{int(row['idx'])}",
                        "source": f"{path}[row {row['row']}].image",
                        "instruction": row["instruction"],
                        "source_caption": row["input_caption"],
                        "goal_caption": row["output_caption"],
                        "task": row["task"],
                        "category": row["task"],
                        "table": index,
                        "row": row["row"],
                        "columns": {"source": "image"},
                    }
                )
        check_unique(records, "Emu Edit")
        if self.skip_identical_captions:
            kept = [r for r in records if r["goal_caption"].strip() != r["source_caption"].strip()]
            self.skipped_rows = sorted({r["id"] for r in records} - {r["id"] for r in kept})
            log.info(
                "Emu Edit: left out %d of %d rows whose output caption equals the input caption "
                "(skip_identical_captions)",
                len(self.skipped_rows),
                len(records),
            )
            records = kept
        return records

    def dataset_kwargs(self, split: str) -> dict[str, Any]:
        return {"tables": self.tables()}

    def prediction_path(self, sample_id: str) -> str:
        """``<idx>.png`` for ``emu_edit/<idx>``."""
        return f"{sample_id.split('/', 1)[1]}.png"
