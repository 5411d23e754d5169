"""``python -m editbench report`` on fabricated ``test_metrics.json`` files, and the MGIE numbers
of :mod:`metrics.published` against the paper's text.

The runs are written here with known values (3 seeds of two models on two datasets); cells are
checked against numpy's mean and sample std, best marks against the metrics' directions.
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from editbench.cli import main
from editbench.commands.report import PROVENANCE_KEYS, ReportError

SEEDS = (0, 1, 2)
COLUMNS = {"magicbrush": ["L1", "DINO", "CVS", "CTS"], "ma5k": ["L1", "SSIM", "LPIPS"]}
SCALE = {"L1": 1, "DINO": 100, "CVS": 100, "CTS": 100, "SSIM": 100, "LPIPS": 1}
# model -> metric -> per-seed values; A is better on L1/LPIPS/SSIM, B on DINO/CVS/CTS.
_RNG = np.random.default_rng(0)
VALUES = {
    "inspix2pix_a": {
        "L1": 0.05 + 0.01 * _RNG.random(3),
        "DINO": 70 + _RNG.random(3),
        "CVS": 80 + _RNG.random(3),
        "CTS": 28 + _RNG.random(3),
        "SSIM": 70 + _RNG.random(3),
        "LPIPS": 0.2 + 0.01 * _RNG.random(3),
    },
    "mgie_b": {
        "L1": 0.09 + 0.01 * _RNG.random(3),
        "DINO": 80 + _RNG.random(3),
        "CVS": 90 + _RNG.random(3),
        "CTS": 30 + _RNG.random(3),
        "SSIM": 60 + _RNG.random(3),
        "LPIPS": 0.3 + 0.01 * _RNG.random(3),
    },
}
COPY = {"L1": 0.04, "DINO": 90.0, "CVS": 94.0, "CTS": 27.0, "SSIM": 80.0, "LPIPS": 0.1}


def protocol(dataset: str, seed: int) -> dict:
    metrics = {
        "L1": {"preprocess": "[0, 1] images"},
        "DINO": {
            "backbone": {"path": "/x/dino-vits16", "sha256": "ab12cd34ef"},
            "preprocess": "resize 256 bicubic, center crop 224",
        },
        "CVS": {"backbone": {"path": "/x/clip-vit-base-patch32", "sha256": "99aa88bb77"}},
        "CTS": {"backbone": {"path": "/x/clip-vit-base-patch32", "sha256": "99aa88bb77"}},
        "SSIM": {"kernel": 11, "sigma": 1.5},
        "LPIPS": {"backbone": {"path": "/x/alexnet.pth", "sha256": "5566"}},
    }
    return {
        "name": dataset,
        "columns": COLUMNS[dataset],
        "scale": {m: SCALE[m] for m in COLUMNS[dataset]},
        "split": "test",
        "num_samples": 1053 if dataset == "magicbrush" else 4950,
        "resolution": 256,
        "resize": "shorter side 256, center crop",
        "caption_source": "local" if dataset == "magicbrush" else None,
        "turn_mode": "independent" if dataset == "magicbrush" else None,
        "aggregation": "all",
        "metrics": {m: metrics[m] for m in COLUMNS[dataset]},
        "seed": seed,
        "editbench_version": "0.1.0",
        "git_commit": f"abc{seed}",
    }


def document(name: str, dataset: str, seed: int) -> dict:
    table = {m: float(VALUES[name][m][seed]) for m in COLUMNS[dataset]}
    return {
        "format": "editbench.test_metrics/1",
        "model": {"class_path": f"models.x.{name.upper()}", "name": name.upper()},
        "run": {
            "name": name,
            "log_dir": f"runs/{name}/version_{seed}",
            "seed": seed,
            "sampler": {"num_inference_steps": 100, "guidance_scale": 7.5},
        },
        "dataset": dataset,
        "metrics": {f"test/{m}": v for m, v in table.items()},
        "table": table,
        "copy_table": {m: COPY[m] for m in COLUMNS[dataset]},
        "protocol": protocol(dataset, seed),
    }


def write(path: Path, doc: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def runs(tmp_path) -> Path:
    """runs/<dataset>/<model>/version_<seed>/test_metrics.json, as Lightning lays them out."""
    root = tmp_path / "runs"
    for dataset in COLUMNS:
        for name in VALUES:
            for seed in SEEDS:
                write(
                    root / dataset / name / f"version_{seed}" / "test_metrics.json",
                    document(name, dataset, seed),
                )
    return root


def report(args: list[str], out: Path, capsys) -> tuple[str, list[dict]]:
    assert main(["report", *args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    markdown = (out / "report.md").read_text()
    assert printed == markdown
    with open(out / "report.csv", newline="") as f:
        return markdown, list(csv.DictReader(f))


def error(args: list[str], capsys) -> str:
    """The one-line error of a failing report (exit status 2), or the raised ReportError's text
    while the CLI's USER_ERRORS does not list ReportError yet."""
    try:
        status = main(["report", *args])
    except ReportError as err:
        return str(err)
    assert status == 2
    return capsys.readouterr().err


