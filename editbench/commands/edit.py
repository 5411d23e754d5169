"""``python -m editbench edit``: edit one image with a trained checkpoint."""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import torch
from lightning.pytorch.cli import instantiate_module
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import save_image

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


def load_image(path: str | Path, resolution: int | None, multiple: int = 8) -> torch.Tensor:
    """An RGB image as [1, 3, H, W] in [-1, 1]; the shorter side resized to ``resolution`` and
    both sides rounded down to a multiple of the VAE's downsampling."""
    try:
        with Image.open(path) as img:
            image = TF.pil_to_tensor(img.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} not found") from None
    except (UnidentifiedImageError, OSError) as err:
        raise FileNotFoundError(f"image {path} could not be decoded: {err}") from None
    if resolution is not None:
        image = TF.resize(image, resolution, antialias=True)
    h, w = (s // multiple * multiple for s in image.shape[-2:])
    image = TF.center_crop(image, [h, w])
    return (image.float() / 127.5 - 1.0).unsqueeze(0)


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
    source = load_image(args.image, resolution).to(args.device)
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
    save_image((out.images[0].float().clamp(-1, 1) + 1) / 2, output)
    record = {"image": str(output), "instruction": args.instruction, "ema": model.uses_ema_weights}
    if out.expressive is not None:
        record["expressive"] = out.expressive[0]
    print(json.dumps(record))
    return 0
