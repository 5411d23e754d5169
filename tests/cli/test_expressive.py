"""``python -m editbench data expressive`` on the tiny LLaVA, LLaMA and Flan-T5, the synthetic data
and a tiny IPr2Pr (original layout).

The release's formats are written out here by hand from ``apple/ml-mgie``'s
``process_data.ipynb`` (cell 4) and LLaVA 7ace501's ``conv_vicuna_v1_1``, not imported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from datamodules.synthetic import SyntheticEditDataModule
from editbench.cli import main
from editbench.commands.expressive import cut_narration

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "experiments" / "tiny" / "inspix2pix.yaml")
SPLIT = "val"  # 16 samples in the `synthetic_root` fixture, of which the tests use
MAX_SAMPLES = 8
NARRATION_TOKENS = 8
SUMMARY_MIN, SUMMARY_MAX = 2, 6  # decoder lengths (the release: 5 and 64), short for the tests

#: The release's narration conversation, by hand: Vicuna v1.1's system prompt, " USER: ", the
#: quoted instruction, two spaces, "(in a short paragraph)", a newline, the image, " ASSISTANT:".
RELEASE_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions. USER: what will this "
    "image be like if '%s'  (in a short paragraph)\n<image> ASSISTANT:"
)
#: LGIE: the same conversation without the image.
RELEASE_TEXT_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions. USER: what will this "
    "image be like if '%s'  (in a short paragraph) ASSISTANT:"
)
RELEASE_SUMMARY_PROMPT = "summarize the following paragraph in 32 words:\n\n%s"


def data_overrides(synthetic_root: Path) -> list[str]:
    return [
        f"--data.init_args.root={synthetic_root}",
        "--data.init_args.num_train=64",
        "--data.init_args.num_val=16",
        "--data.init_args.num_test=16",
        f"--data.init_args.max_samples={MAX_SAMPLES}",
    ]


def expressive(
    tiny_dir: Path,
    synthetic_root: Path,
    out: Path,
    *extra: str,
    narrator: tuple[str, str] = ("--mllm", "llava"),
    config: str = CONFIG,
    data: list[str] | None = None,
    split: str = SPLIT,
) -> int:
    """Run the command in-process (with the small generation lengths of these tests)."""
    return main(
        [
            "data",
            "expressive",
            "-c",
            config,
            *(data_overrides(synthetic_root) if data is None else data),
            "--split",
            split,
            narrator[0],
            str(tiny_dir / narrator[1]),
            "--summarizer",
            str(tiny_dir / "t5"),
            "--out",
            str(out),
            "--batch_size",
            "4",
            "--max_new_tokens",
            str(NARRATION_TOKENS),
            "--summary_min_length",
            str(SUMMARY_MIN),
            "--summary_max_length",
            str(SUMMARY_MAX),
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
    keys = {"id", "expressive", "instruction", "narration", "narration_full"}
    assert all(set(line) == keys for line in lines)  # no seed: one sample per id
    assert all(line["narration_full"] for line in lines)
    # The synthetic data ships its own `expressive`; the file's must replace it for every sample.
    dm = split_datamodule(synthetic_root, expressive_path=str(out))
    dataset = dm.make_dataset(SPLIT)
    by_id = {line["id"]: line["expressive"] for line in lines}
    for i in range(len(dataset)):
        sample = dataset[i]
        assert sample["expressive"] == by_id[sample["id"]]


def summarise_by_hand(t5, tokenizer, narration: str) -> str:
    """The release's summariser call: its prompt, 5 beams, no-repeat 3, no sampling (lengths
    shortened as in the command line of these tests)."""
    encoded = tokenizer(RELEASE_SUMMARY_PROMPT % narration, return_tensors="pt")
    with torch.no_grad():
        ids = t5.generate(
            **encoded,
            num_beams=5,
            min_length=SUMMARY_MIN,
            max_length=SUMMARY_MAX,
            no_repeat_ngram_size=3,
            do_sample=False,
        )
    return tokenizer.decode(ids[0], skip_special_tokens=True).strip()


def load_t5(tiny_dir: Path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "t5", local_files_only=True)
    t5 = AutoModelForSeq2SeqLM.from_pretrained(tiny_dir / "t5", local_files_only=True).eval()
    return t5, tokenizer


def test_narration_and_summary_are_the_models_greedy_outputs(full_run, tiny_dir):
    """Recompute two samples one at a time (no padding), from the PNG on disk, with the models
    called directly on the release's prompt written out by hand: the narration is LLaVA's
    greedy continuation, cut as the release cuts it, and the expressive instruction is the
    release-configured Flan-T5 summary of the cut narration."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out, records = full_run
    lines = {line["id"]: line for line in read_lines(out)}
    processor = AutoProcessor.from_pretrained(tiny_dir / "llava", local_files_only=True)
    llava = LlavaForConditionalGeneration.from_pretrained(
        tiny_dir / "llava", local_files_only=True
    ).eval()
    t5, tokenizer = load_t5(tiny_dir)
    narrations = set()
    for record in records[:2]:
        prompt = RELEASE_PROMPT % record["instruction"]
        image = Image.open(record["source"]).convert("RGB")
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        with torch.no_grad():
            ids = llava.generate(**inputs, max_new_tokens=NARRATION_TOKENS, do_sample=False)
        new = ids[0, inputs["input_ids"].shape[1] :]
        narration = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
        line = lines[record["id"]]
        assert line["narration_full"] == narration
        assert line["narration"] == cut_narration(narration)
        assert line["expressive"] == summarise_by_hand(t5, tokenizer, line["narration"])
        narrations.add(narration)
    assert len(narrations) == 2, "different images and instructions gave the same narration"


