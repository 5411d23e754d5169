"""``python -m editbench demo``: the engine (model cache, edits at the input's size, the αV x αX
grid, compare, messages for bad input) and the page itself, driven in Debian's Chromium by
Playwright (marked ``browser`` and ``slow``)."""

from __future__ import annotations

import io
import os
import shutil
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
INSTRUCTION = "make the red circle blue"


@pytest.fixture(scope="module")
def demo_config(tiny_dir, synthetic_root, tmp_path_factory) -> Path:
    """An untrained tiny InsPix2Pix config (the `-c` path of the demo), 2 sampling steps."""
    folder = tmp_path_factory.mktemp("demo")
    config = {
        "model": {
            "class_path": "models.inspix2pix.InsPix2Pix",
            "init_args": {
                "diffusion_path": str(tiny_dir / "instruct-pix2pix"),
                "num_inference_steps": 2,
                "guidance_scale": 7.5,
                "image_guidance_scale": 1.5,
            },
        },
        "data": {
            "class_path": "datamodules.synthetic.SyntheticEditDataModule",
            "init_args": {"root": str(synthetic_root), "resolution": 32},
        },
        "trainer": {"max_steps": 1},  # ignored by the demo: no trainer is built
    }
    path = folder / "tiny_demo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def cache():
    from editbench.demo.engine import ModelCache

    return ModelCache("cpu", torch.float32, capacity=3)


def save_checkpoint(model, path: Path, data: dict, scale: float) -> Path:
    """A checkpoint as `fit` writes it (trainable weights, the classes' arguments), with the
    UNet's weights scaled so that it edits differently from the config's model."""
    state = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(state)
    weights = {k: v.clone() * (scale if "unet" in k else 1.0) for k, v in state["state_dict"].items()}
    hparams = {"_class_path": "models.inspix2pix.InsPix2Pix", **dict(model.hparams)}
    torch.save(
        {"state_dict": weights, "hyper_parameters": hparams, "datamodule_hyper_parameters": data},
        path,
    )
    return path


def test_edit_comes_back_at_the_input_size_with_the_same_result(demo_config, cache):
    from editbench.commands.edit import image_to_tensor, tensor_to_image

    model = cache.get([str(demo_config)])
    assert model.resolution == 32 and not model.has_image_scale
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    steps_seen = []
    result = model.edit(
        picture, INSTRUCTION, guidance_scale=7.5, image_guidance_scale=1.5, steps=2, seed=3,
        on_step=lambda done, total: steps_seen.append((done, total)),
    )  # fmt: skip
    assert result.image.size == (48, 40) and result.model_size == (40, 32)
    assert steps_seen == [(1, 2), (2, 2)]  # one UNet call per step (the progress bar)
    # The plain model on the same input and seed, resized back by hand.
    source = image_to_tensor(picture, 32)
    expected = model.model.edit(
        source, [INSTRUCTION], num_inference_steps=2, guidance_scale=7.5,
        image_guidance_scale=1.5, generator=torch.Generator().manual_seed(3),
    ).images[0]  # fmt: skip
    reference = np.asarray(tensor_to_image(expected).resize((48, 40), Image.Resampling.BICUBIC))
    assert np.array_equal(np.asarray(result.image), reference)
    assert result.expressive is None and result.caption is None
    assert cache.get(str(demo_config)) is model  # loaded once


def test_grid_cells_are_the_single_edits(demo_config, cache):
    from editbench.demo.engine import parse_values, run_grid

    model = cache.get(str(demo_config))
    picture = _square(32)
    alpha_vs, alpha_xs = parse_values("1.0:2.0:1.0", "αV"), parse_values("3, 7.5", "αX")
    assert alpha_vs == [1.0, 2.0] and alpha_xs == [3.0, 7.5]
    canvas, cells = run_grid(model, picture, INSTRUCTION, alpha_vs, alpha_xs, steps=2, seed=5)
    assert len(cells) == 2 and all(len(row) == 2 for row in cells)
    assert canvas.size[0] > 2 * 96 and canvas.size[1] > 2 * 96  # 32 px cells shown at 96
    for r, c in ((0, 1), (1, 0)):  # rows are αV, columns αX
        single = model.edit(
            picture, INSTRUCTION, guidance_scale=alpha_xs[c], image_guidance_scale=alpha_vs[r],
            steps=2, seed=5,
        )  # fmt: skip
        assert np.array_equal(np.asarray(cells[r][c]), np.asarray(single.image))
    assert not np.array_equal(np.asarray(cells[0][1]), np.asarray(cells[1][0]))


def test_bf16_edits_as_fp32(demo_config, cache):
    """The GPU setting (bf16 weights; the sampler keeps latents in float32), run on the CPU."""
    from editbench.demo.engine import ModelCache

    half = ModelCache("cpu", torch.bfloat16).get(str(demo_config))
    assert next(half.model.parameters()).dtype == torch.bfloat16
    picture, kwargs = _square(32), {"guidance_scale": 7.5, "image_guidance_scale": 1.5}
    edits = [
        np.asarray(m.edit(picture, INSTRUCTION, steps=2, seed=2, **kwargs).image).astype(float)
        for m in (cache.get(str(demo_config)), half)
    ]
    assert np.abs(edits[0] - edits[1]).mean() < 4.0  # 8-bit levels
    assert np.abs(edits[0] - np.asarray(picture)).mean() > 20.0  # both far from the input


