"""Feature metrics (DINO, CVS, CTS, CLIP directional / image similarity) on tiny random backbones.

References are computed on an independent path: PIL images through the HF processors (or a
torchvision v1 PIL pipeline for MagicBrush's DINO transform), the models' features, numpy
cosines. Test images are 8-bit and already at the processors' sizes (32 px for the tiny CLIP,
224 px / 256 px for the tiny DINO), so every resize is the identity and the match is tight.
"""

from __future__ import annotations

import string

import numpy as np
import pytest
import torch
from PIL import Image

from metrics import features
from metrics.features import (
    CTS,
    CVS,
    DINO,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CLIPDirectionalSimilarity,
    CLIPImageSimilarity,
    load_clip,
    preprocess_with_processor,
)

TOL = 1e-4
CAPTIONS_IN = ["a red square on a blue background", "a green circle", "two yellow stars"]
CAPTIONS_OUT = ["a blue square on a red background", "a green circle at night", "a cat"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel (32 px, patch 8, width 32, projection 16) + CLIPProcessor whose
    CLIPTokenizer has a character-level vocabulary (lower-case letters, ``</w>`` forms) and no
    merges."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    chars = string.ascii_lowercase + string.digits
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    vision = dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    out = tmp_path_factory.mktemp("clip")
    model.save_pretrained(out)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=224,
        patch_size=16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    out = tmp_path_factory.mktemp("dino")
    ViTModel(config).save_pretrained(out)
    ViTImageProcessor(
        size={"height": 224, "width": 224},
        resample=3,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    ).save_pretrained(out)
    return out


def images_u8(seed: int, n: int = 3, size: int = 32) -> np.ndarray:
    """Smooth-ish 8-bit images [n, size, size, 3] (random blocks upsampled, plus noise)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n, 4, 4, 3)).repeat(size // 4, 1).repeat(size // 4, 2)
    noise = rng.integers(-20, 21, size=blocks.shape)
    return np.clip(blocks + noise, 0, 255).astype(np.uint8)


def to_suite(u8: np.ndarray) -> torch.Tensor:
    """8-bit HWC images → the suite's [B, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255 * 2 - 1


def to_pil(u8: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(a) for a in u8]


def np_cos(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def np_unit(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def as_tensor(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def ref_clip_images(clip_dir, u8) -> np.ndarray:
    model, processor = load_clip(clip_dir)
    pixel_values = processor(images=to_pil(u8), return_tensors="pt")["pixel_values"]
    return as_tensor(model.get_image_features(pixel_values=pixel_values)).numpy()


@torch.no_grad()
def ref_clip_texts(clip_dir, captions) -> np.ndarray:
    model, processor = load_clip(clip_dir)
    tokens = processor(text=captions, padding=True, return_tensors="pt")
    return as_tensor(
        model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
    ).numpy()


# --------------------------------------------------------------------------- preprocessing


def test_preprocessing_matches_processor(clip_dir):
    _, processor = load_clip(clip_dir)
    u8 = images_u8(0)
    expected = processor(images=to_pil(u8), return_tensors="pt")["pixel_values"]
    got = preprocess_with_processor(to_suite(u8), processor)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_preprocessing_resizes_and_crops(clip_dir):
    """Non-identity resize: shape is right and the values stay close to the processor's
    (resize kernels differ: torch antialiased bicubic on floats vs the processor's on 8 bits)."""
    _, processor = load_clip(clip_dir)
    u8 = images_u8(1, size=64)[:, :, 8:56]  # 64 x 48: shortest edge 48 -> 32, crop 32 x 32
    expected = processor(images=to_pil(u8), return_tensors="pt")["pixel_values"]
    got = preprocess_with_processor(to_suite(u8), processor)
    assert got.shape == expected.shape == (3, 3, 32, 32)
    assert (got - expected).abs().mean() < 0.01  # measured 0.0045 (max 0.09)


# --------------------------------------------------------------------------- metrics vs reference


def test_cvs_matches_reference(clip_dir):
    a, b = images_u8(0), images_u8(1)
    expected = np_cos(ref_clip_images(clip_dir, a), ref_clip_images(clip_dir, b)).mean()
    metric = CVS(clip_dir)
    metric.update(to_suite(a), to_suite(b))
    assert metric.compute().item() == pytest.approx(expected, abs=TOL)


def test_clip_image_similarity_matches_reference(clip_dir):
    a, b = images_u8(2), images_u8(3)
    expected = np_cos(ref_clip_images(clip_dir, a), ref_clip_images(clip_dir, b)).mean()
    metric = CLIPImageSimilarity(clip_dir)
    metric.update(to_suite(a), to_suite(b))
    assert metric.compute().item() == pytest.approx(expected, abs=TOL)


def test_cts_matches_reference(clip_dir):
    u8 = images_u8(4)
    expected = np_cos(ref_clip_images(clip_dir, u8), ref_clip_texts(clip_dir, CAPTIONS_IN)).mean()
    metric = CTS(clip_dir)
    metric.update(to_suite(u8), CAPTIONS_IN)
    assert metric.compute().item() == pytest.approx(expected, abs=TOL)
    assert -1 <= metric.compute().item() <= 1  # raw cosine, not 100 * cos


def test_cts_matches_clip_forward(clip_dir):
    """Against CLIPModel's own forward (normalised image_embeds / text_embeds)."""
    model, processor = load_clip(clip_dir)
    u8 = images_u8(5)
    inputs = processor(text=CAPTIONS_OUT, images=to_pil(u8), padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    expected = (out.image_embeds * out.text_embeds).sum(-1).mean().item()
    metric = CTS(clip_dir)
    metric.update(to_suite(u8), CAPTIONS_OUT)
    assert metric.compute().item() == pytest.approx(expected, abs=TOL)


def test_directional_matches_reference(clip_dir):
    src, out = images_u8(6), images_u8(7)
    img_in, img_out = (
        np_unit(ref_clip_images(clip_dir, src)),
        np_unit(ref_clip_images(clip_dir, out)),
    )
    txt_in = np_unit(ref_clip_texts(clip_dir, CAPTIONS_IN))
    txt_out = np_unit(ref_clip_texts(clip_dir, CAPTIONS_OUT))
    expected = np_cos(img_out - img_in, txt_out - txt_in).mean()
    metric = CLIPDirectionalSimilarity(clip_dir)
    metric.update(to_suite(src), to_suite(out), CAPTIONS_IN, CAPTIONS_OUT)
    assert metric.compute().item() == pytest.approx(expected, abs=TOL)


def test_directional_unchanged_image_scores_zero(clip_dir):
    x = to_suite(images_u8(8))
    metric = CLIPDirectionalSimilarity(clip_dir)
    metric.update(x, x, CAPTIONS_IN, CAPTIONS_OUT)
    assert metric.compute().item() == pytest.approx(0.0, abs=1e-6)


@torch.no_grad()
def test_dino_processor_transform_matches_reference(dino_dir):
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(dino_dir).eval()
    processor = AutoImageProcessor.from_pretrained(dino_dir)
    a, b = images_u8(0, n=2, size=224), images_u8(1, n=2, size=224)

    def feats(u8):
        pixel_values = processor(images=to_pil(u8), return_tensors="pt")["pixel_values"]
        return model(pixel_values=pixel_values).last_hidden_state[:, 0].numpy()

    expected = np_cos(feats(a), feats(b)).mean()
    metric = DINO(dino_dir, transform="processor")
    metric.update(to_suite(a), to_suite(b))
    assert metric.compute().item() == pytest.approx(expected, abs=TOL)


@torch.no_grad()
def test_dino_magicbrush_transform_matches_reference(dino_dir):
    """MagicBrush's transform on 256 px images (Resize 256 is the identity, CenterCrop 224),
    against torchvision's PIL pipeline."""
    from torchvision import transforms as T
    from transformers import AutoModel

    model = AutoModel.from_pretrained(dino_dir).eval()
    transform = T.Compose(
        [
            T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    a, b = images_u8(2, n=2, size=256), images_u8(3, n=2, size=256)

    def feats(u8):
        pixel_values = torch.stack([transform(p) for p in to_pil(u8)])
        return model(pixel_values=pixel_values).last_hidden_state[:, 0].numpy()

    expected = np_cos(feats(a), feats(b)).mean()
    metric = DINO(dino_dir)
    metric.update(to_suite(a), to_suite(b))
    assert metric.compute().item() == pytest.approx(expected, abs=TOL)


# --------------------------------------------------------------------------- behaviour


def test_identity_is_one(clip_dir, dino_dir):
    x32 = to_suite(images_u8(9))
    cvs = CVS(clip_dir)
    cvs.update(x32, x32)
    assert cvs.compute().item() == pytest.approx(1.0, abs=1e-5)
    sim = CLIPImageSimilarity(clip_dir)
    sim.update(x32, x32)
    assert sim.compute().item() == pytest.approx(1.0, abs=1e-5)
    x = to_suite(images_u8(9, n=2, size=64))  # upsampled to 256 then cropped: still identical
    dino = DINO(dino_dir)
    dino.update(x, x)
    assert dino.compute().item() == pytest.approx(1.0, abs=1e-5)


def test_accumulation_is_mean_over_images(clip_dir):
    a, b = to_suite(images_u8(10, n=5)), to_suite(images_u8(11, n=5))
    one_shot = CVS(clip_dir)
    one_shot.update(a, b)
    per_image = []
    for i in range(5):
        m = CVS(clip_dir)
        m.update(a[i : i + 1], b[i : i + 1])
        per_image.append(m.compute().item())
    metric = CVS(clip_dir)
    metric.update(a[:2], b[:2])
    metric.update(a[2:], b[2:])
    assert metric.num_images.item() == 5
    assert metric.compute().item() == pytest.approx(one_shot.compute().item(), abs=1e-6)
    assert metric.compute().item() == pytest.approx(np.mean(per_image), abs=1e-6)
    metric.reset()
    assert torch.isnan(metric.compute())

    cts = CTS(clip_dir)
    cts.update(a[:2], CAPTIONS_IN[:2])
    cts.update(a[2:3], CAPTIONS_IN[2:])
    whole = CTS(clip_dir)
    whole.update(a[:3], CAPTIONS_IN)
    assert cts.compute().item() == pytest.approx(whole.compute().item(), abs=1e-6)


def test_half_precision_and_autocast(clip_dir):
    a, b = to_suite(images_u8(12)), to_suite(images_u8(13))
    ref = CVS(clip_dir)
    ref.update(a, b)
    metric = CVS(clip_dir)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        metric.update(a, b)
    assert metric.compute().item() == pytest.approx(ref.compute().item(), abs=1e-6)
    half = CVS(clip_dir)
    half.update(a.bfloat16(), b.bfloat16())
    assert half.compute().item() == pytest.approx(ref.compute().item(), abs=0.05)


def test_missing_path_names_metric_and_path(tmp_path):
    missing = tmp_path / "no-such-clip"
    for cls in (CVS, CTS, CLIPDirectionalSimilarity, CLIPImageSimilarity):
        with pytest.raises(FileNotFoundError) as err:
            cls(missing)
        assert cls.__name__ in str(err.value) and str(missing) in str(err.value)
        assert "CLIP" in str(err.value)
    with pytest.raises(FileNotFoundError, match="DINO") as err:
        DINO(tmp_path / "no-such-dino")
    assert str(tmp_path / "no-such-dino") in str(err.value)
    assert "dino-vits16" in str(err.value)


def test_one_clip_shared_between_metrics(clip_dir):
    features.clear_backbone_cache()
    x = to_suite(images_u8(14))
    cvs, cts = CVS(clip_dir), CTS(str(clip_dir) + "/")  # another spelling of the same folder
    cvs.update(x, x)
    cts.update(x, CAPTIONS_IN)
    info = features.backbone_cache_info()["clip"]
    assert info.misses == 1 and info.hits >= 1 and info.currsize == 1
    assert cvs.backbone(x.device)[0] is cts.backbone(x.device)[0]


def test_backbone_not_in_state_dict(clip_dir, dino_dir):
    x = to_suite(images_u8(15, n=1))
    for metric in (CVS(clip_dir), CTS(clip_dir), DINO(dino_dir, transform="processor")):
        if isinstance(metric, CTS):
            metric.update(x, CAPTIONS_IN[:1])
        else:
            metric.update(torch.cat([x] * 1), x)
        metric.persistent(True)
        keys = set(metric.state_dict())
        assert keys <= {"sum_cos", "num_images"}, keys
        assert list(metric.children()) == []
        assert sum(p.numel() for p in metric.parameters()) == 0


def test_rejects_bad_inputs(clip_dir):
    x = to_suite(images_u8(16))
    with pytest.raises(ValueError, match="captions"):
        CTS(clip_dir).update(x, CAPTIONS_IN[:2])
    with pytest.raises(TypeError):
        CTS(clip_dir).update(x, "one caption")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        CVS(clip_dir).update(x[:, :1], x)
    with pytest.raises(ValueError, match="transform"):
        DINO("unused", transform="bilinear")
