"""``python -m editbench report --html``: the page written for two real tiny ``test`` runs (αV 1.0
and 2.0 on 7 synthetic samples) parsed back (rows, images, numbers against samples.jsonl), its
errors, and the page driven in Debian's Chromium by Playwright (sorting by a metric and by the
difference of two runs, images decoded), marked ``browser`` and ``slow``."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import pytest

from editbench.cli import main
from editbench.commands.report import ReportError
from metrics.bundle import read_samples

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "experiments" / "tiny" / "inspix2pix.yaml")
CHROMIUM = "/usr/bin/chromium"
NUM_TEST = 7
ALPHAS = (1.0, 2.0)
LIMIT = 4  # images of the first 4 rows embedded, the other 3 linked


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory) -> list[Path]:
    """Two real `test` runs of the tiny InsPix2Pix at αV 1.0 and 2.0 (in process)."""
    from datamodules.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("synthetic-html")
    generate_synthetic(root, num_train=4, num_val=2, num_test=NUM_TEST, resolution=32, seed=0)
    save = tmp_path_factory.mktemp("runs-html")
    for alpha in ALPHAS:
        assert main([
            "test", "-c", CONFIG,
            "--model.init_args.diffusion_path", str(tiny_dir / "instruct-pix2pix"),
            "--model.init_args.num_inference_steps", "2",
            "--model.init_args.image_guidance_scale", str(alpha),
            "--data.init_args.root", str(root),
            "--data.init_args.num_train", "4",
            "--data.init_args.num_val", "2",
            "--data.init_args.num_test", str(NUM_TEST),
            "--data.init_args.batch_size", "4",
            "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(save),
        ]) == 0  # fmt: skip
    folders = sorted(save.glob("tiny_inspix2pix/version_*"))
    assert len(folders) == 2
    return folders


@pytest.fixture(scope="module")
def page(runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report-html")
    argv = ["report", *map(str, runs), "--out", str(out), "--html", "--html_limit", str(LIMIT)]
    assert main(argv) == 0
    assert (out / "report.md").is_file()
    return out / "report.html"


class Page(HTMLParser):
    """The sample rows of a report page: per row its id, instruction, images and scores."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []
        self.cell: str | None = None
        self.text: list[str] = []
        self.svg = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "svg":
            self.svg += 1
        if tag == "tr" and a.get("class") == "sample":
            self.rows.append({"id": a["data-id"], "images": [], "scores": {}})
        elif not self.rows:
            return
        elif tag == "img":
            self.rows[-1]["images"].append((a["alt"], a["src"]))
        elif tag == "td" and a.get("class") in ("score", "instruction"):
            self.cell, self.text = a.get("class"), []
            if self.cell == "score":
                raw = a["data-value"]
                self.rows[-1]["scores"][(int(a["data-run"]), a["data-metric"])] = [
                    float(raw) if raw else None
                ]

    def handle_data(self, data):
        if self.cell is not None:
            self.text.append(data)

    def handle_endtag(self, tag):
        if tag == "td" and self.cell is not None:
            text = "".join(self.text)
            if self.cell == "instruction":
                self.rows[-1]["instruction"] = text
            else:
                list(self.rows[-1]["scores"].values())[-1].append(text)
            self.cell = None


def parse_html(text: str) -> Page:
    parser = Page()
    parser.feed(text)
    return parser


def parse(path: Path) -> Page:
    return parse_html(path.read_text(encoding="utf-8"))


def model_values(folder: Path) -> dict[str, dict[str, float | None]]:
    """metric -> id -> value of a run's model rows (aggregation ``all``), from samples.jsonl."""
    out: dict[str, dict[str, float | None]] = {}
    for row in read_samples(folder / "samples.jsonl"):
        if row["system"] == "model" and row["aggregation"] == "all":
            out.setdefault(row["metric"], {})[row["id"]] = row["value"]
    return out


def expected_image(runs: list[Path], sample_id: str, alt: str) -> Path:
    if alt in ("source", "target"):
        return runs[0] / f"{alt}s" / f"{sample_id}.png"
    index = [f"edit tiny_inspix2pix · {r.name}" for r in runs].index(alt)
    return runs[index] / "images" / f"{sample_id}.png"


