"""A test run's result bundle: ``test_metrics.json`` plus the files that let anyone recompute it.

Layout, in the run's log dir (format ``editbench.bundle/1``)::

    test_metrics.json   the aggregates (:mod:`metrics.results`)
    samples.jsonl       one row per sample, aggregation, system and per-image metric:
                        {"id", "dataset", "session", "turn", "aggregation",
                         "system": "model" | "copy", "metric", "value", ["sse", "n"]}
    images/<id>.png     the edited images (optional; on by default for splits of at most
                        :data:`IMAGE_LIMIT` samples)
    sources/<id>.png    with the edited images: the input the model edited (in MagicBrush's
                        iterative mode its own previous output) and, where the split has
    targets/<id>.png    them, the ground-truth targets, at the model's resolution
    inputs.jsonl        with the edited images: one row per sample, {"id", "instruction",
                        "dataset", "session", "turn"} and "category" where the dataset has
                        one (a benchmark's edit type), what an offline judge or a visual
                        report needs besides the images
    manifest.json       {"format", "files": {<relative path>: {"sha256", "size"}},
                         "reductions": {<metric>: "mean" | "pooled_psnr"},
                         "not_recomputable": [<metric>, ...], "num_rows"}

The rows come from the metrics' own per-image values (:mod:`metrics.samples`), so the mean of
an aggregation's rows (the metric's reduction, :func:`metrics.samples.reduce_rows`) is the
aggregate in ``test_metrics.json``. FID and KID are set-level (no per-sample value), VIEScore
keeps no per-sample rows either: they are listed in ``not_recomputable`` and the report says
which cells it could not recompute. :func:`read_bundle` checks every file against the manifest
(a missing or changed file is a :class:`BundleError` naming each one).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metrics.samples import reduce_rows

FORMAT = "editbench.bundle/1"
MANIFEST = "manifest.json"
SAMPLES = "samples.jsonl"
RESULTS = "test_metrics.json"
IMAGES = "images"
SOURCES = "sources"
TARGETS = "targets"
INPUTS = "inputs.jsonl"
#: The image folders of a bundle, hashed in its manifest.
IMAGE_FOLDERS = (IMAGES, SOURCES, TARGETS)
#: Edited images are written by default when the split has at most this many samples.
IMAGE_LIMIT = 500


class BundleError(ValueError):
    """A bundle whose files are missing or differ from its manifest, or unreadable rows."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def image_name(sample_id: str, kind: str = IMAGES) -> str:
    """``<kind>/<id>.png``, ``kind`` one of :data:`IMAGE_FOLDERS` (path separators in an id
    become ``__``)."""
    if kind not in IMAGE_FOLDERS:
        raise ValueError(f"image kind {kind!r} is not one of {IMAGE_FOLDERS}")
    safe = str(sample_id).replace("/", "__").replace("\\", "__")
    return f"{kind}/{safe}.png"


