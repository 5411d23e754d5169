"""``python -m editbench data expressive``: write MGIE's expressive instructions for a split.

MGIE (Sec. 3.1, "Concise Expressive Instruction", Eq. 2) derives the target of its instruction
loss L_ins in two steps: the MLLM, given the input image, narrates the edit from the prompt
"what will this image be like if [instruction]" (the released data asks for it "in a short
paragraph"), and a pre-trained Flan-T5 summariser (footnote 1) shortens the narration to a
concise expressive instruction E (about 32 words). This command runs both models greedily over a
configured split and writes one JSON line per sample::

    {"id": ..., "expressive": <summary>, "instruction": ..., "narration": <MLLM output>}

which ``EditDataModule(expressive_path=...)`` reads back. Lines are appended and flushed after
every batch; a rerun skips the ids already written, so a killed run resumes where it stopped (a
half-written last line is dropped with a warning).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from datamodules.base import EditDataModule, build_transform

#: LLaVA-1.5's conversation format (``USER: <image>\n... ASSISTANT:``), which the tiny LLaVA
#: tokenises the same way; the question is MGIE's prompt (Sec. 3.1) with the released data's
#: "(in a short paragraph)".
PROMPT_TEMPLATE = (
    "USER: <image>\nwhat will this image be like if {instruction} (in a short paragraph) "
    "ASSISTANT:"
)
#: Flan-T5's summarisation task prefix.
SUMMARY_TEMPLATE = "summarize: {narration}"
#: Flan-T5 was trained on inputs of at most 512 tokens; longer narrations are truncated.
SUMMARY_MAX_INPUT_TOKENS = 512

_MLLM_WHAT = (
    "a LLaVA checkpoint in the llava-hf layout, e.g. `llava-hf/llava-1.5-7b-hf` "
    "(LlavaForConditionalGeneration weights + config.json and the LlavaProcessor files)"
)
_SUMMARIZER_WHAT = (
    "a Flan-T5 checkpoint, e.g. `google/flan-t5-xxl` (T5ForConditionalGeneration weights + "
    "config.json and the tokenizer files)"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CommandInputError(ValueError):
    """Bad arguments, data or output file: the user must fix it (one-line error, exit 2)."""


# --------------------------------------------------------------------------- data


def datamodule_from_config(config: str, overrides: Sequence[str]) -> EditDataModule:
    """The DataModule of a fit config (``-c``) plus CLI overrides, without building the model
    or trainer the config also describes (a MGIE config would otherwise load LLaVA-7B)."""
    from editbench.cli import EditbenchCLI

    class ConfigOnly(EditbenchCLI):
        def instantiate_classes(self) -> None:  # parse only; the data is built below
            pass

    parsed = ConfigOnly(args=["-c", config, *overrides], run=False).config
    return datamodule_from_spec(parsed.data.as_dict(), [])


def datamodule_from_spec(spec: dict, overrides: Sequence[str]) -> EditDataModule:
    """A DataModule from ``{"class_path", "init_args"}`` plus ``--data.*`` overrides, parsed as
    LightningCLI parses its ``data`` section."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(parser_mode="omegaconf", exit_on_error=False)
    parser.add_subclass_arguments(EditDataModule, "data", required=True)
    try:
        config = parser.parse_args(["--data", json.dumps(spec), *overrides])
    except Exception as err:  # jsonargparse's ArgumentError: a bad override or spec
        raise CommandInputError(f"cannot build the datamodule: {err}") from err
    return parser.instantiate_classes(config).data


def _members(dm: EditDataModule) -> list[EditDataModule]:
    return list(getattr(dm, "members", None) or [dm])


def eval_dataset(dm: EditDataModule, split: str) -> tuple[Dataset, list[str]]:
    """The samples of ``split`` in order, with the evaluation transform (center crop, no flip)
    even for ``train``, and the ids, read from the records without decoding an image.

    Expressive instructions are not attached: this may be the command that writes them.
    """
    dm.prepare_data()
    members = _members(dm)
    saved = [m.expressive_path for m in members]
    for m in members:
        m.expressive_path = None
    try:
        dataset = dm.make_dataset(split)
    finally:
        for m, path in zip(members, saved, strict=True):
            m.expressive_path = path
    if isinstance(dataset, ConcatDataset):  # ConcatEditDataModule: one part per member
        pairs = list(zip(dataset.datasets, members, strict=True))
    else:
        pairs = [(dataset, dm)]
    ids = []
    for part, member in pairs:
        part.transform = build_transform(member.resolution, False, False, 0.0)
        ids += [str(r["id"]) for r in part.records]
    return dataset, ids