def test_prompt_token_ids_are_the_release_conversation(tiny_dir):
    """The ids the command feeds LLaVA: BOS, then the hand-written release conversation with
    the processor's image tokens where the release puts its image patches (after the
    question's newline, before " ASSISTANT:")."""
    from transformers import AutoProcessor

    from editbench.commands.expressive import PROMPT_TEMPLATE, narration_inputs

    processor = AutoProcessor.from_pretrained(tiny_dir / "llava", local_files_only=True)
    image = torch.zeros(1, 3, 32, 32)
    got = narration_inputs(processor, image, ["make it snow"], PROMPT_TEMPLATE)["input_ids"][0]
    hand = RELEASE_PROMPT % "make it snow"
    tok = processor.tokenizer
    want = processor(images=[torch.zeros(3, 32, 32, dtype=torch.uint8) + 128], text=hand)
    assert got.tolist() == list(want["input_ids"][0])
    ids = got.tolist()
    assert ids[0] == tok.bos_token_id
    image_id = tok.convert_tokens_to_ids(processor.image_token)
    first = ids.index(image_id)
    count = ids.count(image_id)
    assert count >= 1
    assert ids[first : first + count] == [image_id] * count  # one contiguous block
    before = tok.decode(ids[1:first])
    after = tok.decode(ids[first + count :])
    assert before == hand.split("<image>")[0]
    assert before.endswith("make it snow'  (in a short paragraph)\n")
    assert after.strip() == "ASSISTANT:"


