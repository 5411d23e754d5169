"""VIEScore for instruction-based editing: an MLLM judge scores each (source, edited) pair.

VIEScore (Ku et al., "VIEScore: Towards Explainable Metrics for Conditional Image Synthesis
Evaluation", ACL 2024), text-guided image editing task:

- Semantic consistency (SC): the judge sees ``[source, edited]`` and the instruction and answers
  two scores on 0-10, ``[editing success, over-editing]``; ``SC = min`` of the two.
- Perceptual quality (PQ): the judge sees the edited image only and answers
  ``[naturalness, artifacts]`` on 0-10; ``PQ = min`` of the two.
- Overall: ``O = sqrt(SC * PQ)`` per image.

The judge answers a JSON object ``{"score": [...], "reasoning": "..."}``. The metric reports the
means over scored images of SC, PQ and the per-image O (on VIEScore's 0-10 scale), and counts
as ``failures`` the images whose SC or PQ answer could not be obtained or parsed after the
retries. Failed images are left out of the means (never scored 0), so a flaky endpoint cannot
read as a bad model; the count belongs in any report next to the means.

Prompts (:mod:`metrics.viescore_prompts`): by default the suite's own wording of VIEScore's
zero-shot editing prompts (prompt set ``editbench-builtin``, :data:`PROMPT_SHA256`), NOT
comparable with published VIEScore numbers; with ``prompts_path`` the VIEScore release's own
prompt files, read at run time (prompt set ``viescore-release-0shot``, recorded by hash). Every
provenance record and cached answer names its prompt set. ``preset="viescore-release"`` adds
the release's judge settings (``gpt-4o-2024-05-13``, ``max_tokens`` 1400, JPEG at native size).

Backends:

- ``"openai"``: any OpenAI-compatible ``POST {base_url}/chat/completions`` endpoint (OpenAI,
  vLLM, llama.cpp server, ...), stdlib ``urllib`` only. The message holds the prompt text first
  and then the images as ``image_url`` parts with ``data:image/<format>;base64,...`` URLs (the
  order VIEScore's GPT-4 client uses; PNG by default, lossless so the judged pixels are the
  hashed ones; ``image_format="jpeg"`` as the release), ``temperature`` (unless None) and
  ``max_tokens``. The API key is read from the environment variable named by
  ``api_key_env`` at each ``update``; it is never stored on the metric, in the cache or in
  warnings.
- ``"local"``: a transformers ``LlavaForConditionalGeneration`` + ``AutoProcessor`` folder,
  loaded offline, greedy decoding. LLaVA takes several ``<image>`` inputs in one prompt, so the
  SC prompt gets the two images as two separate ``<image>`` inputs (images first, then the
  text, LLaVA's convention). With greedy decoding a retry would give the same answer, so the
  local backend does not retry (unless ``temperature > 0``). Note that CLIP-style processors
  (llava-1.5) resize the shorter side and center-crop, so the borders of non-square images are
  not seen by the judge.

Images (``[B, 3, H, W]`` in ``[-1, 1]``) are quantised to 8-bit RGB, shrunk (Lanczos, aspect
ratio kept) so that their longer side is at most ``image_size`` (None: native size), and sent
as PNG or JPEG (``image_format``).

Answers are cached on disk (one JSON file per request, written atomically), keyed by the
sha256 of the backend, the model id, the generation settings, the full prompt text and the
encoded bytes of each image: a hit skips the request. Only parsed answers are cached; failures are
asked again on the next run.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import math
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import torch
from PIL import Image
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn

from metrics.pixel import at_least_float32, to_unit_range
from metrics.viescore_prompts import (
    BUILTIN,
    CONTEXT_PROMPT,
    PromptSet,
    apply_preset,
    prompt_set,
)

Backend = Literal["openai", "local"]
_BACKENDS = ("openai", "local")

DEFAULT_BASE_URL = "https://api.openai.com/v1"
BASE_URL_ENV = "EDITBENCH_VIESCORE_BASE_URL"
DEFAULT_CACHE_DIR = "~/.cache/editbench/viescore"
SCORE_RANGE = (0.0, 10.0)
MAX_BACKOFF_S = 30.0  # cap of the exponential backoff between retries
ImageFormat = Literal["png", "jpeg"]
_IMAGE_FORMATS = ("png", "jpeg")

# --------------------------------------------------------------------------- prompts

#: The built-in SC prompt, with ``<instruction>`` standing for the editing instruction.
SC_PROMPT_TEMPLATE = BUILTIN.sc_template
#: The built-in PQ prompt (the same for every image).
PQ_PROMPT = BUILTIN.pq_prompt
#: sha256 of the built-in prompt templates: what to quote beside VIEScore numbers.
PROMPT_SHA256 = BUILTIN.sha256
#: Number of scores each prompt asks for ([editing success, over-editing], [naturalness,
#: artifacts]).
NUM_SCORES = {"SC": 2, "PQ": 2}


def sc_prompt(instruction: str) -> str:
    """The built-in SC prompt for one editing instruction."""
    return BUILTIN.sc(instruction)


# --------------------------------------------------------------------------- answers


class JudgeError(ValueError):
    """A judge request that gave no usable answer (HTTP error, bad body, unparseable answer)."""


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


def _valid_score(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and SCORE_RANGE[0] <= value <= SCORE_RANGE[1]
    )


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
        raise JudgeError(f"no JSON object with a 'score' key in the answer {_snippet(answer)}")
    scores = found["score"]
    if not isinstance(scores, list) or len(scores) != num_scores:
        raise JudgeError(f"'score' must be a list of {num_scores} numbers, got {scores!r}")
    if not all(_valid_score(s) for s in scores):
        raise JudgeError(f"'score' values must be numbers in [0, 10], got {scores!r}")
    return [float(s) for s in scores]


def _snippet(text: str, limit: int = 120) -> str:
    text = " ".join(str(text).split())
    return repr(text if len(text) <= limit else text[:limit] + "...")


# --------------------------------------------------------------------------- images


def to_pil_images(images: Tensor, image_size: int | None) -> list[Image.Image]:
    """``[B, 3, H, W]`` images in ``[-1, 1]`` → 8-bit RGB PIL images, longer side at most
    ``image_size`` (Lanczos, aspect ratio kept; smaller images are left as they are)."""
    with torch.autocast(device_type=images.device.type, enabled=False):
        unit = to_unit_range(at_least_float32(images.detach()))
    arrays = (unit * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [_shrink(Image.fromarray(array, mode="RGB"), image_size) for array in arrays]


def _shrink(image: Image.Image, image_size: int | None) -> Image.Image:
    width, height = image.size
    if image_size is None or max(width, height) <= image_size:
        return image
    scale = image_size / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def png_bytes(image: Image.Image) -> bytes:
    """Lossless PNG encoding of a PIL image (what is sent and what the cache key hashes)."""
    return encode_image(image, "png")


def encode_image(image: Image.Image, image_format: str = "png") -> bytes:
    """``image`` as PNG (lossless) or JPEG (Pillow's default quality, as the VIEScore release's
    ``encode_pil_image`` sends it): the bytes sent and hashed by the cache key."""
    buffer = io.BytesIO()
    image.save(buffer, format=image_format.upper())
    return buffer.getvalue()


# --------------------------------------------------------------------------- cache


def cache_key(
    backend: str, model: str, prompt: str, pngs: Sequence[bytes], generation: dict[str, Any]
) -> str:
    """sha256 of (backend, model id, generation settings, prompt text, each image's PNG bytes)."""
    header = {"backend": backend, "model": model, "generation": generation, "prompt": prompt}
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode("utf-8"))
    for png in pngs:
        digest.update(len(png).to_bytes(8, "little"))
        digest.update(png)
    return digest.hexdigest()


