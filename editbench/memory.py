"""Training-memory estimates per GPU for the paper configs (issue 16, item 5: memory presets).

Everything here is computed on the CPU: the paper architectures are built on PyTorch's ``meta``
device (shapes, no storage) from their public configs, written out below, and the suite's own
components (:class:`~models.components.edit_head.EditHead`, the InsightEdit
:class:`~models.components.bridging.TextStream` / :class:`ImageStream`, the decoupled attention,
peft's LoRA through :func:`~models.components.mm_tokens.add_lora`) are built on meta too, so the
parameter counts are of the code users run. No GPU measured these numbers.

Per GPU, for a batch of B samples (bytes; ``N`` GPUs):

* weights: every parameter in the dtype the suite holds it (trainable ones float32, as
  ``bf16-mixed`` keeps them; the frozen LLaVA/LLaMA in bfloat16, ``mllm_dtype``; the frozen VAE
  and CLIP models float32: nothing casts them, the "fp32 VAE");
* gradients: 4 B per trainable parameter; DDP adds its reducer buckets, another 4 B
  (Lightning's DDP leaves ``gradient_as_bucket_view`` off);
* optimizer: AdamW's float32 m and v, 8 B per trainable parameter (no extra master copy:
  the weights already are float32), or bitsandbytes' ``AdamW8bit``, 2 B plus its block-wise
  absmax (2 x 4 B per 2,048 values);
* sharding: ZeRO-2 divides gradients and optimizer states by N; FSDP ``FULL_SHARD`` divides
  weights too, for the parameters inside its wrapped layers (:data:`FSDP_UNITS`), and holds two
  gathered units in bfloat16 (the one computing and the one prefetched; Lightning's FSDP
  ``bf16-mixed`` gathers in bfloat16); the parameters outside every unit stay whole (root unit).
  FSDP flattens each unit into one tensor of one dtype, so under FSDP every weight is float32
  (the presets set ``mllm_dtype: float32``: LLaMA's frozen layers and MGIE's float32
  embeddings share the root unit);
* autocast: the bfloat16 copies of the float32 trainable weights that autocast caches for the
  backward pass, 2 B per trainable parameter;
* activations: B x the bytes saved for the backward pass by one sample, measured
  (:func:`editbench.activations.saved_activations`) on meta in bfloat16 with scaled-dot-product attention as a fused
  kernel (q, k, v, output, log-sum-exp saved; no attention matrix), as GPUs run it; with
  gradient checkpointing the boundary inputs of each checkpointed layer plus the largest
  layer's own activations (recomputed one at a time in the backward pass);
* overhead: :data:`FIXED_OVERHEAD` (CUDA context, cuBLAS/cuDNN workspaces) plus
  :data:`OVERHEAD_FRACTION` of the rest (allocator fragmentation, transient buffers, the
  frozen models' forward passes, which save nothing).

Not modelled: autocast's float32 ops (norms, softmax) are counted at bfloat16; DeepSpeed's cast
of the whole module to bfloat16 under ZeRO; the optimizer step's transient buffers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
from torch import nn

from editbench.activations import (
    Activations,
    fused_attention,
    llm_activations,
    saved_activations,
    unet_activations,
    unit_classes,
)

GIB = 2**30
#: CUDA context + library workspaces, a stated constant (not measured here).
FIXED_OVERHEAD = int(1.5 * GIB)
#: Allocator fragmentation and transient buffers, a stated share of the estimate.
OVERHEAD_FRACTION = 0.10
#: Activation bytes of the float tensors in the measurements (bfloat16).
ACT_DTYPE = torch.bfloat16

MODELS = ("MGIE", "LGIE", "InsightEdit", "InsPix2Pix")
STRATEGIES = ("ddp", "zero2", "fsdp")
OPTIMIZERS = ("adamw", "adamw8bit")
#: Layers that are FSDP units in the presets (editbench.strategies.LAYERS names).
FSDP_UNITS = ("LlamaDecoderLayer", "CLIPEncoderLayer", "BasicTransformerBlock", "ResnetBlock2D")

#: Text tokens per sample (a chosen bound; the sequences are padded to the batch's longest):
#: the vicuna_v1_1 system prompt (~35), the quoted query with the instruction (~30), and for
#: MGIE/LGIE the ~32-word summarised expressive instruction (~45) and </s>.
TEXT_TOKENS = {"MGIE": 128, "LGIE": 128, "InsightEdit": 96}
#: LLaVA-7B (v1, and SmartEdit's LLaVA-1.1) reads CLIP ViT-L/14 at 224 px: 16 x 16 patches.
IMAGE_SIZE = 224
#: Vocabulary: LLaMA's 32,000 + LLaVA v1's 3 image tokens (the release's [IMG0] is id 32003)
#: + MGIE's 8 [IMG]; LGIE's LLaMA + 8; SmartEdit's 32,000 + <img> + 32 [MM].
VOCAB = {"MGIE": 32003 + 8, "LGIE": 32000 + 8, "InsightEdit": 32000 + 1 + 32}
NEW_TOKENS = {"MGIE": 8, "LGIE": 8, "InsightEdit": 32}


# ----------------------------------------------------------------------------- architectures
def llama_7b_config(vocab_size: int = 32000):
    """LLaMA-7B / Vicuna-7B (Touvron et al., 2023, Table 2: dim 4096, 32 layers, 32 heads;
    FFN 11008 in the released config)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
    )


