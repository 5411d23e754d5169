"""Fixtures for the datamodule tests: small synthetic datasets of their own (tests may damage them)."""

from __future__ import annotations

import pytest

from datamodules.synthetic import SyntheticEditDataModule, generate_synthetic

#: Keep in step with SMALL in test_synthetic_data.py (tests import no conftest).
SMALL = {"num_train": 20, "num_val": 5, "num_test": 5, "resolution": 32, "seed": 0}


@pytest.fixture
def small_root(tmp_path):
    """A fresh 20/5/5 synthetic dataset at 32 px in this test's tmp_path."""
    return generate_synthetic(tmp_path / "synthetic", **SMALL)


@pytest.fixture
def make_dm(small_root):
    """Build a SyntheticEditDataModule over `small_root` (prepare_data already done)."""

    def make(**overrides) -> SyntheticEditDataModule:
        kwargs = {
            "root": str(small_root),
            "resolution": 32,
            "batch_size": 4,
            "num_workers": 0,
            "num_train": SMALL["num_train"],
            "num_val": SMALL["num_val"],
            "num_test": SMALL["num_test"],
            "seed": SMALL["seed"],
        }
        kwargs.update(overrides)
        dm = SyntheticEditDataModule(**kwargs)
        dm.prepare_data()
        return dm

    return make