def _square(side: int) -> Image.Image:
    rng = np.random.default_rng(side)
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def test_compare_loads_a_checkpoint_beside_the_config(demo_config, cache, tmp_path):
    config_model = cache.get(str(demo_config))
    data = {"_class_path": "datamodules.synthetic.SyntheticEditDataModule", "resolution": 32}
    same = save_checkpoint(config_model.model, tmp_path / "same.ckpt", data, 1.0)
    other = save_checkpoint(config_model.model, tmp_path / "other.ckpt", data, 0.5)
    picture, kwargs = _square(32), {"guidance_scale": 7.5, "image_guidance_scale": 1.5}
    results = [
        cache.get(str(spec)).edit(picture, INSTRUCTION, steps=2, seed=1, **kwargs).image
        for spec in (demo_config, same, other)
    ]
    assert np.array_equal(np.asarray(results[0]), np.asarray(results[1]))  # same weights
    assert not np.array_equal(np.asarray(results[0]), np.asarray(results[2]))


def test_bad_inputs_are_messages(demo_config, cache, tmp_path):
    from editbench.demo.engine import DemoInputError, check_settings, parse_values, read_picture

    with pytest.raises(DemoInputError, match="instruction is empty"):
        check_settings("   ", 2, 7.5, 1.5, 0)
    with pytest.raises(DemoInputError, match="Steps must be between"):
        check_settings("x", 0, 7.5, 1.5, 0)
    with pytest.raises(DemoInputError, match="Upload an image"):
        read_picture(None)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(DemoInputError, match="notes.png is not an image"):
        read_picture(text)
    big = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(big)
    with pytest.raises(DemoInputError, match=r"300x200 .* limit is 0.1 MP \(50000 pixels\)"):
        read_picture(big, max_pixels=50_000)
    with pytest.raises(DemoInputError, match="unknown checkpoint.*nowhere.ckpt"):
        cache.get(str(tmp_path / "nowhere.ckpt"))
    with pytest.raises(DemoInputError, match="αV values"):
        parse_values("a, b", "αV values")


# --------------------------------------------------------------------------- the page


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium_or_skip() -> str:
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    if shutil.which("apt-get") is None:
        pytest.skip(f"{CHROMIUM} is absent and apt-get is not available to install it")
    pytest.fail(f"{CHROMIUM} is absent: `apt-get install -y chromium` (the CI script does)")


@pytest.mark.browser
@pytest.mark.slow
def test_demo_page_in_chromium(demo_config, synthetic_root, tmp_path):
    """Start the demo on the tiny model, upload a 96x80 image, edit, read the result back
    (96x80, not the input), send an empty instruction and read the message; every request
    the page makes goes to 127.0.0.1. Screenshots in tmp_path (and docs/demo.png when
    EDITBENCH_SCREENSHOT is set)."""
    executable = chromium_or_skip()
    playwright = pytest.importorskip("playwright.sync_api")
    from editbench.commands.demo import build_parser, create_app

    port = free_port()
    args = build_parser().parse_args(
        ["-c", str(demo_config), "--port", str(port), "--device", "cpu", "--num_examples", "4"]
    )
    app, _, allowed = create_app(args)
    app.launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
        allowed_paths=allowed, ssr_mode=False, share=False,
    )  # fmt: skip
    upload = tmp_path / "input.png"
    source = sorted((synthetic_root / "images" / "test").glob("*_source.png"))[0]
    Image.open(source).convert("RGB").resize((96, 80), Image.Resampling.BICUBIC).save(upload)
    shots = [tmp_path / "demo.png"]
    if os.environ.get("EDITBENCH_SCREENSHOT"):
        shots.append(Path(__file__).resolve().parents[2] / "docs" / "demo.png")
    requests: list[str] = []
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=executable, headless=True, args=["--no-sandbox"]
            )
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle")
            page.locator("#edit-input input[type=file]").set_input_files(str(upload))
            page.locator("#edit-instruction textarea").fill(INSTRUCTION)
            page.locator("#edit-button").click()
            result = page.locator("#edit-result img")
            result.wait_for(state="visible", timeout=30_000)
            page.get_by_text("returned at 96x80").wait_for(timeout=10_000)
            response = page.request.get(result.get_attribute("src"))
            assert response.ok
            edited = np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB"))
            original = np.asarray(Image.open(upload))
            assert edited.shape == original.shape == (80, 96, 3)
            assert np.abs(edited.astype(int) - original.astype(int)).mean() > 5
            for shot in shots:
                shot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(shot), full_page=True)

            page.locator("#edit-instruction textarea").fill("")
            page.locator("#edit-button").click()
            page.get_by_text("The instruction is empty").first.wait_for(timeout=10_000)
            time.sleep(0.3)  # let the message finish drawing
            page.screenshot(path=str(tmp_path / "demo_empty_instruction.png"), full_page=True)
            browser.close()
    finally:
        app.close()
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    hosts = {urlparse(u).hostname for u in requests if urlparse(u).scheme in ("http", "https")}
    assert requests and hosts == {"127.0.0.1"}, sorted(set(requests))
