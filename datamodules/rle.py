"""COCO run-length encoded (RLE) masks, decoded by `pycocotools` (the COCO API's decoder).

A COCO RLE is `{"size": [h, w], "counts": ...}`: run lengths of alternating 0s and 1s (0s
first) over the mask read in column-major order, `counts` either a list of ints
(uncompressed) or COCO's compressed string. GIER's mask files are lists of such RLEs, written
by pycocotools and read by T2ONet with `pycocotools.mask.decode` (`data/GIER/GIER.py`).

pycocotools does not check that the runs cover exactly h*w pixels (a short list leaves part of
the output uninitialised), so this module checks first: an uncompressed list must sum to h*w,
and a compressed string must be the canonical encoding of what it decodes to (re-encoding the
decoded mask gives the same string, as it does for every string pycocotools writes).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from pycocotools import mask as mask_utils


def _size(rle: dict) -> tuple[int, int]:
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError("an RLE must be a dict with 'size' and 'counts'")
    size = rle["size"]
    if not isinstance(size, Sequence) or isinstance(size, str) or len(size) != 2:
        raise ValueError(f"RLE size must be [h, w], got {size!r}")
    h, w = (int(v) for v in size)
    if h < 0 or w < 0:
        raise ValueError(f"RLE size must be non-negative, got {size!r}")
    return h, w


def compressed(rle: dict) -> dict:
    """The RLE in pycocotools' compressed form `{"size": [h, w], "counts": bytes}`, checked.

    Raises ValueError for a malformed RLE: no `size`/`counts`, negative or non-covering runs,
    an undecodable or non-canonical counts string.
    """
    h, w = _size(rle)
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        data = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
        out = {"size": [h, w], "counts": data}
        decoded = mask_utils.decode(out)  # ValueError for an invalid string
        if mask_utils.encode(np.asfortranarray(decoded))["counts"] != data:
            raise ValueError(f"RLE counts string does not describe a {h}x{w} mask")
        return out
    if not isinstance(counts, Iterable):
        raise ValueError(f"RLE counts must be a list or a string, got {type(counts).__name__}")
    runs = [int(v) for v in counts]
    if any(v < 0 for v in runs):
        raise ValueError("RLE has a negative run length")
    if sum(runs) != h * w:
        raise ValueError(f"RLE runs cover {sum(runs)} pixels, size {h}x{w} has {h * w}")
    return mask_utils.frPyObjects({"size": [h, w], "counts": runs}, h, w)


def decode_rle(rle: dict) -> np.ndarray:
    """One COCO RLE (either form) as a [h, w] uint8 array of 0/1 (see `compressed`)."""
    return np.ascontiguousarray(mask_utils.decode(compressed(rle)), dtype=np.uint8)


def union_rles(
    rles: Sequence[dict], ids: Sequence[int] | None = None, size: tuple[int, int] | None = None
) -> np.ndarray:
    """The union of the RLEs selected by `ids` (all when None) as a [h, w] uint8 0/1 array.

    An empty selection is an empty mask (T2ONet's `resize_and_union_mask` of `"ids": []`), of
    the file's RLE size, or of `size` when the file has none. Raises IndexError for an id out
    of range and ValueError for mismatched sizes or a malformed RLE.
    """
    if ids is None:
        ids = range(len(rles))
    ids = list(dict.fromkeys(int(i) for i in ids))
    for i in ids:
        if not 0 <= i < len(rles):
            raise IndexError(f"mask id {i} out of range: the file has {len(rles)} RLE(s)")
    if not ids:
        shape = _size(rles[0]) if rles else size
        if shape is None:
            raise ValueError("no RLE selected and no size to give an empty mask")
        return np.zeros(shape, np.uint8)
    selected = [compressed(rles[i]) for i in ids]
    sizes = {tuple(r["size"]) for r in selected}
    if len(sizes) > 1:
        raise ValueError(f"RLE sizes differ: {sorted(sizes)}")
    merged = mask_utils.merge(selected, intersect=False) if len(selected) > 1 else selected[0]
    return np.ascontiguousarray(mask_utils.decode(merged), dtype=np.uint8)
