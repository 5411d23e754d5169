"""The SLURM templates (scripts/slurm/{fit,test}.sbatch) on a real two-node cluster.

The cluster is the one `scripts/slurm/local_cluster.sh start` runs on this machine (nodes n1 and
n2, both 127.0.0.1); without `sinfo` or with fewer than two nodes up every test here is skipped.
Jobs go through the templates as a user submits them (`sbatch ... fit.sbatch CONFIG args`), on
CPU (`--gres=none`), 2 nodes x 1 task, gloo, with the tiny InsPix2Pix and 4 training samples:

- fit on 2 nodes equals fit in 1 process with the same global batch (2 x 2 vs 4): the logged
  global loss of every step within LOSS_TOLERANCE and the final trainable weights within
  WEIGHT_TOLERANCE (float summation order differs: the gradient is a mean over ranks of per-rank
  means instead of one mean). The model is slurm_helpers.SampleKeyedInsPix2Pix, whose draws are
  keyed by sample, not by rank (stock InsPix2Pix draws per rank by design: equal only in
  distribution);
- test on 2 nodes writes the test_metrics.json of 1 process (every metric within 1e-5);
- SIGUSR1 (`scancel --signal=USR1 --full`) to a running fit writes hpc_ckpt_1.ckpt in the run
  folder and requeues the job; released with `scontrol update StartTime=now`, it restores the
  checkpoint by itself and ends with the weights of the uninterrupted 2-node run (within
  RESUME_TOLERANCE). Every epoch here is one optimizer step, so the checkpoint falls on an epoch
  boundary: resuming mid-epoch is issue 16 item 2;
- an allocation that disagrees with the config fails before srun, naming both values.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FIT = REPO / "scripts" / "slurm" / "fit.sbatch"
TEST = REPO / "scripts" / "slurm" / "test.sbatch"
CONFIG = "experiments/tiny/inspix2pix.yaml"
MAX_STEPS = 6
SIGNAL_AFTER_STEP = 3
LOSS_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 1e-5
RESUME_TOLERANCE = 1e-6
METRIC_TOLERANCE = 1e-5
JOB_TIMEOUT_S = 1500
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}
TWO_NODES = ["--nodes=2", "--ntasks-per-node=1"]
SAMPLE_KEYED = ["--model.class_path", "slurm_helpers.SampleKeyedInsPix2Pix"]


def cluster_problem() -> str | None:
    """Why the cluster cannot run these tests, or None."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return (
            "SLURM is not installed (no sinfo); start it: sudo scripts/slurm/local_cluster.sh start"
        )
    try:
        result = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        return "sinfo timed out: the SLURM controller does not answer"
    if result.returncode:
        return f"the SLURM cluster is not up ({result.stderr.strip()})"
    up = {
        line.split()[0]
        for line in result.stdout.splitlines()
        if len(line.split()) == 2
        and line.split()[1] in ("idle", "mixed", "allocated", "completing")
    }
    if len(up) < 2:
        return f"fewer than 2 SLURM nodes are up ({result.stdout.strip() or 'none'})"
    return None


@pytest.fixture(scope="module", autouse=True)
def cluster():
    problem = cluster_problem()
    if problem:
        pytest.skip(problem)
    jobs: list[str] = []
    yield jobs
    for job in jobs:  # nothing left running after a failed test
        subprocess.run(["scancel", job], capture_output=True, timeout=30)


def job_env(run_dir: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_"))}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(REPO), str(HERE)]),
        EDITBENCH_PYTHON=sys.executable,
    )
    if run_dir is not None:
        env["EDITBENCH_RUN_DIR"] = str(run_dir)
    return env


