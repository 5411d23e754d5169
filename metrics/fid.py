"""Distribution-level edit metrics: FID and KID (torchmetrics), on the suite's ``[-1, 1]`` images.

:class:`FID` and :class:`KID` subclass torchmetrics' ``FrechetInceptionDistance`` and
``KernelInceptionDistance`` (so their states, DDP reduction and ``compute`` are torchmetrics')
and replace the ``update(imgs, real)`` call by the suite's paired ``update(preds, target)``:

- ``target`` (the ground-truth edited images) feed the *real* distribution and ``preds`` (the
  model's edits) the *generated* one, both in one call. ``preds`` and ``target`` are float
  tensors ``[B, 3, H, W]`` in ``[-1, 1]``; they are mapped to ``[0, 1]`` (``x / 2 + 0.5``,
  clamped, as in :mod:`metrics.pixel`) in float32 with autocast disabled, and handed to
  torchmetrics with ``normalize=True``. They need not share a size (every image is resized to
  the feature extractor's input) nor, strictly, a batch size.
- With the default Inception-v3 backbone (``feature`` an int: 64, 192, 768 or 2048) torchmetrics
  turns the ``[0, 1]`` images into ``uint8`` (``(x * 255).byte()``) and torch-fidelity's
  TF-ported Inception resizes them to 299x299. ``antialias=False`` (the default here, unlike
  torchmetrics' ``True``) keeps the plain bilinear resize of torch-fidelity / the original
  TensorFlow FID, so that numbers are comparable with published ones; ``antialias=True``
  gives different (not comparable) values on images that are not 299x299.
- The Inception weights (torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``) are
  never downloaded: they are read from ``weights_path`` if given, else from the torch hub
  cache (``torch.hub.get_dir()/checkpoints/``, i.e. ``$TORCH_HOME/hub/checkpoints/``), else a
  ``FileNotFoundError`` names the metric, the file and the folder.
- ``feature`` may instead be any ``torch.nn.Module`` mapping a float ``[N, 3, H, W]`` batch in
  ``[0, 1]`` to ``[N, D]`` features (other backbones, or a tiny module in tests); it needs no
  weights. torchmetrics reads ``D`` from a ``num_features`` attribute if the module has one,
  else (FID only) from one forward pass on a random ``[1, 3, 299, 299]`` image.

Sample size: FID is a biased estimator whose expected value decreases as the number of images
grows (it is only comparable between runs that use the same number of images, and is
noticeably inflated at a few thousand images or fewer, the size of editing test sets). KID, the
unbiased polynomial-kernel MMD estimate, is reported beside it for that reason. Both are
"lower is better" and 0 for identical feature distributions.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.utilities import rank_zero_warn

from metrics.pixel import at_least_float32, to_unit_range

#: The file name torch-fidelity gives its Inception-v3 weights (the basename of
#: ``torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3``), which
#: ``torch.hub.load_state_dict_from_url`` caches under ``torch.hub.get_dir()/checkpoints/``.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"

_INCEPTION_FEATURES = (64, 192, 768, 2048)


def inception_weights_path(weights_path: str | Path | None = None, metric: str = "FID") -> str:
    """Return the local Inception-v3 weights file: ``weights_path``, else the torch hub cache.

    Raises ``FileNotFoundError`` (naming ``metric``, the file and the folder searched) when the
    file is not there; nothing is ever downloaded.
    """
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"{metric}: the Inception-v3 weights file given as `weights_path` does not exist: "
                f"{path} (expected torch-fidelity's {INCEPTION_WEIGHTS_FILE})."
            )
        return str(path)
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / INCEPTION_WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{metric} needs torch-fidelity's Inception-v3 weights {INCEPTION_WEIGHTS_FILE}, which "
            f"are not in the torch hub cache folder {folder} (TORCH_HOME/hub/checkpoints). No "
            "download is attempted: copy the file into that folder, pass `weights_path=...`, or "
            "pass an `nn.Module` as `feature`."
        )
    return str(path)


def _inception(feature: int, weights_path: str | None, antialias: bool, metric: str) -> nn.Module:
    if feature not in _INCEPTION_FEATURES:
        raise ValueError(
            f"{metric}: an int `feature` selects an Inception-v3 layer and must be one of "
            f"{_INCEPTION_FEATURES}, got {feature!r}."
        )
    return NoTrainInceptionV3(
        name="inception-v3-compat",
        features_list=[str(feature)],
        feature_extractor_weights_path=inception_weights_path(weights_path, metric),
        antialias=antialias,
    )


class _Uint8Inception(nn.Module):
    """Feeds ``[0, 1]`` float images to torch-fidelity's Inception as ``uint8``, as torchmetrics'
    ``normalize=True`` does (``(x * 255).byte()``); used by :class:`KID`, whose torchmetrics
    constructor takes neither a weights path nor ``antialias``."""

    def __init__(self, inception: nn.Module, num_features: int) -> None:
        super().__init__()
        self.inception = inception
        self.num_features = num_features

    def forward(self, images: Tensor) -> Tensor:
        return self.inception((images * 255).byte())


def _paired_unit_images(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(preds, Tensor) or not isinstance(target, Tensor):
        raise TypeError("`preds` and `target` must be tensors.")
    if preds.ndim != 4 or target.ndim != 4 or preds.shape[1] != target.shape[1]:
        raise ValueError(
            "Expected `preds` and `target` of shape [B, C, H, W] with the same channels, got "
            f"{tuple(preds.shape)} and {tuple(target.shape)}."
        )
    preds01 = to_unit_range(at_least_float32(preds)).float()
    target01 = to_unit_range(at_least_float32(target)).float()
    return preds01, target01


class _RealVsGenerated:
    """The suite's ``update(preds, target)`` for torchmetrics' FID and KID: ``target`` goes to the
    real side, ``preds`` to the generated one, in float32 with autocast off. With
    ``reset_real_features=False`` the real side is kept at ``reset()`` and frozen afterwards (the
    same reference set every evaluation)."""

    _real_frozen = False

    def provenance(self) -> dict:
        """How this metric measures: the Inception weights (hashed) or the injected extractor."""
        from metrics.provenance import backbone_record

        if self.injected_feature is not None:
            backbone = {"path": None, "source": f"injected {self.injected_feature}"}
        else:
            name = type(self).__name__
            backbone = backbone_record(inception_weights_path(self.weights_path, name))
        return {
            "backbone": backbone,
            "antialias": self.antialias,
            "real": "targets",
            "generated": "preds",
        }

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch: ``target`` to the real and ``preds`` to the generated statistics."""
        with torch.autocast(device_type=preds.device.type, enabled=False):
            preds01, target01 = _paired_unit_images(preds, target)
            if not self._real_frozen:
                super().update(target01, real=True)
            super().update(preds01, real=False)

    def reset(self) -> None:
        """Reset the states (keeping and freezing the real ones if ``reset_real_features=False``)."""
        if not self.reset_real_features and self._num_real() > 0:
            self._real_frozen = True
        super().reset()


