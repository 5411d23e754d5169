"""VIEScore against a stub OpenAI-compatible judge on localhost and the tiny random LLaVA.

The stub server (stdlib ``http.server``) records every request and answers by a script keyed
by (sample, prompt kind). It tells the sample from the pixel value of the edited image it
receives (each test image is one flat 8-bit colour) and the kind from the number of images
(2 = SC, 1 = PQ), so it checks what was actually sent. Expected values are computed by hand
from the scripted scores: SC_i = min, PQ_i = min, O_i = sqrt(SC_i * PQ_i), means over the
scored images only.
"""

from __future__ import annotations

import io
import json
import math
import time

import numpy as np
import pytest
import torch
from fixtures.judge_stub import StubJudge, answer, serve
from PIL import Image

from metrics.judge.cache import AnswerCache, cache_key
from metrics.judge.images import png_bytes, to_pil_images
from metrics.judge.judges import generate_answer, load_judge, local_inputs
from metrics.judge.metric import VIEScore
from metrics.judge.prompts import PQ_PROMPT, PROMPT_SHA256, JudgeError, parse_scores, sc_prompt

KEY_ENV = "EDITBENCH_TEST_VIESCORE_KEY"
SECRET = "sk-test-0123456789-secret"
MODEL = "stub-judge-1"
INSTRUCTIONS = ["make the sky pink", "add a red hat", "remove the dog", "turn it into winter"]
SOURCE_LEVELS = [10, 20, 30, 40, 50, 60]
EDIT_LEVELS = [110, 120, 130, 140, 150, 160]  # the stub reads the sample id from these


# --------------------------------------------------------------------------- stub judge


def _sample_of(images) -> int:
    """The stub's sample id: the edited image's flat colour (-1 when there is no image)."""
    return EDIT_LEVELS.index(images[-1].getpixel((0, 0))[0]) if images else -1


@pytest.fixture
def judge():
    with serve(StubJudge(_sample_of)) as stub:
        yield stub


def batch(indices, size: int = 8, edit_levels=EDIT_LEVELS):
    """Flat-colour images in [-1, 1]: sources at SOURCE_LEVELS, edits at ``edit_levels``."""

    def flat(level: int) -> torch.Tensor:
        return torch.full((3, size, size), level / 255 * 2 - 1)

    source = torch.stack([flat(SOURCE_LEVELS[i]) for i in indices])
    preds = torch.stack([flat(edit_levels[i]) for i in indices])
    return source, preds, [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in indices]


def metric(judge, tmp_path, **kwargs) -> VIEScore:
    kwargs = {
        "model": MODEL,
        "base_url": judge.url,
        "api_key_env": KEY_ENV,
        "cache_dir": str(tmp_path / "cache"),
        "retry_delay": 0.0,
        "max_retries": 2,
        **kwargs,
    }
    return VIEScore(**kwargs)


def script_scores(judge, sc, pq) -> None:
    for i, (s, p) in enumerate(zip(sc, pq, strict=True)):
        judge.script[(i, "SC")] = [("answer", answer(s))]
        judge.script[(i, "PQ")] = [("answer", answer(p))]


SC_SCORES = [[8, 6], [3, 9], [10, 10], [5, 7]]
PQ_SCORES = [[7, 9], [4, 2], [9, 8], [6, 6]]
# Hand-computed: SC_i = min -> 6, 3, 10, 5; PQ_i = min -> 7, 2, 8, 6.
EXPECTED_SC = (6 + 3 + 10 + 5) / 4
EXPECTED_PQ = (7 + 2 + 8 + 6) / 4
EXPECTED_O = (math.sqrt(6 * 7) + math.sqrt(3 * 2) + math.sqrt(10 * 8) + math.sqrt(5 * 6)) / 4


def cache_files(tmp_path):
    return sorted((tmp_path / "cache").rglob("*.json"))


# --------------------------------------------------------------------------- (1) scoring


