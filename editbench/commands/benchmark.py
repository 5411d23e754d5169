"""``python -m editbench benchmark``: edit latency and training-step time of InsPix2Pix against
diffusers' pipeline and a hand-written diffusers training step, as ratios (target: edit ≤ 1.05,
train step ≤ 1.10); with ``--mgie``, MGIE's inference time against its "- L_ins" ablation
(:mod:`benchmarks.mgie_inference`); with ``--insightedit``, a tiny InsightEdit training step
against tiny MGIE's (:mod:`benchmarks.insightedit_bench`)."""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m editbench benchmark", description=__doc__)
    parser.add_argument(
        "--diffusion_path",
        default=".cache/editbench/tiny/instruct-pix2pix",
        help="an InstructPix2Pix folder (default: the tiny one, made if missing)",
    )
    parser.add_argument("--edit_batch", type=int, default=4)
    parser.add_argument("--edit_steps", type=int, default=20)
    parser.add_argument("--train_batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--mgie",
        action="store_true",
        help="also time MGIE against its '- L_ins' ablation (Table 7's inference cost)",
    )
    parser.add_argument("--mllm_path", default=".cache/editbench/tiny/llava")
    parser.add_argument("--mgie_ckpt", default=None, help="a trained MGIE checkpoint")
    parser.add_argument("--no_lins_ckpt", default=None, help="a trained '- L_ins' checkpoint")
    parser.add_argument("--mgie_steps", type=int, default=20)
    parser.add_argument(
        "--insightedit",
        action="store_true",
        help="also time a tiny InsightEdit training step against tiny MGIE's",
    )
    parser.add_argument("--output", default=None, help="also write the JSON result here")
    return parser


def main(argv: list[str]) -> int:
    from benchmarks.bench import bench_edit, bench_train_step

    args = build_parser().parse_args(argv)
    path = Path(args.diffusion_path)
    if not path.exists() and path.parent.name == "tiny":
        from editbench.tiny import make_tiny

        make_tiny(path.parent)
    result = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "diffusion_path": str(path),
        "edit": bench_edit(path, args.edit_batch, args.edit_steps, args.repeats),
        "train_step": bench_train_step(path, args.train_batch, args.repeats),
    }
    if args.mgie:
        from benchmarks.mgie_inference import bench_mgie_inference

        tiny = Path(args.mllm_path).parent.name == "tiny"
        result["mgie_inference"] = bench_mgie_inference(
            Path(args.mllm_path),
            path,
            steps=args.mgie_steps,
            repeats=max(1, args.repeats // 3),
            mgie_ckpt=args.mgie_ckpt,
            no_lins_ckpt=args.no_lins_ckpt,
            # the tiny presets' edit head (experiments/tiny/mgie_e2e.yaml)
            head={"edit_head_dim": 64, "edit_head_heads": 4, "edit_head_layers": 2,
                  "edit_head_ff": 128} if tiny else None,
        )
    if args.insightedit:
        from benchmarks.insightedit_bench import bench_insightedit_step

        result["insightedit_step"] = bench_insightedit_step(
            Path(args.mllm_path).parent, repeats=max(1, args.repeats // 2)
        )
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0
