"""``python -m editbench report --html``: one static page, ``report.html``, that shows every
sample of the runs side by side (issue 18, item 4).

One table row per sample id (grouped by dataset when there are several): the id, the
instruction (``inputs.jsonl``), the source and target thumbnails (``sources/``, ``targets/``),
then per run its edit (``images/<id>.png``) and its per-sample scores, read from the run's
verified result bundle (:mod:`metrics.bundle`: ``samples.jsonl``, the ``model`` rows at the
protocol's aggregation; raw values, not the table's scale). A control in the header sorts the rows
by any metric of any run, or by the difference of a metric between two chosen runs (A - B), in
either order; the script is plain JavaScript inside the page and nothing is fetched, so the file
works offline. Images are embedded as data URIs (the bundle's PNG bytes unchanged) for the
first ``--html_limit`` samples, the others link to the bundle files by relative path (the page
says which). Runs whose bundle holds no images show scores only; runs without a bundle are named
and left out of the table.

Below the table: the αV trade-off plot of MGIE Fig. 3 (Fu et al., 2024, Sec. 4.2: αX fixed, αV
varied; InstructPix2Pix's CFG sweep), one curve per report row, points labelled with αV (the
``image_guidance_scale`` of each run's ``run.sampler``), drawn with matplotlib as inline SVG from
the runs' ``test_metrics.json`` table values. Axes: ``--plot_x`` / ``--plot_y``, else
CLIP_direction vs CLIP_image (Fig. 3's axes) where the runs have them, else CTS vs CVS, else
the first two shared columns.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metrics.bundle import IMAGES, SOURCES, TARGETS, Bundle, BundleError, image_name, read_inputs

HTML_FILE = "report.html"
#: Samples whose images are embedded as data URIs by default; later ones are linked.
DEFAULT_LIMIT = 200
#: Preferred (x, y) axes of the trade-off plot, first pair the runs all have wins.
PLOT_AXES = (("CLIP_direction", "CLIP_image"), ("CTS", "CVS"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``report`` flags of the visual report."""
    group = parser.add_argument_group("visual report (--html)")
    group.add_argument("--html", action="store_true", help=f"also write {HTML_FILE} in --out")
    group.add_argument(
        "--sort", default=None, metavar="METRIC",
        help="initial order of the page's rows: METRIC of the first run that has it",
    )  # fmt: skip
    group.add_argument(
        "--html_limit", "--html-limit", dest="html_limit", type=int, default=DEFAULT_LIMIT,
        metavar="N", help="embed the images of the first N samples, link the rest "
        "(default %(default)s)",
    )  # fmt: skip
    group.add_argument("--plot_x", "--plot-x", dest="plot_x", default=None, metavar="METRIC")
    group.add_argument("--plot_y", "--plot-y", dest="plot_y", default=None, metavar="METRIC")


# --------------------------------------------------------------------------- the data


@dataclass
class RunView:
    """One run's column group: its label, bundle, aggregation and per-sample values."""

    run: Any  # editbench.commands.report.Run
    label: str
    bundle: Bundle
    aggregation: str
    metrics: list[str]
    values: dict[str, dict[str, float | None]]  # metric -> id -> value
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def has_images(self) -> bool:
        return any(name.startswith(f"{IMAGES}/") for name in self.bundle.manifest.get("files", {}))

    def image(self, sample_id: str, kind: str) -> tuple[Path, str] | None:
        """The bundle file of ``sample_id``'s ``kind`` image and its sha256, if listed."""
        name = image_name(sample_id, kind)
        entry = (self.bundle.manifest.get("files") or {}).get(name)
        return None if entry is None else (self.bundle.folder / name, str(entry.get("sha256")))


@dataclass
class Sample:
    id: str
    dataset: str
    instruction: str | None


def run_labels(runs: Sequence[Any]) -> dict[Path, str]:
    """Per results path: the report row and the run's folder (``version_0``, ``ig_1.5``), with
    as many parent folders as it takes to tell the runs apart."""
    for depth in range(1, 6):
        labels = {r.path: f"{r.row} · " + "/".join(r.path.parts[-1 - depth : -1]) for r in runs}
        if len(set(labels.values())) == len(labels):
            break
    return labels


