"""``python -m editbench export`` (issue 16 item 6): the trained parts of a real ``fit``
checkpoint as safetensors, reloadable into the plain library modules, with hashes anyone can
recompute."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from cli.test_checkpoint_cli import quickstart_args
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModel

from editbench.cli import main
from models.checkpoint import read_checkpoint


@pytest.mark.slow
def test_export_writes_reloadable_parts(tiny_dir, synthetic_root, tmp_path, capsys):
    args = quickstart_args(tiny_dir, synthetic_root, tmp_path)
    fit = ["fit", *args, "--trainer.max_steps", "2", "--model.init_args.ema_decay", "0.5"]
    assert main(fit) == 0
    last = tmp_path / "checkpoints" / "last.ckpt"
    out = tmp_path / "export"
    assert main(["export", "--ckpt_path", str(last), "--out", str(out)]) == 0
    document = json.loads((out / "export.json").read_text())
    assert document["format"] == "editbench.export/1"
    assert document["model"]["class_path"] == "models.inspix2pix.InsPix2Pix"
    assert document["checkpoint"]["global_step"] == 2 and document["checkpoint"]["ema_weights"]
    # the quickstart trains the UNet and the text encoder: one file each, nothing else
    assert set(document["parts"]) == {"diffusion.unet", "text_encoder"}
    for part in document["parts"].values():
        data = (out / part["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == part["sha256"]
        assert len(data) == part["bytes"]
    base = document["base_paths"]["diffusion_path"]
    assert base["path"] == str(tiny_dir / "instruct-pix2pix") and len(base["sha256"]) == 64

    # The parts load strictly into the library modules of the base folder and hold the EMA
    # weights of the checkpoint (the default), not the raw ones.
    checkpoint = read_checkpoint(last)
    unet = UNet2DConditionModel.from_pretrained(tiny_dir / "instruct-pix2pix", subfolder="unet")
    unet.load_state_dict(load_file(out / "diffusion.unet.safetensors"), strict=True)
    want = checkpoint.submodule("diffusion.unet.", ema=True)
    raw = checkpoint.submodule("diffusion.unet.", ema=False)
    got = dict(unet.state_dict())
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert any(not torch.equal(want[k], raw[k]) for k in want)  # the EMA lags after 2 steps
    text = CLIPTextModel.from_pretrained(tiny_dir / "instruct-pix2pix", subfolder="text_encoder")
    missing, unexpected = text.load_state_dict(load_file(out / "text_encoder.safetensors"), strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)

    # benchmarks/memory.py's checkpoint sizes (quoted for the 7B configs) on this real file
    from benchmarks.memory import GIB, checkpoint_sizes

    trainable = sum(p["parameters"] for p in document["parts"].values())
    sizes = checkpoint_sizes(trainable)
    assert last.stat().st_size == pytest.approx(sizes["checkpoint_with_ema_gib"] * GIB, rel=0.03)
    exported = sum(p["bytes"] for p in document["parts"].values())
    assert exported == pytest.approx(sizes["export_gib"] * GIB, rel=0.01)

    raw_out = tmp_path / "export_raw"
    assert main(["export", "--ckpt_path", str(last), "--out", str(raw_out), "--raw"]) == 0
    raw_unet = load_file(raw_out / "diffusion.unet.safetensors")
    assert all(torch.equal(raw_unet[k], raw[k]) for k in raw)
    capsys.readouterr()
    assert main(["export", "--ckpt_path", str(tmp_path / "nope.ckpt"), "--out", str(raw_out)]) == 2
    assert "nope.ckpt" in capsys.readouterr().err
