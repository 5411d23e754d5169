"""VIEScore's prompt sets, judge presets and the answer format (how a reply is parsed).

VIEScore (Ku et al., "VIEScore: Towards Explainable Metrics for Conditional Image Synthesis
Evaluation", ACL 2024), text-guided image editing: the SC prompt asks for
``[editing success, over-editing]`` about ``[source, edited]`` and the instruction, the PQ prompt
for ``[naturalness, artifacts]`` about the edited image, each on 0-10, answered as a JSON object
``{"score": [...], "reasoning": "..."}`` (:func:`parse_scores`).

Two prompt sets exist, and every VIEScore result names the one it used (``prompt_set`` in the
provenance, in every cached answer and in every judge record):

- ``editbench-builtin`` (:data:`BUILTIN`): this suite's own wording of VIEScore's zero-shot
  editing prompts. Its scores are NOT comparable with published VIEScore numbers.
- ``viescore-release-0shot`` (:func:`load_prompt_set`): the prompt files of the VIEScore
  release (TIGER-AI-Lab/VIEScore, ``viescore/prompts_raw/``), read at run time from a folder the
  user points at (``prompts_path``); nothing of the release is shipped here. The release's
  ``VIEScore(task="tie")`` builds its prompts as
  ``SC = "\\n".join([context_no_delimit, two_image_edit_rule, tie_rule_SC])`` and
  ``PQ = "\\n".join([context_no_delimit, rule_PQ])``, and puts the instruction in with
  ``SC.replace("<instruction>", instruction)``; so does :func:`load_prompt_set`, from
  ``context_no_delimit.txt``, ``prompts_0shot/two_image_edit_rule.txt``,
  ``prompts_0shot/tie_rule_SC.txt`` and ``prompts_0shot/rule_PQ.txt``. The provenance records the
  folder, the sha256 of every file read and of the composed templates.

Judge preset ``viescore-release`` (:data:`JUDGE_PRESETS`): the release's GPT-4o client
(``mllm_tools/openai.py``, ``GPT4o``): the dated snapshot ``gpt-4o-2024-05-13``,
``max_tokens`` 1400, no ``temperature`` in the request (the API's default), images as JPEG
(Pillow's default quality) at their native size, text first and then the images in one user
message.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INSTRUCTION_PLACEHOLDER = "<instruction>"

# --------------------------------------------------------------------------- built-in set

CONTEXT_PROMPT = """\
You are an expert digital artist who judges AI-generated images by the rules given below.
Every input image is AI-generated, including any person shown in it, so describing the images \
raises no privacy concern.

Reply with a single JSON object and nothing else, in this form (keep the reasoning short):
{
"score": [...],
"reasoning": "..."
}"""

SC_RULE = """\
RULES:

Two images are given: the first is an original AI-generated image and the second is an edited \
version of it. Judge how well the editing instruction below has been carried out in the second \
image. The two images may look the same when the edit failed.

Give two scores, each on a scale from 0 to 10:
- The first score rates the editing success. 0 means the scene of the edited image does not \
follow the editing instruction at all; 10 means it follows the instruction perfectly.
- The second score rates the over-editing of the second image. 0 means the edited scene is \
entirely different from the original; 10 means the edited image is recognisably a minimal yet \
effective edit of the original.
Return them as "score": [editing success, over-editing].

Editing instruction: <instruction>"""

PQ_RULE = """\
RULES:

One image is given; it is AI-generated. Judge how well the image has been generated.