def run_view(run: Any, bundle: Bundle, label: str) -> RunView:
    aggregation = str(run.protocol.get("aggregation") or "all")
    rows = [r for r in bundle.rows if r["system"] == "model" and r["aggregation"] == aggregation]
    found = list(dict.fromkeys(r["metric"] for r in rows))
    metrics = [m for m in run.columns if m in found] + sorted(
        m for m in found if m not in run.columns
    )
    values = {m: {} for m in metrics}
    for row in rows:
        value = row.get("value")
        values[row["metric"]][str(row["id"])] = None if value is None else float(value)
    try:
        inputs = read_inputs(bundle.folder)
    except BundleError:
        inputs = {}  # a bundle written without images: scores only
    return RunView(run, label, bundle, aggregation, metrics, values, inputs)


def collect_samples(views: Sequence[RunView]) -> list[Sample]:
    """Every sample id of the runs, by dataset (MGIE's order) then id."""
    from editbench.commands.report import dataset_sort_key

    found: dict[tuple[str, str], Sample] = {}
    for view in views:
        datasets = {
            str(r["id"]): str(r.get("dataset") or view.run.dataset) for r in view.bundle.rows
        }
        for sample_id in [*view.inputs, *datasets]:
            row = view.inputs.get(sample_id, {})
            dataset = str(row.get("dataset") or datasets.get(sample_id) or view.run.dataset)
            sample = found.setdefault((dataset, sample_id), Sample(sample_id, dataset, None))
            if sample.instruction is None and row.get("instruction") is not None:
                sample.instruction = str(row["instruction"])
    return [found[k] for k in sorted(found, key=lambda k: (dataset_sort_key(k[0]), k[1]))]


# --------------------------------------------------------------------------- rendering


def _number(value: float | None) -> tuple[str, str]:
    """(``data-value``, shown text) of a score: full precision for the script, 4 digits shown."""
    if value is None or math.isnan(value):
        return "", "–"
    if math.isinf(value):
        return ("Infinity" if value > 0 else "-Infinity"), ("∞" if value > 0 else "−∞")
    return repr(value), f"{value:.4g}"


class ImageLinks:
    """``src`` of bundle images: data URIs while the sample is within the limit, else the path
    relative to the page."""

    def __init__(self, out: Path, limit: int) -> None:
        self.out, self.limit = out.resolve(), limit

    def src(self, path: Path, index: int) -> str:
        if index < self.limit:
            return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        return Path(os.path.relpath(path.resolve(), self.out)).as_posix()


def _img(src: str, alt: str) -> str:
    return f'<img src="{html.escape(src)}" alt="{html.escape(alt)}">'


def _e(value: Any) -> str:
    return html.escape(str(value))


