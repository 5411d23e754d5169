"""``python -m editbench benchmark --models`` (MGIE Table 4, issue 16 item 7) on the tiny
checkpoints: the guidance/diffusion split is the models' own ``edit`` (same images), and the
CSV/Markdown carry one row per model and batch beside the paper's A100 seconds."""

from __future__ import annotations

import csv

import pytest
import torch

from benchmarks.table4 import PAPER_SECONDS, build_model
from editbench.cli import main
from editbench.commands.benchmark import TINY_HEAD


@pytest.mark.parametrize("name", ["inspix2pix", "mgie"])
def test_split_is_the_models_edit(tiny_dir, name):
    """``conditions`` then ``render`` (what the benchmark times apart) give ``edit``'s images."""
    extra = {"head": TINY_HEAD, "max_new_tokens": 4} if name == "mgie" else {}
    model = build_model(name, tiny_dir / "instruct-pix2pix", tiny_dir / "llava", **extra)
    source = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    prompts = ["make it blue", "remove the square"]
    sampler = {"num_inference_steps": 3, "guidance_scale": 7.5, "image_guidance_scale": 1.5}
    with torch.no_grad():
        edited = model.edit(source, prompts, generator=torch.Generator().manual_seed(0), **sampler)
        cond, null, _ = model.conditions(source, prompts)
        split = model.render(source, cond, null, generator=torch.Generator().manual_seed(0), **sampler)
    assert torch.equal(edited.images, split)


@pytest.mark.slow
def test_benchmark_models_writes_table4(tiny_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = [
        "benchmark", "--models", "inspix2pix", "mgie", "--batches", "1", "2", "--steps", "2",
        "--repeats", "3", "--diffusion_path", str(tiny_dir / "instruct-pix2pix"),
        "--mllm_path", str(tiny_dir / "llava"), "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    rows = list(csv.DictReader((out / "table4.csv").open()))
    assert [(r["model"], int(r["batch"])) for r in rows] == [
        ("inspix2pix", 1), ("inspix2pix", 2), ("mgie", 1), ("mgie", 2)
    ]
    for row in rows:
        guidance, diffusion, total = (float(row[k]) for k in ("guidance_s", "diffusion_s", "total_s"))
        assert guidance > 0 and diffusion > 0 and total == pytest.approx(guidance + diffusion)
    assert float(rows[2]["paper_a100_s"]) == PAPER_SECONDS["mgie"][1] == 9.2
    assert rows[1]["paper_a100_s"] == ""  # Table 4 has no batch 2
    markdown = (out / "table4.md").read_text()
    assert markdown.count("\n") == 2 + len(rows) and "| mgie | 1 |" in markdown
    assert "| mgie | 1 |" in capsys.readouterr().out
