"""`test` and `predict` through the CLI, at one process, on every dataset's native layout.

Each dataset's fixture (tests/fixtures/layouts.py: the release's own file layout, non-square
images, the quirks that broke loaders) is read by its DataModule through the tiny evaluation
diff `experiments/tiny/eval/<dataset>.yaml` layered on the tiny InsPix2Pix config, and scored
with the dataset's own protocol columns on tiny random backbones. The copy-the-input L1 is
checked against numpy on the image files themselves (MagicBrush's rule: whole native images on
[0, 1]), so a crop or a resize of the ground truth would fail it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from fixtures import layouts
from PIL import Image

from editbench.cli import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = str(REPO / "experiments" / "tiny" / "inspix2pix.yaml")
DATASETS = ("evr", "gier", "ma5k", "magicbrush", "ipr2pr")


@pytest.fixture(scope="module")
def backbones(tmp_path_factory) -> dict[str, str]:
    from fixtures.backbones import save_tiny_clip, save_tiny_dino

    out = tmp_path_factory.mktemp("backbones")
    return {"clip": str(save_tiny_clip(out / "clip")), "dino": str(save_tiny_dino(out / "dino"))}


def common(name: str, tiny_dir: Path, backbones: dict, root: Path, save: Path) -> list[str]:
    # MA5k's LPIPS on a random AlexNet (the pretrained one is not on these machines).
    kwargs = {"LPIPS": {"weights_path": "random"}} if name == "ma5k" else {}
    return [
        "--model.init_args.diffusion_path", str(tiny_dir / "instruct-pix2pix"),
        "--model.init_args.num_inference_steps", "2",
        "--model.init_args.backbones", json.dumps(backbones),
        "--model.init_args.metric_kwargs", json.dumps(kwargs),
        "--data.init_args.root", str(root),
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(save),
    ]  # fmt: skip


def copy_l1_reference(pairs: list[tuple[Path, Path]]) -> float:
    """MagicBrush's L1 of copying the input: mean over images of mean |input - gt| on [0, 1]
    (the input brought to the ground truth's size with PIL bicubic where they differ)."""
    values = []
    for source, target in pairs:
        gt = Image.open(target).convert("RGB")
        gen = Image.open(source).convert("RGB")
        if gen.size != gt.size:
            gen = gen.resize(gt.size)
        values.append(np.abs(np.asarray(gen, np.float64) - np.asarray(gt, np.float64)).mean() / 255)
    return float(np.mean(values))


@pytest.mark.parametrize("name", DATASETS)
def test_test_and_predict_on_native_layout(name, tiny_dir, backbones, tmp_path):
    root = layouts.__dict__[f"write_{name}"](tmp_path / name)
    layered = ["-c", TINY_MODEL, "-c", str(REPO / "experiments" / "tiny" / "eval" / f"{name}.yaml")]
    save = tmp_path / "runs"
    assert main(["test", *layered, *common(name, tiny_dir, backbones, root, save)]) == 0
    (path,) = sorted(save.glob("*/version_*/test_metrics.json"))
    document = json.loads(path.read_text())
    assert document["protocol"]["name"] == name
    metrics = document["metrics"]
    for column in document["protocol"]["columns"]:
        assert math.isfinite(metrics[f"test/{column}"]), column

    # The same split through predict: every sample written once.
    out = tmp_path / "predictions"
    args = [*common(name, tiny_dir, backbones, root, tmp_path / "pruns")]
    assert main(["predict", *layered, *args, "--prediction_writer.output_dir", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == document["protocol"]["num_samples_per_aggregation"]["all"]
    assert all((out / r["image"]).is_file() for r in rows)

    if name == "magicbrush":  # independent turns: input = the ground truth of turn k-1
        test = root / "test"
        sessions = json.loads((test / "edit_sessions.json").read_text())
        pairs = [
            (test / "images" / img / turn["input"], test / "images" / img / turn["output"])
            for img, turns in sessions.items()
            for turn in turns
        ]
        assert "test/copy/all/L1" in metrics
        assert metrics["test/copy/all/L1"] == pytest.approx(copy_l1_reference(pairs), abs=1e-5)
