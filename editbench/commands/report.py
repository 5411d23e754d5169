"""``python -m editbench report``: aggregate the ``test_metrics.json`` of several runs into one
table laid out as MGIE's Tables 1-2 (rows = models, columns = dataset x metric), written as
``report.md`` and ``report.csv``.

Each cell is the mean ± sample standard deviation over the runs of its row (MGIE averages 5
random seeds, Sec. 4.1), with a 95% interval ``[lo, hi]`` where the runs wrote result bundles
(:mod:`editbench.commands.report_bundles`: bundles verified, every cell recomputed from the
per-sample rows, bootstrap / t intervals, ``--compare A B`` paired tests). Folders without a
``test_metrics.json`` (a fit-only ``version_0``) are skipped and named. Runs share a column only if they were measured the same way: their
*relevant protocol* for that column (``protocol`` minus the provenance-only keys
:data:`PROVENANCE_KEYS`, with ``metrics``, ``scale`` and ``columns`` narrowed to the column's
metric) must agree, or the report stops naming the column, the runs and each differing field
(``--allow-mixed`` tabulates them anyway, marked with a dagger).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from editbench.commands import report_bundles as bundles
from editbench.commands.report_load import ReportError, load_run
from editbench.commands.report_protocol import PROVENANCE_KEYS
from editbench.commands.report_render import render_csv, render_markdown
from editbench.commands.report_table import build_report
from metrics.published import PUBLISHED_TABLES

#: Names other modules import from here (the parts live in report_load, report_protocol,
#: report_table and report_render).
__all__ = ["PROVENANCE_KEYS", "ReportError", "build_parser", "main"]

GROUP_BY = ("run.name", "model.name")


# --------------------------------------------------------------------------- command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m editbench report", description=__doc__)
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="run folders (searched recursively for test_metrics.json), files or glob patterns",
    )
    parser.add_argument("--out", default=".", help="folder for report.md and report.csv")
    parser.add_argument("--name", default="Results", help="the report's title")
    parser.add_argument(
        "--published",
        choices=sorted(PUBLISHED_TABLES),
        default=None,
        help="add a paper's published rows (MGIE or InsightEdit tables; not ranked)",
    )
    parser.add_argument(
        "--allow-mixed",
        "--allow_mixed",
        dest="allow_mixed",
        action="store_true",
        help="tabulate runs with different protocols in one column, marked with a dagger",
    )
    parser.add_argument(
        "--copy-baseline",
        "--copy_baseline",
        dest="copy_baseline",
        action="store_true",
        help="add a 'copy input' row from each run's copy_table",
    )
    parser.add_argument(
        "--group-by",
        "--group_by",
        dest="group_by",
        choices=GROUP_BY,
        default="run.name",
        help="what makes a row (run.name falls back to model.name)",
    )
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        default=None,
        help="paired test of rows A and B on their shared samples (needs result bundles)",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=bundles.DEFAULT_RESAMPLES,
        help="bootstrap resamples of the 95%% intervals (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and tests")
    from editbench.commands import report_html

    report_html.add_arguments(parser)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    paths, skipped = bundles.find_results_skipping(args.runs)
    for line in bundles.skipped_lines(skipped):
        print(line, file=sys.stderr)
    runs = [load_run(p, args.group_by, need_copy=args.copy_baseline) for p in paths]
    check = bundles.check_bundles(runs, ReportError)
    report = build_report(
        runs,
        title=args.name,
        allow_mixed=args.allow_mixed,
        published=args.published,
        copy_baseline=args.copy_baseline,
    )
    resamples, seed = args.bootstrap, args.seed
    bundles.attach_intervals(report, check, resamples=resamples, seed=seed)
    report.notes = bundles.bundle_notes(check, resamples, seed) + bundles.skipped_lines(skipped)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.compare:
        a, b = args.compare
        compared = bundles.compare_rows(
            report, a, b, check, ReportError, resamples=resamples, seed=seed
        )
        report.appendix = bundles.render_comparison(a, b, compared, resamples)
        with (out / "compare.csv").open("w", newline="") as handle:
            csv.writer(handle, lineterminator="\n").writerows(bundles.comparison_csv(compared))
    markdown = render_markdown(report)
    (out / "report.md").write_text(markdown)
    (out / "report.csv").write_text(render_csv(report))
    print(markdown, end="")
    if args.html:
        from editbench.commands import report_html

        page = report_html.write_html(
            runs, check, out, title=args.name, sort=args.sort, limit=args.html_limit,
            plot_x=args.plot_x, plot_y=args.plot_y, skipped=bundles.skipped_lines(skipped),
            error=ReportError,
        )  # fmt: skip
        print(f"wrote {page}", file=sys.stderr)
    return 0