def test_text_only_mode_writes_lgie_targets_from_llama(tiny_dir, synthetic_root, tmp_path):
    """--llm: the tiny LLaMA narrates from the instruction alone (the release conversation
    without the image); the result is LGIE's target file, read back by the DataModule."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "expressive_lgie.jsonl"
    assert (
        expressive(tiny_dir, synthetic_root, out, "--limit", "2", narrator=("--llm", "llama")) == 0
    )
    lines = read_lines(out)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "llama", local_files_only=True)
    llama = AutoModelForCausalLM.from_pretrained(tiny_dir / "llama", local_files_only=True).eval()
    t5, t5_tokenizer = load_t5(tiny_dir)
    for line in lines:
        inputs = tokenizer(RELEASE_TEXT_PROMPT % line["instruction"], return_tensors="pt")
        assert inputs["input_ids"][0, 0] == tokenizer.bos_token_id
        with torch.no_grad():
            ids = llama.generate(**inputs, max_new_tokens=NARRATION_TOKENS, do_sample=False)
        new = ids[0, inputs["input_ids"].shape[1] :]
        assert line["narration_full"] == tokenizer.decode(new, skip_special_tokens=True).strip()
        assert line["narration"] == cut_narration(line["narration_full"])
        assert line["expressive"] == summarise_by_hand(t5, t5_tokenizer, line["narration"])
    dm = split_datamodule(synthetic_root, expressive_path=str(out), on_missing_expressive="keep")
    sample = dm.make_dataset(SPLIT)[0]
    assert sample["expressive"] == lines[0]["expressive"]


def test_text_only_mode_refuses_an_image_prompt(tiny_dir, synthetic_root, tmp_path, capsys):
    out = tmp_path / "lgie.jsonl"
    extra = ("--prompt_template", "<image> {instruction}")
    assert expressive(tiny_dir, synthetic_root, out, *extra, narrator=("--llm", "llama")) == 2
    assert "--llm narrates without the image" in capsys.readouterr().err


def test_llm_and_mllm_are_exclusive(tiny_dir, synthetic_root, tmp_path):
    with pytest.raises(SystemExit):
        expressive(tiny_dir, synthetic_root, tmp_path / "x.jsonl", "--llm", str(tiny_dir / "llama"))


def test_defaults_are_the_release_settings():
    """Parsed with no option: the release's lengths, cut, summariser prompt and decoding, and
    the help names the release's summariser checkpoint."""
    import argparse

    from editbench.commands.expressive import add_arguments, summary_kwargs

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["-c", "x", "--mllm", "m", "--summarizer", "s", "--out", "o"])
    assert args.max_new_tokens == 1024
    assert (args.cut_at, args.max_sentences) == ("alternative", 2)
    assert args.summary_template.format(narration="N") == RELEASE_SUMMARY_PROMPT % "N"
    assert summary_kwargs(args) == {
        "num_beams": 5,
        "min_length": 5,
        "max_length": 64,
        "no_repeat_ngram_size": 3,
        "do_sample": False,
    }
    assert "jordiclive/flan-t5-11b-summarizer-filtered" in parser.format_help()


@pytest.mark.parametrize(
    ("text", "kwargs", "expected"),
    [
        # two sentences kept, joined by "." without the space (as the release's join does)
        (
            "The sky turns orange. Clouds glow pink. The sea is calm.",
            {},
            "The sky turns orange.Clouds glow pink.",
        ),
        ("One sentence only.", {}, "One sentence only."),
        ("No final period", {}, "No final period."),
        # cut before "alternative", any case, then the sentence rule
        ("Paint the car red. An alternative is blue. Done.", {}, "Paint the car red.An."),
        ("Add snow to the roof, Alternatively add rain.", {}, "Add snow to the roof,."),
        ("Alternatively, it could be red.", {}, ""),  # nothing left (the release would fail)
        ("A dog appears [IMG0] [IMG1]. More.", {}, "A dog appears."),
        # options: no cut word, all sentences
        ("A. An alternative. C.", {"cut_at": "", "max_sentences": 0}, "A.An alternative.C."),
    ],
)
def test_cut_narration_on_hand_made_strings(text, kwargs, expected):
    assert cut_narration(text, **kwargs) == expected


