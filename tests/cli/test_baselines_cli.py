"""``python -m editbench test`` of the released-pipeline baselines (experiments/tiny/baselines/)
on tiny random pipeline folders and the synthetic split; ``fit`` is refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from editbench import tiny_pipelines as tp
from editbench.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "experiments" / "tiny" / "baselines"
#: config -> (tiny pipeline to build, or None for make_tiny's InstructPix2Pix; its flag)
CONFIGS = {
    "instructpix2pix": (None, "pipeline_path"),
    "magicbrush_single_file": ("single_file", "single_file"),
    "instructpix2pix_sdxl": ("sdxl", "pipeline_path"),
    "flux_kontext": ("flux", "pipeline_path"),
    "qwen_image_edit": ("qwen", "pipeline_path"),
}
NUM_SAMPLES = 2


@pytest.fixture(scope="module")
def built(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline_pipelines")
    cache: dict = {}

    def get(name):
        if name not in cache:
            cache.update(tp.make_tiny_pipelines(out, tiny_dir, [name]))
        return cache[name]

    return get


def args_for(config: str, built, tiny_dir, synthetic_root, save: Path) -> list[str]:
    kind, flag = CONFIGS[config]
    argv = ["-c", str(TINY / f"{config}.yaml")]
    argv += ["--model.init_args.pipeline_path", str(tiny_dir / "instruct-pix2pix")]
    if kind is not None:
        argv += [f"--model.init_args.{flag}", str(built(kind))]
    argv += [
        "--model.init_args.num_inference_steps", "2",
        "--data.init_args.root", str(synthetic_root),
        "--data.init_args.num_train", "64",
        "--data.init_args.num_val", "16",
        "--data.init_args.num_test", "16",
        "--data.init_args.max_samples", str(NUM_SAMPLES),
        "--data.init_args.eval_batch_size", "2",
        "--trainer.logger.init_args.save_dir", str(save),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    return argv


@pytest.mark.parametrize(
    "config",
    [
        "instructpix2pix",
        "magicbrush_single_file",
        "instructpix2pix_sdxl",
        "flux_kontext",
        pytest.param("qwen_image_edit", marks=pytest.mark.slow),
    ],
)
def test_test_writes_metrics(config, built, tiny_dir, synthetic_root, tmp_path):
    assert main(["test", *args_for(config, built, tiny_dir, synthetic_root, tmp_path)]) == 0
    (path,) = sorted(tmp_path.glob("*/version_*/test_metrics.json"))
    document = json.loads(path.read_text())
    metrics = document["metrics"]
    assert {"test/L1", "test/SSIM", "test/copy/L1"} <= set(metrics)
    assert all(math.isfinite(metrics[k]) for k in ("test/L1", "test/SSIM"))
    assert metrics["test/L1"] != metrics["test/copy/L1"], "the baseline returned its input"
    assert document["protocol"]["num_samples"] == NUM_SAMPLES
    sampler = document["run"]["sampler"]
    assert sampler["num_inference_steps"] == 2
    # the wrapped pipeline's scheduler is recorded, not the EditDiffusion's (there is none)
    assert sampler["pipeline"].endswith("Pipeline") and sampler["scheduler"] not in (None, "")
    assert "true_cfg_scale" in sampler
    assert not (REPO / "config.yaml").exists()


def test_fit_is_refused(built, tiny_dir, synthetic_root, tmp_path, capsys):
    argv = args_for("instructpix2pix", built, tiny_dir, synthetic_root, tmp_path)
    assert main(["fit", *argv, "--trainer.max_steps", "1"]) == 2
    assert "does not train" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_every_release_config_names_its_pipeline():
    """The full-size configs: one per tiny config, each naming its pipeline class and sampler."""
    import yaml

    expected = {
        "instructpix2pix": ("StableDiffusionInstructPix2PixPipeline", 100, 7.5),
        "magicbrush_single_file": ("StableDiffusionInstructPix2PixPipeline", 100, 7.5),
        "instructpix2pix_sdxl": ("StableDiffusionXLInstructPix2PixPipeline", 30, 3.0),
        "flux_kontext": ("FluxKontextPipeline", 28, 2.5),
        "qwen_image_edit": ("QwenImageEditPipeline", 50, None),
    }
    for name, (cls, steps, guidance) in expected.items():
        config = yaml.safe_load((REPO / "experiments" / "baselines" / f"{name}.yaml").read_text())
        init = config["model"]["init_args"]
        assert config["model"]["class_path"] == "models.pipeline_baseline.PipelineBaseline"
        assert init["pipeline_class"] == cls and init["num_inference_steps"] == steps
        assert init.get("guidance_scale") == guidance
        assert (TINY / f"{name}.yaml").is_file()
    qwen = yaml.safe_load((REPO / "experiments/baselines/qwen_image_edit.yaml").read_text())
    assert qwen["model"]["init_args"]["true_cfg_scale"] == 4.0
