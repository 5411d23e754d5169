"""``python -m editbench benchmark --mgie --insightedit``: MGIE against its "- L_ins" ablation
(and a tiny InsightEdit step against tiny MGIE's) through the command, on the tiny folders (no
timing is asserted; the guidance lengths are)."""

from __future__ import annotations

import json

import pytest

from editbench.cli import main


@pytest.mark.slow
def test_benchmark_reports_no_lins_inference_beside_mgie(tiny_dir, tmp_path, monkeypatch):
    import benchmarks.mgie_inference as bench

    real = bench.bench_mgie_inference

    def small(*args, **kwargs):  # CPU-sized budgets; the command passes everything else
        return real(*args, **{**kwargs, "budgets": (4, 24)})

    monkeypatch.setattr(bench, "bench_mgie_inference", small)
    out = tmp_path / "bench.json"
    args = [
        "benchmark", "--diffusion_path", str(tiny_dir / "instruct-pix2pix"),
        "--mllm_path", str(tiny_dir / "llava"), "--mgie", "--mgie_steps", "1", "--insightedit",
        "--edit_batch", "1", "--edit_steps", "1", "--train_batch", "2", "--repeats", "1",
        "--output", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    written = json.loads(out.read_text())
    step = written["insightedit_step"]  # issue 14: tiny InsightEdit's step beside tiny MGIE's
    assert step["ratio"] == pytest.approx(step["insightedit_s"] / step["mgie_s"])
    result = written["mgie_inference"]
    assert result["max_new_tokens"] == {"mgie": 4, "no_lins": 24}
    # Untrained tiny LLM: each generates up to its budget (the -L_ins guidance is longer).
    assert result["guidance_tokens"]["mgie"] <= 4 < result["guidance_tokens"]["no_lins"] <= 24
    assert result["no_lins_s"] > 0 and result["mgie_s"] > 0
    assert result["ratio"] == pytest.approx(result["no_lins_s"] / result["mgie_s"])
    assert result["paper_ratio"] == pytest.approx(29.4 / 9.2)