def test_rows_images_and_numbers_are_the_bundles(page, runs):
    parsed = parse(page)
    ids = sorted({r["id"] for r in read_samples(runs[0] / "samples.jsonl")})
    assert len(ids) == NUM_TEST
    assert [r["id"] for r in parsed.rows] == ids  # id order before any sorting
    inputs = [json.loads(line) for line in (runs[0] / "inputs.jsonl").read_text().splitlines()]
    instructions = {r["id"]: r["instruction"] for r in inputs}
    embedded = linked = 0
    for index, row in enumerate(parsed.rows):
        assert row["instruction"] == instructions[row["id"]]
        alts = sorted(alt for alt, _ in row["images"])
        assert alts == sorted(
            ["source", "target", *(f"edit tiny_inspix2pix · {r.name}" for r in runs)]
        )
        for alt, src in row["images"]:
            path = expected_image(runs, row["id"], alt)
            if src.startswith("data:image/png;base64,"):
                assert index < LIMIT
                assert base64.b64decode(src.split(",", 1)[1]) == path.read_bytes()
                embedded += 1
            else:
                assert index >= LIMIT
                assert (page.parent / src).resolve() == path.resolve()
                linked += 1
    assert (embedded, linked) == (4 * LIMIT, 4 * (NUM_TEST - LIMIT))
    for run_index, folder in enumerate(runs):
        values = model_values(folder)
        assert set(values) == {"L1", "L1_edit", "SSIM"}
        for metric, by_id in values.items():
            for row in parsed.rows:
                shown, text = row["scores"][(run_index, metric)]
                expected = by_id.get(row["id"])
                assert shown == expected
                assert text == ("–" if expected is None else f"{expected:.4g}")
    # The two runs edited differently (αV differs), so the page is not showing one run twice.
    assert any(row["scores"][(0, "L1")][0] != row["scores"][(1, "L1")][0] for row in parsed.rows)


def test_header_names_runs_and_draws_the_alpha_v_plot(page, runs):
    text = page.read_text(encoding="utf-8")
    for folder in runs:
        assert str(folder / "test_metrics.json") in text
    assert "αV = 1.0" in text and "αV = 2.0" in text and "αX = 7.5" in text
    assert "samples.jsonl" in text and "per-sample files" in text
    assert f"first {LIMIT} of {NUM_TEST} samples are embedded" in text
    assert parse(page).svg == 1  # the trade-off plot, inline
    assert "αV 1" in text and "αV 2" in text  # point labels (matplotlib comments each text)
    # Nothing to fetch: the only URLs are the inline SVG's XML namespaces.
    namespaces = {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}
    assert set(re.findall(r"https?://[^\"'\s]+", text)) <= namespaces


def test_one_alpha_v_says_so_and_no_bundle_is_named(runs, tmp_path, capsys):
    copy = tmp_path / "runs" / "old" / "version_0"
    shutil.copytree(runs[1], copy)
    (copy / "manifest.json").unlink()  # a run written before bundles existed
    out = tmp_path / "out"
    assert main(["report", str(runs[0]), str(copy), "--out", str(out), "--html"]) == 0
    assert "tiny_inspix2pix" in (out / "report.md").read_text()  # the markdown report works
    text = (out / "report.html").read_text(encoding="utf-8")
    assert "tiny_inspix2pix · old/version_0: no result bundle, not shown" in text
    parsed = parse(out / "report.html")
    assert {k[0] for row in parsed.rows for k in row["scores"]} == {0}  # one run's columns
    assert len(parsed.rows) == NUM_TEST
    single = tmp_path / "single"
    assert main(["report", str(runs[0]), "--out", str(single), "--html"]) == 0
    assert "single αV (all runs use αV = 1)" in (single / "report.html").read_text()


def report_error(argv: list[str], capsys) -> str:
    """The message of a failing ``report`` (raised, or printed by the CLI with exit 2)."""
    try:
        status = main(["report", *argv])
    except ReportError as err:
        return str(err)
    assert status != 0
    return capsys.readouterr().err


def test_changed_bundle_and_unknown_sort_are_errors(runs, tmp_path, capsys):
    copy = tmp_path / "runs" / "x" / "version_0"
    shutil.copytree(runs[0], copy)
    message = report_error(
        [str(copy), "--out", str(tmp_path / "a"), "--html", "--sort", "CLIP"], capsys
    )
    assert "--sort CLIP: no run has per-sample CLIP; known: L1, L1_edit, SSIM" in message
    image = sorted((copy / "images").glob("*.png"))[0]
    image.write_bytes(image.read_bytes() + b"\0")
    message = report_error([str(copy), "--out", str(tmp_path / "b"), "--html"], capsys)
    assert "does not match its manifest" in message and f"changed {image}" in message
    assert not (tmp_path / "b" / "report.html").exists()


def test_plot_axes_defaults():
    from editbench.commands.report_html import plot_axes

    def run(*columns):
        return SimpleNamespace(columns=columns, table=dict.fromkeys(columns, 0.0))

    clip = [run("CLIP_direction", "CLIP_image"), run("CLIP_image", "CLIP_direction", "L1")]
    assert plot_axes(clip, None, None) == ("CLIP_direction", "CLIP_image")
    assert plot_axes([run("L1", "DINO", "CVS", "CTS")], None, None) == ("CTS", "CVS")
    assert plot_axes([run("L1", "L1_edit", "SSIM")], None, None) == ("L1", "L1_edit")
    assert plot_axes([run("L1", "L1_edit", "SSIM")], "SSIM", None) == ("SSIM", "L1")
    assert plot_axes([run("L1", "SSIM")], "SSIM", "L1") == ("SSIM", "L1")
    assert plot_axes([run("L1")], None, None) is None


