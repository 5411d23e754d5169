"""What the judge sees: 8-bit RGB images, shrunk on the longer side, encoded as PNG or JPEG.

Images (``[B, 3, H, W]`` in ``[-1, 1]``, or image files of a result bundle) are quantised to
8-bit RGB, shrunk (Lanczos, aspect ratio kept) so that their longer side is at most
``image_size`` (None: native size), and sent as PNG (lossless, so the judged pixels are the
hashed ones) or JPEG (Pillow's default quality, as the VIEScore release's ``encode_pil_image``
sends them). The encoded bytes are what the answer cache's key hashes.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from metrics.pixel import at_least_float32, to_unit_range

IMAGE_FORMATS = ("png", "jpeg")


def to_pil_images(images: Tensor, image_size: int | None) -> list[Image.Image]:
    """``[B, 3, H, W]`` images in ``[-1, 1]`` → 8-bit RGB PIL images, longer side at most
    ``image_size`` (Lanczos, aspect ratio kept; smaller images are left as they are)."""
    with torch.autocast(device_type=images.device.type, enabled=False):
        unit = to_unit_range(at_least_float32(images.detach()))
    arrays = (unit * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [shrink(Image.fromarray(array, mode="RGB"), image_size) for array in arrays]


def load_image(path: str | Path, image_size: int | None) -> Image.Image:
    """An image file as 8-bit RGB, shrunk like :func:`to_pil_images`."""
    with Image.open(path) as image:
        return shrink(image.convert("RGB"), image_size)


def shrink(image: Image.Image, image_size: int | None) -> Image.Image:
    """``image`` with its longer side at most ``image_size`` (Lanczos, aspect ratio kept)."""
    width, height = image.size
    if image_size is None or max(width, height) <= image_size:
        return image
    scale = image_size / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def encode_image(image: Image.Image, image_format: str = "png") -> bytes:
    """``image`` as PNG (lossless) or JPEG (Pillow's default quality): the bytes sent and
    hashed by the cache key."""
    buffer = io.BytesIO()
    image.save(buffer, format=image_format.upper())
    return buffer.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    """Lossless PNG encoding of a PIL image."""
    return encode_image(image, "png")


__all__ = ["IMAGE_FORMATS", "encode_image", "load_image", "png_bytes", "shrink", "to_pil_images"]
