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
from metrics.pixel import L1, SSIM, MaskedL1, prepare_pair, to_unit_range

__all__ = [
    "DEFAULT_METRICS",
    "L1",
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