class FID(_RealVsGenerated, FrechetInceptionDistance):
    """Fréchet Inception Distance between the ``target`` (real) and ``preds`` (generated) images.

    ``update(preds, target)`` takes ``[B, 3, H, W]`` images in ``[-1, 1]`` (see the module
    docstring). ``compute()`` is torchmetrics': ``|mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^1/2)``
    from float64 running sums (exact under DDP); it needs at least 2 images on each side.
    Biased at a few thousand images: compare FIDs only at equal image counts, and see :class:`KID`.

    Args:
        feature: Inception-v3 feature layer (64, 192, 768 or 2048; 2048 is the standard FID),
            or an ``nn.Module`` mapping float ``[0, 1]`` images ``[N, 3, H, W]`` to ``[N, D]``.
        weights_path: local Inception-v3 weights (torch-fidelity's
            ``weights-inception-2015-12-05-6726825d.pth``); default: the torch hub cache.
            Unused with a module ``feature``.
        antialias: antialias Inception's resize to 299x299. Default False: the original
            (TensorFlow / torch-fidelity) resize, for numbers comparable with published FIDs.
        reset_real_features: if False, ``reset()`` keeps the real (target) statistics and later
            updates stop adding targets to them (the real side is frozen after the first
            ``reset()``): for re-evaluating against the same reference set, e.g. every epoch.
        kwargs: passed to ``torchmetrics.Metric``.
    """

    def __init__(
        self,
        feature: int | nn.Module = 2048,
        weights_path: str | None = None,
        antialias: bool = False,
        reset_real_features: bool = True,
        **kwargs,
    ) -> None:
        injected = type(feature).__name__ if isinstance(feature, nn.Module) else None
        if isinstance(feature, nn.Module):
            super().__init__(
                feature=feature,
                reset_real_features=reset_real_features,
                normalize=True,
                **kwargs,
            )
        elif isinstance(feature, int) and not isinstance(feature, bool):
            if feature not in _INCEPTION_FEATURES:
                raise ValueError(
                    f"FID: an int `feature` selects an Inception-v3 layer and must be one of "
                    f"{_INCEPTION_FEATURES}, got {feature!r}."
                )
            super().__init__(
                feature=feature,
                reset_real_features=reset_real_features,
                normalize=True,
                feature_extractor_weights_path=inception_weights_path(weights_path, "FID"),
                antialias=antialias,
                **kwargs,
            )
        else:
            raise TypeError(f"FID: `feature` must be an int or an nn.Module, got {type(feature)}.")
        self.injected_feature = injected
        self.weights_path = weights_path
        self.antialias = antialias

    def _num_real(self) -> int:
        return int(self.real_features_num_samples)