def test_well_formed_answers_give_hand_computed_scores(judge, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    script_scores(judge, SC_SCORES, PQ_SCORES)
    judge.delays = {0: 0.05}  # the first sample answers last: results must keep their order
    m = metric(judge, tmp_path, num_threads=4)
    for half in ([0, 1], [2, 3]):
        m.update(*batch(half))
    out = m.compute()

    assert out["SC"].item() == pytest.approx(EXPECTED_SC, abs=1e-6)
    assert out["PQ"].item() == pytest.approx(EXPECTED_PQ, abs=1e-6)
    assert out["O"].item() == pytest.approx(EXPECTED_O, abs=1e-5)
    assert out["failures"].item() == 0
    assert (m.calls, m.cache_hits) == (8, 0)

    assert len(judge.requests) == 8
    for request in judge.requests:
        assert request["headers"]["authorization"] == f"Bearer {SECRET}"
        assert request["body"]["model"] == MODEL
        assert request["body"]["temperature"] == 0
        i = request["sample"]
        if request["kind"] == "SC":
            source, edit = request["images"]
            assert source.getpixel((0, 0)) == (SOURCE_LEVELS[i],) * 3
            assert edit.getpixel((0, 0)) == (EDIT_LEVELS[i],) * 3
            assert f"Editing instruction: {INSTRUCTIONS[i]}" in request["text"]
        else:
            assert len(request["images"]) == 1 and request["text"] == PQ_PROMPT
    assert {(r["sample"], r["kind"]) for r in judge.requests} == {
        (i, k) for i in range(4) for k in ("SC", "PQ")
    }

    files = cache_files(tmp_path)
    assert len(files) == 8
    for path in files:
        assert SECRET not in path.read_text()
    provenance = json.dumps(m.provenance())
    assert SECRET not in provenance and KEY_ENV not in provenance
    assert json.loads(provenance)["prompt_sha256"] == PROMPT_SHA256
    assert SECRET not in repr(m.__dict__) and SECRET not in repr(m.state_dict())


def test_local_server_without_key_sends_no_authorization(judge, tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    m = metric(judge, tmp_path)
    m.update(*batch([0]))
    assert m.compute()["SC"].item() == 7.0
    assert all("authorization" not in r["headers"] for r in judge.requests)


def test_compute_before_update_is_nan_with_no_failures(judge, tmp_path):
    with pytest.warns(UserWarning):  # torchmetrics: compute before update
        out = metric(judge, tmp_path).compute()
    assert all(math.isnan(out[k].item()) for k in ("SC", "PQ", "O"))
    assert out["failures"].item() == 0


# --------------------------------------------------------------------------- (2) parsing


@pytest.mark.parametrize(
    "text",
    [
        '{"score": [7, 8], "reasoning": "ok"}',
        'Here is my evaluation:\n```json\n{\n  "score": [7, 8],\n  "reasoning": "ok"\n}\n```\nBye',
        '||V^=^V||\n{\n"score" : [7, 8.0],\n"reasoning" : "a {brace} inside"\n}\n||V^=^V||',
        'Scores {not json} then {"result": {"score": [7, 8]}}',
    ],
)
def test_parse_finds_the_json_answer(text):
    assert parse_scores(text, 2) == [7.0, 8.0]


@pytest.mark.parametrize(
    "text",
    [
        "I think it is a 7 out of 10.",
        '{"score": [7]}',
        '{"score": [7, 8, 9]}',
        '{"score": [11, 8]}',
        '{"score": [-1, 8]}',
        '{"score": ["7", 8]}',
        '{"score": [true, 8]}',
        '{"score": 7}',
        '{"reasoning": "no score"}',
        "",
    ],
)
def test_parse_rejects_bad_answers(text):
    with pytest.raises(JudgeError):
        parse_scores(text, 2)


def test_fenced_and_chatty_answers_are_scored(judge, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    fenced = 'Sure!\n```json\n{"score": [9, 4], "reasoning": "good"}\n```'
    chatty = 'My verdict follows. {"score": [6, 8], "reasoning": "fine"} Thanks!'
    judge.script[(0, "SC")] = [("answer", fenced)]
    judge.script[(0, "PQ")] = [("answer", chatty)]
    m = metric(judge, tmp_path)
    m.update(*batch([0]))
    out = m.compute()
    assert (out["SC"].item(), out["PQ"].item()) == (4.0, 6.0)
    assert out["O"].item() == pytest.approx(math.sqrt(24), abs=1e-6)
    assert len(judge.requests) == 2


# --------------------------------------------------------------------------- (3)-(4) failures


def test_malformed_answers_are_retried_then_excluded(judge, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    script_scores(judge, SC_SCORES + [[4, 9]], PQ_SCORES + [[8, 3]])
    judge.script[(0, "SC")] = [("answer", "The edit is good, 8/10.")]  # not JSON
    judge.script[(1, "PQ")] = [("answer", answer([7]))]  # one score for two
    judge.script[(2, "SC")] = [("answer", answer([11, 5]))]  # out of range
    judge.script[(3, "SC")] = [("answer", "garbage"), ("answer", answer([5, 7]))]
    m = metric(judge, tmp_path, max_retries=2)
    with pytest.warns(UserWarning, match="no valid SC answer for sample 0") as record:
        m.update(*batch([0, 1, 2, 3, 4]))
    messages = " ".join(str(w.message) for w in record)
    assert "no valid PQ answer for sample 1" in messages and "sample 2" in messages
    assert "'score' values must be numbers in [0, 10]" in messages
    out = m.compute()

    # Samples 0-2 failed; 3 (malformed then good) and 4 are scored: the means are over them
    # only (a failure scored 0 would pull SC to (0 + 0 + 0 + 5 + 4) / 5).
    assert out["failures"].item() == 3
    assert out["SC"].item() == pytest.approx((5 + 4) / 2)
    assert out["PQ"].item() == pytest.approx((6 + 3) / 2)
    assert out["O"].item() == pytest.approx((math.sqrt(30) + math.sqrt(12)) / 2, abs=1e-6)
    # 1 + max_retries requests for each malformed prompt, 2 for malformed-then-good.
    assert judge.count(0, "SC") == judge.count(1, "PQ") == judge.count(2, "SC") == 3
    assert judge.count(3, "SC") == 2 and judge.count(4, "SC") == judge.count(0, "PQ") == 1
    assert m.calls == len(judge.requests) == 3 * 3 + 2 + 6

    # Only parsed answers are cached: a second run asks the failed prompts again.
    assert len(cache_files(tmp_path)) == 10 - 3
    before = len(judge.requests)
    again = metric(judge, tmp_path, max_retries=0)
    with pytest.warns(UserWarning):
        again.update(*batch([0, 1, 2, 3, 4]))
    assert len(judge.requests) - before == 3 and again.cache_hits == 7


def test_slow_answers_time_out_and_are_counted(judge, tmp_path):
    judge.script[(0, "SC")] = [("sleep", 10.0, answer([9, 9]))]
    judge.script[(1, "SC")] = [("sleep", 10.0, answer([9, 9])), ("answer", answer([4, 6]))]
    m = metric(judge, tmp_path, timeout=0.3, max_retries=1, num_threads=4)
    start = time.perf_counter()
    with pytest.warns(UserWarning, match=r"sample 0 .* after 2 attempt\(s\).*timed out"):
        m.update(*batch([0, 1]))
    elapsed = time.perf_counter() - start
    # 2 x 0.3 s timeouts per prompt and the openai client's backoff (~0.5 s) between them,
    # far below the 10 s answers (loose bound: the test machine may be busy)
    assert elapsed < 7.0
    out = m.compute()
    assert out["failures"].item() == 1
    assert judge.count(0, "SC") == 2 and judge.count(1, "SC") == 2
    assert out["SC"].item() == 4.0 and out["PQ"].item() == 7.0


def test_http_errors_and_non_json_bodies_are_retried_then_counted(judge, tmp_path):
    judge.script[(0, "SC")] = [("status", 500)]
    judge.script[(1, "PQ")] = [("status", 503), ("answer", answer([3, 8]))]
    judge.script[(2, "PQ")] = [("raw", b"<html>Bad gateway</html>")]
    m = metric(judge, tmp_path, max_retries=3)
    with pytest.warns(UserWarning) as record:
        m.update(*batch([0, 1, 2]))
    messages = " ".join(str(w.message) for w in record)
    assert "sample 0" in messages and "HTTP 500" in messages
    assert "sample 2" in messages and "not JSON" in messages
    out = m.compute()
    assert out["failures"].item() == 2
    assert judge.count(0, "SC") == judge.count(2, "PQ") == 4 and judge.count(1, "PQ") == 2
    assert (out["SC"].item(), out["PQ"].item()) == (7.0, 3.0)


# --------------------------------------------------------------------------- (5) cache


def test_cache_hits_skip_requests_and_misses_on_changes(judge, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    script_scores(judge, SC_SCORES, PQ_SCORES)
    first = metric(judge, tmp_path)
    first.update(*batch([0, 1, 2, 3]))
    expected = first.compute()
    assert len(judge.requests) == 8

    second = metric(judge, tmp_path)
    second.update(*batch([0, 1, 2, 3]))
    assert len(judge.requests) == 8 and (second.calls, second.cache_hits) == (0, 8)
    for name, value in second.compute().items():
        assert torch.equal(value, expected[name]), name

    # Other instructions: new SC prompts miss, the PQ prompts (edited image only) still hit.
    source, preds, instructions = batch([0, 1])
    other = metric(judge, tmp_path)
    other.update(source, preds, [s + " please" for s in instructions])
    assert (other.calls, other.cache_hits) == (2, 2)
    assert {r["kind"] for r in judge.requests[8:]} == {"SC"}

    # Another edited image for the second sample (sample 4's colour, never sent so far): both
    # its prompts miss; the untouched first sample hits.
    before = len(judge.requests)
    changed = metric(judge, tmp_path)
    changed.update(*batch([0, 1], edit_levels=[EDIT_LEVELS[0], EDIT_LEVELS[4]]))
    assert (changed.calls, changed.cache_hits) == (2, 2)
    assert {(r["sample"], r["kind"]) for r in judge.requests[before:]} == {(4, "SC"), (4, "PQ")}

    # Another model name: nothing hits.
    renamed = metric(judge, tmp_path, model="another-judge")
    renamed.update(*batch([0]))
    assert (renamed.calls, renamed.cache_hits) == (2, 0)


def test_cache_key_covers_backend_model_prompt_settings_and_each_image():
    a, b = png_bytes(Image.new("RGB", (4, 4), 1)), png_bytes(Image.new("RGB", (4, 4), 2))
    settings = {"temperature": 0.0, "max_new_tokens": 64}
    base = cache_key("openai", "m", "prompt", [a, b], settings)
    variants = [
        cache_key("local", "m", "prompt", [a, b], settings),
        cache_key("openai", "m2", "prompt", [a, b], settings),
        cache_key("openai", "m", "prompt!", [a, b], settings),
        cache_key("openai", "m", "prompt", [b, a], settings),
        cache_key("openai", "m", "prompt", [a], settings),
        cache_key("openai", "m", "prompt", [a, b], {**settings, "temperature": 0.5}),
    ]
    assert base == cache_key("openai", "m", "prompt", [a, b], dict(settings))
    assert len({base, *variants}) == len(variants) + 1


def test_cache_files_are_atomic_json_and_bad_records_miss(tmp_path):
    cache = AnswerCache(tmp_path)
    key = "ab" + "0" * 62
    cache.put(key, {"scores": [3, 4], "answer": "x"})
    assert cache.get(key, "SC") == [3.0, 4.0]
    assert [p.name for p in tmp_path.rglob("*")] == ["ab", f"{key}.json"]  # no temp file left
    cache.path(key).write_text("{truncated")
    assert cache.get(key, "SC") is None
    cache.put(key, {"scores": [3, 12]})
    assert cache.get(key, "SC") is None
    cache.put(key, {"scores": [3, 4, 5]})  # three scores: an ImgEdit answer, not an SC one
    assert cache.get(key, "SC") is None and cache.get(key, "ImgEdit") == [3.0, 4.0, 5.0]


# --------------------------------------------------------------------------- (6) API key


def test_missing_api_key_for_remote_url_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(RuntimeError, match=KEY_ENV):
        VIEScore(
            base_url="https://judge.example.com/v1", api_key_env=KEY_ENV, cache_dir=str(tmp_path)
        )
    monkeypatch.setenv(KEY_ENV, SECRET)
    m = VIEScore(
        base_url="https://judge.example.com/v1", api_key_env=KEY_ENV, cache_dir=str(tmp_path)
    )
    monkeypatch.delenv(KEY_ENV)  # gone by the time of the request: no request is made
    with pytest.raises(RuntimeError, match=KEY_ENV):
        m.update(*batch([0]))
    assert m.calls == 0


def test_base_url_defaults_to_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITBENCH_VIESCORE_BASE_URL", "http://localhost:9999/v1")
    monkeypatch.delenv(KEY_ENV, raising=False)
    m = VIEScore(api_key_env=KEY_ENV, cache_dir=str(tmp_path))
    assert m.provenance()["base_url"] == "http://localhost:9999/v1"


def test_provenance_is_json_and_hides_url_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    url = "http://user:hunter2@localhost:8000/v1?api_key=hunter2#x"
    m = VIEScore(model="judge", base_url=url, api_key_env=KEY_ENV, cache_dir=str(tmp_path))
    provenance = json.loads(json.dumps(m.provenance()))
    assert provenance["base_url"] == "http://localhost:8000/v1"
    assert "hunter2" not in json.dumps(provenance)
    assert provenance["model"] == "judge" and provenance["backend"] == "openai"
    assert (provenance["temperature"], provenance["max_retries"]) == (0.0, 3)
    assert provenance["image_size"] == 512
    assert len(provenance["prompt_sha256"]) == 64
    with pytest.raises(ValueError, match="http"):
        VIEScore(base_url="file:///tmp/judge", api_key_env=KEY_ENV, cache_dir=str(tmp_path))


# --------------------------------------------------------------------------- images, inputs


def test_images_are_8bit_pngs_shrunk_on_the_longer_side():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(-1.1, 1.1, size=(2, 3, 10, 20)).astype(np.float32))
    expected = np.round(np.clip(x.numpy() / 2 + 0.5, 0, 1) * 255).astype(np.uint8)
    kept = to_pil_images(x, image_size=None)
    for image, ref in zip(kept, expected, strict=True):
        decoded = np.asarray(Image.open(io.BytesIO(png_bytes(image))))
        np.testing.assert_array_equal(decoded, ref.transpose(1, 2, 0))
    assert [im.size for im in to_pil_images(x, image_size=8)] == [(8, 4), (8, 4)]
    assert to_pil_images(x, image_size=20)[0].size == (20, 10)
    half = to_pil_images(x.to(torch.bfloat16), image_size=None)[0]
    assert half.size == (20, 10)


def test_bad_batches_name_the_problem(judge, tmp_path):
    m = metric(judge, tmp_path)
    source, preds, instructions = batch([0, 1])
    with pytest.raises(ValueError, match="2 instructions for 1 images"):
        m.update(source[:1], preds[:1], instructions)
    with pytest.raises(ValueError, match=r"`preds` must have shape \[B, 3, H, W\]"):
        m.update(source, preds[:, :1], instructions)
    with pytest.raises(TypeError, match="list of strings"):
        m.update(source[:1], preds[:1], "one string")
    with pytest.raises(ValueError, match="backend"):
        VIEScore(backend="gemini", cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="config.json"):
        VIEScore(backend="local", model_path=str(tmp_path / "nowhere"))


# --------------------------------------------------------------------------- (7) local backend


@pytest.fixture(scope="module")
def flat_pair():
    return Image.new("RGB", (40, 24), (200, 30, 30)), Image.new("RGB", (40, 24), (30, 200, 30))


def test_local_inputs_carry_one_image_input_per_image(tiny_dir, flat_pair):
    model, processor = load_judge(tiny_dir / "llava")
    per_image = model.config.image_seq_length
    token = model.config.image_token_id
    sc = local_inputs(processor, sc_prompt("make it blue"), list(flat_pair))
    assert sc["pixel_values"].shape[0] == 2
    assert int((sc["input_ids"] == token).sum()) == 2 * per_image
    assert "Editing instruction: make it blue" in processor.decode(sc["input_ids"][0])
    pq = local_inputs(processor, PQ_PROMPT, [flat_pair[1]])
    assert pq["pixel_values"].shape[0] == 1
    assert int((pq["input_ids"] == token).sum()) == per_image


def test_generate_answer_decodes_only_new_tokens(tiny_dir, flat_pair):
    model, processor = load_judge(tiny_dir / "llava")
    prompt = sc_prompt("make it blue")
    got = generate_answer(model, processor, prompt, list(flat_pair), max_new_tokens=6)
    inputs = local_inputs(processor, prompt, list(flat_pair))
    with torch.inference_mode():
        full = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    new = full[0, inputs["input_ids"].shape[1] :]
    assert 0 < len(new) <= 6
    assert got == processor.decode(new, skip_special_tokens=True)


def test_local_backend_counts_garbage_answers_as_failures(tiny_dir, tmp_path):
    m = VIEScore(
        backend="local",
        model_path=str(tiny_dir / "llava"),
        cache_dir=str(tmp_path / "cache"),
        max_new_tokens=8,
        max_retries=3,
    )
    with pytest.warns(UserWarning, match="no valid SC answer for sample 0"):
        m.update(*batch([0, 1, 2]))
    out = m.compute()
    assert out["failures"].item() == 3
    assert all(math.isnan(out[k].item()) for k in ("SC", "PQ", "O"))
    assert m.calls == 6  # greedy: one attempt per prompt, a retry would repeat the answer
    assert cache_files(tmp_path) == []
    assert m.provenance()["model"] == str((tiny_dir / "llava").resolve())


# --------------------------------------------------------------------------- (8) sum states


def test_sum_states_merge_like_one_metric_on_all_images(judge, tmp_path):
    script_scores(judge, SC_SCORES, PQ_SCORES)
    judge.script[(1, "SC")] = [("status", 500)]  # one failure, to merge the count too
    names = ("sum_sc", "sum_pq", "sum_o", "num_scored", "num_failed")
    with pytest.warns(UserWarning):
        whole = metric(judge, tmp_path, use_cache=False, max_retries=0)
        whole.update(*batch([0, 1, 2, 3]))
        parts = [metric(judge, tmp_path, use_cache=False, max_retries=0) for _ in range(2)]
        parts[0].update(*batch([0, 1]))
        parts[1].update(*batch([2, 3]))
        by_hand = {n: getattr(parts[0], n) + getattr(parts[1], n) for n in names}
        parts[0].merge_state(parts[1])
        merged, reference = parts[0].compute(), whole.compute()
    for n in names:
        assert torch.allclose(by_hand[n].double(), getattr(whole, n).double()), n
    for key in ("SC", "PQ", "O", "failures"):
        assert torch.allclose(merged[key].double(), reference[key].double()), key
    assert reference["failures"].item() == 1
    assert reference["SC"].item() == pytest.approx((6 + 10 + 5) / 3)


def test_evaluator_feeds_instructions_and_skips_the_copy_baseline(judge, tmp_path, monkeypatch):
    """Through the test loop's EditEvaluator: VIEScore gets (source, edit, instruction), its
    SC/PQ/O/failures become flat results, and the judge is not paid for the copy baseline."""
    from metrics.evaluation import EditEvaluator
    from metrics.protocols import get_protocol

    monkeypatch.setenv(KEY_ENV, SECRET)
    script_scores(judge, SC_SCORES, PQ_SCORES)
    source, preds, instructions = batch([0, 1, 2, 3])
    kwargs = {
        "model": MODEL,
        "base_url": judge.url,
        "api_key_env": KEY_ENV,
        "cache_dir": str(tmp_path / "cache"),
        "retry_delay": 0.0,
    }
    evaluator = EditEvaluator(
        get_protocol("generic"), ["L1", "VIEScore"], metric_kwargs={"VIEScore": kwargs}
    )
    data = {"id": list("abcd"), "source": source, "target": source, "instruction": instructions}
    evaluator.update(data, preds)
    results = evaluator.compute()
    assert results["test/VIEScore_SC"] == pytest.approx(EXPECTED_SC)
    assert results["test/VIEScore_PQ"] == pytest.approx(EXPECTED_PQ)
    assert results["test/VIEScore_O"] == pytest.approx(EXPECTED_O)
    assert results["test/VIEScore_failures"] == 0
    assert "test/copy/L1" in results and not any(k.startswith("test/copy/VIE") for k in results)
    assert judge.count() == 8  # 4 SC + 4 PQ requests, none for the copy baseline
    sc_requests = [r for r in judge.requests if r["kind"] == "SC"]
    assert all(INSTRUCTIONS[r["sample"]] in r["text"] for r in sc_requests)
    assert evaluator.metric_provenance()["VIEScore"]["prompt_sha256"]
