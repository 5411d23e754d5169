"""GIER (Grounded Image Editing Requests, Shi et al. 2021) in its native layout.

```
root/
  images/<name>                 input and output images (`images_dir`)
  masks/<input stem>_mask.json  COCO RLE candidate masks of the input (`masks_dir`; a
                                separate download, may be absent)
  splits/{train,val,test}_sess_3.json
  splits/{split}_{global,shapeAlign,shapeAlignNonCrop,Ids_L1Thr_0.06}_sess_3.json  (subsets)
```

A split file is a JSON list of image pairs, each with `input`, `output` (file names under
`images_dir`), `request`, `detailed_request` (the bare `NaN` literal when there is none;
Python's `json` reads it as float NaN, treated here as absent), `dataset`, `operator`
(`{op_name: {"local": bool, "ids": [mask indices]}}`) and `expert_summary` /
`amateur_summary` (lists of strings). As in the original GIER loader, every summary string is
one sample, its `instruction`; so a pair gives as many samples as it has summaries. Sample id:
`gier/<output stem>/<expert|amateur>/<k>`, named by the OUTPUT image: the release reuses an
input image in several pairs (949 train inputs in two or more), every output name is unique.

Published counts (session 3): 4,943 / 618 / 618 pairs and 23,898 / 3,004 / 2,969 samples for
train / val / test.

Masks: a mask file is a JSON list of COCO RLEs (`{"size": [h, w], "counts": ...}`, compressed
string or uncompressed list), decoded by pycocotools as T2ONet does, one per candidate region;
a local operator's `ids` index that list. A sample's `mask` is the union over its local
operators of the regions they name (a local operator without an `ids` key takes every region;
a file holding a single RLE dict is a list of one). Local operators whose `ids` are all `[]`
(27 / 4 / 1 entries in the release) give an empty mask, as T2ONet's `resize_and_union_mask`
does, without reading the file. A pair without a local operator edits the whole image: its
mask is all ones and its mask file is not read. A mask whose size differs from the input
image is resized to it (nearest, T2ONet's `cv2.INTER_NEAREST`).

Masks of a split are all or nothing (a batch stacks masks, so it needs one in every sample or
in none): when a local pair that needs a mask file has none (e.g. no `masks/` folder), no
sample of the split gets a `mask`, with a warning naming how many files are missing; with
`require_masks` it is an error instead, when the split is built.

Inputs and outputs of different sizes (1,164 / 130 / 164 pairs, those absent from the
`shapeAlign` index): the output is resized to the input's size as T2ONet's loader does (see
`datamodules.native.align_to_source`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .base import BadSampleError, EditDataModule, EditDataset, read_json_list
from .rle import union_rles

log = logging.getLogger(__name__)

#: Published sizes: pairs and samples (one per summary string) per split, session 3.
PUBLISHED_PAIRS = {"train": 4943, "val": 618, "test": 618}
PUBLISHED_SAMPLES = {"train": 23898, "val": 3004, "test": 2969}
#: `subsets` names (the GIER paper's / original loader's data modes) → split-file infix.
SUBSET_FILES = {
    "global": "global",
    "shapeAlign": "shapeAlign",
    "shapeAlign_nonCrop": "shapeAlignNonCrop",
    "valid": "Ids_L1Thr_0.06",
}
#: (id part, record key) of the summaries, in sample order.
SUMMARY_KINDS = (("expert", "expert_summary"), ("amateur", "amateur_summary"))
GIER_REQUIRED_KEYS = ("input", "output", "operator", "expert_summary", "amateur_summary")


def is_missing(value: Any) -> bool:
    """None or a float NaN (GIER's bare `NaN` literal)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def load_rle_file(path: str | Path) -> list[dict]:
    """The RLEs of a GIER mask file: a JSON list of RLE dicts (a single dict is a list of one)."""
    with Path(path).open(encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ValueError(f"expected a list of RLEs, got {type(data).__name__}")
    return data


class GIERDataset(EditDataset):
    """EditDataset that builds `mask` from a GIER RLE file instead of reading an 8-bit image.

    A record with `mask_global` True gets an all-ones mask of the input's size; one with
    `mask_ids` (a list, or None for every region) gets the union of those RLEs from the file
    at `mask`, resized (nearest) to the input's size; `mask_ids == []` is an empty mask (the
    file is not read). Records without these fields fall back
    to the base behaviour. Decoding problems raise BadSampleError naming the file, split, row
    and id, like an unreadable image.
    """

    def _load(self, index: int, key: str, mode: str) -> torch.Tensor:
        record = self.records[index]
        if key != "mask" or "mask_global" not in record:
            return super()._load(index, key, mode)
        path = record["mask"]
        try:
            with Image.open(record["source"]) as image:
                width, height = image.size  # header only
            if record["mask_global"]:
                mask = np.ones((height, width), dtype=np.uint8)
            elif record.get("mask_ids") == []:
                mask = np.zeros((height, width), dtype=np.uint8)
            else:
                mask = union_rles(load_rle_file(path), record.get("mask_ids"))
                if mask.shape != (height, width):
                    resized = Image.fromarray(mask * 255).resize((width, height), Image.NEAREST)
                    mask = (np.asarray(resized) >= 128).astype(np.uint8)
        except (OSError, ValueError, TypeError, KeyError, IndexError) as err:
            raise BadSampleError(
                f"cannot read mask {path} (split {self.split!r}, row {index}, "
                f"id {record.get('id')!r}): {type(err).__name__}: {err}"
            ) from err
        return torch.from_numpy(mask * 255)[None]


class GIERDataModule(EditDataModule):
    """GIER image-editing requests with grounded masks (layout and counts: module docstring).

    Args:
        root: GIER folder (holding `splits/`, `images/`, `masks/`).
        resolution: side of the square crops fed to the model.
        random_flip: horizontal flip probability for training. 0 by default because local
            requests can name sides ("remove the man on the left"), which a flip makes wrong.
        images_dir: folder of the input/output images, relative to `root` (or absolute).
        masks_dir: folder of the `<input stem>_mask.json` RLE files, relative to `root`.
        session: annotation session of the split files (`{split}_sess_{session}.json`).
        require_masks: raise when a pair with a local operator has no mask file (by default
            no sample of that split gets a `mask`, with a warning: module docstring).
        operators: keep only pairs with at least one of these operator names (e.g.
            `["brightness", "inpaint_obj"]`); None keeps all.
        local_only: True keeps pairs with a local operator, False pairs whose operators are
            all global; None keeps both.
        subsets: the original loader's data modes, intersected: "global", "shapeAlign",
            "shapeAlign_nonCrop", "valid" (pair indices read from
            `splits/{split}_<mode>_sess_{session}.json`); None keeps all.
        **kwargs: the shared :class:`EditDataModule` fields (batch sizes, workers, crop,
            `max_samples`, `on_bad_sample`, `predict_split`, `expressive_path`, ...).
    """

    protocol = "gier"
    published_counts = PUBLISHED_SAMPLES
    dataset_class = GIERDataset

    def __init__(
        self,
        root: str,
        resolution: int = 256,
        random_flip: float = 0.0,
        images_dir: str = "images",
        masks_dir: str = "masks",
        session: int = 3,
        require_masks: bool = False,
        operators: list[str] | None = None,
        local_only: bool | None = None,
        subsets: list[str] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(root=root, resolution=resolution, random_flip=random_flip, **kwargs)
        unknown = sorted(set(subsets or ()) - set(SUBSET_FILES))
        if unknown:
            raise ValueError(f"unknown GIER subsets {unknown}; choose from {list(SUBSET_FILES)}")
        self.images_dir = images_dir
        self.masks_dir = masks_dir
        self.session = session
        self.require_masks = require_masks
        self.operators = list(operators) if operators is not None else None
        self.local_only = local_only
        self.subsets = list(subsets) if subsets is not None else None

    def split_path(self, split: str, infix: str | None = None) -> Path:
        name = f"{split}_{infix}" if infix else split
        return Path(self.root) / "splits" / f"{name}_sess_{self.session}.json"

    def _subset_rows(self, split: str) -> set[int] | None:
        """Pair indices allowed by `subsets` (intersection), or None for all."""
        if not self.subsets:
            return None
        allowed: set[int] | None = None
        for name in self.subsets:
            path = self.split_path(split, SUBSET_FILES[name])
            rows = {int(i) for i in read_json_list(path, f"GIER {name!r} subset file")}
            allowed = rows if allowed is None else allowed & rows
        return allowed

    def build_records(self, split: str) -> list[dict]:
        """One record per summary string of the pairs of `split` that pass the filters.

        Raises FileNotFoundError for a missing split/subset file (or, with `require_masks`, a
        missing mask file) and ValueError naming the file and row for a malformed pair
        (missing key, wrong type, an output stem seen twice).
        """
        path = self.split_path(split)
        pairs = read_json_list(path)
        root = Path(self.root)
        images, masks = root / self.images_dir, root / self.masks_dir
        allowed = self._subset_rows(split)
        wanted_ops = set(self.operators) if self.operators is not None else None
        seen: dict[str, int] = {}
        records: list[dict] = []
        missing_masks: list[str] = []
        for row, pair in enumerate(pairs):
            where = f"{path}, row {row}"
            if not isinstance(pair, dict):
                raise ValueError(f"{where}: expected a JSON object")
            for key in GIER_REQUIRED_KEYS:
                if key not in pair:
                    raise ValueError(f"{where}: missing required key {key!r}")
            operator = pair["operator"]
            if not isinstance(operator, dict) or not all(
                isinstance(v, dict) for v in operator.values()
            ):
                raise ValueError(f"{where}: 'operator' must map names to {{local, ids}} objects")
            stem = Path(str(pair["input"])).stem
            out_stem = Path(str(pair["output"])).stem
            if out_stem in seen:
                raise ValueError(
                    f"{where}: output {out_stem!r} already used in row {seen[out_stem]}"
                )
            seen[out_stem] = row

            local_ops = [name for name, spec in operator.items() if spec.get("local")]
            if allowed is not None and row not in allowed:
                continue
            if wanted_ops is not None and not wanted_ops & set(operator):
                continue
            if self.local_only is not None and bool(local_ops) != self.local_only:
                continue

            mask: dict[str, Any] = {}
            mask_path = masks / f"{stem}_mask.json"
            ids: list[int] | None = []
            for name in local_ops:
                op_ids = operator[name].get("ids")
                if is_missing(op_ids):
                    ids = None  # every region in the file
                    break
                if not isinstance(op_ids, list):
                    raise ValueError(f"{where}: operator {name!r} 'ids' must be a list")
                ids.extend(int(i) for i in op_ids)
            if not local_ops:
                mask = {"mask": str(mask_path), "mask_global": True}
            elif ids == [] or mask_path.is_file():  # every local `ids` empty: an empty mask
                mask = {"mask": str(mask_path), "mask_global": False, "mask_ids": ids}
            elif self.require_masks:
                raise FileNotFoundError(
                    f"mask file {mask_path} not found ({where}, input {pair['input']!r}, "
                    "require_masks=True)"
                )
            else:
                missing_masks.append(str(mask_path))

            detailed = pair.get("detailed_request")
            request = pair.get("request")
            common = {
                "source": str(images / str(pair["input"])),
                "target": str(images / str(pair["output"])),
                **mask,
                "request": None if is_missing(request) else str(request),
                "detailed_request": None if is_missing(detailed) else str(detailed),
                "dataset": None if is_missing(pair.get("dataset")) else str(pair["dataset"]),
                "operators": list(operator),
                "local": bool(local_ops),
                "pair_row": row,
            }
            for kind, key in SUMMARY_KINDS:
                summaries = pair[key]
                if is_missing(summaries):
                    continue
                if not isinstance(summaries, list):
                    raise ValueError(f"{where}: {key!r} must be a list of strings")
                for k, text in enumerate(summaries):
                    if is_missing(text):
                        continue
                    if not isinstance(text, str):
                        raise ValueError(f"{where}: {key}[{k}] is not a string: {text!r}")
                    records.append(
                        {"id": f"gier/{out_stem}/{kind}/{k}", "instruction": text, **common}
                    )
        if missing_masks:
            log.warning(
                "GIER %s: %d local pair(s) have no mask file (e.g. %s); no sample of the split "
                "gets a mask (a batch needs masks in all samples or none); require_masks=True "
                "makes this an error",
                split,
                len(missing_masks),
                missing_masks[0],
            )
            for record in records:
                for key in ("mask", "mask_global", "mask_ids"):
                    record.pop(key, None)
        return records