def render_page(
    views: Sequence[RunView], samples: Sequence[Sample], *, title: str, out: Path,
    limit: int = DEFAULT_LIMIT, initial_sort: str | None = None, skipped: Sequence[str] = (),
    plot: str = "",
) -> str:  # fmt: skip
    """The whole page as one string (see the module docstring)."""
    from editbench.commands.report import DATASET_TITLES, DIRECTIONS

    links = ImageLinks(out, limit)
    width = 4 + sum(max(int(v.has_images) + len(v.metrics), 1) for v in views) + 1
    head = ['<tr><th rowspan="2">id</th><th rowspan="2">instruction</th>',
            '<th rowspan="2">source</th><th rowspan="2">target</th>']  # fmt: skip
    sub = []
    for i, view in enumerate(views):
        span = int(view.has_images) + len(view.metrics)
        head.append(f'<th colspan="{max(span, 1)}" class="run">{_e(view.label)}</th>')
        if view.has_images:
            sub.append("<th>edit</th>")
        for metric in view.metrics:
            arrow = {1: " ↑", -1: " ↓"}.get(DIRECTIONS.get(metric), "")
            order = "descending" if DIRECTIONS.get(metric) == 1 else "ascending"
            sub.append(
                f'<th><button class="sort" data-key="{_e(f"r{i}:{metric}")}" data-first="{order}" '
                f'title="sort by {_e(view.label)} {_e(metric)}">{_e(metric)}{arrow}</button></th>'
            )
        if not span:
            sub.append("<th>–</th>")
    head.append('<th rowspan="2" class="diff">A − B</th></tr>')
    body: list[str] = []
    datasets = list(dict.fromkeys(s.dataset for s in samples))
    for index, sample in enumerate(samples):
        if len(datasets) > 1 and (index == 0 or samples[index - 1].dataset != sample.dataset):
            if index:
                body.append("</tbody>")
            name = DATASET_TITLES.get(sample.dataset, sample.dataset)
            body.append(f'<tbody><tr class="group"><th colspan="{width}">{_e(name)}</th></tr>')
        body.append(_row(views, sample, index, links))
    if len(datasets) <= 1:
        body = ["<tbody>", *body]
    body.append("</tbody>")
    table = (
        f'<table id="samples" data-initial="{_e(initial_sort or "")}">'
        f"<thead>{''.join(head)}<tr>{''.join(sub)}</tr></thead>{''.join(body)}</table>"
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        _runs_section(views, skipped),
        _images_note(views, limit, len(samples)),
        _controls(views),
        table,
        '<section id="tradeoff"><h2>αV trade-off</h2>',
        plot,
        "</section>",
        f"<script>{SCRIPT}</script></body></html>",
    ]
    return "\n".join(parts) + "\n"


def _row(views: Sequence[RunView], sample: Sample, index: int, links: ImageLinks) -> str:
    shown: dict[str, tuple[Path, str] | None] = {SOURCES: None, TARGETS: None}
    for kind in shown:
        shown[kind] = next((f for v in views if (f := v.image(sample.id, kind))), None)
    cells = [
        f'<td class="id">{_e(sample.id)}</td>',
        f'<td class="instruction">{_e(sample.instruction or "–")}</td>',
    ]
    for kind in (SOURCES, TARGETS):
        found = shown[kind]
        cells.append(f"<td>{_img(links.src(found[0], index), kind[:-1]) if found else '–'}</td>")
    for i, view in enumerate(views):
        if view.has_images:
            edit = view.image(sample.id, IMAGES)
            text = _img(links.src(edit[0], index), f"edit {view.label}") if edit else "–"
            own = view.image(sample.id, SOURCES)
            if edit and own and shown[SOURCES] and own[1] != shown[SOURCES][1]:
                text += '<br><span class="note">its own input:</span><br>'
                text += _img(links.src(own[0], index), f"input {view.label}")
            cells.append(f'<td class="edit" data-run="{i}">{text}</td>')
        for metric in view.metrics:
            value, shown_text = _number(view.values[metric].get(sample.id))
            cells.append(
                f'<td class="score" data-run="{i}" data-metric="{_e(metric)}" '
                f'data-value="{value}">{shown_text}</td>'
            )
        if not view.has_images and not view.metrics:
            cells.append("<td>–</td>")
    cells.append('<td class="diff"></td>')
    return (
        f'<tr class="sample" data-id="{_e(sample.id)}" data-dataset="{_e(sample.dataset)}" '
        f'data-index="{index}">{"".join(cells)}</tr>'
    )


def _sampler_text(sampler: Any) -> str:
    if not isinstance(sampler, dict) or not sampler:
        return "not recorded"
    names = {"guidance_scale": "αX", "image_guidance_scale": "αV"}
    return ", ".join(f"{names.get(k, k)} = {v}" for k, v in sampler.items())


