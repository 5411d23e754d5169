"""Protocols, the evaluator (aggregations, copy baseline, shared backbones) and provenance."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metrics.evaluation import EditEvaluator, build_metric, default_backbones
from metrics.features import backbone_cache_info, clear_backbone_cache, load_clip
from metrics.protocols import PROTOCOLS, get_protocol
from metrics.provenance import weights_sha256
from metrics.results import PROVENANCE_ONLY, read_results, results_document, write_results


def constant_images(values: list[float], size: int = 16) -> torch.Tensor:
    """[B, 3, size, size] images in [-1, 1], image i filled with values[i]."""
    return torch.tensor(values).view(-1, 1, 1, 1).expand(-1, 3, size, size).clone()


def two_sessions_batch() -> dict:
    """Session a: 2 turns, session b: 3 turns; constant images with known L1 per turn."""
    sessions = ["a", "a", "b", "b", "b"]
    turns = [1, 2, 1, 2, 3]
    num_turns = [2, 2, 3, 3, 3]
    target = constant_images([0.0] * 5)
    preds = constant_images([0.2, 0.4, -0.6, 0.8, 1.0])  # L1 on [0,1] = |v| / 2
    source = constant_images([0.1, 0.1, 0.1, 0.1, 0.1])
    return {
        "id": [f"magicbrush/{s}/{t}" for s, t in zip(sessions, turns, strict=True)],
        "session": sessions,
        "turn": torch.tensor(turns),
        "num_turns": torch.tensor(num_turns),
        "source": source,
        "target": target,
        "instruction": ["x"] * 5,
    }, preds


def test_protocol_columns_are_mgie_tables():
    assert get_protocol("evr").columns == ("L1", "DINO", "CVS")
    assert get_protocol("gier").columns == ("L1", "SSIM", "CVS")
    assert get_protocol("ma5k").columns == ("L1", "SSIM", "LPIPS")
    assert get_protocol("magicbrush").columns == ("L1", "DINO", "CVS", "CTS")
    assert get_protocol("magicbrush").aggregations == ("all", "final", "turn1")
    with pytest.raises(ValueError, match="unknown evaluation protocol 'nope'"):
        get_protocol("nope")


def test_former_single_aggregation_names_its_new_name():
    with pytest.raises(ValueError, match=r"renamed.*'turn1'.*single-turn setting is 'all'"):
        get_protocol("magicbrush").with_aggregation("single")
    with pytest.raises(ValueError, match="unknown aggregation 'best'"):
        get_protocol("magicbrush").with_aggregation("best")


def test_every_datamodule_names_a_known_protocol():
    import datamodules.concat
    import datamodules.evr
    import datamodules.folder
    import datamodules.gier
    import datamodules.ipr2pr
    import datamodules.ma5k
    import datamodules.magicbrush
    import datamodules.synthetic
    from datamodules.base import EditDataModule

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    assert datamodules.synthetic and datamodules.concat and datamodules.folder
    assert datamodules.evr and datamodules.gier and datamodules.ipr2pr and datamodules.ma5k
    assert datamodules.magicbrush
    names = {cls.protocol for cls in subclasses(EditDataModule)}
    assert {"evr", "gier", "ma5k", "magicbrush", "ipr2pr", "synthetic"} <= names
    assert names <= set(PROTOCOLS)


@pytest.mark.parametrize("aggregation", ["turn1", "final", "all"])
def test_magicbrush_aggregations_on_two_sessions(aggregation):
    batch, preds = two_sessions_batch()
    protocol = get_protocol("magicbrush").with_aggregation(aggregation)
    evaluator = EditEvaluator(protocol, ["L1"])
    # Two batches that split a session, as a loader may.
    first = {k: v[:3] for k, v in batch.items()}
    second = {k: v[3:] for k, v in batch.items()}
    evaluator.update(first, preds[:3])
    evaluator.update(second, preds[3:])
    results = evaluator.compute()

    per_turn = np.abs([0.2, 0.4, -0.6, 0.8, 1.0]) / 2
    copy = np.full(5, 0.1 / 2)
    chosen = {"turn1": [0, 2], "final": [1, 4], "all": [0, 1, 2, 3, 4]}
    for name, rows in chosen.items():
        assert results[f"test/{name}/L1"] == pytest.approx(per_turn[rows].mean(), abs=1e-6)
        assert results[f"test/copy/{name}/L1"] == pytest.approx(copy[rows].mean(), abs=1e-6)
    assert results["test/L1"] == results[f"test/{aggregation}/L1"]
    assert evaluator.num_samples() == {"turn1": 2, "final": 2, "all": 5}


def test_aggregation_needs_turns():
    evaluator = EditEvaluator(get_protocol("magicbrush"), ["L1"])
    batch = {"source": constant_images([0.0]), "target": constant_images([0.0]), "id": ["x"]}
    with pytest.raises(ValueError, match="'final' turn aggregation needs the batch keys"):
        evaluator.update(batch, constant_images([0.0]))


def test_missing_backbone_names_metric_and_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"CVS.*nowhere"):
        build_metric("CVS", backbones={"clip": str(tmp_path / "nowhere")})


def test_missing_batch_field_names_metric_and_field(tiny_dir):
    evaluator = EditEvaluator(
        get_protocol("generic"), ["CTS"], backbones={"clip": str(tiny_dir / "clip")}
    )
    batch = {"id": ["s1"], "source": constant_images([0.0]), "target": constant_images([0.0])}
    with pytest.raises(ValueError, match=r"CTS needs the batch field\(s\) \['goal_caption'\]"):
        evaluator.update(batch, constant_images([0.1]))


def test_cts_table_is_100_cos_and_clip_is_shared(tiny_dir):
    clip = tiny_dir / "clip"
    clear_backbone_cache()
    evaluator = EditEvaluator(
        get_protocol("magicbrush").with_aggregation("all"),
        ["CVS", "CTS"],
        backbones={"clip": str(clip)},
    )
    torch.manual_seed(0)
    preds = torch.rand(3, 3, 32, 32) * 2 - 1
    target = torch.rand(3, 3, 32, 32) * 2 - 1
    captions = ["a red circle", "a blue square on the left", "a green triangle"]
    batch = {
        "id": ["a", "b", "c"],
        "source": target.clone(),
        "target": target,
        "goal_caption": captions,
        "turn": torch.tensor([1, 1, 1]),
        "num_turns": torch.tensor([1, 1, 1]),
        "instruction": ["x"] * 3,
    }
    evaluator.update(batch, preds)
    results = evaluator.compute()
    # One CLIP in the cache for CVS and CTS of every aggregation and the copy baseline.
    assert backbone_cache_info()["clip"].currsize == 1

    # Independent reference: the CLIP model called directly, preprocessing by its processor
    # (the images are already at the processor's 32 px, so resizing is the identity).
    model, processor = load_clip(str(clip), torch.device("cpu"))
    pixels = processor.image_processor(
        images=list(((preds + 1) / 2).clamp(0, 1)), do_rescale=False, return_tensors="pt"
    )["pixel_values"]
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels)
        image = getattr(image, "pooler_output", image)
        tokens = processor.tokenizer(captions, padding=True, return_tensors="pt")
        text = model.get_text_features(**tokens)
        text = getattr(text, "pooler_output", text)
    expected = F.cosine_similarity(image, text, dim=-1).mean().item()
    assert results["test/CTS"] == pytest.approx(expected, abs=1e-4)
    table = evaluator.table(results)
    assert table["CTS"] == pytest.approx(100 * expected, abs=1e-2)
    assert table["CVS"] == pytest.approx(100 * results["test/CVS"])
    assert results["test/copy/CVS"] == pytest.approx(1.0, abs=1e-5)  # source == target

    record = evaluator.metric_provenance()
    assert record["CTS"]["backbone"]["sha256"] == weights_sha256(clip)
    assert record["CTS"]["backbone"]["path"] == str(clip.resolve())


def test_weights_hash_follows_the_weights(tmp_path):
    folder = tmp_path / "net"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\x00" * 10)
    before = weights_sha256(folder)
    (folder / "model.safetensors").write_bytes(b"\x01" * 10)
    assert weights_sha256(folder) != before


def test_results_document_round_trip(tmp_path):
    batch, preds = two_sessions_batch()
    datamodule = SimpleNamespace(
        resolution=256, caption_source="local", test_mode="iterative", eval_resize="pad"
    )
    protocol = get_protocol("magicbrush-paper").for_data(datamodule)
    evaluator = EditEvaluator(protocol, ["L1"])
    evaluator.update(batch, preds)
    results = evaluator.compute()
    run = {"name": "demo", "seed": 3}
    document = results_document(
        evaluator, results, model=torch.nn.Identity(), datamodule=datamodule, run=run
    )
    path = write_results(tmp_path / "test_metrics.json", document)
    back = read_results(path)
    protocol = back["protocol"]
    assert protocol["caption_source"] == "local" and protocol["turn_mode"] == "iterative"
    assert protocol["protocol_caption_source"] == "local"
    # an iterative run's table is MagicBrush's multi-turn setting: the final turns
    assert protocol["aggregation"] == "final" and protocol["setting"] == "multi-turn"
    assert protocol["settings"] == {"final": "multi-turn"}
    assert protocol["num_samples"] == 2
    assert protocol["num_samples_per_aggregation"] == {"turn1": 2, "final": 2, "all": 5}
    assert protocol["eval_resize"] == "pad" and protocol["data"]["eval_resize"] == "pad"
    assert protocol["scoring"] == "model"  # hand-built batch: no native images
    assert protocol["seed"] == 3 and set(PROVENANCE_ONLY) <= set(protocol)
    assert back["table"]["L1"] == pytest.approx(results["test/final/L1"])
    assert back["table"]["L1"] == pytest.approx(np.mean([0.4, 1.0]) / 2)
    assert math.isclose(back["copy_table"]["L1"], 0.05, abs_tol=1e-6)
    (tmp_path / "other.json").write_text(json.dumps({"test/L1": 1.0}))
    with pytest.raises(ValueError, match="other.json"):
        read_results(tmp_path / "other.json")


@pytest.mark.parametrize(
    ("test_mode", "aggregation", "setting"),
    [("independent", "all", "single-turn"), ("iterative", "final", "multi-turn")],
)
def test_table_setting_follows_the_test_mode(test_mode, aggregation, setting):
    datamodule = SimpleNamespace(caption_source="global", test_mode=test_mode)
    protocol = get_protocol("magicbrush").for_data(datamodule)
    assert protocol.default_aggregation == aggregation
    assert protocol.setting(None, test_mode).name == setting
    # a user's aggregation still wins, and is then no MagicBrush setting
    turn1 = protocol.with_aggregation("turn1")
    assert turn1.default_aggregation == "turn1" and turn1.setting(None, test_mode) is None
    evaluator = EditEvaluator(turn1, ["L1"])
    batch, preds = two_sessions_batch()
    evaluator.update(batch, preds)
    results = evaluator.compute()
    document = results_document(
        evaluator, results, model=torch.nn.Identity(), datamodule=datamodule, run={}
    )
    assert document["protocol"]["setting"] is None
    assert document["table"]["L1"] == pytest.approx(np.mean([0.2, 0.6]) / 2)


def test_caption_source_of_protocol_and_data_must_agree():
    local = SimpleNamespace(caption_source="local", test_mode="independent")
    assert get_protocol("magicbrush").caption_source == "global"  # MGIE: global captions
    assert get_protocol("magicbrush-paper").caption_source == "local"  # MagicBrush paper
    with pytest.raises(ValueError, match=r"'magicbrush'.*global.*caption_source='local'") as err:
        get_protocol("magicbrush").for_data(local)
    assert "magicbrush-paper" in str(err.value)  # the protocol that fits the data
    get_protocol("magicbrush-paper").for_data(local)
    # protocols that score no captions accept any data
    get_protocol("evr").for_data(local)


def test_backbone_defaults_per_protocol(tmp_path, monkeypatch, tiny_dir):
    monkeypatch.setenv("EDITBENCH_BACKBONES", str(tmp_path))
    assert default_backbones(get_protocol("ipr2pr")) == {
        "clip": str(tmp_path / "clip-vit-large-patch14")
    }
    assert default_backbones(get_protocol("magicbrush")) == {
        "clip": str(tmp_path / "clip-vit-base-patch32"),
        "dino": str(tmp_path / "dino-vits16"),
    }
    # the ipr2pr metrics look for ViT-L/14 under $EDITBENCH_BACKBONES ...
    with pytest.raises(FileNotFoundError, match="clip-vit-large-patch14"):
        EditEvaluator(get_protocol("ipr2pr"))
    # ... and a user's folder overrides it; the provenance records the one used
    (tmp_path / "clip-vit-large-patch14").symlink_to(tiny_dir / "clip")
    evaluator = EditEvaluator(get_protocol("ipr2pr"))
    record = evaluator.metric_provenance()
    assert record["CLIP_direction"]["backbone"]["path"] == str((tiny_dir / "clip").resolve())
    assert record["CLIP_image"]["preprocess"].startswith("InstructPix2Pix's")
    evaluator = EditEvaluator(
        get_protocol("magicbrush"), ["CVS"], backbones={"clip": str(tiny_dir / "clip")}
    )
    assert evaluator.metric_provenance()["CVS"]["preprocess"].startswith("the CLIP processor")
