"""MLLM judges of edits, in parts (no Lightning here): VIEScore (Ku et al., ACL 2024; also
GEdit-Bench's judge) and ImgEdit-Bench's per-edit-type judge.

- :mod:`metrics.judge.prompts`: VIEScore's prompt sets (built-in, the release's files), presets,
  parsing
- :mod:`metrics.judge.imgedit`: ImgEdit-Bench's prompts (the release's ``prompts.json``), its
  preset and its scoring rule
- :mod:`metrics.judge.rules`: how each kind of question is parsed and checked
- :mod:`metrics.judge.schemes`: what is asked per bundle sample and the per-sample values
- :mod:`metrics.judge.images`: what the judge sees (8-bit RGB, shrunk, PNG/JPEG bytes)
- :mod:`metrics.judge.judges`: :class:`OpenAIJudge` (the ``openai`` client) and
  :class:`LocalJudge` (a transformers LLaVA folder)
- :mod:`metrics.judge.cache`: the answer cache
- :mod:`metrics.judge.asking`: cache look-ups, concurrent asks, re-asks of unparseable answers
- :mod:`metrics.judge.record`: the per-sample judge record (``judge.jsonl``) and aggregates
- :mod:`metrics.judge.offline`: judging a result bundle after ``test`` (``editbench judge``)
- :mod:`metrics.judge.metric`: the :class:`VIEScore` torchmetrics Metric (the in-test path)
"""

from metrics.judge.cache import AnswerCache, cache_key
from metrics.judge.judges import LocalJudge, OpenAIJudge
from metrics.judge.metric import VIEScore
from metrics.judge.prompts import PROMPT_SHA256, JudgeError, parse_scores

__all__ = [
    "PROMPT_SHA256",
    "AnswerCache",
    "JudgeError",
    "LocalJudge",
    "OpenAIJudge",
    "VIEScore",
    "cache_key",
    "parse_scores",
]
