"""ImgEdit-Bench's judge for its basic single-turn suite: the per-edit-type prompts of the release,
read at run time, and the release's rule for turning an answer into a score.

Facts from the release (PKU-YuanGroup/ImgEdit, ``Benchmark/Basic``, commit 547185d); nothing of
its text is shipped here:

- ``prompts.json`` is ``{edit_type: prompt}`` for the nine edit types; each prompt holds the
  placeholder ``<edit_prompt>``, which ``basic_bench.py`` replaces with the instruction
  (``prompt.replace('<edit_prompt>', edit_prompt)``). The prompt asks for three 1-5 scores
  (e.g. "Prompt Compliance", "Visual Naturalness", "Physical & Detail Integrity"; the names
  differ per type), each on its own ``Name: <number>`` line after a brief reasoning.
- ``basic_bench.py`` sends one user message: the prompt text, then the original image, then the
  edited image, as base64 PNG ``image_url`` parts, to ``gpt-4o`` without ``temperature`` or
  ``max_tokens`` (the API's defaults): judge preset ``imgedit-release``.
- ``step1_get_avgscore.py``: the per-image score is the mean of the numbers on the answer's lines
  that split on ``": "`` into exactly two parts whose second part is all digits, rounded to two
  decimals; an answer with no such line gives no score (the image is left out, not scored 0).
  :func:`parse_imgedit_scores` and :func:`image_score` follow that rule to the letter (a line
  ``Prompt Compliance: 4.`` or ``**Score**: 4/5`` is not a score line there, nor here).
- ``step2_typescore.py``: the score of an edit type is the mean of its images' scores, rounded to
  two decimals (:func:`type_score`); ImgEdit's tables report these.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metrics.judge.prompts import JudgeError, describe_prompts, snippet

#: The record kind of an ImgEdit judgement (one question per image).
IMGEDIT_KIND = "ImgEdit"
EDIT_PLACEHOLDER = "<edit_prompt>"
PROMPTS_FILE = "prompts.json"
PROMPT_SET_NAME = "imgedit-basic-release"
#: Where the file sits in a checkout of the repository.
RELEASE_SUBFOLDER = Path("Benchmark") / "Basic"


#: ``basic_bench.py``'s request: ``gpt-4o``, no temperature or max_tokens, PNG at native size.
IMGEDIT_PRESETS: dict[str, dict[str, Any]] = {
    "imgedit-release": {
        "backend": "openai",
        "model": "gpt-4o",
        "max_new_tokens": None,
        "temperature": None,
        "image_size": None,
        "image_format": "png",
    },
}


@dataclass(frozen=True)
class ImgEditPrompts:
    """The release's ``{edit_type: prompt}`` and where it was read from.

    Attributes:
        templates: edit type -> prompt with ``<edit_prompt>``.
        path: the ``prompts.json`` read.
        files: its name -> sha256 of its bytes.
    """

    templates: dict[str, str]
    path: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    name: str = PROMPT_SET_NAME

    @property
    def sha256(self) -> str:
        """sha256 of the templates (what identifies the prompts beside ImgEdit numbers)."""
        text = json.dumps(self.templates, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def prompt(self, edit_type: str, instruction: str) -> str:
        """The prompt for one edit, as ``basic_bench.py`` builds it."""
        if edit_type not in self.templates:
            raise KeyError(
                f"ImgEdit: no prompt for edit type {edit_type!r} in {self.path}; it has "
                f"{sorted(self.templates)}"
            )
        return self.templates[edit_type].replace(EDIT_PLACEHOLDER, instruction)

    def describe(self) -> dict[str, Any]:
        """JSON-able record for the provenance (name, hash, file and its hash)."""
        return describe_prompts(self)


def _prompts_file(path: Path) -> Path:
    """``path`` itself when it is a file, else ``prompts.json`` in it or in its
    ``Benchmark/Basic`` folder (the user pointed at the repository)."""
    if path.is_file():
        return path
    for folder in (path, path / RELEASE_SUBFOLDER):
        if (folder / PROMPTS_FILE).is_file():
            return folder / PROMPTS_FILE
    raise FileNotFoundError(
        f"ImgEdit judge: no {PROMPTS_FILE} at {path} (nor in {path / RELEASE_SUBFOLDER}); pass "
        f"--prompts_path pointing at the release's {RELEASE_SUBFOLDER / PROMPTS_FILE} "
        "(PKU-YuanGroup/ImgEdit); its prompts are not shipped with the suite"
    )


def load_imgedit_prompts(prompts_path: str | Path, edit_types: Sequence[str] = ()) -> ImgEditPrompts:
    """The release's prompts from ``prompts_path`` (the file, its folder or the repository).

    Raises ``ValueError`` naming the file and the key when it is not ``{type: text}``, a prompt
    lacks ``<edit_prompt>``, or one of ``edit_types`` has no prompt.
    """
    path = _prompts_file(Path(prompts_path).expanduser().resolve())
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a JSON file ({err})") from err
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected an object {{edit_type: prompt}}")
    for key, text in data.items():
        if not isinstance(text, str) or EDIT_PLACEHOLDER not in text:
            raise ValueError(
                f"{path}, key {key!r}: expected a prompt text holding {EDIT_PLACEHOLDER}, got "
                f"{snippet(text)}"
            )
    missing = [t for t in edit_types if t not in data]
    if missing:
        raise ValueError(f"{path}: no prompt for edit type(s) {missing}; it has {sorted(data)}")
    return ImgEditPrompts(dict(data), str(path), {path.name: hashlib.sha256(raw).hexdigest()})


def parse_imgedit_scores(answer: str) -> list[float]:
    """The numbers of an answer's ``Name: <digits>`` lines (``step1_get_avgscore.py``'s rule);
    :class:`JudgeError` when there is none (the release leaves such an image out)."""
    if not isinstance(answer, str) or not answer.strip():
        raise JudgeError("empty answer")
    scores = []
    for line in answer.splitlines():
        parts = line.strip().split(": ")
        if len(parts) == 2 and parts[1].isdigit():
            scores.append(float(int(parts[1])))
    if not scores:
        raise JudgeError(f"no 'Name: <number>' score line in the answer {snippet(answer)}")
    return scores


def valid_imgedit_scores(scores: Sequence[Any]) -> bool:
    """What :func:`parse_imgedit_scores` can give: one or more whole numbers >= 0."""
    return (
        isinstance(scores, (list, tuple))
        and len(scores) > 0
        and all(
            isinstance(s, (int, float))
            and not isinstance(s, bool)
            and math.isfinite(s)
            and s >= 0
            and float(s).is_integer()
            for s in scores
        )
    )


def image_score(scores: Sequence[float]) -> float:
    """The image's score: the mean of its numbers, rounded to two decimals (step 1)."""
    return round(sum(scores) / len(scores), 2)


def type_score(values: Sequence[float]) -> float | None:
    """An edit type's score: the mean of its images' scores, rounded to two decimals (step 2)."""
    return round(sum(values) / len(values), 2) if values else None


def type_scores(image_scores: Mapping[str, float], edit_types: Mapping[str, str]) -> dict[str, float]:
    """``{edit_type: type_score}`` over the judged images (``image_scores``: id -> score)."""
    grouped: dict[str, list[float]] = {}
    for sample, value in image_scores.items():
        grouped.setdefault(edit_types[sample], []).append(value)
    return {kind: type_score(values) for kind, values in sorted(grouped.items())}  # type: ignore[misc]


__all__ = [
    "EDIT_PLACEHOLDER",
    "IMGEDIT_KIND",
    "IMGEDIT_PRESETS",
    "PROMPT_SET_NAME",
    "ImgEditPrompts",
    "image_score",
    "load_imgedit_prompts",
    "parse_imgedit_scores",
    "type_score",
    "type_scores",
    "valid_imgedit_scores",
]
