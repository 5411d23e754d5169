"""Input handling shared by ``python -m editbench edit`` and the demo
(:func:`editbench.commands.edit.open_image`, ``model_size``, ``tensor_to_image``): EXIF
orientation, mode conversions, the aspect ratio kept, the result at the input's size, and one
line for a bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from editbench.commands.edit import model_size, open_image

INSTRUCTION = "make the red circle blue"


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB picture (JPEG keeps it close)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR))


@pytest.fixture(scope="module")
def checkpoint(tiny_dir, tmp_path_factory):
    """A tiny InsPix2Pix checkpoint as `fit` writes one (trainable weights, the class and its
    arguments, the data's resolution), 2 sampling steps."""
    from models.inspix2pix import InsPix2Pix

    model = InsPix2Pix(diffusion_path=str(tiny_dir / "instruct-pix2pix"), num_inference_steps=2)
    model.configure_model()
    state = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(state)
    path = tmp_path_factory.mktemp("edit_inputs") / "tiny.ckpt"
    torch.save(
        {
            "state_dict": state["state_dict"],
            "hyper_parameters": {"_class_path": "models.inspix2pix.InsPix2Pix", **model.hparams},
            "datamodule_hyper_parameters": {"resolution": 32},
        },
        path,
    )
    return path


def run_edit(checkpoint, image, output, capsys) -> Image.Image:
    from editbench.cli import main

    argv = [
        "edit", "--ckpt_path", str(checkpoint), "--image", str(image), "--instruction",
        INSTRUCTION, "--output", str(output), "--device", "cpu", "--seed", "4",
    ]  # fmt: skip
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["image"] == str(output)
    return Image.open(output)


def test_model_size_keeps_the_aspect_ratio():
    assert model_size((48, 40), 32) == (40, 32)  # 48 * 32/40 = 38.4 -> 40
    assert model_size((40, 48), 32) == (32, 40)
    assert model_size((32, 32), 32) == (32, 32)
    assert model_size((640, 480), 256) == (344, 256)  # 341.3 -> 344
    assert model_size((1000, 100), 32) == (128, 16)  # a panorama: the long side at 4 x 32
    assert model_size((50, 30), None) == (48, 32)  # no resolution: only the rounding


def test_48x40_comes_back_48x40(checkpoint, tmp_path, capsys, monkeypatch):
    import editbench.commands.edit as edit_command

    array = noise(40, 48)
    source = tmp_path / "in.png"
    Image.fromarray(array).save(source)
    seen = {}
    load = edit_command.load_checkpoint_model

    def recording_load(*args, **kwargs):
        model, data = load(*args, **kwargs)
        plain_edit = model.edit

        def edit(images, *a, **k):
            seen["source"] = images.detach().cpu().clone()
            out = plain_edit(images, *a, **k)
            seen["output"] = out.images[0].detach().cpu().clone()
            return out

        model.edit = edit
        return model, data

    monkeypatch.setattr(edit_command, "load_checkpoint_model", recording_load)
    result = run_edit(checkpoint, source, tmp_path / "out.png", capsys)
    assert result.size == (48, 40)
    # The model saw the whole picture at 40x32 (W x H): plain torch's antialiased bilinear.
    fed = seen["source"]
    assert fed.shape == (1, 3, 32, 40)
    reference = F.interpolate(
        torch.from_numpy(array).permute(2, 0, 1)[None].float(), size=(32, 40),
        mode="bilinear", antialias=True, align_corners=False,
    ) / 127.5 - 1.0  # fmt: skip
    assert (fed - reference).abs().max() <= 2.5 / 127.5
    # The written picture is the model's output, 8 bits, resized by PIL bicubic to 48x40.
    raw = ((seen["output"].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    expected = Image.fromarray(raw.permute(1, 2, 0).numpy()).resize((48, 40), Image.BICUBIC)
    assert np.array_equal(np.asarray(result.convert("RGB")), np.asarray(expected))


def test_orientation_6_jpeg_is_edited_upright(checkpoint, tmp_path, capsys):
    stored = noise(48, 40, seed=1)  # as the camera stores it: 40 wide, 48 high
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    jpeg = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(jpeg, quality=95, exif=exif.tobytes())
    with Image.open(jpeg) as raw:
        decoded = np.asarray(raw.convert("RGB"))  # the stored pixels, not turned
    upright = np.rot90(decoded, k=-1)  # clockwise, by numpy
    assert upright.shape == (40, 48, 3)
    assert np.array_equal(np.asarray(open_image(jpeg)), upright)
    png = tmp_path / "upright.png"
    Image.fromarray(np.ascontiguousarray(upright)).save(png)
    from_jpeg = run_edit(checkpoint, jpeg, tmp_path / "from_jpeg.png", capsys)
    from_png = run_edit(checkpoint, png, tmp_path / "from_png.png", capsys)
    assert from_jpeg.size == (48, 40)  # upright: wider than high
    assert np.array_equal(np.asarray(from_jpeg), np.asarray(from_png))


def test_modes_convert_to_rgb(tmp_path):
    rng = np.random.default_rng(2)
    # Grayscale: the value in all three channels.
    gray = rng.integers(0, 256, (8, 6), dtype=np.uint8)
    Image.fromarray(gray, mode="L").save(tmp_path / "gray.png")
    assert np.array_equal(np.asarray(open_image(tmp_path / "gray.png")), np.stack([gray] * 3, -1))
    # 16-bit grayscale: 65535 is white (v / 257), not clipped at 255.
    deep = rng.integers(0, 65536, (8, 6)).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode.startswith("I")
    expected = np.clip(np.floor(deep / 257.0 + 0.5), 0, 255).astype(np.uint8)
    got = np.asarray(open_image(tmp_path / "deep.png"))
    assert np.abs(got.astype(int) - np.stack([expected] * 3, -1)).max() <= 1
    assert got.mean() > 60  # a plain convert("RGB") would make it nearly all 255
    # RGBA: composited over white, by hand.
    rgba = rng.integers(0, 256, (8, 6, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    alpha = rgba[..., 3:].astype(float) / 255
    expected = rgba[..., :3] * alpha + 255 * (1 - alpha)
    got = np.asarray(open_image(tmp_path / "alpha.png")).astype(float)
    assert np.abs(got - expected).max() <= 1.0
    # CMYK (a print JPEG): R = (255 - C)(255 - K)/255, and so on.
    cmyk = rng.integers(0, 256, (8, 6, 4), dtype=np.uint8)
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "cmyk.tif")
    keep = (255 - cmyk[..., 3:].astype(float)) / 255
    expected = (255 - cmyk[..., :3].astype(float)) * keep
    got = np.asarray(open_image(tmp_path / "cmyk.tif")).astype(float)
    assert got.shape == (8, 6, 3) and np.abs(got - expected).max() <= 1.0


def test_bad_images_are_one_line_errors(checkpoint, tmp_path, capsys):
    from editbench.cli import main
    from editbench.commands.edit import ImageInputError

    text = tmp_path / "notes.png"
    text.write_text("not an image")
    big = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(big)
    with pytest.raises(ImageInputError, match=r"big.png is 300x200 = 0.1 MP; the limit is"):
        open_image(big, max_pixels=300 * 200 - 1)
    with pytest.raises(ImageInputError, match="nowhere.png not found"):
        open_image(tmp_path / "nowhere.png")
    argv = [
        "edit", "--ckpt_path", str(checkpoint), "--image", str(text), "--instruction",
        INSTRUCTION, "--output", str(tmp_path / "out.png"), "--device", "cpu",
    ]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "notes.png is not an image" in err and "Traceback" not in err
    assert not (tmp_path / "out.png").exists()
