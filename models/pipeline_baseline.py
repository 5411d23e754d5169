"""PipelineBaseline: a released diffusers editing pipeline scored as an :class:`EditModel`.

The released editors users compare against are diffusers pipelines: InstructPix2Pix
(``timbrooks/instruct-pix2pix``, :class:`~diffusers.StableDiffusionInstructPix2PixPipeline`),
its SDXL variant (:class:`~diffusers.StableDiffusionXLInstructPix2PixPipeline`), the
single-file CompVis/LDM checkpoints of the InstructPix2Pix family (MagicBrush's fine-tuned
``MagicBrush-epoch-52-step-4999.ckpt``, read with diffusers' ``from_single_file``), FLUX.1
Kontext (:class:`~diffusers.FluxKontextPipeline`) and Qwen-Image-Edit
(:class:`~diffusers.QwenImageEditPipeline`). This model loads one from a local folder and
edits the test batches with it, so released weights are scored with the suite's protocols,
per-sample seeds (:func:`models.base.sample_generators`) and results documents, without
training (``fit`` is refused).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.exceptions import MisconfigurationException

from models.base import EditModel, EditOutput

#: The pipelines this wrapper knows how to call, by their ``model_index.json`` class name.
SUPPORTED_PIPELINES = (
    "StableDiffusionInstructPix2PixPipeline",
    "StableDiffusionXLInstructPix2PixPipeline",
    "FluxKontextPipeline",
    "QwenImageEditPipeline",
)
#: Pipelines that take an image guidance scale αV (InstructPix2Pix's second guidance term).
IMAGE_GUIDED = ("StableDiffusionInstructPix2PixPipeline", "StableDiffusionXLInstructPix2PixPipeline")
#: Pipelines that read the input size from ``PIL.Image.size`` (tensors are not accepted): they
#: get the source as 8-bit PIL images, as the releases' own examples pass them.
PIL_INPUT = ("QwenImageEditPipeline",)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pipeline_class_name(path: str | Path) -> str:
    """The ``_class_name`` of a diffusers folder's ``model_index.json``."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"{path}: pipeline_path must be a diffusers pipeline folder with model_index.json "
            "(a local copy of the released weights, e.g. `hf download timbrooks/instruct-pix2pix "
            "--local-dir ...`)"
        )
    return json.loads(index.read_text())["_class_name"]