def clip_vit_l14_vision_config(image_size: int = 224):
    """CLIP ViT-L/14 vision tower (Radford et al., 2021: width 1024, 24 layers, 16 heads,
    patch 14; 224 px, or 336 px for ViT-L/14@336 as LLaVA-1.5 uses)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        patch_size=14, image_size=image_size, projection_dim=768, hidden_act="quick_gelu",
    )


def clip_vit_l14_text_config():
    """CLIP ViT-L/14 text encoder (width 768, 12 layers, 12 heads, 77 positions): SD v1.5's."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
        hidden_act="quick_gelu",
    )


def sd15_unet(in_channels: int = 8):
    """Stable Diffusion v1.5's UNet (diffusers' defaults, cross-attention 768, 8 heads);
    InstructPix2Pix widens ``conv_in`` to 8 channels."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64, in_channels=in_channels, out_channels=4, cross_attention_dim=768,
        attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    )


def sd_vae():
    """Stable Diffusion's KL autoencoder (channels 128/256/512/512, 4 latent channels)."""
    from diffusers import AutoencoderKL

    blocks = 4
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        sample_size=512,
    )


def on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """``factory()`` built on the meta device (no storage, no initialisation cost)."""
    with torch.device("meta"):
        return factory()


def count(module: nn.Module | Iterable[nn.Parameter], trainable: bool | None = None) -> int:
    """Parameters of ``module`` (each once), all or only those with ``requires_grad ==
    trainable``."""
    params = module.parameters() if isinstance(module, nn.Module) else module
    unique = {id(p): p for p in params}.values()
    return sum(p.numel() for p in unique if trainable is None or p.requires_grad == trainable)


# ----------------------------------------------------------------------------- the models
@dataclass(frozen=True)
class PartCount:
    """One part of a model: parameters (``trainable`` as the paper config trains; those held
    float32), bytes per frozen parameter as held, the parameters inside FSDP units (all and
    trainable) and the largest unit's."""

    name: str
    params: int
    trainable: int
    frozen_bytes: int
    unit_params: int = 0
    unit_trainable: int = 0
    largest_unit: int = 0

    @property
    def weight_bytes(self) -> int:
        return 4 * self.trainable + self.frozen_bytes * (self.params - self.trainable)

    @property
    def unit_bytes(self) -> int:
        return 4 * self.unit_trainable + self.frozen_bytes * (self.unit_params - self.unit_trainable)

    @classmethod
    def of(cls, name: str, module: nn.Module, frozen_bytes: int) -> PartCount:
        classes = unit_classes(FSDP_UNITS)
        inside: dict[int, nn.Parameter] = {}
        largest = 0
        for sub in module.modules():
            if isinstance(sub, classes) and not any(id(p) in inside for p in sub.parameters()):
                own = {id(p): p for p in sub.parameters()}
                inside.update(own)
                largest = max(largest, sum(p.numel() for p in own.values()))
        return cls(name, count(module), count(module, True), frozen_bytes,
                   sum(p.numel() for p in inside.values()),
                   sum(p.numel() for p in inside.values() if p.requires_grad), largest)


