"""How each kind of judge question is parsed and which scores it may hold.

A judge record (:mod:`metrics.judge.record`), a cached answer (:mod:`metrics.judge.cache`) and a
re-ask loop (:mod:`metrics.judge.asking`) all look the rule up by the record's ``kind``:

- ``SC`` / ``PQ``: VIEScore's two questions, a JSON ``{"score": [a, b]}`` on 0-10
  (:func:`metrics.judge.prompts.parse_scores`);
- ``ImgEdit``: ImgEdit-Bench's one question per image, ``Name: <digits>`` lines
  (:func:`metrics.judge.imgedit.parse_imgedit_scores`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from metrics.judge.imgedit import (
    IMGEDIT_KIND,
    ImgEditPrompts,
    parse_imgedit_scores,
    valid_imgedit_scores,
)
from metrics.judge.prompts import NUM_SCORES, PromptSet, parse_scores, valid_score

#: A prompt set of either judge (both have ``name``, ``sha256`` and ``describe()``).
Prompts = PromptSet | ImgEditPrompts


@dataclass(frozen=True)
class ScoreRule:
    """``parse(answer) -> scores`` (raises :class:`~metrics.judge.prompts.JudgeError`) and
    ``valid(scores) -> bool`` of one question kind."""

    parse: Callable[[str], list[float]]
    valid: Callable[[Sequence[Any]], bool]


def _viescore_valid(num_scores: int, scores: Sequence[Any]) -> bool:
    return (
        isinstance(scores, (list, tuple))
        and len(scores) == num_scores
        and all(valid_score(s) for s in scores)
    )


SCORE_RULES: dict[str, ScoreRule] = {
    **{
        kind: ScoreRule(
            functools.partial(parse_scores, num_scores=n), functools.partial(_viescore_valid, n)
        )
        for kind, n in NUM_SCORES.items()
    },
    IMGEDIT_KIND: ScoreRule(parse_imgedit_scores, valid_imgedit_scores),
}


def score_rule(kind: str) -> ScoreRule:
    """The rule of ``kind``; an unknown kind is a ``ValueError`` naming the known ones."""
    try:
        return SCORE_RULES[kind]
    except KeyError:
        raise ValueError(f"unknown judge question kind {kind!r}; known: {sorted(SCORE_RULES)}") from None


__all__ = ["SCORE_RULES", "Prompts", "ScoreRule", "score_rule"]
