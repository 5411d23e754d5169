"""``python -m editbench judge --bundle DIR`` on the bundle of a real tiny ``test`` run, against
the stub OpenAI-compatible server (tests/fixtures/judge_stub.py) and the tiny random LLaVA.

The stub tells the samples apart by a pixel hash of the edited image it receives, which the
test computes from the bundle's ``images/<id>.png``. Expected values are computed by hand from
the scripted scores: SC_i = min, PQ_i = min, O_i = sqrt(SC_i * PQ_i), means over judged samples.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
from fixtures.judge_stub import REPORTED_MODEL, StubJudge, answer, pixel_hash, serve
from PIL import Image

from editbench.cli import main
from metrics.bundle import read_bundle

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "experiments" / "tiny" / "inspix2pix.yaml")
NUM_TEST = 4
KEY_ENV = "EDITBENCH_TEST_JUDGE_CLI_KEY"
SECRET = "sk-cli-judge-secret-0077"


@pytest.fixture(scope="module")
def tested(tiny_dir, tmp_path_factory) -> Path:
    """One real tiny `test` run writing a bundle with images, sources and inputs; its log dir."""
    from datamodules.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("synthetic-judge")
    generate_synthetic(root, num_train=2, num_val=2, num_test=NUM_TEST, resolution=32, seed=0)
    save = tmp_path_factory.mktemp("runs")
    args = [
        "test", "-c", CONFIG,
        "--model.init_args.diffusion_path", str(tiny_dir / "instruct-pix2pix"),
        "--model.init_args.num_inference_steps", "2",
        "--data.init_args.root", str(root),
        "--data.init_args.num_train", "2",
        "--data.init_args.num_val", "2",
        "--data.init_args.num_test", str(NUM_TEST),
        "--data.init_args.batch_size", "2",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(save),
    ]  # fmt: skip
    assert main(args) == 0
    (folder,) = sorted(save.glob("tiny_inspix2pix/version_*"))
    return folder


def copy_run(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    return target


def ids_by_hash(folder: Path) -> dict[str, str]:
    found = {}
    for path in sorted((folder / "images").glob("*.png")):
        with Image.open(path) as image:
            found[pixel_hash(image)] = path.stem
    return found


def records(folder: Path) -> dict[tuple[str, str], dict]:
    lines = (folder / "judge.jsonl").read_text().splitlines()
    return {(r["id"], r["kind"]): r for r in map(json.loads, lines)}


def judge_args(folder: Path, url: str, cache: Path, *extra: str) -> list[str]:
    return [
        "judge", "--bundle", str(folder), "--base_url", url, "--model", "judge",
        "--api_key_env", KEY_ENV, "--cache_dir", str(cache), "--retry_delay", "0",
        "--max_retries", "1", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_judge_only_failed_and_report(tested, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, SECRET)
    folder = copy_run(tested, tmp_path / "run")
    by_hash = ids_by_hash(folder)
    ids = sorted(by_hash.values())
    assert len(ids) == NUM_TEST  # distinct edits: the stub can tell the samples apart
    assert all((folder / "sources" / f"{i}.png").is_file() for i in ids)
    stub = StubJudge(lambda images: by_hash.get(pixel_hash(images[-1])) if images else None)
    sc = {ids[0]: [8, 6], ids[1]: [3, 9], ids[2]: [10, 10], ids[3]: [5, 7]}
    pq = {ids[0]: [7, 9], ids[1]: [4, 2], ids[2]: [9, 8], ids[3]: [6, 6]}
    with serve(stub):
        for i in ids:
            stub.script[(i, "SC")] = [("answer", answer(sc[i]))]
            stub.script[(i, "PQ")] = [("answer", answer(pq[i]))]
        stub.script[(ids[1], "SC")] = [("answer", f"no idea, key {SECRET}")]  # garbage
        stub.script[(ids[2], "PQ")] = [("status", 500)]  # down for good
        assert main(judge_args(folder, stub.url, tmp_path / "cache")) == 1
        err = capsys.readouterr().err
        assert "2 sample(s) failed" in err
        first = records(folder)
        assert {k for k, r in first.items() if r["failed"]} == {(ids[1], "SC"), (ids[2], "PQ")}
        answered = [r for k, r in first.items() if k != (ids[2], "PQ")]  # no reply to a 500
        assert {r["model_reported"] for r in answered} == {REPORTED_MODEL}
        assert first[(ids[2], "PQ")]["model_reported"] is None
        assert first[(ids[1], "SC")]["answer"] == "no idea, key ***"  # redacted
        judged = json.loads((folder / "judge_metrics.json").read_text())
        o_values = [math.sqrt(6 * 7), math.sqrt(5 * 6)]  # judged: ids[0], ids[3]
        assert judged["summary"]["O"] == pytest.approx(sum(o_values) / 2)
        assert judged["summary"]["failure_rate"] == pytest.approx(0.5)

        out = tmp_path / "report"
        assert main(["report", str(folder), "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        assert "VIEScore_O" in printed and "VIEScore_failure_rate" in printed
        assert REPORTED_MODEL in printed and "never 0" in printed
        with open(out / "report.csv", newline="") as handle:
            (row,) = list(csv.DictReader(handle))
        dataset = judged_dataset(row)
        assert float(row[f"{dataset}/VIEScore_failure_rate mean"]) == pytest.approx(0.5)
        assert float(row[f"{dataset}/VIEScore_O mean"]) == pytest.approx(sum(o_values) / 2)
        assert float(row[f"{dataset}/VIEScore_SC mean"]) == pytest.approx((6 + 5) / 2)

        # The server answers well now: --only-failed asks exactly the two failed prompts.
        stub.script = {(ids[1], "SC"): [("answer", answer([4, 4]))]}
        stub.requests.clear()
        lines = (folder / "judge.jsonl").read_text().splitlines()
        assert main(judge_args(folder, stub.url, tmp_path / "cache", "--only-failed")) == 0
        asked = sorted((r["sample"], r["kind"]) for r in stub.requests)
        assert asked == sorted([(ids[1], "SC"), (ids[2], "PQ")])
        again = (folder / "judge.jsonl").read_text().splitlines()
        for line, new in zip(lines, again, strict=True):
            record = json.loads(line)
            if not record["failed"]:
                assert new == line  # kept byte for byte
        assert not any(r["failed"] for r in records(folder).values())
        assert main(["report", str(folder), "--out", str(tmp_path / "report2")]) == 0
        capsys.readouterr()
    read_bundle(folder)
    for path in [*folder.rglob("*"), *(tmp_path / "cache").rglob("*"), *out.rglob("*")]:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def judged_dataset(row: dict) -> str:
    (name,) = [k for k in row if k.endswith("/VIEScore_O mean")]
    return name.split("/")[0]


@pytest.mark.slow
def test_judge_local_llava(tested, tiny_dir, tmp_path, capsys):
    folder = copy_run(tested, tmp_path / "run")
    status = main([
        "judge", "--bundle", str(folder), "--local", str(tiny_dir / "llava"),
        "--max_tokens", "6", "--no_cache",
    ])  # fmt: skip
    capsys.readouterr()
    found = records(folder)
    assert len(found) == 2 * NUM_TEST
    assert {r["backend"] for r in found.values()} == {"local"}
    assert {r["model"] for r in found.values()} == {str((tiny_dir / "llava").resolve())}
    assert all(r["attempts"] == 1 for r in found.values())  # greedy: no re-ask
    failures = {r["id"] for r in found.values() if r["failed"]}
    assert status == (1 if failures else 0)
    judged = json.loads((folder / "judge_metrics.json").read_text())
    assert judged["summary"]["failures"] == len(failures)
    assert judged["judge"]["backend"] == "local"
    read_bundle(folder)


@pytest.mark.slow
def test_test_leaves_viescore_to_the_offline_judge(tiny_dir, tmp_path, monkeypatch, capsys):
    """A protocol or ``extra_metrics`` naming VIEScore: ``test`` computes the other metrics,
    writes the bundle and says how to judge it, without building a judge (its endpoint here
    needs a key that is not set, so building one would fail); the offline judge then adds the
    VIEScore columns the report shows."""
    from datamodules.synthetic import generate_synthetic

    monkeypatch.delenv("EDITBENCH_UNSET_KEY", raising=False)
    root = tmp_path / "synthetic"
    generate_synthetic(root, num_train=2, num_val=2, num_test=NUM_TEST, resolution=32, seed=0)
    save = tmp_path / "runs"
    unreachable = {"VIEScore": {"base_url": "https://judge.invalid/v1",
                                "api_key_env": "EDITBENCH_UNSET_KEY"}}  # fmt: skip
    args = [
        "test", "-c", CONFIG,
        "--model.init_args.diffusion_path", str(tiny_dir / "instruct-pix2pix"),
        "--model.init_args.num_inference_steps", "2",
        "--model.init_args.extra_metrics", "[VIEScore]",
        "--model.init_args.metric_kwargs", json.dumps(unreachable),
        "--data.init_args.root", str(root),
        "--data.init_args.num_train", "2", "--data.init_args.num_val", "2",
        "--data.init_args.num_test", str(NUM_TEST), "--data.init_args.batch_size", "2",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(save),
    ]  # fmt: skip
    assert main(args) == 0
    (folder,) = sorted(save.glob("tiny_inspix2pix/version_*"))
    printed = capsys.readouterr().out
    assert f"VIEScore: judged offline from this run's bundle: python -m editbench judge --bundle {folder}" in printed
    document = json.loads((folder / "test_metrics.json").read_text())
    assert document["protocol"]["judged_offline"] == ["VIEScore"]
    assert document["protocol"]["judge_settings"] == unreachable  # no key: a variable's name

    # Without flags, the judge takes the run's configured settings: this endpoint needs the
    # key the environment lacks, and the error names its variable.
    assert main(["judge", "--bundle", str(folder), "--no_cache"]) == 2
    captured = capsys.readouterr()
    assert "judge settings from the run's config" in captured.out
    assert "https://judge.invalid/v1" in captured.out
    assert "EDITBENCH_UNSET_KEY" in captured.err
    assert not any("VIEScore" in key for key in document["metrics"])
    assert "L1" in document["protocol"]["columns"]

    by_hash = ids_by_hash(folder)
    stub = StubJudge(lambda images: by_hash.get(pixel_hash(images[-1])), default=answer([6, 8]))
    with serve(stub):
        assert main(judge_args(folder, stub.url, tmp_path / "cache")) == 0
    capsys.readouterr()
    assert main(["report", str(folder), "--out", str(tmp_path / "report")]) == 0
    report = capsys.readouterr().out
    lines = [line for line in report.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("| ").split("|")]
    row = [c.strip() for c in lines[1].strip("| ").split("|")]
    column = next(i for i, name in enumerate(header) if name.endswith("VIEScore_O↑"))
    assert any(name.endswith("L1↓") for name in header)
    assert row[column].split()[0] == "6.00"  # SC = min(6, 8) = PQ = 6, O = sqrt(6 * 6)

    only_judge = list(args)
    only_judge[only_judge.index("--model.init_args.extra_metrics")] = "--model.init_args.metrics"
    with pytest.raises(ValueError, match="judged offline"):
        main(only_judge)
