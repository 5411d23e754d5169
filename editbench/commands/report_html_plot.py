"""The αV trade-off plot of the visual report (:mod:`editbench.commands.report_html`): MGIE
Fig. 3's curves (αX fixed, αV varied), one per report row, as inline SVG.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from editbench.commands.report_html_page import _e
from editbench.commands.report_html_samples import run_labels

#: Preferred (x, y) axes of the trade-off plot, first pair the runs all have wins.
PLOT_AXES = (("CLIP_direction", "CLIP_image"), ("CTS", "CVS"))


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
