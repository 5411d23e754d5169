"""Backbone metrics go through the same registry and update helper as the pixel metrics."""

from __future__ import annotations

import pytest
import torch

from metrics import LPIPS, METRICS, edit_metrics, update_edit_metrics


def test_lpips_in_a_collection_matches_the_metric_alone():
    assert {"LPIPS", "DINO", "CVS"} <= set(METRICS)
    g = torch.Generator().manual_seed(0)
    preds, target = (torch.rand(2, 4, 3, 64, 64, generator=g) * 2 - 1).unbind(0)
    collection = edit_metrics(["L1", "LPIPS"], metric_kwargs={"LPIPS": {"weights_path": "random"}})
    update_edit_metrics(collection, preds, target)
    alone = LPIPS(weights_path="random")
    alone.lpips_net.load_state_dict(collection["LPIPS"].lpips_net.state_dict())
    alone.update(preds, target)
    values = collection.compute()
    torch.testing.assert_close(values["LPIPS"], alone.compute())
    assert values["LPIPS"] > 0


def test_backbone_metric_without_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        edit_metrics(["LPIPS"])
