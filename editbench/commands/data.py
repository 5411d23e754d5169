"""``python -m editbench data``: write the synthetic dataset or the tiny checkpoints, look at a
configured dataset, write its expressive instructions, or convert the original LLaVA v1 layout."""

from __future__ import annotations

import argparse
import json
import time


def _synth(args: argparse.Namespace) -> int:
    from datamodules.synthetic import generate_synthetic

    start = time.perf_counter()
    root = generate_synthetic(
        args.root,
        num_train=args.num_train,
        num_val=args.num_val,
        num_test=args.num_test,
        resolution=args.resolution,
        seed=args.seed,
    )
    print(f"synthetic dataset at {root} ({time.perf_counter() - start:.1f} s)")
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from editbench.tiny import make_tiny

    kwargs = {} if args.vae_steps is None else {"vae_steps": args.vae_steps}
    manifest = make_tiny(
        args.out, seed=args.seed, resolution=args.resolution, overwrite=args.overwrite, **kwargs
    )
    print(json.dumps(manifest, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m editbench data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="write the seeded synthetic editing dataset")
    synth.add_argument("--root", required=True, help="output folder")
    synth.add_argument("--num_train", type=int, default=4000)
    synth.add_argument("--num_val", type=int, default=200)
    synth.add_argument("--num_test", type=int, default=200)
    synth.add_argument("--resolution", type=int, default=32)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=_synth)

    tiny = sub.add_parser(
        "make-tiny", help="write tiny random checkpoint folders (+ a fitted tiny VAE)"
    )
    tiny.add_argument("--out", required=True, help="output folder")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--resolution", type=int, default=32)
    tiny.add_argument(
        "--vae_steps", type=int, default=None, help="VAE fitting steps (default: make-tiny's)"
    )
    tiny.add_argument("--overwrite", action="store_true")
    tiny.set_defaults(func=_make_tiny)
    for name, text in (
        ("inspect", "per-split counts, fields and a PNG grid of samples"),
        ("verify", "decode every sample; report missing/corrupt files, duplicate ids, counts"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument(
            "-c",
            "--config",
            required=True,
            action="append",
            help="a fit config (its data section is used); several layer in order",
        )
        cmd.add_argument(
            "overrides", nargs="*", help="extra CLI overrides, e.g. --data.init_args.root=DIR"
        )
        if name == "inspect":
            cmd.add_argument("--output", default="inspect.png", help="PNG grid to write")
            cmd.add_argument("--per_split", type=int, default=4)
        else:
            cmd.add_argument("--checksums", default=None, help="write a sha256 manifest here")
            cmd.add_argument("--num_workers", type=int, default=0)
            cmd.add_argument(
                "--splits",
                nargs="+",
                choices=("train", "val", "test"),
                default=["train", "val", "test"],
                help="splits to check (a split that cannot be loaded is a problem)",
            )
            cmd.add_argument(
                "--pair_quality",
                default=None,
                help="write each masked sample's change outside its mask here (JSONL)",
            )
        cmd.set_defaults(func=_inspect_or_verify)

    convert = sub.add_parser(
        "convert-llava",
        help="convert the original LLaVA v1 layout (the MGIE release's LLaVA-7B-v1) to the "
        "llava-hf layout the suite reads",
    )
    convert.add_argument("--src", required=True, help="the original LLaVA v1 folder")
    convert.add_argument(
        "--vision",
        default=None,
        help="local CLIP folder of the vision tower (default: the source's mm_vision_tower "
        "when that is a local folder)",
    )
    convert.add_argument("--out", required=True, help="output folder (llava-hf layout)")
    convert.add_argument(
        "--dtype",
        default=None,
        choices=("float16", "bfloat16", "float32"),
        help="dtype of the written weights (default: the source's)",
    )
    convert.set_defaults(func=_convert_llava)

    from editbench.commands.expressive import add_arguments

    expressive = sub.add_parser(
        "expressive",
        help="expressive instructions as JSONL: MGIE (LLaVA narration + Flan-T5 summary, the "
        "release's process_data) or LGIE (--llm: text-only LLaMA)",
        description="Other --data.* flags override the config, e.g. --data.init_args.root=DIR.",
    )
    add_arguments(expressive)
    expressive.set_defaults(func=_expressive)
    return parser


def _convert_llava(args: argparse.Namespace) -> int:
    from editbench.commands.expressive import CommandInputError
    from models.components.llava_v1 import LlavaConversionError, convert_llava_v1

    try:
        summary = convert_llava_v1(args.src, args.out, vision=args.vision, dtype=args.dtype)
    except LlavaConversionError as err:
        raise CommandInputError(str(err)) from err
    print(json.dumps(summary, indent=2))
    return 0


def _inspect_or_verify(args: argparse.Namespace) -> int:
    from editbench.commands.inspect_data import main as run

    return run(args)


def _expressive(args: argparse.Namespace, overrides: list[str]) -> int:
    from editbench.commands.expressive import run

    return run(args, overrides)


def main(argv: list[str]) -> int:
    parser = build_parser()
    # `expressive` passes the flags it does not know (--data.init_args.root=DIR ...) on to the
    # config parser, in their order.
    args, extra = parser.parse_known_args(argv)
    if args.command == "expressive":
        return args.func(args, extra)
    if args.command in ("inspect", "verify"):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args)
