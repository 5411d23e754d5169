"""``python -m editbench data expressive`` on the tiny LLaVA and Flan-T5 and the synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from datamodules.synthetic import SyntheticEditDataModule
from editbench.cli import main
from editbench.commands.expressive import PROMPT_TEMPLATE, SUMMARY_TEMPLATE

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "experiments" / "tiny" / "inspix2pix.yaml")
SPLIT = "val"  # 16 samples in the `synthetic_root` fixture, of which the tests use
MAX_SAMPLES = 8
NARRATION_TOKENS = 8
SUMMARY_TOKENS = 4


def data_overrides(synthetic_root: Path) -> list[str]:
    return [
        f"--data.init_args.root={synthetic_root}",
        "--data.init_args.num_train=64",
        "--data.init_args.num_val=16",
        "--data.init_args.num_test=16",
        f"--data.init_args.max_samples={MAX_SAMPLES}",
    ]


def expressive(tiny_dir: Path, synthetic_root: Path, out: Path, *extra: str) -> int:
    """Run the command in-process (with the small generation lengths of these tests)."""
    return main(
        [
            "data",
            "expressive",
            "-c",
            CONFIG,
            *data_overrides(synthetic_root),
            "--split",
            SPLIT,
            "--mllm",
            str(tiny_dir / "llava"),
            "--summarizer",
            str(tiny_dir / "t5"),
            "--out",
            str(out),
            "--batch_size",
            "4",
            "--max_new_tokens",
            str(NARRATION_TOKENS),
            "--summary_max_tokens",
            str(SUMMARY_TOKENS),
            "--device",
            "cpu",
            *extra,
        ]
    )


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def split_datamodule(synthetic_root: Path, **kwargs) -> SyntheticEditDataModule:
    return SyntheticEditDataModule(
        root=str(synthetic_root),
        resolution=32,
        num_train=64,
        num_val=16,
        num_test=16,
        num_workers=0,
        max_samples=MAX_SAMPLES,
        **kwargs,
    )


@pytest.fixture(scope="module")
def full_run(tiny_dir, synthetic_root, tmp_path_factory):
    """One uninterrupted run over the split: its output file and the split's records."""
    out = tmp_path_factory.mktemp("expressive") / "full.jsonl"
    assert expressive(tiny_dir, synthetic_root, out) == 0
    records = split_datamodule(synthetic_root).make_dataset(SPLIT).records
    return out, records


def test_output_has_exactly_the_split_ids_and_the_datamodule_reads_it(full_run, synthetic_root):
    out, records = full_run
    lines = read_lines(out)
    assert [line["id"] for line in lines] == [r["id"] for r in records]
    assert [line["instruction"] for line in lines] == [r["instruction"] for r in records]
    assert all(set(line) == {"id", "expressive", "instruction", "narration"} for line in lines)
    assert all(line["narration"] for line in lines)
    # The synthetic data ships its own `expressive`; the file's must replace it for every sample.
    dm = split_datamodule(synthetic_root, expressive_path=str(out))
    dataset = dm.make_dataset(SPLIT)
    by_id = {line["id"]: line["expressive"] for line in lines}
    for i in range(len(dataset)):
        sample = dataset[i]
        assert sample["expressive"] == by_id[sample["id"]]