@dataclass(frozen=True)
class Measurement:
    """A paper model's parts and the activation bytes one training sample saves, per measured
    piece: ``{name: (without checkpointing, with)}``."""

    model: str
    resolution: int
    parts: tuple[PartCount, ...]
    activations: dict[str, tuple[int, int]]

    def params(self, trainable: bool = False) -> int:
        return sum(p.trainable if trainable else p.params for p in self.parts)

    def activation_bytes(self, checkpointing: bool) -> int:
        return sum(pair[1 if checkpointing else 0] for pair in self.activations.values())


def _frozen(module: nn.Module) -> nn.Module:
    return module.requires_grad_(False)


def _pair(acts: Activations) -> tuple[int, int]:
    return acts.total, acts.checkpointed


def _extrapolate(one, two, layers: int):
    """A count linear in the number of identical layers, from its values at 1 and 2 layers."""
    if isinstance(one, tuple):
        return tuple(_extrapolate(a, b, layers) for a, b in zip(one, two, strict=True))
    return one + (layers - 1) * (two - one)


def _extrapolate_part(one: PartCount, two: PartCount, layers: int) -> PartCount:
    fields = ("params", "trainable", "unit_params", "unit_trainable")
    values = {f: _extrapolate(getattr(one, f), getattr(two, f), layers) for f in fields}
    return replace(one, **values, largest_unit=max(one.largest_unit, two.largest_unit))


