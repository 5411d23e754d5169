"""Scoring at the ground truth's native resolution, as MagicBrush's evaluation script does.

MagicBrush's ``evaluation/image_eval.py`` reads the generated image from the PNG the model
wrote (8-bit), resizes it to the ground truth's size with ``gen.resize(gt.size)`` (Pillow's
default filter for RGB images, BICUBIC) and scores the whole image (``ToTensor()``, then
``abs(gen - gt).mean()`` per image for L1). The suite does the same in memory:

1. the prediction (model resolution, ``[-1, 1]``) is quantised to 8 bits exactly as the
   suite's prediction writer saves it (``torchvision.utils.save_image`` on ``(x + 1) / 2``:
   ``x * 255 + 0.5``, clamped to ``[0, 255]``, truncated);
2. it is resized with PIL itself (``Image.resize(size, Image.BICUBIC)``, the reference's
   filter) to the size of the batch's ``target_native`` (uint8 ``[3, H, W]``, as decoded from
   the dataset's file, never resized or cropped);
3. every metric then sees the whole native images; the copy-the-input baseline uses
   ``source_native`` (resized the same way when its size differs from the target's), and
   masked metrics ``mask_native`` (uint8 {0, 1} ``[1, H, W]``).

How a non-square input was fed to the model (the DataModule's ``eval_resize``) is undone with
two optional per-sample batch keys, ``(top, left, height, width)`` boxes: ``model_box``, the
region of the model's square input that holds the image (the letterbox content for ``pad``;
the whole square otherwise), is cut out of the quantised prediction before the resize, and
``native_box``, the region of the native image the model saw (the centre crop for
``center_crop``; the whole image otherwise), is cut out of the native target, source and mask,
which are then scored. Without the keys the whole prediction meets the whole target (the
``resize`` mode).

Native sizes differ across samples, so the samples of a batch are grouped by size and each
group updates the metrics as one stacked batch. Images are handed to the metrics in the
suite's ``[-1, 1]`` convention (``u8 / 127.5 - 1``; the metrics map back to ``u8 / 255``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

#: Batch keys of the native images (lists, one entry per sample).
NATIVE_KEYS = ("source_native", "target_native", "mask_native")

#: What native scoring does, in words (the results' protocol block).
NATIVE_DESCRIPTION = (
    "prediction quantised to 8 bits as the suite saves it (save_image: x*255+0.5, clamped), "
    "resized to the native ground truth's size with PIL Image.resize (BICUBIC, the default "
    "filter for RGB in MagicBrush's evaluation/image_eval.py) and scored on the whole native "
    "image; copy baseline = the native source (PIL bicubic to the target's size if it differs)"
)


def has_native(batch: dict) -> bool:
    """Whether the batch carries native targets (the DataModule's evaluation collate)."""
    return isinstance(batch.get("target_native"), (list, tuple))


def quantise(images: Tensor) -> Tensor:
    """``[B, 3, H, W]`` images in ``[-1, 1]`` -> uint8, as ``torchvision.utils.save_image``
    writes ``(x + 1) / 2`` (``mul(255).add_(0.5).clamp_(0, 255)``, then truncation)."""
    unit = (images.detach().float() + 1) / 2
    return unit.mul(255).add(0.5).clamp(0, 255).to(torch.uint8)


def pil_resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    """uint8 ``[C, H, W]`` resized to ``size = (H, W)`` by PIL bicubic (a copy at equal size,
    as ``Image.resize`` returns)."""
    height, width = size
    if tuple(image.shape[-2:]) == (height, width):
        return image.clone()
    array = image.permute(1, 2, 0).contiguous().cpu().numpy()
    pil = Image.fromarray(array if array.shape[-1] == 3 else array[..., 0])  # RGB or L
    resized = np.asarray(pil.resize((width, height), Image.Resampling.BICUBIC))
    if resized.ndim == 2:
        resized = resized[..., None]
    return torch.from_numpy(resized.copy()).permute(2, 0, 1)


def _uint8(value: Any, key: str, sample: str) -> Tensor:
    if not isinstance(value, Tensor) or value.ndim != 3:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(
            f"batch key {key!r} of sample {sample!r}: expected a [C, H, W] tensor, got {shape}"
        )
    if value.dtype != torch.uint8:
        raise ValueError(
            f"batch key {key!r} of sample {sample!r}: expected uint8, got {value.dtype}"
        )
    return value


def _box(
    batch: dict, key: str, row: int, sample: str, size: tuple[int, int]
) -> tuple[int, int, int, int] | None:
    """Sample ``row``'s ``(top, left, height, width)`` box under ``key``, checked to lie in an
    image of ``size``; None when the batch has no such key."""
    boxes = batch.get(key)
    if boxes is None:
        return None
    value = boxes[row]
    box = tuple(int(v) for v in (value.tolist() if isinstance(value, Tensor) else value))
    top, left, height, width = box if len(box) == 4 else (-1, -1, 0, 0)
    if (
        top < 0
        or left < 0
        or height < 1
        or width < 1
        or top + height > size[0]
        or left + width > size[1]
    ):
        raise ValueError(
            f"batch key {key!r} of sample {sample!r}: {box} is not a (top, left, height, width) "
            f"box inside the {size[0]}x{size[1]} image"
        )
    return box


def _crop(image: Tensor, box: tuple[int, int, int, int]) -> Tensor:
    top, left, height, width = box
    return image[..., top : top + height, left : left + width]


def to_signed(images: Tensor, device: torch.device) -> Tensor:
    """uint8 images -> float32 in ``[-1, 1]`` (``u8 / 127.5 - 1``) on ``device``."""
    return images.to(device=device, dtype=torch.float32) / 127.5 - 1.0


class NativeBatch:
    """The native images of one batch, prepared once and grouped by size per aggregation.

    Args:
        batch: the collated batch (with ``target_native`` and usually ``source_native``,
            ``mask_native``).
        preds: the model's edits ``[B, 3, h, w]`` in ``[-1, 1]``.
    """

    def __init__(self, batch: dict, preds: Tensor) -> None:
        self.device = preds.device
        ids = [str(i) for i in (batch.get("id") or range(len(preds)))]
        targets = list(batch["target_native"])
        if len(targets) != len(preds):
            raise ValueError(
                f"batch key 'target_native' holds {len(targets)} images for {len(preds)} "
                "predictions"
            )
        sources = batch.get("source_native")
        masks = batch.get("mask_native")
        quantised = quantise(preds).cpu()
        self.boxes = 0
        self.preds: list[Tensor] = []
        self.targets: list[Tensor] = []
        self.sources: list[Tensor | None] = []
        self.masks: list[Tensor | None] = []
        for i, sample in enumerate(ids):
            target = _uint8(targets[i], "target_native", sample)
            full = tuple(target.shape[-2:])
            source = sources[i] if isinstance(sources, (list, tuple)) else None
            if source is not None:
                source = pil_resize(_uint8(source, "source_native", sample), full)
            mask = masks[i] if isinstance(masks, (list, tuple)) else None
            if mask is not None:
                mask = _uint8(mask, "mask_native", sample)
                if tuple(mask.shape[-2:]) != full:
                    raise ValueError(
                        f"sample {sample!r}: mask_native is {tuple(mask.shape[-2:])}, its "
                        f"target_native {full}"
                    )
            prediction = quantised[i]
            model_box = _box(batch, "model_box", i, sample, tuple(prediction.shape[-2:]))
            native_box = _box(batch, "native_box", i, sample, full)
            if model_box is not None:
                prediction = _crop(prediction, model_box)
            if native_box is not None:
                target, source, mask = (
                    _crop(x, native_box) if x is not None else None for x in (target, source, mask)
                )
            self.boxes += model_box is not None or native_box is not None
            self.targets.append(target)
            self.preds.append(pil_resize(prediction, tuple(target.shape[-2:])))
            self.sources.append(source)
            self.masks.append(mask)

    def groups(self, rows: Sequence[int]) -> list[tuple[list[int], dict[str, Tensor | None]]]:
        """``[(rows of one native size, {"preds", "target", "source", "mask"}), ...]`` in
        first-seen order; ``source``/``mask`` are None where a sample of the group lacks one."""
        by_size: dict[tuple[int, int], list[int]] = {}
        for row in rows:
            by_size.setdefault(tuple(self.targets[row].shape[-2:]), []).append(row)
        out = []
        for members in by_size.values():
            images = {
                "preds": to_signed(torch.stack([self.preds[r] for r in members]), self.device),
                "target": to_signed(torch.stack([self.targets[r] for r in members]), self.device),
                "source": None,
                "mask": None,
            }
            sources = [self.sources[r] for r in members]
            if all(s is not None for s in sources):
                images["source"] = to_signed(torch.stack(sources), self.device)
            masks = [self.masks[r] for r in members]
            if all(m is not None for m in masks):
                images["mask"] = torch.stack(masks).to(self.device, torch.float32)
            out.append((members, images))
        return out
