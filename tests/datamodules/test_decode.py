"""``datamodules.decode.decode`` (torchvision's decoders, PIL for the rest) gives the pixels
PIL's ``Image.open(...).convert(mode)`` gives, the reading every DataModule used before, on
files PIL writes in each format and mode the datasets use."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from datamodules.decode import decode


def pil_reference(data: bytes, mode: str) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as image:
        return F.pil_to_tensor(image.convert(mode))


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def photo(size=(48, 40), seed=0) -> Image.Image:
    """Smooth gradients plus noise: what JPEG's chroma subsampling and IDCT act on."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    base = np.stack([x * 5, y * 6, (x + y) * 3], axis=-1) % 256
    noise = rng.integers(0, 40, size=base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


CASES = {
    "png_rgb": lambda: encoded(photo(), "PNG"),
    "png_rgba": lambda: encoded(photo().convert("RGBA"), "PNG"),
    "png_palette": lambda: encoded(photo().quantize(colors=16), "PNG"),
    "png_grey": lambda: encoded(photo().convert("L"), "PNG"),
    "png_binary_mask": lambda: encoded(photo().convert("L").point(lambda v: 255 * (v > 100)), "PNG"),
    "webp_lossless": lambda: encoded(photo(), "WEBP", lossless=True),
    "bmp": lambda: encoded(photo(), "BMP"),  # PIL path
    "tiff": lambda: encoded(photo(), "TIFF"),  # PIL path
}


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_lossless_formats_decode_as_pil(case, mode, tmp_path):
    data = CASES[case]()
    want = pil_reference(data, mode)
    got = decode(data, mode)
    assert got.dtype == torch.uint8 and got.shape == want.shape
    colour_to_grey = mode == "L" and case not in ("png_grey", "png_binary_mask")
    # PIL's RGB -> L is the ITU-R 601-2 luma in fixed point; libpng's differs by rounding
    tolerance = 1 if colour_to_grey else 0
    assert (got.int() - want.int()).abs().max() <= tolerance
    path = tmp_path / f"image.{case}"
    path.write_bytes(data)
    assert torch.equal(decode(path, mode), got)


@pytest.mark.parametrize("quality", [75, 95])
@pytest.mark.parametrize("subsampling", [0, 2])  # 4:4:4 and 4:2:0
def test_jpeg_decodes_as_pil(quality, subsampling):
    data = encoded(photo(), "JPEG", quality=quality, subsampling=subsampling)
    got, want = decode(data, "RGB").int(), pil_reference(data, "RGB").int()
    difference = (got - want).abs()
    # the same libjpeg-turbo IDCT; chroma upsampling may round one level apart
    assert difference.max() <= 1 and difference.float().mean() < 0.05


def test_corrupt_files_raise_oserror():
    data = encoded(photo(), "JPEG")
    with pytest.raises(OSError):
        decode(data[: len(data) // 3] + b"\x00" * 4, "RGB")
    with pytest.raises(OSError):
        decode(b"not an image at all", "RGB")
    with pytest.raises(ValueError, match="mode"):
        decode(encoded(photo(), "PNG"), "CMYK")