def _llm(model: str, layers: int, vision_layers: int):
    """MGIE's/InsightEdit's LLaVA-7B or LGIE's LLaMA-7B with ``layers`` decoder layers,
    trainable as the model trains: (parts, activations of one sample)."""
    from transformers import LlamaForCausalLM

    from models.components.mm_tokens import NewTokenRows, add_lora

    text = llama_7b_config(VOCAB[model])
    text.num_hidden_layers = layers
    tokens = TEXT_TOKENS[model] + NEW_TOKENS[model]
    if model == "LGIE":
        llm = _frozen(LlamaForCausalLM(text))
        body, head, parts = llm.model, llm.lm_head, []
    else:
        from transformers import LlavaConfig, LlavaForConditionalGeneration

        vision = clip_vit_l14_vision_config(IMAGE_SIZE)
        vision.num_hidden_layers = vision_layers
        llava = _frozen(LlavaForConditionalGeneration(LlavaConfig(
            vision_config=vision.to_dict(), text_config=text.to_dict(),
            projector_hidden_act="linear", multimodal_projector_bias=True,
            vision_feature_layer=-2, image_token_index=32000,
        )))
        body, head = llava.model.language_model, llava.lm_head
        tower = nn.ModuleDict({"tower": llava.model.vision_tower,
                               "projector": llava.model.multi_modal_projector})
        parts = [PartCount.of("vision", tower, 2)]
        tokens += (IMAGE_SIZE // 14) ** 2
    if model == "InsightEdit":  # LoRA + the new rows train (SmartEdit's)
        add_lora(body, r=8, alpha=16, dropout=0.05, target_modules=("q_proj", "v_proj"))
        rows = torch.empty(NEW_TOKENS[model], 4096)
        parts.append(PartCount.of("new_tokens", NewTokenRows(rows, rows, 32001), 4))
    else:  # MGIE trains the whole embed_tokens and lm_head (float32)
        body.embed_tokens.weight.requires_grad_(True)
        head.weight.requires_grad_(True)
    llm_part = PartCount.of("llm", nn.ModuleDict({"body": body, "head": head}), 2)
    acts = _pair(llm_activations(body.to(ACT_DTYPE), head.to(ACT_DTYPE), tokens))
    return [llm_part, *parts], acts


@functools.cache
def _diffusion(decoupled: bool, resolution: int) -> tuple[tuple[PartCount, ...], tuple[int, int]]:
    """The 8-channel UNet (with InsightEdit's decoupled attention) and the VAE, and the UNet's
    activations of one sample (shared by the models that use the same UNet)."""
    from models.components.decoupled_attention import install_decoupled_attention

    unet = sd15_unet(8)
    if decoupled:
        install_decoupled_attention(unet, num_tokens=4)
    parts = (PartCount.of("unet", unet, 4), PartCount.of("vae", _frozen(sd_vae()), 4))
    tokens = 4 if decoupled else 0
    return parts, _pair(unet_activations(unet.to(ACT_DTYPE), resolution, image_tokens=tokens))


def measure(model: str, resolution: int = 256) -> Measurement:
    """``model`` (one of :data:`MODELS`) built on meta, trainable as its paper config trains
    (InsightEdit: stage 3, where every group trains), with the activations of one training
    sample at ``resolution`` (bfloat16, fused attention). The 7B LLM and its vision tower are
    built with 1 and 2 layers and their counts extrapolated to 32 and 24 identical layers
    (exact: every count is linear in the layer count). :data:`MEASURED` holds the results."""
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection

    from models.components.bridging import ImageStream, TextStream
    from models.components.edit_head import EditHead

    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}: one of {MODELS}")
    meta = {"device": "meta", "dtype": ACT_DTYPE}
    parts: list[PartCount] = []
    acts: dict[str, tuple[int, int]] = {}
    with torch.device("meta"), fused_attention():
        if model != "InsPix2Pix":
            (parts1, acts1), (parts2, acts2) = _llm(model, 1, 1), _llm(model, 2, 2)
            for one, two in zip(parts1, parts2, strict=True):
                parts.append(_extrapolate_part(one, two, 24 if one.name == "vision" else 32))
            acts["llm"] = _extrapolate(acts1, acts2, 32)
        if model in ("MGIE", "LGIE"):
            edit_head = EditHead(4096)
            parts.append(PartCount.of("edit_head", edit_head, 4))
            hidden = torch.randn(1, NEW_TOKENS[model], 4096, **meta, requires_grad=True)
            edit_head.to(ACT_DTYPE)
            acts["edit_head"] = _pair(saved_activations(
                lambda: edit_head(hidden, hidden), exclude=[edit_head]))
        if model in ("InsightEdit", "InsPix2Pix"):
            text_encoder = _frozen(CLIPTextModel(clip_vit_l14_text_config()))
            parts.append(PartCount.of("text_encoder", text_encoder, 4))
        if model == "InsightEdit":
            clip_vision = _frozen(CLIPVisionModelWithProjection(clip_vit_l14_vision_config()))
            text_stream = TextStream(4096, hidden_size=768, image_feature_dim=1024,
                                     unet_channels=320, num_tokens=NEW_TOKENS[model])
            image_stream = ImageStream(4096, image_embed_dim=768, cross_attention_dim=768,
                                       num_tokens=4)
            parts += [PartCount.of("clip_vision", clip_vision, 4),
                      PartCount.of("text_stream", text_stream, 4),
                      PartCount.of("image_stream", image_stream, 4)]
            h = torch.randn(1, NEW_TOKENS[model], 4096, **meta, requires_grad=True)
            patches = torch.randn(1, (IMAGE_SIZE // 14) ** 2, 1024, **meta)
            streams = nn.ModuleList([text_stream, image_stream]).to(ACT_DTYPE)
            acts["bridging"] = _pair(saved_activations(
                lambda: (text_stream(h, patches, latent_size=resolution // 8, use_bim=True),
                         image_stream(h)), exclude=[streams]))
        diffusion, acts["unet"] = _diffusion(model == "InsightEdit", resolution)
        parts += diffusion
    return Measurement(model, resolution, tuple(parts), acts)


#: :func:`measure` at 256 px (the paper configs' resolution), recorded so that the CLI and the
#: presets need no 7B model on meta; tests/models/test_memory.py re-measures and compares.
P = PartCount
MEASURED: dict[str, Measurement] = {
    "MGIE": Measurement("MGIE", 256, (
        P("llm", 6738505728, 262234112, 2, 6476267520, 0, 202383360),
        P("vision", 324159488, 0, 2, 302309376, 0, 12596224),
        P("edit_head", 31958784, 31958784, 4, 0, 0, 0),
        P("unet", 859532484, 859532484, 4, 780079040, 780079040, 49164800),
        P("vae", 83653863, 0, 4, 73079168, 0, 4721664),
    ), {"llm": (1712328132, 214427140), "edit_head": (5684744, 5684744), "unet": (237247360, 57255424)}),
    "LGIE": Measurement("LGIE", 256, (
        P("llm", 6738481152, 262209536, 2, 6476267520, 0, 202383360),
        P("edit_head", 31958784, 31958784, 4, 0, 0, 0),
        P("unet", 859532484, 859532484, 4, 780079040, 780079040, 49164800),
        P("vae", 83653863, 0, 4, 73079168, 0, 4721664),
    ), {"llm": (594071396, 74391460), "edit_head": (5684744, 5684744), "unet": (237247360, 57255424)}),
    "InsightEdit": Measurement("InsightEdit", 256, (
        P("llm", 6742880256, 4194304, 2, 6480461824, 4194304, 202514432),
        P("vision", 324159488, 0, 2, 302309376, 0, 12596224),
        P("new_tokens", 262144, 262144, 4, 0, 0, 0),
        P("text_encoder", 123060480, 0, 4, 85054464, 0, 7087872),
        P("clip_vision", 303966208, 0, 4, 302309376, 0, 12596224),
        P("text_stream", 94226240, 94226240, 4, 0, 0, 0),
        P("image_stream", 6100992, 6100992, 4, 0, 0, 0),
        P("unet", 878701764, 878701764, 4, 799248320, 799248320, 49164800),
        P("vae", 83653863, 0, 4, 73079168, 0, 4721664),
    ), {"llm": (2077317124, 219534340), "bridging": (31078792, 31078792), "unet": (249219456, 58491904)}),
    "InsPix2Pix": Measurement("InsPix2Pix", 256, (
        P("text_encoder", 123060480, 0, 4, 85054464, 0, 7087872),
        P("unet", 859532484, 859532484, 4, 780079040, 780079040, 49164800),
        P("vae", 83653863, 0, 4, 73079168, 0, 4721664),
    ), {"unet": (237247360, 57255424)}),
}
del P


def measurement(model: str, resolution: int = 256) -> Measurement:
    """:data:`MEASURED` where it holds ``model`` at ``resolution``, else :func:`measure`."""
    recorded = MEASURED.get(model)
    if recorded is not None and recorded.resolution == resolution:
        return recorded
    return _measure_cached(model, resolution)


@functools.cache
def _measure_cached(model: str, resolution: int) -> Measurement:
    return measure(model, resolution)


# ----------------------------------------------------------------------------- the estimate
#: Optimizer-state bytes per trainable parameter: AdamW's fp32 m + v; AdamW8bit's uint8 m + v
#: and a float32 absmax per 2,048-value block for each (bitsandbytes' blockwise quantisation).
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw8bit": 2.0 + 2 * 4 / 2048}


@dataclass(frozen=True)
class Setup:
    """How a model trains: ``strategy`` (:data:`STRATEGIES`), ``optimizer``
    (:data:`OPTIMIZERS`), gradient ``checkpointing``, ``resolution`` px."""

    model: str
    strategy: str = "ddp"
    optimizer: str = "adamw"
    checkpointing: bool = True
    resolution: int = 256

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}: one of {MODELS}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r}: one of {STRATEGIES}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r}: one of {OPTIMIZERS}")


