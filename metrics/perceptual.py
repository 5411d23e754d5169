"""Perceptual edit metric: LPIPS (Zhang et al. 2018) on the ``lpips`` reference implementation.

Conventions follow :mod:`metrics.pixel`: ``preds`` and ``target`` are ``[B, 3, H, W]`` in the
suite's ``[-1, 1]``; ``preds`` is resized to the target's size when they differ
(:func:`metrics.pixel.prepare_pair`); the metric is the mean over images of a per-image value,
accumulated in ``"sum"``-reduced states.

Weights, all offline (nothing is ever downloaded):

- The linear heads (the calibrated 1x1 convolutions, LPIPS v0.1) ship inside the ``lpips``
  package (``lpips/weights/v0.1/<net>.pth``); ``linear_weights_path`` overrides that file.
- The backbone is torchvision's ImageNet model (AlexNet, VGG16 or SqueezeNet 1.1), read from
  ``weights_path`` if given, else from the torch hub cache
  ``$TORCH_HOME/hub/checkpoints/<torchvision file name>`` (``torch.hub.get_dir()``), the file
  torchvision itself would have downloaded (see :data:`BACKBONE_FILES`). Either file is a
  torchvision model state dict (``features.*`` keys; ``classifier.*`` keys are ignored).
  If neither exists, a :class:`FileNotFoundError` says which file to place where.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Literal

import lpips as lpips_pkg
import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchvision.models import AlexNet_Weights, SqueezeNet1_1_Weights, VGG16_Weights

from metrics.pixel import ResizeMode, _check_resize_mode, at_least_float32, prepare_pair
from metrics.samples import SampleRecorder

LpipsNet = Literal["alex", "vgg", "squeeze"]
_NETS = ("alex", "vgg", "squeeze")

#: ``weights_path`` value that keeps the backbone randomly initialised (for tests only).
RANDOM_BACKBONE = "random"

#: The torchvision checkpoint file name of each backbone (the name it has in the hub cache).
BACKBONE_FILES: dict[str, str] = {
    "alex": os.path.basename(AlexNet_Weights.IMAGENET1K_V1.url),  # alexnet-owt-7be5be79.pth
    "vgg": os.path.basename(VGG16_Weights.IMAGENET1K_V1.url),  # vgg16-397923af.pth
    "squeeze": os.path.basename(
        SqueezeNet1_1_Weights.IMAGENET1K_V1.url
    ),  # squeezenet1_1-b8a52dc0.pth
}

_LPIPS_VERSION = "0.1"


def hub_checkpoint_dir() -> Path:
    """``$TORCH_HOME/hub/checkpoints`` (torch's hub cache, read at call time)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def default_linear_weights_path(net: str) -> Path:
    """The linear-head weights shipped inside the ``lpips`` package for ``net``."""
    return Path(lpips_pkg.__file__).parent / "weights" / f"v{_LPIPS_VERSION}" / f"{net}.pth"


def _resolve_backbone_path(net: str, weights_path: str | os.PathLike | None) -> Path:
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"LPIPS({net!r}): backbone weights file {str(path)!r} (`weights_path`) does not "
                f"exist; it should be torchvision's {BACKBONE_FILES[net]!r}."
            )
        return path
    folder = hub_checkpoint_dir()
    path = folder / BACKBONE_FILES[net]
    if not path.is_file():
        raise FileNotFoundError(
            f"LPIPS(net={net!r}) needs torchvision's ImageNet backbone weights, which are not "
            f"downloaded here. Place the file {BACKBONE_FILES[net]!r} in the folder "
            f"{str(folder)!r} (the torch hub cache, $TORCH_HOME/hub/checkpoints), or pass "
            f"`weights_path=` pointing to it."
        )
    return path


def _load_backbone(model: nn.Module, path: Path) -> None:
    """Load a torchvision state dict (``features.<i>.*``) into lpips' ``net.slice<k>.<i>.*``."""
    source = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(source, dict):
        raise ValueError(f"{str(path)!r} does not hold a state dict.")
    backbone = model.net
    mapped = {}
    missing = []
    for name in backbone.state_dict():
        # "slice2.3.weight" -> "features.3.weight"; squeeze: "slice3.6.expand1x1.bias" too.
        _, index, rest = name.split(".", 2)
        key = f"features.{index}.{rest}"
        if key in source:
            mapped[name] = source[key]
        else:
            missing.append(key)
    if missing:
        raise ValueError(
            f"{str(path)!r} is not a torchvision {type(backbone).__name__} state dict: "
            f"missing keys {missing}."
        )
    backbone.load_state_dict(mapped, strict=True)


def _load_linear_heads(model: nn.Module, path: Path) -> None:
    source = torch.load(path, map_location="cpu", weights_only=True)
    expected = {k for k in model.state_dict() if k.startswith("lin") and not k.startswith("lins.")}
    missing = sorted(expected - set(source))
    if missing:
        raise ValueError(f"LPIPS linear-head file {str(path)!r} lacks the keys {missing}.")
    # strict=False: the file holds only the heads (`lins.*` are the same modules as `lin<k>`).
    model.load_state_dict({k: source[k] for k in expected}, strict=False)


