"""How a number was measured: weight fingerprints, the suite's version and git commit.

Published editing numbers are hard to reproduce because the backbone, the resize rule, the
caption source and the turn mode go unrecorded (e.g. CLIP-T 0.275 with ViT-B/32 vs 0.223 with
ViT-L/14 on the same images). Every metric therefore describes itself with ``provenance()``,
and the backbones it uses are identified by a SHA-256 of their weight files, not by a name.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import subprocess
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10: no TOML reader in the standard library
    tomllib = None

#: Files that hold weights in a checkpoint folder (configs are hashed too: they define the net).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json")
_CHUNK = 1 << 22


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file; cached on (path, size, mtime) so a 600 MB CLIP is read once per run."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file."""
    stat = Path(path).stat()
    return _file_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def weights_sha256(path: str | Path) -> str:
    """SHA-256 of a weights file, or of a checkpoint folder's weight and config files (their
    relative names and digests, in sorted order; tokenizer and processor files included, since
    they change the embeddings too)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    files = sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES + (".txt",)
    )
    if not files:
        raise FileNotFoundError(f"no weight files under {path} to fingerprint")
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def backbone_record(path: str | Path | None, *, default: str | None = None) -> dict[str, Any]:
    """``{"path", "sha256"}`` of a backbone, or ``{"path": None, "source": default}`` for weights
    that come from a package (e.g. LPIPS's linear heads shipped in ``lpips``)."""
    if path is None:
        return {"path": None, "source": default}
    path = Path(path).expanduser().resolve()
    return {"path": str(path), "sha256": weights_sha256(path)}


@functools.lru_cache(maxsize=1)
def editbench_version() -> str:
    """The installed suite's version (``importlib.metadata``, without importing ``editbench``:
    ``metrics`` depends on nothing above it); for a checkout that is not installed, the
    ``version`` of the ``pyproject.toml`` beside it; else ``"unknown"``."""
    try:
        return importlib.metadata.version("editbench")
    except importlib.metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if tomllib is None:
        return "unknown"
    try:
        project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
    except (OSError, tomllib.TOMLDecodeError):
        return "unknown"
    if project.get("name") != "editbench":
        return "unknown"
    return str(project.get("version", "unknown"))


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the editbench checkout (``+dirty`` if it has uncommitted changes), or None
    for an installed copy outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
