"""Feature-based edit metrics: DINO, CLIP-I (CVS), CLIP-T (CTS) and CLIP directional metrics.

Conventions (shared with :mod:`metrics.pixel`):

- Images are float tensors ``[B, 3, H, W]`` in the suite's range ``[-1, 1]``; they are mapped
  to ``[0, 1]`` (``x / 2 + 0.5``, clamped) and promoted to float32. Every ``update`` runs in
  float32 with autocast disabled, so a ``bf16-mixed`` run does not score in bf16.
- Each metric is a mean over images of a per-image cosine similarity, accumulated in
  ``"sum"``-reduced states (``sum_cos``, ``num_images``), so it is exact under DDP.
  ``compute()`` before any update gives nan. Values are raw cosines in ``[-1, 1]``: MGIE's
  tables report DINO/CVS as percentages and CTS as ``100 * cos``; that scaling belongs to
  the reporting protocol, not here.

Backbones are loaded offline with ``transformers`` (``CLIPModel`` + ``CLIPProcessor`` for the
CLIP metrics, ``AutoModel`` + ``AutoImageProcessor`` for DINO, e.g. the
``facebook/dino-vits16`` layout) from a local folder, frozen and in eval mode. They are cached
per (resolved folder, device) by :func:`load_clip` / :func:`load_dino`, so CVS, CTS and the
directional metrics built on the same folder share one CLIP. A metric keeps only the folder
path: the backbone is looked up in the cache on the device of the images at each ``update``,
and is never registered as a submodule, so it is not moved by ``metric.to(...)`` bookkeeping
and never lands in the metric's ``state_dict`` (nor in a Lightning checkpoint).

Preprocessing is done on batched tensors with ``torchvision.transforms.v2.functional``, using
the processor's own config values (``size``, ``crop_size``, ``resample``, ``rescale_factor``,
``image_mean``/``image_std``): resize (antialiased, then clamped to ``[0, 1]``), center crop,
normalise. This matches the processor (which works on 8-bit PIL images or uint8 tensors) up to
resize-kernel differences and the processor's 8-bit quantisation; where the resize is the
identity (images already at the target size) the pixel values agree to float precision.
InstructPix2Pix's metrics (``CLIP_direction``, ``CLIP_image``) instead follow its
``metrics/clip_similarity.py`` by default: a square bicubic resize without crop
(:mod:`metrics.ip2p`, ``preprocess="instructpix2pix"``).

DINO follows MagicBrush's protocol by default (``transform="magicbrush"``): Resize 256
(shortest edge, bicubic), CenterCrop 224, ImageNet mean/std, then the ViT's CLS token of the
last (layer-normalised) hidden state. ``transform="processor"`` uses the DINO processor's config
instead (``facebook/dino-vits16`` ships a plain 224x224 bilinear resize).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from metrics.ip2p import (
    DESCRIPTIONS,
    RANGE_DESCRIPTIONS,
    ClipInputRange,
    ClipPreprocess,
    check_options,
    clip_input_size,
    preprocess_instructpix2pix,
)
from metrics.pixel import at_least_float32, to_unit_range
from metrics.samples import SampleRecorder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAGICBRUSH_DINO_RESIZE = 256
MAGICBRUSH_DINO_CROP = 224
DIRECTION_EPS = 1e-4  # CLIPDirectionalSimilarity: shorter unit-embedding differences count as 0

# PIL's resampling filters (``PIL.Image.Resampling`` values, as processors store them) to
# torchvision's modes. LANCZOS (1), BOX (4) and HAMMING (5) have no tensor kernel in
# torchvision: they fall back to BICUBIC.
_PIL_TO_TORCHVISION = {
    0: InterpolationMode.NEAREST_EXACT,
    1: InterpolationMode.BICUBIC,
    2: InterpolationMode.BILINEAR,
    3: InterpolationMode.BICUBIC,
    4: InterpolationMode.BICUBIC,
    5: InterpolationMode.BICUBIC,
}

DinoTransform = Literal["magicbrush", "processor"]


# --------------------------------------------------------------------------- backbones


def _resolve(path: str | Path, metric: str, kind: str, what: str) -> str:
    folder = Path(path).expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{metric}: no {kind} checkpoint at {folder} (expected a local folder with "
            f"config.json). Place there {what} (saved with `save_pretrained`); nothing is "
            "downloaded."
        )
    return str(folder)


_CLIP_WHAT = (
    "a CLIP checkpoint, e.g. `openai/clip-vit-base-patch32` (CLIPModel weights + config and "
    "the CLIPProcessor files: preprocessor_config.json, tokenizer vocab.json/merges.txt)"
)
_DINO_WHAT = (
    "a DINO ViT checkpoint, e.g. `facebook/dino-vits16` (ViTModel weights + config and "
    "preprocessor_config.json)"
)


def _freeze(model: torch.nn.Module, device: str) -> torch.nn.Module:
    model = model.to(device=device, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model


@functools.lru_cache(maxsize=8)
def _cached_clip(folder: str, device: str) -> tuple[Any, Any]:
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder, local_files_only=True)
    processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    return _freeze(model, device), processor


@functools.lru_cache(maxsize=8)
def _cached_dino(folder: str, device: str) -> tuple[Any, Any]:
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(folder, local_files_only=True)
    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    return _freeze(model, device), processor


def load_clip(
    path: str | Path, device: str | torch.device = "cpu", metric: str = "CLIP"
) -> tuple[Any, Any]:
    """``(CLIPModel, CLIPProcessor)`` from a local folder: frozen, eval, float32, on ``device``.

    Cached per (resolved folder, device). A folder without ``config.json`` raises
    ``FileNotFoundError`` naming ``metric``, the path and what to place there.
    """
    return _cached_clip(_resolve(path, metric, "CLIP", _CLIP_WHAT), str(torch.device(device)))


def load_dino(
    path: str | Path, device: str | torch.device = "cpu", metric: str = "DINO"
) -> tuple[Any, Any]:
    """``(AutoModel, AutoImageProcessor)`` of a DINO ViT folder; cached like :func:`load_clip`."""
    return _cached_dino(_resolve(path, metric, "DINO", _DINO_WHAT), str(torch.device(device)))


def backbone_cache_info() -> dict[str, Any]:
    """``functools`` cache statistics of the CLIP and DINO loaders (hits, misses, size)."""
    return {"clip": _cached_clip.cache_info(), "dino": _cached_dino.cache_info()}


def clear_backbone_cache() -> None:
    """Drop every cached backbone (the next ``update`` reloads from disk)."""
    _cached_clip.cache_clear()
    _cached_dino.cache_clear()


# --------------------------------------------------------------------------- preprocessing


def _field(config: Any, key: str) -> Any:
    if config is None:
        return None
    if isinstance(config, dict):
        return config.get(key)
    return getattr(config, key, None)


def interpolation_mode(resample: Any) -> InterpolationMode:
    """A processor's ``resample`` (PIL filter id/enum or InterpolationMode) as torchvision's."""
    if isinstance(resample, InterpolationMode):
        return resample
    if resample is None:
        return InterpolationMode.BICUBIC
    return _PIL_TO_TORCHVISION.get(int(resample), InterpolationMode.BICUBIC)


def _resize(images01: Tensor, size: list[int], mode: InterpolationMode) -> Tensor:
    if list(images01.shape[-2:]) == size or (
        len(size) == 1 and min(images01.shape[-2:]) == size[0]
    ):
        return images01  # the identity: skip the kernel
    out = TF.resize(images01, size, interpolation=mode, antialias=True)
    return out.clamp(0.0, 1.0)


def preprocess_with_processor(images: Tensor, processor: Any) -> Tensor:
    """``[B, 3, H, W]`` images in ``[-1, 1]`` → the model's ``pixel_values``, batched.

    Follows the image processor's config: ``do_resize`` with ``size`` (``shortest_edge``
    keeps the aspect ratio; ``height``/``width`` is exact) and ``resample``;
    ``do_center_crop`` with ``crop_size``; ``do_rescale`` (``rescale_factor * 255`` on ``[0,
    1]`` images, i.e. 1 for the usual 1/255); ``do_normalize`` with ``image_mean`` /
    ``image_std``. Equal to the processor's output up to resize-kernel differences.
    """
    image_processor = getattr(processor, "image_processor", processor)
    x = to_unit_range(images)
    if _field(image_processor, "do_resize") is not False:
        size = _field(image_processor, "size")
        mode = interpolation_mode(_field(image_processor, "resample"))
        if _field(size, "shortest_edge"):
            x = _resize(x, [int(_field(size, "shortest_edge"))], mode)
        elif _field(size, "height") and _field(size, "width"):
            x = _resize(x, [int(_field(size, "height")), int(_field(size, "width"))], mode)
    if _field(image_processor, "do_center_crop"):
        crop = _field(image_processor, "crop_size")
        x = TF.center_crop(x, [int(_field(crop, "height")), int(_field(crop, "width"))])
    if _field(image_processor, "do_rescale") is not False:
        factor = _field(image_processor, "rescale_factor")
        if factor is not None and abs(float(factor) * 255 - 1) > 1e-9:
            x = x * (float(factor) * 255)
    if _field(image_processor, "do_normalize") is not False:
        mean = _field(image_processor, "image_mean")
        std = _field(image_processor, "image_std")
        if mean is not None and std is not None:
            x = TF.normalize(x, list(map(float, mean)), list(map(float, std)))
    return x


def preprocess_magicbrush_dino(images: Tensor) -> Tensor:
    """MagicBrush's DINO transform on ``[-1, 1]`` images: Resize 256 (shortest edge, bicubic),
    CenterCrop 224, ImageNet normalisation; batched."""
    x = _resize(to_unit_range(images), [MAGICBRUSH_DINO_RESIZE], InterpolationMode.BICUBIC)
    x = TF.center_crop(x, [MAGICBRUSH_DINO_CROP, MAGICBRUSH_DINO_CROP])
    return TF.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD))


# --------------------------------------------------------------------------- embeddings


def _projected(output: Any) -> Tensor:
    """``get_image_features``/``get_text_features`` output as a tensor (transformers 5 may
    return an output object whose ``pooler_output`` is the projected embedding)."""
    if isinstance(output, Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, Tensor):
        return pooled
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"Cannot read an embedding from {type(output).__name__}.")


def clip_image_embeddings(model: Any, processor: Any, images: Tensor) -> Tensor:
    """Projected CLIP image embeddings ``[B, D]`` (not normalised) of ``[-1, 1]`` images."""
    pixel_values = preprocess_with_processor(images, processor)
    return _projected(model.get_image_features(pixel_values=pixel_values)).float()


def clip_text_embeddings(model: Any, processor: Any, captions: list[str], device) -> Tensor:
    """Projected CLIP text embeddings ``[B, D]`` (not normalised) of ``captions``."""
    tokenizer = getattr(processor, "tokenizer", processor)
    max_length = getattr(getattr(model.config, "text_config", None), "max_position_embeddings", 77)
    tokens = tokenizer(
        list(captions), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    tokens = {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
    return _projected(model.get_text_features(**tokens)).float()


def dino_cls_features(model: Any, pixel_values: Tensor) -> Tensor:
    """CLS token of the last hidden state (after the ViT's final layer norm), ``[B, D]``."""
    return model(pixel_values=pixel_values).last_hidden_state[:, 0].float()


def _check_images(name: str, *images: Tensor) -> None:
    for x in images:
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} expects images of shape [B, 3, H, W], got {shape}.")
    if len({x.shape[0] for x in images}) > 1:
        raise ValueError(f"{name}: batch sizes differ: {[x.shape[0] for x in images]}.")


