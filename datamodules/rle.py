"""COCO run-length encoded (RLE) masks, decoded with numpy (no pycocotools).

A COCO RLE is `{"size": [h, w], "counts": ...}`. The mask is read in column-major order
(down the first column, then the next), and `counts` gives the lengths of alternating runs of
0 and 1, starting with 0 (a mask that starts with 1 has a leading run of length 0). The runs
must cover all h*w pixels.

`counts` comes in two forms:

- uncompressed: a list of ints, the run lengths themselves;
- compressed: a string (or bytes) of printable characters, one run length after another. Each
  character is `48 + c` for a 6-bit chunk `c`: its low 5 bits carry data (least significant
  chunk first), bit 0x20 says that another chunk follows, and in the last chunk bit 0x10 is
  the sign (the value is sign-extended from there). From the fourth run on (index > 2), a
  value is stored as the difference from the run two places before it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def decode_counts_string(counts: str | bytes) -> list[int]:
    """Run lengths from the compressed COCO `counts` string (see module docstring)."""
    data = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    runs: list[int] = []
    pos = 0
    while pos < len(data):
        value = 0
        shift = 0
        while True:
            if pos >= len(data):
                raise ValueError("RLE counts string ends inside a value")
            chunk = data[pos] - 48
            if not 0 <= chunk < 64:
                raise ValueError(f"invalid character {chr(data[pos])!r} in RLE counts string")
            pos += 1
            value |= (chunk & 0x1F) << shift
            shift += 5
            if not chunk & 0x20:
                if chunk & 0x10:  # negative: sign-extend from the last chunk's top data bit
                    value -= 1 << shift
                break
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def decode_rle(rle: dict) -> np.ndarray:
    """Decode one COCO RLE dict into a [h, w] uint8 array of 0/1.

    Raises ValueError when the dict is malformed: no `size`/`counts`, a negative run, or runs
    that do not add up to h*w.
    """
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError("an RLE must be a dict with 'size' and 'counts'")
    size = rle["size"]
    if not isinstance(size, Sequence) or len(size) != 2:
        raise ValueError(f"RLE size must be [h, w], got {size!r}")
    h, w = (int(v) for v in size)
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        runs = decode_counts_string(counts)
    elif isinstance(counts, Iterable):
        runs = [int(v) for v in counts]
    else:
        raise ValueError(f"RLE counts must be a list or a string, got {type(counts).__name__}")
    runs_array = np.asarray(runs, dtype=np.int64)
    if (runs_array < 0).any():
        raise ValueError("RLE has a negative run length")
    if int(runs_array.sum()) != h * w:
        raise ValueError(f"RLE runs cover {int(runs_array.sum())} pixels, size {h}x{w} has {h * w}")
    values = (np.arange(len(runs_array)) % 2).astype(np.uint8)  # 0, 1, 0, 1, ...
    flat = np.repeat(values, runs_array)
    return flat.reshape((w, h)).T.copy()  # column-major → [h, w]


def union_rles(rles: Sequence[dict], ids: Sequence[int] | None = None) -> np.ndarray:
    """The union (logical or) of the RLEs selected by `ids` (all when None), as [h, w] uint8.

    All selected RLEs must have the same size. Raises IndexError for an id out of range and
    ValueError for an empty selection or mismatched sizes.
    """
    if ids is None:
        ids = range(len(rles))
    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError("no RLE selected")
    for i in ids:
        if not 0 <= i < len(rles):
            raise IndexError(f"mask id {i} out of range: the file has {len(rles)} RLE(s)")
    union = None
    for i in dict.fromkeys(ids):
        mask = decode_rle(rles[i])
        if union is None:
            union = mask
        elif union.shape != mask.shape:
            raise ValueError(f"RLE sizes differ: {union.shape} and {mask.shape}")
        else:
            union |= mask
    return union
