"""Fixtures of the metric tests: tiny random CLIP and DINO folders, built once per session in
seconds (unlike the full tiny checkpoints of ``tiny_dir``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures.backbones import save_tiny_clip, save_tiny_dino


@pytest.fixture(scope="session")
def small_backbones(tmp_path_factory) -> Path:
    """``<root>/clip`` (32 px CLIP, width 32) and ``<root>/dino`` (224 px ViT, width 32)."""
    root = tmp_path_factory.mktemp("backbones")
    save_tiny_clip(root / "clip")
    save_tiny_dino(root / "dino")
    return root
