"""``python -m editbench sweep``: the αV trade-off curve of checkpoints (MGIE Fig. 3).

MGIE (Sec. 4.2, "Trade-off between αX and αV"; Fig. 3), following InstructPix2Pix, fixes the
text guidance αX = 7.5 and varies the image guidance αV over [1.0, 2.2]. For every checkpoint
and αV the sweep runs the suite's ``test`` (the same LightningCLI path, per-sample noise from
the sample ids, evaluator and results document) on a split's first samples, scoring

- how far the edit follows the instruction: ``CLIP_direction``, the cosine between
  ``img(edit) - img(input)`` and ``text(goal caption) - text(input caption)``;
- how much of the input it keeps: ``CLIP_image``, the CLIP image similarity to the input.

Each grid point writes its ``test_metrics.json`` (and the run's ``config.yaml``) into its own
folder, ``<out>/runs/<label>/ig_<αV>/``; the summary is built from those files only:
``sweep.csv`` (one row per checkpoint and αV), ``sweep.png`` (one curve per checkpoint, αV at
the points; axes as Fig. 3: x = directional similarity, y = image similarity) and TensorBoard
scalars under ``tb/<label>`` (step = index of αV). Higher αV keeps more of the input and follows
the instruction less; every point of a curve edits from the same per-sample noise
(:func:`models.base.sample_generators`).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from editbench.commands.expressive import (
    CommandInputError,
    datamodule_from_config,
    datamodule_from_spec,
    eval_dataset,
)

#: Columns of ``sweep.csv``.
CSV_FIELDS = (
    "label",
    "ckpt",
    "guidance_scale",
    "image_guidance_scale",
    "clip_direction",
    "clip_image",
    "num_samples",
)
#: Sample keys of the input and goal captions the directional similarity needs.
CAPTION_KEYS = ("source_caption", "goal_caption")
#: At most this many αV values (a typo such as 1:2:0.0001 would otherwise run for days).
MAX_POINTS = 200


class SweepError(CommandInputError):
    """A problem with the sweep's arguments or data (printed as one line, exit 2)."""


# --------------------------------------------------------------------------- arguments


