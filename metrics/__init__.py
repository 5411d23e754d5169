"""Edit metrics for the editbench suite, as torchmetrics ``Metric``s.

Images come in the suite's ``[-1, 1]`` range and are measured on ``[0, 1]``; see
:mod:`metrics.pixel` for how each metric is computed and :mod:`metrics.collection` for the
name registry and the collection the models log (``test/L1``, ``test/copy/L1``, ...).
"""

from metrics.collection import (
    DEFAULT_METRICS,
    METRICS,
    edit_metrics,
    register_metric,
    requires_mask,
    takes_mask,
    update_edit_metrics,
)
from metrics.features import CTS, CVS, DINO, CLIPDirectionalSimilarity, CLIPImageSimilarity
from metrics.fid import FID, KID
from metrics.perceptual import LPIPS
from metrics.pixel import L1, SSIM, MaskedL1, prepare_pair, to_unit_range

# Metrics that take (preds, target) join the name registry; backbone paths come through
# `edit_metrics(..., metric_kwargs={"DINO": {"dino_path": ...}})`. CTS, the directional metrics
# and FID/KID (a tuple for KID, a distribution-level value for both) wait for the protocols.
for _name, _cls in (("LPIPS", LPIPS), ("DINO", DINO), ("CVS", CVS)):
    register_metric(_name, _cls)

__all__ = [
    "CLIPDirectionalSimilarity",
    "CLIPImageSimilarity",
    "CTS",
    "CVS",
    "DEFAULT_METRICS",
    "DINO",
    "FID",
    "KID",
    "L1",
    "LPIPS",
    "METRICS",
    "SSIM",
    "MaskedL1",
    "edit_metrics",
    "prepare_pair",
    "register_metric",
    "requires_mask",
    "takes_mask",
    "to_unit_range",
    "update_edit_metrics",
]
