"""The HTML of the visual report (:mod:`editbench.commands.report_html`): the sample table,
the runs' list, the sort controls, and the page's stylesheet and sort script.
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from editbench.commands.report_html_samples import RunView, Sample
from editbench.commands.report_table import DATASET_TITLES, DIRECTIONS
from metrics.bundle import IMAGES, SOURCES, TARGETS

#: Samples whose images are embedded as data URIs by default; later ones are linked.
DEFAULT_LIMIT = 200


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
    """The whole page as one string (see :mod:`editbench.commands.report_html`)."""
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
