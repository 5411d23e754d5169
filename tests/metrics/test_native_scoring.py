"""Native-resolution scoring (metrics.native) against an independent re-implementation of
MagicBrush's ``evaluation/image_eval.py`` rule, and the evaluator on collated batches.

MagicBrush's rule, per image: the generated PNG (8-bit) is opened, ``gen.resize(gt.size)`` with
Pillow's default filter, both go through ``ToTensor()`` (``/ 255``) and ``abs(gen - gt).mean()``
is the image's L1; the score is the mean over images. The reference below does exactly that with
numpy and PIL, from the prediction quantised as a saved PNG (``torchvision.utils.save_image``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.base import SkippedSample, collate
from metrics.evaluation import EditEvaluator
from metrics.native import quantise
from metrics.protocols import get_protocol

MODEL_SIZE = 32
#: Native target sizes (H, W) of the batch: non-square, one portrait, one landscape.
TARGET_SIZES = [(40, 56), (48, 32), (40, 56)]
#: Source sizes: the last sample's source differs from its target (resized for the baseline).
SOURCE_SIZES = [(40, 56), (48, 32), (20, 28)]


def smooth(seed: int, size: tuple[int, int]) -> np.ndarray:
    """A smooth uint8 [H, W, 3] image (gradients plus a seeded phase), so resizing matters."""
    rng = np.random.default_rng(seed)
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    phase = rng.uniform(0, 2 * np.pi, 3)
    channels = [127.5 + 120 * np.sin(x / (3 + c) + y / (5 + c) + phase[c]) for c in range(3)]
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def native_batch() -> tuple[dict, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    n = len(TARGET_SIZES)
    preds = torch.rand(n, 3, MODEL_SIZE, MODEL_SIZE, generator=gen) * 2 - 1
    masks = []
    for h, w in TARGET_SIZES:
        mask = np.zeros((1, h, w), np.uint8)
        mask[:, h // 4 : h // 2, w // 5 : w // 2] = 1
        masks.append(torch.from_numpy(mask))
    batch = {
        "id": [f"s{i}" for i in range(n)],
        "instruction": ["x"] * n,
        # model-resolution copies (what a centre-cropping transform fed the model); never used
        # for scoring when the native images are there
        "source": torch.zeros(n, 3, MODEL_SIZE, MODEL_SIZE),
        "target": torch.zeros(n, 3, MODEL_SIZE, MODEL_SIZE),
        "target_native": [chw(smooth(10 + i, s)) for i, s in enumerate(TARGET_SIZES)],
        "source_native": [chw(smooth(20 + i, s)) for i, s in enumerate(SOURCE_SIZES)],
        "mask_native": masks,
        "skipped_ids": [],
    }
    return batch, preds


# --------------------------------------------------------------------------- the reference


def saved_png(pred: torch.Tensor) -> Image.Image:
    """The prediction as the suite's writer saves it: save_image((x + 1) / 2) rounds
    x * 255 + 0.5 down after clamping; re-done in numpy."""
    unit = (pred.permute(1, 2, 0).numpy().astype(np.float64) + 1) / 2
    return Image.fromarray(np.floor(np.clip(unit * 255 + 0.5, 0, 255)).astype(np.uint8))


def magicbrush_l1(gen: Image.Image, gt: np.ndarray, mask: np.ndarray | None = None) -> float:
    """image_eval.py's eval_distance for one pair: ``gen.resize(gt.size)``, ToTensor, mean |.|
    (within ``mask`` for the edit-region variant)."""
    gt_image = Image.fromarray(gt)
    gen = np.asarray(gen.resize(gt_image.size), dtype=np.float64) / 255
    diff = np.abs(gen - np.asarray(gt_image, dtype=np.float64) / 255)
    if mask is None:
        return float(diff.mean())
    return float(diff[mask[0].astype(bool)].mean())


def reference(batch: dict, preds: torch.Tensor) -> dict[str, float]:
    targets = [t.permute(1, 2, 0).numpy() for t in batch["target_native"]]
    sources = [s.permute(1, 2, 0).numpy() for s in batch["source_native"]]
    masks = [m.numpy() for m in batch["mask_native"]]
    gens = [saved_png(p) for p in preds]
    return {
        "L1": np.mean([magicbrush_l1(g, t) for g, t in zip(gens, targets, strict=True)]),
        "L1_edit": np.mean(
            [magicbrush_l1(g, t, m) for g, t, m in zip(gens, targets, masks, strict=True)]
        ),
        "copy_L1": np.mean(
            [magicbrush_l1(Image.fromarray(s), t) for s, t in zip(sources, targets, strict=True)]
        ),
    }


def centre_crop_l1(batch: dict, preds: torch.Tensor) -> float:
    """What scoring at the model's resolution on a centre crop gives: the target's shorter side
    resized to 32 (PIL bicubic), centre-cropped to 32 x 32, against the 32 x 32 prediction."""
    values = []
    for pred, target in zip(preds, batch["target_native"], strict=True):
        image = Image.fromarray(target.permute(1, 2, 0).numpy())
        w, h = image.size
        scale = MODEL_SIZE / min(w, h)
        image = image.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
        w, h = image.size
        left, top = (w - MODEL_SIZE) // 2, (h - MODEL_SIZE) // 2
        crop = np.asarray(image.crop((left, top, left + MODEL_SIZE, top + MODEL_SIZE))) / 255
        pred01 = (pred.permute(1, 2, 0).numpy() + 1) / 2
        values.append(np.abs(pred01 - crop).mean())
    return float(np.mean(values))


# --------------------------------------------------------------------------- tests


def test_quantise_matches_save_image(tmp_path):
    from torchvision.utils import save_image

    images = torch.linspace(-1.2, 1.2, 3 * 5 * 7).view(1, 3, 5, 7)
    save_image((images[0] + 1) / 2, tmp_path / "x.png")
    written = torch.from_numpy(np.asarray(Image.open(tmp_path / "x.png"))).permute(2, 0, 1)
    assert torch.equal(quantise(images)[0], written)


def test_non_square_native_targets_score_as_magicbrush():
    batch, preds = native_batch()
    evaluator = EditEvaluator(get_protocol("generic"), ["L1", "L1_edit"])
    evaluator.update(batch, preds)
    results = evaluator.compute()
    expected = reference(batch, preds)
    assert results["test/L1"] == pytest.approx(expected["L1"], abs=1e-5)
    assert results["test/L1_edit"] == pytest.approx(expected["L1_edit"], abs=1e-5)
    # the copy baseline compares the native source (bicubic to the target's size) with it
    assert results["test/copy/L1"] == pytest.approx(expected["copy_L1"], abs=1e-5)
    assert evaluator.num_samples() == {"all": 3}
    assert evaluator.scoring()["resolution"] == "native"
    # scoring a centre crop at the model's resolution gives another number
    assert abs(centre_crop_l1(batch, preds) - expected["L1"]) > 5e-3


def test_native_groups_keep_samples_and_aggregations():
    """Sizes interleaved with turns: each aggregation scores exactly its samples."""
    batch, preds = native_batch()
    batch["turn"] = torch.tensor([1, 2, 1])
    batch["num_turns"] = torch.tensor([2, 2, 1])
    evaluator = EditEvaluator(get_protocol("magicbrush"), ["L1"])
    evaluator.update(batch, preds)
    results = evaluator.compute()
    gens = [saved_png(p) for p in preds]
    per_image = [
        magicbrush_l1(g, t.permute(1, 2, 0).numpy())
        for g, t in zip(gens, batch["target_native"], strict=True)
    ]
    assert results["test/all/L1"] == pytest.approx(np.mean(per_image), abs=1e-5)
    assert results["test/final/L1"] == pytest.approx(np.mean(per_image[1:]), abs=1e-5)
    assert results["test/turn1/L1"] == pytest.approx(np.mean(per_image[::2]), abs=1e-5)
    assert evaluator.num_samples() == {"all": 3, "final": 2, "turn1": 2}


def test_bad_native_entry_names_key_and_sample():
    batch, preds = native_batch()
    batch["target_native"][1] = batch["target_native"][1].float()
    evaluator = EditEvaluator(get_protocol("generic"), ["L1"])
    with pytest.raises(ValueError, match=r"'target_native' of sample 's1': expected uint8"):
        evaluator.update(batch, preds)
    batch, preds = native_batch()
    del batch["source_native"]
    with pytest.raises(ValueError, match=r"copy-the-input baseline needs .*source_native"):
        evaluator.update(batch, preds)
    EditEvaluator(get_protocol("generic"), ["L1"], copy_baseline=False).update(batch, preds)


@pytest.mark.parametrize("skipped", [0, 2])
def test_skipped_ids_of_the_real_collate_are_not_indexed(skipped):
    """The DataModules' collate adds `skipped_ids`: empty (indexing it by the aggregations'
    positions raised IndexError on MagicBrush's first batch) or as long as the batch (the case
    a length check alone would mistake for a per-sample field)."""
    values = [0.2, 0.6]
    samples = []
    for i, turn in enumerate((1, 2)):
        samples.append(
            {
                "id": f"magicbrush/a/{turn}",
                "source": torch.full((3, 16, 16), 0.1),
                "target": torch.zeros(3, 16, 16),
                "instruction": "x",
                "session": "a",
                "turn": turn,
                "num_turns": 2,
            }
        )
        if i < skipped:
            samples.append(SkippedSample(f"magicbrush/b/{i}", "unreadable"))
    batch = collate(samples)
    assert len(batch["id"]) == 2 and len(batch["skipped_ids"]) == skipped
    preds = torch.stack([torch.full((3, 16, 16), v) for v in values])
    evaluator = EditEvaluator(get_protocol("magicbrush"), ["L1"])
    evaluator.update(batch, preds)
    results = evaluator.compute()
    assert results["test/all/L1"] == pytest.approx(np.mean(values) / 2, abs=1e-6)
    assert results["test/final/L1"] == pytest.approx(values[1] / 2, abs=1e-6)
    assert results["test/turn1/L1"] == pytest.approx(values[0] / 2, abs=1e-6)


def test_model_and_native_boxes_undo_pad_and_centre_crop():
    """`model_box` cuts the letterbox content out of the prediction (pad), `native_box` the
    region of the native image the model saw (centre crop); the reference crops with PIL."""
    batch, preds = native_batch()
    batch["model_box"] = [(5, 0, 22, 32), (0, 0, 32, 32), (0, 0, 32, 32)]  # sample 0 padded
    batch["native_box"] = torch.tensor([[0, 0, 40, 56], [8, 0, 32, 32], [0, 0, 40, 56]])
    results = []
    for padding in (1.0, -1.0):  # whatever the model drew on the padding is not scored
        edited = preds.clone()
        edited[0, :, :5], edited[0, :, 27:] = padding, padding
        evaluator = EditEvaluator(get_protocol("generic"), ["L1", "L1_edit"])
        evaluator.update(batch, edited)
        results.append(evaluator.compute())
        assert evaluator.scoring()["boxes"] == 3
    assert results[0] == results[1]

    expected, edit_region, copy = [], [], []
    for i, pred in enumerate(preds):
        top, left, h, w = batch["model_box"][i]
        gen = saved_png(pred).crop((left, top, left + w, top + h))
        t, lf, nh, nw = batch["native_box"][i].tolist()
        target = batch["target_native"][i][:, t : t + nh, lf : lf + nw].permute(1, 2, 0).numpy()
        mask = batch["mask_native"][i][:, t : t + nh, lf : lf + nw].numpy()
        source = Image.fromarray(batch["source_native"][i].permute(1, 2, 0).numpy())
        source = source.resize(TARGET_SIZES[i][::-1]).crop((lf, t, lf + nw, t + nh))
        expected.append(magicbrush_l1(gen, np.ascontiguousarray(target)))
        edit_region.append(magicbrush_l1(gen, np.ascontiguousarray(target), mask))
        copy.append(magicbrush_l1(source, np.ascontiguousarray(target)))
    assert results[0]["test/L1"] == pytest.approx(np.mean(expected), abs=1e-5)
    assert results[0]["test/L1_edit"] == pytest.approx(np.mean(edit_region), abs=1e-5)
    assert results[0]["test/copy/L1"] == pytest.approx(np.mean(copy), abs=1e-5)

    batch["native_box"][1] = torch.tensor([8, 0, 48, 32])  # runs past the 48-row image
    with pytest.raises(ValueError, match=r"'native_box' of sample 's1'.*inside the 48x32 image"):
        EditEvaluator(get_protocol("generic"), ["L1"]).update(batch, preds)


def test_results_record_native_scoring_and_flag_unaligned_pad():
    from types import SimpleNamespace

    from metrics.results import results_document

    batch, preds = native_batch()
    evaluator = EditEvaluator(get_protocol("generic"), ["L1"])
    evaluator.update(batch, preds)
    results = evaluator.compute()

    def document(eval_resize):
        datamodule = SimpleNamespace(resolution=MODEL_SIZE, eval_resize=eval_resize)
        model = torch.nn.Identity()
        return results_document(evaluator, results, model=model, datamodule=datamodule, run={})

    protocol = document("resize")["protocol"]
    assert protocol["scoring"] == "native" and protocol["eval_resize"] == "resize"
    assert "PIL Image.resize (BICUBIC" in protocol["resize"]
    with pytest.warns(UserWarning, match="eval_resize='pad' but its batches carry no model_box"):
        protocol = document("pad")["protocol"]
    assert protocol["scoring"] == "native-unaligned"


# --------------------------------------------------------------------------- the DataModule path


def write_magicbrush_test(folder, sessions: dict[str, int], size=(24, 40)) -> dict:
    """A MagicBrush test folder (edit_sessions.json, descriptions, images/<id>/...) of
    non-square images; returns {sample id: (output file, mask file)}."""
    import json

    truth, edit_sessions, captions = {}, {}, {}
    for n, (img_id, turns) in enumerate(sessions.items()):
        directory = folder / "images" / img_id
        directory.mkdir(parents=True)
        Image.fromarray(smooth(100 + n, size)).save(directory / f"{img_id}-input.png")
        captions[img_id] = {}
        edit_sessions[img_id] = []
        for k in range(1, turns + 1):
            output, mask = (
                directory / f"{img_id}-output{k}.png",
                directory / f"{img_id}-mask{k}.png",
            )
            Image.fromarray(smooth(200 + 10 * n + k, size)).save(output)
            white = np.zeros(size, np.uint8)
            white[k : k + 8, 2 * k : 2 * k + 12] = 255
            Image.fromarray(np.repeat(white[..., None], 3, -1)).save(mask)
            captions[img_id][output.name] = f"caption {img_id} {k}"
            edit_sessions[img_id].append(
                {
                    "input": f"{img_id}-input.png" if k == 1 else f"{img_id}-output{k - 1}.png",
                    "mask": mask.name,
                    "output": output.name,
                    "instruction": f"edit {img_id} {k}",
                }
            )
            truth[f"magicbrush/{img_id}/{k}"] = (output, mask)
    for name, data in (
        ("edit_sessions.json", edit_sessions),
        ("global_descriptions.json", captions),
        ("local_descriptions.json", captions),
    ):
        (folder / name).write_text(json.dumps(data))
    return truth


def test_magicbrush_test_loader_batches_score_as_magicbrush(tmp_path):
    """The MagicBrush DataModule's own test loader and collate (native images as lists,
    `skipped_ids`, turn fields) into the evaluator; the reference reads the files itself."""
    from datamodules.magicbrush import MagicBrushDataModule

    truth = write_magicbrush_test(tmp_path / "test", {"7": 2, "8": 1, "9": 3})
    dm = MagicBrushDataModule(
        root=str(tmp_path), resolution=16, batch_size=2, num_workers=0,
        caption_source="global", cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    dm.setup("test")
    evaluator = EditEvaluator(get_protocol("magicbrush").for_data(dm), ["L1", "L1_edit"])
    gen = torch.Generator().manual_seed(5)
    preds_by_id = {}
    for batch in dm.test_dataloader():
        assert "skipped_ids" in batch and isinstance(batch["target_native"], list)
        preds = torch.rand(len(batch["id"]), 3, 16, 16, generator=gen) * 2 - 1
        preds_by_id |= dict(zip(batch["id"], preds, strict=True))
        evaluator.update(batch, preds)
    results = evaluator.compute()
    assert set(preds_by_id) == set(truth)

    l1, edit = {}, {}
    for sample, (output, mask) in truth.items():
        gt = np.asarray(Image.open(output).convert("RGB"))
        region = np.asarray(Image.open(mask).convert("L"))[None] >= 128
        l1[sample] = magicbrush_l1(saved_png(preds_by_id[sample]), gt)
        edit[sample] = magicbrush_l1(saved_png(preds_by_id[sample]), gt, region)
    finals = ["magicbrush/7/2", "magicbrush/8/1", "magicbrush/9/3"]
    assert results["test/L1"] == pytest.approx(np.mean(list(l1.values())), abs=1e-5)
    assert results["test/L1_edit"] == pytest.approx(np.mean(list(edit.values())), abs=1e-5)
    assert results["test/final/L1"] == pytest.approx(np.mean([l1[s] for s in finals]), abs=1e-5)
    assert evaluator.num_samples() == {"all": 6, "final": 3, "turn1": 3}
