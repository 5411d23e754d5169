"""The strategy diffs of the 7B configs (issue 16 item 4), on CPU: Lightning refuses FSDP and
DeepSpeed without GPUs, so these build each strategy object from the config as LightningCLI
would and check its policies against the tiny models' real layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from diffusers.models.attention import BasicTransformerBlock
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import DDPStrategy, Strategy
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from editbench.strategies import LayerFSDP, layer_classes

STRATEGIES = Path(__file__).resolve().parents[1] / "experiments" / "strategies"


def strategy_from(name: str) -> Strategy:
    """The config's ``trainer.strategy`` instantiated by jsonargparse, as LightningCLI does."""
    config = yaml.safe_load((STRATEGIES / name).read_text())
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    parsed = parser.parse_object({"strategy": config["trainer"]["strategy"]})
    assert config["trainer"]["precision"] == "bf16-mixed"
    return parser.instantiate_classes(parsed).strategy


def test_fsdp_config_wraps_and_checkpoints_the_decoder_and_unet_blocks(tiny_dir):
    from diffusers import UNet2DConditionModel
    from transformers import LlavaForConditionalGeneration

    strategy = strategy_from("fsdp.yaml")
    assert isinstance(strategy, LayerFSDP)
    wrap = strategy.kwargs["auto_wrap_policy"]
    assert wrap._module_classes == {LlamaDecoderLayer, BasicTransformerBlock}
    checkpointing = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]
    assert checkpointing._module_classes == {LlamaDecoderLayer, BasicTransformerBlock}
    assert strategy._state_dict_type == "full"
    assert strategy.kwargs["use_orig_params"] is True
    # The policy picks out exactly the decoder layers and transformer blocks of the real models
    llava = LlavaForConditionalGeneration.from_pretrained(tiny_dir / "llava")
    unet = UNet2DConditionModel.from_pretrained(tiny_dir / "instruct-pix2pix", subfolder="unet")
    for model, cls in ((llava, LlamaDecoderLayer), (unet, BasicTransformerBlock)):
        picked = [m for m in model.modules() if wrap._module_classes & {type(m)}]
        assert picked and all(isinstance(m, cls) for m in picked)
        assert len(picked) == sum(isinstance(m, cls) for m in model.modules())
    assert len([m for m in llava.modules() if isinstance(m, LlamaDecoderLayer)]) == (
        llava.config.text_config.num_hidden_layers
    )


def test_layer_names_are_checked():
    assert layer_classes(["torch.nn.Linear"]) == {torch.nn.Linear}
    with pytest.raises(ValueError, match="unknown layer 'Decoder'"):
        layer_classes(["Decoder"])
    with pytest.raises(ValueError, match="not an nn.Module"):
        layer_classes(["torch.optim.AdamW"])


def test_ddp_config():
    from lightning.pytorch.strategies import StrategyRegistry

    config = yaml.safe_load((STRATEGIES / "ddp.yaml").read_text())["trainer"]
    assert config["precision"] == "bf16-mixed"
    strategy = StrategyRegistry.get(config["strategy"])
    assert isinstance(strategy, DDPStrategy)
    assert strategy._ddp_kwargs == {"find_unused_parameters": True}


def test_deepspeed_zero2_config():
    pytest.importorskip("deepspeed", reason="deepspeed is optional (README, Strategies)")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = strategy_from("deepspeed_zero2.yaml")
    assert isinstance(strategy, DeepSpeedStrategy)
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == 2 and zero["overlap_comm"] and zero["contiguous_gradients"]


def fsdp_unit_dtypes(model: torch.nn.Module, classes: set[type]) -> dict[str, set[torch.dtype]]:
    """The parameter dtypes of each FSDP unit the auto-wrap policy makes: every outermost module
    of ``classes`` is a unit, the remaining parameters form the root unit."""
    units: dict[str, set[torch.dtype]] = {}
    claimed: set[int] = set()
    for name, module in model.named_modules():
        if type(module) in classes and not any(name.startswith(u + ".") for u in units):
            units[name] = {p.dtype for p in module.parameters()}
            claimed |= {id(p) for p in module.parameters()}
    units["<root>"] = {p.dtype for p in model.parameters() if id(p) not in claimed}
    return units


@pytest.mark.parametrize("mllm_dtype", ["bfloat16", "float32"])
def test_fsdp_config_gives_units_of_one_dtype(tiny_dir, mllm_dtype):
    """FSDP flattens each unit's parameters into one tensor and refuses mixed dtypes ("Must
    flatten tensors with uniform dtype"). MGIE keeps its trainable token rows and head in float32
    beside the frozen LLaVA, so with the paper config's bfloat16 LLaVA a unit mixes dtypes; the
    FSDP diff therefore loads the MLLM in float32 (bf16-mixed still computes in bfloat16)."""
    from models.mgie import MGIE

    config = yaml.safe_load((STRATEGIES / "fsdp.yaml").read_text())
    assert config["model"]["init_args"]["mllm_dtype"] == "float32"
    model = MGIE(
        mllm_path=str(tiny_dir / "llava"),
        diffusion_path=str(tiny_dir / "instruct-pix2pix"),
        mllm_dtype=mllm_dtype,
        edit_head_dim=32, edit_head_heads=4, edit_head_layers=1, edit_head_ff=64,
    )  # fmt: skip
    model.configure_model()
    classes = strategy_from("fsdp.yaml").kwargs["auto_wrap_policy"]._module_classes
    units = fsdp_unit_dtypes(model, classes)
    mixed = {name: dtypes for name, dtypes in units.items() if len(dtypes) > 1}
    if mllm_dtype == "float32":
        assert not mixed
    else:
        assert mixed  # what FSDP would refuse