@dataclass(frozen=True)
class Estimate:
    """Bytes per GPU of a :class:`Setup` on ``num_gpus`` GPUs; :meth:`peak` for a batch."""

    setup: Setup
    num_gpus: int
    weights: int
    grads: int
    optimizer: int
    autocast: int
    activations_per_sample: int

    @property
    def static(self) -> int:
        """Everything but the activations and the overhead."""
        return self.weights + self.grads + self.optimizer + self.autocast

    def overhead(self, batch: int) -> int:
        return FIXED_OVERHEAD + int(
            OVERHEAD_FRACTION * (self.static + batch * self.activations_per_sample)
        )

    def peak(self, batch: int) -> int:
        return self.static + batch * self.activations_per_sample + self.overhead(batch)


def estimate(setup: Setup, num_gpus: int = 1) -> Estimate:
    """The memory of ``setup`` per GPU when ``num_gpus`` GPUs train it (the module docstring
    lists the terms)."""
    m = measurement(setup.model, setup.resolution)
    n = max(int(num_gpus), 1)
    trainable = m.params(trainable=True)
    if setup.strategy == "fsdp":
        # a FlatParameter needs one dtype: the presets load the frozen LLM in float32 under FSDP
        parts = [replace(p, frozen_bytes=4) for p in m.parts]
        inside = sum(p.unit_bytes for p in parts)
        largest = max(p.largest_unit for p in m.parts)
        weights = inside / n + sum(p.weight_bytes for p in parts) - inside + 2 * 2 * largest
        sharded = sum(p.unit_trainable for p in m.parts)
        counted = sharded / n + (trainable - sharded)  # root unit's trainable stay whole
    else:
        weights = sum(p.weight_bytes for p in m.parts)
        counted = trainable / n if setup.strategy == "zero2" else trainable
    grads = 4 * counted + (4 * trainable if setup.strategy == "ddp" else 0)  # DDP buckets
    return Estimate(
        setup, n, int(weights), int(grads), int(OPTIMIZER_BYTES[setup.optimizer] * counted),
        2 * trainable, m.activation_bytes(setup.checkpointing),
    )


