"""Can the Q-Former read the instruction out of the tiny InsightEdit's [MM] states h?

The probe behind the README's "Tiny MMIG and tiny InsightEdit" table: h of the untrained tiny
InsightEdit (random 32-wide LLaVA, ``experiments/tiny/insightedit.yaml``) for 640 training
samples, 512 to fit and 128 held out, and the alignment target (the quickstart CLIP text
encoder's features of the instruction). It reports the held-out MSE of the per-position mean of
the target (no input), of a ridge regression from flattened h, and of the Q-Former (the
preset's text stream, trained alone for 300 steps at batch 64 with AdamW) reading h prepared in
one of three ways: ``none`` (as is), ``feature`` (each feature standardised over the training h,
pooled over the slots) or ``slot`` (each feature of each slot on its own, what
``text_stream.standardize_h`` does).

    python -m editbench fit -c experiments/quickstart.yaml   # the UNet/CLIP text it starts from
    python benchmarks/qformer_probe.py --prepare slot --lr 5e-3 [--num_mm_tokens 8]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from editbench.cli import EditbenchCLI  # noqa: E402

CONFIG = "experiments/tiny/insightedit.yaml"


def collect(num_mm_tokens: int, batches: int) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    """h ``[N, r, H]``, the alignment targets ``[N, 77, D]`` and the untrained text stream."""
    cli = EditbenchCLI(
        args=[
            "-c", CONFIG,
            "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks", "[]",
            "--trainer.enable_checkpointing", "false",
            "--model.init_args.num_mm_tokens", str(num_mm_tokens),
        ],
        run=False,
    )  # fmt: skip
    model, data = cli.model, cli.datamodule
    model.configure_model()
    model.eval()
    data.setup("fit")
    loader = iter(data.train_dataloader())
    hs, targets = [], []
    with torch.no_grad():
        for _ in range(batches):
            batch = next(loader)
            hs.append(model.comprehend(batch["source"], batch["instruction"])[0])
            targets.append(model.align_targets(batch))
    stream = copy.deepcopy(model.text_stream)
    stream.h_norm = None  # the probe prepares h itself
    return torch.cat(hs), torch.cat(targets), stream


def prepare(h: torch.Tensor, fit: int, how: str) -> torch.Tensor:
    if how == "none":
        return h
    ref = h[:fit] if how == "slot" else h[:fit].flatten(0, 1)
    return (h - ref.mean(0)) / (ref.std(0) + 1e-5)


def ridge_mse(h: torch.Tensor, target: torch.Tensor, fit: int, lam: float = 1.0) -> float:
    x = torch.cat([h.flatten(1), torch.ones(len(h), 1)], 1)
    y = target.flatten(1)
    w = torch.linalg.solve(x[:fit].T @ x[:fit] + lam * torch.eye(x.shape[1]), x[:fit].T @ y[:fit])
    return F.mse_loss(x[fit:] @ w, y[fit:]).item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepare", choices=("none", "feature", "slot"), default="slot")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--num_mm_tokens", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    h, target, stream = collect(args.num_mm_tokens, batches=10)
    fit = 512
    h_raw, h = h, prepare(h, fit, args.prepare)
    mean_mse = F.mse_loss(target[:fit].mean(0).expand_as(target[fit:]), target[fit:]).item()
    stream.train()
    params = [*stream.qformer.parameters(), stream.query]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    for _ in range(args.steps):
        idx = torch.randint(0, fit, (64,))
        loss = F.mse_loss(stream.qformer_output(h[idx]), target[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    stream.eval()
    with torch.no_grad():
        held_out = F.mse_loss(stream.qformer_output(h[fit:]), target[fit:]).item()
    print(f"per-position mean of the target (held out): {mean_mse:.3f}")
    print(f"ridge from flattened h (held out):         {ridge_mse(h_raw, target, fit):.3f}")
    print(f"Q-Former on h ({args.prepare}, lr {args.lr:g}, held out): {held_out:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