def test_narration_and_summary_are_the_models_greedy_outputs(full_run, tiny_dir):
    """Recompute two samples one at a time (no padding), from the PNG on disk, with the models
    called directly: the narration is LLaVA's greedy continuation of the prompt and the
    expressive instruction is Flan-T5's greedy summary of that narration."""
    from transformers import (
        AutoModelForSeq2SeqLM,
        AutoProcessor,
        AutoTokenizer,
        LlavaForConditionalGeneration,
    )

    out, records = full_run
    lines = {line["id"]: line for line in read_lines(out)}
    processor = AutoProcessor.from_pretrained(tiny_dir / "llava", local_files_only=True)
    llava = LlavaForConditionalGeneration.from_pretrained(
        tiny_dir / "llava", local_files_only=True
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "t5", local_files_only=True)
    t5 = AutoModelForSeq2SeqLM.from_pretrained(tiny_dir / "t5", local_files_only=True).eval()
    narrations = set()
    for record in records[:2]:
        prompt = PROMPT_TEMPLATE.format(instruction=record["instruction"])
        assert prompt.startswith("USER: <image>\nwhat will this image be like if ")
        image = Image.open(record["source"]).convert("RGB")
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        with torch.no_grad():
            ids = llava.generate(**inputs, max_new_tokens=NARRATION_TOKENS, do_sample=False)
        new = ids[0, inputs["input_ids"].shape[1] :]
        narration = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
        assert lines[record["id"]]["narration"] == narration
        narrations.add(narration)

        encoded = tokenizer(SUMMARY_TEMPLATE.format(narration=narration), return_tensors="pt")
        with torch.no_grad():
            summary_ids = t5.generate(**encoded, max_new_tokens=SUMMARY_TOKENS, do_sample=False)
        summary = tokenizer.decode(summary_ids[0], skip_special_tokens=True).strip()
        assert lines[record["id"]]["expressive"] == summary
    assert len(narrations) == 2, "different images and instructions gave the same narration"


def test_rerun_writes_nothing(full_run, tiny_dir, synthetic_root, tmp_path, capsys):
    out, records = full_run
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(out.read_bytes())
    assert expressive(tiny_dir, synthetic_root, copy) == 0
    assert copy.read_bytes() == out.read_bytes()
    assert f"written 0, skipped {len(records)}" in capsys.readouterr().out


def test_interrupted_run_resumes_without_duplicates(full_run, tiny_dir, synthetic_root, tmp_path):
    """--limit 3 stands for a run killed after 3 samples (mid-batch), plus a half-written line
    the kill left behind; the next run drops that line with a warning and writes the rest, and
    the file ends up with the same records as one uninterrupted run."""
    out, records = full_run
    resumed = tmp_path / "resumed.jsonl"
    assert expressive(tiny_dir, synthetic_root, resumed, "--limit", "3") == 0
    first = read_lines(resumed)
    assert [line["id"] for line in first] == [r["id"] for r in records[:3]]
    with resumed.open("a") as f:
        f.write('{"id": "synthetic-val-000003", "expres')  # killed mid-write
    with pytest.warns(UserWarning, match="truncated last line"):
        assert expressive(tiny_dir, synthetic_root, resumed) == 0
    lines = read_lines(resumed)
    assert [line["id"] for line in lines] == [r["id"] for r in records]
    assert lines == read_lines(out)


def test_missing_model_folder_names_path_and_contents(tiny_dir, synthetic_root, tmp_path, capsys):
    missing = tmp_path / "no-llava"
    args = ["data", "expressive", "-c", CONFIG, *data_overrides(synthetic_root)]
    args += ["--split", SPLIT, "--mllm", str(missing), "--summarizer", str(tiny_dir / "t5")]
    args += ["--out", str(tmp_path / "out.jsonl"), "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "LlavaForConditionalGeneration" in err
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"id": "synthetic-val-000000", "expressive": "a"}\n'
            '{"id": "synthetic-val-000000", "expressive": "b"}\n',
            "'synthetic-val-000000' appears twice (lines 1 and 2)",
        ),
        ('{"id": "x", "expressive": "a"}\nnot json\n{"id": "y", "expressive": "b"}\n', "line 2"),
    ],
    ids=["duplicate-id", "corrupt-middle-line"],
)
def test_bad_output_file_is_an_error(tiny_dir, synthetic_root, tmp_path, capsys, content, message):
    out = tmp_path / "bad.jsonl"
    out.write_text(content)
    assert expressive(tiny_dir, synthetic_root, out) == 2
    err = capsys.readouterr().err
    assert str(out) in err and message in err
    assert out.read_text() == content  # left as it was
