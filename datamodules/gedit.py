"""GEdit-Bench (Liu et al., "Step1X-Edit: A Practical Framework for General Image Editing",
2025, Sec. 4), read as its Hugging Face release ``stepfun-ai/GEdit-Bench``.

Layout: the release is a ``datasets`` Arrow table (the card lists the format "arrow"), one
split ``train`` (Step1X-Edit's ``GEdit-Bench/generate_image_example.py`` iterates
``load_dataset("stepfun-ai/GEdit-Bench")["train"]``), columns ``task_type`` (string, 11 task
types), ``key`` (string), ``instruction`` (string), ``instruction_language`` (string: ``en`` or
``cn``), ``input_image`` (Image), ``input_image_raw`` (Image) and ``Intersection_exist``
(bool). Every instruction is given in both languages: 606 per language (Table 1 "Size 606";
Table 2: "the Full set includes all the 606 instances", the "Intersection subset" of 434 is
"the subset of prompts where all methods return valid responses"). The local copy is read from
its ``.arrow`` files (``files``, default ``**/*.arrow``: the ``save_to_disk`` layout
``train/data-0000k-of-0000n.arrow``; the Hub folder's exact file names were not checked here).

What the model edits: ``input_image_raw``, as the release's example does (it resizes
``input_image_raw`` to about 512x512 at its aspect ratio, saves it as ``<key>.png`` for the model
and ``input_image`` as ``<key>_SRCIMG.png`` for the judge); ``source_column`` switches.

Samples: ``id`` = ``gedit/<task_type>/<instruction_language>/<key>``, ``source``,
``instruction``. There are no targets: the ``gedit-*`` protocols score the edits afterwards
with a VIEScore judge (``python -m editbench judge --bundle DIR``, Table 2: SC, PQ, O on 0-10 by
GPT-4.1); in test only L1 of the edit against its input is measured. ``prediction_path`` gives
the release's output layout ``fullset/<task_type>/<language>/<key>.png``.
"""

from __future__ import annotations

from typing import Any, Literal

from metrics.protocols import GEDIT_PROTOCOLS

from .base import EditDataModule
from .hf_table import TableDataset, check_unique, open_tables, read_columns, table_files

DATASET = "gedit"
TEXT_COLUMNS = ("task_type", "key", "instruction", "instruction_language")
IMAGE_COLUMNS = ("input_image", "input_image_raw")
COLUMNS = (*TEXT_COLUMNS, *IMAGE_COLUMNS, "Intersection_exist")
LANGUAGES = ("en", "cn", "all")
SUBSETS = ("full", "intersection")
#: Samples per (language, subset) the paper states (Table 1, Table 2's caption: English).
PAPER_COUNTS = {("en", "full"): 606, ("cn", "full"): 606, ("all", "full"): 1212}
PAPER_COUNTS[("en", "intersection")] = 434


def sample_id(task_type: str, language: str, key: str) -> str:
    return f"{DATASET}/{task_type}/{language}/{key}"


class GEditBenchDataModule(EditDataModule):
    """GEdit-Bench (see the module docstring) as the "test" split.

    Args:
        root: the dataset folder (a local copy of the Hub repository).
        resolution: side of the square model input.
        language: "en" (GEdit-Bench-EN), "cn" (GEdit-Bench-CN) or "all".
        subset: "full" or "intersection" (rows with ``Intersection_exist``).
        source_column: the image the model edits, ``input_image_raw`` (the release's example)
            or ``input_image``.
        files: glob of the Arrow (or parquet) files relative to ``root``.
        cache_dir: where ``datasets`` keeps Arrow copies of parquet files.
        **kwargs: the shared :class:`EditDataModule` fields.

    The protocol follows language and subset (``gedit-en``, ``gedit-en-intersection``, ...,
    ``gedit`` for both languages; :data:`metrics.protocols.GEDIT_PROTOCOLS`).
    """

    dataset_class = TableDataset

    def __init__(
        self,
        root: str,
        resolution: int = 512,
        language: Literal["en", "cn", "all"] = "en",
        subset: Literal["full", "intersection"] = "full",
        source_column: Literal["input_image_raw", "input_image"] = "input_image_raw",
        files: str = "**/*.arrow",
        cache_dir: str | None = None,
        random_flip: float = 0.0,
        **kwargs,
    ) -> None:
        if language not in LANGUAGES:
            raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
        if subset not in SUBSETS:
            raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
        if source_column not in IMAGE_COLUMNS:
            raise ValueError(f"source_column must be one of {IMAGE_COLUMNS}, got {source_column!r}")
        super().__init__(root=root, resolution=resolution, random_flip=random_flip, **kwargs)
        self.language = language
        self.subset = subset
        self.source_column = source_column
        self.files = files
        self.cache_dir = cache_dir
        self.protocol = GEDIT_PROTOCOLS[(language, subset)]
        count = PAPER_COUNTS.get((language, subset))
        self.published_counts = {"test": count} if count is not None else None
        self._tables: list[tuple[str, Any]] | None = None

    def tables(self) -> list[tuple[str, Any]]:
        if self._tables is None:
            paths = table_files(self.root, self.files, "GEdit-Bench")
            self._tables = open_tables(paths, COLUMNS, "GEdit-Bench", self.cache_dir)
        return self._tables

    def build_records(self, split: str) -> list[dict]:
        if split != "test":
            raise ValueError(f"GEdit-Bench has only a 'test' split, got {split!r}")
        records = []
        for index, (path, table) in enumerate(self.tables()):
            rows = read_columns(
                path, table, TEXT_COLUMNS, IMAGE_COLUMNS, ("Intersection_exist",), "GEdit-Bench"
            )
            for row in rows:
                language = row["instruction_language"]
                if language not in ("en", "cn"):
                    raise ValueError(
                        f"GEdit-Bench {path}, row {row['row']}: instruction_language "
                        f"{language!r} is neither 'en' nor 'cn'"
                    )
                if self.language != "all" and language != self.language:
                    continue
                if self.subset == "intersection" and not row["Intersection_exist"]:
                    continue
                records.append(
                    {
                        "id": sample_id(row["task_type"], language, row["key"]),
                        "source": f"{path}[row {row['row']}].{self.source_column}",
                        "instruction": row["instruction"],
                        "task_type": row["task_type"],
                        "category": row["task_type"],
                        "table": index,
                        "row": row["row"],
                        "columns": {"source": self.source_column},
                    }
                )
        check_unique(records, "GEdit-Bench")
        return records

    def dataset_kwargs(self, split: str) -> dict[str, Any]:
        return {"tables": self.tables()}

    def prediction_path(self, sample_id: str) -> str:
        """The release's layout: ``fullset/<task_type>/<language>/<key>.png``."""
        _, task_type, language, key = sample_id.split("/", 3)
        return f"fullset/{task_type}/{language}/{key}.png"
