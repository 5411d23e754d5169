"""``python -m editbench sweep``: the αV trade-off curve of checkpoints (MGIE Fig. 3).

MGIE (Sec. 4.2, "Trade-off between αX and αV"; Fig. 3), following InstructPix2Pix, fixes the
text guidance αX = 7.5 and varies the image guidance αV over [1.0, 2.2]. For every checkpoint
and αV it edits a split's samples and scores

- how far the edit follows the instruction: CLIP directional similarity, the cosine between
  ``img(edit) - img(input)`` and ``text(goal caption) - text(input caption)``;
- how much of the input it keeps: CLIP image similarity of the edit to the input.

Higher αV keeps more of the input and follows the instruction less. The command writes
``sweep.csv`` (one row per checkpoint and αV), ``sweep.png`` (one curve per checkpoint, αV at
the points; axes as Fig. 3: x = directional similarity, y = image similarity) and TensorBoard
scalars under ``tb/<label>`` (step = index of αV). Each sample draws its noise from its id
(:func:`models.base.sample_generators`), so every point of a curve edits from the same noise.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

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


def sweep_loader(dm, split: str, max_samples: int | None, batch_size: int) -> DataLoader:
    """The first ``max_samples`` samples of ``split`` in order, with evaluation transforms."""
    dataset, ids = eval_dataset(dm, split)
    count = len(ids) if max_samples is None else min(max_samples, len(ids))
    if count == 0:
        raise SweepError(f"the {split!r} split has no samples")
    return DataLoader(
        Subset(dataset, range(count)), batch_size=batch_size, collate_fn=dm.collate_fn
    )


def captions(batch: dict, keys: tuple[str, str], split: str) -> tuple[list[str], list[str]]:
    """The input and goal captions of a batch; a sample without one is an error naming it."""
    out = []
    for key in keys:
        values = batch.get(key) or [None] * len(batch["id"])
        missing = [i for i, v in zip(batch["id"], values, strict=True) if v is None]
        if missing:
            raise SweepError(
                f"sample {missing[0]!r} of the {split!r} split has no {key!r}, which the CLIP "
                f"directional similarity needs ({len(missing)} in this batch); give the caption "
                "keys of this dataset with --caption_keys INPUT_KEY,GOAL_KEY"
            )
        out.append(list(values))
    return out[0], out[1]


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def sweep_point(
    model,
    loader: DataLoader,
    clip: str,
    guidance_scale: float,
    image_guidance_scale: float,
    *,
    num_inference_steps: int | None,
    seed: int,
    caption_keys: tuple[str, str],
    split: str,
) -> dict[str, float]:
    """Edit every sample at (αX, αV) and return the mean CLIP directional and image
    similarities (MGIE Fig. 3's two axes) and the number of samples."""
    from metrics.features import CLIPDirectionalSimilarity, CLIPImageSimilarity
    from models.base import sample_generators

    direction, image = CLIPDirectionalSimilarity(clip), CLIPImageSimilarity(clip)
    direction, image = direction.to(model.device), image.to(model.device)
    for batch in loader:
        if not batch["id"]:  # every sample of the batch was skipped
            continue
        source_captions, goal_captions = captions(batch, caption_keys, split)
        source = batch["source"].to(model.device)
        edited = model.edit(
            source,
            batch["instruction"],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            image_guidance_scale=image_guidance_scale,
            generator=sample_generators(batch["id"], seed),
        ).images
        edited = edited.float().clamp(-1, 1)
        direction.update(source, edited, source_captions, goal_captions)
        image.update(source, edited)
    return {
        "clip_direction": float(direction.compute()),
        "clip_image": float(image.compute()),
        "num_samples": int(image.num_images),
    }


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


def run_sweep(args: argparse.Namespace, overrides: Sequence[str]) -> list[dict]:
    """Every (checkpoint, αV) point, in order; writes nothing."""
    from tqdm.auto import tqdm

    from metrics.features import CLIPImageSimilarity

    paths = [Path(p) for p in args.ckpt_path]
    labels = labels_for(paths, args.label)
    if args.max_samples is not None and args.max_samples < 1:
        raise SweepError("--max_samples must be at least 1")
    for path in paths:  # fail before hours of editing, not after
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} not found")
    CLIPImageSimilarity(args.clip)  # names the folder and what belongs there if it is wrong
    scales = args.image_guidance_scales or args.range
    rows = []
    with tqdm(total=len(paths) * len(scales), desc="sweep", unit="point") as bar:
        for path, label in zip(paths, labels, strict=True):
            rows += sweep_checkpoint(path, label, scales, args, overrides, bar)
    return rows


def sweep_checkpoint(
    path: Path,
    label: str,
    scales: Sequence[float],
    args: argparse.Namespace,
    overrides: Sequence[str],
    bar,
) -> list[dict]:
    """The rows of one checkpoint, one per αV."""
    from editbench.commands.edit import load_checkpoint_model

    model, data_hparams = load_checkpoint_model(path, args.device)
    dm = sweep_datamodule(args.config, data_hparams, overrides)
    loader = sweep_loader(dm, args.split, args.max_samples, args.batch_size)
    rows = []
    for alpha_v in scales:
        point = sweep_point(
            model,
            loader,
            args.clip,
            args.guidance_scale,
            alpha_v,
            num_inference_steps=args.num_inference_steps,
            seed=args.seed,
            caption_keys=args.caption_keys,
            split=args.split,
        )
        rows.append(
            {
                "label": label,
                "ckpt": str(path),
                "guidance_scale": args.guidance_scale,
                "image_guidance_scale": alpha_v,
                **point,
            }
        )
        bar.update()
    return rows


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
