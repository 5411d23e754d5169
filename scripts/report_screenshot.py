"""The README's screenshot of ``python -m editbench report --html`` (docs/images/report_html.png).

Builds the tiny checkpoints and a small synthetic split in a scratch folder, runs ``test`` on
the tiny InsPix2Pix at two αV values (result bundles with images), writes the visual report,
opens it in Debian's Chromium (Playwright, headless), sorts the rows by the L1 difference of the
two runs and saves a 1100x700 screenshot, reduced to a 256-colour PNG to stay small::

    python scripts/report_screenshot.py                     # -> docs/images/report_html.png
    python scripts/report_screenshot.py --runs runs/tiny_inspix2pix/version_*   # existing runs
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHROMIUM = "/usr/bin/chromium"
ALPHAS = (1.0, 2.0)


def make_runs(work: Path, num_test: int) -> list[Path]:
    """Tiny checkpoints, a synthetic split and one ``test`` run per αV; their log dirs."""
    from datamodules.synthetic import generate_synthetic
    from editbench.cli import main
    from editbench.tiny import make_tiny

    make_tiny(work / "tiny", seed=0, resolution=32, vae_steps=30, log=lambda *a, **k: None)
    generate_synthetic(
        work / "synthetic", num_train=4, num_val=2, num_test=num_test, resolution=32, seed=0
    )
    for alpha in ALPHAS:
        status = main([
            "test", "-c", str(REPO / "experiments" / "tiny" / "inspix2pix.yaml"),
            "--model.init_args.diffusion_path", str(work / "tiny" / "instruct-pix2pix"),
            "--model.init_args.num_inference_steps", "4",
            "--model.init_args.image_guidance_scale", str(alpha),
            "--data.init_args.root", str(work / "synthetic"),
            "--data.init_args.num_train", "4",
            "--data.init_args.num_val", "2",
            "--data.init_args.num_test", str(num_test),
            "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(work / "runs"),
        ])  # fmt: skip
        if status:
            raise SystemExit(f"`test` at αV {alpha} failed (exit {status})")
    return sorted((work / "runs" / "tiny_inspix2pix").glob("version_*"))


def screenshot(page: Path, out: Path, size: tuple[int, int]) -> None:
    """Open ``page`` in Chromium, sort by run 1 minus run 2 on L1 (largest first), save."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        view = browser.new_page(viewport={"width": size[0], "height": size[1]})
        view.goto(page.as_uri(), wait_until="load")
        view.select_option("#diff-metric", "L1")
        view.click("#diff-sort")
        view.locator("#controls").scroll_into_view_if_needed()
        view.evaluate("window.scrollTo(0, document.getElementById('controls').offsetTop - 8)")
        view.screenshot(path=str(out))
        browser.close()


def shrink(path: Path) -> None:
    from PIL import Image

    image = Image.open(path).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "images" / "report_html.png"))
    parser.add_argument("--runs", nargs="*", default=None, help="existing run folders to show")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--num_test", type=int, default=8)
    args = parser.parse_args(argv)
    if not os.path.exists(CHROMIUM):
        raise SystemExit(f"{CHROMIUM} is absent: `apt-get install -y chromium`")
    from editbench.cli import main as cli_main

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        runs = [Path(r) for r in args.runs] if args.runs else make_runs(work, args.num_test)
        report = work / "report"
        cli_main(["report", *map(str, runs), "--out", str(report), "--html", "--name", "tiny αV"])
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        screenshot(report / "report.html", out, (1100, 700))
        shrink(out)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
