"""GPU paths of the diffusion core on the tiny checkpoint: bf16 autocast training, SDPA
attention, ``torch.compile`` of the UNet, and sampling in bf16 against fp32.

    python benchmarks/device_check.py --diffusion_path .cache/editbench/tiny/instruct-pix2pix

Prints one JSON object; exits non-zero if a check fails. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.inspix2pix import InsPix2Pix  # noqa: E402


def timed(fn, repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--diffusion_path", default=".cache/editbench/tiny/instruct-pix2pix")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    device = torch.device("cuda")
    model = InsPix2Pix(diffusion_path=args.diffusion_path)
    model.configure_model()
    model.to(device).train()
    processors = {type(p).__name__ for p in model.diffusion.unet.attn_processors.values()}
    g = torch.Generator(device="cpu").manual_seed(0)
    src = (torch.rand(args.batch, 3, 32, 32, generator=g) * 2 - 1).to(device)
    tgt = (torch.rand(args.batch, 3, 32, 32, generator=g) * 2 - 1).to(device)
    batch = {"source": src, "target": tgt, "instruction": ["make the red circle blue"] * args.batch}
    opt = torch.optim.AdamW([p for grp in model.param_groups() for p in grp["params"]], lr=1e-4)

    def step(dtype):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            loss = model.training_losses(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "attn_processors": sorted(processors)}
    results["bf16_loss_finite"] = bool(torch.isfinite(step(torch.bfloat16)).item())
    results["step_s_fp32"] = timed(lambda: step(torch.float32))
    results["step_s_bf16"] = timed(lambda: step(torch.bfloat16))

    model.eval()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    kw = {"num_inference_steps": 20, "guidance_scale": 7.5, "image_guidance_scale": 1.5}
    ref = model.edit(src[:8], batch["instruction"][:8], generator=gen(), **kw).images.float()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = model.edit(src[:8], batch["instruction"][:8], generator=gen(), **kw).images.float()
    results["edit_bf16_vs_fp32_max_abs"] = (low - ref).abs().max().item()
    results["edit_bf16_vs_fp32_mean_abs"] = (low - ref).abs().mean().item()

    eager_unet = model.diffusion.unet
    x = torch.randn(8, 8, 16, 16, device=device)
    text = torch.randn(8, 77, eager_unet.config.cross_attention_dim, device=device)
    with torch.no_grad():
        eager = eager_unet(x, 10, encoder_hidden_states=text).sample
        compiled_unet = torch.compile(eager_unet)
        compiled = compiled_unet(x, 10, encoder_hidden_states=text).sample
    results["compile_vs_eager_max_abs"] = (compiled - eager).abs().max().item()
    model.diffusion.unet = compiled_unet
    results["edit_s_eager"] = None
    results["edit_s_compiled"] = timed(lambda: model.edit(src[:8], batch["instruction"][:8], generator=gen(), **kw), 5)
    model.diffusion.unet = eager_unet
    results["edit_s_eager"] = timed(lambda: model.edit(src[:8], batch["instruction"][:8], generator=gen(), **kw), 5)
    results["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(results, indent=2))
    ok = (
        results["bf16_loss_finite"]
        and results["compile_vs_eager_max_abs"] < 5e-3
        and results["edit_bf16_vs_fp32_mean_abs"] < 0.05
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