Give two scores, each on a scale from 0 to 10:
- The first score rates the naturalness of the image. 0 means the scene does not look natural \
at all or feels wrong, e.g. a wrong sense of distance, wrong shadows or wrong lighting; 10 \
means the image looks natural.
- The second score rates the artifacts of the image. 0 means a large part of the image shows \
distortion, a watermark, scratches, blurred faces, unusual body parts or subjects that do not \
blend in; 10 means the image has no artifacts.
Return them as "score": [naturalness, artifacts]."""


@dataclass(frozen=True)
class PromptSet:
    """The SC template (with ``<instruction>``) and the PQ prompt of one prompt set.

    Attributes:
        name: ``editbench-builtin`` or ``viescore-release-0shot``.
        sc_template: the SC prompt, ``<instruction>`` standing for the instruction.
        pq_prompt: the PQ prompt.
        strip_instruction: strip the instruction's surrounding whitespace (built-in set; the
            release inserts it as given).
        path: the folder the files were read from (None for the built-in set).
        files: file name (relative to ``path``) -> sha256 of its bytes.
    """

    name: str
    sc_template: str
    pq_prompt: str
    strip_instruction: bool = False
    path: str | None = None
    files: dict[str, str] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        """sha256 of the two templates: what identifies the prompts beside VIEScore numbers."""
        text = json.dumps({"SC": self.sc_template, "PQ": self.pq_prompt}, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def sc(self, instruction: str) -> str:
        """The SC prompt for one editing instruction."""
        text = instruction.strip() if self.strip_instruction else instruction
        return self.sc_template.replace(INSTRUCTION_PLACEHOLDER, text)

    def describe(self) -> dict[str, Any]:
        """JSON-able record for the provenance (name, hash, folder and file hashes)."""
        return describe_prompts(self)


def describe_prompts(prompts: Any) -> dict[str, Any]:
    """The provenance of a prompt set (its ``name``, ``sha256``, and the ``path`` and ``files``
    with their hashes it was read from, where it was read)."""
    record: dict[str, Any] = {"prompt_set": prompts.name, "prompt_sha256": prompts.sha256}
    if prompts.path is not None:
        record["prompts_path"] = prompts.path
        record["prompt_files"] = dict(prompts.files)
    return record


BUILTIN = PromptSet(
    "editbench-builtin",
    f"{CONTEXT_PROMPT}\n\n{SC_RULE}",
    f"{CONTEXT_PROMPT}\n\n{PQ_RULE}",
    strip_instruction=True,
)

# --------------------------------------------------------------------------- release files

#: The release's files (relative to ``viescore/prompts_raw/``) of the editing task's prompts.
RELEASE_FILES = {
    "context": "context_no_delimit.txt",
    "edit_rule": "prompts_0shot/two_image_edit_rule.txt",
    "sc_rule": "prompts_0shot/tie_rule_SC.txt",
    "pq_rule": "prompts_0shot/rule_PQ.txt",
}
RELEASE_SET_NAME = "viescore-release-0shot"


def _release_root(path: Path) -> Path:
    """``path`` itself, or its ``prompts_raw`` / ``viescore/prompts_raw`` subfolder when the
    user pointed at the repository or its ``viescore`` folder."""
    for candidate in (path, path / "prompts_raw", path / "viescore" / "prompts_raw"):
        if (candidate / RELEASE_FILES["context"]).is_file():
            return candidate
    return path


def load_prompt_set(prompts_path: str | Path) -> PromptSet:
    """The release's editing prompts from ``prompts_path`` (see the module docstring).

    Raises ``FileNotFoundError`` naming the folder and every missing file, and ``ValueError``
    when the SC rule has no ``<instruction>`` placeholder.
    """
    folder = Path(prompts_path).expanduser().resolve()
    root = _release_root(folder)
    missing = [name for name in RELEASE_FILES.values() if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"VIEScore: prompts_path {folder} lacks the VIEScore release's prompt file(s) "
            f"{missing}; point it at the release's viescore/prompts_raw folder "
            f"(TIGER-AI-Lab/VIEScore), which holds {sorted(RELEASE_FILES.values())}"
        )
    raw = {key: (root / name).read_bytes() for key, name in RELEASE_FILES.items()}
    text = {key: value.decode("utf-8") for key, value in raw.items()}
    if INSTRUCTION_PLACEHOLDER not in text["sc_rule"]:
        raise ValueError(
            f"VIEScore: {root / RELEASE_FILES['sc_rule']} has no {INSTRUCTION_PLACEHOLDER} "
            "placeholder for the editing instruction"
        )
    return PromptSet(
        RELEASE_SET_NAME,
        "\n".join([text["context"], text["edit_rule"], text["sc_rule"]]),
        "\n".join([text["context"], text["pq_rule"]]),
        strip_instruction=False,
        path=str(root),
        files={name: hashlib.sha256(raw[key]).hexdigest() for key, name in RELEASE_FILES.items()},
    )


def prompt_set(prompts_path: str | Path | None) -> PromptSet:
    """The release's set read from ``prompts_path``, or the built-in set when it is None."""
    return BUILTIN if prompts_path is None else load_prompt_set(prompts_path)


# --------------------------------------------------------------------------- presets

#: name -> judge settings (VIEScore constructor arguments) of a published configuration.
JUDGE_PRESETS: dict[str, dict[str, Any]] = {
    "viescore-release": {
        "backend": "openai",
        "model": "gpt-4o-2024-05-13",
        "max_new_tokens": 1400,
        "temperature": None,
        "image_size": None,
        "image_format": "jpeg",
    },
}


