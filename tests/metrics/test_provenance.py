"""The suite's version in the provenance, read without importing ``editbench``."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import metrics.provenance as provenance

REPO = Path(__file__).resolve().parents[2]


def test_version_is_read_without_importing_editbench():
    code = (
        "import sys, metrics, metrics.results\n"
        "from metrics.provenance import editbench_version\n"
        "print(editbench_version(), 'editbench' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    version, imported = out.stdout.split()
    assert version == importlib.metadata.version("editbench")
    assert imported == "False"  # metrics depends on nothing above it


def test_version_falls_back_to_the_pyproject(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    provenance.editbench_version.cache_clear()
    try:
        text = (REPO / "pyproject.toml").read_text()
        expected = re.search(r'^version = "([^"]+)"', text, re.MULTILINE).group(1)
        if provenance.tomllib is None:  # Python 3.10: no TOML reader, the version is unknown
            expected = "unknown"
        assert provenance.editbench_version() == expected
    finally:
        provenance.editbench_version.cache_clear()
