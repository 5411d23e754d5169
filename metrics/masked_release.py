"""Reason-Edit scored by SmartEdit's own rule: background-masked PSNR/SSIM/LPIPS/MSE of the edit
against its input, and the CLIP score of the edit inside the mask's bounding box.

What SmartEdit's released ``test/metrics_evaluation.py`` (TencentARC/SmartEdit at a65f126)
does per image, the same for every scenario folder (facts of the release, see also
``metrics.protocols.REASON_EDIT_NOTES``):

1. reads the input ``*.png`` and the edit ``*.png`` with PIL (``convert("RGB")``) and the
   ``*_mask.jpg`` with ``convert("L")`` (grey levels 0-255, JPEG edges and all);
2. resizes input and edit to 256x256 with ``Image.resize(..., Image.Resampling.BICUBIC)``
   (Pillow returns a copy when the image is already 256x256) and the mask with NEAREST;
3. CLIP: the bounding box of the resized mask's NONZERO pixels (``np.where(mask)``: any grey
   level >= 1 counts), ``top, bottom = min(y), max(y)``, ``left, right = min(x), max(x)``,
   cropped from the resized edit with ``edit.crop((left, top, right, bottom))``; PIL's box is
   exclusive on the right and bottom, so the crop is ``edit[top:bottom, left:right]`` and
   drops the box's last row and column. The uint8 crop goes to torchmetrics' ``CLIPScore(
   model_name_or_path="openai/clip-vit-large-patch14")`` against the line's ``CLIP: `` text
   (the sample's ``goal_caption``): ``max(100 * cos, 0)`` of the projected, normalised
   embeddings, the processor (transformers 4.28.1 in its requirements.txt: PIL) resizing the
   crop's shorter side to 224 (bicubic) and centre-cropping 224;
4. background: ``w = 1 - mask / 255`` (a soft weight from the grey levels, float64 cast to
   float32), and both ``input / 255 * w`` and ``edit / 255 * w`` (float32, all 3 channels)
   are compared on the WHOLE 256x256 frame (the masked-out pixels are zero in both, so they
   count in the means with zero error): torchmetrics ``PeakSignalNoiseRatio(data_range=1.0)``,
   ``StructuralSimilarityIndexMeasure(data_range=1.0)`` (gaussian 11, sigma 1.5),
   ``MeanSquaredError`` and ``LearnedPerceptualImagePatchSimilarity(net_type="squeeze")``
   (default ``normalize=False``) on ``2x - 1`` of the masked images, i.e. LPIPS v0.1 squeeze
   in ``[-1, 1]`` with the masked region black (-1); each called on one image at a time
   (``forward`` returns that image's value), then the mean over images.

Here each metric takes the input (``source``), the edit (``preds``, ``[-1, 1]``) and the grey
mask (``mask_grey_native``: uint8 ``[1, H, W]`` grey levels as ``convert("L")`` reads the
JPEG, a list or a stacked tensor; datamodules/reason_edit.py provides it), brings images that
are not yet at ``size`` (256) to it with PIL exactly as above (the images as the 8-bit PNGs
the suite writes, :func:`metrics.native.quantise`) and computes the release's value per image;
the metric is the mean over images. Reason-Edit's samples already carry the input and mask in
that 256 frame, so the evaluator's native scoring resizes the model's 8-bit edit straight to
256 with PIL bicubic, as the release reads the edit PNG. Names: ``PSNR_bg``, ``SSIM_bg``,
``LPIPS_bg``, ``MSE_bg`` (on the background, the release's "unedit part") and
``CLIPScore_box`` (torchmetrics' CLIPScore, 0-100, of the mask's box).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)
from torchmetrics.utilities import rank_zero_warn

from metrics.collection import register_metric
from metrics.features import _CLIP_WHAT, _projected, _resolve, clip_text_embeddings, load_clip
from metrics.native import pil_resize, quantise
from metrics.perceptual import LPIPS, LpipsNet
from metrics.pixel import ResizeMode, at_least_float32
from metrics.samples import SampleRecorder

#: The release's ``metrics_size``: input, edit and mask are compared at 256x256.
RELEASE_SIZE = 256
#: The batch key of the grey mask (uint8 grey levels, 0-255) the release's rule reads.
MASK_KEY = "mask_grey_native"
#: The release's data range of its torchmetrics PSNR and SSIM (images on [0, 1]).
DATA_RANGE = 1.0

MaskInput = Tensor | Sequence[Tensor]


def nearest_resize(mask: Tensor, size: int) -> Tensor:
    """uint8 ``[1, H, W]`` grey mask -> ``[1, size, size]`` by PIL NEAREST (the release's mask
    resize; a copy at equal size)."""
    if tuple(mask.shape[-2:]) == (size, size):
        return mask.clone()
    pil = Image.fromarray(mask[0].cpu().numpy())  # 2-D uint8: mode L
    array = np.asarray(pil.resize((size, size), Image.Resampling.NEAREST))
    return torch.from_numpy(array.copy())[None]


def release_images(images: Tensor, size: int = RELEASE_SIZE) -> Tensor:
    """``[B, 3, H, W]`` images in ``[-1, 1]`` as the release reads them: 8-bit (as the suite
    writes its PNGs) and PIL-bicubic resized to ``size`` x ``size``; uint8 ``[B, 3, size,
    size]`` on the CPU."""
    quantised = quantise(images).cpu()
    return torch.stack([pil_resize(image, (size, size)) for image in quantised])


def release_masks(masks: MaskInput, batch: int, size: int = RELEASE_SIZE) -> Tensor:
    """The batch's grey masks (uint8 ``[1, H, W]`` each, or ``[B, 1, H, W]``) nearest-resized
    to ``size``: uint8 ``[B, 1, size, size]`` on the CPU."""
    masks = list(masks)
    if len(masks) != batch:
        raise ValueError(f"{len(masks)} masks ({MASK_KEY}) for {batch} images")
    out = []
    for mask in masks:
        if not isinstance(mask, Tensor) or mask.dtype != torch.uint8 or mask.ndim != 3:
            what = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask)
            raise TypeError(
                f"{MASK_KEY}: expected uint8 [1, H, W] grey levels (0-255, the *_mask.jpg as "
                f"PIL's convert('L') reads it), got {what}"
            )
        out.append(nearest_resize(mask[:1], size))
    return torch.stack(out)


def background_pair(
    source: Tensor, preds: Tensor, masks: MaskInput, size: int = RELEASE_SIZE
) -> tuple[Tensor, Tensor]:
    """The release's masked pair on ``[0, 1]``: ``source/255 * w`` and ``preds/255 * w`` with
    ``w = 1 - mask/255`` (float32 ``[B, 3, size, size]``, on ``preds``' device)."""
    if source.shape[0] != preds.shape[0]:
        raise ValueError(f"{source.shape[0]} inputs for {preds.shape[0]} edits")
    weights = 1 - release_masks(masks, len(preds), size).double() / 255
    weights = weights.float().to(preds.device)
    unit = [release_images(x, size).to(preds.device).float() / 255 for x in (source, preds)]
    return unit[0] * weights, unit[1] * weights


class _BackgroundMetric(SampleRecorder, Metric):
    """Mean over images of a per-image value of the release's masked pair (see the module
    docstring); states ``sum_value`` and ``num_images``, ``"sum"``-reduced."""

    is_differentiable = False
    full_state_update = False
    definition = ""

    sum_value: Tensor
    num_images: Tensor

    def __init__(self, size: int = RELEASE_SIZE, **kwargs) -> None:
        super().__init__(**kwargs)
        self.size = int(size)
        self.add_state(
            "sum_value", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state(
            "num_images", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum"
        )

    def provenance(self) -> dict:
        """How this metric measures (for the results' protocol block)."""
        return {"definition": self.definition, "frame": release_frame(self.size)}

    def per_image(self, source: Tensor, preds: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, source: Tensor, preds: Tensor, mask_grey: MaskInput) -> None:
        """Add a batch: ``source`` (the input) and ``preds`` (the edit) ``[B, 3, H, W]`` in
        ``[-1, 1]``, ``mask_grey`` the grey masks (uint8 ``[1, H, W]`` each)."""
        with torch.autocast(device_type=preds.device.type, enabled=False):
            a, b = background_pair(
                at_least_float32(source), at_least_float32(preds), mask_grey, self.size
            )
            values = self.per_image(a, b)
        self.sum_value += values.double().sum()
        self.num_images += values.numel()
        self.record(values)

    def compute(self) -> Tensor:
        """The mean over images of the per-image value (nan when no image was seen)."""
        return (self.sum_value / self.num_images).float()


def release_frame(size: int) -> str:
    return (
        f"input and edit as 8-bit images PIL-bicubic resized to {size}x{size}, grey mask "
        f"(*_mask.jpg, convert('L')) nearest; both images x (1 - mask/255) on [0,1], whole "
        "frame (SmartEdit test/metrics_evaluation.py)"
    )


class PSNRBackground(_BackgroundMetric):
    """``PSNR_bg``: torchmetrics PSNR (``data_range=1.0``) of the release's masked input and
    edit, ``10 log10(1 / MSE)`` over the whole 256 frame, per image, mean over images (dB;
    ``inf`` for an untouched background, as torchmetrics gives)."""

    higher_is_better = True
    definition = "torchmetrics PSNR, data_range 1, per image, mean over images"

    def per_image(self, source: Tensor, preds: Tensor) -> Tensor:
        return peak_signal_noise_ratio(
            preds, source, data_range=DATA_RANGE, dim=(1, 2, 3), reduction="none"
        )


class SSIMBackground(_BackgroundMetric):
    """``SSIM_bg``: torchmetrics SSIM with its defaults (gaussian 11x11, sigma 1.5, K = (0.01,
    0.03), the map averaged over the whole reflect-padded frame) and ``data_range=1.0``, of the
    release's masked pair; per image, mean over images."""

    higher_is_better = True
    definition = "torchmetrics SSIM defaults, data_range 1, per image, mean over images"

    def per_image(self, source: Tensor, preds: Tensor) -> Tensor:
        return structural_similarity_index_measure(
            preds, source, data_range=DATA_RANGE, reduction="none"
        )


class MSEBackground(_BackgroundMetric):
    """``MSE_bg``: torchmetrics MeanSquaredError of the release's masked pair (the mean over
    all 3 x 256 x 256 values, masked-out zeros included); per image, mean over images."""

    higher_is_better = False
    definition = "mean squared error over the whole frame, per image, mean over images"

    def per_image(self, source: Tensor, preds: Tensor) -> Tensor:
        return (preds - source).square().flatten(1).mean(dim=1)


class LPIPSBackground(LPIPS):
    """``LPIPS_bg``: LPIPS v0.1 (the ``lpips`` package's network, SqueezeNet by default as the
    release's ``LearnedPerceptualImagePatchSimilarity(net_type="squeeze")``) of ``2x - 1`` of the
    release's masked pair (``normalize=False``); per image, mean over images. Weights as
    :class:`metrics.perceptual.LPIPS` (offline; ``weights_path="random"`` for tests)."""

    def __init__(
        self,
        net: LpipsNet = "squeeze",
        weights_path: str | None = None,
        linear_weights_path: str | None = None,
        resize_mode: ResizeMode = "bicubic",
        size: int = RELEASE_SIZE,
        **kwargs,
    ) -> None:
        super().__init__(net, weights_path, linear_weights_path, resize_mode, **kwargs)
        self.size = int(size)

    def provenance(self) -> dict:
        record = super().provenance()
        record.pop("resize", None)
        return record | {"frame": release_frame(self.size), "input": "2 x masked - 1"}

    def update(self, source: Tensor, preds: Tensor, mask_grey: MaskInput) -> None:  # type: ignore[override]
        """Add a batch: ``source``, ``preds`` ``[B, 3, H, W]`` in ``[-1, 1]``, grey masks."""
        with torch.autocast(device_type=preds.device.type, enabled=False):
            a, b = background_pair(
                at_least_float32(source), at_least_float32(preds), mask_grey, self.size
            )
            per_image = self.lpips_net(a * 2 - 1, b * 2 - 1, normalize=False).flatten()
        self.sum_lpips += per_image.sum()
        self.num_images += per_image.numel()
        self.record(per_image)


def mask_box(mask: Tensor) -> tuple[int, int, int, int] | None:
    """The release's crop box of a grey mask ``[1, H, W]``: ``(top, bottom, left, right)`` of
    its nonzero pixels, ``bottom``/``right`` being the last nonzero row/column, which PIL's
    ``crop((left, top, right, bottom))`` leaves out. None without a nonzero pixel."""
    rows = torch.nonzero(mask[0].any(dim=1)).flatten()
    cols = torch.nonzero(mask[0].any(dim=0)).flatten()
    if rows.numel() == 0:
        return None
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


@functools.lru_cache(maxsize=8)
def pil_image_processor(folder: str) -> Any:
    """The folder's CLIP image processor on transformers' PIL backend (the release's
    transformers 4.28.1 processor resized with PIL)."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil.from_pretrained(folder, local_files_only=True)


class CLIPScoreBox(SampleRecorder, Metric):
    """``CLIPScore_box``: torchmetrics' CLIPScore (``max(100 * cos, 0)``) of the edit cropped to
    the bounding box of the grey mask's nonzero pixels, against the sample's CLIP text.

    ``update(preds, mask_grey, captions)``. Per image, as the release (module docstring): the
    edit as an 8-bit image PIL-bicubic resized to ``size``, the mask nearest-resized, the crop
    ``edit[top:bottom, left:right]`` (PIL's exclusive box), the crop through the CLIP folder's
    image processor on transformers' PIL backend (shorter side to the model's input size,
    bicubic, centre crop, CLIP mean/std), the projected image and text embeddings L2-normalised,
    ``max(100 * cos, 0)``. Captions are truncated to the text encoder's 77 tokens. An image
    whose mask has no nonzero pixel, or whose box is empty (one row or column: the release's
    crop would be empty; its script fails there), is not scored (``None`` row, counted in
    ``num_empty``). The metric is the mean over scored images, 0-100 (nan when none).

    Args:
        clip_path: local CLIP folder (the release: ``openai/clip-vit-large-patch14``).
        size: the release's frame (256).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 100.0

    sum_score: Tensor
    num_images: Tensor
    num_empty: Tensor

    def __init__(self, clip_path: str, size: int = RELEASE_SIZE, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clip_path = _resolve(clip_path, "CLIPScore_box", "CLIP", _CLIP_WHAT)
        self.size = int(size)
        self.add_state(
            "sum_score", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        for name in ("num_images", "num_empty"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def provenance(self) -> dict:
        from metrics.provenance import backbone_record

        return {
            "backbone": backbone_record(self.clip_path),
            "definition": "max(100 cos, 0) of the CLIP embeddings of the edit cropped to the "
            "mask's nonzero box (edit[top:bottom, left:right], PIL's exclusive crop) and the "
            "CLIP text, per image, mean over scored images",
            "frame": release_frame(self.size),
            "preprocess": "the CLIP image processor on the PIL backend (shorter side, bicubic, "
            "centre crop)",
        }

    def update(self, preds: Tensor, mask_grey: MaskInput, captions: Sequence[str]) -> None:
        """Add a batch: edits ``[B, 3, H, W]`` in ``[-1, 1]``, grey masks, one text per image."""
        if isinstance(captions, str) or len(captions) != len(preds):
            raise ValueError(f"CLIPScore_box: one caption per image, got {captions!r}")
        edits = release_images(at_least_float32(preds), self.size)
        masks = release_masks(mask_grey, len(preds), self.size)
        crops, scored = [], []
        for edit, mask in zip(edits, masks, strict=True):
            box = mask_box(mask)
            if box is not None and box[1] > box[0] and box[3] > box[2]:
                top, bottom, left, right = box
                crops.append(edit[:, top:bottom, left:right].permute(1, 2, 0).numpy())
                scored.append(True)
            else:
                scored.append(False)
        values = torch.zeros(len(preds), dtype=torch.float64)
        valid = torch.tensor(scored)
        if crops:
            with torch.autocast(device_type=preds.device.type, enabled=False):
                model, processor = load_clip(self.clip_path, preds.device, metric="CLIPScore_box")
                pixels = pil_image_processor(self.clip_path)(images=crops, return_tensors="pt")
                image = _projected(
                    model.get_image_features(pixel_values=pixels["pixel_values"].to(preds.device))
                ).float()
                kept = [c for c, ok in zip(captions, scored, strict=True) if ok]
                text = clip_text_embeddings(model, processor, kept, preds.device)
                cos = (F.normalize(image, dim=-1) * F.normalize(text, dim=-1)).sum(dim=-1)
            values[valid] = (100 * cos).clamp_min(0).double().cpu()
        self.sum_score += values[valid].sum().to(self.sum_score.device)
        self.num_images += int(valid.sum())
        self.num_empty += int((~valid).sum())
        self.record(values, valid=valid)

    def compute(self) -> Tensor:
        """The mean over scored images (nan, with a warning for empty masks, when none)."""
        if int(self.num_images) == 0:
            if int(self.num_empty) > 0:
                rank_zero_warn(
                    f"CLIPScore_box: all {int(self.num_empty)} masks were empty; returning nan.",
                    UserWarning,
                )
            return torch.tensor(float("nan"), device=self.sum_score.device)
        return (self.sum_score / self.num_images).float()


_INPUTS = ("source", "preds", MASK_KEY)
register_metric("PSNR_bg", PSNRBackground, inputs=_INPUTS)
register_metric("SSIM_bg", SSIMBackground, inputs=_INPUTS)
register_metric("MSE_bg", MSEBackground, inputs=_INPUTS)
register_metric("LPIPS_bg", LPIPSBackground, inputs=_INPUTS, backbone=("lpips", "weights_path"))
register_metric(
    "CLIPScore_box",
    CLIPScoreBox,
    inputs=("preds", MASK_KEY, "goal_caption"),
    backbone=("clip", "clip_path"),
)

__all__ = [
    "MASK_KEY",
    "RELEASE_SIZE",
    "CLIPScoreBox",
    "LPIPSBackground",
    "MSEBackground",
    "PSNRBackground",
    "SSIMBackground",
    "background_pair",
    "mask_box",
    "nearest_resize",
    "release_images",
    "release_masks",
]
