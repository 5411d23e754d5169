"""What a judge asks about each sample of a result bundle and what it makes of the answers.

A scheme turns a sample (its ``inputs.jsonl`` row) into questions (:class:`Question`: a record
kind, the prompt text and the bundle images sent, in order) and the sample's judge records into
its per-sample values (:class:`SampleResult`), written as ``samples.jsonl`` rows that the report
recomputes:

- :class:`VIEScoreScheme` (VIEScore, Ku et al. ACL 2024; GEdit-Bench): SC on
  ``[source, edit]`` and PQ on ``[edit]``; per sample ``VIEScore_SC``, ``VIEScore_PQ``,
  ``VIEScore_O`` (:func:`metrics.judge.record.sample_scores`).
- :class:`ImgEditScheme` (ImgEdit-Bench's basic suite): one question on ``[source, edit]`` with
  the prompt of the sample's edit type (its ``category``); the image's score (mean of its
  numbers, :mod:`metrics.judge.imgedit`) is the row ``ImgEdit_<edit_type>``, so the mean of a
  type's rows is ImgEdit's type score, the column ``report --published imgedit-v1`` compares.

Both add ``<name>_failure_rate`` (1 failed, 0 judged) and leave a failed sample's values null:
missing, never 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from metrics.bundle import IMAGES, SOURCES, BundleError
from metrics.judge.imgedit import IMGEDIT_KIND, ImgEditPrompts, image_score, type_scores
from metrics.judge.prompts import KINDS, PromptSet
from metrics.judge.record import JudgeRecord, sample_scores, summarize
from metrics.published_benchmarks import imgedit_metric


@dataclass(frozen=True)
class Question:
    """One question about a sample: its record ``kind``, the ``prompt`` and the bundle image
    folders (``sources``, ``images``) whose pictures are sent after the text, in order."""

    kind: str
    prompt: str
    images: tuple[str, ...]


@dataclass(frozen=True)
class SampleResult:
    """A sample's judged values (metric -> value, None where it failed) and why it failed."""

    id: str
    values: dict[str, float | None]
    reason: str | None = None

    @property
    def failed(self) -> bool:
        return self.reason is not None


def _failure_reason(sample: str, records: Mapping[tuple[str, str], JudgeRecord], kinds) -> str | None:
    problems = [
        f"{kind}: " + ("no record" if r is None else str(r.reason))
        for kind in kinds
        for r in [records.get((sample, kind))]
        if r is None or r.failed
    ]
    return "; ".join(problems) or None


class VIEScoreScheme:
    """VIEScore's SC and PQ questions (:mod:`metrics.judge.prompts`)."""

    name = "VIEScore"
    kinds = KINDS
    failure_metric = "VIEScore_failure_rate"
    #: summary key -> per-sample metric.
    metric_names = {"SC": "VIEScore_SC", "PQ": "VIEScore_PQ", "O": "VIEScore_O"}
    columns = (*metric_names.values(), failure_metric)

    def __init__(self, prompts: PromptSet) -> None:
        self.prompts = prompts

    def questions(self, sample: str, row: Mapping[str, Any]) -> list[Question]:
        return [
            Question("SC", self.prompts.sc(str(row["instruction"])), (SOURCES, IMAGES)),
            Question("PQ", self.prompts.pq_prompt, (IMAGES,)),
        ]

    def results(
        self, records: Sequence[JudgeRecord], ids: Sequence[str], inputs: Mapping[str, Mapping]
    ) -> tuple[list[SampleResult], dict[str, Any]]:
        scores = sample_scores(records, ids)
        results = [
            SampleResult(
                s.id,
                {"VIEScore_SC": s.sc, "VIEScore_PQ": s.pq, "VIEScore_O": s.o,
                 self.failure_metric: 1.0 if s.failed else 0.0},
                s.reason,
            )  # fmt: skip
            for s in scores
        ]
        return results, summarize(scores)

    def headline(self, summary: Mapping[str, Any]) -> str:
        return ", ".join(f"{k} {_number(summary.get(k))}" for k in ("SC", "PQ", "O"))


class ImgEditScheme:
    """ImgEdit-Bench's per-edit-type question (:mod:`metrics.judge.imgedit`)."""

    name = "ImgEdit"
    kinds = (IMGEDIT_KIND,)
    failure_metric = "ImgEdit_failure_rate"

    def __init__(self, prompts: ImgEditPrompts) -> None:
        self.prompts = prompts
        self.columns = (*(imgedit_metric(t) for t in prompts.templates), self.failure_metric)

    @staticmethod
    def edit_type(sample: str, row: Mapping[str, Any]) -> str:
        kind = row.get("category")
        if not kind:
            raise BundleError(
                f"inputs.jsonl, sample {sample}: no 'category' (the edit type) to pick ImgEdit's "
                "prompt by; rerun `test` on ImgEditBenchDataModule with this version of the suite"
            )
        return str(kind)

    def questions(self, sample: str, row: Mapping[str, Any]) -> list[Question]:
        prompt = self.prompts.prompt(self.edit_type(sample, row), str(row["instruction"]))
        return [Question(IMGEDIT_KIND, prompt, (SOURCES, IMAGES))]

    def results(
        self, records: Sequence[JudgeRecord], ids: Sequence[str], inputs: Mapping[str, Mapping]
    ) -> tuple[list[SampleResult], dict[str, Any]]:
        by_key = {(r.id, r.kind): r for r in records}
        results, judged, types = [], {}, {}
        for sample in ids:
            kind = self.edit_type(sample, inputs[sample])
            types[sample] = kind
            reason = _failure_reason(sample, by_key, self.kinds)
            value = None
            if reason is None:
                value = judged[sample] = image_score(by_key[(sample, IMGEDIT_KIND)].scores)
            results.append(
                SampleResult(
                    sample,
                    {imgedit_metric(kind): value, self.failure_metric: 0.0 if reason is None else 1.0},
                    reason,
                )
            )
        failures = len(ids) - len(judged)
        summary = {
            "score": math.fsum(judged.values()) / len(judged) if judged else None,
            "type_scores": type_scores(judged, types),
            "n_samples": len(ids),
            "n_judged": len(judged),
            "failures": failures,
            "failure_rate": failures / len(ids) if ids else None,
        }
        return results, summary

    def headline(self, summary: Mapping[str, Any]) -> str:
        per_type = ", ".join(f"{k} {v:.2f}" for k, v in summary["type_scores"].items())
        return f"mean per image {_number(summary.get('score'))}; per edit type: {per_type or '–'}"


Scheme = VIEScoreScheme | ImgEditScheme


def scheme_for(prompts: PromptSet | ImgEditPrompts) -> Scheme:
    """The scheme whose prompts ``prompts`` are."""
    return ImgEditScheme(prompts) if isinstance(prompts, ImgEditPrompts) else VIEScoreScheme(prompts)


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


__all__ = [
    "ImgEditScheme",
    "Question",
    "SampleResult",
    "Scheme",
    "VIEScoreScheme",
    "scheme_for",
]
