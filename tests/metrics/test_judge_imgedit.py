"""ImgEdit-Bench's judge rules (metrics/judge/imgedit.py) against the release's own examples and
rule, as ``Benchmark/Basic/basic_bench_readme.md`` and ``step1_get_avgscore.py`` state them:
a score line is one that splits on ``": "`` into exactly two parts whose second is all digits;
the image's score is their mean rounded to two decimals; no score line, no score.
"""

from __future__ import annotations

import json

import pytest
from fixtures.benchmarks import imgedit_prompt, write_imgedit_prompts

from editbench.cli import main
from metrics.judge.imgedit import (
    EDIT_PLACEHOLDER,
    image_score,
    load_imgedit_prompts,
    parse_imgedit_scores,
    type_scores,
)
from metrics.judge.prompts import JudgeError
from metrics.judge.record import JudgeRecord

# The two answers of the README's result.json example (keys 1082 and 1068), as printed there.
README_1082 = (
    "Brief reasoning: No texture change applied; shell remains textured; tortoise geometry "
    "unchanged.\nPrompt Compliance: 1\nVisual Seamlessness: 1\nPhysical & Detail Fidelity: 1"
)
README_1068 = (
    "Brief reasoning: No fur change; wrong subject; mainly butterfly retained with minor color "
    "alteration.\nPrompt Compliance: 1\nVisual Seamlessness: 4\nPhysical & Detail Fidelity: 4"
)


def test_readme_answers_score_by_the_rule():
    # README step 1 prints 1082 -> 1 (as the rule gives) and 1068 -> 3.333..., which its own
    # printed answer (1, 4, 4) does not give: the README's averages are illustrative. The
    # code's rule (mean, rounded to 2 decimals) is the one followed: 3.0.
    assert parse_imgedit_scores(README_1082) == [1.0, 1.0, 1.0]
    assert image_score(parse_imgedit_scores(README_1082)) == 1.0
    assert parse_imgedit_scores(README_1068) == [1.0, 4.0, 4.0]
    assert image_score(parse_imgedit_scores(README_1068)) == 3.0
    assert image_score([1.0, 4.0, 5.0]) == 3.33  # two decimals


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Prompt Compliance: 4.\nVisual Naturalness: 3", [3.0]),  # "4." is not all digits
        ("**Prompt Compliance**: 4/5\nDetail: 2", [2.0]),
        ("  Prompt Compliance: 5  \n", [5.0]),  # the line is stripped first
        ("a: b: 3\nc: 4", [4.0]),  # three parts: not a score line
        ("Prompt Compliance:4\nNaturalness: 10", [10.0]),  # no space: no; 10 is digits: yes
        ("Brief reasoning: 3\nCompliance: 5", [3.0, 5.0]),  # the rule does not look at names
    ],
)
def test_score_lines_follow_the_release_rule(answer, expected):
    assert parse_imgedit_scores(answer) == expected


@pytest.mark.parametrize("answer", ["", "Prompt Compliance: four", "Score: 4.5\nOverall: 3/5"])
def test_an_answer_without_a_score_line_fails(answer):
    with pytest.raises(JudgeError):
        parse_imgedit_scores(answer)


def test_type_scores_are_rounded_means_of_rounded_image_scores():
    images = {"a": image_score([1, 4, 5]), "b": image_score([5, 5, 4]), "c": 2.0}
    assert images == {"a": 3.33, "b": 4.67, "c": 2.0}
    kinds = {"a": "add", "b": "add", "c": "style"}
    assert type_scores(images, kinds) == {"add": 4.0, "style": 2.0}  # (3.33 + 4.67) / 2


def test_prompts_read_from_the_file_its_folder_or_the_repository(tmp_path):
    path = write_imgedit_prompts(tmp_path / "repo" / "Benchmark" / "Basic" / "prompts.json")
    for given in (path, path.parent, tmp_path / "repo"):
        prompts = load_imgedit_prompts(given)
        assert prompts.path == str(path.resolve())
        assert prompts.templates["add"] == imgedit_prompt("add")
    assert prompts.prompt("style", "make it ukiyo-e") == imgedit_prompt("style").replace(
        EDIT_PLACEHOLDER, "make it ukiyo-e"
    )
    assert prompts.describe()["prompt_files"]["prompts.json"] == prompts.files["prompts.json"]
    with pytest.raises(KeyError, match="'action'"):
        prompts.prompt("action", "x")
    with pytest.raises(ValueError, match="no prompt for edit type"):
        load_imgedit_prompts(path, edit_types=["add", "action"])


def test_bad_prompt_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="--prompts_path"):
        load_imgedit_prompts(tmp_path)
    bad = tmp_path / "prompts.json"
    bad.write_text(json.dumps({"add": "rate it"}))
    with pytest.raises(ValueError, match=r"prompts.json, key 'add'.*<edit_prompt>"):
        load_imgedit_prompts(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected an object"):
        load_imgedit_prompts(bad)


def test_records_hold_imgedit_scores():
    record = JudgeRecord("imgedit/1", "ImgEdit", "openai", "m", "p", "h", scores=[4.0, 3.0, 3.0])
    assert JudgeRecord.from_dict(json.loads(record.line())) == record
    with pytest.raises(ValueError, match="bad ImgEdit scores"):
        JudgeRecord("imgedit/1", "ImgEdit", "openai", "m", "p", "h", scores=[4.5])
    with pytest.raises(ValueError, match="bad SC scores"):  # VIEScore's rule stays its own
        JudgeRecord("s", "SC", "openai", "m", "p", "h", scores=[4.0, 3.0, 3.0])
    with pytest.raises(ValueError, match="unknown judge question kind"):
        JudgeRecord("s", "XY", "openai", "m", "p", "h", scores=[1.0])


def test_judge_command_errors_name_the_problem(tmp_path, capsys):
    args = ["judge", "--bundle", str(tmp_path), "--scheme", "imgedit", "--base_url",
            "http://127.0.0.1:9/v1"]  # fmt: skip
    assert main(args) == 2
    assert "needs --prompts_path" in capsys.readouterr().err
    assert main([*args, "--preset", "viescore-release"]) == 2
    assert "viescore's judge, but this bundle is judged by imgedit" in capsys.readouterr().err
