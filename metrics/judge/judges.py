"""The VIEScore judges: an OpenAI-compatible endpoint through the ``openai`` client, or a local
transformers LLaVA folder.

Both answer one prompt about one to two images (:meth:`OpenAIJudge.connect` /
:meth:`LocalJudge.connect` give an ``ask(prompt, images, encoded) -> Reply`` callable) and
describe their sampling settings (:meth:`settings`), which every judge record keeps.

- :class:`OpenAIJudge`: ``POST {base_url}/chat/completions`` through ``openai.OpenAI`` (OpenAI,
  vLLM, llama.cpp server, ...). The client does the HTTP retries (``max_retries``: 408, 409,
  429, 5xx, timeouts and connection errors, with its own backoff, honouring ``Retry-After``)
  and the timeout (``timeout`` seconds per request); there is no retry loop of ours for HTTP.
  The message holds the prompt text first and then the images as ``image_url`` parts with
  ``data:image/<format>;base64,...`` URLs (the order VIEScore's GPT-4 client uses). The API key
  is read from the environment variable named by ``api_key_env`` when a connection is opened,
  never from a file, and never stored on the judge; a server on this machine may go without
  one (then no ``Authorization`` header is sent). The reply's ``model`` (the endpoint's own,
  dated, model id) and ``system_fingerprint`` are returned with the answer.
- :class:`LocalJudge`: a transformers ``LlavaForConditionalGeneration`` + ``AutoProcessor``
  folder, loaded offline. LLaVA takes several ``<image>`` inputs in one prompt: images first,
  then the text (LLaVA's convention). Greedy decoding unless ``temperature > 0``. CLIP-style
  processors (llava-1.5) resize the shorter side and center-crop, so the borders of
  non-square images are not seen by the judge.
"""

from __future__ import annotations

import base64
import functools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from PIL import Image

from metrics.judge.prompts import JudgeError, snippet

DEFAULT_BASE_URL = "https://api.openai.com/v1"
BASE_URL_ENV = "EDITBENCH_VIESCORE_BASE_URL"


@dataclass(frozen=True)
class Reply:
    """One answer: its text, the model id and fingerprint the endpoint reported, and the
    requests it took (the client's own retries included)."""

    text: str
    model: str | None = None
    system_fingerprint: str | None = None
    attempts: int = 1


Ask = Callable[[str, Sequence[Image.Image], Sequence[bytes]], Reply]

# --------------------------------------------------------------------------- URLs and keys


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


def redact(text: str, secret: str | None) -> str:
    """``text`` with ``secret`` masked out (servers may echo the key)."""
    return text.replace(secret, "***") if secret and text else text


def chat_messages(prompt: str, encoded: Sequence[bytes], image_format: str) -> list[dict]:
    """One user message: the text, then the images as ``image/<format>`` data URLs."""
    content: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
    for data in encoded:
        url = f"data:image/{image_format};base64," + base64.b64encode(data).decode("ascii")
        content.append({"type": "image_url", "image_url": {"url": url}})
    return [{"role": "user", "content": content}]


def _message_text(response: Any) -> str:
    """``choices[0].message.content`` of a chat completion; a refusal or a missing / non-text
    content is a :class:`JudgeError`."""
    try:
        choice = response.choices[0]
        message = choice.message
    except (AttributeError, IndexError, TypeError) as err:
        raise JudgeError(f"no choices[0].message in the response {snippet(response)}") from err
    refusal = getattr(message, "refusal", None)
    content = getattr(message, "content", None)
    if refusal or getattr(choice, "finish_reason", None) == "content_filter":
        # The judge's own decision: asking again at the same settings repeats it.
        raise JudgeError(f"refused: {snippet(refusal or content or 'content_filter')}", retry=False)
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise JudgeError(f"message content is not text: {snippet(content)}")
    return content


# --------------------------------------------------------------------------- OpenAI-compatible


