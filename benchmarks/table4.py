"""MGIE Table 4: seconds per edit at batch 1, 4 and 8, split into the MLLM's guidance and the
diffusion sampling, with peak memory, beside the paper's A100 numbers.

Each model's ``edit`` is ``conditions`` (InsPix2Pix: the CLIP text encoder; MGIE/LGIE: the
MLLM's generation, the [IMG] hidden states and the edit head) followed by ``render`` (the
sampler's UNet steps and the VAE decode); the two are timed separately on the same inputs, so
the split is the models' own and the sum is one ``edit``. Timings are medians of ``repeats``
interleaved runs after a warm-up, in one process; peak memory is
``torch.cuda.max_memory_allocated`` per phase on a GPU and the process's peak RSS on a CPU
(process-wide, so only the largest batch's value is meaningful there).

On the CPU it runs on the tiny checkpoints (``make-tiny`` folders, or trained ones with
``--ckpt``); on a GPU pass real or random-weight folders of the paper's shapes with
``--device cuda --dtype bfloat16 [--compile]``.

    python -m editbench benchmark --models inspix2pix mgie --batches 1 4 8 --out benchmarks/out
"""

from __future__ import annotations

import csv
import io
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

#: MGIE Table 4, seconds per edit on an A100 at batch 1 / 4 / 8.
PAPER_SECONDS = {
    "inspix2pix": {1: 6.8, 4: 16.5, 8: 31.5},
    "mgie": {1: 9.2, 4: 20.6, 8: 36.9},
}
MODELS = ("inspix2pix", "mgie", "lgie")


def build_model(
    name: str,
    diffusion_path: Path,
    mllm_path: Path | None = None,
    ckpt: str | None = None,
    head: dict | None = None,
    **kwargs,
):
    """The model ``name`` from its folders (and trained weights from ``ckpt``), in eval mode."""
    from models.checkpoint import read_checkpoint
    from models.inspix2pix import InsPix2Pix
    from models.mgie import LGIE, MGIE

    torch.manual_seed(0)
    if name == "inspix2pix":
        model = InsPix2Pix(diffusion_path=str(diffusion_path), **kwargs)
    elif name in ("mgie", "lgie"):
        cls = MGIE if name == "mgie" else LGIE
        model = cls(mllm_path=str(mllm_path), diffusion_path=str(diffusion_path), **(head or {}), **kwargs)
    else:
        raise ValueError(f"unknown model {name!r}: one of {MODELS}")
    model.configure_model()
    if ckpt is not None:
        model.load_weights_from(read_checkpoint(ckpt, what="benchmark checkpoint"))
    return model.eval()


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def time_edit(
    model,
    batch: int,
    *,
    steps: int,
    repeats: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Median seconds of ``conditions`` and ``render`` at ``batch``, and peak memory of each."""
    diffusion = model.diffusion
    size = diffusion.unet.config.sample_size * 2 ** (len(diffusion.vae.config.block_out_channels) - 1)
    source = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    source = source.to(device)
    prompts = ["make the red circle blue"] * batch
    sampler = {"num_inference_steps": steps, "guidance_scale": 7.5, "image_guidance_scale": 1.5}
    times: dict[str, list[float]] = {"guidance": [], "diffusion": []}
    peaks: dict[str, float] = {}
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with torch.no_grad(), autocast:
        for i in range(repeats + 1):  # the first is the warm-up
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t_cond, (cond, null, _) = _timed(lambda: model.conditions(source, prompts), device)
            peaks["guidance"] = _peak_mib(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            def render(cond=cond, null=null):
                generator = torch.Generator().manual_seed(0)
                return model.render(source, cond, null, generator=generator, **sampler)

            t_render, _ = _timed(render, device)
            peaks["diffusion"] = _peak_mib(device)
            if i:
                times["guidance"].append(t_cond)
                times["diffusion"].append(t_render)
    guidance, render = (statistics.median(times[k]) for k in ("guidance", "diffusion"))
    return {
        "batch": batch,
        "guidance_s": guidance,
        "diffusion_s": render,
        "total_s": guidance + render,
        "peak_guidance_mib": peaks["guidance"],
        "peak_diffusion_mib": peaks["diffusion"],
    }


def bench_table4(
    models: Sequence[str],
    diffusion_path: Path,
    mllm_path: Path | None,
    *,
    batches: Sequence[int] = (1, 4, 8),
    steps: int = 100,
    repeats: int = 3,
    device: str = "cpu",
    dtype: str = "float32",
    compile: bool = False,
    ckpts: dict[str, str] | None = None,
    head: dict | None = None,
) -> list[dict]:
    """One row per (model, batch): seconds (guidance, diffusion, total), peak memory and the
    paper's A100 seconds where Table 4 has them."""
    target = torch.device(device)
    torch_dtype = getattr(torch, dtype)
    rows = []
    for name in models:
        model = build_model(name, diffusion_path, mllm_path, (ckpts or {}).get(name), head)
        model.to(target)
        if compile:
            model.diffusion.unet = torch.compile(model.diffusion.unet)
        for batch in batches:
            row = {"model": name, "device": device, "dtype": dtype, "steps": steps}
            row |= time_edit(
                model, batch, steps=steps, repeats=repeats, device=target, dtype=torch_dtype
            )
            row["paper_a100_s"] = PAPER_SECONDS.get(name, {}).get(batch)
            rows.append(row)
        del model
    return rows


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def to_markdown(rows: list[dict]) -> str:
    lines = [
        "| model | batch | guidance s | diffusion s | total s | paper A100 s | peak MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        paper = "" if r["paper_a100_s"] is None else f"{r['paper_a100_s']:.1f}"
        peak = max(r["peak_guidance_mib"], r["peak_diffusion_mib"])
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['guidance_s']:.3f} | {r['diffusion_s']:.3f} | "
            f"{r['total_s']:.3f} | {paper} | {peak:.0f} |"
        )
    return "\n".join(lines) + "\n"


def write(rows: list[dict], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "table4.csv", out / "table4.md"
    csv_path.write_text(to_csv(rows))
    md_path.write_text(to_markdown(rows))
    return csv_path, md_path
