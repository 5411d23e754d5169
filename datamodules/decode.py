"""Image decoding for the DataModules: ``torchvision.io.decode_image`` (libjpeg-turbo, libpng,
libwebp) straight to a uint8 ``[C, H, W]`` tensor, PIL only for formats torchvision does not
read (BMP, TIFF, ...).

PIL decodes into its own image object and ``pil_to_tensor`` copies it again; torchvision
decodes into the tensor. The results are the same pixels: JPEG through the same libjpeg-turbo
IDCT (checked against PIL in tests/datamodules/test_decode.py), PNG losslessly, palette
images expanded, an alpha channel dropped (PIL's ``convert("RGB")`` does the same) and grey
levels from RGB by the ITU-R 601-2 luma that PIL's ``convert("L")`` uses (within one level of
rounding). The EXIF orientation is not applied, on either path: the datasets' pairs were made
and scored by code that read them with PIL as stored (``python -m editbench edit`` and the demo,
which take a user's photo, do apply it).
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F

#: File signatures torchvision's decoders read (JPEG, PNG, WebP, GIF).
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a")
_MODES = {"RGB": ImageReadMode.RGB, "L": ImageReadMode.GRAY}


def _torchvision_reads(data: bytes) -> bool:
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def decode(source: str | Path | bytes, mode: str = "RGB") -> torch.Tensor:
    """The image at a path (or in bytes) as uint8 ``[C, H, W]``, ``mode`` ``RGB`` (3 channels)
    or ``L`` (1). Raises ``OSError``/``ValueError``/``RuntimeError`` for an unreadable file, as
    the callers expect (they name the file and sample)."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {sorted(_MODES)}, got {mode!r}")
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    if _torchvision_reads(data):
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        try:
            image = decode_image(encoded, mode=_MODES[mode])
        except RuntimeError as err:  # truncated or corrupt: the callers catch OSError
            raise OSError(f"cannot decode image: {err}") from err
        if mode == "L" and image.shape[0] != 1:  # libwebp decodes to RGB only
            image = F.rgb_to_grayscale(image)
        return image
    with Image.open(io.BytesIO(data)) as image:
        return F.pil_to_tensor(image.convert(mode))