def test_several_datasets_are_grouped(tmp_path):
    """Rows of two datasets form one tbody each, led by the dataset's title; a run without
    images shows scores only; the group row spans every column."""
    from editbench.commands.report_html import collect_samples, render_page, run_view
    from metrics.bundle import Bundle

    def fake(dataset: str, ids: list[str], folder: str):
        rows = [
            {"id": i, "dataset": dataset, "aggregation": "all", "system": "model",
             "metric": "L1", "value": 0.1 * k}
            for k, i in enumerate(ids)
        ]  # fmt: skip
        path = tmp_path / folder / "test_metrics.json"
        run = SimpleNamespace(
            row="m", path=path, protocol={}, columns=("L1",), dataset=dataset, run={}
        )
        return run_view(run, Bundle(path.parent, {"files": {}}, rows), folder)

    views = [fake("magicbrush", ["b2", "b1"], "a"), fake("evr", ["e1"], "b")]
    html_text = render_page(views, collect_samples(views), title="t", out=tmp_path)
    parsed = parse_html(html_text)
    assert [r["id"] for r in parsed.rows] == ["e1", "b1", "b2"]  # MGIE's dataset order, then id
    assert html_text.count("<tbody>") == 2
    assert '<tr class="group"><th colspan="7">EVR</th>' in html_text  # id..target, 2 x L1, A-B
    assert "MagicBrush</th>" in html_text and "<img" not in html_text
    assert parsed.rows[0]["scores"] == {(0, "L1"): [None, "–"], (1, "L1"): [0.0, "0"]}


# --------------------------------------------------------------------------- in Chromium


def chromium_or_skip() -> str:
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    if shutil.which("apt-get") is None:
        pytest.skip(f"{CHROMIUM} is absent and apt-get is not available to install it")
    pytest.fail(f"{CHROMIUM} is absent: `apt-get install -y chromium` (the CI script does)")


def expected_order(values: dict[str, float | None], ids: list[str], descending: bool) -> list[str]:
    """Python's order of the page's rule: missing values last, ties in id order."""
    present = [i for i in ids if values.get(i) is not None]
    missing = [i for i in ids if values.get(i) is None]
    return sorted(present, key=lambda i: -values[i] if descending else values[i]) + missing


@pytest.mark.browser
@pytest.mark.slow
def test_page_in_chromium(page, runs, tmp_path):
    executable = chromium_or_skip()
    playwright = pytest.importorskip("playwright.sync_api")
    a, b = model_values(runs[0]), model_values(runs[1])
    ids = sorted(a["L1"])
    requests: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=executable, headless=True, args=["--no-sandbox"]
        )
        view = browser.new_page(viewport={"width": 1000, "height": 700})
        view.on("request", lambda r: requests.append(r.url))
        view.goto(page.as_uri(), wait_until="load")
        rows = view.locator("#samples tr.sample")
        assert rows.count() == NUM_TEST

        def shown_ids() -> list[str]:
            return [rows.nth(i).get_attribute("data-id") for i in range(rows.count())]

        button = view.locator('button.sort[data-key="r1:SSIM"]')
        button.click()  # SSIM: higher is better, so largest first
        assert view.locator("#samples").get_attribute("data-sort-order") == "descending"
        assert shown_ids() == expected_order(b["SSIM"], ids, descending=True)
        button.click()  # again: reversed
        assert shown_ids() == expected_order(b["SSIM"], ids, descending=False)

        difference = {i: a["L1"][i] - b["L1"][i] for i in ids}
        view.select_option("#diff-metric", "L1")
        view.select_option("#diff-a", "0")
        view.select_option("#diff-b", "1")
        for order, pick in (("descending", max), ("ascending", min)):
            view.select_option("#diff-order", order)
            view.click("#diff-sort")
            order_ids = shown_ids()
            assert order_ids[0] == pick(ids, key=difference.get)
            assert order_ids == expected_order(difference, ids, order == "descending")
            first = float(rows.first.locator("td.diff").inner_text())
            assert first == pytest.approx(difference[order_ids[0]], rel=1e-3)

        images = view.locator("#samples img")
        assert images.count() == 4 * NUM_TEST
        view.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=10_000)
        widths = view.eval_on_selector_all("#samples img", "els => els.map(e => e.naturalWidth)")
        assert len(widths) == 4 * NUM_TEST and min(widths) > 0
        assert view.locator("#tradeoff svg").count() == 1
        view.screenshot(path=str(tmp_path / "report_html.png"), full_page=True)
        browser.close()
    assert (tmp_path / "report_html.png").stat().st_size > 10_000
    assert all(u.startswith(("file://", "data:")) for u in requests), sorted(set(requests))
