"""Editing quality during training (issue 18 item 7): ``EvalDuringTraining`` logs the test
protocol on a fixed subset every N steps, and its numbers are what ``test`` gives on the same
samples with the same weights."""

from __future__ import annotations

import json

import pytest
from cli.test_checkpoint_cli import quickstart_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from editbench.cli import main


@pytest.mark.slow
def test_subset_scores_during_fit_equal_test_on_the_subset(tiny_dir, synthetic_root, tmp_path):
    args = quickstart_args(tiny_dir, synthetic_root, tmp_path)
    callback = {
        "class_path": "editbench.callbacks.eval_subset.EvalDuringTraining",
        "init_args": {"every_n_steps": 2, "num_samples": 6, "split": "test", "batch_size": 4},
    }
    fit = ["fit", *args, "--trainer.max_steps", "4", "--trainer.callbacks+", json.dumps(callback)]
    assert main(fit) == 0
    events = EventAccumulator(str(tmp_path / "runs" / "quickstart" / "version_0"))
    events.Reload()
    scalars = {t: {e.step: e.value for e in events.Scalars(t)} for t in events.Tags()["scalars"]}
    assert set(scalars["eval_subset/L1"]) == {2, 4}
    assert set(scalars["eval_subset/copy/L1"]) == {2, 4}
    assert scalars["eval_subset/L1"][2] != scalars["eval_subset/L1"][4]  # the model moved

    test = ["test", *args, "--ckpt_path", str(tmp_path / "checkpoints" / "last.ckpt"),
            "--data.init_args.max_samples", "6"]  # fmt: skip
    assert main(test) == 0
    [path] = sorted((tmp_path / "runs").glob("*/version_1/test_metrics.json"))
    metrics = json.loads(path.read_text())["metrics"]
    assert json.loads(path.read_text())["protocol"]["num_samples"] == 6
    for name in ("L1", "L1_edit", "SSIM"):
        assert scalars[f"eval_subset/{name}"][4] == pytest.approx(metrics[f"test/{name}"], rel=1e-5)
        assert scalars[f"eval_subset/copy/{name}"][4] == pytest.approx(
            metrics[f"test/copy/{name}"], rel=1e-5
        )


@pytest.mark.slow
def test_two_processes_score_the_subset_once(tiny_dir, synthetic_root, tmp_path):
    """Under 2 gloo processes each rank edits its share of an odd subset (5 samples), every rank
    reaches the metrics' sync, and the logged numbers are 1-process ``test``'s on those samples
    with the fit's final weights."""
    from cli.test_distributed_eval import processes, run_cli

    args = quickstart_args(tiny_dir, synthetic_root, tmp_path)
    callback = {
        "class_path": "editbench.callbacks.eval_subset.EvalDuringTraining",
        "init_args": {"every_n_steps": 2, "num_samples": 5, "split": "test", "batch_size": 2},
    }
    fit = ["fit", *args, "--trainer.max_steps", "2", "--trainer.callbacks+", json.dumps(callback)]
    run_cli([*fit, *processes(2)], tmp_path)
    events = EventAccumulator(str(tmp_path / "runs" / "quickstart" / "version_0"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("eval_subset/L1")}
    assert set(logged) == {2}
    test = ["test", *args, "--ckpt_path", str(tmp_path / "checkpoints" / "last.ckpt"),
            "--data.init_args.max_samples", "5"]  # fmt: skip
    assert main(test) == 0
    [path] = sorted((tmp_path / "runs").glob("*/version_1/test_metrics.json"))
    document = json.loads(path.read_text())
    assert document["protocol"]["num_samples"] == 5
    assert logged[2] == pytest.approx(document["metrics"]["test/L1"], rel=1e-5)
