"""Pixel-level edit metrics: whole-image L1, edit-region L1, SSIM and PSNR.

Conventions shared by every metric here:

- ``preds`` and ``target`` are float tensors ``[B, C, H, W]`` (C = 3 for the suite's RGB
  images) in the suite's range ``[-1, 1]``. Each metric maps them to ``[0, 1]`` with
  ``x / 2 + 0.5`` and clamps to ``[0, 1]`` before measuring, so the reported numbers are on
  ``[0, 1]`` images (the scale MagicBrush and MGIE report). Half-precision inputs are promoted
  to float32 first.
- If ``preds`` and ``target`` differ in spatial size, ``preds`` is resized to the target's size
  (``torch.nn.functional.interpolate``, ``align_corners=False``, ``antialias=True``, then
  clamped to ``[0, 1]``), as MagicBrush's evaluation resizes the generated image to the ground
  truth's size. The interpolation is ``resize_mode`` (``"bicubic"`` by default, or
  ``"bilinear"``); torch's antialiased resize agrees with Pillow's ``Image.resize`` on float
  images to ~1e-6. Bicubic is the default because MagicBrush's script calls ``Image.resize``
  without a filter, which Pillow (>= 7) treats as BICUBIC on 8-bit RGB images. The metrics
  do not quantise to 8 bits as the script's PNGs are; the evaluator's native-resolution
  scoring (:mod:`metrics.native`) quantises and resizes with PIL itself before any metric
  sees the images.
- Every metric is a mean over images of a per-image value (each image weighs the same,
  whatever the batch sizes; PSNR's ``pooled`` option aside), accumulated in ``"sum"``-reduced
  states so it is exact under DDP.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)
from torchmetrics.utilities import rank_zero_warn

from metrics.samples import SampleRecorder

ResizeMode = Literal["bilinear", "bicubic"]
_RESIZE_MODES = ("bilinear", "bicubic")

# SSIM constants (torchmetrics' defaults, Wang et al. 2004): an 11x11 gaussian window of
# sigma 1.5 (torchmetrics derives the size 2 * int(3.5 * sigma + 0.5) + 1 = 11 from sigma),
# K1 = 0.01, K2 = 0.03, and a data range of 1.0 for [0, 1] images.
SSIM_SIGMA = 1.5
SSIM_KERNEL_SIZE = 11
SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_DATA_RANGE = 1.0
_SSIM_BORDER = (SSIM_KERNEL_SIZE - 1) // 2


def to_unit_range(images: Tensor) -> Tensor:
    """Map images from ``[-1, 1]`` to ``[0, 1]`` (``x / 2 + 0.5``, clamped), at least float32."""
    if not torch.is_floating_point(images):
        raise TypeError(f"Expected a floating point image tensor in [-1, 1], got {images.dtype}.")
    images = images.to(torch.promote_types(images.dtype, torch.float32))
    return (images / 2 + 0.5).clamp(0.0, 1.0)


def _check_resize_mode(resize_mode: str) -> None:
    if resize_mode not in _RESIZE_MODES:
        raise ValueError(f"`resize_mode` must be one of {_RESIZE_MODES}, got {resize_mode!r}.")


def _check_pair(preds: Tensor, target: Tensor) -> None:
    if not isinstance(preds, Tensor) or not isinstance(target, Tensor):
        raise TypeError("`preds` and `target` must be tensors.")
    if preds.ndim != 4 or target.ndim != 4:
        raise ValueError(
            "Expected `preds` and `target` of shape [B, C, H, W], got "
            f"{tuple(preds.shape)} and {tuple(target.shape)}."
        )
    if preds.shape[:2] != target.shape[:2]:
        raise ValueError(
            "`preds` and `target` must have the same batch size and channels, got "
            f"{tuple(preds.shape)} and {tuple(target.shape)}."
        )


def at_least_float32(x: Tensor) -> Tensor:
    """Promote half and bfloat16 tensors to float32; leave float32/float64 as they are."""
    return x.float() if x.is_floating_point() and x.element_size() < 4 else x


def prepare_pair(
    preds: Tensor, target: Tensor, resize_mode: ResizeMode = "bicubic"
) -> tuple[Tensor, Tensor]:
    """Validate a batch and return ``(preds, target)`` on ``[0, 1]`` at the target's size.

    ``preds`` is resized to the target's spatial size when they differ (antialiased
    ``resize_mode`` interpolation, then clamped to ``[0, 1]``).
    """
    _check_resize_mode(resize_mode)
    _check_pair(preds, target)
    preds01, target01 = to_unit_range(preds), to_unit_range(target)
    if preds01.shape[-2:] != target01.shape[-2:]:
        preds01 = F.interpolate(
            preds01,
            size=tuple(target01.shape[-2:]),
            mode=resize_mode,
            align_corners=False,
            antialias=True,
        ).clamp(0.0, 1.0)
    dtype = torch.promote_types(preds01.dtype, target01.dtype)
    return preds01.to(dtype), target01.to(dtype)


class L1(SampleRecorder, Metric):
    """Mean absolute error on ``[0, 1]`` images, as in MagicBrush's evaluation.

    Per image: the mean of ``|preds - target|`` over all pixels and channels of the ``[0, 1]``
    images (``x / 2 + 0.5``, clamped). The metric is the mean of these per-image values over
    all images seen (states: ``sum_l1``, ``num_images``; both ``"sum"``-reduced). If ``preds``
    and ``target`` differ in spatial size, ``preds`` is first resized to the target's size
    (antialiased ``resize_mode`` interpolation, bicubic by default; see the module docstring
    for how this relates to MagicBrush's PIL resize). Lower is better; 0 for identical images,
    1 for a black image against a white one. ``compute()`` before any update gives nan.

    Args:
        resize_mode: ``"bicubic"`` (default) or ``"bilinear"``, used only on a size mismatch.
    """

    is_differentiable = True
    higher_is_better = False
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    sum_l1: Tensor
    num_images: Tensor

    def __init__(self, resize_mode: ResizeMode = "bicubic", **kwargs) -> None:
        super().__init__(**kwargs)
        _check_resize_mode(resize_mode)
        self.resize_mode = resize_mode
        self.add_state("sum_l1", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state(
            "num_images", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum"
        )

    def provenance(self) -> dict:
        """How this metric measures (for the results' protocol block)."""
        return {
            "definition": "per-image mean |preds - target| on [0,1] images, mean over images",
            "resize": f"preds resized to the target's size ({self.resize_mode}, antialiased) "
            "when they differ",
        }

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch: ``preds`` and ``target`` are ``[B, C, H, W]`` in ``[-1, 1]``."""
        preds01, target01 = prepare_pair(preds, target, self.resize_mode)
        per_image = (preds01 - target01).abs().flatten(1).mean(dim=1)
        self.sum_l1 += per_image.sum()
        self.num_images += per_image.numel()
        self.record(per_image)

    def compute(self) -> Tensor:
        """The mean over images of the per-image L1 (nan when no image was seen)."""
        return self.sum_l1 / self.num_images


class MaskedL1(L1):
    """L1 inside the edit region (reported as ``L1_edit``), on ``[0, 1]`` images.

    ``update(preds, target, mask)`` takes a ``mask`` of shape ``[B, 1, H, W]`` at the target's
    size, with values in ``{0, 1}`` (1 = edited region; bool is accepted; values in between act
    as pixel weights). Per image:
    ``sum(|preds - target| * mask) / (sum(mask) * C)``, i.e. the mean absolute difference over
    the masked pixels and all channels of the ``[0, 1]`` images (``x / 2 + 0.5``, clamped). The
    metric is the mean of these values over the scored images (states ``sum_l1``,
    ``num_images``, ``"sum"``-reduced). ``preds`` is resized to the target's size first if
    they differ, as in :class:`L1`.

    Images whose mask is empty (``sum(mask) == 0``) have no edit region: they are not scored
    and not averaged in, but counted in the ``num_empty`` state (``metric.num_empty``). If no
    image was scored, ``compute()`` returns nan (with a warning when empty masks were the
    reason) rather than 0, so that a missing region never reads as a perfect edit.

    Args:
        resize_mode: ``"bicubic"`` (default) or ``"bilinear"``, used only on a size mismatch.
    """

    num_empty: Tensor

    def __init__(self, resize_mode: ResizeMode = "bicubic", **kwargs) -> None:
        super().__init__(resize_mode, **kwargs)
        self.add_state("num_empty", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def provenance(self) -> dict:
        """How this metric measures (for the results' protocol block)."""
        return super().provenance() | {
            "definition": "per-image mean |preds - target| over the mask (edit region) on [0,1] "
            "images, mean over images with a non-empty mask",
        }

    def update(self, preds: Tensor, target: Tensor, mask: Tensor) -> None:
        """Add a batch: images ``[B, C, H, W]`` in ``[-1, 1]``, ``mask`` ``[B, 1, H, W]`` in {0, 1}."""
        preds01, target01 = prepare_pair(preds, target, self.resize_mode)
        if not isinstance(mask, Tensor):
            raise TypeError("`mask` must be a tensor of shape [B, 1, H, W].")
        batch, channels, height, width = target01.shape
        if mask.shape != (batch, 1, height, width):
            raise ValueError(
                f"Expected `mask` of shape {(batch, 1, height, width)} (the target's batch and size, "
                f"one channel), got {tuple(mask.shape)}."
            )
        weights = mask.to(target01.dtype)
        if bool(((weights < 0) | (weights > 1)).any()):
            raise ValueError("`mask` values must lie in [0, 1] (1 = edited region).")
        abs_diff = (preds01 - target01).abs()
        numerator = (abs_diff * weights).sum(dim=(1, 2, 3))
        denominator = weights.sum(dim=(1, 2, 3)) * channels
        scored = denominator > 0
        per_image = numerator / denominator.clamp_min(torch.finfo(denominator.dtype).tiny)
        self.sum_l1 += torch.where(scored, per_image, torch.zeros_like(per_image)).sum()
        self.num_images += scored.sum()
        self.num_empty += (~scored).sum()
        self.record(per_image, valid=scored)

    def compute(self) -> Tensor:
        """The mean over scored images of the per-image masked L1 (nan if none was scored)."""
        if int(self.num_images) == 0:
            if int(self.num_empty) > 0:
                rank_zero_warn(
                    f"{type(self).__name__}: all {int(self.num_empty)} images had an empty mask, so "
                    "the edit-region L1 is undefined; returning nan.",
                    UserWarning,
                )
            return torch.tensor(float("nan"), device=self.sum_l1.device)
        return self.sum_l1 / self.num_images


class SSIM(SampleRecorder, Metric):
    """Structural similarity on ``[0, 1]`` images, with torchmetrics' SSIM semantics.

    Images are mapped to ``[0, 1]`` (``x / 2 + 0.5``, clamped), ``preds`` is resized to the
    target's size if they differ (as in :class:`L1`), and SSIM is computed by
    ``torchmetrics.functional.image.structural_similarity_index_measure`` with a gaussian
    window (11x11, sigma 1.5), K1 = 0.01, K2 = 0.03 and an explicit ``data_range=1.0``. Per
    image: the mean of the SSIM map over all pixels and channels; the metric is the mean over
    images (states ``sum_ssim``, ``num_images``, ``"sum"``-reduced). Higher is better; 1 for
    identical images. Images must be at least 11x11.

    Borders: torchmetrics reflect-pads each image by 5 pixels (``torch`` "reflect", which does
    not repeat the edge pixel) and averages the SSIM map over the whole image, whereas
    ``skimage.metrics.structural_similarity`` (``gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1.0``) filters with scipy's "reflect" (which
    repeats it) and drops a 5-pixel border before averaging. The interior SSIM maps agree
    exactly (to ~1e-5 in float32), but the image means differ because the 5-pixel frame holds
    29% of a 64x64 image: on 64x64 images we measured differences of up to 0.011 (random
    images) and 0.034 (smooth images) with skimage; at 256x256 up to 0.005. Pass
    ``crop_border=True`` to drop that frame as skimage does; the value then matches skimage's
    to ~1e-5.

    Args:
        crop_border: average the SSIM map without its 5-pixel border (skimage's convention).
            Default False (torchmetrics' convention, the suite's reported SSIM).
        resize_mode: ``"bicubic"`` (default) or ``"bilinear"``, used only on a size mismatch.
    """

    is_differentiable = True
    higher_is_better = True
    full_state_update = False
    plot_upper_bound = 1.0

    sum_ssim: Tensor
    num_images: Tensor

    def __init__(
        self, crop_border: bool = False, resize_mode: ResizeMode = "bicubic", **kwargs
    ) -> None:
        super().__init__(**kwargs)
        _check_resize_mode(resize_mode)
        self.crop_border = crop_border
        self.resize_mode = resize_mode
        self.add_state("sum_ssim", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state(
            "num_images", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum"
        )

    def provenance(self) -> dict:
        """How this metric measures (for the results' protocol block)."""
        return {
            "definition": "torchmetrics SSIM, gaussian 11x11 sigma 1.5, K=(0.01, 0.03), "
            "data_range 1 on [0,1] images, per-image mean, mean over images",
            "crop_border": self.crop_border,
            "resize": f"preds resized to the target's size ({self.resize_mode}, antialiased) "
            "when they differ",
        }

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch: ``preds`` and ``target`` are ``[B, C, H, W]`` in ``[-1, 1]``.

        Computed in float32 with autocast disabled: under a bf16 autocast (a model tested with
        ``precision: bf16-mixed``) the gaussian convolutions would run in bf16 and SSIM's
        variance terms lose all precision (the copy baseline's 0.91 read as -0.46 on a GPU).
        """
        with torch.autocast(device_type=preds.device.type, enabled=False):
            self._update(at_least_float32(preds), at_least_float32(target))

    def _update(self, preds: Tensor, target: Tensor) -> None:
        preds01, target01 = prepare_pair(preds, target, self.resize_mode)
        if min(target01.shape[-2:]) < SSIM_KERNEL_SIZE:
            raise ValueError(
                f"SSIM needs images of at least {SSIM_KERNEL_SIZE}x{SSIM_KERNEL_SIZE} (its gaussian "
                f"window), got {tuple(target01.shape[-2:])}."
            )
        kwargs = {
            "gaussian_kernel": True,
            "sigma": SSIM_SIGMA,
            "kernel_size": SSIM_KERNEL_SIZE,
            "data_range": SSIM_DATA_RANGE,
            "k1": SSIM_K1,
            "k2": SSIM_K2,
            "reduction": "none",
        }
        if self.crop_border:
            _, ssim_map = structural_similarity_index_measure(
                preds01, target01, return_full_image=True, **kwargs
            )
            b = _SSIM_BORDER
            per_image = ssim_map[..., b:-b, b:-b].flatten(1).mean(dim=1)
        else:
            per_image = structural_similarity_index_measure(preds01, target01, **kwargs)
        self.sum_ssim += per_image.sum()
        self.num_images += per_image.numel()
        self.record(per_image)

    def compute(self) -> Tensor:
        """The mean over images of the per-image SSIM (nan when no image was seen)."""
        return self.sum_ssim / self.num_images


#: PSNR's data range: the metrics measure ``[0, 1]`` images.
PSNR_DATA_RANGE = 1.0
PSNRReduction = Literal["image", "pooled"]


class PSNR(SampleRecorder, Metric):
    """Peak signal-to-noise ratio in dB on ``[0, 1]`` images (``data_range=1.0``, explicit).

    Images are mapped to ``[0, 1]`` (``x / 2 + 0.5``, clamped) and ``preds`` is resized to the
    target's size if they differ (as in :class:`L1`). Per image, torchmetrics'
    ``peak_signal_noise_ratio(preds, target, data_range=1.0, dim=(1, 2, 3),
    reduction="none")``: ``10 * log10(1 / MSE)`` with the MSE over all pixels and channels.

    Reduction (``reduction``):

    - ``"image"`` (default): the mean over images of the per-image PSNR. This is what the
      evaluation InsightEdit builds on does: SmartEdit's released ``test/metrics_evaluation.py``
      calls torchmetrics' ``PeakSignalNoiseRatio(data_range=1.0)`` on one image at a time and
      averages the returned values (InsightEdit released no evaluation code and its text does
      not say; its AdvancedEdit-Eval columns are SmartEdit's PSNR/SSIM/LPIPS/CLIPScore plus
      VIEScore). Each image weighs the same, whatever the batch sizes.
    - ``"pooled"``: torchmetrics' default accumulation (``PeakSignalNoiseRatio`` with
      ``dim=None``): one PSNR of the squared error pooled over every pixel of every image
      seen. Since ``-log10`` is convex this is at most the per-image mean; the two agree only
      when every image has the same MSE.

    States are ``"sum"``-reduced (``sum_psnr``, ``sum_squared_error``, ``num_values``,
    ``num_images``), so the value is exact under DDP. An image identical to its target has
    ``MSE = 0`` and PSNR ``inf`` (as torchmetrics and scikit-image give), so the mean is
    ``inf`` too. Higher is better. ``compute()`` before any update gives nan.

    Args:
        reduction: ``"image"`` (default) or ``"pooled"``.
        resize_mode: ``"bicubic"`` (default) or ``"bilinear"``, used only on a size mismatch.
    """

    is_differentiable = True
    higher_is_better = True
    full_state_update = False

    sum_psnr: Tensor
    sum_squared_error: Tensor
    num_values: Tensor
    num_images: Tensor

    def __init__(
        self,
        reduction: PSNRReduction = "image",
        resize_mode: ResizeMode = "bicubic",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if reduction not in ("image", "pooled"):
            raise ValueError(f"`reduction` must be 'image' or 'pooled', got {reduction!r}.")
        _check_resize_mode(resize_mode)
        self.reduction = reduction
        self.resize_mode = resize_mode
        for name, dtype in (
            ("sum_psnr", torch.float64),
            ("sum_squared_error", torch.float64),
            ("num_values", torch.long),
            ("num_images", torch.long),
        ):
            self.add_state(name, default=torch.tensor(0, dtype=dtype), dist_reduce_fx="sum")

    def provenance(self) -> dict:
        """How this metric measures (for the results' protocol block)."""
        definition = {
            "image": "torchmetrics PSNR, data_range 1 on [0,1] images, per image, mean over images",
            "pooled": "torchmetrics PSNR, data_range 1 on [0,1] images, of the squared error "
            "pooled over all images",
        }[self.reduction]
        return {
            "definition": definition,
            "resize": f"preds resized to the target's size ({self.resize_mode}, antialiased) "
            "when they differ",
        }

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch: ``preds`` and ``target`` are ``[B, C, H, W]`` in ``[-1, 1]``."""
        with torch.autocast(device_type=preds.device.type, enabled=False):
            preds01, target01 = prepare_pair(at_least_float32(preds), at_least_float32(target))
            per_image = peak_signal_noise_ratio(
                preds01, target01, data_range=PSNR_DATA_RANGE, dim=(1, 2, 3), reduction="none"
            )
            squared = (preds01 - target01).to(torch.float64).square()
        self.sum_psnr += per_image.to(torch.float64).sum()
        self.sum_squared_error += squared.sum()
        self.num_values += squared.numel()
        self.num_images += per_image.numel()
        per_image_squared = squared.flatten(1)
        self.record(
            per_image,
            sse=per_image_squared.sum(dim=1),
            n=per_image_squared.new_full((len(per_image),), per_image_squared.shape[1]),
        )

    @property
    def sample_reduction(self) -> str:  # type: ignore[override]
        """``mean`` of the per-image PSNR, or the pooled PSNR from per-image ``sse``/``n``."""
        return "mean" if self.reduction == "image" else "pooled_psnr"

    def compute(self) -> Tensor:
        """The mean per-image PSNR (``"image"``) or the pooled PSNR (``"pooled"``), in dB."""
        if self.reduction == "image":
            return (self.sum_psnr / self.num_images).float()
        mse = self.sum_squared_error / self.num_values
        return (10 * torch.log10(PSNR_DATA_RANGE**2 / mse)).float()
