"""Shared fixtures: the tiny checkpoints and a tiny synthetic dataset, built once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: VAE fitting steps for the test checkpoints: enough to be a real autoencoder-ish model, cheap.
TEST_VAE_STEPS = 30


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """``make_tiny`` output (all checkpoint folders) with a short VAE fit."""
    from editbench.tiny import make_tiny

    out = tmp_path_factory.mktemp("tiny")
    make_tiny(out, seed=0, resolution=32, vae_steps=TEST_VAE_STEPS, log=lambda *a, **k: None)
    return out


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic dataset at 32 px (64 train / 16 val / 16 test)."""
    from datamodules.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(root, num_train=64, num_val=16, num_test=16, resolution=32, seed=0)
    return root
