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
from metrics.judge.metric import VIEScore
from metrics.masked_release import CLIPScoreBox  # noqa: F401  registers PSNR_bg ... CLIPScore_box
from metrics.perceptual import LPIPS
from metrics.pixel import L1, SSIM, MaskedL1, prepare_pair, to_unit_range

# Model-backed metrics: their backbone folders/files come from the evaluator's `backbones`
# (one CLIP for CVS, CTS and the directional metrics) unless `metric_kwargs` names them.
register_metric("LPIPS", LPIPS, backbone=("lpips", "weights_path"))
register_metric("DINO", DINO, backbone=("dino", "dino_path"))
register_metric("CVS", CVS, backbone=("clip", "clip_path"))
register_metric("CTS", CTS, inputs=("preds", "goal_caption"), backbone=("clip", "clip_path"))
register_metric(
    "CLIP_direction",
    CLIPDirectionalSimilarity,
    inputs=("source", "preds", "source_caption", "goal_caption"),
    backbone=("clip", "clip_path"),
)
register_metric(
    "CLIP_image", CLIPImageSimilarity, inputs=("source", "preds"), backbone=("clip", "clip_path")
)
register_metric("FID", FID, backbone=("inception", "weights_path"))
register_metric("KID", KID, backbone=("inception", "weights_path"))
# VIEScore reports SC, PQ, O and the failure count (test/VIEScore_SC, ...); a paid judge is not
# asked about the copy baseline, and `test` leaves it to the offline judge of its bundle.
register_metric(
    "VIEScore",
    VIEScore,
    inputs=("source", "preds", "instruction"),
    copy_baseline=False,
    judged_offline=True,
)

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
    "VIEScore",
    "edit_metrics",
    "prepare_pair",
    "register_metric",
    "requires_mask",
    "takes_mask",
    "to_unit_range",
    "update_edit_metrics",
]
