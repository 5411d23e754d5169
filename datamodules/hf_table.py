"""Benchmarks released as Hugging Face tables: parquet shards (``Dataset.to_parquet``, the Hub's
``data/<split>-*.parquet``) or Arrow files (``save_to_disk``), images stored as ``{bytes, path}``
structs (the ``datasets.Image`` feature).

:func:`open_tables` opens the files from local paths only (parquet through ``datasets``, which
memory-maps an Arrow copy under ``cache_dir``; Arrow files memory-mapped as they are) and checks
their columns; :func:`read_columns` reads the text columns and names the file and row of a null
or empty value; :class:`TableDataset` decodes a record's images from its table row (MagicBrush's
train/dev shards, Emu Edit, GEdit-Bench).
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from datamodules.decode import decode

from .base import BadSampleError, EditDataset


def table_files(root: str | Path, pattern: str, what: str) -> list[str]:
    """Sorted files matching ``pattern`` (relative to ``root``, or absolute; ``**`` recurses);
    FileNotFoundError naming the pattern when none match."""
    full = str(Path(root) / pattern)
    paths = sorted(glob.glob(full, recursive=True))
    if not paths:
        raise FileNotFoundError(f"no {what} files match {full}")
    return paths


def open_table(path: str, cache_dir: str | None = None) -> Any:
    """A ``datasets.Dataset`` over one local ``.parquet`` or ``.arrow`` file."""
    import datasets

    if path.endswith(".arrow"):
        return datasets.Dataset.from_file(path)  # memory-mapped in place
    return datasets.load_dataset("parquet", data_files=[path], split="train", cache_dir=cache_dir)


def open_tables(
    paths: Sequence[str], columns: Sequence[str], what: str, cache_dir: str | None = None
) -> list[tuple[str, Any]]:
    """``(path, table)`` per file; a file lacking one of ``columns`` is an error naming it."""
    opened = []
    for path in paths:
        table = open_table(path, cache_dir)
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise ValueError(
                f"{what} file {path} lacks column(s) {missing} (has {table.column_names})"
            )
        opened.append((path, table))
    return opened


def read_columns(
    path: str,
    table: Any,
    text: Sequence[str],
    images: Sequence[str] = (),
    other: Sequence[str] = (),
    what: str = "",
) -> list[dict[str, Any]]:
    """One dict per row of the ``text`` and ``other`` columns, with ``row``.

    A null or blank ``text`` value, a null ``other`` value or a null image struct is a
    ValueError naming the file, the row and the column (images stay undecoded).
    """
    import pyarrow.compute as pc

    data = table.data
    values = {name: data.column(name).to_pylist() for name in (*text, *other)}
    for name in images:
        nulls = pc.is_null(data.column(name)).to_pylist()
        if any(nulls):
            raise ValueError(
                f"{what} {path}, row {nulls.index(True)}: column {name!r} holds no image"
            )
    rows = []
    for row in range(data.num_rows):
        record = {"row": row}
        for name in text:
            value = values[name][row]
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{what} {path}, row {row}: column {name!r} is empty ({value!r})")
            record[name] = value
        for name in other:
            value = values[name][row]
            if value is None:
                raise ValueError(f"{what} {path}, row {row}: column {name!r} is null")
            record[name] = value
        rows.append(record)
    return rows


class TableDataset(EditDataset):
    """EditDataset whose records may point into table rows instead of files.

    A record with ``table`` (index into ``tables``), ``row`` and ``columns`` (record key ->
    image column, e.g. ``{"source": "image"}``) has those images decoded from the row's
    ``{bytes, path}`` struct (a path alone is relative to the file); other keys and records load
    files as :class:`EditDataset` does.

    Args:
        records: as for EditDataset, plus ``table``/``row``/``columns`` for table rows.
        transform: torchvision v2 transform applied to (source, target, mask) together.
        split: split name, used in error messages.
        on_bad_sample: "error" raises BadSampleError; "skip" returns a SkippedSample.
        tables: ``(path, datasets.Dataset)`` per file, as :func:`open_tables` returns them.
    """

    def __init__(
        self,
        records: list[dict],
        transform,
        split: str,
        on_bad_sample: Literal["error", "skip"] = "error",
        tables: Sequence[tuple[str, Any]] = (),
    ) -> None:
        super().__init__(records, transform, split, on_bad_sample)
        self.tables = list(tables)

    def _load(self, index: int, key: str, mode: str) -> torch.Tensor:
        record = self.records[index]
        column = (record.get("columns") or {}).get(key)
        if record.get("table") is None or column is None:
            return super()._load(index, key, mode)
        path, table = self.tables[record["table"]]
        row = record["row"]
        where = (
            f"{path}, row {row}, column {column!r} (split {self.split!r}, id {record.get('id')!r})"
        )
        try:
            value = table.data.column(column)[row].as_py()  # one memory-mapped cell
            if value is None:
                raise ValueError("no image stored")
            if value.get("bytes") is not None:
                return decode(value["bytes"], mode)
            if value.get("path"):
                return decode(Path(path).parent / value["path"], mode)
            raise ValueError("neither bytes nor a path stored")
        except (OSError, ValueError, SyntaxError) as err:
            raise BadSampleError(
                f"cannot read {key} image at {where}: {type(err).__name__}: {err}"
            ) from err


def check_unique(records: Sequence[dict], what: str) -> None:
    """A ValueError listing ids that occur more than once."""
    seen: dict[str, int] = {}
    for record in records:
        seen[record["id"]] = seen.get(record["id"], 0) + 1
    duplicates = sorted(i for i, n in seen.items() if n > 1)
    if duplicates:
        raise ValueError(f"duplicate {what} ids: {duplicates[:10]}")