class AnswerCache:
    """One JSON file per key under ``root/<key[:2]>/<key>.json``, written atomically.

    A record holds the parsed ``scores`` and the raw ``answer`` with what produced it; it never
    holds credentials. Unreadable or invalid files count as misses.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str, num_scores: int) -> list[float] | None:
        """The cached scores for ``key`` (None on a miss or an invalid record)."""
        try:
            record = json.loads(self.path(key).read_text(encoding="utf-8"))
            scores = record["scores"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not isinstance(scores, list) or len(scores) != num_scores:
            return None
        if not all(_valid_score(s) for s in scores):
            return None
        return [float(s) for s in scores]

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


# --------------------------------------------------------------------------- HTTP backend


def is_local_url(url: str) -> bool:
    """Whether ``url`` points at this machine (no API key needed there)."""
    host = (urlparse(url).hostname or "").lower()
    return host in {"localhost", "127.0.0.1", "::1", "0.0.0.0"} or host.endswith(".localhost")


def public_url(url: str) -> str:
    """``url`` without user info, query or fragment (where credentials could hide)."""
    parts = urlparse(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    return parts._replace(netloc=netloc, query="", fragment="", params="").geturl()


def read_api_key(api_key_env: str, base_url: str) -> str | None:
    """The API key from the environment variable ``api_key_env``.

    Raises ``RuntimeError`` naming the variable when it is unset or empty and ``base_url`` is
    not on this machine; for a local server a missing key means "send no Authorization".
    """
    key = os.environ.get(api_key_env, "").strip()
    if key:
        return key
    if is_local_url(base_url):
        return None
    raise RuntimeError(
        f"VIEScore: the environment variable {api_key_env} is not set, but the judge endpoint "
        f"{base_url} needs an API key. Export {api_key_env}=... (the key is read from the "
        "environment only), or pass `api_key_env` naming the variable that holds it."
    )


def chat_request_body(
    model: str,
    prompt: str,
    pngs: Sequence[bytes],
    temperature: float | None,
    max_tokens: int,
    image_format: str = "png",
) -> dict[str, Any]:
    """An OpenAI chat-completions request: one user message, the text and then the images
    (``image/<format>`` data URLs); no ``temperature`` field when it is None (the API's
    default, as the VIEScore release sends)."""
    content: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
    for data in pngs:
        url = f"data:image/{image_format};base64," + base64.b64encode(data).decode("ascii")
        content.append({"type": "image_url", "image_url": {"url": url}})
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}]}
    if temperature is not None:
        body["temperature"] = temperature
    body["max_tokens"] = max_tokens
    return body


def _message_content(response: Any) -> str:
    """``choices[0].message.content`` of a chat-completions response, as text."""
    try:
        content = response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as err:
        raise JudgeError(
            f"no choices[0].message.content in the response {_snippet(response)}"
        ) from err
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise JudgeError(f"message content is not text: {_snippet(content)}")
    return content


def _error_body(err: urllib.error.HTTPError) -> str:
    try:
        return err.read()[:300].decode("utf-8", "replace") if err.fp else ""
    except OSError:  # the body itself timed out or was cut
        return ""


def post_chat(base_url: str, body: dict[str, Any], api_key: str | None, timeout: float) -> str:
    """POST ``body`` to ``{base_url}/chat/completions`` and return the answer text.

    ``timeout`` bounds each socket operation (connect, each read). HTTP errors, timeouts,
    connection errors and non-JSON bodies raise :class:`JudgeError`.
    """
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(
        base_url.rstrip("/") + "/chat/completions",
        data=json.dumps(body).encode("utf-8"),
        headers=headers,
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as err:
        raise JudgeError(f"HTTP {err.code} {err.reason}: {_snippet(_error_body(err))}") from err
    except (urllib.error.URLError, HTTPException, OSError) as err:  # OSError: timeouts, resets
        reason = getattr(err, "reason", err)
        raise JudgeError(f"request failed: {type(err).__name__}: {reason}") from err
    try:
        payload = json.loads(raw)
    except ValueError as err:
        raise JudgeError(f"response body is not JSON: {_snippet(raw[:200])}") from err
    return _message_content(payload)


# --------------------------------------------------------------------------- local backend


@functools.lru_cache(maxsize=2)
def _cached_judge(folder: str, device: str, dtype: str) -> tuple[Any, Any]:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(
        folder, local_files_only=True, dtype=getattr(torch, dtype)
    )
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    model = model.to(device).eval()
    model.requires_grad_(False)
    return model, processor


def _judge_folder(path: str | Path) -> Path:
    folder = Path(path).expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"VIEScore: no LLaVA judge at {folder} (expected a local folder with config.json: "
            "a LlavaForConditionalGeneration saved with `save_pretrained` together with its "
            "processor, e.g. llava-hf/llava-1.5-7b-hf). Nothing is downloaded."
        )
    return folder


def load_judge(
    path: str | Path, device: str | torch.device = "cpu", dtype: str = "float32"
) -> tuple[Any, Any]:
    """``(LlavaForConditionalGeneration, processor)`` from a local folder, frozen, eval, cached
    per (folder, device, dtype). Nothing is downloaded; no remote code is run."""
    return _cached_judge(str(_judge_folder(path)), str(torch.device(device)), dtype)


def local_prompt_text(processor: Any, prompt: str, num_images: int) -> str:
    """The LLaVA prompt: ``num_images`` image placeholders, then the text.

    Uses the processor's chat template when it has one (the llava-hf checkpoints do), else
    LLaVA-1.5's ``USER: <image>... ASSISTANT:`` format.
    """
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"} for _ in range(num_images)]
        content.append({"type": "text", "text": prompt})
        conversation = [{"role": "user", "content": content}]
        return processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False
        )
    image_token = getattr(processor, "image_token", "<image>")
    return "USER: " + f"{image_token}\n" * num_images + prompt + " ASSISTANT:"


def local_inputs(processor: Any, prompt: str, images: Sequence[Image.Image]) -> Any:
    """Processor inputs (``input_ids``, ``attention_mask``, ``pixel_values``) for one prompt
    with ``images`` as separate image inputs."""
    text = local_prompt_text(processor, prompt, len(images))
    return processor(images=list(images), text=[text], return_tensors="pt")


@torch.inference_mode()
def generate_answer(
    model: Any,
    processor: Any,
    prompt: str,
    images: Sequence[Image.Image],
    max_new_tokens: int,
    temperature: float = 0.0,
) -> str:
    """The judge's answer to ``prompt`` about ``images`` (greedy unless ``temperature > 0``);
    only the generated tokens are decoded."""
    inputs = local_inputs(processor, prompt, images).to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {}
    sampling.setdefault("do_sample", False)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, **sampling)
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    return processor.decode(new_tokens, skip_special_tokens=True)


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class _Request:
    """One judge question: prompt ``kind`` ("SC"/"PQ") about sample ``sample``."""

    sample: int
    kind: str
    prompt: str
    images: tuple[Image.Image, ...]
    pngs: tuple[bytes, ...]
    instruction: str


@dataclass(frozen=True)
class _Outcome:
    scores: list[float] | None
    answer: str
    attempts: int
    error: str


def ask_with_retries(
    ask: Callable[[], str], num_scores: int, attempts: int, retry_delay: float
) -> _Outcome:
    """Call ``ask`` up to ``attempts`` times until its answer parses; exponential backoff
    (``retry_delay * 2**k`` seconds, capped) between tries. Only :class:`JudgeError` (failed
    requests, bad bodies, unparseable answers) is retried; other errors propagate."""
    error = ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(min(retry_delay * 2 ** (attempt - 1), MAX_BACKOFF_S))
        try:
            answer = ask()
            return _Outcome(parse_scores(answer, num_scores), answer, attempt + 1, "")
        except JudgeError as err:
            error = str(err)
    return _Outcome(None, "", attempts, error)


# --------------------------------------------------------------------------- metric


#: Constructor defaults of the settings a preset may set (see ``apply_preset``).
_DEFAULTS = {
    "backend": "openai",
    "model": "gpt-4o",
    "max_new_tokens": 512,
    "temperature": 0.0,
    "image_size": 512,
    "image_format": "png",
}


class VIEScore(Metric):
    """VIEScore (Ku et al., ACL 2024) of instruction-based edits, judged by an MLLM.

    ``update(source, preds, instructions)``: ``source`` and ``preds`` are ``[B, 3, H, W]`` in
    ``[-1, 1]``, ``instructions`` a list of ``B`` strings. Per image the judge answers the SC
    prompt on ``[source, preds]`` and the PQ prompt on ``preds``; then
    ``SC_i = min(editing success, over-editing)``, ``PQ_i = min(naturalness, artifacts)``,
    ``O_i = sqrt(SC_i * PQ_i)`` (VIEScore's definitions, 0-10 scale).

    ``compute()`` returns ``{"SC", "PQ", "O", "failures"}``: the means of ``SC_i``, ``PQ_i`` and
    ``O_i`` over the scored images (nan when none was scored) and the number of images whose SC
    or PQ answer could not be obtained or parsed after the retries. Failed images are excluded
    from the means, never scored 0, and a warning names each (sample, prompt, last error).
    States ``sum_sc``, ``sum_pq``, ``sum_o``, ``num_scored``, ``num_failed`` are all
    ``"sum"``-reduced, so the result is exact under DDP. ``cache_hits`` and ``calls`` (judge
    requests made, retries included) are plain counters of this object, not states. Warnings
    number samples in the order this object has seen them (not reset by ``reset()``).

    Args:
        backend: ``"openai"`` (an OpenAI-compatible HTTP endpoint) or ``"local"`` (a LLaVA
            folder run with transformers).
        model: model name sent to the endpoint (``"openai"`` backend). A dated snapshot
            (e.g. ``"gpt-4o-2024-08-06"``) keeps results reproducible.
        base_url: endpoint root, e.g. ``http://localhost:8000/v1``; default: the environment
            variable ``EDITBENCH_VIESCORE_BASE_URL``, else OpenAI's.
        api_key_env: NAME of the environment variable holding the API key, read at each
            ``update``. Required for a non-local ``base_url``; a local server without it gets
            no ``Authorization`` header.
        model_path: local backend: a folder with a ``LlavaForConditionalGeneration`` and its
            processor.
        cache_dir: answer cache folder (default ``~/.cache/editbench/viescore``).
        use_cache: False to neither read nor write the cache.
        timeout: seconds per socket operation of a request.
        max_retries: extra attempts after a failed or unparseable answer (so at most
            ``1 + max_retries`` requests per prompt). The greedy local backend makes one
            attempt, since a retry would repeat the answer.
        retry_delay: first backoff delay in seconds, doubled at each retry (capped at 30 s).
        image_size: longer side (pixels) the images are shrunk to if larger; None keeps them.
        temperature: sampling temperature; the default 0 asks for deterministic (greedy)
            answers, which is what makes cached answers reusable. None sends no temperature
            (the API's default; the local backend decodes greedily).
        max_new_tokens: answer length limit (``max_tokens`` of the request / of generation).
        num_threads: concurrent HTTP requests (results keep the input order).
        judge_dtype: local backend: the judge's torch dtype (``"float32"``, ``"bfloat16"``, ...).
        prompts_path: a folder with the VIEScore release's prompt files (its
            ``viescore/prompts_raw``), read now and recorded by hash; None uses the built-in
            ``editbench-builtin`` prompts, whose scores are not comparable with published
            VIEScore numbers (:mod:`metrics.viescore_prompts`).
        preset: ``"viescore-release"``: the release's judge settings (``gpt-4o-2024-05-13``,
            ``max_tokens`` 1400, no temperature, JPEG at native size); arguments left at their
            defaults take the preset's values, a contradicting one is an error.
        image_format: ``"png"`` (lossless, default) or ``"jpeg"`` (the release's encoding).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 10.0

    sum_sc: Tensor
    sum_pq: Tensor
    sum_o: Tensor
    num_scored: Tensor
    num_failed: Tensor

    def __init__(
        self,
        backend: Backend = "openai",
        model: str = "gpt-4o",
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        model_path: str | None = None,
        cache_dir: str | None = None,
        use_cache: bool = True,
        timeout: float = 60.0,
        max_retries: int = 3,
        retry_delay: float = 1.0,
        image_size: int | None = 512,
        temperature: float | None = 0.0,
        max_new_tokens: int = 512,
        num_threads: int = 4,
        judge_dtype: str = "float32",
        prompts_path: str | None = None,
        preset: str | None = None,
        image_format: ImageFormat = "png",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        settings = apply_preset(
            preset,
            {
                "backend": backend,
                "model": model,
                "max_new_tokens": max_new_tokens,
                "temperature": temperature,
                "image_size": image_size,
                "image_format": image_format,
            },
            _DEFAULTS,
        )
        backend, model = settings["backend"], settings["model"]
        max_new_tokens, temperature = settings["max_new_tokens"], settings["temperature"]
        image_size, image_format = settings["image_size"], settings["image_format"]
        base_url = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
        _check_args(
            backend=backend,
            base_url=base_url,
            model_path=model_path,
            timeout=timeout,
            max_retries=max_retries,
            retry_delay=retry_delay,
            image_size=image_size,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            num_threads=num_threads,
            dtype=judge_dtype,
            image_format=image_format,
        )
        self.prompts: PromptSet = prompt_set(prompts_path)
        self.preset = preset
        self.image_format = image_format
        self.backend = backend
        self.model = model
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.model_path = str(Path(model_path).expanduser().resolve()) if model_path else None
        self.cache_dir = str(Path(cache_dir or DEFAULT_CACHE_DIR).expanduser())
        self.use_cache = use_cache
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.retry_delay = float(retry_delay)
        self.image_size = image_size
        self.temperature = None if temperature is None else float(temperature)
        self.max_new_tokens = int(max_new_tokens)
        self.num_threads = int(num_threads)
        self.judge_dtype = judge_dtype
        self.cache_hits = 0
        self.calls = 0
        self._seen = 0
        if backend == "local":
            _judge_folder(self.model_path)
        else:
            read_api_key(api_key_env, self.base_url)  # fail now rather than after generation
        for name in ("sum_sc", "sum_pq", "sum_o"):
            self.add_state(name, default=torch.tensor(0.0), dist_reduce_fx="sum")
        for name in ("num_scored", "num_failed"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    # ------------------------------------------------------------------ description

    @property
    def model_id(self) -> str:
        """The judge's identity: the endpoint's model name, or the local folder."""
        return self.model_path if self.backend == "local" else self.model

    def generation_settings(self) -> dict[str, Any]:
        """Settings that change the judge's answers (part of the cache key)."""
        return {"temperature": self.temperature, "max_new_tokens": self.max_new_tokens}

    def provenance(self) -> dict[str, Any]:
        """JSON-able description of the judge for a results' protocol block (no credentials)."""
        return {
            "metric": "VIEScore",
            "backend": self.backend,
            "model": self.model_id,
            "base_url": public_url(self.base_url) if self.backend == "openai" else None,
            **self.prompts.describe(),
            "preset": self.preset,
            "temperature": self.temperature,
            "max_new_tokens": self.max_new_tokens,
            "image_size": self.image_size,
            "image_format": self.image_format,
            "max_retries": self.max_retries,
        }

    # ------------------------------------------------------------------ update

    def update(self, source: Tensor, preds: Tensor, instructions: Sequence[str]) -> None:
        """Judge a batch: ``source``/``preds`` ``[B, 3, H, W]`` in ``[-1, 1]``, ``B``
        instructions."""
        instructions = _check_batch(source, preds, instructions)
        requests = self._requests(source, preds, instructions)
        outcomes = self._answer(requests)
        self._accumulate(requests, outcomes, len(instructions))
        self._seen += len(instructions)

    def _requests(self, source: Tensor, preds: Tensor, instructions: list[str]) -> list[_Request]:
        sources = to_pil_images(source, self.image_size)
        edits = to_pil_images(preds, self.image_size)
        requests = []
        for i, (src, edit, instruction) in enumerate(
            zip(sources, edits, instructions, strict=True)
        ):
            src_png = encode_image(src, self.image_format)
            edit_png = encode_image(edit, self.image_format)
            sample = self._seen + i
            sc = self.prompts.sc(instruction)
            requests.append(
                _Request(sample, "SC", sc, (src, edit), (src_png, edit_png), instruction)
            )
            pq = self.prompts.pq_prompt
            requests.append(_Request(sample, "PQ", pq, (edit,), (edit_png,), instruction))
        return requests

    def _key(self, request: _Request) -> str:
        settings = self.generation_settings()
        return cache_key(self.backend, self.model_id, request.prompt, request.pngs, settings)

    def _answer(self, requests: list[_Request]) -> list[_Outcome]:
        """Outcomes in request order: cache hits first, the misses asked to the judge."""
        cache = AnswerCache(self.cache_dir) if self.use_cache else None
        keys = [self._key(request) for request in requests] if cache else []
        outcomes: list[_Outcome | None] = [None] * len(requests)
        for i, request in enumerate(requests):
            cached = cache.get(keys[i], NUM_SCORES[request.kind]) if cache else None
            if cached is not None:
                outcomes[i] = _Outcome(cached, "", 0, "")
                self.cache_hits += 1
        missing = [i for i, outcome in enumerate(outcomes) if outcome is None]
        if missing:
            answered = self._ask([requests[i] for i in missing])
            for i, outcome in zip(missing, answered, strict=True):
                outcomes[i] = outcome
                self.calls += outcome.attempts
                if cache is not None and outcome.scores is not None:
                    cache.put(keys[i], self._record(requests[i], outcome))
        return outcomes  # type: ignore[return-value]

    def _ask(self, requests: list[_Request]) -> list[_Outcome]:
        if self.backend == "local":
            return self._ask_local(requests)
        return self._ask_http(requests)

    def _ask_http(self, requests: list[_Request]) -> list[_Outcome]:
        api_key = read_api_key(self.api_key_env, self.base_url)

        def one(request: _Request) -> _Outcome:
            body = chat_request_body(
                self.model,
                request.prompt,
                request.pngs,
                self.temperature,
                self.max_new_tokens,
                self.image_format,
            )
            outcome = ask_with_retries(
                lambda: post_chat(self.base_url, body, api_key, self.timeout),
                NUM_SCORES[request.kind],
                1 + self.max_retries,
                self.retry_delay,
            )
            return _redacted(outcome, api_key)

        workers = max(1, min(self.num_threads, len(requests)))
        if workers == 1:
            return [one(request) for request in requests]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="viescore") as pool:
            return list(pool.map(one, requests))  # map keeps the input order

    def _ask_local(self, requests: list[_Request]) -> list[_Outcome]:
        model, processor = load_judge(self.model_path, self.device, self.judge_dtype)
        temperature = self.temperature or 0.0  # None: greedy
        attempts = 1 if temperature == 0 else 1 + self.max_retries
        outcomes = []
        for request in requests:
            ask = functools.partial(
                generate_answer,
                model,
                processor,
                request.prompt,
                request.images,
                self.max_new_tokens,
                temperature,
            )
            kind = NUM_SCORES[request.kind]
            outcomes.append(ask_with_retries(ask, kind, attempts, self.retry_delay))
        return outcomes

    def _record(self, request: _Request, outcome: _Outcome) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "model": self.model_id,
            "kind": request.kind,
            "prompt_set": self.prompts.name,
            "prompt_sha256": self.prompts.sha256,
            "generation": self.generation_settings(),
            "scores": outcome.scores,
            "answer": outcome.answer,
        }

    def _accumulate(self, requests: list[_Request], outcomes: list[_Outcome], batch: int) -> None:
        """Add the batch's per-image SC, PQ and O (two requests per image: SC then PQ)."""
        sc_sum = pq_sum = o_sum = 0.0
        scored = failed = 0
        for i in range(batch):
            sc_req, pq_req = requests[2 * i], requests[2 * i + 1]
            sc_out, pq_out = outcomes[2 * i], outcomes[2 * i + 1]
            for request, outcome in ((sc_req, sc_out), (pq_req, pq_out)):
                if outcome.scores is None:
                    self._warn_failure(request, outcome)
            if sc_out.scores is None or pq_out.scores is None:
                failed += 1
                continue
            sc, pq = min(sc_out.scores), min(pq_out.scores)
            sc_sum, pq_sum, o_sum = sc_sum + sc, pq_sum + pq, o_sum + math.sqrt(sc * pq)
            scored += 1
        self.sum_sc += sc_sum
        self.sum_pq += pq_sum
        self.sum_o += o_sum
        self.num_scored += scored
        self.num_failed += failed

    def _warn_failure(self, request: _Request, outcome: _Outcome) -> None:
        warnings.warn(
            f"VIEScore: no valid {request.kind} answer for sample {request.sample} (instruction "
            f"{_snippet(request.instruction, 80)}) after {outcome.attempts} attempt(s) with "
            f"{self.backend}:{self.model_id}; last error: {outcome.error}. The image is counted "
            "in `failures` and left out of the means.",
            UserWarning,
            stacklevel=2,
        )

    # ------------------------------------------------------------------ compute

    def compute(self) -> dict[str, Tensor]:
        """``{"SC", "PQ", "O"}``: means over scored images (nan if none); ``"failures"``: count."""
        failures = int(self.num_failed)
        if failures:
            total = failures + int(self.num_scored)
            rank_zero_warn(
                f"VIEScore: {failures} of {total} images got no valid judge answer and are left "
                "out of the means; report `failures` beside SC/PQ/O.",
                UserWarning,
            )
        count = self.num_scored.to(self.sum_sc.dtype)
        return {
            "SC": self.sum_sc / count,
            "PQ": self.sum_pq / count,
            "O": self.sum_o / count,
            "failures": self.num_failed.clone(),
        }


# --------------------------------------------------------------------------- checks


def _redacted(outcome: _Outcome, api_key: str | None) -> _Outcome:
    """``outcome`` with the API key masked out of its error text (servers may echo it)."""
    if not api_key or api_key not in outcome.error:
        return outcome
    error = outcome.error.replace(api_key, "***")
    return _Outcome(outcome.scores, outcome.answer, outcome.attempts, error)


def _check_args(
    backend: str,
    base_url: str,
    model_path: str | None,
    timeout: float,
    max_retries: int,
    retry_delay: float,
    image_size: int | None,
    temperature: float | None,
    max_new_tokens: int,
    num_threads: int,
    dtype: str,
    image_format: str = "png",
) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"VIEScore: `backend` must be one of {_BACKENDS}, got {backend!r}.")
    if backend == "local" and not model_path:
        raise ValueError("VIEScore: the local backend needs `model_path` (a LLaVA folder).")
    if backend == "openai" and urlparse(base_url).scheme not in ("http", "https"):
        raise ValueError(
            f"VIEScore: `base_url` must be an http(s) URL, got {public_url(base_url)!r}."
        )
    if not timeout > 0:
        raise ValueError(f"VIEScore: `timeout` must be > 0 seconds, got {timeout!r}.")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"VIEScore: `max_retries` must be an integer >= 0, got {max_retries!r}.")
    if retry_delay < 0:
        raise ValueError(f"VIEScore: `retry_delay` must be >= 0, got {retry_delay!r}.")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(
            f"VIEScore: `image_size` must be a positive int or None, got {image_size!r}."
        )
    if temperature is not None and temperature < 0:
        raise ValueError(f"VIEScore: `temperature` must be >= 0 or None, got {temperature!r}.")
    if image_format not in _IMAGE_FORMATS:
        raise ValueError(
            f"VIEScore: `image_format` must be one of {_IMAGE_FORMATS}, got {image_format!r}."
        )
    if max_new_tokens < 1:
        raise ValueError(f"VIEScore: `max_new_tokens` must be >= 1, got {max_new_tokens!r}.")
    if num_threads < 1:
        raise ValueError(f"VIEScore: `num_threads` must be >= 1, got {num_threads!r}.")
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"VIEScore: `judge_dtype` must name a torch dtype, got {dtype!r}.")


