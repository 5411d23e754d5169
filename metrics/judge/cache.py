"""The judge's answer cache: one JSON file per request, keyed by everything that shapes the answer.

The key is the sha256 of the backend, the requested model id, the generation settings, the full
prompt text and the encoded bytes of each image sent (:func:`cache_key`): a hit skips the
request. Only parsed answers are cached (a failure is asked again on the next run); a record
holds the scores, the raw answer (redacted of the API key) and what produced it, the model id
the endpoint reported included, never credentials.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metrics.judge.rules import score_rule

DEFAULT_CACHE_DIR = "~/.cache/editbench/viescore"


def cache_key(
    backend: str, model: str, prompt: str, pngs: Sequence[bytes], generation: dict[str, Any]
) -> str:
    """sha256 of (backend, model id, generation settings, prompt text, each image's bytes)."""
    header = {"backend": backend, "model": model, "generation": generation, "prompt": prompt}
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode("utf-8"))
    for png in pngs:
        digest.update(len(png).to_bytes(8, "little"))
        digest.update(png)
    return digest.hexdigest()


class AnswerCache:
    """One JSON file per key under ``root/<key[:2]>/<key>.json``, written atomically.

    Unreadable or invalid files count as misses.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def record(self, key: str, kind: str) -> dict[str, Any] | None:
        """The cached record for ``key`` with its ``scores`` as floats (None on a miss or a
        record whose scores a ``kind`` question cannot give)."""
        try:
            record = json.loads(self.path(key).read_text(encoding="utf-8"))
            scores = record["scores"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not score_rule(kind).valid(scores):
            return None
        return {**record, "scores": [float(s) for s in scores]}

    def get(self, key: str, kind: str) -> list[float] | None:
        """The cached scores for ``key`` (None on a miss or an invalid record)."""
        record = self.record(key, kind)
        return None if record is None else record["scores"]

    def put(self, key: str, record: dict[str, Any]) -> None:
        """Write ``record`` for ``key``: a temporary file in the same folder, then a rename."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                json.dump(record, file, indent=1, sort_keys=True)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


__all__ = ["DEFAULT_CACHE_DIR", "AnswerCache", "cache_key"]