def build_lpips_network(
    net: LpipsNet = "alex",
    weights_path: str | os.PathLike | None = None,
    linear_weights_path: str | os.PathLike | None = None,
) -> nn.Module:
    """An ``lpips.LPIPS`` network (eval mode, frozen), with weights loaded offline.

    ``weights_path="random"`` keeps the backbone's random initialisation (tests only).
    """
    if net not in _NETS:
        raise ValueError(f"`net` must be one of {_NETS}, got {net!r}.")
    random_backbone = weights_path is not None and str(weights_path) == RANDOM_BACKBONE
    backbone_path = None if random_backbone else _resolve_backbone_path(net, weights_path)
    linear_path = Path(linear_weights_path or default_linear_weights_path(net))
    if not linear_path.is_file():
        raise FileNotFoundError(f"LPIPS linear-head weights {str(linear_path)!r} not found.")
    with warnings.catch_warnings():
        # lpips builds torchvision models with the deprecated `pretrained=False` argument.
        warnings.filterwarnings("ignore", message=".*(pretrained|weights).*", category=UserWarning)
        model = lpips_pkg.LPIPS(
            pretrained=False,  # linear heads: loaded below, with a key check
            net=net,
            version=_LPIPS_VERSION,
            pnet_rand=True,  # never let torchvision download the backbone
            verbose=False,
        )
    _load_linear_heads(model, linear_path)
    if backbone_path is not None:
        _load_backbone(model, backbone_path)
    model.eval()
    model.requires_grad_(False)
    return model


class LPIPS(SampleRecorder, Metric):
    """Learned perceptual image patch similarity (LPIPS v0.1), on the ``lpips`` package.

    Images in ``[-1, 1]`` are mapped to ``[0, 1]`` and, if ``preds`` and ``target`` differ in
    size, ``preds`` is resized to the target's (as in :class:`metrics.pixel.L1`), then mapped
    back to ``[-1, 1]``, the range ``lpips`` expects (``normalize=False``). Per image: the
    LPIPS distance (the spatial average of each layer's weighted feature difference, summed
    over layers); the metric is the mean over images (states ``sum_lpips``, ``num_images``,
    ``"sum"``-reduced). Lower is better; 0 for identical images. Computed in float32 with
    autocast disabled (float64 inputs are computed in float32 too). AlexNet needs images of
    at least about 32x32.

    The ``lpips`` network is not a registered submodule: it is not in ``state_dict()`` (so not
    in a model's checkpoint), nor in ``parameters()``, and parent ``.train()`` calls leave it in
    eval mode. It still follows device moves (``.to``/``.cuda``), always staying float32.

    Args:
        net: backbone, ``"alex"`` (default, the usual choice for evaluation), ``"vgg"`` or
            ``"squeeze"``.
        weights_path: torchvision backbone state dict file. Default: the torch hub cache,
            ``$TORCH_HOME/hub/checkpoints/`` + :data:`BACKBONE_FILES` ``[net]``. The value
            ``"random"`` keeps a randomly initialised backbone: for tests only.
        linear_weights_path: linear-head weights; default: those shipped in ``lpips``.
        resize_mode: ``"bicubic"`` (default) or ``"bilinear"``, used only on a size mismatch.
    """

    is_differentiable = True
    higher_is_better = False
    full_state_update = False
    plot_lower_bound = 0.0

    sum_lpips: Tensor
    num_images: Tensor

    def __init__(
        self,
        net: LpipsNet = "alex",
        weights_path: str | None = None,
        linear_weights_path: str | None = None,
        resize_mode: ResizeMode = "bicubic",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        _check_resize_mode(resize_mode)
        self.net_type = net
        self.weights_path = weights_path
        self.linear_weights_path = linear_weights_path
        self.resize_mode = resize_mode
        # Bypass nn.Module.__setattr__ so the network stays out of `_modules` (and state_dict).
        object.__setattr__(
            self, "lpips_net", build_lpips_network(net, weights_path, linear_weights_path)
        )
        self.add_state("sum_lpips", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state(
            "num_images", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum"
        )

    def _apply(self, fn, *args, **kwargs):
        this = super()._apply(fn, *args, **kwargs)
        network = self.__dict__.get("lpips_net")
        if network is not None:
            network._apply(fn)
            network.float()  # device moves only: the backbone always computes in float32
        return this

    def provenance(self) -> dict:
        """How this metric measures: the backbone and linear-head weight files (hashed)."""
        from metrics.provenance import backbone_record

        random = self.weights_path == "random"
        return {
            "net": self.net_type,
            "backbone": {"path": None, "source": "random (tests only)"}
            if random
            else backbone_record(_resolve_backbone_path(self.net_type, self.weights_path)),
            "linear_heads": backbone_record(
                self.linear_weights_path or default_linear_weights_path(self.net_type)
            ),
            "version": _LPIPS_VERSION,
            "resize": f"preds resized to the target's size ({self.resize_mode}) when they differ",
        }

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch: ``preds`` and ``target`` are ``[B, 3, H, W]`` in ``[-1, 1]``."""
        with torch.autocast(device_type=preds.device.type, enabled=False):
            preds01, target01 = prepare_pair(
                at_least_float32(preds), at_least_float32(target), self.resize_mode
            )
            if preds01.shape[1] != 3:
                raise ValueError(f"LPIPS needs RGB images (3 channels), got {preds01.shape[1]}.")
            per_image = self.lpips_net(
                preds01.float() * 2 - 1, target01.float() * 2 - 1, normalize=False
            ).flatten()
        self.sum_lpips += per_image.sum()
        self.num_images += per_image.numel()
        self.record(per_image)

    def compute(self) -> Tensor:
        """The mean over images of the per-image LPIPS (nan when no image was seen)."""
        return self.sum_lpips / self.num_images
