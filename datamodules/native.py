"""Native-resolution images beside the model's square inputs, and the way back.

Evaluation scores a prediction against the ground truth at its native size, on the whole image
(MagicBrush's `evaluation/image_eval.py` resizes the generated image to the ground truth's
size). So val/test/predict samples carry `source_native`, `target_native` (uint8 [3,H,W] as
decoded) and `mask_native` (uint8 {0,1} [1,H,W]) next to the resized model inputs, and
`prediction_to_native` maps a model output back onto the native frame for each `eval_resize`:

- `"resize"` (default): the whole image squashed to resolution x resolution; the prediction is
  resized back to (H, W): the whole image is scored.
- `"pad"`: letterboxed, the longer side resized to `resolution` (aspect kept) and centred on a
  black square; the padding is cut off the prediction before resizing back: whole image.
- `"center_crop"`: shorter side resized to `resolution`, centre square cropped (the suite's
  behaviour before native scoring); only the cropped region of the native image can be
  scored, and `prediction_to_native` returns that region's box.

Unequal pairs: the original GIER/MA5k loaders (T2ONet `utils/visual_utils.py`
`load_infer_img(output, (h, w))`) resize the output image to the input's size with
`cv2.resize`'s default filter, bilinear without antialiasing; `align_to_source` does the same
for every dataset (EVR's 94 unequal pairs included), so `target_native` is the resized target.
Masks are resized with nearest neighbour (T2ONet: `cv2.INTER_NEAREST`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

EvalResize = Literal["resize", "pad", "center_crop"]
EVAL_RESIZE_MODES = ("resize", "pad", "center_crop")


def check_eval_resize(mode: str) -> str:
    if mode not in EVAL_RESIZE_MODES:
        raise ValueError(f"eval_resize must be one of {EVAL_RESIZE_MODES}, got {mode!r}")
    return mode


def eval_transform(resolution: int, mode: EvalResize = "resize") -> v2.Transform:
    """The evaluation transform of `mode` (module docstring), one call for image and mask."""
    check_eval_resize(mode)
    if mode == "resize":
        return v2.Resize((resolution, resolution), antialias=True)
    if mode == "pad":  # CenterCrop pads a smaller image with zeros, centred
        return v2.Compose(
            [v2.Resize(size=None, max_size=resolution, antialias=True), v2.CenterCrop(resolution)]
        )
    return v2.Compose([v2.Resize(resolution, antialias=True), v2.CenterCrop(resolution)])


def align_to_source(images: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`target` and `mask` resized to `source`'s size where they differ (module docstring):
    the target bilinear without antialiasing (T2ONet's `cv2.resize` default), the mask nearest.
    tv_tensors in, tv_tensors out."""
    size = list(images["source"].shape[-2:])
    out = dict(images)
    if "target" in out and list(out["target"].shape[-2:]) != size:
        out["target"] = F.resize(
            out["target"], size, interpolation=v2.InterpolationMode.BILINEAR, antialias=False
        )
    if "mask" in out and list(out["mask"].shape[-2:]) != size:
        out["mask"] = F.resize(out["mask"], size, interpolation=v2.InterpolationMode.NEAREST)
    return out


def model_box(
    height: int, width: int, resolution: int, mode: EvalResize
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the image content in the model's square input; for
    "center_crop" the whole square (the content fills it)."""
    check_eval_resize(mode)
    if mode != "pad":
        return 0, 0, resolution, resolution
    if height >= width:  # torchvision: the longer side becomes max_size, the other is floored
        new_h, new_w = resolution, int(resolution * width / height)
    else:
        new_h, new_w = int(resolution * height / width), resolution
    return (resolution - new_h) // 2, (resolution - new_w) // 2, new_h, new_w


def native_box(
    height: int, width: int, resolution: int, mode: EvalResize
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the native image the model saw: all of it, except for
    "center_crop" (the crop, mapped back to native pixels and rounded)."""
    check_eval_resize(mode)
    if mode != "center_crop":
        return 0, 0, height, width
    short, long = min(height, width), max(height, width)
    new_long = int(resolution * long / short)  # torchvision's Resize(int) of the shorter side
    new_h, new_w = (resolution, new_long) if height <= width else (new_long, resolution)
    top = int(round((new_h - resolution) / 2.0))
    left = int(round((new_w - resolution) / 2.0))
    scale_y, scale_x = height / new_h, width / new_w
    return (
        round(top * scale_y),
        round(left * scale_x),
        max(1, round(resolution * scale_y)),
        max(1, round(resolution * scale_x)),
    )


def prediction_to_native(
    prediction: torch.Tensor,
    height: int,
    width: int,
    mode: EvalResize,
    interpolation: v2.InterpolationMode = v2.InterpolationMode.BICUBIC,
) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """A model output [C, r, r] (or [N, C, r, r]) on the native frame of an H x W input.

    Returns (image, box): the prediction resized (default bicubic with antialias, as PIL's
    `resize` that MagicBrush's script uses) to the native region `box` = (top, left, h, w) it
    covers: the whole image for "resize" and "pad" (letterbox padding cut off first), the
    centre crop for "center_crop". Score against `target_native[..., top:top+h, left:left+w]`.
    """
    resolution = prediction.shape[-1]
    top, left, h, w = model_box(height, width, resolution, mode)
    content = prediction[..., top : top + h, left : left + w]
    box = native_box(height, width, resolution, mode)
    resized = F.resize(content, [box[2], box[3]], interpolation=interpolation, antialias=True)
    if not prediction.is_floating_point():
        resized = resized.to(prediction.dtype)
    return resized, box


def as_native(image: torch.Tensor, binary: bool = False) -> torch.Tensor:
    """A decoded image as a plain uint8 tensor (a mask as {0,1})."""
    plain = image.as_subclass(torch.Tensor) if isinstance(image, tv_tensors.TVTensor) else image
    if binary:
        return (plain >= 128).to(torch.uint8)
    return plain.clone()
