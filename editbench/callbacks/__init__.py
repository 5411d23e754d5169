"""Callbacks of the editbench application."""

from editbench.callbacks.assets import EnsureTinyAssets
from editbench.callbacks.checkpoint import FinalStepCheckpoint
from editbench.callbacks.images import EditImageLogger
from editbench.callbacks.multiturn import MultiTurnChaining
from editbench.callbacks.predictions import EditPredictionWriter

__all__ = [
    "EditImageLogger",
    "EditPredictionWriter",
    "EnsureTinyAssets",
    "FinalStepCheckpoint",
    "MultiTurnChaining",
]