def save_images(folder: str | Path, ids: Sequence[str], images: Any, kind: str = IMAGES) -> None:
    """Write ``images`` (``[B, 3, H, W]`` in ``[-1, 1]``) as ``<kind>/<id>.png`` under
    ``folder``, as the predictions writer saves them (``save_image((x + 1) / 2)``)."""
    from torchvision.utils import save_image

    for sample_id, image in zip(ids, images, strict=True):
        path = Path(folder) / image_name(sample_id, kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image((image.detach().float().clamp(-1, 1).cpu() + 1) / 2, path)


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _from_json(value: Any) -> Any:
    if value == "inf":
        return math.inf
    if value == "-inf":
        return -math.inf
    return value


def write_samples(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Rows as JSONL (``inf`` as the string ``"inf"``, nan as null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps({k: _json_value(v) for k, v in row.items()}) + "\n")
    return path


def _jsonl_rows(path: Path, required: set[str], what: str):
    """The rows of a bundle JSONL file, blank lines skipped; a line that is not
    JSON, or not an object with the ``required`` keys, is a :class:`BundleError` naming it."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise BundleError(f"{path}, line {number}: not JSON ({err.msg})") from None
        if not isinstance(row, dict) or not required <= set(row):
            raise BundleError(f"{path}, line {number}: not {what}")
        yield row


def read_samples(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``samples.jsonl``; a bad line is a :class:`BundleError` naming it."""
    rows = []
    required = {"id", "aggregation", "system", "metric"}
    for row in _jsonl_rows(Path(path), required, "a sample row"):
        rows.append({k: _from_json(v) for k, v in row.items()})
    return rows


def input_rows(batch: Mapping[str, Any], dataset: str) -> list[dict[str, Any]]:
    """The :data:`INPUTS` rows of a test batch: id, instruction, the aggregation keys and the
    sample's ``category`` where the dataset gives one (a benchmark's edit type)."""
    sessions, turns = batch.get("session"), batch.get("turn")
    categories = batch.get("category")
    rows = []
    for i, (sample_id, instruction) in enumerate(zip(batch["id"], batch["instruction"], strict=True)):
        row = {
            "id": str(sample_id),
            "instruction": str(instruction),
            "dataset": dataset,
            "session": None if sessions is None else str(sessions[i]),
            "turn": None if turns is None else int(turns[i]),
        }
        if categories is not None and categories[i] is not None:
            row["category"] = str(categories[i])
        rows.append(row)
    return rows


def write_inputs(folder: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """``inputs.jsonl``: one row per sample id (the first of repeated ids, a padded sample
    under DDP), sorted by id."""
    unique: dict[str, Mapping[str, Any]] = {}
    for row in rows:
        unique.setdefault(str(row["id"]), row)
    return write_samples(Path(folder) / INPUTS, [unique[k] for k in sorted(unique)])


def read_inputs(folder: str | Path) -> dict[str, dict[str, Any]]:
    """``id -> row`` of a bundle's ``inputs.jsonl``; a missing file or a row without id or
    instruction is a :class:`BundleError` naming it."""
    path = Path(folder) / INPUTS
    if not path.is_file():
        raise BundleError(
            f"{path} is missing: the bundle was written without images "
            "(rerun `test` with --model.init_args.bundle_images true)"
        )
    required = {"id", "instruction"}
    return {
        str(row["id"]): row
        for row in _jsonl_rows(path, required, "an input row (id, instruction)")
    }


def write_bundle(
    folder: str | Path,
    rows: Sequence[Mapping[str, Any]],
    reductions: Mapping[str, str],
    not_recomputable: Sequence[str] = (),
) -> Path:
    """Write ``samples.jsonl`` and ``manifest.json`` beside ``test_metrics.json`` (which must
    be written first), hashing every bundle file: the results, the rows, ``inputs.jsonl`` and
    the image folders."""
    folder = Path(folder)
    write_samples(folder / SAMPLES, rows)
    names = [RESULTS, SAMPLES, INPUTS]
    for kind in IMAGE_FOLDERS:
        if (folder / kind).is_dir():
            names += sorted(p.relative_to(folder).as_posix() for p in (folder / kind).rglob("*.png"))
    files = {}
    for name in names:
        path = folder / name
        if path.is_file():
            files[name] = {"sha256": sha256_of(path), "size": path.stat().st_size}
    manifest = {
        "format": FORMAT,
        "files": files,
        "reductions": dict(reductions),
        "not_recomputable": list(not_recomputable),
        "num_rows": len(rows),
    }
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


@dataclass
class Bundle:
    """A verified bundle: its folder, manifest and rows."""

    folder: Path
    manifest: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def reductions(self) -> dict[str, str]:
        return dict(self.manifest.get("reductions") or {})

    @property
    def not_recomputable(self) -> list[str]:
        return list(self.manifest.get("not_recomputable") or [])

    def values(self, metric: str, aggregation: str, system: str = "model") -> dict[str, dict]:
        """``id -> row`` of one metric, aggregation and system."""
        return {
            r["id"]: r
            for r in self.rows
            if r["metric"] == metric and r["aggregation"] == aggregation and r["system"] == system
        }


def verify_files(folder: Path, manifest: Mapping[str, Any]) -> None:
    """Every file the manifest lists exists with its size and sha256, else a
    :class:`BundleError` naming each missing and each changed file."""
    missing, changed = [], []
    for name, entry in (manifest.get("files") or {}).items():
        path = folder / name
        if not path.is_file():
            missing.append(name)
        elif path.stat().st_size != entry.get("size") or sha256_of(path) != entry.get("sha256"):
            changed.append(name)
    if missing or changed:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(str(folder / n) for n in missing))
        if changed:
            parts.append("changed " + ", ".join(str(folder / n) for n in changed))
        raise BundleError(f"result bundle {folder} does not match its manifest: " + "; ".join(parts))


def read_bundle(folder: str | Path) -> Bundle | None:
    """The verified bundle in ``folder``; None where there is no ``manifest.json`` (a run
    written before bundles existed)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: not an editbench bundle manifest ({FORMAT})")
    verify_files(folder, manifest)
    if SAMPLES not in (manifest.get("files") or {}):
        raise BundleError(f"{path}: lists no {SAMPLES}")
    return Bundle(folder, manifest, read_samples(folder / SAMPLES))


def metric_key(prefix: str, metric: str, aggregation: str, system: str, protocol: Mapping) -> list[str]:
    """The ``test_metrics.json`` keys of a metric's aggregate (as the evaluator names them)."""
    base = f"{prefix}/copy" if system == "copy" else prefix
    keys = []
    if aggregation == protocol.get("aggregation"):
        keys.append(f"{base}/{metric}")
    if len(protocol.get("aggregations") or []) > 1:
        keys.append(f"{base}/{aggregation}/{metric}")
    return keys


def recompute(bundle: Bundle, protocol: Mapping[str, Any], prefix: str = "test") -> dict[str, float]:
    """Every aggregate the rows determine, keyed as in ``test_metrics.json``'s ``metrics``."""
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for row in bundle.rows:
        groups[(row["metric"], row["aggregation"], row["system"])].append(row)
    out = {}
    for (metric, aggregation, system), rows in groups.items():
        value = reduce_rows(rows, bundle.reductions.get(metric, "mean"))
        for key in metric_key(prefix, metric, aggregation, system, protocol):
            out[key] = value
    return out


def mismatches(
    recomputed: Mapping[str, float], reported: Mapping[str, Any], rtol: float = 1e-5
) -> list[str]:
    """Keys whose recomputed value differs from the reported one (beyond ``rtol`` relative,
    1e-7 absolute: the metrics accumulate float32 sums), one line each."""
    lines = []
    for key, value in sorted(recomputed.items()):
        other = reported.get(key)
        other = math.nan if other is None else float(other)
        if math.isnan(value) and math.isnan(other):
            continue
        if value == other:
            continue
        if not math.isclose(value, other, rel_tol=rtol, abs_tol=1e-7):
            lines.append(f"{key}: recomputed {value!r}, test_metrics.json says {other!r}")
    return lines


def update_manifest(
    folder: str | Path,
    files: Sequence[str],
    *,
    reductions: Mapping[str, str] | None = None,
    recomputable: Sequence[str] = (),
    num_rows: int | None = None,
    removed: Sequence[str] = (),
) -> Path:
    """Rewrite ``manifest.json`` after a step added or rewrote bundle files (the offline
    judge): hash ``files`` (paths relative to ``folder``) anew, drop the reductions of the
    ``removed`` metrics (rows no longer in ``samples.jsonl``), add ``reductions``, take the
    ``recomputable`` metrics off ``not_recomputable`` and set ``num_rows``; every other entry
    is kept as it was."""
    folder = Path(folder)
    path = folder / MANIFEST
    manifest = json.loads(path.read_text())
    for name in files:
        target = folder / name
        manifest["files"][name] = {"sha256": sha256_of(target), "size": target.stat().st_size}
    kept = {k: v for k, v in (manifest.get("reductions") or {}).items() if k not in removed}
    manifest["reductions"] = {**kept, **dict(reductions or {})}
    drop = set(recomputable)
    manifest["not_recomputable"] = [m for m in manifest.get("not_recomputable") or [] if m not in drop]
    if num_rows is not None:
        manifest["num_rows"] = num_rows
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


__all__ = [
    "FORMAT",
    "IMAGE_FOLDERS",
    "IMAGE_LIMIT",
    "IMAGES",
    "INPUTS",
    "SOURCES",
    "TARGETS",
    "Bundle",
    "BundleError",
    "image_name",
    "input_rows",
    "metric_key",
    "mismatches",
    "read_bundle",
    "read_inputs",
    "read_samples",
    "recompute",
    "save_images",
    "sha256_of",
    "update_manifest",
    "verify_files",
    "write_bundle",
    "write_inputs",
    "write_samples",
]
