"""InstructPix2Pix's CLIP similarities (metrics.ip2p): the preprocessing of its
``metrics/clip_similarity.py`` and the released script's [-1, 1] compatibility option.

The reference re-does ``ClipSimilarity.encode_image`` as released: ``F.interpolate(image,
size=224, mode="bicubic", align_corners=False)`` (size = the tiny CLIP's 32 here), minus CLIP's
mean, over its std (the constants typed from the release), then the projected embedding,
L2-normalised.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metrics.features import CVS, CLIPDirectionalSimilarity, CLIPImageSimilarity, load_clip

RELEASE_MEAN = (0.48145466, 0.4578275, 0.40821073)
RELEASE_STD = (0.26862954, 0.26130258, 0.27577711)


def release_encode(model, images01: torch.Tensor, size: int) -> torch.Tensor:
    x = F.interpolate(images01.float(), size=size, mode="bicubic", align_corners=False)
    x = (x - torch.tensor(RELEASE_MEAN).view(1, 3, 1, 1)) / torch.tensor(RELEASE_STD).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        features = model.get_image_features(pixel_values=x)
    features = getattr(features, "pooler_output", features)
    return features / features.norm(dim=1, keepdim=True)


@pytest.fixture
def pair():
    gen = torch.Generator().manual_seed(3)
    # non-square: the release squashes to a square, a processor would crop the sides away
    source = torch.rand(3, 3, 24, 48, generator=gen) * 2 - 1
    preds = (0.5 * source + 0.5 * (torch.rand(3, 3, 24, 48, generator=gen) * 2 - 1)).clamp(-1, 1)
    return source, preds


def test_clip_image_similarity_preprocesses_as_instructpix2pix(small_backbones, pair):
    clip = small_backbones / "clip"
    source, preds = pair
    model, _ = load_clip(clip)
    metric = CLIPImageSimilarity(clip)
    metric.update(source, preds)
    a = release_encode(model, (source + 1) / 2, 32)
    b = release_encode(model, (preds + 1) / 2, 32)
    expected = F.cosine_similarity(a, b).mean().item()
    assert metric.compute().item() == pytest.approx(expected, abs=1e-5)
    assert metric.provenance()["input_range"].startswith("unit")

    # the processor's resize-and-crop sees other pixels: another number
    processor = CLIPImageSimilarity(clip, preprocess="processor")
    processor.update(source, preds)
    assert abs(processor.compute().item() - expected) > 1e-4


def test_signed_range_reproduces_the_released_script(small_backbones, pair):
    """compute_metrics.py passes [-1, 1] images (EditDatasetEval, the decoder) unchanged."""
    clip = small_backbones / "clip"
    source, preds = pair
    model, _ = load_clip(clip)
    metric = CLIPImageSimilarity(clip, input_range="signed")
    metric.update(source, preds)
    a, b = release_encode(model, source, 32), release_encode(model, preds, 32)
    expected = F.cosine_similarity(a, b).mean().item()
    assert metric.compute().item() == pytest.approx(expected, abs=1e-5)
    unit = CLIPImageSimilarity(clip)
    unit.update(source, preds)
    assert abs(unit.compute().item() - expected) > 1e-4
    assert "released compute_metrics.py" in metric.provenance()["input_range"]


def test_directional_similarity_uses_the_release_preprocessing(small_backbones, pair):
    clip = small_backbones / "clip"
    source, preds = pair
    model, processor = load_clip(clip)
    captions_in = ["a cat", "a red square", "the night sky"]
    captions_out = ["a dog", "a blue square", "the day sky"]
    metric = CLIPDirectionalSimilarity(clip)
    metric.update(source, preds, captions_in, captions_out)
    img_in = release_encode(model, (source + 1) / 2, 32)
    img_out = release_encode(model, (preds + 1) / 2, 32)
    tokens = processor.tokenizer(captions_in + captions_out, padding=True, return_tensors="pt")
    with torch.no_grad():
        text = model.get_text_features(**tokens)
    text = getattr(text, "pooler_output", text)
    text = text / text.norm(dim=1, keepdim=True)
    text_in, text_out = text.chunk(2)
    expected = F.cosine_similarity(img_out - img_in, text_out - text_in).mean().item()
    assert metric.compute().item() == pytest.approx(expected, abs=1e-5)


def test_options_are_checked(small_backbones):
    clip = small_backbones / "clip"
    assert CVS(clip).preprocess == "processor"  # MagicBrush's CLIP-I keeps the processor
    with pytest.raises(ValueError, match="only goes with preprocess='instructpix2pix'"):
        CVS(clip, input_range="signed")
    with pytest.raises(ValueError, match="`preprocess` must be one of"):
        CLIPImageSimilarity(clip, preprocess="crop")
