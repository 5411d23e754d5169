"""InstructPix2Pix's CLIP image preprocessing (its ``metrics/clip_similarity.py``).

``ClipSimilarity.encode_image`` (timothybrooks/instruct-pix2pix) takes images "in range [0, 1]",
resizes them with ``F.interpolate(image, size=224, mode="bicubic", align_corners=False)`` (a
square 224x224 for ViT-L/14: no aspect ratio kept, no centre crop, no antialiasing), subtracts
CLIP's mean and divides by its std, then L2-normalises the image embedding. The suite's
``CLIP_direction`` and ``CLIP_image`` follow that rule by default
(``preprocess="instructpix2pix"``); CLIP-I/CTS of MagicBrush keep the CLIP processor's
resize-and-crop (``preprocess="processor"``, as ``clip.load``'s transform).

Input range: the released ``metrics/compute_metrics.py`` passes ``EditDatasetEval``'s input
(``2 * x / 255 - 1``, i.e. ``[-1, 1]``) and the decoder's output (``[-1, 1]``, unclamped)
straight to ``ClipSimilarity``, although ``encode_image`` documents ``[0, 1]``. The suite maps
its ``[-1, 1]`` images to ``[0, 1]`` (``input_range="unit"``, the default, the documented
rule); ``input_range="signed"`` feeds the ``[-1, 1]`` values unchanged, a compatibility option
that reproduces the released script's numbers. The choice is recorded in the provenance.
"""

from __future__ import annotations

from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from metrics.pixel import to_unit_range

ClipPreprocess = Literal["processor", "instructpix2pix"]
ClipInputRange = Literal["unit", "signed"]
PREPROCESSES = ("processor", "instructpix2pix")
INPUT_RANGES = ("unit", "signed")

DESCRIPTIONS = {
    "processor": "the CLIP processor's resize / center crop / normalisation on [0,1] tensors; "
    "projected embeddings",
    "instructpix2pix": "InstructPix2Pix's metrics/clip_similarity.py: F.interpolate to the CLIP "
    "input size (square, bicubic, align_corners=False, no crop), CLIP mean/std; projected "
    "embeddings",
}
RANGE_DESCRIPTIONS = {
    "unit": "[0,1] images (x/2+0.5 of the suite's [-1,1]), as encode_image documents",
    "signed": "[-1,1] images unchanged, as instruct-pix2pix's released compute_metrics.py "
    "feeds them (compatibility option)",
}


def check_options(metric: str, preprocess: str, input_range: str) -> None:
    """Validate a CLIP metric's ``preprocess`` and ``input_range``."""
    if preprocess not in PREPROCESSES:
        raise ValueError(
            f"{metric}: `preprocess` must be one of {PREPROCESSES}, got {preprocess!r}."
        )
    if input_range not in INPUT_RANGES:
        raise ValueError(
            f"{metric}: `input_range` must be one of {INPUT_RANGES}, got {input_range!r}."
        )
    if input_range == "signed" and preprocess != "instructpix2pix":
        raise ValueError(
            f"{metric}: input_range='signed' reproduces InstructPix2Pix's released script and "
            "only goes with preprocess='instructpix2pix'."
        )


def clip_input_size(model: Any) -> int:
    """The CLIP vision tower's input side (224 for ViT-B/32 and ViT-L/14)."""
    return int(model.config.vision_config.image_size)


def preprocess_instructpix2pix(images: Tensor, size: int, input_range: str = "unit") -> Tensor:
    """``[B, 3, H, W]`` images in ``[-1, 1]`` -> CLIP pixel values as ``ClipSimilarity`` makes
    them (see the module docstring)."""
    x = to_unit_range(images) if input_range == "unit" else images.float()
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    mean = x.new_tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std