class KID(_RealVsGenerated, KernelInceptionDistance):
    """Kernel Inception Distance between the ``target`` (real) and ``preds`` (generated) images.

    ``update(preds, target)`` takes ``[B, 3, H, W]`` images in ``[-1, 1]`` (see the module
    docstring) and stores the features of both (torchmetrics keeps every feature, gathered
    under DDP). ``compute()`` returns torchmetrics' ``(kid_mean, kid_std)``: the unbiased MMD^2
    with the polynomial kernel ``(x.y / D + 1)^3``, averaged over ``subsets`` random subsets of
    ``subset_size`` real and generated images each (drawn with the global torch RNG).

    If fewer than ``subset_size`` real or generated images were seen, ``subset_size`` is clamped
    to the smaller count (with a warning naming it) instead of torchmetrics' error; the estimate
    stays unbiased but is noisier. Fewer than 2 images on a side raises a ``ValueError``.

    Args:
        feature, weights_path, antialias, reset_real_features: as in :class:`FID`.
        subsets: number of random subsets averaged (default 100).
        subset_size: images per subset (default 1000).
        kwargs: passed to ``torchmetrics.Metric``.
    """

    def __init__(
        self,
        feature: int | nn.Module = 2048,
        weights_path: str | None = None,
        antialias: bool = False,
        reset_real_features: bool = True,
        subsets: int = 100,
        subset_size: int = 1000,
        **kwargs,
    ) -> None:
        injected = type(feature).__name__ if isinstance(feature, nn.Module) else None
        if isinstance(feature, int) and not isinstance(feature, bool):
            feature = _Uint8Inception(_inception(feature, weights_path, antialias, "KID"), feature)
        elif not isinstance(feature, nn.Module):
            raise TypeError(f"KID: `feature` must be an int or an nn.Module, got {type(feature)}.")
        super().__init__(
            feature=feature,
            subsets=subsets,
            subset_size=subset_size,
            reset_real_features=reset_real_features,
            normalize=True,
            **kwargs,
        )
        self.injected_feature = injected
        self.weights_path = weights_path
        self.antialias = antialias

    @staticmethod
    def _count(features: Tensor | list[Tensor]) -> int:
        if isinstance(features, Tensor):
            return features.shape[0] if features.ndim > 1 else int(features.numel() > 0)
        return sum(f.shape[0] if f.ndim > 1 else 1 for f in features)

    def compute(self) -> tuple[Tensor, Tensor]:
        """``(kid_mean, kid_std)`` over the subsets (``subset_size`` clamped to the counts seen)."""
        n_real, n_fake = self._count(self.real_features), self._count(self.fake_features)
        if min(n_real, n_fake) < 2:
            raise ValueError(
                f"KID needs at least 2 real (target) and 2 generated (preds) images, got {n_real} "
                f"real and {n_fake} generated."
            )
        requested = self.subset_size
        size = min(requested, n_real, n_fake)
        if size < requested:
            rank_zero_warn(
                f"KID: `subset_size={requested}` is larger than the {n_real} real and {n_fake} "
                f"generated images seen; using subsets of {size} images.",
                UserWarning,
            )
        self.subset_size = size
        try:
            return super().compute()
        finally:
            self.subset_size = requested

    def _num_real(self) -> int:
        return self._count(self.real_features)
