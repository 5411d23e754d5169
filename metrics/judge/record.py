"""The judge record: one line of ``judge.jsonl`` per sample and prompt (SC, PQ), and what the
records give per sample and in aggregate.

A record keeps what is needed to trust, audit and redo one judgement: the sample ``id``, the
prompt ``kind``, the judge ``backend``, the ``model`` asked for and the ``model_reported`` by
the endpoint (the dated snapshot, where the endpoint dates it; Step1X-Edit #145 shows how far
two "GPT-4o" judges can differ) with its ``system_fingerprint``, the prompt set's name and
sha256, the ``sampling`` settings (temperature, max_tokens, image_format, image_size, seed), the
raw ``answer`` (redacted of the API key), the parsed ``scores``, and ``failed`` with its
``reason``. A failed or refused judgement has ``scores: null``: it is missing, never a 0.

Per sample (VIEScore's editing task): ``SC = min(editing success, over-editing)``,
``PQ = min(naturalness, artifacts)``, ``O = sqrt(SC * PQ)``; a sample whose SC or PQ record
failed (or is absent) is *failed*, and all three are missing for it. The aggregates are the
means over the judged samples, their count, the failures and the failure rate
(failures / samples).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from metrics.judge.rules import score_rule

RECORDS = "judge.jsonl"


@dataclass(frozen=True)
class JudgeRecord:
    """One judgement of one sample with one prompt (see the module docstring)."""

    id: str
    kind: str
    backend: str
    model: str
    prompt_set: str
    prompt_sha256: str
    sampling: dict[str, Any] = field(default_factory=dict)
    model_reported: str | None = None
    system_fingerprint: str | None = None
    answer: str = ""
    scores: list[float] | None = None
    failed: bool = False
    reason: str | None = None
    attempts: int = 0
    cached: bool = False

    def __post_init__(self) -> None:
        rule = score_rule(self.kind)
        if self.failed != (self.scores is None):
            raise ValueError("a judge record has scores exactly when it did not fail")
        if self.scores is not None and not rule.valid(self.scores):
            raise ValueError(f"bad {self.kind} scores {self.scores!r}")

    def line(self) -> str:
        """The record as one JSON line (sorted keys, so equal records give equal bytes)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JudgeRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def write_records(path: str | Path, records: Iterable[JudgeRecord | str]) -> Path:
    """``judge.jsonl``: one line per record; a ``str`` is written as it is (a kept line)."""
    path = Path(path)
    lines = [r if isinstance(r, str) else r.line() for r in records]
    path.write_text("".join(line.rstrip("\n") + "\n" for line in lines))
    return path


def read_records(path: str | Path) -> list[tuple[JudgeRecord, str]]:
    """``(record, its line)`` for each line of a ``judge.jsonl``; a bad line is a
    ``ValueError`` naming the file and line."""
    path = Path(path)
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((JudgeRecord.from_dict(json.loads(line)), line))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}, line {number}: not a judge record ({err})") from None
    return out


@dataclass(frozen=True)
class SampleScore:
    """One sample's VIEScore: SC, PQ and O (None when the sample failed) and why it failed."""

    id: str
    sc: float | None
    pq: float | None
    o: float | None
    reason: str | None = None

    @property
    def failed(self) -> bool:
        return self.o is None


def viescore(sc_scores: Sequence[float], pq_scores: Sequence[float]) -> tuple[float, float, float]:
    """One image's VIEScore from its two answers: ``SC = min(sc_scores)``,
    ``PQ = min(pq_scores)``, ``O = sqrt(SC * PQ)``."""
    sc, pq = min(sc_scores), min(pq_scores)
    return sc, pq, math.sqrt(sc * pq)


def sample_scores(records: Iterable[JudgeRecord], ids: Sequence[str]) -> list[SampleScore]:
    """Per sample of ``ids``: SC = min of the SC scores, PQ = min of the PQ scores,
    O = sqrt(SC * PQ); all None when a record failed or is absent."""
    by_key = {(r.id, r.kind): r for r in records}
    out = []
    for sample in ids:
        sc, pq = by_key.get((sample, "SC")), by_key.get((sample, "PQ"))
        problems = [
            f"{kind}: " + ("no record" if r is None else str(r.reason))
            for kind, r in (("SC", sc), ("PQ", pq))
            if r is None or r.failed
        ]
        if problems:
            out.append(SampleScore(sample, None, None, None, "; ".join(problems)))
            continue
        out.append(SampleScore(sample, *viescore(sc.scores, pq.scores)))  # type: ignore[union-attr]
    return out


def summarize(scores: Sequence[SampleScore]) -> dict[str, Any]:
    """Means of SC, PQ, O over the judged samples (None when none was), ``n_samples``,
    ``n_judged``, ``failures`` and ``failure_rate``."""
    judged = [s for s in scores if not s.failed]

    def mean(values: list[float]) -> float | None:
        return math.fsum(values) / len(values) if values else None

    failures = len(scores) - len(judged)
    return {
        "SC": mean([s.sc for s in judged]),  # type: ignore[misc]
        "PQ": mean([s.pq for s in judged]),  # type: ignore[misc]
        "O": mean([s.o for s in judged]),  # type: ignore[misc]
        "n_samples": len(scores),
        "n_judged": len(judged),
        "failures": failures,
        "failure_rate": failures / len(scores) if scores else None,
    }


__all__ = [
    "RECORDS",
    "JudgeRecord",
    "SampleScore",
    "read_records",
    "sample_scores",
    "summarize",
    "viescore",
    "write_records",
]