def _runs_section(views: Sequence[RunView], skipped: Sequence[str]) -> str:
    items = []
    for view in views:
        run, protocol = view.run, view.run.protocol
        parts = [
            f"results <code>{_e(run.path)}</code>",
            f"checkpoint {_e(run.run.get('ckpt_path') or 'none (the configured weights)')}",
            f"sampler: {_e(_sampler_text(run.run.get('sampler')))}",
            f"seed {_e(run.run.get('seed', '?'))}",
            f"protocol {_e(protocol.get('name', '?'))} on {_e(run.dataset)} "
            f"(split {_e(protocol.get('split', '?'))}, {_e(protocol.get('num_samples', '?'))} "
            f"samples, aggregation {_e(view.aggregation)}, {_e(protocol.get('resolution', '?'))} px)",
            "images: yes" if view.has_images else "no images in its bundle: scores only",
        ]
        items.append(f"<li><b>{_e(view.label)}</b>: " + "; ".join(parts) + "</li>")
    items += [f'<li class="skipped">{_e(line)}</li>' for line in skipped]
    note = (
        "<p>Every score in the table comes from the runs' per-sample files (<code>samples.jsonl"
        "</code>, the <code>model</code> rows at the protocol's aggregation, checked against "
        "<code>manifest.json</code>): raw values, not the summary table's scale. Sorting keeps "
        "missing values last.</p>"
    )
    return f'<section id="runs"><h2>Runs</h2><ul>{"".join(items)}</ul>{note}</section>'


def _images_note(views: Sequence[RunView], limit: int, count: int) -> str:
    text = f"Images of the first {min(limit, count)} of {count} samples are embedded in this page"
    if not any(v.has_images for v in views):
        text = "No run has images in its bundle: scores only"
    elif count > limit:
        text += f"; those of the other {count - limit} link to the result bundles' files by "
        text += "relative path (keep the run folders where they are to see them)"
    return f'<p id="images-note">{_e(text)}.</p>'


def _controls(views: Sequence[RunView]) -> str:
    metrics = dict.fromkeys(m for v in views for m in v.metrics)
    options = "".join(f'<option value="{_e(m)}">{_e(m)}</option>' for m in metrics)
    runs, runs_b = ("".join(
        f'<option value="{i}"{" selected" * (i == pick)}>{_e(v.label)}</option>'
        for i, v in enumerate(views)) for pick in (0, min(1, len(views) - 1)))  # fmt: skip
    return (
        '<div id="controls">Sort: click a metric in the header (again to reverse), or by the '
        f'difference <select id="diff-metric">{options}</select> of A '
        f'<select id="diff-a">{runs}</select> − B <select id="diff-b">{runs_b}</select> '
        '<select id="diff-order"><option value="descending">largest first</option>'
        '<option value="ascending">smallest first</option></select> '
        '<button id="diff-sort">sort by A − B</button> <span id="sort-status">'
        "in id order</span></div>"
    )


# --------------------------------------------------------------------------- the αV plot


def alpha_v(run: Any) -> float | None:
    sampler = run.run.get("sampler") if isinstance(run.run, dict) else None
    value = sampler.get("image_guidance_scale") if isinstance(sampler, dict) else None
    return None if value is None else float(value)


def plot_axes(runs: Sequence[Any], x: str | None, y: str | None) -> tuple[str, str] | None:
    """The plot's (x, y): the flags, else the first of :data:`PLOT_AXES` every run has, else the
    first two columns they share."""
    shared = [m for m in runs[0].columns if all(m in r.table for r in runs)] if runs else []
    if x and y:
        return x, y
    for pair in PLOT_AXES:
        if set(pair) <= set(shared) and x in (None, pair[0]) and y in (None, pair[1]):
            return pair
    rest = [m for m in shared if m not in (x, y)]
    if x or y:
        return None if not rest else (x, rest[0]) if x else (rest[0], y)
    return (shared[0], shared[1]) if len(shared) >= 2 else None


def _short_path(path: Any) -> str:
    return "/".join(Path(str(path)).parts[-3:]) if path else "no checkpoint"


