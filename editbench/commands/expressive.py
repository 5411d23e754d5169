"""``python -m editbench data expressive``: write MGIE's (or LGIE's) expressive instructions.

MGIE (Sec. 3.1, "Concise Expressive Instruction", Eq. 2) derives the target of its instruction
loss L_ins in two steps: the MLLM, given the input image, narrates the edit, and a summariser
(footnote 1: Flan-T5-XXL fine-tuned for summarisation) shortens the narration to a concise
expressive instruction E. Every step is the release's by default (``apple/ml-mgie``,
``process_data.ipynb``); the pipeline itself lives in :mod:`models.components.expressive`, which
MGIE's FZ/FT ablation also runs at test time.

Each is an option (the release value the default). The release writes one instruction per
image pair (``item = <prompt folder>_<seed>``): for IPr2Pr's original layout this command does
the same, one line per (prompt folder, seed), with ``seed`` in the line; the DataModule then
gives each training pair its own instruction (see ``IPr2PrDataset``).

``--llm PATH`` (instead of ``--mllm``) is LGIE's text-only mode: a LLaMA/Vicuna causal LM from a
local folder narrates from the instruction alone, without the image (MGIE Sec. 4.1, Baselines:
LGIE adopts LLaMA-7B "for expressive instructions E from instruction-only inputs but without
visual perception"),
in the same conversation without the image (:data:`TEXT_PROMPT_TEMPLATE`). LGIE configs read
that file (``expressive_lgie.jsonl``), MGIE configs the image-grounded one.

One JSON line per sample (or image pair)::

    {"id": ..., ["seed": ...,] "expressive": <summary>, "instruction": ...,
     "narration": <cut narration the summariser read>, "narration_full": <decoded output>}

which ``EditDataModule(expressive_path=...)`` reads back. Lines are appended and flushed after
every batch; a rerun skips the (id, seed) pairs already written, so a killed run resumes where
it stopped (a half-written last line is dropped with a warning).
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
from models.components.expressive import (  # noqa: F401  (re-exported for the command's users)
    CUT_AT,
    DTYPES,
    MAX_SENTENCES,
    NARRATION_MAX_NEW_TOKENS,
    PROMPT_TEMPLATE,
    RELEASE_SUMMARIZER,
    SUMMARY_MAX_LENGTH,
    SUMMARY_MIN_LENGTH,
    SUMMARY_NO_REPEAT_NGRAM,
    SUMMARY_NUM_BEAMS,
    SUMMARY_TEMPLATE,
    TEXT_PROMPT_TEMPLATE,
    check_folder,
    cut_narration,
    load_summarizer,
    narrate,
    narration_inputs,
    summarize,
)

_MLLM_WHAT = (
    "a LLaVA checkpoint in the llava-hf layout, e.g. `llava-hf/llava-1.5-7b-hf` "
    "(LlavaForConditionalGeneration weights + config.json and the LlavaProcessor files)"
)
_LLM_WHAT = (
    "a LLaMA checkpoint in the transformers layout, e.g. LLaMA-7B (MGIE Sec. 4.1, LGIE) "
    "(LlamaForCausalLM weights + config.json and the tokenizer files)"
)
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


#: One output line's key: (id, seed), seed None where the dataset has none.
Key = tuple[str, str | None]


def eval_dataset(
    dm: EditDataModule, split: str, per_pair: bool = False
) -> tuple[Dataset, list[Key]]:
    """The samples of ``split`` in order, with the evaluation transform (center crop, no flip)
    even for ``train``, and their keys ``(id, seed)``, read from the records without decoding
    an image.

    With ``per_pair``, IPr2Pr's original layout (records with several ``seeds``) is expanded
    to one sample per image pair, in seed order, as the release derives one instruction per pair
    (``process_data.ipynb``: ``for img in glob(<prompt>/*_0.jpg)``); other datasets give one
    sample per record with seed None. Expressive instructions are not attached: this may be the
    command that writes them.
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
    keys: list[Key] = []
    for part, member in pairs:
        part.transform = build_transform(member.resolution, False, False, 0.0)
        if per_pair and any("seeds" in r for r in part.records):
            part.records = [{**r, "seeds": [seed]} for r in part.records for seed in r["seeds"]]
        keys += [
            (str(r["id"]), str(r["seeds"][0]) if per_pair and r.get("seeds") else None)
            for r in part.records
        ]
    if isinstance(dataset, ConcatDataset):  # the parts' lengths may have grown
        dataset = ConcatDataset(dataset.datasets)
    return dataset, keys


def _show(key: Key) -> str:
    return repr(key[0]) if key[1] is None else f"{key[0]!r} seed {key[1]}"


# --------------------------------------------------------------------------- output file


def read_written(path: Path) -> dict[Key, int]:
    """``{(id, seed): line number}`` of the records already in ``path`` (empty if it does not
    exist; seed None for lines without one).

    A last line cut off by a killed run (no newline and not valid JSON) is removed from the file
    with a warning. Invalid JSON elsewhere, a record without ``id``/``expressive`` or an
    (id, seed) written twice raises :class:`CommandInputError` naming the file and lines.
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
    seen: dict[Key, int] = {}
    for lineno, raw in enumerate(complete, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            raise CommandInputError(f"{path}, line {lineno}: not valid JSON ({err})") from err
        if not isinstance(record, dict) or "id" not in record or "expressive" not in record:
            raise CommandInputError(f"{path}, line {lineno}: expected an object with id/expressive")
        seed = record.get("seed")
        key = (str(record["id"]), None if seed is None else str(seed))
        if key in seen:
            raise CommandInputError(
                f"{path}: id {_show(key)} appears twice (lines {seen[key]} and {lineno}); remove "
                "one of them before resuming"
            )
        seen[key] = lineno
    return seen


def check_unique(keys: Sequence[Key], split: str) -> None:
    """The split's (id, seed) keys must be unique: the output is keyed by them."""
    seen, dupes = set(), []
    for k in keys:
        if k in seen:
            dupes.append(k[0] if k[1] is None else k)
        seen.add(k)
    if dupes:
        raise CommandInputError(
            f"the {split!r} split has duplicate ids ({len(dupes)}, e.g. {dupes[:5]}); "
            "expressive instructions are stored by id"
        )


# --------------------------------------------------------------------------- models


def _left_padded(tokenizer):
    tokenizer.padding_side = "left"  # generation continues every row from its last token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_mllm(path: str | Path, device: str, dtype: torch.dtype):
    """``(LlavaForConditionalGeneration, processor)`` from a local folder, eval, left padding."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = check_folder(path, "--mllm", _MLLM_WHAT)
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    _left_padded(processor.tokenizer)
    model = LlavaForConditionalGeneration.from_pretrained(
        folder, local_files_only=True, dtype=dtype
    )
    return model.to(device).eval(), processor


def load_llm(path: str | Path, device: str, dtype: torch.dtype):
    """``(AutoModelForCausalLM, tokenizer)`` of a LLaMA folder (LGIE's text-only narrator)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = check_folder(path, "--llm", _LLM_WHAT)
    tokenizer = _left_padded(AutoTokenizer.from_pretrained(folder, local_files_only=True))
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    return model.to(device).eval(), tokenizer


def summary_kwargs(args: argparse.Namespace) -> dict:
    """The summariser's ``generate`` settings (release: ``num_beams=5, min_length=5,
    max_length=64, do_sample=False, no_repeat_ngram_size=3``; lengths count decoder tokens,
    as the summarization pipeline passes them)."""
    return {
        "num_beams": args.summary_num_beams,
        "min_length": args.summary_min_length,
        "max_length": args.summary_max_length,
        "no_repeat_ngram_size": args.summary_no_repeat_ngram_size,
        "do_sample": False,
    }


# --------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``data expressive`` (other ``--data.*`` flags are config overrides).

    Defaults are the MGIE release's (``apple/ml-mgie``, ``process_data.ipynb``)."""
    parser.add_argument(
        "-c", "--config", required=True, help="a fit config (its data section is used)"
    )
    parser.add_argument("--split", default="train", choices=("train", "val", "test"))
    narrator = parser.add_mutually_exclusive_group(required=True)
    narrator.add_argument(
        "--mllm", help="local LLaVA folder (llava-hf layout): MGIE's image-grounded targets"
    )
    narrator.add_argument(
        "--llm",
        help="local LLaMA folder (the paper: LLaMA-7B): LGIE's text-only targets (no image; e.g. "
        "--out expressive_lgie.jsonl)",
    )
    parser.add_argument(
        "--summarizer",
        required=True,
        help=f"local Flan-T5 folder (the release's: {RELEASE_SUMMARIZER}, Flan-T5-XXL fine-tuned "
        "for summarisation)",
    )
    parser.add_argument("--out", required=True, help="JSONL file to write (appended, resumable)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument(
        "--max_new_tokens",
        type=int,
        default=NARRATION_MAX_NEW_TOKENS,
        help="narration tokens (release: 1024)",
    )
    parser.add_argument(
        "--cut_at", default=CUT_AT, help="cut the narration before this word (release: alternative)"
    )
    parser.add_argument(
        "--max_sentences",
        type=int,
        default=MAX_SENTENCES,
        help="keep the narration's first N sentences (release: 2; 0 keeps all)",
    )
    parser.add_argument("--summary_num_beams", type=int, default=SUMMARY_NUM_BEAMS)
    parser.add_argument("--summary_min_length", type=int, default=SUMMARY_MIN_LENGTH)
    parser.add_argument("--summary_max_length", type=int, default=SUMMARY_MAX_LENGTH)
    parser.add_argument("--summary_no_repeat_ngram_size", type=int, default=SUMMARY_NO_REPEAT_NGRAM)
    parser.add_argument("--limit", type=int, default=None, help="write at most N new samples")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument(
        "--prompt_template",
        default=None,
        help="with {instruction} (and <image> with --mllm); default: the release's Vicuna v1.1 "
        "conversation (without the image for --llm)",
    )
    parser.add_argument("--summary_template", default=SUMMARY_TEMPLATE, help="with {narration}")


def _check_args(args: argparse.Namespace) -> None:
    if args.prompt_template is None:
        args.prompt_template = TEXT_PROMPT_TEMPLATE if args.llm else PROMPT_TEMPLATE
    if "{instruction}" not in args.prompt_template:
        raise CommandInputError("--prompt_template must contain {instruction}")
    if "{narration}" not in args.summary_template:
        raise CommandInputError("--summary_template must contain {narration}")
    for name in ("batch_size", "max_new_tokens", "summary_num_beams", "summary_max_length"):
        if getattr(args, name) < 1:
            raise CommandInputError(f"--{name} must be at least 1")
    for name in ("max_sentences", "summary_min_length", "summary_no_repeat_ngram_size"):
        if getattr(args, name) < 0:
            raise CommandInputError(f"--{name} must not be negative")
    if args.summary_min_length > args.summary_max_length:
        raise CommandInputError("--summary_min_length must not exceed --summary_max_length")
    if args.limit is not None and args.limit < 0:
        raise CommandInputError("--limit must not be negative")


class ExpressiveWriter:
    """The narrator (LLaVA, or LLaMA without the image) and the Flan-T5 summariser, turning
    batches into output records."""

    def __init__(self, args: argparse.Namespace) -> None:
        dtype = DTYPES[args.dtype]
        self.text_only = bool(args.llm)
        if self.text_only:
            self.narrator, self.processor = load_llm(args.llm, args.device, dtype)
            if "<image>" in args.prompt_template:
                raise CommandInputError(
                    "--prompt_template has <image> but --llm narrates without the image"
                )
        else:
            self.narrator, self.processor = load_mllm(args.mllm, args.device, dtype)
            if "<image>" not in args.prompt_template:
                raise CommandInputError("--prompt_template must contain <image> with --mllm")
        self.summarizer, self.tokenizer = load_summarizer(args.summarizer, args.device, dtype)
        self.args = args

    def num_tokens(self, text: str) -> int:
        """Length of ``text`` in the narrator's tokens (MGIE Sec. 3.2 compares E's 22.7 tokens
        with the narrations' 64.5)."""
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def records(self, batch: dict) -> list[dict]:
        """``{"id", ["seed",] "expressive", "instruction", "narration", "narration_full"}`` per
        kept sample of a batch."""
        a = self.args
        full = narrate(
            self.narrator,
            self.processor,
            None if self.text_only else batch["source"],
            batch["instruction"],
            a.prompt_template,
            a.max_new_tokens,
        )
        narrations = [cut_narration(n, a.cut_at, a.max_sentences) for n in full]
        summaries = summarize(
            self.summarizer, self.tokenizer, narrations, a.summary_template, summary_kwargs(a)
        )
        seeds = batch.get("seed") or [None] * len(batch["id"])
        out = []
        for key, seed, instruction, narration, whole, summary in zip(
            batch["id"], seeds, batch["instruction"], narrations, full, summaries, strict=True
        ):
            record: dict = {"id": key}
            if seed is not None:
                record["seed"] = int(seed)
            record.update(
                expressive=summary,
                instruction=instruction,
                narration=narration,
                narration_full=whole,
            )
            out.append(record)
        return out


def write_expressive(args: argparse.Namespace, overrides: Sequence[str]) -> dict[str, int]:
    """Generate and append the split's samples missing from ``--out``; returns the counts."""
    from tqdm.auto import tqdm

    _check_args(args)
    dm = datamodule_from_config(args.config, overrides)
    dataset, keys = eval_dataset(dm, args.split, per_pair=True)
    check_unique(keys, args.split)
    out = Path(args.out)
    already = read_written(out)
    todo = [i for i, key in enumerate(keys) if key not in already]
    counts = {"written": 0, "skipped": len(keys) - len(todo), "bad": 0, "total": len(keys),
              "expressive_tokens": 0, "narration_tokens": 0}
    todo = todo if args.limit is None else todo[: args.limit]
    if not todo:
        return counts
    writer = ExpressiveWriter(args)
    loader = DataLoader(Subset(dataset, todo), batch_size=args.batch_size, collate_fn=dm.collate_fn)
    out.parent.mkdir(parents=True, exist_ok=True)
    with (
        out.open("a", encoding="utf-8") as f,
        tqdm(total=len(todo), desc=f"expressive {args.split}", unit="sample") as bar,
    ):
        for batch in loader:
            bad = len(batch.get("skipped_ids") or [])
            records = writer.records(batch) if batch["id"] else []
            # ASCII JSON: no character of a model's output can break a line.
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()  # a killed run keeps every finished batch
            counts["written"] += len(records)
            for record in records:
                counts["expressive_tokens"] += writer.num_tokens(record["expressive"])
                counts["narration_tokens"] += writer.num_tokens(record["narration_full"])
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
    if counts["written"]:
        n = counts["written"]
        print(
            f"mean length of the {n} written: expressive instruction "
            f"{counts['expressive_tokens'] / n:.1f} tokens, narration "
            f"{counts['narration_tokens'] / n:.1f} tokens (MGIE Sec. 3.2: 22.7 vs. 64.5)"
        )
    return 0
