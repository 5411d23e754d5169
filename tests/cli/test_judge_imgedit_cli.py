"""ImgEdit-Bench judged as its release judges it, along the user's path: a real tiny ``test`` on
the ImgEdit layout fixture (tests/fixtures/benchmarks.py), ``judge --bundle`` against the stub
OpenAI-compatible server (tests/fixtures/judge_stub.py) with the release's preset and a
``prompts.json`` in the release's shape, ``--only-failed``, then ``report --published imgedit-v1``.

Expected values are computed here by hand from the scripted answers with the release's rule
(``Name: <digits>`` lines, mean per image rounded to 2 decimals, mean per edit type); what the
stub received is checked against the prompt file and the bundle's images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fixtures.benchmark_runs import run_test
from fixtures.benchmarks import write_imgedit, write_imgedit_prompts
from fixtures.judge_stub import StubJudge, pixel_hash, serve
from PIL import Image

from editbench.cli import main
from metrics.bundle import image_name, read_bundle, read_samples

KEY_ENV = "EDITBENCH_TEST_IMGEDIT_JUDGE_KEY"
NUM = 5  # edit types add, remove, adjust, style, compose (the fixture's cycle)


@pytest.fixture(scope="module")
def tested(tiny_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A real tiny ImgEdit `test` run with its bundle; (its log dir, the prompts.json)."""
    tmp = tmp_path_factory.mktemp("imgedit-judge")
    root = write_imgedit(tmp / "ImgEdit-Bench", num_entries=NUM)
    folder = run_test("imgedit", root, tiny_dir, tmp / "runs")
    prompts = write_imgedit_prompts(tmp / "ImgEdit" / "Benchmark" / "Basic" / "prompts.json")
    return folder, prompts


def answer(*scores: int) -> str:
    names = ("Compliance", "Naturalness", "Detail")
    return "Brief reasoning: fine.\n" + "\n".join(f"{n}: {s}" for n, s in zip(names, scores, strict=True))


@pytest.mark.slow  # a tiny test run (10-30 s on 2 cores)
def test_imgedit_judge_only_failed_and_published_report(tested, tmp_path, monkeypatch, capsys):
    import shutil

    folder = shutil.copytree(tested[0], tmp_path / "run")
    prompts_json = json.loads(tested[1].read_text())
    monkeypatch.delenv(KEY_ENV, raising=False)  # a local server: no key
    inputs = {r["id"]: r for r in map(json.loads, (folder / "inputs.jsonl").read_text().splitlines())}
    assert len(inputs) == NUM
    kinds = {i: r["category"] for i, r in inputs.items()}  # carried from basic_edit.json
    assert sorted(kinds.values()) == sorted(["add", "remove", "adjust", "style", "compose"])
    by_hash = {}
    for sample in inputs:
        with Image.open(folder / image_name(sample)) as image:
            by_hash[pixel_hash(image)] = sample
    assert len(by_hash) == NUM  # the stub can tell the samples apart by the edit
    by_type = {kind: sample for sample, kind in kinds.items()}
    script = {
        by_type["add"]: answer(4, 3, 3),  # 3.33
        by_type["remove"]: answer(1, 4, 5),  # 3.33
        by_type["adjust"]: "Compliance: 4.\nScore: 4/5",  # no score line: fails
        by_type["style"]: answer(5, 5, 4),  # 4.67
    }
    stub = StubJudge(lambda images: by_hash.get(pixel_hash(images[-1])), default=answer(2, 2, 3))
    args = [
        "judge", "--bundle", str(folder), "--base_url", "", "--api_key_env", KEY_ENV,
        "--preset", "imgedit-release", "--prompts_path", str(tested[1].parents[2]),
        "--cache_dir", str(tmp_path / "cache"), "--retry_delay", "0", "--max_retries", "1",
    ]  # fmt: skip
    with serve(stub):
        args[args.index("--base_url") + 1] = stub.url
        for sample, text in script.items():
            stub.script[(sample, "SC")] = [("answer", text)]  # the stub names 2 images "SC"
        stub.script[(by_type["compose"], "SC")] = [("status", 500)]  # down for good
        assert main(args) == 1
        assert "2 sample(s) failed" in capsys.readouterr().err

        # What was sent: the type's prompt with the instruction, then the input, then the edit.
        for request in stub.requests:
            sample = request["sample"]
            expected = prompts_json[kinds[sample]].replace("<edit_prompt>", inputs[sample]["instruction"])
            assert request["text"] == expected
            source = np.asarray(Image.open(folder / image_name(sample, "sources")).convert("RGB"))
            assert np.array_equal(np.asarray(request["images"][0]), source)
            body = request["body"]
            assert body["model"] == "gpt-4o" and "temperature" not in body
            assert "max_tokens" not in body
        assert {r["sample"] for r in stub.requests} == set(inputs)

        judged = json.loads((folder / "judge_metrics.json").read_text())
        assert judged["scheme"] == "ImgEdit"
        assert judged["summary"]["type_scores"] == {"add": 3.33, "remove": 3.33, "style": 4.67}
        assert judged["summary"]["failure_rate"] == pytest.approx(2 / 5)
        assert judged["table"]["ImgEdit_style"] == pytest.approx(4.67)
        assert judged["table"]["ImgEdit_adjust"] is None  # its only image failed: missing
        rows = {(r["id"], r["metric"]): r["value"] for r in read_samples(folder / "samples.jsonl")}
        assert rows[(by_type["adjust"], "ImgEdit_adjust")] is None
        assert rows[(by_type["adjust"], "ImgEdit_failure_rate")] == 1.0
        assert rows[(by_type["add"], "ImgEdit_add")] == 3.33
        assert (by_type["add"], "L1") in rows  # the test's own rows are kept

        # --only-failed asks exactly the two failed images again.
        stub.script = {}
        stub.requests.clear()
        assert main([*args, "--only-failed"]) == 0
        capsys.readouterr()
        assert sorted(r["sample"] for r in stub.requests) == sorted(
            [by_type["adjust"], by_type["compose"]]
        )
    judged = json.loads((folder / "judge_metrics.json").read_text())
    assert judged["summary"]["type_scores"] == {
        "add": 3.33, "adjust": 2.33, "compose": 2.33, "remove": 3.33, "style": 4.67
    }  # fmt: skip
    read_bundle(folder)  # the manifest verifies

    out = tmp_path / "report"
    assert main(["report", str(folder), "--published", "imgedit-v1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = {}
    for line in printed.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) > 1:
            table[cells[0]] = cells[1:]
    header = table["Model"]
    add = header.index("imgedit ImgEdit_add↑")
    style = header.index("imgedit ImgEdit_style↑")
    # ImgEdit v1 Table 4, Instruct-Pix2Pix: Addition 2.29, Style Transfer 3.54.
    paper = table["Instruct-Pix2Pix (paper)"]
    assert (paper[add], paper[style]) == ("2.29", "3.54")
    ours = table[folder.parent.name if folder.parent.name in table else "quickstart"]
    assert (ours[add], ours[style]) == ("3.33", "4.67")
    assert "ImgEdit of" in printed and "never 0" in printed