def _check_captions(name: str, captions: Any, batch: int, arg: str) -> list[str]:
    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
        raise TypeError(f"{name}: `{arg}` must be a list of strings, one per image.")
    captions = list(captions)
    if len(captions) != batch:
        raise ValueError(f"{name}: {len(captions)} `{arg}` for {batch} images.")
    return captions


# --------------------------------------------------------------------------- metrics


class _CosineMetric(SampleRecorder, Metric):
    """Mean over images of a per-image cosine (states ``sum_cos``, ``num_images``)."""

    is_differentiable = True
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = -1.0
    plot_upper_bound = 1.0

    sum_cos: Tensor
    num_images: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("sum_cos", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state(
            "num_images", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum"
        )

    def _add(self, per_image: Tensor) -> None:
        self.sum_cos += per_image.sum().to(self.sum_cos.dtype)
        self.num_images += per_image.numel()
        self.record(per_image)

    def compute(self) -> Tensor:
        """The mean over images of the per-image cosine (nan when no image was seen)."""
        return self.sum_cos / self.num_images


class _ClipMetric(_CosineMetric):
    """A CLIP metric. ``preprocess``: ``"processor"`` (the CLIP processor's resize and centre
    crop, MagicBrush's CLIP-I/CLIP-T) or ``"instructpix2pix"`` (:mod:`metrics.ip2p`); None takes
    the class's default. ``input_range="signed"``: InstructPix2Pix's released-script range."""

    default_preprocess: ClipPreprocess = "processor"

    def __init__(
        self,
        clip_path: str | Path,
        preprocess: ClipPreprocess | None = None,
        input_range: ClipInputRange = "unit",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.clip_path = _resolve(clip_path, type(self).__name__, "CLIP", _CLIP_WHAT)
        self.preprocess = preprocess or self.default_preprocess
        self.input_range = input_range
        check_options(type(self).__name__, self.preprocess, input_range)

    def provenance(self) -> dict:
        """How this metric measures: the CLIP folder (path and weights hash) and preprocessing."""
        from metrics.provenance import backbone_record

        record = {
            "backbone": backbone_record(self.clip_path),
            "preprocess": DESCRIPTIONS[self.preprocess],
        }
        if self.preprocess == "instructpix2pix":
            record["input_range"] = f"{self.input_range}: {RANGE_DESCRIPTIONS[self.input_range]}"
        return record

    def backbone(self, device: torch.device) -> tuple[Any, Any]:
        """The shared ``(CLIPModel, CLIPProcessor)`` on ``device`` (cached, never a submodule)."""
        return load_clip(self.clip_path, device, metric=type(self).__name__)

    def _images(self, model, processor, images: Tensor) -> Tensor:
        if self.preprocess == "processor":
            return clip_image_embeddings(model, processor, images)
        pixels = preprocess_instructpix2pix(images, clip_input_size(model), self.input_range)
        return _projected(model.get_image_features(pixel_values=pixels)).float()


class DINO(_CosineMetric):
    """DINO similarity (MagicBrush's DINO): cosine of DINO ViT CLS features, preds vs target.

    ``update(preds, target)`` with ``[B, 3, H, W]`` images in ``[-1, 1]``. Per image: the
    cosine between the CLS features of ``preds`` and ``target``; the metric is the mean over
    images. 1 for identical images. Higher is better.

    Args:
        dino_path: local folder of a DINO ViT (``facebook/dino-vits16`` layout).
        transform: ``"magicbrush"`` (default: Resize 256 bicubic, CenterCrop 224, ImageNet
            normalisation) or ``"processor"`` (the folder's image processor config).
    """

    def __init__(
        self, dino_path: str | Path, transform: DinoTransform = "magicbrush", **kwargs
    ) -> None:
        super().__init__(**kwargs)
        if transform not in ("magicbrush", "processor"):
            raise ValueError(f"`transform` must be 'magicbrush' or 'processor', got {transform!r}.")
        self.dino_path = _resolve(dino_path, "DINO", "DINO", _DINO_WHAT)
        self.transform = transform

    def provenance(self) -> dict:
        """How this metric measures: the DINO folder (path and weights hash) and preprocessing."""
        from metrics.provenance import backbone_record

        preprocess = (
            "resize 256 (shorter side, bicubic), center crop 224, ImageNet mean/std (MagicBrush)"
            if self.transform == "magicbrush"
            else "the DINO processor's config"
        )
        return {
            "backbone": backbone_record(self.dino_path),
            "preprocess": preprocess,
            "features": "CLS token of the last hidden state",
        }

    def backbone(self, device: torch.device) -> tuple[Any, Any]:
        """The shared ``(model, image processor)`` on ``device`` (cached, never a submodule)."""
        return load_dino(self.dino_path, device, metric="DINO")

    def features(self, images: Tensor) -> Tensor:
        """CLS features ``[B, D]`` of ``[-1, 1]`` images."""
        model, processor = self.backbone(images.device)
        if self.transform == "magicbrush":
            pixel_values = preprocess_magicbrush_dino(images)
        else:
            pixel_values = preprocess_with_processor(images, processor)
        return dino_cls_features(model, pixel_values)

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch: ``preds`` and ``target`` are ``[B, 3, H, W]`` in ``[-1, 1]``."""
        _check_images("DINO", preds, target)
        with torch.autocast(device_type=preds.device.type, enabled=False):
            preds, target = at_least_float32(preds), at_least_float32(target)
            feats = self.features(torch.cat([preds, target]))
            a, b = feats.chunk(2)
            self._add(F.cosine_similarity(a, b, dim=-1))


class CVS(_ClipMetric):
    """CLIP-I / CVS: cosine of CLIP image embeddings of ``preds`` and ``target``.

    ``update(preds, target)`` with ``[B, 3, H, W]`` images in ``[-1, 1]``; per-image cosine of
    the projected CLIP image embeddings (ViT-B/32 in MagicBrush), mean over images. 1 for
    identical images. Higher is better.
    """

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch: ``preds`` and ``target`` are ``[B, 3, H, W]`` in ``[-1, 1]``."""
        _check_images(type(self).__name__, preds, target)
        with torch.autocast(device_type=preds.device.type, enabled=False):
            preds, target = at_least_float32(preds), at_least_float32(target)
            model, processor = self.backbone(preds.device)
            a, b = self._images(model, processor, torch.cat([preds, target])).chunk(2)
            self._add(F.cosine_similarity(a, b, dim=-1))


class CLIPImageSimilarity(CVS):
    """CLIP image similarity to the input (IP2P / MGIE Fig. 3): cosine of the CLIP image
    embeddings of ``source`` and ``preds`` (CVS against the input instead of the goal).

    ``update(source, preds)``; mean over images of the per-image cosine. Higher means the edit
    kept more of the input. Preprocessed as InstructPix2Pix's ``clip_similarity.py`` by default
    (:mod:`metrics.ip2p`).
    """

    default_preprocess: ClipPreprocess = "instructpix2pix"

    def update(self, source: Tensor, preds: Tensor) -> None:  # type: ignore[override]
        """Add a batch: ``source`` and ``preds`` are ``[B, 3, H, W]`` in ``[-1, 1]``."""
        super().update(preds, source)


class CTS(_ClipMetric):
    """CLIP-T / CTS: cosine of the CLIP image embedding of ``preds`` and the text embedding of
    its caption.

    ``update(preds, captions)`` with ``[B, 3, H, W]`` images in ``[-1, 1]`` and ``B`` strings.
    Raw cosine (MGIE reports ``100 * cos``); mean over images. Higher is better. Captions are
    truncated to the text encoder's length (77 tokens for CLIP).
    """

    def update(self, preds: Tensor, captions: list[str]) -> None:
        """Add a batch of images and their captions (one string per image)."""
        _check_images("CTS", preds)
        captions = _check_captions("CTS", captions, preds.shape[0], "captions")
        with torch.autocast(device_type=preds.device.type, enabled=False):
            preds = at_least_float32(preds)
            model, processor = self.backbone(preds.device)
            image = self._images(model, processor, preds)
            text = clip_text_embeddings(model, processor, captions, preds.device)
            self._add(F.cosine_similarity(image, text, dim=-1))


class CLIPDirectionalSimilarity(_ClipMetric):
    """CLIP directional similarity (InstructPix2Pix, MGIE Fig. 3).

    ``update(source, preds, source_captions, goal_captions)``. Embeddings are L2-normalised
    first (as InstructPix2Pix's ``ClipSimilarity``); per image: the cosine between
    ``img(preds) - img(source)`` and ``text(goal) - text(source caption)``; mean over images.
    Higher is better. An unchanged image (or identical captions) has no direction: when
    ``|img(preds) - img(source)|`` or the text difference is below ``DIRECTION_EPS`` (1e-4 on
    unit embeddings, well above the ~1e-6 float32 noise of batched matmuls, well below any
    real edit) the image scores 0 rather than the cosine of noise. Images are preprocessed as
    InstructPix2Pix's ``clip_similarity.py`` by default (:mod:`metrics.ip2p`).
    """

    default_preprocess: ClipPreprocess = "instructpix2pix"

    def update(
        self,
        source: Tensor,
        preds: Tensor,
        source_captions: list[str],
        goal_captions: list[str],
    ) -> None:
        """Add a batch: images ``[B, 3, H, W]`` in ``[-1, 1]`` and ``B`` captions of each kind."""
        name = "CLIPDirectionalSimilarity"
        _check_images(name, source, preds)
        batch = preds.shape[0]
        source_captions = _check_captions(name, source_captions, batch, "source_captions")
        goal_captions = _check_captions(name, goal_captions, batch, "goal_captions")
        with torch.autocast(device_type=preds.device.type, enabled=False):
            source, preds = at_least_float32(source), at_least_float32(preds)
            model, processor = self.backbone(preds.device)
            images = F.normalize(self._images(model, processor, torch.cat([source, preds])), dim=-1)
            texts = clip_text_embeddings(
                model, processor, source_captions + goal_captions, preds.device
            )
            texts = F.normalize(texts, dim=-1)
            img_in, img_out = images.chunk(2)
            text_in, text_out = texts.chunk(2)
            img_dir, text_dir = img_out - img_in, text_out - text_in
            cos = F.cosine_similarity(img_dir, text_dir, dim=-1)
            # A direction shorter than float32 noise on unit vectors has no meaning: score 0.
            still = (img_dir.norm(dim=-1) < DIRECTION_EPS) | (text_dir.norm(dim=-1) < DIRECTION_EPS)
            self._add(torch.where(still, torch.zeros_like(cos), cos))