def tradeoff_section(runs: Sequence[Any], x: str | None = None, y: str | None = None) -> str:
    """The inline SVG of the αV trade-off (one curve per report row), or a line saying why
    there is none."""
    values = sorted({a for r in runs if (a := alpha_v(r)) is not None})
    if len(values) < 2:
        only = f" (all runs use αV = {values[0]:g})" if values else " (αV not recorded)"
        return f"<p>No trade-off plot: the runs span a single αV{_e(only)}.</p>"
    axes = plot_axes(runs, x, y)
    if axes is None:
        return "<p>No trade-off plot: the runs share fewer than two metrics.</p>"
    mx, my = axes
    labels = run_labels(runs)
    missing = sorted({labels[r.path] for r in runs if mx not in r.table or my not in r.table})
    checkpoints: dict[str, set] = {}
    for run in runs:
        checkpoints.setdefault(run.row, set()).add(run.run.get("ckpt_path"))
    curves: dict[str, dict[float, list[tuple[float, float]]]] = {}
    for run in runs:  # one curve per row, and per checkpoint where a row has several
        a, ckpt = alpha_v(run), run.run.get("ckpt_path")
        name = run.row if len(checkpoints[run.row]) == 1 else f"{run.row} · {_short_path(ckpt)}"
        if a is not None and mx in run.table and my in run.table:
            curves.setdefault(name, {}).setdefault(a, []).append((run.table[mx], run.table[my]))
    if not curves:
        return f"<p>No trade-off plot: no run has both {_e(mx)} and {_e(my)}.</p>"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for row, points in curves.items():
        alphas = sorted(points)
        xs = [sum(p[0] for p in points[a]) / len(points[a]) for a in alphas]
        ys = [sum(p[1] for p in points[a]) / len(points[a]) for a in alphas]
        ax.plot(xs, ys, marker="o", label=row)
        for a, px, py in zip(alphas, xs, ys, strict=True):
            ax.annotate(
                f"αV {a:g}", (px, py), textcoords="offset points", xytext=(4, 4), fontsize=7
            )
    ax.set_xlabel(mx)
    ax.set_ylabel(my)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata=dict.fromkeys(("Creator", "Date", "Format", "Type")))
    plt.close(fig)
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg") :]
    note = (
        f"<p>x = {_e(mx)}, y = {_e(my)} from each run's test_metrics.json table (its scale); one "
        "curve per report row (and checkpoint), the mean of its runs at each αV (MGIE Fig. 3: "
        "αX fixed, αV varied).</p>"
    )
    if missing:
        note += f"<p>Not plotted (no {_e(mx)} / {_e(my)}): {_e(', '.join(missing))}.</p>"
    return f'<figure id="tradeoff-plot">{svg}</figure>{note}'


# --------------------------------------------------------------------------- command


