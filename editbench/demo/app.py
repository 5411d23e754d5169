"""The demo's Gradio Blocks page: an edit tab, an αV x αX grid tab (MGIE Fig. 3) and a compare
tab (two checkpoints, same input and seed). Every model call goes through one queue slot per
device (``concurrency_id="device"``, limit 1); a bad input becomes a ``gr.Error`` message in
the page, never a server error."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from editbench.demo.engine import (  # noqa: E402
    MAX_STEPS,
    DemoInputError,
    DemoModel,
    ModelCache,
    check_settings,
    parse_values,
    read_picture,
    run_grid,
)

log = logging.getLogger("editbench.demo")

#: The queue slot every model call shares: one edit per device at a time.
DEVICE_SLOT = "device"


def _picture(payload):
    """The picture of an unprocessed ``gr.Image`` value (``preprocess=False``: the uploaded
    file is read by :func:`read_picture`, so a non-image or a huge image is our message, not
    a decoding error inside Gradio), named by the uploaded file's name."""
    path = name = None
    if isinstance(payload, dict):
        path, name = payload.get("path"), payload.get("orig_name")
    elif isinstance(payload, str):
        path = payload
    return read_picture(path, name=name)


def _page_errors(fn: Callable) -> Callable:
    """Every failure of ``fn`` as a message in the page: :class:`DemoInputError` as it is,
    anything else as "edit failed: <error>" (the traceback goes to the server log)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except DemoInputError as err:
            raise gr.Error(str(err), print_exception=False) from None
        except Exception as err:  # a model failure must not be a server error or a hang
            log.exception("demo call failed")
            raise gr.Error(f"edit failed: {type(err).__name__}: {err}") from None

    return wrapper


def _progress(progress: gr.Progress):
    def update(done: int, total: int) -> None:
        progress((done, total), desc="denoising", unit="steps")

    return update


def _text_update(text: str | None):
    return gr.update(value=text or "", visible=bool(text))


def build_app(
    cache: ModelCache,
    specs: Sequence[str],
    examples: Sequence[tuple[str, str]],
    title: str = "editbench demo",
) -> gr.Blocks:
    """The page for the models named by ``specs`` (the first is the edit and grid tabs'
    model; the compare tab offers them all and accepts any other path)."""
    main_spec = specs[0]
    main = cache.get(main_spec)
    defaults = main.defaults()
    # λ is a knob only when the page's model has it; otherwise every model keeps its own.
    use_lambda = main.has_image_scale
    info = (
        f"**{main.label}** on {main.device} ({next(main.model.parameters()).dtype}), "
        f"{type(main.model).__name__}, fed at a shorter side of {main.resolution} px; results "
        f"come back at the input's size."
    )

    def knobs(prefix: str, scales: bool = True):
        alpha_v = alpha_x = None
        with gr.Row(visible=scales):
            alpha_v = gr.Slider(
                0.0, 5.0, value=defaults["image_guidance_scale"], step=0.05,
                label="αV (image guidance)", elem_id=f"{prefix}-alpha-v",
            )  # fmt: skip
            alpha_x = gr.Slider(
                0.0, 20.0, value=defaults["guidance_scale"], step=0.1,
                label="αX (text guidance)", elem_id=f"{prefix}-alpha-x",
            )  # fmt: skip
        with gr.Row():
            steps = gr.Slider(
                1, min(MAX_STEPS, 200), value=min(defaults["num_inference_steps"], 200), step=1,
                label="steps", elem_id=f"{prefix}-steps",
            )  # fmt: skip
            seed = gr.Number(value=0, precision=0, label="seed", elem_id=f"{prefix}-seed")
        lam = gr.Slider(
            0.0, 2.0, value=defaults.get("image_scale", 1.0), step=0.05,
            label="λ (InsightEdit image attention scale)", elem_id=f"{prefix}-lambda",
            visible=main.has_image_scale,
        )  # fmt: skip
        return alpha_v, alpha_x, steps, seed, lam

    def source_inputs(prefix: str):
        image = gr.Image(
            label="input image", type="filepath", sources=["upload", "clipboard"],
            elem_id=f"{prefix}-input", height=320,
        )  # fmt: skip
        instruction = gr.Textbox(
            label="instruction", placeholder="make the red circle blue",
            elem_id=f"{prefix}-instruction",
        )  # fmt: skip
        return image, instruction

    def gallery(image, instruction, prefix: str) -> None:
        if examples:
            gr.Examples(
                examples=[list(e) for e in examples], inputs=[image, instruction],
                label="examples (synthetic test split)", examples_per_page=4,
                elem_id=f"{prefix}-examples",
            )  # fmt: skip

    # ------------------------------------------------------------------ callbacks
    @_page_errors
    def edit(image, instruction, alpha_v, alpha_x, steps, seed, lam, progress=gr.Progress()):
        lam = lam if use_lambda else None
        text, steps, alpha_x, alpha_v, seed = check_settings(
            instruction, steps, alpha_x, alpha_v, seed
        )
        picture = _picture(image)
        result = main.edit(
            picture, text, guidance_scale=alpha_x, image_guidance_scale=alpha_v, steps=steps,
            seed=seed, image_scale=lam, on_step=_progress(progress),
        )  # fmt: skip
        w, h = picture.size
        timing = (
            f"{result.seconds:.2f} s for {steps} steps on {main.device}; fed at "
            f"{result.model_size[0]}x{result.model_size[1]}, returned at {w}x{h}."
        )
        return (
            result.image, _text_update(result.expressive), _text_update(result.caption), timing
        )

    @_page_errors
    def grid(image, instruction, v_text, x_text, steps, seed, lam, progress=gr.Progress()):
        lam = lam if use_lambda else None
        alpha_vs = parse_values(v_text, "αV values")
        alpha_xs = parse_values(x_text, "αX values")
        text, steps, _, _, seed = check_settings(instruction, steps, 1.0, 1.0, seed)
        picture = _picture(image)
        canvas, _ = run_grid(
            main, picture, text, alpha_vs, alpha_xs, steps=steps, seed=seed, image_scale=lam,
            on_step=_progress(progress),
        )  # fmt: skip
        return canvas

    @_page_errors
    def compare(
        image, instruction, spec_a, spec_b, alpha_v, alpha_x, steps, seed, lam,
        progress=gr.Progress(),
    ):  # fmt: skip
        lam = lam if use_lambda else None
        text, steps, alpha_x, alpha_v, seed = check_settings(
            instruction, steps, alpha_x, alpha_v, seed
        )
        picture = _picture(image)
        models: list[DemoModel] = [cache.get(spec_a), cache.get(spec_b)]
        outputs = []
        for k, model in enumerate(models):
            result = model.edit(
                picture, text, guidance_scale=alpha_x, image_guidance_scale=alpha_v,
                steps=steps, seed=seed, image_scale=lam,
                on_step=lambda d, n, k=k: progress((k * n + d, 2 * n), desc="denoising"),
            )  # fmt: skip
            extra = [t for t in (result.expressive, result.caption) if t]
            note = f"{model.label}: {result.seconds:.2f} s" + "".join(f"\n{t}" for t in extra)
            outputs += [gr.update(value=result.image, label=model.label), note]
        return tuple(outputs)

    # ------------------------------------------------------------------ layout
    events = {"concurrency_limit": 1, "concurrency_id": DEVICE_SLOT, "preprocess": False}
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"## {title}\n{info}")
        with gr.Tab("edit"):
            with gr.Row():
                with gr.Column():
                    image, instruction = source_inputs("edit")
                    alpha_v, alpha_x, steps, seed, lam = knobs("edit")
                    button = gr.Button("Edit", variant="primary", elem_id="edit-button")
                with gr.Column():
                    result = gr.Image(
                        label="result", type="pil", format="png", interactive=False,
                        elem_id="edit-result", height=320,
                    )  # fmt: skip
                    expressive = gr.Textbox(
                        label="expressive instruction", visible=False, interactive=False,
                        elem_id="edit-expressive",
                    )  # fmt: skip
                    caption = gr.Textbox(
                        label="caption", visible=False, interactive=False, elem_id="edit-caption"
                    )
                    timing = gr.Markdown(elem_id="edit-time")
            gallery(image, instruction, "edit")
            button.click(
                edit,
                [image, instruction, alpha_v, alpha_x, steps, seed, lam],
                [result, expressive, caption, timing],
                **events,
            )
        with gr.Tab("grid"):
            gr.Markdown("The αV x αX trade-off for one image (MGIE Fig. 3): one seed, every pair.")
            with gr.Row():
                with gr.Column():
                    g_image, g_instruction = source_inputs("grid")
                    v_values = gr.Textbox(value="1.0, 1.5, 2.0", label="αV values (rows)")
                    x_values = gr.Textbox(value="3, 5, 7.5, 10", label="αX values (columns)")
                    _, _, g_steps, g_seed, g_lam = knobs("grid", scales=False)
                    g_button = gr.Button("Render grid", variant="primary", elem_id="grid-button")
                with gr.Column():
                    g_result = gr.Image(
                        label="grid", type="pil", format="png", interactive=False,
                        elem_id="grid-result",
                    )  # fmt: skip
            gallery(g_image, g_instruction, "grid")
            g_button.click(
                grid,
                [g_image, g_instruction, v_values, x_values, g_steps, g_seed, g_lam],
                g_result,
                **events,
            )
        with gr.Tab("compare"):
            gr.Markdown("Two checkpoints (or configs) on the same input with the same seed.")
            with gr.Row():
                with gr.Column():
                    c_image, c_instruction = source_inputs("compare")
                    with gr.Row():
                        choices = list(specs)
                        spec_a = gr.Dropdown(
                            choices, value=choices[0], allow_custom_value=True,
                            label="model A (.ckpt or .yaml path)", elem_id="compare-a",
                        )  # fmt: skip
                        spec_b = gr.Dropdown(
                            choices, value=choices[min(1, len(choices) - 1)],
                            allow_custom_value=True, label="model B", elem_id="compare-b",
                        )  # fmt: skip
                    c_alpha_v, c_alpha_x, c_steps, c_seed, c_lam = knobs("compare")
                    c_button = gr.Button("Compare", variant="primary", elem_id="compare-button")
                with gr.Column():
                    with gr.Row():
                        out_a = gr.Image(label="A", type="pil", format="png", interactive=False)
                        out_b = gr.Image(label="B", type="pil", format="png", interactive=False)
                    with gr.Row():
                        note_a = gr.Markdown()
                        note_b = gr.Markdown()
            gallery(c_image, c_instruction, "compare")
            c_button.click(
                compare,
                [c_image, c_instruction, spec_a, spec_b, c_alpha_v, c_alpha_x, c_steps, c_seed,
                 c_lam],
                [out_a, note_a, out_b, note_b],
                **events,
            )  # fmt: skip
    app.queue(default_concurrency_limit=1, max_size=32)
    return app