class OpenAIJudge:
    """An OpenAI-compatible chat-completions endpoint through the ``openai`` client.

    Args:
        model: model name sent (a dated snapshot keeps results reproducible; the record keeps
            the id the endpoint reports as well).
        base_url: endpoint root, e.g. ``http://localhost:8000/v1``.
        api_key_env: NAME of the environment variable holding the API key.
        timeout: seconds per request (the client's timeout).
        max_retries: the client's retries of a failed request (so at most ``1 + max_retries``
            requests), and the re-asks of an answer that does not parse.
        temperature: None sends none (the API's default).
        max_tokens: answer length limit; None sends none (the API's default).
        image_format / image_size: how images are encoded (:mod:`metrics.judge.images`).
        seed: sent as the request's ``seed`` when given.
    """

    backend = "openai"

    def __init__(
        self,
        model: str,
        base_url: str = DEFAULT_BASE_URL,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 3,
        temperature: float | None = 0.0,
        max_tokens: int | None = 512,
        image_format: str = "png",
        image_size: int | None = 512,
        seed: int | None = None,
    ) -> None:
        self.model = model
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.temperature = temperature
        self.max_tokens = None if max_tokens is None else int(max_tokens)
        self.image_format = image_format
        self.image_size = image_size
        self.seed = seed
        self._counts: dict[int, int] = {}  # thread id -> requests of its current ask

    @property
    def model_id(self) -> str:
        return self.model

    @property
    def parse_attempts(self) -> int:
        """Asks per prompt while the answer does not parse."""
        return 1 + self.max_retries

    def settings(self) -> dict[str, Any]:
        """The sampling settings (what a judge record keeps)."""
        return {
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "image_format": self.image_format,
            "image_size": self.image_size,
            "seed": self.seed,
        }

    def describe(self) -> dict[str, Any]:
        """The judge without credentials: backend, model, public URL, client settings."""
        return {
            "backend": self.backend,
            "model": self.model,
            "base_url": public_url(self.base_url),
            "timeout": self.timeout,
            "max_retries": self.max_retries,
            **self.settings(),
        }

    def check_key(self) -> None:
        """Fail now (naming the variable) when the endpoint needs a key that is not set."""
        read_api_key(self.api_key_env, self.base_url)

    def _count(self, request: Any) -> None:  # httpx request hook: one call per HTTP request
        thread = threading.get_ident()
        self._counts[thread] = self._counts.get(thread, 0) + 1

    @contextmanager
    def connect(self) -> Iterator[Ask]:
        """An ``ask`` callable on a client built with the key read from the environment now."""
        import openai

        key = read_api_key(self.api_key_env, self.base_url)
        http = openai.DefaultHttpxClient(event_hooks={"request": [self._count]})
        client = openai.OpenAI(
            api_key=key or "no-key",  # placeholder: the header is omitted below
            base_url=self.base_url,
            timeout=self.timeout,
            max_retries=self.max_retries,
            http_client=http,
        )
        headers = {} if key else {"Authorization": openai.omit}
        try:
            yield functools.partial(self._ask, client, key, headers)
        finally:
            client.close()

    def _ask(
        self,
        client: Any,
        key: str | None,
        headers: dict,
        prompt: str,
        images: Sequence[Image.Image],
        encoded: Sequence[bytes],
    ) -> Reply:
        import openai

        extra: dict[str, Any] = {}
        if self.temperature is not None:
            extra["temperature"] = self.temperature
        if self.seed is not None:
            extra["seed"] = self.seed
        if self.max_tokens is not None:
            extra["max_tokens"] = self.max_tokens
        self._counts[threading.get_ident()] = 0
        try:
            response = client.chat.completions.create(
                model=self.model,
                messages=chat_messages(prompt, encoded, self.image_format),
                extra_headers=headers,
                **extra,
            )
        except openai.APIStatusError as err:
            body = snippet(getattr(err, "body", None) or err.message)
            raise self._failed(f"HTTP {err.status_code}: {body}", key, retry=False) from None
        except openai.APIError as err:  # timeouts, connection errors
            raise self._failed(f"{type(err).__name__}: {err}", key, retry=False) from None
        except ValueError as err:  # a body that is not JSON
            raise self._failed(f"response body is not JSON: {err}", key, retry=True) from None
        model = getattr(response, "model", None)
        fingerprint = getattr(response, "system_fingerprint", None)
        try:
            text = _message_text(response)
        except JudgeError as err:  # a refusal or no text: the endpoint still said who it was
            failed = self._failed(str(err), key, retry=err.retry)
            failed.model, failed.system_fingerprint = model, fingerprint
            raise failed from None
        return Reply(redact(text, key), model, fingerprint, self._attempts())

    def _attempts(self) -> int:
        return max(1, self._counts.get(threading.get_ident(), 1))

    def _failed(self, message: str, key: str | None, retry: bool) -> JudgeError:
        return JudgeError(redact(message, key), retry=retry, attempts=self._attempts())