# --------------------------------------------------------------------------- output file


def read_written(path: Path) -> dict[str, int]:
    """``{id: line number}`` of the records already in ``path`` (empty if it does not exist).

    A last line cut off by a killed run (no newline and not valid JSON) is removed from the file
    with a warning. Invalid JSON elsewhere, a record without ``id``/``expressive`` or an id
    written twice raises :class:`CommandInputError` naming the file and lines.
    """
    if not path.exists():
        return {}
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: text after the last newline ("" if none)
    if tail.strip():
        try:
            json.loads(tail)
        except json.JSONDecodeError:
            cut = len(data) - len(tail)
            warnings.warn(
                f"{path}, line {len(lines)}: dropping a truncated last line from an interrupted "
                f"run ({len(tail)} bytes: {tail[:60]!r}...); its sample will be written again",
                stacklevel=2,
            )
            with path.open("r+b") as f:
                f.truncate(cut)
        else:  # a complete record whose newline was not written
            with path.open("ab") as f:
                f.write(b"\n")
            complete.append(tail)
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(complete, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            raise CommandInputError(f"{path}, line {lineno}: not valid JSON ({err})") from err
        if not isinstance(record, dict) or "id" not in record or "expressive" not in record:
            raise CommandInputError(f"{path}, line {lineno}: expected an object with id/expressive")
        key = str(record["id"])
        if key in seen:
            raise CommandInputError(
                f"{path}: id {key!r} appears twice (lines {seen[key]} and {lineno}); remove one "
                "of them before resuming"
            )
        seen[key] = lineno
    return seen


def check_unique(ids: Sequence[str], split: str) -> None:
    """The split's ids must be unique: the output is keyed by id."""
    seen, dupes = set(), []
    for i in ids:
        if i in seen:
            dupes.append(i)
        seen.add(i)
    if dupes:
        raise CommandInputError(
            f"the {split!r} split has duplicate ids ({len(dupes)}, e.g. {dupes[:5]}); "
            "expressive instructions are stored by id"
        )


# --------------------------------------------------------------------------- models


def _check_folder(path: str | Path, option: str, what: str) -> Path:
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{option}: no model at {folder} (expected a local folder with config.json). Place "
            f"there {what}, saved with `save_pretrained`; nothing is downloaded."
        )
    return folder


def load_mllm(path: str | Path, device: str, dtype: torch.dtype):
    """``(LlavaForConditionalGeneration, processor)`` from a local folder, eval, left padding."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = _check_folder(path, "--mllm", _MLLM_WHAT)
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"  # generation continues every row from its last token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = LlavaForConditionalGeneration.from_pretrained(
        folder, local_files_only=True, dtype=dtype
    )
    return model.to(device).eval(), processor


def load_summarizer(path: str | Path, device: str, dtype: torch.dtype):
    """``(AutoModelForSeq2SeqLM, tokenizer)`` of a Flan-T5 folder, eval."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    folder = _check_folder(path, "--summarizer", _SUMMARIZER_WHAT)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    return model.to(device).eval(), tokenizer


def to_uint8(images: torch.Tensor) -> list[torch.Tensor]:
    """``[B, 3, H, W]`` images in [-1, 1] as uint8 ``[3, H, W]`` tensors, as processors take."""
    pixels = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return list(pixels.cpu())


