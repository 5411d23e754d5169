"""The tiny BLIP-2 of `data make-tiny` (editbench/tiny.py): it loads offline with its processor,
generates (image_token_index set, the prompt holding num_query_tokens image tokens), and an
older complete tiny folder gets just blip2/ added, identical to a full build's."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import Blip2ForConditionalGeneration, Blip2Processor

from datamodules.synthetic import sample_images
from editbench import tiny
from editbench.tiny import make_tiny


def test_tiny_blip2_generates_offline(tiny_dir):
    folder = tiny_dir / "blip2"
    model = Blip2ForConditionalGeneration.from_pretrained(folder, local_files_only=True).eval()
    processor = Blip2Processor.from_pretrained(folder, local_files_only=True)
    config = model.config
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert config.image_token_index == image_id != processor.tokenizer.unk_token_id
    assert processor.num_query_tokens == config.num_query_tokens == tiny.BLIP2_QUERY_TOKENS
    assert config.text_config.vocab_size == len(processor.tokenizer)
    images = (sample_images(2, 32, seed=5) + 1) / 2
    enc = processor(images=list(images), text=["", ""], return_tensors="pt", do_rescale=False)
    assert (enc["input_ids"] == image_id).sum(1).tolist() == [config.num_query_tokens] * 2
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    assert out.shape == (2, enc["input_ids"].shape[1] + 6)
    captions = processor.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    # the caption loss BLIP-2 trains with (L_BLIP2 in MMIG) is defined
    enc = processor(
        images=list(images), text=["a picture of a red circle", "a picture"],
        return_tensors="pt", do_rescale=False, padding=True,
    )  # fmt: skip
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    labels = labels.masked_fill(enc["input_ids"] == image_id, -100)
    assert torch.isfinite(model(**enc, labels=labels).loss)


def test_older_folder_gets_only_blip2_added(tiny_dir, tmp_path, monkeypatch):
    steps = json.loads((tiny_dir / tiny.MANIFEST).read_text())["vae_steps"]
    copy = tmp_path / "old"
    shutil.copytree(tiny_dir, copy)
    shutil.rmtree(copy / "blip2")
    manifest = json.loads((copy / tiny.MANIFEST).read_text())
    del manifest["folders"]["blip2"], manifest["tokenizers"]["blip2"]
    (copy / tiny.MANIFEST).write_text(json.dumps(manifest))

    def no_rebuild(*args, **kwargs):
        raise AssertionError("a complete older folder must not be rebuilt")

    monkeypatch.setattr(tiny, "_build", no_rebuild)
    made = make_tiny(copy, seed=0, resolution=32, vae_steps=steps, log=lambda *a: None)
    reference = json.loads((tiny_dir / tiny.MANIFEST).read_text())
    assert set(made["folders"]) == set(reference["folders"])
    assert made["folders"]["blip2"]["parameters"] == reference["folders"]["blip2"]["parameters"]
    assert made["tokenizers"]["blip2"] == reference["tokenizers"]["blip2"]
    assert json.loads((copy / tiny.MANIFEST).read_text()) == made
    new = load_file(copy / "blip2" / "model.safetensors")
    old = load_file(tiny_dir / "blip2" / "model.safetensors")
    assert new.keys() == old.keys()
    assert all(torch.equal(new[k], old[k]) for k in new)  # the same seeded weights
    # and now it is complete: the next call returns at once
    assert make_tiny(copy, seed=0, resolution=32, vae_steps=steps, log=lambda *a: None) == made


@pytest.mark.parametrize("name", ["llava", "manifest.json"])
def test_missing_base_part_still_rebuilds(tiny_dir, tmp_path, monkeypatch, name):
    steps = json.loads((tiny_dir / tiny.MANIFEST).read_text())["vae_steps"]
    copy = tmp_path / "broken"
    shutil.copytree(tiny_dir, copy)
    target = copy / name
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    calls = []
    monkeypatch.setattr(tiny, "_build", lambda out, corpus, wanted, log: calls.append(out) or {})
    make_tiny(copy, seed=0, resolution=32, vae_steps=steps, log=lambda *a: None)
    assert calls == [copy]