# --------------------------------------------------------------------------- local LLaVA


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


def judge_folder(path: str | Path) -> Path:
    """The LLaVA folder, resolved; a missing ``config.json`` is a ``FileNotFoundError``."""
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
    return _cached_judge(str(judge_folder(path)), str(torch.device(device)), dtype)


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


class LocalJudge:
    """A transformers LLaVA folder (see the module docstring). The model id recorded is the
    resolved folder; with greedy decoding an answer that does not parse is not re-asked (it
    would repeat), else up to ``1 + max_retries`` asks."""

    backend = "local"

    def __init__(
        self,
        model_path: str | Path,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        max_new_tokens: int = 512,
        temperature: float | None = 0.0,
        max_retries: int = 3,
        image_size: int | None = 512,
        image_format: str = "png",
        seed: int | None = None,
    ) -> None:
        self.model_path = str(judge_folder(model_path))
        self.device = device
        self.dtype = dtype
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = temperature
        self.max_retries = int(max_retries)
        self.image_size = image_size
        self.image_format = image_format
        self.seed = seed

    @property
    def model_id(self) -> str:
        return self.model_path

    @property
    def parse_attempts(self) -> int:
        return 1 if not self.temperature else 1 + self.max_retries

    def settings(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "max_tokens": self.max_new_tokens,
            "image_format": self.image_format,
            "image_size": self.image_size,
            "seed": self.seed,
        }

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "model": self.model_path, "dtype": self.dtype,
                **self.settings()}  # fmt: skip

    def check_key(self) -> None:
        """No key: nothing to check."""

    @contextmanager
    def connect(self) -> Iterator[Ask]:
        model, processor = load_judge(self.model_path, self.device, self.dtype)
        if self.seed is not None:
            torch.manual_seed(self.seed)

        def ask(prompt: str, images: Sequence[Image.Image], encoded: Sequence[bytes]) -> Reply:
            temperature = self.temperature or 0.0
            text = generate_answer(
                model, processor, prompt, images, self.max_new_tokens, temperature
            )
            return Reply(text, self.model_path)

        yield ask


Judge = OpenAIJudge | LocalJudge


def build_judge(
    backend: str,
    *,
    model: str,
    base_url: str,
    api_key_env: str,
    model_path: str | Path | None,
    timeout: float,
    max_retries: int,
    temperature: float | None,
    max_new_tokens: int | None,
    image_size: int | None,
    image_format: str,
    seed: int | None = None,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
) -> OpenAIJudge | LocalJudge:
    """The judge of ``backend`` (``"local"``: the LLaVA folder ``model_path``; else the endpoint
    ``base_url``) with these settings: what the in-test VIEScore and ``editbench judge`` ask."""
    if backend == "local":
        return LocalJudge(
            model_path,  # type: ignore[arg-type]
            device=device,
            dtype=dtype,
            max_new_tokens=max_new_tokens,  # type: ignore[arg-type]
            temperature=temperature,
            max_retries=max_retries,
            image_size=image_size,
            image_format=image_format,
            seed=seed,
        )
    return OpenAIJudge(
        model,
        base_url,
        api_key_env,
        timeout=timeout,
        max_retries=max_retries,
        temperature=temperature,
        max_tokens=max_new_tokens,
        image_format=image_format,
        image_size=image_size,
        seed=seed,
    )


__all__ = [
    "BASE_URL_ENV",
    "DEFAULT_BASE_URL",
    "Judge",
    "LocalJudge",
    "OpenAIJudge",
    "Reply",
    "build_judge",
    "chat_messages",
    "generate_answer",
    "is_local_url",
    "judge_folder",
    "load_judge",
    "local_inputs",
    "local_prompt_text",
    "public_url",
    "read_api_key",
    "redact",
]
