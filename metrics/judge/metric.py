"""VIEScore as a torchmetrics Metric: an MLLM judge scores each (source, edited) pair in the
test loop.

VIEScore (Ku et al., "VIEScore: Towards Explainable Metrics for Conditional Image Synthesis
Evaluation", ACL 2024), text-guided image editing task:

- Semantic consistency (SC): the judge sees ``[source, edited]`` and the instruction and answers
  two scores on 0-10, ``[editing success, over-editing]``; ``SC = min`` of the two.
- Perceptual quality (PQ): the judge sees the edited image only and answers
  ``[naturalness, artifacts]`` on 0-10; ``PQ = min`` of the two.
- Overall: ``O = sqrt(SC * PQ)`` per image.

The metric reports the means over scored images of SC, PQ and the per-image O (on VIEScore's
0-10 scale), and counts as ``failures`` the images whose SC or PQ answer could not be obtained
or parsed. Failed images are left out of the means (never scored 0), so a flaky endpoint
cannot read as a bad model; the count belongs in any report next to the means.

This is the in-test path. The offline path (``python -m editbench judge --bundle DIR``,
:mod:`metrics.judge.offline`) judges a result bundle's images after ``test``, once for every
aggregation, keeps a judge record per sample and prompt (:mod:`metrics.judge.record`) and
writes per-sample rows, so the report gets bootstrap intervals and the failure rate.

Prompts: :mod:`metrics.judge.prompts`; judges (``"openai"``: an OpenAI-compatible endpoint
through the ``openai`` client; ``"local"``: a transformers LLaVA folder):
:mod:`metrics.judge.judges`; images: :mod:`metrics.judge.images`; the answer cache:
:mod:`metrics.judge.cache`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn

from metrics.judge.asking import Outcome, Request, answer_requests, generation_settings
from metrics.judge.cache import DEFAULT_CACHE_DIR, AnswerCache
from metrics.judge.images import IMAGE_FORMATS, encode_image, to_pil_images
from metrics.judge.judges import (
    BASE_URL_ENV,
    DEFAULT_BASE_URL,
    LocalJudge,
    OpenAIJudge,
    build_judge,
    public_url,
)
from metrics.judge.prompts import PromptSet, apply_preset, prompt_set, snippet
from metrics.judge.record import viescore

Backend = Literal["openai", "local"]
_BACKENDS = ("openai", "local")
ImageFormat = Literal["png", "jpeg"]


#: Constructor defaults of the settings a preset may set (see ``apply_preset``).
DEFAULTS = {
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
        timeout: seconds per request (the ``openai`` client's timeout).
        max_retries: the ``openai`` client's retries of a failed request (HTTP 408/409/429/5xx,
            timeouts, connection errors; its own backoff), and the re-asks of an answer that
            came back but does not parse (so at most ``1 + max_retries`` of each per prompt).
            The greedy local backend asks once, since a re-ask would repeat the answer.
        retry_delay: first delay in seconds before re-asking an unparseable answer, doubled
            at each re-ask (capped at 30 s).
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
            VIEScore numbers (:mod:`metrics.judge.prompts`).
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
            DEFAULTS,
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
        self.judge = self._make_judge()
        self.judge.check_key()  # fail now rather than after generation
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
        return generation_settings(self.judge)

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

    def _make_judge(self) -> OpenAIJudge | LocalJudge:
        return build_judge(
            self.backend,
            model=self.model,
            base_url=self.base_url,
            api_key_env=self.api_key_env,
            model_path=self.model_path,
            timeout=self.timeout,
            max_retries=self.max_retries,
            temperature=self.temperature,
            max_new_tokens=self.max_new_tokens,
            image_size=self.image_size,
            image_format=self.image_format,
            dtype=self.judge_dtype,
        )

    def _requests(self, source: Tensor, preds: Tensor, instructions: list[str]) -> list[Request]:
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
                Request(sample, "SC", sc, (src, edit), (src_png, edit_png), instruction)
            )
            pq = self.prompts.pq_prompt
            requests.append(Request(sample, "PQ", pq, (edit,), (edit_png,), instruction))
        return requests

    def _answer(self, requests: list[Request]) -> list[Outcome]:
        """Outcomes in request order: cache hits first, the misses asked to the judge."""
        if isinstance(self.judge, LocalJudge):
            self.judge.device = self.device
        cache = AnswerCache(self.cache_dir) if self.use_cache else None
        outcomes = answer_requests(
            self.judge,
            self.prompts,
            requests,
            cache,
            num_threads=self.num_threads,
            retry_delay=self.retry_delay,
        )
        for outcome in outcomes:
            self.cache_hits += outcome.cached
            self.calls += outcome.attempts
        return outcomes

    def _accumulate(self, requests: list[Request], outcomes: list[Outcome], batch: int) -> None:
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
            sc, pq, o = viescore(sc_out.scores, pq_out.scores)
            sc_sum, pq_sum, o_sum = sc_sum + sc, pq_sum + pq, o_sum + o
            scored += 1
        self.sum_sc += sc_sum
        self.sum_pq += pq_sum
        self.sum_o += o_sum
        self.num_scored += scored
        self.num_failed += failed

    def _warn_failure(self, request: Request, outcome: Outcome) -> None:
        warnings.warn(
            f"VIEScore: no valid {request.kind} answer for sample {request.sample} (instruction "
            f"{snippet(request.instruction, 80)}) after {outcome.attempts} attempt(s) with "
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
    if image_format not in IMAGE_FORMATS:
        raise ValueError(
            f"VIEScore: `image_format` must be one of {IMAGE_FORMATS}, got {image_format!r}."
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


__all__ = ["VIEScore"]