class PipelineBaseline(EditModel):
    """A diffusers editing pipeline behind :meth:`EditModel.edit`.

    ``edit`` hands the pipeline the source batch as [0, 1] tensors (diffusers' tensor image
    convention), one prompt per sample and one generator per sample, asks for ``output_type
    "pt"`` ([0, 1]) and returns the images in [-1, 1] at the source's resolution. The pipelines
    draw their initial noise with ``randn_tensor`` over the generator list (row i from
    generator i) and encode the source image per sample, so a sample's edit does not depend on
    the rest of its batch.

    Args:
        pipeline_path: the diffusers folder (``model_index.json`` and one folder per component);
            with ``single_file``, the folder of the configs, tokenizers and scheduler the
            checkpoint's weights are put into (diffusers' ``from_single_file(config=...)``), so
            nothing is fetched.
        pipeline_class: a name of :data:`SUPPORTED_PIPELINES`, or ``auto``: the folder's
            ``model_index.json`` ``_class_name``.
        single_file: a CompVis/LDM ``.ckpt``/``.safetensors`` checkpoint (InstructPix2Pix's
            ``instruct-pix2pix-00-22000.ckpt``, MagicBrush's) loaded with
            ``from_single_file``.
        original_config: the LDM YAML of ``single_file`` (e.g. InstructPix2Pix's
            ``configs/generate.yaml``), passed to ``from_single_file`` as ``original_config``;
            ``pipeline_path`` still supplies the tokenizer and text encoder configs.
        torch_dtype: ``float32``, ``float16`` or ``bfloat16`` weights.
        scheduler: a diffusers scheduler class name built from the folder's scheduler config
            (``None``: the folder's own; InstructPix2Pix's is Euler ancestral).
        true_cfg_scale: the classifier-free guidance scale of Flux Kontext / Qwen-Image-Edit
            (``true_cfg_scale``; applied with ``negative_prompt``); ``None`` leaves the
            pipeline's default.
        negative_prompt: the negative prompt of the true-CFG branch (Qwen-Image-Edit's model
            card uses ``" "``); ``None`` passes none.
        max_sequence_length: the T5 / Qwen prompt length (``None``: the pipeline's, 512).
        **kwargs: the :class:`EditModel` arguments: ``num_inference_steps``, ``guidance_scale``
            (InstructPix2Pix's αX; Flux Kontext's distilled guidance; Qwen's only when its
            transformer embeds guidance), ``image_guidance_scale`` (αV, InstructPix2Pix only),
            ``eval_seed``, metrics, ...
    """

    def __init__(
        self,
        pipeline_path: str,
        pipeline_class: str = "auto",
        single_file: str | None = None,
        original_config: str | None = None,
        torch_dtype: str = "float32",
        scheduler: str | None = None,
        true_cfg_scale: float | None = None,
        negative_prompt: str | None = None,
        max_sequence_length: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if torch_dtype not in DTYPES:
            raise ValueError(f"torch_dtype must be one of {sorted(DTYPES)}, got {torch_dtype!r}")
        self.pipeline_path = pipeline_path
        self.pipeline_class = pipeline_class
        self.single_file = single_file
        self.original_config = original_config
        self.torch_dtype = torch_dtype
        self.scheduler_name = scheduler
        self.true_cfg_scale = true_cfg_scale
        self.negative_prompt = negative_prompt
        self.max_sequence_length = max_sequence_length
        # Released weights are never trained here: nothing of them enters a checkpoint.
        self.frozen_modules = ("components",)
        self.components: torch.nn.ModuleDict | None = None
        self._pipeline = None

    # ----------------------------------------------------------------- loading
    def resolve_class_name(self) -> str:
        name = self.pipeline_class
        if name == "auto":
            name = pipeline_class_name(self.pipeline_path)
        if name not in SUPPORTED_PIPELINES:
            raise ValueError(
                f"pipeline_class {name!r} is not supported; expected one of {SUPPORTED_PIPELINES}"
            )
        return name

    def load_pipeline(self):
        """The pipeline from ``pipeline_path`` (or ``single_file`` with the folder's configs),
        local files only."""
        import diffusers

        name = self.resolve_class_name()
        cls = getattr(diffusers, name)
        dtype = DTYPES[self.torch_dtype]
        extra = {}
        if "add_watermarker" in inspect.signature(cls.__init__).parameters:
            extra["add_watermarker"] = False  # scores must not depend on an invisible watermark
        if self.single_file is not None:
            if not Path(self.single_file).is_file():
                raise FileNotFoundError(f"single_file {self.single_file} not found")
            if self.original_config is not None:
                extra["original_config"] = self.original_config
            pipe = cls.from_single_file(
                self.single_file,
                config=str(self.pipeline_path),
                torch_dtype=dtype,
                local_files_only=True,
                **extra,
            )
        else:
            pipeline_class_name(self.pipeline_path)  # a clear error for a wrong folder
            pipe = cls.from_pretrained(
                self.pipeline_path, torch_dtype=dtype, local_files_only=True, **extra
            )
        if self.scheduler_name is not None:
            pipe.scheduler = getattr(diffusers, self.scheduler_name).from_config(
                pipe.scheduler.config
            )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def configure_model(self) -> None:
        if self._pipeline is not None:
            return
        pipe = self.load_pipeline()
        modules = {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
        for module in modules.values():
            module.requires_grad_(False).eval()
        # Submodules, so that Lightning moves them to the device (the pipeline then runs there).
        self.components = torch.nn.ModuleDict(modules)
        self._pipeline = pipe

    def sampler_record(self) -> dict:
        """The wrapped pipeline's scheduler and true-CFG settings beside the shared ones."""
        record = super().sampler_record()
        if self._pipeline is not None:
            record["scheduler"] = type(self._pipeline.scheduler).__name__
            record["pipeline"] = type(self._pipeline).__name__
        record["true_cfg_scale"] = self.true_cfg_scale
        return record

    @property
    def pipeline(self):
        """The loaded diffusers pipeline (loaded on first use)."""
        if self._pipeline is None:
            self.configure_model()
        return self._pipeline

    def train(self, mode: bool = True):
        """The pipeline's modules stay in eval mode."""
        super().train(mode)
        if self.components is not None:
            self.components.eval()
        return self

    # ----------------------------------------------------------------- no training
    def setup(self, stage: str) -> None:
        if stage == "fit":
            raise MisconfigurationException(
                f"{type(self).__name__} scores released pipeline weights and does not train; "
                "run `test` or `predict` (or train a model of the suite)"
            )

    def training_losses(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        raise MisconfigurationException(f"{type(self).__name__} does not train")

    def configure_optimizers(self):
        raise MisconfigurationException(f"{type(self).__name__} does not train")

    # ----------------------------------------------------------------- editing
    def call_kwargs(
        self,
        *,
        num_inference_steps: int,
        guidance_scale: float,
        image_guidance_scale: float,
        height: int,
        width: int,
        batch_size: int,
    ) -> dict:
        """The sampler arguments of this pipeline's ``__call__`` (besides image, prompt and
        generator): each is passed only where the call takes it."""
        pipe = self.pipeline
        name = type(pipe).__name__
        params = inspect.signature(pipe.__call__).parameters
        kwargs: dict = {"num_inference_steps": num_inference_steps, "output_type": "pt"}
        if name in IMAGE_GUIDED:
            kwargs["image_guidance_scale"] = image_guidance_scale
        transformer = getattr(pipe, "transformer", None)
        embeds_guidance = getattr(getattr(transformer, "config", None), "guidance_embeds", True)
        if name != "QwenImageEditPipeline" or embeds_guidance:
            kwargs["guidance_scale"] = guidance_scale
        if "true_cfg_scale" in params and self.true_cfg_scale is not None:
            kwargs["true_cfg_scale"] = self.true_cfg_scale
        if "negative_prompt" in params and self.negative_prompt is not None:
            kwargs["negative_prompt"] = [self.negative_prompt] * batch_size
        if "max_sequence_length" in params and self.max_sequence_length is not None:
            kwargs["max_sequence_length"] = self.max_sequence_length
        if "height" in params:
            kwargs["height"], kwargs["width"] = height, width
        if "max_area" in params:
            kwargs["max_area"] = height * width  # Kontext scales the output to max_area (1 MP)
        if "_auto_resize" in params:
            # Kontext would otherwise resize to its preferred ~1 MP resolutions; the suite's
            # protocols score at the data's resolution.
            kwargs["_auto_resize"] = False
        return kwargs

    @torch.no_grad()
    def edit(
        self,
        source: torch.Tensor,
        instructions: Sequence[str],
        *,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> EditOutput:
        pipe = self.pipeline
        batch, _, height, width = source.shape
        if len(instructions) != batch:
            raise ValueError(f"{len(instructions)} instructions for {batch} images")
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for {batch} images (one per sample)")
        dtype = DTYPES[self.torch_dtype]
        image = ((source.float().clamp(-1, 1) + 1) / 2).to(self.device, dtype)
        kwargs = self.call_kwargs(
            num_inference_steps=num_inference_steps or self.num_inference_steps,
            guidance_scale=self.guidance_scale if guidance_scale is None else guidance_scale,
            image_guidance_scale=(
                self.image_guidance_scale if image_guidance_scale is None else image_guidance_scale
            ),
            height=height,
            width=width,
            batch_size=batch,
        )
        if type(pipe).__name__ in PIL_INPUT:
            image = pipe.image_processor.numpy_to_pil(image.float().permute(0, 2, 3, 1).cpu().numpy())
        out = pipe(image=image, prompt=list(instructions), generator=generator, **kwargs).images
        out = torch.as_tensor(out).float()
        if out.shape[-2:] != (height, width):
            # A pipeline that rounds the size to its latent grid: back to the source's size.
            out = F.interpolate(out, size=(height, width), mode="bicubic", align_corners=False)
        return EditOutput(images=(out * 2 - 1).clamp(-1, 1).to(source.device))
