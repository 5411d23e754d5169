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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from editbench.commands.report_html_page import DEFAULT_LIMIT, render_page
from editbench.commands.report_html_plot import plot_axes, tradeoff_section
from editbench.commands.report_html_samples import (
    RunView,
    Sample,
    collect_samples,
    run_labels,
    run_view,
)

HTML_FILE = "report.html"


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


__all__ = ["DEFAULT_LIMIT", "HTML_FILE", "RunView", "Sample", "add_arguments", "collect_samples"]
__all__ += ["plot_axes", "render_page", "run_view", "tradeoff_section", "write_html"]