def write_html(
    runs: Sequence[Any], check: Any, out: str | Path, *, title: str = "Results",
    sort: str | None = None, limit: int = DEFAULT_LIMIT, plot_x: str | None = None,
    plot_y: str | None = None, skipped: Sequence[str] = (), error: type[Exception] = ValueError,
) -> Path:  # fmt: skip
    """Write ``<out>/report.html`` for ``runs`` (``report``'s :class:`Run` list) whose bundles
    ``check`` (:func:`report_bundles.check_bundles`) verified; an unknown ``sort`` metric is
    ``error``."""
    out = Path(out)
    labels = run_labels(runs)
    views = [
        run_view(r, check.bundles[r.path], labels[r.path]) for r in runs if r.path in check.bundles
    ]
    lines = [
        f"{labels[r.path]}: no result bundle, not shown"
        for r in runs
        if r.path not in check.bundles
    ]
    lines += list(skipped)
    initial = None
    if sort:
        index = next((i for i, v in enumerate(views) if sort in v.metrics), None)
        if index is None:
            known = sorted({m for v in views for m in v.metrics})
            raise error(f"--sort {sort}: no run has per-sample {sort}; known: {', '.join(known)}")
        initial = f"r{index}:{sort}"
    page = render_page(
        views, collect_samples(views), title=title, out=out, limit=limit, initial_sort=initial,
        skipped=lines, plot=tradeoff_section(runs, plot_x, plot_y),
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    path = out / HTML_FILE
    path.write_text(page, encoding="utf-8")
    return path


CSS = """body{font:14px system-ui,sans-serif;margin:1em;color:#222}
table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:3px 5px;vertical-align:middle}
thead th{background:#f2f2f2;position:sticky;top:0}tr.group th{background:#e4ecf7;text-align:left}
td.score,td.diff{text-align:right;font-variant-numeric:tabular-nums}td.instruction{max-width:10em}
td.id{font-family:monospace;font-size:11px;min-width:7em;word-break:break-all}li.skipped{color:#a33}
img{width:72px;height:auto;image-rendering:pixelated;display:block}#controls{margin:.8em 0}
button.sort{font:inherit;border:0;background:none;cursor:pointer;text-decoration:underline dotted}
button.sort.active{font-weight:bold}.note{font-size:11px;color:#666}figure svg{max-width:640px}"""

SCRIPT = r"""
(function () {
  const table = document.getElementById("samples"), status = document.getElementById("sort-status");
  const pick = (id) => document.getElementById(id).value;
  const label = (run) => document.getElementById("diff-a").options[Number(run)].text;
  function value(tr, run, metric) {
    const td = Array.from(tr.querySelectorAll("td.score")).find(
      (c) => c.dataset.run === String(run) && c.dataset.metric === metric);
    return !td || td.dataset.value === "" ? null : Number(td.dataset.value);
  }
  function sortRows(keyOf, order, key, text) {  // missing values last, ties in id order
    const sign = order === "descending" ? -1 : 1;
    for (const body of table.tBodies) {
      const rows = Array.from(body.querySelectorAll("tr.sample"),
        (tr) => ({tr: tr, k: keyOf(tr), i: Number(tr.dataset.index)}));
      rows.sort(function (a, b) {
        const am = a.k === null || Number.isNaN(a.k), bm = b.k === null || Number.isNaN(b.k);
        if (am !== bm) return am ? 1 : -1;
        if (!am && a.k !== b.k) return a.k < b.k ? -sign : sign;
        return a.i - b.i;
      });
      for (const row of rows) body.appendChild(row.tr);
    }
    for (const b of table.querySelectorAll("button.sort")) {
      b.classList.toggle("active", b.dataset.key === key);
    }
    table.dataset.sortKey = key;
    table.dataset.sortOrder = order;
    status.textContent = "sorted by " + text + ", " + order;
  }
  function byMetric(key, order) {
    const run = key.slice(1, key.indexOf(":")), metric = key.slice(key.indexOf(":") + 1);
    for (const td of table.querySelectorAll("td.diff")) td.textContent = "";
    sortRows((tr) => value(tr, run, metric), order, key, metric + " of " + label(run));
  }
  for (const button of table.querySelectorAll("button.sort")) {
    button.addEventListener("click", function () {
      const again = table.dataset.sortKey === button.dataset.key;
      const flip = table.dataset.sortOrder === "ascending" ? "descending" : "ascending";
      byMetric(button.dataset.key, again ? flip : button.dataset.first);
    });
  }
  document.getElementById("diff-sort").addEventListener("click", function () {
    const metric = pick("diff-metric"), a = pick("diff-a"), b = pick("diff-b");
    function diff(tr) {
      const va = value(tr, a, metric), vb = value(tr, b, metric);
      return va === null || vb === null ? null : va - vb;
    }
    for (const tr of table.querySelectorAll("tr.sample")) {
      const d = diff(tr);
      tr.querySelector("td.diff").textContent = d === null ? "–" : d.toPrecision(4);
    }
    const text = metric + ": " + label(a) + " − " + label(b);
    sortRows(diff, pick("diff-order"), "diff:" + metric + ":" + a + ":" + b, text);
  });
  if (table.dataset.initial) {
    const first = table.querySelector('button.sort[data-key="' + table.dataset.initial + '"]');
    byMetric(table.dataset.initial, first ? first.dataset.first : "ascending");
  }
})();
"""


__all__ = ["DEFAULT_LIMIT", "HTML_FILE", "RunView", "Sample", "add_arguments", "collect_samples"]
__all__ += ["plot_axes", "render_page", "run_view", "tradeoff_section", "write_html"]
