"""LLaVA v1 (original layout, the MGIE release's LLaVA-7B-v1) -> llava-hf conversion.

The reference is computed from the SOURCE weights the way the original code (LLaVA 7ace501 /
ml-mgie ``mgie_llava.py``) does: ``CLIPVisionModel(...).hidden_states[-2][:, 1:]``, the one
``mm_projector`` Linear, spliced into ``LlamaForCausalLM``'s ``inputs_embeds`` at the
``<im_patch>`` positions between ``<im_start>`` and ``<im_end>``.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from fixtures.llava_v1 import IM_END, IM_PATCH, IM_START, TINY_HEAD, write_llava_v1, write_release

from models.components.llava_v1 import LlavaConversionError, convert_llava_v1
from models.components.mllm import MLLM, VICUNA_V1_1_SYSTEM

INSTRUCTION = "make the red circle blue"


@pytest.fixture(scope="module")
def folders(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("llava_v1")
    src = write_llava_v1(tiny_dir, root / "src")
    convert_llava_v1(src, root / "hf")
    return src, root / "hf"


def _images(n: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.rand(n, 3, 32, 32, generator=g) * 2 - 1


def _reference(src, tiny_dir, input_ids: torch.Tensor, pixel_values: torch.Tensor):
    """Last hidden states and logits as the original LlavaLlamaModel computes them."""
    from transformers import AutoTokenizer, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    source = json.loads((src / "config.json").read_text())
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    config = LlamaConfig(
        **{k: source[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                  "num_hidden_layers", "num_attention_heads", "rms_norm_eps")},
        tie_word_embeddings=False,
    )  # fmt: skip
    llama = LlamaForCausalLM(config).eval()
    lm_state = {k: v for k, v in state.items() if "mm_projector" not in k and "inv_freq" not in k}
    llama.load_state_dict(lm_state, strict=True)
    vision = CLIPVisionModel.from_pretrained(source["mm_vision_tower"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(src)
    patch, start, end = tokenizer.convert_tokens_to_ids([IM_PATCH, IM_START, IM_END])
    with torch.no_grad():
        layer = source["mm_vision_select_layer"]
        features = vision(pixel_values, output_hidden_states=True).hidden_states[layer][:, 1:]
        features = F.linear(
            features, state["model.mm_projector.weight"], state["model.mm_projector.bias"]
        )
        embeds = llama.model.embed_tokens(input_ids).clone()
        for row in range(len(input_ids)):
            first = int((input_ids[row] == start).nonzero()[0])
            n = features.shape[1]
            assert int(input_ids[row, first + n + 1]) == end  # the original code's check
            assert bool((input_ids[row, first + 1 : first + n + 1] == patch).all())
            embeds[row, first + 1 : first + n + 1] = features[row]
        hidden = llama.model(inputs_embeds=embeds).last_hidden_state
        logits = llama.lm_head(hidden)
    return hidden, logits


def test_prompt_ids_are_the_release_format(folders, tiny_dir):
    from transformers import AutoTokenizer

    src, hf = folders
    mllm = MLLM(str(hf), max_new_tokens=4)
    enc = mllm.encode_prompts([INSTRUCTION], _images())
    ids = enc["input_ids"][0].tolist()

    tokenizer = AutoTokenizer.from_pretrained(src)  # the source tokenizer, on its own
    base = len(AutoTokenizer.from_pretrained(tiny_dir / "llama"))
    patch, start, end = base, base + 1, base + 2  # LLaVA's 32000, 32001, 32002
    assert tokenizer.convert_tokens_to_ids([IM_PATCH, IM_START, IM_END]) == [patch, start, end]
    before = f"{VICUNA_V1_1_SYSTEM} USER: what will this image be like if '{INSTRUCTION}'\n"
    head = tokenizer(before)["input_ids"]
    tail = tokenizer(" ASSISTANT:", add_special_tokens=False)["input_ids"]
    n = (32 // 8) ** 2  # 224 / 14 -> 256 in the release; the tiny CLIP: 32 px, patch 8
    assert ids == head + [start] + [patch] * n + [end] + tail
    assert head[0] == tokenizer.bos_token_id and tokenizer.decode(head[-1:]).endswith("\n")
    # [IMG0] follows the 3 LLaVA tokens, as 32003 in the release demo
    assert mllm.img_token_ids == list(range(base + 3, base + 3 + 8))


def test_converted_model_equals_original_computation(folders, tiny_dir):
    from transformers import LlavaForConditionalGeneration

    src, hf = folders
    mllm = MLLM(str(hf), max_new_tokens=4)
    enc = mllm.encode_prompts([INSTRUCTION, "remove the square"], _images(2))
    ids, mask, pixels = enc["input_ids"], enc["attention_mask"], enc["pixel_values"]
    model = LlavaForConditionalGeneration.from_pretrained(hf).eval()
    references = []
    for row in range(2):  # left padding: each row against the reference on its own tokens
        keep = mask[row].bool()
        row_ids = ids[row][keep].unsqueeze(0)
        ref_hidden, ref_logits = _reference(src, tiny_dir, row_ids, pixels[row : row + 1])
        references.append(ref_hidden)
        with torch.no_grad():
            out = model(input_ids=row_ids, pixel_values=pixels[row : row + 1],
                        output_hidden_states=True)  # fmt: skip
        torch.testing.assert_close(out.hidden_states[-1], ref_hidden, rtol=0, atol=1e-5)
        torch.testing.assert_close(out.logits, ref_logits, rtol=0, atol=1e-5)
        # the suite's MLLM (padded batch) gives the same states on the row's tokens
        with torch.no_grad():
            ours = mllm.hidden_states(ids, mask, pixels)[row][keep]
        torch.testing.assert_close(ours, ref_hidden[0], rtol=0, atol=1e-5)
    # not vacuous: another image changes the states (the features are spliced in)
    other, _ = _reference(src, tiny_dir, ids[0][mask[0].bool()].unsqueeze(0), -pixels[:1])
    assert (other - references[0]).abs().max() > 1e-3


def test_projector_is_exactly_mm_projector(folders):
    from safetensors.torch import load_file

    src, hf = folders
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    saved = load_file(hf / "model.safetensors")
    prefix = "model.multi_modal_projector."
    assert torch.equal(saved[prefix + "linear_1.weight"], state["model.mm_projector.weight"])
    assert torch.equal(saved[prefix + "linear_1.bias"], state["model.mm_projector.bias"])
    hidden = state["model.embed_tokens.weight"].shape[1]
    assert torch.equal(saved[prefix + "linear_2.weight"], torch.eye(hidden))
    assert torch.equal(saved[prefix + "linear_2.bias"], torch.zeros(hidden))
    config = json.loads((hf / "config.json").read_text())
    assert config["projector_hidden_act"] == "linear" and config["mm_use_im_start_end"] is True
    assert config["vision_feature_layer"] == -2
    assert config["vision_feature_select_strategy"] == "default"


def test_processor_reloads_with_the_patch_token(folders):
    from transformers import AutoProcessor

    src, hf = folders
    processor = AutoProcessor.from_pretrained(hf)
    assert processor.image_token == IM_PATCH
    assert processor.image_token_id == processor.tokenizer.convert_tokens_to_ids(IM_PATCH)
    from transformers import AutoTokenizer

    assert processor.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(src).get_vocab()


def test_release_applies_to_the_converted_mllm(folders, tmp_path):
    """A release made for LLaVA-7B-v1 (vocabulary + 3 LLaVA tokens + 8 [IMG] rows) passes
    apply_release's checks on the converted folder."""
    from models.components.edit_head import EditHead
    from models.components.mgie_release import apply_release, load_release

    src, hf = folders
    mllm = MLLM(str(hf), max_new_tokens=4)
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    head = EditHead(mllm.hidden_size, output_dim=64, num_queries=77, **TINY_HEAD)
    mllm_pt, _ = write_release(
        tmp_path, vocab=vocab, hidden=mllm.hidden_size, unet_state={}, output_dim=64
    )
    weights = load_release(str(mllm_pt), None)
    apply_release(mllm, head, None, weights)
    assert torch.equal(mllm.embed_tokens.weight, weights.embed_tokens.float())
    assert mllm.img_token_ids[0] == vocab


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_errors_name_the_key_the_file_and_the_fix(folders, tmp_path):
    src, _ = folders

    missing = _copy(src, tmp_path / "missing")
    state = torch.load(missing / "pytorch_model.bin", weights_only=True)
    del state["model.norm.weight"]
    torch.save(state, missing / "pytorch_model.bin")
    with pytest.raises(LlavaConversionError, match=r"missing keys.*pytorch_model\.bin.*norm"):
        convert_llava_v1(missing, tmp_path / "o1")

    unused = _copy(src, tmp_path / "unused")
    state = torch.load(unused / "pytorch_model.bin", weights_only=True)
    state["model.extra_adapter.weight"] = torch.zeros(2)
    torch.save(state, unused / "pytorch_model.bin")
    with pytest.raises(
        LlavaConversionError, match=r"model\.extra_adapter\.weight \(pytorch_model\.bin\)"
    ):
        convert_llava_v1(unused, tmp_path / "o2")

    remote = _copy(src, tmp_path / "remote")
    config = json.loads((remote / "config.json").read_text())
    config["mm_vision_tower"] = "openai/clip-vit-large-patch14"
    (remote / "config.json").write_text(json.dumps(config))
    with pytest.raises(LlavaConversionError, match=r"clip-vit-large-patch14.*--vision"):
        convert_llava_v1(remote, tmp_path / "o3")

    _, hf = folders
    with pytest.raises(LlavaConversionError, match="already the llava-hf layout"):
        convert_llava_v1(hf, tmp_path / "o4")
    with pytest.raises(LlavaConversionError, match="not empty"):
        convert_llava_v1(src, hf)  # never writes over a folder

    short = _copy(src, tmp_path / "short")
    config = json.loads((short / "config.json").read_text())
    config["vocab_size"] -= 1
    (short / "config.json").write_text(json.dumps(config))
    with pytest.raises(LlavaConversionError, match="vocab_size"):
        convert_llava_v1(short, tmp_path / "o5")


