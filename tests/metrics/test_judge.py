"""The offline judge on a hand-made result bundle, against the stub OpenAI-compatible server
driven through the ``openai`` client (tests/fixtures/judge_stub.py).

The bundle holds six flat-colour samples (the stub tells them apart by the edit's colour):
two answered well, one with garbage, one with HTTP 500 twice then a good answer (the client's
own retries), one refused and one with HTTP 500 for good. Expected values are computed by hand
from the scripted scores: SC_i = min, PQ_i = min, O_i = sqrt(SC_i * PQ_i), means over the
judged samples only; the failed ones are missing (null), never 0.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from fixtures.benchmarks import write_imgedit_prompts
from fixtures.judge_stub import REPORTED_MODEL, StubJudge, answer, serve
from PIL import Image

from metrics.bundle import (
    BundleError,
    read_bundle,
    read_samples,
    update_manifest,
    write_bundle,
    write_inputs,
)
from metrics.judge.cache import AnswerCache
from metrics.judge.imgedit import load_imgedit_prompts
from metrics.judge.judges import OpenAIJudge
from metrics.judge.offline import FAILURE_RATE, JUDGE_METRICS, judge_bundle
from metrics.judge.prompts import BUILTIN, PROMPT_SHA256
from metrics.judge.record import JudgeRecord, read_records, sample_scores, summarize

KEY_ENV = "EDITBENCH_TEST_JUDGE_KEY"
SECRET = "sk-judge-test-secret-42"
IDS = ["s0", "s1", "s2", "s3", "s4", "s5"]
EDIT_LEVELS = [110, 120, 130, 140, 150, 160]
INSTRUCTIONS = ["make it pink", "add a hat", "remove the dog", "winter", "night", "zoom"]


def _sample_of(images) -> str:
    return IDS[EDIT_LEVELS.index(images[-1].getpixel((0, 0))[0])] if images else "?"


@pytest.fixture
def stub():
    with serve(StubJudge(_sample_of)) as server:
        yield server


def make_bundle(folder: Path) -> Path:
    """A bundle as `test` writes it: results, one L1 row per sample, images, sources, inputs."""
    for i, sample in enumerate(IDS):
        for kind, level in (("images", EDIT_LEVELS[i]), ("sources", 10 + i)):
            (folder / kind).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 12), (level,) * 3).save(folder / kind / f"{sample}.png")
    protocol = {"name": "generic", "aggregation": "all", "aggregations": ["all"], "scale": {}}
    rows = [
        {"id": s, "dataset": "generic", "session": None, "turn": None, "aggregation": "all",
         "system": "model", "metric": "L1", "value": 0.1 * i}
        for i, s in enumerate(IDS)
    ]  # fmt: skip
    results = {"metrics": {"test/L1": sum(0.1 * i for i in range(6)) / 6}, "protocol": protocol}
    (folder / "test_metrics.json").write_text(json.dumps(results))
    inputs = [
        {"id": s, "instruction": t, "dataset": "generic", "session": None, "turn": None}
        for s, t in zip(IDS, INSTRUCTIONS, strict=True)
    ]
    write_inputs(folder, inputs)
    write_bundle(folder, rows, {"L1": "mean"})
    return folder


SC = {"s0": [8, 6], "s1": [3, 9], "s3": [5, 7]}
PQ = {"s0": [7, 9], "s1": [4, 2], "s3": [6, 6]}


def script(stub: StubJudge) -> None:
    for sample in SC:
        stub.script[(sample, "SC")] = [("answer", answer(SC[sample]))]
        stub.script[(sample, "PQ")] = [("answer", answer(PQ[sample]))]
    stub.script[("s2", "SC")] = [("answer", f"Looks fine to me. (key {SECRET})")]
    stub.script[("s3", "SC")] = [("status", 500), ("status", 500), ("answer", answer([5, 7]))]
    stub.script[("s4", "PQ")] = [("refuse", "I can't help with that.")]
    stub.script[("s5", "SC")] = [("status", 500)]


def openai_judge(stub: StubJudge, **kwargs) -> OpenAIJudge:
    return OpenAIJudge("judge", stub.url, KEY_ENV, **{"max_retries": 2, "timeout": 10, **kwargs})


def test_bundle_judged_through_openai_client(stub, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    script(stub)
    folder = make_bundle(tmp_path / "run")
    cache = AnswerCache(tmp_path / "cache")
    result = judge_bundle(folder, openai_judge(stub), BUILTIN, cache=cache, retry_delay=0.0)

    records = {(r.id, r.kind): r for r, _ in read_records(folder / "judge.jsonl")}
    assert len(records) == 12
    for (sample, kind), record in records.items():
        assert record.model == "judge" and record.backend == "openai"
        assert (record.prompt_set, record.prompt_sha256) == ("editbench-builtin", PROMPT_SHA256)
        assert record.sampling == {"temperature": 0.0, "max_tokens": 512, "image_format": "png",
                                   "image_size": 512, "seed": None}  # fmt: skip
        if (sample, kind) != ("s5", "SC"):  # an answer came back: its model id is recorded
            assert record.model_reported == REPORTED_MODEL
            assert record.system_fingerprint == "fp_stub"
    failed = {key for key, r in records.items() if r.failed}
    assert failed == {("s2", "SC"), ("s4", "PQ"), ("s5", "SC")}
    assert all(records[k].scores is None for k in failed)
    assert "no JSON object" in records[("s2", "SC")].reason
    assert records[("s4", "PQ")].reason.startswith("refused")
    assert "HTTP 500" in records[("s5", "SC")].reason
    # the openai client retried the 500s itself: 1 + max_retries requests, no loop of ours
    assert stub.count("s3", "SC") == 3 and records[("s3", "SC")].attempts == 3
    assert stub.count("s5", "SC") == 3 and records[("s5", "SC")].attempts == 3
    assert stub.count("s2", "SC") == 3  # an unparseable answer is asked again (1 + 2)
    assert stub.count("s4", "PQ") == 1  # a refusal is not
    assert records[("s2", "SC")].answer == "Looks fine to me. (key ***)"

    # Hand computation over the judged samples s0, s1, s3 (SC_i: 6, 3, 5; PQ_i: 7, 2, 6).
    expected = {
        "SC": (6 + 3 + 5) / 3,
        "PQ": (7 + 2 + 6) / 3,
        "O": (math.sqrt(42) + math.sqrt(6) + math.sqrt(30)) / 3,
    }
    for key, value in expected.items():
        assert result.summary[key] == pytest.approx(value)
    assert (result.summary["n_judged"], result.summary["failures"]) == (3, 3)
    assert result.summary["failure_rate"] == pytest.approx(0.5)

    bundle = read_bundle(folder)  # the manifest hashes the new and rewritten files
    assert {"judge.jsonl", JUDGE_METRICS} <= set(bundle.manifest["files"])
    rows = {(r["id"], r["metric"]): r["value"] for r in read_samples(folder / "samples.jsonl")}
    assert rows[("s0", "VIEScore_O")] == pytest.approx(math.sqrt(42))
    for sample in ("s2", "s4", "s5"):
        assert rows[(sample, "VIEScore_SC")] is None and rows[(sample, "VIEScore_O")] is None
        assert rows[(sample, FAILURE_RATE)] == 1.0
    assert rows[("s1", FAILURE_RATE)] == 0.0 and rows[("s3", "L1")] == pytest.approx(0.3)
    judged = json.loads((folder / JUDGE_METRICS).read_text())
    assert judged["metrics"]["test/VIEScore_SC"] == pytest.approx(expected["SC"])
    assert judged["metrics"][f"test/{FAILURE_RATE}"] == pytest.approx(0.5)
    assert judged["judge"]["models_reported"] == [REPORTED_MODEL]
    for path in [*folder.rglob("*"), *(tmp_path / "cache").rglob("*")]:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert all(r["headers"]["authorization"] == f"Bearer {SECRET}" for r in stub.requests)


def test_only_failed_asks_exactly_the_failed_prompts(stub, tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)  # a local server: no key needed
    script(stub)
    folder = make_bundle(tmp_path / "run")
    judge_bundle(folder, openai_judge(stub, max_retries=0), BUILTIN, retry_delay=0.0)
    before = (folder / "judge.jsonl").read_text().splitlines()
    stub.script = {}  # every prompt is now answered [7, 7]
    stub.requests.clear()
    result = judge_bundle(
        folder, openai_judge(stub, max_retries=0), BUILTIN, only_failed=True, retry_delay=0.0
    )
    assert sorted((r["sample"], r["kind"]) for r in stub.requests) == [
        ("s2", "SC"), ("s3", "SC"), ("s4", "PQ"), ("s5", "SC")
    ]  # fmt: skip
    after = (folder / "judge.jsonl").read_text().splitlines()
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert [(IDS[i // 2], "SC" if i % 2 == 0 else "PQ") for i in changed] == [
        ("s2", "SC"), ("s3", "SC"), ("s4", "PQ"), ("s5", "SC")
    ]  # fmt: skip
    assert result.failures == 0 and result.asked == 4
    assert result.summary["SC"] == pytest.approx((6 + 3 + 7 + 7 + 7 + 7) / 6)
    read_bundle(folder)
    # Another judge must not fill the gaps of this one's records.
    other = OpenAIJudge("another-judge", stub.url, KEY_ENV, max_retries=0)
    with pytest.raises(BundleError, match="would mix judges"):
        judge_bundle(folder, other, BUILTIN, only_failed=True)
    assert (folder / "judge.jsonl").read_text().splitlines() == after


def test_record_rules_and_summary():
    good = JudgeRecord("a", "SC", "openai", "m", "p", "h", scores=[4.0, 9.0])
    assert JudgeRecord.from_dict(json.loads(good.line())) == good
    with pytest.raises(ValueError, match="exactly when"):
        JudgeRecord("a", "SC", "openai", "m", "p", "h", scores=[4.0, 9.0], failed=True)
    with pytest.raises(ValueError, match="exactly when"):
        JudgeRecord("a", "PQ", "openai", "m", "p", "h", scores=None)
    with pytest.raises(ValueError, match="bad SC scores"):
        JudgeRecord("a", "SC", "openai", "m", "p", "h", scores=[11.0, 2.0])
    pq = JudgeRecord("a", "PQ", "openai", "m", "p", "h", scores=[2.5, 8.0])
    lost = JudgeRecord("b", "PQ", "openai", "m", "p", "h", failed=True, reason="timeout")
    scores = sample_scores([good, pq, lost], ["a", "b", "c"])
    assert (scores[0].sc, scores[0].pq, scores[0].o) == (4.0, 2.5, math.sqrt(10.0))
    assert scores[1].failed and "PQ: timeout" in scores[1].reason
    assert scores[2].failed and "SC: no record" in scores[2].reason
    summary = summarize(scores)
    assert summary["O"] == pytest.approx(math.sqrt(10.0)) and summary["n_judged"] == 1
    assert summary["failure_rate"] == pytest.approx(2 / 3)


def test_another_scheme_replaces_the_earlier_judgement(stub, tmp_path, monkeypatch):
    """VIEScore first, then ImgEdit's judge: the VIEScore rows and reductions leave the bundle,
    the ImgEdit rows (by the sample's category) take their place, and the bundle verifies."""
    monkeypatch.delenv(KEY_ENV, raising=False)
    folder = make_bundle(tmp_path / "run")
    judge_bundle(folder, openai_judge(stub), BUILTIN, retry_delay=0.0)
    assert "VIEScore_O" in read_bundle(folder).reductions
    inputs = [json.loads(line) for line in (folder / "inputs.jsonl").read_text().splitlines()]
    with pytest.raises(BundleError, match="no 'category'"):
        judge_bundle(folder, openai_judge(stub), load_imgedit_prompts(write_imgedit_prompts(
            tmp_path / "prompts.json")), retry_delay=0.0)  # fmt: skip
    write_inputs(folder, [{**row, "category": "add" if i % 2 else "style"}
                          for i, row in enumerate(inputs)])  # fmt: skip
    update_manifest(folder, ["inputs.jsonl"])
    stub.default = "Brief reasoning: ok\nCompliance: 4\nNaturalness: 3\nDetail: 3"  # 3.33
    prompts = load_imgedit_prompts(tmp_path / "prompts.json")
    result = judge_bundle(folder, openai_judge(stub), prompts, retry_delay=0.0)
    assert result.summary["type_scores"] == {"add": 3.33, "style": 3.33}
    bundle = read_bundle(folder)
    assert not any(name.startswith("VIEScore") for name in bundle.reductions)
    metrics = {r["metric"] for r in read_samples(folder / "samples.jsonl")}
    assert metrics == {"L1", "ImgEdit_add", "ImgEdit_style", "ImgEdit_failure_rate"}
    assert {r.kind for r, _ in read_records(folder / "judge.jsonl")} == {"ImgEdit"}