def table_rows(markdown: str) -> dict[str, list[str]]:
    """Markdown table -> {first cell: the other cells}, the header under the key 'Model'."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| "):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


# ----------------------------------------------------------------------------- aggregation


def test_csv_cells_are_numpy_mean_and_sample_std(runs, tmp_path, capsys):
    _, rows = report([str(runs)], tmp_path / "out", capsys)
    assert [r["row"] for r in rows] == list(VALUES)
    for row in rows:
        for dataset, metrics in COLUMNS.items():
            for metric in metrics:
                values = VALUES[row["row"]][metric]
                assert float(row[f"{dataset}/{metric} mean"]) == pytest.approx(
                    np.mean(values), rel=1e-12
                )
                assert float(row[f"{dataset}/{metric} std"]) == pytest.approx(
                    np.std(values, ddof=1), rel=1e-9
                )
                assert row[f"{dataset}/{metric} n"] == "3"


def test_columns_follow_mgie_dataset_order(runs, tmp_path, capsys):
    extra = document("mgie_b", "ma5k", 0)
    extra["dataset"] = extra["protocol"]["name"] = "aaa_custom"
    write(tmp_path / "custom" / "test_metrics.json", extra)
    markdown, rows = report([str(runs), str(tmp_path / "custom")], tmp_path / "out", capsys)
    header = table_rows(markdown)["Model"]
    assert header[:3] == ["MA5k L1↓", "MA5k SSIM↑", "MA5k LPIPS↓"]
    assert header[3:7] == [
        "MagicBrush L1↓",
        "MagicBrush DINO↑",
        "MagicBrush CVS↑",
        "MagicBrush CTS↑",
    ]
    assert header[7:] == ["aaa_custom L1↓", "aaa_custom SSIM↑", "aaa_custom LPIPS↓"]
    # Rows now differ in run counts (mgie_b has one aaa_custom run): n is shown.
    assert "(n=1)" in table_rows(markdown)["mgie_b"][7]
    assert "(n=3)" in table_rows(markdown)["mgie_b"][0]


def test_markdown_cells_and_best_marks_follow_direction(runs, tmp_path, capsys):
    markdown, _ = report([str(runs)], tmp_path / "out", capsys)
    rows = table_rows(markdown)
    header = rows["Model"]
    for dataset, metrics in COLUMNS.items():
        for metric in metrics:
            title = "MagicBrush" if dataset == "magicbrush" else "MA5k"
            index = next(i for i, h in enumerate(header) if h.startswith(f"{title} {metric}"))
            means = {name: np.mean(VALUES[name][metric]) for name in VALUES}
            lower = metric in ("L1", "LPIPS")
            best = min(means, key=means.get) if lower else max(means, key=means.get)
            for name in VALUES:
                cell = rows[name][index]
                assert cell.startswith("**") == (name == best), (metric, name, cell)
                places = 2 if means[name] >= 1 else 3
                mean, std = means[name], np.std(VALUES[name][metric], ddof=1)
                assert cell.strip("*") == f"{mean:.{places}f} ± {std:.{places}f}"
    assert "(n=" not in markdown.split("\n\n")[1]  # equal run counts: no n in the table


def test_single_run_shows_no_plus_minus(runs, tmp_path, capsys):
    path = runs / "magicbrush" / "mgie_b" / "version_0"
    markdown, rows = report([str(path)], tmp_path / "out", capsys)
    cell = table_rows(markdown)["mgie_b"][0]
    assert cell == f"{VALUES['mgie_b']['L1'][0]:.3f}"  # no ±, and no bold for a lone row
    assert rows[0]["magicbrush/L1 std"] == "" and rows[0]["magicbrush/L1 n"] == "1"


def test_group_by_model_name(runs, tmp_path, capsys):
    doc = document("mgie_b", "ma5k", 0)
    doc["run"]["name"] = "another_name"
    write(tmp_path / "more" / "test_metrics.json", doc)
    args = [str(runs), str(tmp_path / "more")]
    _, by_run = report(args, tmp_path / "a", capsys)
    assert [r["row"] for r in by_run] == ["inspix2pix_a", "mgie_b", "another_name"]
    _, by_model = report([*args, "--group-by", "model.name"], tmp_path / "b", capsys)
    assert [r["row"] for r in by_model] == ["INSPIX2PIX_A", "MGIE_B"]
    assert by_model[1]["ma5k/L1 n"] == "4"
    values = [*VALUES["mgie_b"]["L1"], VALUES["mgie_b"]["L1"][0]]
    assert float(by_model[1]["ma5k/L1 mean"]) == pytest.approx(np.mean(values), rel=1e-12)


def test_footnotes_describe_the_protocol(runs, tmp_path, capsys):
    markdown, _ = report([str(runs)], tmp_path / "out", capsys)
    notes = markdown.split("\n\n", 2)[2]
    magicbrush = next(line for line in notes.splitlines() if line.startswith("- MagicBrush:"))
    for text in (
        "1053 samples",
        "256 px",
        "captions: local",
        "turns: independent",
        "dino-vits16 (ab12cd34)",
    ):
        assert text in magicbrush
    assert "inspix2pix_a: runs 3 on MA5k, 3 on MagicBrush; seeds 0, 1, 2; sampler" in notes


# ----------------------------------------------------------------------------- protocols


def test_provenance_keys_do_not_split_columns(runs, tmp_path, capsys):
    # The fixture's runs already differ in seed and git_commit: the report must accept them.
    assert {"seed", "editbench_version", "git_commit"} == PROVENANCE_KEYS
    path = runs / "ma5k" / "mgie_b" / "version_1" / "test_metrics.json"
    doc = json.loads(path.read_text())
    doc["protocol"]["editbench_version"] = "9.9"
    write(path, doc)
    # The same backbone (same sha256) in another folder, as on another machine: still comparable.
    doc["protocol"]["metrics"]["LPIPS"]["backbone"]["path"] = "/elsewhere/alexnet.pth"
    write(path, doc)
    markdown, _ = report([str(runs)], tmp_path / "out", capsys)
    assert "†" not in markdown


def test_mixed_protocol_is_an_error_naming_field_and_runs(runs, capsys):
    path = runs / "magicbrush" / "mgie_b" / "version_2" / "test_metrics.json"
    doc = json.loads(path.read_text())
    doc["protocol"]["caption_source"] = "global"
    doc["protocol"]["metrics"]["DINO"]["backbone"]["sha256"] = "ffff0000"
    write(path, doc)
    message = error([str(runs)], capsys)
    reference = runs / "magicbrush" / "inspix2pix_a" / "version_0"
    expected = (
        f"magicbrush/CTS: caption_source differs: 'local' ({reference}) vs 'global' ({path.parent})"
    )
    assert expected in message
    assert (
        f"magicbrush/DINO: metrics.DINO.backbone.sha256 differs: 'ab12cd34ef' ({reference}) vs "
        f"'ffff0000' ({path.parent})" in message
    )
    # Another metric's backbone is not part of the L1 column's protocol; ma5k is untouched.
    assert "magicbrush/L1: metrics" not in message
    assert "ma5k/" not in message


def test_allow_mixed_marks_cells_and_lists_fields(runs, tmp_path, capsys):
    path = runs / "magicbrush" / "mgie_b" / "version_2" / "test_metrics.json"
    doc = json.loads(path.read_text())
    doc["protocol"]["caption_source"] = "global"
    write(path, doc)
    markdown, _ = report([str(runs), "--allow-mixed"], tmp_path / "out", capsys)
    rows = table_rows(markdown)
    header = rows["Model"]
    cts = header.index("MagicBrush CTS↑")
    assert rows["mgie_b"][cts].endswith("†")
    assert not rows["inspix2pix_a"][cts].endswith("†")
    assert not any(rows[name][cts].startswith("**") for name in VALUES)  # mixed: not ranked
    assert rows["mgie_b"][header.index("MA5k L1↓")].count("†") == 0
    assert "† magicbrush/CTS: caption_source differs: 'local'" in markdown
    assert f"'global' ({path.parent})" in markdown


# ----------------------------------------------------------------------------- extra rows


def test_published_rows_show_the_paper_values_unranked(runs, tmp_path, capsys):
    markdown, rows = report([str(runs), "--published", "mgie-zero-shot"], tmp_path / "out", capsys)
    table = table_rows(markdown)
    header = table["Model"]
    assert not any(h.startswith("EVR") or h.startswith("GIER") for h in header)
    # MGIE Table 1 as printed: MA5k 0.133 / 66.25 / 0.298; MagicBrush 0.082 / 82.22 / 91.14 / 30.40.
    assert table["MGIE (paper)"] == ["0.133", "66.25", "0.298", "0.082", "82.22", "91.14", "30.40"]
    assert table["Text2LIVE (paper)"][6] == "23.59"
    assert "InsPix2Pix (paper)" in table and "LGIE (paper)" in table
    assert not any(
        c.startswith("**") for name, cells in table.items() if "(paper)" in name for c in cells
    )
    paper = {r["row"]: r for r in rows}["MGIE (paper)"]
    assert paper["kind"] == "paper" and float(paper["magicbrush/DINO mean"]) == 82.22
    assert "MGIE Table 1" in markdown


def test_published_rows_follow_the_runs_scale(runs, tmp_path, capsys):
    for path in runs.rglob("test_metrics.json"):
        doc = json.loads(path.read_text())
        if doc["dataset"] == "magicbrush":
            doc["protocol"]["scale"]["DINO"] = 1  # raw cosines in this table
            doc["table"]["DINO"] /= 100
            write(path, doc)
    _, rows = report([str(runs), "--published", "mgie-fine-tuned"], tmp_path / "out", capsys)
    paper = {r["row"]: r for r in rows}["MGIE (paper)"]
    assert float(paper["magicbrush/DINO mean"]) == pytest.approx(0.9065)  # Table 2: 90.65
    assert float(paper["magicbrush/CVS mean"]) == pytest.approx(95.28)


def test_copy_baseline_row(runs, tmp_path, capsys):
    markdown, rows = report([str(runs), "--copy-baseline"], tmp_path / "out", capsys)
    copy_row = {r["row"]: r for r in rows}["copy input"]
    assert float(copy_row["ma5k/L1 mean"]) == pytest.approx(COPY["L1"])
    assert copy_row["ma5k/L1 n"] == "6" and float(copy_row["ma5k/L1 std"]) == 0.0
    # The copy row does not compete: L1 is still best for the model with the lower mean.
    assert not table_rows(markdown)["copy input"][0].startswith("**")


# ----------------------------------------------------------------------------- inputs


def test_glob_patterns_are_expanded(runs, tmp_path, capsys):
    _, direct = report([str(runs)], tmp_path / "a", capsys)
    pattern = str(runs / "*" / "*" / "version_*")
    _, globbed = report([pattern], tmp_path / "b", capsys)
    assert globbed == direct
    _, json_glob = report([str(runs / "**" / "test_metrics.json")], tmp_path / "c", capsys)
    assert json_glob == direct


def test_nothing_found_names_the_paths(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    pattern = str(tmp_path / "none_*")
    message = error([missing, pattern], capsys)
    assert missing in message and pattern in message


def test_malformed_files_name_the_file_and_key(runs, tmp_path, capsys):
    doc = document("mgie_b", "ma5k", 0)
    del doc["protocol"]
    bad = write(tmp_path / "bad1" / "test_metrics.json", doc)
    message = error([str(bad)], capsys)
    assert str(bad) in message and "'protocol'" in message

    doc = document("mgie_b", "ma5k", 0)
    del doc["table"]["SSIM"]
    bad = write(tmp_path / "bad2" / "test_metrics.json", doc)
    message = error([str(bad)], capsys)
    assert str(bad) in message and "'table.SSIM'" in message

    bad = tmp_path / "bad3" / "test_metrics.json"
    bad.parent.mkdir()
    bad.write_text('{"format": "editbench.test_metrics/1",\n "model": }')
    message = error([str(bad)], capsys)
    assert str(bad) in message and "line 2" in message

    doc = copy.deepcopy(document("mgie_b", "ma5k", 0))
    del doc["copy_table"]
    bad = write(tmp_path / "bad4" / "test_metrics.json", doc)
    assert main(["report", str(bad), "--out", str(tmp_path / "o")]) == 0  # not needed
    capsys.readouterr()
    message = error([str(bad), "--copy-baseline"], capsys)
    assert str(bad) in message and "'copy_table'" in message