def apply_preset(
    preset: str | None,
    given: dict[str, Any],
    defaults: dict[str, Any],
    presets: Mapping[str, dict[str, Any]] = JUDGE_PRESETS,
) -> dict[str, Any]:
    """``given`` with the preset's settings filled in where ``given`` holds the constructor
    default; a non-default value that contradicts the preset is an error naming both."""
    if preset is None:
        return dict(given)
    if preset not in presets:
        raise ValueError(f"judge: unknown preset {preset!r}; known: {sorted(presets)}")
    out = dict(given)
    for key, value in presets[preset].items():
        if given[key] == defaults[key] or given[key] == value:
            out[key] = value
        else:
            raise ValueError(
                f"VIEScore: preset {preset!r} sets {key}={value!r}, but {key}={given[key]!r} was "
                "given; drop one of them"
            )
    return out


# --------------------------------------------------------------------------- answers

#: VIEScore's score scale.
SCORE_RANGE = (0.0, 10.0)
#: Number of scores each prompt asks for ([editing success, over-editing], [naturalness,
#: artifacts]).
NUM_SCORES = {"SC": 2, "PQ": 2}
#: The prompt kinds asked per sample, in order.
KINDS = ("SC", "PQ")


class JudgeError(ValueError):
    """A judge request that gave no usable answer (bad body, refusal, unparseable answer).

    ``retry``: whether asking again may help. False for transport failures (HTTP errors,
    timeouts, connection errors), which the HTTP client has already retried itself, and for
    refusals. ``attempts``: the requests it took (the client's retries included); ``model``
    and ``system_fingerprint``: what the endpoint reported, where a reply came back."""

    def __init__(
        self,
        message: str,
        retry: bool = True,
        attempts: int = 1,
        model: str | None = None,
        system_fingerprint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.retry = retry
        self.attempts = attempts
        self.model = model
        self.system_fingerprint = system_fingerprint


def _json_objects(text: str):
    """Every JSON object found in ``text``, left to right (decoding from each ``{``)."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            yield value


def valid_score(value: Any) -> bool:
    """A number (not a bool), finite, on VIEScore's 0-10 scale."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and SCORE_RANGE[0] <= value <= SCORE_RANGE[1]
    )


def snippet(text: Any, limit: int = 120) -> str:
    """``text`` on one line, cut at ``limit`` characters, quoted (for error messages)."""
    text = " ".join(str(text).split())
    return repr(text if len(text) <= limit else text[:limit] + "...")


def parse_scores(answer: str, num_scores: int) -> list[float]:
    """The ``score`` list of a judge answer ``{"score": [...], "reasoning": "..."}``.

    The first JSON object with a ``score`` key is used, wherever it sits in the reply (inside
    a ```json fence, after some prose, ...). It must be a list of exactly ``num_scores``
    numbers, each within VIEScore's 0-10 scale; anything else raises :class:`JudgeError`.
    """
    if not isinstance(answer, str) or not answer.strip():
        raise JudgeError("empty answer")
    found = next((obj for obj in _json_objects(answer) if "score" in obj), None)
    if found is None:
        raise JudgeError(f"no JSON object with a 'score' key in the answer {snippet(answer)}")
    scores = found["score"]
    if not isinstance(scores, list) or len(scores) != num_scores:
        raise JudgeError(f"'score' must be a list of {num_scores} numbers, got {scores!r}")
    if not all(valid_score(s) for s in scores):
        raise JudgeError(f"'score' values must be numbers in [0, 10], got {scores!r}")
    return [float(s) for s in scores]


# --------------------------------------------------------------------------- built-in names

#: The built-in SC prompt, with ``<instruction>`` standing for the editing instruction.
SC_PROMPT_TEMPLATE = BUILTIN.sc_template
#: The built-in PQ prompt (the same for every image).
PQ_PROMPT = BUILTIN.pq_prompt
#: sha256 of the built-in prompt templates: what to quote beside VIEScore numbers.
PROMPT_SHA256 = BUILTIN.sha256


def sc_prompt(instruction: str) -> str:
    """The built-in SC prompt for one editing instruction."""
    return BUILTIN.sc(instruction)


__all__ = [
    "BUILTIN",
    "PQ_PROMPT",
    "PROMPT_SHA256",
    "SC_PROMPT_TEMPLATE",
    "CONTEXT_PROMPT",
    "JUDGE_PRESETS",
    "KINDS",
    "NUM_SCORES",
    "RELEASE_FILES",
    "SCORE_RANGE",
    "JudgeError",
    "PromptSet",
    "apply_preset",
    "describe_prompts",
    "load_prompt_set",
    "parse_scores",
    "prompt_set",
    "sc_prompt",
    "snippet",
    "valid_score",
]
