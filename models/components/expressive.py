"""MGIE's expressive-instruction pipeline: narrate the edit, cut the narration, summarise it.

MGIE (Sec. 3.1, "Concise Expressive Instruction", Eq. 2): E = Summ(MLLM*([prompt, X] | V)).
The MLLM narrates the edit given the input image; a summariser (footnote 1: Flan-T5-XXL
fine-tuned for summarisation) shortens the narration. Every default is the release's
(``apple/ml-mgie``, ``process_data.ipynb``, cells 1-4):

1. narration prompt ``"what will this image be like if '%s'  (in a short paragraph)"`` (the
   instruction quoted, two spaces before the parenthesis), then ``"\\n"`` and the image, in
   LLaVA's ``vicuna_v1_1`` conversation (LLaVA 7ace501 ``llava/conversation.py``) --
   :data:`PROMPT_TEMPLATE`;
2. greedy decoding of up to 1,024 new tokens;
3. ``remove_alter``: cut before the first "alternative" and keep two sentences
   (:func:`cut_narration`);
4. the summariser ``jordiclive/flan-t5-11b-summarizer-filtered`` on ``"summarize the following
   paragraph in 32 words:\\n\\n%s"``, ``num_beams=5, min_length=5, max_length=64,
   no_repeat_ngram_size=3``, no sampling, input truncated.

``python -m editbench data expressive`` writes training targets with it; MGIE's FZ/FT ablation
(Table 3, footnote 3: "we employ concise summarized expressive instructions") runs the same
pipeline at test time (:class:`ExpressivePipeline`), so FT is tested on what it trained on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch

#: LLaVA's ``conv_vicuna_v1_1.system`` (LLaVA 7ace501, ``llava/conversation.py``), the
#: conversation ``process_data.ipynb`` narrates in (``conv_templates['vicuna_v1_1']``).
VICUNA_V1_1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
#: The release's narration question (``process_data.ipynb``, cell 4), verbatim: the
#: instruction in single quotes and two spaces before "(in a short paragraph)".
NARRATION_QUESTION = "what will this image be like if '{instruction}'  (in a short paragraph)"
#: ``vicuna_v1_1.get_prompt()`` of one user turn (the question, ``"\n"``, the image) and an
#: open assistant turn: ``system + " USER: " + text + " ASSISTANT:"`` (separator ``" "``).
#: ``<image>`` stands for the image: the llava-hf processor's image token, wrapped in
#: ``<im_start>``/``<im_end>`` for a converted LLaVA v1 (``mm_use_im_start_end``), as the
#: release writes ``<im_start>`` + 256 ``<im_patch>`` + ``<im_end>`` there.
PROMPT_TEMPLATE = VICUNA_V1_1_SYSTEM + " USER: " + NARRATION_QUESTION + "\n<image> ASSISTANT:"
#: LGIE's text-only narration: the same conversation without the image.
TEXT_PROMPT_TEMPLATE = VICUNA_V1_1_SYSTEM + " USER: " + NARRATION_QUESTION + " ASSISTANT:"
#: The release's summariser input (``process_data.ipynb``, cell 4).
SUMMARY_TEMPLATE = "summarize the following paragraph in 32 words:\n\n{narration}"
#: The release's summariser (``process_data.ipynb``, cell 3): Flan-T5-XXL (11B) fine-tuned for
#: summarisation, the paper's "Flan-T5-XXL" (MGIE footnote 1).
RELEASE_SUMMARIZER = "jordiclive/flan-t5-11b-summarizer-filtered"
#: Flan-T5 was trained on inputs of at most 512 tokens; longer narrations are truncated (the
#: release passes ``truncation=True``: the tokenizer's 512-token limit).
SUMMARY_MAX_INPUT_TOKENS = 512
#: The release's generation settings (``process_data.ipynb``, cell 4).
NARRATION_MAX_NEW_TOKENS = 1024
CUT_AT = "alternative"
MAX_SENTENCES = 2
SUMMARY_NUM_BEAMS = 5
SUMMARY_MIN_LENGTH = 5
SUMMARY_MAX_LENGTH = 64
SUMMARY_NO_REPEAT_NGRAM = 3

SUMMARIZER_WHAT = (
    f"a Flan-T5 checkpoint, e.g. the release's `{RELEASE_SUMMARIZER}` (T5ForConditionalGeneration "
    "weights + config.json and the tokenizer files)"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class NarrationConfig:
    """How the (M)LLM narrates an edit (defaults: the release's ``process_data.ipynb``)."""

    prompt_template: str = PROMPT_TEMPLATE
    max_new_tokens: int = NARRATION_MAX_NEW_TOKENS
    cut_at: str = CUT_AT
    max_sentences: int = MAX_SENTENCES

    def check(self, where: str) -> None:
        if "{instruction}" not in self.prompt_template:
            raise ValueError(f"{where}prompt_template must contain {{instruction}}")
        if self.max_new_tokens < 1:
            raise ValueError(f"{where}max_new_tokens must be at least 1")
        if self.max_sentences < 0:
            raise ValueError(f"{where}max_sentences must not be negative")


@dataclass
class SummarizerConfig:
    """The Flan-T5 summariser and its decoding (defaults: the release's ``process_data.ipynb``;
    ``path`` a local folder, the release's :data:`RELEASE_SUMMARIZER`)."""

    path: str = ""
    template: str = SUMMARY_TEMPLATE
    num_beams: int = SUMMARY_NUM_BEAMS
    min_length: int = SUMMARY_MIN_LENGTH
    max_length: int = SUMMARY_MAX_LENGTH
    no_repeat_ngram_size: int = SUMMARY_NO_REPEAT_NGRAM
    dtype: str = "float32"

    def check(self, where: str) -> None:
        if "{narration}" not in self.template:
            raise ValueError(f"{where}template must contain {{narration}}")
        if self.num_beams < 1 or self.max_length < 1:
            raise ValueError(f"{where}num_beams and max_length must be at least 1")
        if self.min_length < 0 or self.no_repeat_ngram_size < 0:
            raise ValueError(f"{where}min_length and no_repeat_ngram_size must not be negative")
        if self.min_length > self.max_length:
            raise ValueError(f"{where}min_length must not exceed max_length")
        if self.dtype not in DTYPES:
            raise ValueError(f"{where}dtype must be one of {sorted(DTYPES)}")

    def generate_kwargs(self) -> dict:
        """``generate`` settings; lengths count decoder tokens, as the summarization pipeline
        passes them."""
        return {
            "num_beams": self.num_beams,
            "min_length": self.min_length,
            "max_length": self.max_length,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
            "do_sample": False,
        }


def config_from(cls, values: Mapping | None, where: str):
    """A :class:`NarrationConfig`/:class:`SummarizerConfig` from a YAML mapping (unknown keys
    are an error naming them)."""
    values = dict(values or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
    config = cls(**values)
    config.check(f"{where}.")
    return config


def check_folder(path: str | Path, option: str, what: str) -> Path:
    """A local model folder with ``config.json``, or an error naming the option."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{option}: no model at {folder} (expected a local folder with config.json). Place "
            f"there {what}, saved with `save_pretrained`; nothing is downloaded."
        )
    return folder


def load_summarizer(path: str | Path, device, dtype: torch.dtype, option: str = "--summarizer"):
    """``(AutoModelForSeq2SeqLM, tokenizer)`` of a Flan-T5 folder, eval."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    folder = check_folder(path, option, SUMMARIZER_WHAT)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    return model.to(device).eval(), tokenizer


def to_uint8(images: torch.Tensor) -> list[torch.Tensor]:
    """``[B, 3, H, W]`` images in [-1, 1] as uint8 ``[3, H, W]`` tensors, as processors take."""
    pixels = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return list(pixels.cpu())


def image_placeholder(processor, config=None) -> str:
    """What stands for the image in a prompt: the processor's image token (which it expands to
    one token per patch), wrapped in ``<im_start>``/``<im_end>`` when the model is a converted
    LLaVA v1 (``config.mm_use_im_start_end``, the release's layout)."""
    token = processor.image_token
    if getattr(config, "mm_use_im_start_end", False):
        return f"<im_start>{token}<im_end>"
    return token


def narration_inputs(processor, images, instructions: Sequence[str], template: str,
                     config=None) -> dict:
    """The model inputs of the narration prompts: a LLaVA processor with the images (``<image>``
    in the template becomes :func:`image_placeholder`), or (LGIE, ``images`` None) a tokenizer
    alone. Both add the tokenizer's BOS, as the release's ``tokenizer(txt)`` does."""
    prompts = [template.format(instruction=i) for i in instructions]
    if images is None:
        return dict(processor(prompts, return_tensors="pt", padding=True))
    placeholder = image_placeholder(processor, config)
    prompts = [p.replace("<image>", placeholder) for p in prompts]
    return dict(processor(images=to_uint8(images), text=prompts, return_tensors="pt", padding=True))


@torch.no_grad()
def narrate(
    model,
    processor,
    images: torch.Tensor | None,
    instructions: Sequence[str],
    template: str = PROMPT_TEMPLATE,
    max_new_tokens: int = NARRATION_MAX_NEW_TOKENS,
) -> list[str]:
    """The (M)LLM's greedy narration of each edit (MGIE Sec. 3.1: MLLM*([prompt, X] | V); the
    release: ``do_sample=False, max_new_tokens=1024``); only the newly generated tokens are
    decoded, special tokens skipped (the release's cut at ``ASSISTANT:`` and ``</s>``)."""
    inputs = narration_inputs(processor, images, instructions, template, model.config)
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    new = out[:, inputs["input_ids"].shape[1] :]
    tokenizer = getattr(processor, "tokenizer", processor)
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


def cut_narration(text: str, cut_at: str = CUT_AT, max_sentences: int = MAX_SENTENCES) -> str:
    """The release's ``remove_alter`` (``process_data.ipynb``, cell 1) on a decoded narration.

    Cut before the first ``cut_at`` (case-insensitive; ``""`` disables it) and before
    ``[IMG0]``; split at ``"."``, keep the first ``max_sentences`` pieces (0 keeps all), strip
    each and join them with ``"."`` -- as the release does, which drops the space after a kept
    period ("A. B. C" -> "A.B.") -- and end with a period. An empty narration stays empty (the
    release would fail on it).
    """
    if cut_at and cut_at.lower() in text.lower():
        text = text[: text.lower().index(cut_at.lower())]
    if "[IMG0]" in text:
        text = text[: text.index("[IMG0]")]
    pieces = text.split(".")
    if max_sentences > 0:
        pieces = pieces[:max_sentences]
    text = ".".join(piece.strip() for piece in pieces)
    if text and text[-1] != ".":
        text += "."
    return text.strip()


@torch.no_grad()
def summarize(
    model,
    tokenizer,
    narrations: Sequence[str],
    template: str = SUMMARY_TEMPLATE,
    generate_kwargs: dict | None = None,
) -> list[str]:
    """Flan-T5 summaries of the narrations (MGIE Eq. 2: E = Summ(MLLM*(...))), decoded as the
    release's ``pipeline('summarization')`` (special tokens skipped, stripped)."""
    kwargs = generate_kwargs or SummarizerConfig().generate_kwargs()
    inputs = tokenizer(
        [template.format(narration=n) for n in narrations],
        return_tensors="pt",
        padding=True,
        truncation=True,
        max_length=SUMMARY_MAX_INPUT_TOKENS,
    ).to(model.device)
    out = model.generate(**inputs, **kwargs)
    return [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]


@dataclass
class Expressive:
    """One batch through the pipeline: the decoded narrations, the cut ones the summariser
    read, and the summaries E."""

    narrations_full: list[str]
    narrations: list[str]
    summaries: list[str]


class ExpressivePipeline:
    """Narrator + summariser: ``E = Summ(cut(MLLM*(prompt | V)))`` for a batch.

    The narrator is given at call time (MGIE's FZ/FT reuse their own frozen MLLM); the
    summariser is loaded once from ``summarizer.path`` on first use and held as a plain
    attribute, so it never enters a state dict or a checkpoint.
    """

    def __init__(self, narration: NarrationConfig, summarizer: SummarizerConfig,
                 option: str = "summarizer.path") -> None:
        self.narration = narration
        self.summarizer = summarizer
        self.option = option
        self._summarizer = None

    def _loaded(self, device):
        if self._summarizer is None:
            self._summarizer = load_summarizer(
                self.summarizer.path, "cpu", DTYPES[self.summarizer.dtype], self.option
            )
        model, tokenizer = self._summarizer
        if model.device != torch.device(device):
            model.to(device)
        return model, tokenizer

    def __call__(self, model, processor, images: torch.Tensor | None,
                 instructions: Sequence[str]) -> Expressive:
        n = self.narration
        full = narrate(model, processor, images, instructions, n.prompt_template, n.max_new_tokens)
        cut = [cut_narration(t, n.cut_at, n.max_sentences) for t in full]
        summarizer, tokenizer = self._loaded(model.device)
        summaries = summarize(
            summarizer, tokenizer, cut, self.summarizer.template,
            self.summarizer.generate_kwargs(),
        )
        return Expressive(full, cut, summaries)
