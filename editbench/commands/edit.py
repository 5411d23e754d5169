"""``python -m editbench edit``: edit one image with a trained checkpoint."""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.cli import instantiate_module
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

from editbench.commands.expressive import CommandInputError
from models.checkpoint import read_checkpoint


def load_checkpoint_model(ckpt_path: str | Path, device: str = "cpu", ema: bool | None = None):
    """Rebuild the model a LightningCLI run saved in ``ckpt_path``: class and arguments from its
    hyperparameters (instantiated as LightningCLI saved them), frozen weights re-read from their
    paths, trainable ones from the file, its EMA weights when it has them (``ema``: ``None``
    follows the model's ``prefer_ema_weights``, ``False`` takes the raw weights). Returns the
    model in eval mode and the DataModule's hyperparameters as saved (``_class_path``
    included); ``model.uses_ema_weights`` says which weights were loaded."""
    checkpoint = read_checkpoint(ckpt_path)
    if checkpoint.class_path is None:
        raise FileNotFoundError(
            f"{checkpoint.path} has no model class in its hyperparameters; it was not written by "
            f"`python -m editbench fit`"
        )
    cls = model_class(checkpoint.class_path, checkpoint.path)
    init_args = checkpoint.init_args()
    if ema is not None:
        init_args["prefer_ema_weights"] = ema
    model = instantiate_module(cls, {"_class_path": checkpoint.class_path, **init_args})
    model.configure_model()
    model.load_weights_from(checkpoint)
    return model.to(device).eval(), dict(checkpoint.datamodule_hparams)


