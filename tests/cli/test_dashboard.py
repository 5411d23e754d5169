"""The run's dashboards (issue 16 item 9): Rich progress bars and TensorBoard's custom-scalars
layout, checked against the tags a real ``fit`` + ``test`` writes, read back with
TensorBoard's own event reader."""

from __future__ import annotations

import re

import pytest
from cli.test_checkpoint_cli import quickstart_args
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2, metadata

from editbench.cli import EditbenchCLI, main


def without(args: list[str], flag: str) -> list[str]:
    i = args.index(flag)
    return args[:i] + args[i + 2 :]


def test_rich_progress_bar_unless_disabled_or_given(tiny_dir, synthetic_root, tmp_path):
    args = without(quickstart_args(tiny_dir, synthetic_root, tmp_path), "--trainer.enable_progress_bar")
    cli = EditbenchCLI(args=[*args], run=False)
    assert isinstance(cli.trainer.progress_bar_callback, RichProgressBar)
    cli = EditbenchCLI(args=[*args, "--trainer.enable_progress_bar", "false"], run=False)
    assert cli.trainer.progress_bar_callback is None
    tqdm = ["--trainer.callbacks+", "lightning.pytorch.callbacks.TQDMProgressBar"]
    cli = EditbenchCLI(args=[*args, *tqdm], run=False)
    assert isinstance(cli.trainer.progress_bar_callback, TQDMProgressBar)


def read_layout(run_dir) -> tuple[layout_pb2.Layout, set[str]]:
    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    [layout_event] = events.Tensors(metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout()
    layout.ParseFromString(layout_event.tensor_proto.string_val[0])
    return layout, set(events.Tags()["scalars"])


def charts(layout) -> dict[tuple[str, str], list[str]]:
    return {
        (category.title, chart.title): list(chart.multiline.tag)
        for category in layout.category
        for chart in category.chart
    }


@pytest.mark.slow
def test_custom_scalars_layout_covers_the_logged_tags(tiny_dir, synthetic_root, tmp_path):
    args = quickstart_args(tiny_dir, synthetic_root, tmp_path)
    assert main(["fit", *args, "--trainer.max_steps", "3", "--trainer.log_every_n_steps", "1"]) == 0
    fit_dir = tmp_path / "runs" / "quickstart" / "version_0"
    layout, tags = read_layout(fit_dir)
    found = charts(layout)

    def matched(key):
        return {t for t in tags if any(re.search(rx, t) for rx in found[key])}

    assert matched(("Losses", "training loss and its terms")) == {"train/loss", "train/loss_edit"}
    assert {t for t in tags if t.startswith("lr-")} == matched(
        ("Optimization", "learning rate per parameter group")
    ) != set()
    # every scalar the fit logged is on some chart
    assert tags - {"epoch", "hp_metric"} <= set().union(*(matched(k) for k in found))

    last = tmp_path / "checkpoints" / "last.ckpt"
    assert main(["test", *args, "--ckpt_path", str(last)]) == 0
    layout, tags = read_layout(tmp_path / "runs" / "quickstart" / "version_1")
    found = charts(layout)
    for metric in ("L1", "L1_edit", "SSIM"):
        assert matched(("Metrics", metric)) == {f"test/{metric}", f"test/copy/{metric}"}
    assert tags <= set().union(*(matched(k) for k in found)) | {"hp_metric", "epoch"}