@torch.no_grad()
def narrate(
    model,
    processor,
    images: torch.Tensor,
    instructions: Sequence[str],
    template: str = PROMPT_TEMPLATE,
    max_new_tokens: int = 128,
) -> list[str]:
    """The MLLM's greedy narration of each edit (MGIE Sec. 3.1: MLLM*([prompt, X] | V)); only
    the newly generated tokens are decoded."""
    prompts = [template.format(instruction=i) for i in instructions]
    inputs = processor(images=to_uint8(images), text=prompts, return_tensors="pt", padding=True)
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    new = out[:, inputs["input_ids"].shape[1] :]
    return [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


@torch.no_grad()
def summarize(
    model,
    tokenizer,
    narrations: Sequence[str],
    template: str = SUMMARY_TEMPLATE,
    max_new_tokens: int = 48,
) -> list[str]:
    """Greedy Flan-T5 summaries of the narrations (MGIE Eq. 2: E = Summ(MLLM*(...)))."""
    inputs = tokenizer(
        [template.format(narration=n) for n in narrations],
        return_tensors="pt",
        padding=True,
        truncation=True,
        max_length=SUMMARY_MAX_INPUT_TOKENS,
    ).to(model.device)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    return [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]


# --------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``data expressive`` (other ``--data.*`` flags are config overrides)."""
    parser.add_argument(
        "-c", "--config", required=True, help="a fit config (its data section is used)"
    )
    parser.add_argument("--split", default="train", choices=("train", "val", "test"))
    parser.add_argument("--mllm", required=True, help="local LLaVA folder (llava-hf layout)")
    parser.add_argument("--summarizer", required=True, help="local Flan-T5 folder")
    parser.add_argument("--out", required=True, help="JSONL file to write (appended, resumable)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=128, help="narration tokens")
    parser.add_argument("--summary_max_tokens", type=int, default=48, help="summary tokens")
    parser.add_argument("--limit", type=int, default=None, help="write at most N new samples")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument(
        "--prompt_template", default=PROMPT_TEMPLATE, help="with {instruction} and <image>"
    )
    parser.add_argument(
        "--summary_template", default=SUMMARY_TEMPLATE, help="with {narration}"
    )


def _check_args(args: argparse.Namespace) -> None:
    if "{instruction}" not in args.prompt_template:
        raise CommandInputError("--prompt_template must contain {instruction}")
    if "{narration}" not in args.summary_template:
        raise CommandInputError("--summary_template must contain {narration}")
    for name in ("batch_size", "max_new_tokens", "summary_max_tokens"):
        if getattr(args, name) < 1:
            raise CommandInputError(f"--{name} must be at least 1")
    if args.limit is not None and args.limit < 0:
        raise CommandInputError("--limit must not be negative")


class ExpressiveWriter:
    """The LLaVA narrator and Flan-T5 summariser, turning batches into output records."""

    def __init__(self, args: argparse.Namespace) -> None:
        dtype = DTYPES[args.dtype]
        self.mllm, self.processor = load_mllm(args.mllm, args.device, dtype)
        self.summarizer, self.tokenizer = load_summarizer(args.summarizer, args.device, dtype)
        if self.processor.image_token not in args.prompt_template:
            raise CommandInputError(
                f"--prompt_template must contain {self.processor.image_token!r}"
            )
        self.args = args

    def records(self, batch: dict) -> list[dict]:
        """``{"id", "expressive", "instruction", "narration"}`` per kept sample of a batch."""
        a = self.args
        narrations = narrate(
            self.mllm,
            self.processor,
            batch["source"],
            batch["instruction"],
            a.prompt_template,
            a.max_new_tokens,
        )
        summaries = summarize(
            self.summarizer, self.tokenizer, narrations, a.summary_template, a.summary_max_tokens
        )
        return [
            {"id": key, "expressive": summary, "instruction": instruction, "narration": narration}
            for key, instruction, narration, summary in zip(
                batch["id"], batch["instruction"], narrations, summaries, strict=True
            )
        ]


def write_expressive(args: argparse.Namespace, overrides: Sequence[str]) -> dict[str, int]:
    """Generate and append the split's samples missing from ``--out``; returns the counts."""
    from tqdm.auto import tqdm

    _check_args(args)
    dm = datamodule_from_config(args.config, overrides)
    dataset, ids = eval_dataset(dm, args.split)
    check_unique(ids, args.split)
    out = Path(args.out)
    already = read_written(out)
    todo = [i for i, key in enumerate(ids) if key not in already]
    counts = {"written": 0, "skipped": len(ids) - len(todo), "bad": 0, "total": len(ids)}
    todo = todo if args.limit is None else todo[: args.limit]
    if not todo:
        return counts
    writer = ExpressiveWriter(args)
    loader = DataLoader(Subset(dataset, todo), batch_size=args.batch_size, collate_fn=dm.collate_fn)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as f, tqdm(
        total=len(todo), desc=f"expressive {args.split}", unit="sample"
    ) as bar:
        for batch in loader:
            bad = len(batch.get("skipped_ids") or [])
            records = writer.records(batch) if batch["id"] else []
            # ASCII JSON: no character of a model's output can break a line.
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()  # a killed run keeps every finished batch
            counts["written"] += len(records)
            counts["bad"] += bad
            bar.update(len(records) + bad)
    return counts


def run(args: argparse.Namespace, overrides: Sequence[str] = ()) -> int:
    """Entry of ``data expressive``: write, then print ``written/skipped/total``."""
    try:
        counts = write_expressive(args, overrides)
    except CommandInputError as err:
        if os.environ.get("EDITBENCH_TRACEBACK"):
            raise
        print(f"editbench: error: {err}", file=sys.stderr)
        return 2
    bad = f", {counts['bad']} bad samples skipped" if counts["bad"] else ""
    print(
        f"expressive {args.split}: written {counts['written']}, skipped {counts['skipped']} "
        f"(already in {args.out}), total {counts['total']}{bad}"
    )
    return 0