def parse_scales(text: str) -> list[float]:
    """``"1.0,1.2,1.5"`` → ``[1.0, 1.2, 1.5]`` (finite values, at least one)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 1.0,1.5,2.0, got {text!r}"
        ) from None
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


def parse_range(text: str) -> list[float]:
    """``"START:STOP:STEP"`` → START, START+STEP, ... up to STOP inclusive (``1.0:2.2:0.2``
    gives MGIE Fig. 3's seven values); values are rounded to 10 decimals so that 1.0 + 3 * 0.2
    is 1.6, not 1.6000000000000003."""
    parts = text.split(":")
    try:
        start, stop, step = (float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected START:STOP:STEP such as 1.0:2.2:0.2, got {text!r}"
        ) from None
    if not all(math.isfinite(v) for v in (start, stop, step)) or step <= 0 or stop < start:
        raise argparse.ArgumentTypeError(
            f"expected START <= STOP and STEP > 0 (finite), got {text!r}"
        )
    count = math.floor((stop - start) / step + 1e-9) + 1
    if count > MAX_POINTS:
        raise argparse.ArgumentTypeError(f"{text!r} gives {count} values (at most {MAX_POINTS})")
    return [round(start + i * step, 10) for i in range(count)]


def parse_caption_keys(text: str) -> tuple[str, str]:
    """``"source_caption,goal_caption"`` → the two sample keys."""
    keys = tuple(k.strip() for k in text.split(","))
    if len(keys) != 2 or not all(keys):
        raise argparse.ArgumentTypeError(f"expected INPUT_KEY,GOAL_KEY, got {text!r}")
    return keys  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m editbench sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Other --data.* flags override the data (of -c, or of each checkpoint).",
    )
    parser.add_argument("--ckpt_path", nargs="+", required=True, help="checkpoints of `fit`")
    parser.add_argument("--label", nargs="+", default=None, help="one name per checkpoint")
    parser.add_argument(
        "-c", "--config", default=None, help="a fit config for the data (default: each ckpt's)"
    )
    scales = parser.add_mutually_exclusive_group(required=True)
    scales.add_argument("--image_guidance_scales", type=parse_scales, help="αV list: 1.0,1.5")
    scales.add_argument("--range", type=parse_range, help="αV START:STOP:STEP, e.g. 1.0:2.2:0.2")
    parser.add_argument("--guidance_scale", type=float, default=7.5, help="αX, fixed")
    parser.add_argument("--clip", required=True, help="local CLIP folder (CLIPModel + processor)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--max_samples", type=int, default=None, help="first N samples")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="default: model's")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument(
        "--caption_keys",
        type=parse_caption_keys,
        default=CAPTION_KEYS,
        help="sample keys of the input and goal captions (default: source_caption,goal_caption)",
    )
    parser.add_argument("--out", default="sweep", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-sample noise")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def default_labels(paths: Sequence[Path]) -> list[str]:
    """File stems, or the paths below their common folder where stems repeat (two
    ``last.ckpt``)."""
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    resolved = [p.resolve() for p in paths]
    common = Path(os.path.commonpath(resolved)) if len(resolved) > 1 else resolved[0].parent
    return [str(p.relative_to(common).with_suffix("")) for p in resolved]


def labels_for(paths: Sequence[Path], labels: Sequence[str] | None) -> list[str]:
    """One unique label per checkpoint (used as TensorBoard run names)."""
    labels = list(labels) if labels else default_labels(paths)
    if len(labels) != len(paths):
        raise SweepError(f"{len(labels)} --label values for {len(paths)} checkpoints")
    if len(set(labels)) != len(labels):
        raise SweepError(f"--label values must be unique, got {labels}")
    return labels


# --------------------------------------------------------------------------- data


def sweep_datamodule(config: str | None, data_hparams: dict, overrides: Sequence[str]):
    """The data of ``-c`` (plus overrides), else the checkpoint's own datamodule."""
    if config is not None:
        return datamodule_from_config(config, overrides)
    hparams = {k: v for k, v in data_hparams.items() if k != "_instantiator"}
    class_path = hparams.pop("_class_path", None)
    if not class_path:
        raise SweepError("the checkpoint has no datamodule hyperparameters; give the data with -c")
    return datamodule_from_spec({"class_path": class_path, "init_args": hparams}, overrides)


def check_caption_keys(dm, split: str, keys: tuple[str, str]) -> None:
    """The first sample of ``split`` has both caption keys, which ``CLIP_direction`` reads (a
    missing one is an error naming it, before any editing)."""
    if split != "test":
        raise SweepError(
            f"--split {split}: the sweep runs `test`, which edits the test split; point the "
            "data at the samples to sweep (e.g. a --data.init_args.root with them as its test split)"
        )
    dataset, ids = eval_dataset(dm, split)
    if not len(ids):
        raise SweepError(f"the {split!r} split has no samples")
    sample = dataset[0]
    for key in keys:
        if sample.get(key) is None:
            raise SweepError(
                f"sample {ids[0]!r} of the {split!r} split has no {key!r}, which the CLIP "
                "directional similarity needs; give the caption keys of this dataset with "
                "--caption_keys INPUT_KEY,GOAL_KEY"
            )
    if tuple(keys) != CAPTION_KEYS:
        raise SweepError(
            f"--caption_keys {','.join(keys)}: the test protocol's CLIP_direction reads the "
            f"samples' {CAPTION_KEYS[0]!r} and {CAPTION_KEYS[1]!r}; give the data those fields"
        )


# --------------------------------------------------------------------------- one grid point


def point_folder(out: Path, label: str, image_guidance_scale: float) -> Path:
    """``<out>/runs/<label>/ig_<αV>``: where one grid point's ``test`` writes its files."""
    return out / "runs" / label.replace(os.sep, "_") / f"ig_{image_guidance_scale:g}"


def trainer_device_args(device: str) -> list[str]:
    """``--device cpu`` / ``cuda`` / ``cuda:N`` as Trainer flags (one process)."""
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return ["--trainer.accelerator", "cpu", "--trainer.devices", "1"]
    if kind == "cuda":
        return ["--trainer.accelerator", "gpu", "--trainer.devices", f"[{index}]" if index else "1"]
    raise SweepError(f"--device must be cpu, cuda or cuda:N, got {device!r}")


def point_args(
    ckpt: Path,
    folder: Path,
    args: argparse.Namespace,
    image_guidance_scale: float,
    data: list[str],
    overrides: Sequence[str],
) -> list[str]:
    """The ``python -m editbench test`` arguments of one grid point: the checkpoint's model
    (its data unless ``data`` replaces it) at (αX, αV), scored with ``CLIP_direction`` and
    ``CLIP_image`` on ``args.clip``, writing into ``folder``."""
    argv = ["test", "--ckpt_path", str(ckpt), *data]
    model = {
        "guidance_scale": args.guidance_scale,
        "image_guidance_scale": image_guidance_scale,
        "eval_seed": args.seed,
        "metrics": json.dumps(["CLIP_direction", "CLIP_image"]),
        "extra_metrics": "[]",
        "backbones": json.dumps({"clip": str(args.clip)}),
        "copy_baseline": "false",
    }
    if args.num_inference_steps is not None:
        model["num_inference_steps"] = args.num_inference_steps
    for key, value in model.items():
        argv += [f"--model.init_args.{key}", str(value)]
    argv += ["--data.init_args.eval_batch_size", str(args.batch_size)]
    if args.max_samples is not None:
        argv += ["--data.init_args.max_samples", str(args.max_samples)]
    argv += [
        "--trainer.logger", "false",
        "--trainer.default_root_dir", str(folder),
        "--trainer.enable_progress_bar", "false",
        "--image_logger.every_n_steps", "0",
        *trainer_device_args(args.device),
        *overrides,
    ]  # fmt: skip
    return argv


def read_point(folder: Path) -> dict:
    """The sweep columns of one grid point's ``test_metrics.json``."""
    path = folder / "test_metrics.json"
    if not path.is_file():
        raise SweepError(f"`test` wrote no {path}")
    document = json.loads(path.read_text())
    metrics = document["metrics"]
    return {
        "clip_direction": float(metrics["test/CLIP_direction"]),
        "clip_image": float(metrics["test/CLIP_image"]),
        "num_samples": int(document["protocol"]["num_samples"]),
    }


def run_point(argv: list[str], folder: Path) -> dict:
    """Run ``test`` in this process (exactly as ``python -m editbench test``) and read back its
    results file."""
    from editbench.cli import main as cli_main

    folder.mkdir(parents=True, exist_ok=True)
    stale = folder / "test_metrics.json"
    if stale.exists():  # a rerun must not read the previous run's numbers
        stale.unlink()
    status = cli_main(argv)
    if status:
        raise SweepError(f"`python -m editbench {' '.join(argv)}` failed (exit {status})")
    return read_point(folder)


# --------------------------------------------------------------------------- outputs


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows({k: row[k] for k in CSV_FIELDS} for row in rows)


def plot_curves(rows: list[dict], path: Path, guidance_scale: float) -> None:
    """MGIE Fig. 3: x = CLIP directional similarity, y = CLIP image similarity, one curve per
    checkpoint with its αV values written at the points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for label in dict.fromkeys(r["label"] for r in rows):
        points = [r for r in rows if r["label"] == label]
        x = [r["clip_direction"] for r in points]
        y = [r["clip_image"] for r in points]
        ax.plot(x, y, marker="o", label=label)
        for r in points:
            ax.annotate(
                f"{r['image_guidance_scale']:g}",
                (r["clip_direction"], r["clip_image"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
    ax.set_xlabel("CLIP directional similarity (follows the edit)")
    ax.set_ylabel("CLIP image similarity (keeps the input)")
    ax.set_title(f"αV sweep at αX = {guidance_scale:g}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_tensorboard(rows: list[dict], folder: Path) -> None:
    """``sweep/clip_direction``, ``sweep/clip_image`` and ``sweep/image_guidance_scale`` per
    label (one run folder each), at step = index of αV."""
    from torch.utils.tensorboard import SummaryWriter

    for label in dict.fromkeys(r["label"] for r in rows):
        run = folder / label.replace(os.sep, "_")
        for old in run.glob("events.out.tfevents.*"):  # a rerun replaces, as sweep.csv does
            old.unlink()
        writer = SummaryWriter(log_dir=str(run))
        points = [r for r in rows if r["label"] == label]
        for step, r in enumerate(points):
            for key in ("clip_direction", "clip_image", "image_guidance_scale"):
                writer.add_scalar(f"sweep/{key}", r[key], step)
        writer.close()


# --------------------------------------------------------------------------- command


def config_data(config: str) -> list[str]:
    """``--data <spec>`` of a config's data section (``-c`` supplies only the data; its model
    is the checkpoint's)."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(OmegaConf.load(config), resolve=True).get("data")
    if not data:
        raise SweepError(f"{config} has no data section")
    return ["--data", json.dumps(data)]


def run_sweep(args: argparse.Namespace, overrides: Sequence[str]) -> list[dict]:
    """Every (checkpoint, αV) point, in order: one ``test`` run each, into
    ``<out>/runs/<label>/ig_<αV>``; returns the rows read from their results files."""
    from metrics.features import CLIPImageSimilarity
    from models.checkpoint import read_checkpoint

    paths = [Path(p) for p in args.ckpt_path]
    labels = labels_for(paths, args.label)
    if args.max_samples is not None and args.max_samples < 1:
        raise SweepError("--max_samples must be at least 1")
    for path in paths:  # fail before hours of editing, not after
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} not found")
    CLIPImageSimilarity(args.clip)  # names the folder and what belongs there if it is wrong
    trainer_device_args(args.device)
    data = config_data(args.config) if args.config is not None else []
    scales = args.image_guidance_scales or args.range
    out = Path(args.out)
    rows = []
    for path, label in zip(paths, labels, strict=True):
        hparams = read_checkpoint(path, what="--ckpt_path").datamodule_hparams
        dm = sweep_datamodule(args.config, hparams, [*overrides, *max_samples_override(args)])
        check_caption_keys(dm, args.split, args.caption_keys)
        for alpha_v in scales:
            folder = point_folder(out, label, alpha_v)
            argv = point_args(path, folder, args, alpha_v, data, overrides)
            rows.append(
                {
                    "label": label,
                    "ckpt": str(path),
                    "guidance_scale": args.guidance_scale,
                    "image_guidance_scale": alpha_v,
                    **run_point(argv, folder),
                }
            )
    return rows


def max_samples_override(args: argparse.Namespace) -> list[str]:
    return [] if args.max_samples is None else [f"--data.init_args.max_samples={args.max_samples}"]


def main(argv: list[str]) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-") and not o.startswith("--data")]
    if bad or (overrides and not overrides[0].startswith("--data")):
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    try:
        rows = run_sweep(args, overrides)
    except CommandInputError as err:
        if os.environ.get("EDITBENCH_TRACEBACK"):
            raise
        print(f"editbench: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "sweep.csv")
    plot_curves(rows, out / "sweep.png", args.guidance_scale)
    write_tensorboard(rows, out / "tb")
    for r in rows:
        print(
            f"{r['label']}  αV={r['image_guidance_scale']:g}  "
            f"clip_direction={r['clip_direction']:.4f}  clip_image={r['clip_image']:.4f}"
        )
    print(f"wrote {out / 'sweep.csv'}, {out / 'sweep.png'} and {out / 'tb'}")
    return 0