def submit(jobs, template, sbatch_args, args, run_dir: Path, output: Path) -> str:
    command = [
        "sbatch", "--parsable", "--gres=none", "--cpus-per-task=1", f"--chdir={REPO}",
        f"--output={output}", *sbatch_args, str(template), CONFIG, *args,
    ]  # fmt: skip
    result = subprocess.run(
        command, env=job_env(run_dir), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"sbatch failed: {result.stderr}"
    job = result.stdout.strip().split(";")[0]
    jobs.append(job)
    return job


def job_info(job: str) -> dict:
    result = subprocess.run(
        ["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return dict(re.findall(r"(\w+)=(\S*)", result.stdout))


def wait_for(condition, what: str, output: Path, timeout: float = JOB_TIMEOUT_S, poll=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    tail = output.read_text()[-4000:] if output.exists() else "(no output)"
    raise AssertionError(f"timed out waiting for {what}; job output:\n{tail}")


def wait_done(job: str, output: Path) -> dict:
    info = wait_for(
        lambda: (i := job_info(job)) and i["JobState"] in DONE and i, f"job {job}", output, poll=2
    )
    return info


def assert_completed(info: dict, output: Path) -> None:
    assert info["JobState"] == "COMPLETED", output.read_text()[-4000:]


def local(args: list[str], log: Path) -> subprocess.Popen:
    """The same run in one process on this machine, started now (it overlaps the job)."""
    handle = log.open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "editbench", *args],
        cwd=REPO, env=job_env(), stdout=handle, stderr=subprocess.STDOUT,
    )  # fmt: skip


def finish(process: subprocess.Popen, log: Path) -> None:
    assert process.wait(timeout=JOB_TIMEOUT_S) == 0, log.read_text()[-4000:]


def scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    # a later event of the same step wins (a resumed run logs its steps again)
    return {t: {e.step: e.value for e in events.Scalars(t)} for t in events.Tags()["scalars"]}


def final_weights(log_dir: Path) -> dict[str, torch.Tensor]:
    (path,) = sorted((log_dir / "checkpoints").glob(f"*step={MAX_STEPS}.ckpt"))
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def run_args(tiny_dir, tmp_path_factory):
    from datamodules.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("slurm-data")
    generate_synthetic(root, num_train=4, num_val=4, num_test=5, resolution=32, seed=0)
    return [
        "--model.init_args.diffusion_path", str(tiny_dir / "instruct-pix2pix"),
        "--model.init_args.num_inference_steps", "2",
        "--data.init_args.root", str(root),
        "--data.init_args.num_train", "4",
        "--data.init_args.num_val", "4",
        "--data.init_args.num_test", "5",
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def fits(cluster, run_args, tmp_path_factory):
    """The 2-node fit through fit.sbatch and the 1-process fit, same global batch (4)."""
    base = tmp_path_factory.mktemp("slurm-fit")
    fit = [
        *SAMPLE_KEYED, *run_args,
        "--trainer.max_steps", str(MAX_STEPS),
        "--trainer.log_every_n_steps", "1",
        "--trainer.limit_val_batches", "0",
    ]  # fmt: skip
    output = base / "two.out"
    job = submit(
        cluster, FIT, TWO_NODES,
        [*fit, "--trainer.num_nodes", "2", "--data.init_args.batch_size", "2"],
        base / "two", output,
    )  # fmt: skip
    one = local(
        [
            "fit", "-c", CONFIG, *fit, "--data.init_args.batch_size", "4",
            "--trainer.logger.init_args.save_dir", str(base / "one"),
        ],
        base / "one.log",
    )  # fmt: skip
    info = wait_done(job, output)
    finish(one, base / "one.log")
    assert_completed(info, output)
    return {
        "fit_args": fit,
        "one": base / "one" / "tiny_inspix2pix" / "version_0",
        "two": base / "two" / "tiny_inspix2pix" / "slurm",
        "two_info": info,
        "two_output": output,
    }


def test_layout_mismatch_fails_before_srun_naming_both_values(cluster, run_args, tmp_path):
    """1 node x 2 tasks for a config of 2 nodes x 1 device: the job fails in the preflight."""
    output = tmp_path / "job.out"
    job = submit(
        cluster, FIT, ["--nodes=1", "--ntasks-per-node=2"],
        [*run_args, "--trainer.num_nodes", "2"], tmp_path / "run", output,
    )  # fmt: skip
    info = wait_done(job, output)
    text = output.read_text()
    assert info["JobState"] == "FAILED", text[-4000:]
    assert "1 node(s) (--nodes) but the config has trainer.num_nodes=2" in text, text[-4000:]
    assert "2 task(s) per node (--ntasks-per-node) but the config has trainer.devices=1" in text
    assert "Initializing distributed" not in text  # no task was started


def test_fit_on_two_nodes_equals_one_process(fits):
    """Every step's global loss and the final weights of 2 nodes x batch 2 = 1 process x 4."""
    assert fits["two_info"]["NodeList"] == "n[1-2]"
    text = fits["two_output"].read_text()
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in text and "distributed_backend=gloo" in text
    one, two = scalars(fits["one"]), scalars(fits["two"])
    steps = list(range(MAX_STEPS))
    assert sorted(one["train/loss_global"]) == sorted(two["train/loss_global"]) == steps
    for step in steps:
        a, b = one["train/loss_global"][step], two["train/loss_global"][step]
        assert abs(a - b) <= LOSS_TOLERANCE, (step, a, b)
    # rank 0's own loss (half the batch) is not the global one: the ranks held different samples
    own = two["train/loss"]
    assert any(abs(own[s] - two["train/loss_global"][s]) > 1e-4 for s in steps), own
    difference = max_difference(final_weights(fits["one"]), final_weights(fits["two"]))
    assert difference <= WEIGHT_TOLERANCE, difference


def test_test_on_two_nodes_equals_one_process(cluster, run_args, tmp_path):
    """test.sbatch on 2 nodes: an odd split (5 = 3 + 2), every metric as in 1 process."""
    output = tmp_path / "two.out"
    job = submit(
        cluster, TEST, TWO_NODES, [*run_args, "--trainer.num_nodes", "2"], tmp_path / "two", output
    )
    one = local(
        [
            "test",
            "-c",
            CONFIG,
            *run_args,
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "one"),
        ],
        tmp_path / "one.log",
    )
    info = wait_done(job, output)
    finish(one, tmp_path / "one.log")
    assert_completed(info, output)
    documents = {}
    for name in ("one", "two"):
        (path,) = sorted((tmp_path / name).glob("*/version_*/test_metrics.json"))
        documents[name] = json.loads(path.read_text())
    assert documents["one"]["run"]["world_size"] == 1
    assert documents["two"]["run"]["world_size"] == 2
    assert documents["two"]["protocol"]["num_samples"] == 5
    assert documents["one"]["metrics"].keys() == documents["two"]["metrics"].keys()
    for key, value in documents["one"]["metrics"].items():
        other = documents["two"]["metrics"][key]
        assert (math.isnan(value) and math.isnan(other)) or abs(value - other) <= METRIC_TOLERANCE
    assert documents["one"]["protocol"]["num_samples"] == 5


def test_preempted_fit_requeues_resumes_and_ends_with_uninterrupted_weights(
    cluster, fits, tmp_path
):
    """SIGUSR1 after step 3 of 6: hpc_ckpt_1.ckpt (step 3) in the run folder, the job requeued,
    released, restored from it, and the final weights equal the uninterrupted 2-node run's."""
    run_dir, output = tmp_path / "run", tmp_path / "job.out"
    pace = [{"class_path": "slurm_helpers.Pace", "init_args": {"seconds": 3}}]
    job = submit(
        cluster, FIT, TWO_NODES,
        [
            *fits["fit_args"], "--trainer.num_nodes", "2", "--data.init_args.batch_size", "2",
            "--trainer.callbacks", json.dumps(pace),
        ],
        run_dir, output,
    )  # fmt: skip
    marker = f"pace: step {SIGNAL_AFTER_STEP}\n"
    wait_for(lambda: output.exists() and marker in output.read_text(), marker.strip(), output)
    signal = subprocess.run(
        ["scancel", "--signal=USR1", "--full", job], capture_output=True, text=True, timeout=30
    )
    assert signal.returncode == 0, signal.stderr
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    wait_for(
        lambda: (i := job_info(job))["JobState"] == "PENDING" and int(i["Restarts"]) >= 1,
        "the requeued job",
        output,
    )
    assert hpc.is_file()
    saved = torch.load(hpc, map_location="cpu", weights_only=False)
    assert saved["global_step"] == SIGNAL_AFTER_STEP
    release = subprocess.run(
        ["scontrol", "update", f"jobid={job}", "StartTime=now"], capture_output=True, text=True
    )
    assert release.returncode == 0, release.stderr
    info = wait_done(job, output)
    assert_completed(info, output)
    assert info["Restarts"] == "1"
    text = output.read_text()
    assert "Requeued SLURM job" in text and f"job {job} restart 1" in text
    assert f"pace: step {SIGNAL_AFTER_STEP + 1}" in text.split(f"job {job} restart 1")[1]
    log_dir = run_dir / "tiny_inspix2pix" / "slurm"  # the same folder before and after
    difference = max_difference(final_weights(log_dir), final_weights(fits["two"]))
    assert difference <= RESUME_TOLERANCE, difference