def test_sharded_and_safetensors_sources_convert_the_same(folders, tmp_path):
    """``pytorch_model-*.bin`` + index (as LLaVA-7B-v1 ships) and safetensors shards give the
    same tensors as the single file."""
    from safetensors.torch import load_file, save_file

    src, hf = folders
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    keys = sorted(state)
    halves = {"1": keys[: len(keys) // 2], "2": keys[len(keys) // 2 :]}
    expected = load_file(hf / "model.safetensors")
    for kind in ("bin", "safetensors"):
        folder = _copy(src, tmp_path / kind)
        (folder / "pytorch_model.bin").unlink()
        weight_map = {}
        for part, names in halves.items():
            shard = {k: state[k].contiguous() for k in names}
            if kind == "bin":
                name = f"pytorch_model-0000{part}-of-00002.bin"
                torch.save(shard, folder / name)
            else:
                name = f"model-0000{part}-of-00002.safetensors"
                save_file(shard, folder / name)
            weight_map |= dict.fromkeys(names, name)
        index = "pytorch_model.bin.index.json" if kind == "bin" else "model.safetensors.index.json"
        (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        summary = convert_llava_v1(folder, tmp_path / f"out-{kind}")
        assert len(summary["source_files"]) == 2
        got = load_file(tmp_path / f"out-{kind}" / "model.safetensors")
        assert set(got) == set(expected)
        assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_unconverted_folder_is_refused_with_the_conversion_command(folders):
    """transformers would build the original layout's config as a random default LLaVA; the
    MLLM names the folder and the command that converts it instead."""
    src, _ = folders
    with pytest.raises(FileNotFoundError, match="convert-llava"):
        MLLM(str(src), max_new_tokens=4)


def test_a_generated_image_token_ends_the_text(folders):
    """Greedy decoding that emits the image token (<im_patch> here) must not feed it back as an
    image placeholder: the text is cut there and the [IMG] tokens appended."""
    _, hf = folders
    mllm = MLLM(str(hf), max_new_tokens=4)
    patch = mllm.processor.image_token_id
    text, complete = mllm._split_generated([5, 6, patch, 7, *mllm.img_token_ids])
    assert text == [5, 6] and not complete
