"""``python -m editbench demo``: an interactive editing page (Gradio) for any checkpoint or
config, served on this machine.

    python -m editbench demo --ckpt_path runs/quickstart/checkpoints/last.ckpt
    python -m editbench demo -c experiments/quickstart.yaml        # untrained / released model
    python -m editbench demo --ckpt_path A.ckpt B.ckpt --port 7861  # A and B in the compare tab

Tabs: edit (upload or pick an example from the synthetic test split, instruction, αV, αX,
steps, seed, λ for InsightEdit; the result at the input's size, the expressive instruction or
caption the model makes, the time), grid (αV x αX for one image, MGIE Fig. 3) and compare (two
models, same input and seed). Models are loaded once (a small cache keyed by path); one edit
per device at a time (Gradio's queue). Nothing is fetched: ``GRADIO_ANALYTICS_ENABLED=False``,
the page's assets are served by the app itself, and ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import argparse
import os

import torch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m editbench demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_argument_group("model (one of)")
    source.add_argument(
        "--ckpt_path", nargs="+", default=[], help="checkpoints written by `fit` (the first is "
        "the edit tab's model; all are offered in the compare tab)",
    )  # fmt: skip
    source.add_argument(
        "-c", "--config", action="append", default=[], help="a LightningCLI config (repeat to "
        "layer, as with `fit`): its model is built untrained or from its released *_path folders",
    )  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--precision", choices=["auto", "bf16", "fp32"], default="auto",
        help="model weights' precision (auto: bf16 on a GPU, fp32 on the CPU)",
    )  # fmt: skip
    parser.add_argument(
        "--resolution", type=int, default=None,
        help="shorter side fed to the model (default: the training data's)",
    )  # fmt: skip
    parser.add_argument(
        "--examples", default=None, help="a synthetic dataset folder for the gallery (default: "
        "the model's synthetic data, else 8 samples generated into a temporary folder)",
    )  # fmt: skip
    parser.add_argument("--num_examples", type=int, default=8)
    parser.add_argument(
        "--cache_size", type=int, default=3, help="models kept loaded (compare tab)"
    )
    return parser


def model_specs(args: argparse.Namespace) -> list[str]:
    """What names each model: checkpoint paths, then the layered configs as one entry."""
    from editbench.demo.engine import ModelCache

    specs = list(args.ckpt_path)
    if args.config:
        specs.append(ModelCache.key(args.config))
    return specs


def create_app(args: argparse.Namespace):
    """The model cache (the first model loaded), the gallery examples and the Blocks app."""
    from editbench.demo.app import build_app
    from editbench.demo.engine import DemoInputError, ModelCache, example_root, synthetic_examples

    specs = model_specs(args)
    if not specs:
        raise DemoInputError("give a model: --ckpt_path CKPT or -c CONFIG")
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if str(args.device).startswith("cuda") else "fp32"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    cache = ModelCache(args.device, dtype, args.resolution, capacity=max(2, args.cache_size))
    main_model = cache.get(specs[0])
    root = example_root(cache.data_hparams(specs[0]), args.examples, main_model.resolution)
    examples = synthetic_examples(root, args.num_examples)
    app = build_app(cache, specs, examples)
    return app, cache, [str(root)]


def main(argv: list[str]) -> int:
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    from editbench.commands.expressive import CommandInputError
    from editbench.demo.engine import DemoInputError

    try:
        app, _, allowed = create_app(args)
    except DemoInputError as err:
        raise CommandInputError(str(err)) from None
    app.launch(
        server_name=args.host,
        server_port=args.port,
        allowed_paths=allowed,
        ssr_mode=False,
        share=False,
        inbrowser=False,
        footer_links=["api", "settings"],
        max_file_size="200mb",  # refused by Gradio at upload; 64 MP is checked before decoding
    )
    return 0