def fits(setup: Setup, gpu_gb: float, num_gpus: int, batch: int) -> bool:
    """Whether ``batch`` samples per GPU fit in ``gpu_gb`` GiB by the estimate."""
    return estimate(setup, num_gpus).peak(batch) <= gpu_gb * GIB


def max_batch_per_gpu(setup: Setup, gpu_gb: float, num_gpus: int = 1) -> int:
    """The largest per-GPU batch whose estimated peak fits in ``gpu_gb`` GiB (0: none)."""
    est = estimate(setup, num_gpus)
    room = gpu_gb * GIB - est.peak(0)
    batch = max(int(room // ((1 + OVERHEAD_FRACTION) * max(est.activations_per_sample, 1))), 0)
    while batch > 0 and not fits(setup, gpu_gb, num_gpus, batch):
        batch -= 1
    while fits(setup, gpu_gb, num_gpus, batch + 1):
        batch += 1
    return batch


#: The paper configs' global batches (experiments/*.yaml ``global_batch_size``).
GLOBAL_BATCH = {"MGIE": 128, "LGIE": 128, "InsightEdit": 128, "InsPix2Pix": 1024}
#: Whether the model has a ``gradient_checkpointing`` argument (InsPix2Pix has none: it trains
#: without, unless an FSDP strategy recomputes its layers).
HAS_CHECKPOINTING = {"MGIE": True, "LGIE": True, "InsightEdit": True, "InsPix2Pix": False}
#: The order in which the presets try setups: the first with a batch of at least 1 is taken.
LADDER = (("ddp", "adamw"), ("ddp", "adamw8bit"), ("fsdp", "adamw"), ("fsdp", "adamw8bit"))


def divisor_batch(batch: int, global_batch: int, num_gpus: int) -> int:
    """The largest batch <= ``batch`` that divides ``global_batch / num_gpus`` (so gradient
    accumulation keeps the global batch); 0 if ``batch`` is 0."""
    per_gpu = global_batch // num_gpus
    return max((b for b in range(1, min(batch, per_gpu) + 1) if per_gpu % b == 0), default=0)


def choose_setup(model: str, gpu_gb: float, num_gpus: int = 8) -> tuple[Setup, int]:
    """The preset's setup for ``model`` on ``num_gpus`` GPUs of ``gpu_gb`` GiB: the first of
    :data:`LADDER` (DDP with AdamW, then 8-bit AdamW, then FSDP) where one sample fits, and its
    batch (:func:`max_batch_per_gpu`, rounded down by :func:`divisor_batch`)."""
    for strategy, optimizer in LADDER:
        checkpointing = HAS_CHECKPOINTING[model] or strategy == "fsdp"
        setup = Setup(model, strategy, optimizer, checkpointing)
        batch = divisor_batch(max_batch_per_gpu(setup, gpu_gb, num_gpus), GLOBAL_BATCH[model],
                              num_gpus)
        if batch:
            return setup, batch
    raise ValueError(f"{model} does not fit on {num_gpus} GPUs of {gpu_gb} GiB by the estimate")