def test_ipr2pr_writes_one_line_per_image_pair(tiny_dir, tmp_path):
    """IPr2Pr's original layout: one line per (prompt folder, seed), as the release writes one
    instruction per image pair; the DataModule then gives each pair its own line."""
    from datamodules.ipr2pr import IPr2PrDataModule

    root = tmp_path / "ip2p"
    root.mkdir()
    names = [f"{i:07d}" for i in range(20)]
    (root / "seeds.json").write_text(json.dumps([[n, [11, 22]] for n in names]))
    for i, name in enumerate(names):
        (root / name).mkdir()
        (root / name / "prompt.json").write_text(json.dumps({"edit": f"edit {i}"}))
        for seed, colour in ((11, (230, 20, 20)), (22, (20, 20, 230))):
            Image.new("RGB", (24, 24), colour).save(root / name / f"{seed}_0.jpg")
            Image.new("RGB", (24, 24), colour[::-1]).save(root / name / f"{seed}_1.jpg")
    out = tmp_path / "expressive.jsonl"
    data = [f"--data.init_args.root={root}", f"--data.init_args.report_dir={tmp_path}"]
    config = str(REPO / "experiments" / "inspix2pix.yaml")
    assert expressive(tiny_dir, root, out, config=config, data=data, split="test") == 0
    lines = read_lines(out)
    # test split of 20 entries: the last one (split_bounds: 18 / 1 / 1)
    assert [(line["id"], line["seed"]) for line in lines] == [
        ("ipr2pr/0000019", 11),
        ("ipr2pr/0000019", 22),
    ]
    assert all(line["instruction"] == "edit 19" for line in lines)
    dm = IPr2PrDataModule(root=str(root), resolution=16, num_workers=0, expressive_path=str(out))
    sample = dm.make_dataset("test")[0]
    assert sample["seed"] == 11 and sample["expressive"] == lines[0]["expressive"]
    # a rerun knows both pairs are written
    assert expressive(tiny_dir, root, out, config=config, data=data, split="test") == 0
    assert len(read_lines(out)) == 2


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


def test_lgie_configs_read_the_text_only_targets_mgie_the_image_grounded():
    """LGIE learns targets narrated without the image (MGIE Sec. 4.1, Baselines), MGIE the
    image-grounded ones (the FT configs inherit their e2e config's data)."""
    import yaml

    def path_of(name: str) -> str:
        config = yaml.safe_load((REPO / "experiments" / name).read_text())
        return config["data"]["init_args"]["expressive_path"]

    assert path_of("lgie_e2e.yaml") == "data/ipr2pr/expressive_lgie.jsonl"
    assert path_of("mgie_e2e.yaml") == "data/ipr2pr/expressive.jsonl"
    for name in ("lgie_ft.yaml", "mgie_ft.yaml"):
        head = (REPO / "experiments" / name).read_text().splitlines()[0]
        assert head == f"# base: experiments/{name[:4]}_e2e.yaml"


def test_command_prints_the_mean_lengths_of_what_it_wrote(tiny_dir, synthetic_root, tmp_path,
                                                         capsys):
    """The README compares the mean length of the written instructions with the paper's 22.7
    tokens (and the narrations' 64.5): the command prints both, in the narrator's tokens,
    recomputed here from the file with the LLaVA tokenizer."""
    from transformers import AutoProcessor

    out = tmp_path / "lengths.jsonl"
    assert expressive(tiny_dir, synthetic_root, out, "--limit", "3") == 0
    lines = read_lines(out)
    tokenizer = AutoProcessor.from_pretrained(tiny_dir / "llava", local_files_only=True).tokenizer

    def mean(key):
        lengths = [len(tokenizer(x[key], add_special_tokens=False)["input_ids"]) for x in lines]
        return sum(lengths) / len(lengths)

    printed = capsys.readouterr().out
    assert (
        f"mean length of the 3 written: expressive instruction {mean('expressive'):.1f} tokens, "
        f"narration {mean('narration_full'):.1f} tokens (MGIE Sec. 3.2: 22.7 vs. 64.5)"
    ) in printed
