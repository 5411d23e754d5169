"""Asking a judge VIEScore's questions: cache look-ups, concurrent asks, re-asks of answers that
do not parse, and the outcome of each question (scores or the reason there are none).

A question that fails is an :class:`Outcome` with ``scores=None`` and its ``error``: never a
score of 0. Transport failures (HTTP errors, timeouts) are retried by the HTTP client itself
(:class:`metrics.judge.judges.OpenAIJudge`); here only an answer that came back but does not
parse, or a body that is not JSON, is asked again, up to the judge's ``parse_attempts``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from PIL import Image

from metrics.judge.cache import AnswerCache, cache_key
from metrics.judge.judges import Ask, Judge
from metrics.judge.prompts import JudgeError
from metrics.judge.rules import Prompts, score_rule

MAX_BACKOFF_S = 30.0  # cap of the backoff between re-asks of an unparseable answer


@dataclass(frozen=True)
class Request:
    """One judge question: prompt ``kind`` ("SC"/"PQ") about sample ``sample``."""

    sample: Any
    kind: str
    prompt: str
    images: tuple[Image.Image, ...]
    encoded: tuple[bytes, ...]
    instruction: str


@dataclass(frozen=True)
class Outcome:
    """What one question gave: the parsed ``scores`` (None when it failed), the raw answer,
    the requests made, the last error, what the endpoint reported, and whether it came from
    the cache."""

    scores: list[float] | None
    answer: str
    attempts: int
    error: str
    model: str | None = None
    system_fingerprint: str | None = None
    cached: bool = False


def ask_with_retries(
    ask: Any, parse: Callable[[str], list[float]], attempts: int, retry_delay: float
) -> Outcome:
    """Call ``ask()`` (returning a :class:`~metrics.judge.judges.Reply` or its text) up to
    ``attempts`` times until ``parse`` takes its answer; exponential backoff (``retry_delay * 2**k``
    seconds, capped) between tries. A :class:`JudgeError` with ``retry=False`` (a transport
    failure the client already retried, a refusal) ends the loop; other errors propagate."""
    error, answer, requests, reply = "", "", 0, None
    for attempt in range(attempts):
        if attempt:
            time.sleep(min(retry_delay * 2 ** (attempt - 1), MAX_BACKOFF_S))
        try:
            reply = ask()
        except JudgeError as err:
            error, requests = str(err), requests + err.attempts
            reply = err if err.model else reply  # what the endpoint reported, if it replied
            if not err.retry:
                break
            continue
        text = reply if isinstance(reply, str) else reply.text
        requests += 1 if isinstance(reply, str) else reply.attempts
        try:
            scores = parse(text)
        except JudgeError as err:
            error, answer = str(err), text
            continue
        model = getattr(reply, "model", None)
        fingerprint = getattr(reply, "system_fingerprint", None)
        return Outcome(scores, text, requests, "", model, fingerprint)
    model = getattr(reply, "model", None)
    fingerprint = getattr(reply, "system_fingerprint", None)
    return Outcome(None, answer, requests, error, model, fingerprint)


def generation_settings(judge: Judge) -> dict[str, Any]:
    """The settings that change the judge's answers, as the cache key holds them."""
    settings = judge.settings()
    out = {"temperature": settings["temperature"], "max_new_tokens": settings["max_tokens"]}
    if settings.get("seed") is not None:
        out["seed"] = settings["seed"]
    return out


def request_key(judge: Judge, request: Request) -> str:
    return cache_key(
        judge.backend, judge.model_id, request.prompt, request.encoded, generation_settings(judge)
    )


def cache_record(
    judge: Judge, prompts: Prompts, request: Request, outcome: Outcome
) -> dict[str, Any]:
    """What the cache keeps of a parsed answer (no credentials)."""
    return {
        "backend": judge.backend,
        "model": judge.model_id,
        "model_reported": outcome.model,
        "system_fingerprint": outcome.system_fingerprint,
        "kind": request.kind,
        "prompt_set": prompts.name,
        "prompt_sha256": prompts.sha256,
        "generation": generation_settings(judge),
        "scores": outcome.scores,
        "answer": outcome.answer,
    }


def answer_requests(
    judge: Judge,
    prompts: Prompts,
    requests: Sequence[Request],
    cache: AnswerCache | None,
    *,
    num_threads: int = 1,
    retry_delay: float = 1.0,
) -> list[Outcome]:
    """Outcomes in request order: cache hits first, the misses asked to the judge (at most
    ``num_threads`` at a time for an HTTP judge), parsed answers written to the cache."""
    keys = [request_key(judge, r) for r in requests] if cache is not None else []
    outcomes: list[Outcome | None] = [None] * len(requests)
    for i, request in enumerate(requests):
        hit = cache.record(keys[i], request.kind) if cache is not None else None
        if hit is not None:
            outcomes[i] = Outcome(
                hit["scores"], str(hit.get("answer", "")), 0, "",
                hit.get("model_reported"), hit.get("system_fingerprint"), cached=True,
            )  # fmt: skip
    missing = [i for i, outcome in enumerate(outcomes) if outcome is None]
    if missing:
        with judge.connect() as ask:
            answered = _ask_all(judge, ask, [requests[i] for i in missing], num_threads,
                                retry_delay)  # fmt: skip
        for i, outcome in zip(missing, answered, strict=True):
            outcomes[i] = outcome
            if cache is not None and outcome.scores is not None:
                cache.put(keys[i], cache_record(judge, prompts, requests[i], outcome))
    return outcomes  # type: ignore[return-value]


def _ask_all(
    judge: Judge, ask: Ask, requests: list[Request], num_threads: int, retry_delay: float
) -> list[Outcome]:
    def one(request: Request) -> Outcome:
        return ask_with_retries(
            lambda: ask(request.prompt, request.images, request.encoded),
            score_rule(request.kind).parse,
            judge.parse_attempts,
            retry_delay,
        )

    workers = max(1, min(num_threads, len(requests))) if judge.backend == "openai" else 1
    if workers == 1:
        return [one(request) for request in requests]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="viescore") as pool:
        return list(pool.map(one, requests))  # map keeps the input order


__all__ = [
    "MAX_BACKOFF_S",
    "Outcome",
    "Request",
    "answer_requests",
    "ask_with_retries",
    "cache_record",
    "generation_settings",
    "request_key",
]
