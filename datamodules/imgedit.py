"""ImgEdit-Bench's basic single-turn suite (Ye et al., "ImgEdit: A Unified Image Editing Dataset
and Benchmark", arXiv 2505.20275), read in the layout of its release.

Layout (PKU-YuanGroup/ImgEdit, ``Benchmark/Basic/basic_bench_readme.md`` and
``basic_bench.py``): ``basic_edit.json`` = ``{key: {"id": "<folder>/<file>.jpg", "prompt": ...,
"edit_type": ...}}`` (737 entries at the repository's head, commit 547185d; keys are strings of
integers) and a folder of original images ``origin_img_root`` holding ``<id>`` (folders
``animal``, ``architecture``, ``clothes``, ``compose``, ``daily object``, ``for_add``,
``human``, ``style``, ``transport``; the images come in the Hub's ``Benchmark.tar``). The
official evaluation reads the edited image of ``key`` as ``<result_img_folder>/<key>.png``
(``prediction_path``), sends the original and the edit with the ``edit_type``'s prompt from
``prompts.json`` to the judge (GPT-4o in ``basic_bench.py``), averages the three 1-5 scores per
image (``step1_get_avgscore.py``) and then per edit type (``step2_typescore.py``).

Edit types (``prompts.json`` keys): add, remove, replace, adjust, action, style, background,
extract, compose; the first release of the file (commit c14480a) spelled ``adjust`` as
``alter``, read here as ``adjust``.

Samples: ``id`` = ``imgedit/<key>``, ``source`` = ``root / <id>``, ``instruction`` = ``prompt``,
``category`` = the edit type (it picks the judge's prompt, :mod:`metrics.judge.imgedit`);
no targets (the ``imgedit`` protocol is judge-scored afterwards, ``judge: imgedit``). An entry
that is not an object, lacks a key or names an unknown edit type is an error naming the file and
key.
"""

from __future__ import annotations

import json
from pathlib import Path

from .base import EditDataModule
from .hf_table import check_unique

DATASET = "imgedit"
#: The basic suite's edit types (``Benchmark/Basic/prompts.json``).
EDIT_TYPES = (
    "add",
    "remove",
    "replace",
    "adjust",
    "action",
    "style",
    "background",
    "extract",
    "compose",
)
#: Former names -> current ones.
RENAMED_TYPES = {"alter": "adjust"}
ENTRY_KEYS = ("id", "prompt", "edit_type")
#: Entries of basic_edit.json at the repository's head (commit 547185d).
RELEASE_COUNT = 737


def read_edit_json(path: Path) -> dict[str, dict]:
    """``{key: entry}`` of a ``basic_edit.json``; errors name the file and key."""
    if not path.is_file():
        raise FileNotFoundError(f"ImgEdit edit file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object {{key: entry}}, got {type(data).__name__}")
    for key, entry in data.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{path}, key {key!r}: expected an object, got {type(entry).__name__}")
        for name in ENTRY_KEYS:
            value = entry.get(name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{path}, key {key!r}: missing or empty {name!r}")
        kind = RENAMED_TYPES.get(entry["edit_type"], entry["edit_type"])
        if kind not in EDIT_TYPES:
            raise ValueError(
                f"{path}, key {key!r}: unknown edit_type {entry['edit_type']!r} (known: "
                f"{', '.join(EDIT_TYPES)})"
            )
    return data


class ImgEditBenchDataModule(EditDataModule):
    """ImgEdit-Bench's basic single-turn suite (see the module docstring) as the "test" split.

    Args:
        root: the folder of original images (the official ``origin_img_root``).
        resolution: side of the square model input.
        edit_json: the suite's ``basic_edit.json``, relative to ``root`` or absolute.
        **kwargs: the shared :class:`EditDataModule` fields.
    """

    protocol = "imgedit"
    published_counts = {"test": RELEASE_COUNT}

    def __init__(
        self,
        root: str,
        resolution: int = 512,
        edit_json: str = "basic_edit.json",
        random_flip: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(root=root, resolution=resolution, random_flip=random_flip, **kwargs)
        self.edit_json = edit_json

    def edit_json_path(self) -> Path:
        return Path(self.root) / self.edit_json  # an absolute edit_json stays as it is

    def build_records(self, split: str) -> list[dict]:
        if split != "test":
            raise ValueError(f"ImgEdit-Bench has only a 'test' split, got {split!r}")
        entries = read_edit_json(self.edit_json_path())
        records = [
            {
                "id": f"{DATASET}/{key}",
                "source": str(Path(self.root) / entry["id"]),
                "instruction": entry["prompt"],
                "edit_type": RENAMED_TYPES.get(entry["edit_type"], entry["edit_type"]),
                "category": RENAMED_TYPES.get(entry["edit_type"], entry["edit_type"]),
            }
            for key, entry in entries.items()
        ]
        check_unique(records, "ImgEdit")
        return records

    def prediction_path(self, sample_id: str) -> str:
        """The official result name ``<key>.png`` of ``imgedit/<key>``."""
        return f"{sample_id.split('/', 1)[1]}.png"