def load_config_model(configs: Sequence[str | Path], device: str = "cpu"):
    """Build the model of LightningCLI config files (later files layered over earlier ones, as
    repeated ``-c``) without a trainer, for an untrained or released model: ``model.class_path``
    and ``model.init_args`` instantiated as LightningCLI does (``instantiate_module``), then
    ``configure_model()``, which reads every ``*_path`` folder. OmegaConf interpolations are
    resolved over the whole merged file (the CLI's ``parser_mode="omegaconf"``). Returns the
    model in eval mode and the DataModule's arguments with its ``_class_path``."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not configs:
        raise CommandInputError("no config file given")
    try:
        merged = OmegaConf.merge(*(OmegaConf.load(Path(c)) for c in configs))
        tree = OmegaConf.to_container(merged, resolve=True)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"config {err.filename} not found") from None
    except (OmegaConfBaseException, ValueError) as err:
        raise CommandInputError(f"config {', '.join(map(str, configs))}: {err}") from None
    model_cfg = tree.get("model") if isinstance(tree, dict) else None
    if not isinstance(model_cfg, dict) or not model_cfg.get("class_path"):
        raise CommandInputError(f"config {', '.join(map(str, configs))} has no model.class_path")
    class_path = model_cfg["class_path"]
    cls = model_class(class_path, Path(configs[-1]))
    init_args = dict(model_cfg.get("init_args") or {})
    model = instantiate_module(cls, {"_class_path": class_path, **init_args})
    model.configure_model()
    data_cfg = tree.get("data") or {}
    data_hparams = {"_class_path": data_cfg.get("class_path"), **(data_cfg.get("init_args") or {})}
    return model.to(device).eval(), data_hparams


def model_class(class_path: str, source: Path) -> type:
    """The :class:`EditModel` subclass a checkpoint names; only classes of the suite's ``models``
    package are imported, so a checkpoint cannot make us run other code."""
    from models.base import EditModel

    module_name, _, name = class_path.rpartition(".")
    if not (module_name == "models" or module_name.startswith("models.")):
        raise FileNotFoundError(
            f"{source} names model class {class_path!r}, outside the `models` package"
        )
    cls = getattr(importlib.import_module(module_name), name, None)
    if not (isinstance(cls, type) and issubclass(cls, EditModel)):
        raise FileNotFoundError(f"{source} names {class_path!r}, which is not an editbench model")
    return cls


#: Largest input the ``edit`` command and the demo accept, in pixels (64 MP: 8192 x 8192, above
#: any phone camera's 48-50 MP); checked from the file header, before the image is decoded.
MAX_INPUT_PIXELS = 8192 * 8192
#: A longer side beyond this many times the model's resolution is scaled down further (a
#: panorama is fed at most 4x as long as it is wide, not at any length).
MAX_ASPECT = 4


class ImageInputError(CommandInputError):
    """An input image the command cannot use (not found, not an image, too large)."""


def open_image(
    path: str | Path, max_pixels: int | None = MAX_INPUT_PIXELS, label: str | None = None
) -> Image.Image:
    """Read an input image as the upright 8-bit RGB picture a viewer shows.

    The EXIF orientation is applied (``PIL.ImageOps.exif_transpose``: a phone's orientation-6
    JPEG comes out upright); grayscale, palette, CMYK and YCbCr convert to RGB; 16/32-bit
    integer images are scaled to 8 bits (65535 -> 255, not clipped at 255 as a plain
    ``convert("RGB")`` would); an alpha channel is composited over white. ``max_pixels`` is
    checked from the header, before decoding. Errors name the file as ``label`` (default: the
    path) (:class:`ImageInputError`)."""
    name = label or str(path)
    try:
        img = Image.open(path)
    except FileNotFoundError:
        raise ImageInputError(f"image {name} not found") from None
    except Image.DecompressionBombError:
        raise ImageInputError(f"{name} is too large (PIL refuses to decode it)") from None
    except UnidentifiedImageError:
        raise ImageInputError(f"{name} is not an image (PIL cannot identify it)") from None
    except (OSError, ValueError) as err:
        raise ImageInputError(f"{name} could not be read as an image ({err})") from None
    with img:
        width, height = img.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageInputError(
                f"{name} is {width}x{height} = {width * height / 1e6:.1f} MP; the limit is "
                f"{max_pixels / 1e6:.1f} MP ({max_pixels} pixels)"
            )
        try:
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
        except (OSError, ValueError, SyntaxError) as err:
            raise ImageInputError(f"{name} could not be decoded ({err})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB (see :func:`open_image`)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit PNG/TIFF grayscale: full scale 65535 (a 32-bit "I" image above 65535 is clipped).
        array = np.asarray(img, dtype=np.float64)
        array = np.clip(np.round(array / 257.0), 0, 255).astype(np.uint8)
        img = Image.fromarray(array)  # uint8 2-D: mode "L"
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.round(np.asarray(img)), 0, 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def model_size(
    size: tuple[int, int], resolution: int | None, multiple: int = 8
) -> tuple[int, int]:
    """(width, height) an image of ``size`` (width, height) is fed to the model at: the shorter
    side scaled to ``resolution`` (the training data's, as the DataModules resize), the longer
    side by the same factor (at most :data:`MAX_ASPECT` x ``resolution``), both rounded to the
    nearest multiple of the VAE's downsampling (at least one). ``resolution`` ``None`` keeps
    the scale."""
    width, height = size
    scale = 1.0
    if resolution is not None:
        scale = min(resolution / min(width, height), MAX_ASPECT * resolution / max(width, height))
    return tuple(max(multiple, round(s * scale / multiple) * multiple) for s in (width, height))


def image_to_tensor(img: Image.Image, resolution: int | None, multiple: int = 8) -> torch.Tensor:
    """An RGB picture as the model's input, [1, 3, H, W] in [-1, 1], at :func:`model_size`
    (the whole picture, aspect ratio kept up to the rounding; no crop)."""
    tensor = TF.pil_to_tensor(img)
    width, height = model_size(img.size, resolution, multiple)
    if (width, height) != img.size:
        tensor = TF.resize(tensor, [height, width], antialias=True)
    return (tensor.float() / 127.5 - 1.0).unsqueeze(0)


def tensor_to_image(image: torch.Tensor, size: tuple[int, int] | None = None) -> Image.Image:
    """A model output [3, H, W] in [-1, 1] as an 8-bit RGB picture, resized (bicubic) to
    ``size`` (width, height): the input's size, so a 48x40 input comes back 48x40."""
    array = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    img = Image.fromarray(array.permute(1, 2, 0).cpu().numpy())
    if size is not None and img.size != tuple(size):
        img = img.resize(tuple(size), Image.Resampling.BICUBIC)
    return img


def load_image(path: str | Path, resolution: int | None, multiple: int = 8) -> torch.Tensor:
    """An input image file as the model's input [1, 3, H, W] in [-1, 1]:
    :func:`open_image` then :func:`image_to_tensor`."""
    return image_to_tensor(open_image(path), resolution, multiple)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m editbench edit", description=__doc__)
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by `fit`")
    parser.add_argument("--image", required=True, help="input image")
    parser.add_argument("--instruction", required=True, help="the edit instruction")
    parser.add_argument("--output", required=True, help="output PNG")
    parser.add_argument(
        "--num_inference_steps", type=int, default=None, help="default: the model's"
    )
    parser.add_argument(
        "--guidance_scale", type=float, default=None, help="αX (default: the model's)"
    )
    parser.add_argument(
        "--image_guidance_scale", type=float, default=None, help="αV (default: the model's)"
    )
    parser.add_argument(
        "--resolution", type=int, default=None, help="shorter side (default: the training data's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--raw_weights",
        action="store_true",
        help="use the trained weights even when the checkpoint holds EMA weights (default: EMA)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    model, data_hparams = load_checkpoint_model(
        args.ckpt_path, args.device, ema=False if args.raw_weights else None
    )
    resolution = args.resolution or data_hparams.get("resolution")
    picture = open_image(args.image)
    source = image_to_tensor(picture, resolution).to(args.device)
    out = model.edit(
        source,
        [args.instruction],
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        image_guidance_scale=args.image_guidance_scale,
        generator=torch.Generator().manual_seed(args.seed),
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Returned at the input's (upright) size, as the user gave it.
    tensor_to_image(out.images[0], picture.size).save(output)
    record = {"image": str(output), "instruction": args.instruction, "ema": model.uses_ema_weights}
    if out.expressive is not None:
        record["expressive"] = out.expressive[0]
    print(json.dumps(record))
    return 0
