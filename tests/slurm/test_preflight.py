"""scripts/slurm/preflight.py without a cluster: the layout check against SLURM variables set by
hand, and the run-folder arguments per logger kind."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[2] / "scripts" / "slurm" / "preflight.py"
spec = importlib.util.spec_from_file_location("slurm_preflight", PATH)
preflight = importlib.util.module_from_spec(spec)
spec.loader.exec_module(preflight)


def job(nodes: int, tasks: str, **extra) -> dict:
    return {"SLURM_JOB_NUM_NODES": str(nodes), "SLURM_TASKS_PER_NODE": tasks, **extra}


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4", 4), ("2(x3)", 2), ("8(x2)", 8), ("1,1", 1), ("2(x2),2", 2)],
)
def test_tasks_per_node_reads_slurm_notation(text, expected):
    assert preflight.tasks_per_node({"SLURM_TASKS_PER_NODE": text}) == expected


def test_uneven_tasks_per_node_is_an_error():
    with pytest.raises(preflight.LayoutError, match=r"different task counts.*2\(x2\),1"):
        preflight.tasks_per_node({"SLURM_TASKS_PER_NODE": "2(x2),1"})


def test_matching_layout_passes():
    trainer = {"num_nodes": 2, "devices": 4, "accelerator": "gpu"}
    summary = preflight.check_layout(trainer, job(2, "4(x2)", SLURM_GPUS_ON_NODE="4"))
    assert summary.startswith("2 node(s) x 4 task(s)")
    # devices as a list or a string count the same
    assert preflight.check_layout({"num_nodes": 1, "devices": [0, 1]}, job(1, "2"))
    assert preflight.check_layout({"num_nodes": 1, "devices": "0,1"}, job(1, "2"))


def test_mismatch_names_both_values():
    trainer = {"num_nodes": 2, "devices": 1, "accelerator": "cpu"}
    with pytest.raises(preflight.LayoutError) as caught:
        preflight.check_layout(trainer, job(1, "2"))
    message = str(caught.value)
    assert "SLURM allocated 1 node(s) (--nodes) but the config has trainer.num_nodes=2" in message
    assert (
        "SLURM runs 2 task(s) per node (--ntasks-per-node) but the config has trainer.devices=1"
        in message
    )


def test_gpu_shortfall_and_unstated_devices_are_errors():
    with pytest.raises(preflight.LayoutError, match=r"1 GPU\(s\) per node \(--gres\).*devices=2"):
        preflight.check_layout(
            {"num_nodes": 1, "devices": 2, "accelerator": "gpu"},
            job(1, "2", SLURM_GPUS_ON_NODE="1"),
        )
    with pytest.raises(preflight.LayoutError, match=r"trainer.devices='auto'.*here 2"):
        preflight.check_layout({"num_nodes": 1, "devices": "auto"}, job(1, "2"))
    with pytest.raises(preflight.LayoutError, match="not inside a SLURM job"):
        preflight.check_layout({"num_nodes": 1, "devices": 1}, {})


def test_run_dir_args_per_logger():
    tensorboard = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {}}
    args = preflight.run_dir_args({"trainer": {"logger": tensorboard}}, "runs/x", "slurm")
    assert args == [
        "--trainer.default_root_dir", "runs/x",
        "--trainer.logger.init_args.save_dir", "runs/x",
        "--trainer.logger.init_args.version", "slurm",
    ]  # fmt: skip
    # a version the config fixes is kept; test runs (no --version) keep Lightning's numbering
    fixed = {**tensorboard, "init_args": {"version": "mine"}}
    assert "--trainer.logger.init_args.version" not in preflight.run_dir_args(
        {"trainer": {"logger": fixed}}, "runs/x", "slurm"
    )
    default = preflight.run_dir_args({"trainer": {"logger": None}}, "runs/x", "slurm")
    assert default[:2] == ["--trainer.default_root_dir", "runs/x"]
    assert json.loads(default[3])["init_args"] == {
        "save_dir": "runs/x", "name": "lightning_logs", "version": "slurm"
    }  # fmt: skip
    assert preflight.run_dir_args({"trainer": {"logger": False}}, "runs/x", None) == [
        "--trainer.default_root_dir", "runs/x"
    ]  # fmt: skip