def _check_batch(source: Tensor, preds: Tensor, instructions: Sequence[str]) -> list[str]:
    for name, images in (("source", source), ("preds", preds)):
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"VIEScore: `{name}` must have shape [B, 3, H, W], got {shape}.")
    if source.shape[0] != preds.shape[0]:
        raise ValueError(
            f"VIEScore: batch sizes differ: source {source.shape[0]}, preds {preds.shape[0]}."
        )
    if isinstance(instructions, str) or not all(isinstance(s, str) for s in instructions):
        raise TypeError("VIEScore: `instructions` must be a list of strings, one per image.")
    instructions = list(instructions)
    if len(instructions) != source.shape[0]:
        raise ValueError(
            f"VIEScore: {len(instructions)} instructions for {source.shape[0]} images."
        )
    return instructions


__all__ = [
    "CONTEXT_PROMPT",
    "PQ_PROMPT",
    "PROMPT_SHA256",
    "SC_PROMPT_TEMPLATE",
    "AnswerCache",
    "JudgeError",
    "VIEScore",
    "ask_with_retries",
    "cache_key",
    "chat_request_body",
    "encode_image",
    "generate_answer",
    "load_judge",
    "local_inputs",
    "local_prompt_text",
    "parse_scores",
    "png_bytes",
    "post_chat",
    "read_api_key",
    "sc_prompt",
    "to_pil_images",
]
