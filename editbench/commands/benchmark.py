"""``python -m editbench benchmark``: edit latency and training-step time of InsPix2Pix against
diffusers' pipeline and a hand-written diffusers training step, as ratios (target: edit ≤ 1.05,
train step ≤ 1.10); with ``--mgie``, MGIE's inference time against its "- L_ins" ablation
(:mod:`benchmarks.mgie_inference`); with ``--insightedit``, a tiny InsightEdit training step
against tiny MGIE's (:mod:`benchmarks.insightedit_bench`); with ``--models``, MGIE's Table 4: seconds
per edit at batch 1, 4, 8, split into guidance and diffusion, with peak memory, as CSV and
Markdown beside the paper's A100 numbers (:mod:`benchmarks.table4`); with ``--data``, the train
loader against bare torchvision/PIL decode loops (:mod:`benchmarks.data_bench`)."""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

#: The tiny presets' edit head (experiments/tiny/mgie_e2e.yaml).
TINY_HEAD = {"edit_head_dim": 64, "edit_head_heads": 4, "edit_head_layers": 2, "edit_head_ff": 128}


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
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        choices=["inspix2pix", "mgie", "lgie"],
        help="MGIE Table 4 for these models (only this benchmark runs)",
    )
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--steps", type=int, default=100, help="Table 4's sampler steps")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    parser.add_argument("--out", default=None, help="Table 4: write table4.csv/.md here")
    parser.add_argument(
        "--data",
        action="store_true",
        help="the train loader (512 px JPEG pairs to 256 px) against bare torchvision and PIL "
        "decode-resize-crop loops at 1, 2 and 4 workers (only this benchmark runs)",
    )
    parser.add_argument("--data_images", type=int, default=256)
    parser.add_argument("--output", default=None, help="also write the JSON result here")
    return parser


def main(argv: list[str]) -> int:
    from benchmarks.bench import bench_edit, bench_train_step

    args = build_parser().parse_args(argv)
    path = Path(args.diffusion_path)
    if not path.exists() and path.parent.name == "tiny":
        from editbench.tiny import make_tiny

        make_tiny(path.parent)
    if args.models:
        return table4(args, path)
    if args.data:
        import tempfile

        from benchmarks.data_bench import throughput

        with tempfile.TemporaryDirectory() as tmp:
            rows = throughput(Path(tmp) / "pairs", args.data_images)
        print(json.dumps({"loader": rows}, indent=2))
        return 0
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

        tiny = Path(args.mllm_path).parent.name.startswith("tiny")  # make-tiny folders
        result["mgie_inference"] = bench_mgie_inference(
            Path(args.mllm_path),
            path,
            steps=args.mgie_steps,
            repeats=max(1, args.repeats // 3),
            mgie_ckpt=args.mgie_ckpt,
            no_lins_ckpt=args.no_lins_ckpt,
            head=TINY_HEAD if tiny else None,
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


def table4(args: argparse.Namespace, path: Path) -> int:
    from benchmarks.table4 import bench_table4, to_markdown, write

    tiny = Path(args.mllm_path).parent.name.startswith("tiny")  # make-tiny folders
    rows = bench_table4(
        args.models,
        path,
        Path(args.mllm_path),
        batches=args.batches,
        steps=args.steps,
        repeats=max(1, args.repeats // 3),
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        ckpts={"mgie": args.mgie_ckpt} if args.mgie_ckpt else None,
        head=TINY_HEAD if tiny else None,
    )
    print(to_markdown(rows), end="")
    if args.out:
        for written in write(rows, Path(args.out)):
            print(f"wrote {written}")
    return 0
