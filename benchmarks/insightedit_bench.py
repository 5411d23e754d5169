"""Tiny InsightEdit's training-step time relative to tiny MGIE's (issue 14, item 10).

Both models are built from their tiny presets' model arguments (``experiments/tiny/
insightedit.yaml``, ``experiments/tiny/mgie_e2e.yaml``) on one ``make-tiny`` folder, with every
stage-3 group of InsightEdit training (LoRA, new token rows, Q-Former, BIM, IAA, UNet) and MGIE
end to end; one optimizer step each on the same synthetic batch, interleaved in one process so
machine load affects both alike (:func:`benchmarks.bench._interleaved`). The ratio is
InsightEdit's median step time over MGIE's.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from benchmarks.bench import _interleaved, _summary

REPO = Path(__file__).resolve().parents[1]


def _preset_args(name: str, tiny: Path) -> dict:
    args = yaml.safe_load((REPO / "experiments" / "tiny" / name).read_text())["model"]["init_args"]
    args = {k: v for k, v in args.items() if k not in ("stages", "unet_init_from")}
    args["mllm_path"] = str(tiny / "llava")
    args["diffusion_path"] = str(tiny / "instruct-pix2pix")
    if "clip_path" in args:
        args["clip_path"] = str(tiny / "clip")
    return args


def _batch(batch_size: int, resolution: int) -> dict:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, batch_size, 3, resolution, resolution, generator=g) * 2 - 1
    return {
        "id": [f"b{i}" for i in range(batch_size)],
        "source": images[0],
        "target": images[1],
        "instruction": ["make the red circle blue"] * batch_size,
        "expressive": ["the circle turns blue"] * batch_size,
    }


def bench_insightedit_step(
    tiny: str | Path, batch_size: int = 8, repeats: int = 5, warmup: int = 1
) -> dict:
    """Median seconds of one training step (forward, backward, AdamW) of tiny InsightEdit
    (``insightedit_s``) and tiny MGIE (``mgie_s``) and their ``ratio``."""
    from models.insightedit import InsightEdit
    from models.mgie import MGIE

    tiny = Path(tiny)
    torch.manual_seed(0)
    insight = InsightEdit(**_preset_args("insightedit.yaml", tiny))
    insight.configure_model()
    mgie = MGIE(**_preset_args("mgie_e2e.yaml", tiny))
    mgie.configure_model()
    resolution = 32
    data = _batch(batch_size, resolution)

    def stepper(model):
        model.train()
        params = [p for g in model.param_groups() for p in g["params"]]
        optimizer = torch.optim.AdamW(params, lr=1e-5)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            losses = model.training_losses(data, generator=torch.Generator().manual_seed(0))
            losses["loss"].backward()
            optimizer.step()

        return step

    times = _interleaved(
        {"insightedit": stepper(insight), "mgie": stepper(mgie)}, repeats=repeats, warmup=warmup
    )
    return _summary(times, "insightedit", "mgie") | {"batch_size": batch_size}
