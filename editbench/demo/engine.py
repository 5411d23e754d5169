"""What the demo does, without the page: load models once, edit one picture, render an αV x αX
grid, list the gallery examples. The Gradio app (:mod:`editbench.demo.app`) only wires these to
widgets and turns :class:`DemoInputError` into a message in the page."""

from __future__ import annotations

import json
import math
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from editbench.commands.edit import (
    MAX_INPUT_PIXELS,
    image_to_tensor,
    load_checkpoint_model,
    load_config_model,
    open_image,
    tensor_to_image,
)
from editbench.commands.expressive import CommandInputError
from models.checkpoint import CheckpointMismatchError

#: Bounds of the page's knobs (a request outside them is refused, never run).
MAX_STEPS = 500
MAX_GRID_CELLS = 36
CONFIG_SUFFIXES = (".yaml", ".yml")


class DemoInputError(ValueError):
    """Something the person at the page must change; shown there as a message."""


ProgressFn = Callable[[int, int], None]


@dataclass
class EditResult:
    """One edit: the picture at the input's size, the model's texts, the time it took."""

    image: Image.Image
    seconds: float
    model_size: tuple[int, int]
    expressive: str | None = None
    caption: str | None = None


def _first_text(value) -> str | None:
    """The first sample's text of an ``EditOutput`` field (a list per batch, or a string)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return str(value[0]) if value else None
    return str(value)


def find_unet(model: torch.nn.Module) -> torch.nn.Module | None:
    """The diffusers UNet of a model (one call per sampling step, what the progress counts)."""
    for _, module in model.named_modules():
        if type(module).__name__ == "UNet2DConditionModel":
            return module
    return None


def default_resolution(model: torch.nn.Module) -> int | None:
    """The UNet's native image size (``sample_size`` x the VAE's downsampling), for a model
    with no training data to take the resolution from."""
    unet = find_unet(model)
    vae = next((m for _, m in model.named_modules() if type(m).__name__ == "AutoencoderKL"), None)
    if unet is None or vae is None:
        return None
    size = unet.config.sample_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    return int(size) * 2 ** (len(vae.config.block_out_channels) - 1)


class DemoModel:
    """A loaded model and how pictures are fed to it.

    Args:
        label: how the page names it (the checkpoint or config path).
        model: an :class:`~models.base.EditModel` in eval mode on its device.
        resolution: the shorter side fed to the model (the training data's).
    """

    def __init__(self, label: str, model, resolution: int | None) -> None:
        self.label = label
        self.model = model
        self.resolution = resolution
        self.unet = find_unet(model)

    @property
    def has_image_scale(self) -> bool:
        """Whether the model has InsightEdit's λ (``image_scale``), a knob of its ``edit``."""
        return hasattr(self.model, "image_scale")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def defaults(self) -> dict:
        """The model's own evaluation settings (the page's initial knob values)."""
        m = self.model
        values = {
            "guidance_scale": float(m.guidance_scale),
            "image_guidance_scale": float(m.image_guidance_scale),
            "num_inference_steps": int(m.num_inference_steps),
        }
        if self.has_image_scale:
            values["image_scale"] = float(m.image_scale)
        return values

    @torch.no_grad()
    def edit_tensor(
        self,
        source: torch.Tensor,
        instruction: str,
        *,
        guidance_scale: float,
        image_guidance_scale: float,
        steps: int,
        seed: int,
        image_scale: float | None = None,
        on_step: ProgressFn | None = None,
    ):
        """``model.edit`` on one [1, 3, H, W] input with a CPU generator seeded by ``seed`` (the
        `edit` command's noise); ``on_step(done, steps)`` after every UNet call."""
        kwargs = {
            "num_inference_steps": int(steps),
            "guidance_scale": float(guidance_scale),
            "image_guidance_scale": float(image_guidance_scale),
            "generator": torch.Generator().manual_seed(int(seed)),
        }
        if self.has_image_scale and image_scale is not None:
            kwargs["image_scale"] = float(image_scale)
        handle = None
        if on_step is not None and self.unet is not None:
            calls = [0]

            def hook(*_):
                calls[0] += 1
                on_step(min(calls[0], steps), steps)

            handle = self.unet.register_forward_hook(hook)
        try:
            return self.model.edit(source.to(self.device), [instruction], **kwargs)
        finally:
            if handle is not None:
                handle.remove()

    def edit(
        self,
        picture: Image.Image,
        instruction: str,
        *,
        guidance_scale: float,
        image_guidance_scale: float,
        steps: int,
        seed: int,
        image_scale: float | None = None,
        on_step: ProgressFn | None = None,
    ) -> EditResult:
        """Edit an RGB picture; the result comes back at the picture's size."""
        source = image_to_tensor(picture, self.resolution)
        start = time.perf_counter()
        out = self.edit_tensor(
            source,
            instruction,
            guidance_scale=guidance_scale,
            image_guidance_scale=image_guidance_scale,
            steps=steps,
            seed=seed,
            image_scale=image_scale,
            on_step=on_step,
        )
        seconds = time.perf_counter() - start
        return EditResult(
            image=tensor_to_image(out.images[0], picture.size),
            seconds=seconds,
            model_size=(source.shape[-1], source.shape[-2]),
            expressive=_first_text(getattr(out, "expressive", None)),
            caption=_first_text(getattr(out, "caption", None)),
        )


class ModelCache:
    """Models loaded once and kept (at most ``capacity``, least recently used dropped), keyed
    by what names them: a checkpoint path, or config paths (layered, as repeated ``-c``).

    Args:
        device: where models run.
        dtype: their precision (``torch.bfloat16`` on a GPU; the sampler keeps latents and
            guidance in float32 whatever the UNet's precision).
        resolution: the shorter side fed to every model (``None``: each model's training
            data's, else its UNet's native size).
        capacity: models kept loaded.
    """

    def __init__(
        self,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        resolution: int | None = None,
        capacity: int = 2,
    ) -> None:
        self.device = device
        self.dtype = dtype
        self.resolution = resolution
        self.capacity = max(1, capacity)
        self._models: OrderedDict[str, DemoModel] = OrderedDict()
        self._data_hparams: dict[str, dict] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(spec: str | Sequence[str]) -> str:
        """The cache key of a checkpoint path or a list of config paths."""
        if isinstance(spec, str):
            return spec.strip()
        return " + ".join(str(s).strip() for s in spec)

    def get(self, spec: str | Sequence[str]) -> DemoModel:
        """The model ``spec`` names, loading it on first use. An unknown or unreadable
        checkpoint or config is a :class:`DemoInputError` naming it."""
        key = self.key(spec)
        if not key:
            raise DemoInputError("Name a checkpoint (.ckpt) or a config (.yaml).")
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            loaded = self._load(key)
            self._models[key] = loaded
            while len(self._models) > self.capacity:
                old, _ = self._models.popitem(last=False)
                self._data_hparams.pop(old, None)
            return loaded

    def data_hparams(self, spec: str | Sequence[str]) -> dict:
        """The DataModule arguments the model named by ``spec`` came with (after :meth:`get`)."""
        return self._data_hparams.get(self.key(spec), {})

    def _load(self, key: str) -> DemoModel:
        paths = [p.strip() for p in key.split(" + ")]
        configs = all(p.lower().endswith(CONFIG_SUFFIXES) for p in paths)
        what = "cannot build the model of config" if configs else "unknown checkpoint"
        try:
            if configs:
                model, data = load_config_model(paths, self.device)
            elif len(paths) == 1:
                model, data = load_checkpoint_model(paths[0], self.device)
            else:
                raise DemoInputError(f"unknown checkpoint {key!r}: give one .ckpt file")
        except DemoInputError:
            raise
        except (FileNotFoundError, CheckpointMismatchError, CommandInputError) as err:
            raise DemoInputError(f"{what} {key!r}: {err}") from None
        except (OSError, ValueError, TypeError, KeyError) as err:  # jsonargparse, from_pretrained
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise DemoInputError(f"cannot load {key!r}: {first}") from None
        if self.dtype != torch.float32:
            model = model.to(dtype=self.dtype)
        resolution = self.resolution or data.get("resolution") or default_resolution(model)
        self._data_hparams[key] = data
        return DemoModel(key, model, resolution)


# --------------------------------------------------------------------------- inputs


def check_settings(
    instruction: str | None, steps, guidance_scale, image_guidance_scale, seed
) -> tuple[str, int, float, float, int]:
    """The page's values, validated: a non-empty instruction, 1..MAX_STEPS steps, finite
    scales, an integer seed."""
    text = (instruction or "").strip()
    if not text:
        raise DemoInputError("The instruction is empty: type what to change in the image.")
    try:
        steps = int(steps)
        guidance_scale = float(guidance_scale)
        image_guidance_scale = float(image_guidance_scale)
        seed = int(seed or 0)
    except (TypeError, ValueError):
        raise DemoInputError("Steps and seed must be integers and αV, αX numbers.") from None
    if not 1 <= steps <= MAX_STEPS:
        raise DemoInputError(f"Steps must be between 1 and {MAX_STEPS}, got {steps}.")
    if not (math.isfinite(guidance_scale) and math.isfinite(image_guidance_scale)):
        raise DemoInputError("αV and αX must be finite numbers.")
    return text, steps, guidance_scale, image_guidance_scale, seed


def read_picture(
    path: str | Path | None, max_pixels: int = MAX_INPUT_PIXELS, name: str | None = None
) -> Image.Image:
    """An uploaded file as an upright RGB picture (:func:`editbench.commands.edit.open_image`),
    or a :class:`DemoInputError` saying what is wrong with it (naming the file as ``name``,
    default its file name: not the server's upload folder)."""
    if not path:
        raise DemoInputError("Upload an image or pick an example first.")
    try:
        return open_image(path, max_pixels, label=name or Path(str(path)).name)
    except CommandInputError as err:
        raise DemoInputError(str(err)) from None


def parse_values(text: str, what: str) -> list[float]:
    """``"1, 1.5, 2"`` -> [1.0, 1.5, 2.0]; also ``start:stop:step`` (stop included)."""
    text = (text or "").strip()
    try:
        if text.count(":") == 2:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            count = int(math.floor((stop - start) / step + 1e-9)) + 1
            values = [round(start + i * step, 6) for i in range(count)]
        else:
            values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise DemoInputError(
            f"{what}: give numbers separated by commas (1, 1.5, 2) or start:stop:step."
        ) from None
    if not values or not all(math.isfinite(v) for v in values):
        raise DemoInputError(f"{what}: give at least one finite number.")
    return values


# --------------------------------------------------------------------------- the αV x αX grid


def grid_image(
    cells: Sequence[Sequence[Image.Image]],
    row_values: Sequence[float],
    col_values: Sequence[float],
    row_name: str = "alphaV",
    col_name: str = "alphaX",
    min_side: int = 96,
) -> Image.Image:
    """Edited pictures ``cells[r][c]`` in one image, rows labelled ``row_name=…`` and columns
    ``col_name=…`` (PIL's built-in font, ASCII: nothing is fetched); cells smaller than
    ``min_side`` are enlarged by an integer factor (nearest neighbour) to be seen."""
    width, height = cells[0][0].size
    factor = max(1, math.ceil(min_side / min(width, height)))
    width, height = width * factor, height * factor
    pad, label_w, label_h = 4, 90, 18
    canvas = Image.new(
        "RGB",
        (label_w + len(col_values) * (width + pad), label_h + len(row_values) * (height + pad)),
        "white",
    )
    draw = ImageDraw.Draw(canvas)
    for c, value in enumerate(col_values):
        draw.text((label_w + c * (width + pad), 2), f"{col_name}={value:g}", fill="black")
    for r, value in enumerate(row_values):
        y = label_h + r * (height + pad)
        draw.text((2, y + height // 2 - 6), f"{row_name}={value:g}", fill="black")
        for c, cell in enumerate(cells[r]):
            cell = cell.resize((width, height), Image.Resampling.NEAREST) if factor > 1 else cell
            canvas.paste(cell, (label_w + c * (width + pad), y))
    return canvas


def run_grid(
    model: DemoModel,
    picture: Image.Image,
    instruction: str,
    image_guidance_scales: Sequence[float],
    guidance_scales: Sequence[float],
    *,
    steps: int,
    seed: int,
    image_scale: float | None = None,
    on_step: ProgressFn | None = None,
) -> tuple[Image.Image, list[list[Image.Image]]]:
    """The MGIE Fig. 3 trade-off for one picture: an edit per (αV row, αX column), all from
    the same seed (the same initial noise), each at the model's input size."""
    count = len(image_guidance_scales) * len(guidance_scales)
    if count > MAX_GRID_CELLS:
        raise DemoInputError(f"The grid has {count} cells; at most {MAX_GRID_CELLS}.")
    source = image_to_tensor(picture, model.resolution)
    total, done = count * steps, [0]

    def step(i: int, _n: int) -> None:
        if on_step is not None:
            on_step(done[0] + i, total)

    rows = []
    for alpha_v in image_guidance_scales:
        row = []
        for alpha_x in guidance_scales:
            out = model.edit_tensor(
                source,
                instruction,
                guidance_scale=alpha_x,
                image_guidance_scale=alpha_v,
                steps=steps,
                seed=seed,
                image_scale=image_scale,
                on_step=step,
            )
            done[0] += steps
            row.append(tensor_to_image(out.images[0]))
        rows.append(row)
    return grid_image(rows, image_guidance_scales, guidance_scales), rows


# --------------------------------------------------------------------------- the gallery


def synthetic_examples(root: str | Path | None, count: int = 8) -> list[tuple[str, str]]:
    """(source image path, instruction) of the first ``count`` samples of a synthetic
    dataset's test split (``<root>/test.jsonl``); [] when there is none."""
    if root is None:
        return []
    manifest = Path(root) / "test.jsonl"
    if not manifest.is_file():
        return []
    examples = []
    for line in manifest.read_text(encoding="utf-8").splitlines()[:count]:
        record = json.loads(line)
        examples.append((str((Path(root) / record["source"]).resolve()), record["instruction"]))
    return examples


def example_root(data_hparams: dict, override: str | Path | None, resolution: int | None) -> Path:
    """Where the gallery comes from: ``override``; else the model's synthetic DataModule root
    when it has been generated; else a small synthetic test split generated now into a
    temporary folder (8 samples, seconds)."""
    if override:
        return Path(override)
    root = data_hparams.get("root")
    synthetic = "synthetic" in str(data_hparams.get("_class_path") or "").lower()
    if synthetic and root and (Path(root) / "test.jsonl").is_file():
        return Path(root)
    from datamodules.synthetic import generate_synthetic

    folder = Path(tempfile.mkdtemp(prefix="editbench-demo-examples-"))
    side = min(int(resolution or 64), 256)
    return generate_synthetic(folder, num_train=0, num_val=0, num_test=8, resolution=side)
