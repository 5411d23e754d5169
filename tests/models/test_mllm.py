"""MLLM wrapper (MGIE Sec. 3.2-3.3) on the tiny LLaVA and LLaMA checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.components.edit_head import EditHead
from models.components.mllm import (
    IGNORE_INDEX,
    MLLM,
    PROMPT_TEMPLATE,
    TEXT_CHAT_TEMPLATE,
    VISUAL_CHAT_TEMPLATE,
    img_tokens,
)

N = 8
INSTRUCTIONS = ["make it blue", "add a small red circle on the left of the square"]
TARGETS = ["the square turns blue", "a red circle appears left"]


def _images(n: int = 2, size: tuple[int, int] = (32, 32), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, *size, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def llava(tiny_dir):
    """Shared, read-only: tests that train or mutate build their own."""
    torch.manual_seed(0)
    return MLLM(str(tiny_dir / "llava"), num_img_tokens=N, max_new_tokens=6).eval()


def _prompt(instruction: str, visual: bool = True) -> str:
    chat = VISUAL_CHAT_TEMPLATE if visual else TEXT_CHAT_TEMPLATE
    return chat.replace("{prompt}", PROMPT_TEMPLATE.replace("{instruction}", instruction))


def _reference_inputs(mllm, instruction, image):
    """Prompt ids and pixel values straight from the HF processor (one row, no padding)."""
    enc = mllm.processor(
        text=[_prompt(instruction)],
        images=(image[None] + 1) / 2,
        do_rescale=False,
        return_tensors="pt",
    )
    return enc["input_ids"][0].tolist(), enc["pixel_values"]


# ----------------------------------------------------------------- tokens and embeddings


def test_img_tokens_are_added_after_the_vocabulary(tiny_dir, llava):
    from transformers import LlavaForConditionalGeneration

    assert img_tokens(3) == ["[IMG0]", "[IMG1]", "[IMG2]"]
    base = LlavaForConditionalGeneration.from_pretrained(tiny_dir / "llava")
    vocab = base.get_input_embeddings().weight.shape[0]
    assert llava.img_token_ids == list(range(vocab, vocab + N))
    for name, token_id in zip(img_tokens(N), llava.img_token_ids, strict=True):
        assert llava.tokenizer.encode(name, add_special_tokens=False) == [token_id]
    # embedded in text they stay single tokens
    ids = llava.tokenizer.encode("blue[IMG0][IMG1]", add_special_tokens=False)
    assert ids[-2:] == llava.img_token_ids[:2]

    embed, head = llava.embed_tokens.weight, llava.lm_head.weight
    assert embed.shape == head.shape == (vocab + N, llava.hidden_size)
    assert embed.data_ptr() != head.data_ptr()  # untied
    torch.testing.assert_close(embed[:vocab], base.get_input_embeddings().weight, rtol=0, atol=0)
    torch.testing.assert_close(head[:vocab], base.get_output_embeddings().weight, rtol=0, atol=0)
    # new rows: N(0, initializer_range^2) as the released code got from resize_token_embeddings
    std = base.config.text_config.initializer_range
    for new in (embed[vocab:], head[vocab:]):
        assert 0.5 * std < new.std().item() < 1.5 * std
    assert not torch.allclose(embed[vocab:], head[vocab:])
    assert llava.model.config.text_config.vocab_size == vocab + N


def test_mean_init(tiny_dir):
    mllm = MLLM(str(tiny_dir / "llava"), num_img_tokens=2, new_token_init="mean")
    embed = mllm.embed_tokens.weight.detach()
    vocab = mllm.img_token_ids[0]
    torch.testing.assert_close(embed[vocab:], embed[:vocab].mean(0).expand(2, -1))


def test_trainable_parameters_and_frozen_gradients(tiny_dir):
    mllm = MLLM(str(tiny_dir / "llava"), num_img_tokens=N)
    trainable = mllm.trainable_parameters()
    assert len(trainable) == 2
    assert trainable[0] is mllm.embed_tokens.weight and trainable[1] is mllm.lm_head.weight
    assert {id(p) for p in mllm.parameters() if p.requires_grad} == {id(p) for p in trainable}

    torch.manual_seed(0)
    head = EditHead(
        mllm.hidden_size,
        d_model=16,
        nhead=2,
        num_encoder_layers=1,
        num_decoder_layers=1,
        dim_feedforward=32,
        output_dim=8,
    )
    out = mllm.training_forward(_images(), INSTRUCTIONS, TARGETS)
    (out.loss + head(out.img_hidden, out.img_embeds).pow(2).mean()).backward()
    for name, p in mllm.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    # the [IMG] input rows get gradient from the edit head (through img_embeds and img_hidden)
    assert mllm.embed_tokens.weight.grad[mllm.img_token_ids].abs().sum() > 0


def test_frozen_prefixes_cover_exactly_the_frozen_state(llava):
    prefixes = llava.frozen_prefixes()
    assert "model.model.vision_tower." in prefixes
    assert "model.model.multi_modal_projector." in prefixes
    assert "model.model.language_model.layers." in prefixes
    assert "model.model.language_model.norm." in prefixes
    trainable = {name for name, p in llava.named_parameters() if p.requires_grad}
    assert trainable == {
        "model.model.language_model.embed_tokens.weight",
        "model.lm_head.weight",
    }
    for key in llava.state_dict():
        frozen = any(key.startswith(p) for p in prefixes)
        assert frozen != (key in trainable), key
    # by structure: freezing the MLLM side (the FZ ablation) does not change them
    try:
        llava.requires_grad_(False)
        assert llava.frozen_prefixes() == prefixes
    finally:
        for weight in llava.trainable_parameters():
            weight.requires_grad_(True)


# ----------------------------------------------------------------- positions


def test_find_img_positions_left_and_right_padding(llava):
    pad, bos, eos = llava.tokenizer.pad_token_id, 1, llava.tokenizer.eos_token_id
    img = llava.img_token_ids
    left = [pad, pad, bos, 40, 41, *img, eos]  # [IMG0] at 5
    right = [bos, 40, 41, 42, *img, eos, pad]  # [IMG0] at 4
    shuffled = [bos, *img[::-1], pad, pad, pad, pad, pad]  # [IMG7] at 1 ... [IMG0] at 8
    ids = torch.tensor([left, right, shuffled])
    positions = llava.find_img_positions(ids)
    assert positions.tolist() == [
        list(range(5, 5 + N)),
        list(range(4, 4 + N)),
        list(range(8, 0, -1)),
    ]


def test_find_img_positions_names_row_and_missing_tokens(llava):
    img = llava.img_token_ids
    ok = [1, *img, 2]
    broken = [1, *img[:3], 40, *img[4:], 2]  # no [IMG3]
    with pytest.raises(ValueError, match=r"row 1 .*\['\[IMG3\]'\]"):
        llava.find_img_positions(torch.tensor([ok, broken]))


# ----------------------------------------------------------------- image preprocessing


def test_preprocess_images_matches_torchvision_reference(llava):
    from torchvision.transforms.v2 import functional as TF

    images = _images(2, size=(40, 48))
    got = llava.preprocess_images(images)
    config = llava.processor.image_processor
    side, crop = config.size["shortest_edge"], config.crop_size
    unit = (images + 1) / 2
    ref = TF.resize(unit, side, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    ref = TF.center_crop(ref, [crop["height"], crop["width"]])
    ref = TF.normalize(ref, config.image_mean, config.image_std)
    assert got.shape == (2, 3, crop["height"], crop["width"])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="B, 3, H, W"):
        llava.preprocess_images(images[0])


def test_encode_prompts_left_pads_and_expands_image(llava):
    enc = llava.encode_prompts(INSTRUCTIONS, _images())
    ids, mask = enc["input_ids"], enc["attention_mask"]
    image_id = llava.processor.image_token_id
    assert ((ids == image_id).sum(1) == llava.model.config.image_seq_length).all()
    assert mask[:, -1].all() and not mask[0, 0]  # left padding; row 0 is the shorter prompt
    for row, instruction in enumerate(INSTRUCTIONS):
        expected, _ = _reference_inputs(llava, instruction, _images()[row])
        assert ids[row][mask[row].bool()].tolist() == expected
    with pytest.raises(ValueError, match="needs images"):
        llava.encode_prompts(INSTRUCTIONS)


# ----------------------------------------------------------------- teacher forcing


def _manual_loss(mllm, images, instructions, targets):
    """L_ins recomputed from the HF model's logits with a mask from the known lengths."""
    rows, spans, pixels = [], [], []
    for instruction, target, image in zip(instructions, targets, images, strict=True):
        prompt, pixel_values = _reference_inputs(mllm, instruction, image)
        text = mllm.tokenizer(" " + target, add_special_tokens=False)["input_ids"]
        answer = text + mllm.img_token_ids + [mllm.tokenizer.eos_token_id]
        rows.append(prompt + answer)
        spans.append((len(prompt), len(answer), len(text)))
        pixels.append(pixel_values)
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), mllm.tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    with torch.no_grad():
        out = mllm.model(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=torch.cat(pixels),
            output_hidden_states=True,
        )
    logit_rows, label_rows, hidden_rows = [], [], []
    for i, (n_prompt, n_answer, n_text) in enumerate(spans):
        # positions n_prompt-1 .. n_prompt+n_answer-2 predict the answer tokens
        logit_rows.append(out.logits[i, n_prompt - 1 : n_prompt + n_answer - 1])
        label_rows.append(ids[i, n_prompt : n_prompt + n_answer])
        first_img = n_prompt + n_text
        hidden_rows.append(out.hidden_states[-1][i, first_img - 1 : first_img - 1 + N])
    logits, labels = torch.cat(logit_rows), torch.cat(label_rows)
    loss = F.cross_entropy(logits, labels)
    accuracy = (logits.argmax(-1) == labels).float().mean()
    return loss, accuracy, torch.stack(hidden_rows)


def test_loss_is_cross_entropy_over_target_tokens_only(llava):
    images = _images()
    with torch.no_grad():
        out = llava.training_forward(images, INSTRUCTIONS, TARGETS)
    loss, accuracy, hidden = _manual_loss(llava, images, INSTRUCTIONS, TARGETS)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.token_accuracy, accuracy)
    # hidden states at the positions that predict [IMG0..N-1] (as the released code takes them)
    torch.testing.assert_close(out.img_hidden, hidden, rtol=1e-5, atol=1e-5)
    rows = llava.embed_tokens.weight[llava.img_token_ids]
    torch.testing.assert_close(out.img_embeds, rows.expand(2, -1, -1))
    assert out.img_hidden.shape == out.img_embeds.shape == (2, N, llava.hidden_size)
    # the prompt does count for nothing: another image changes logits but not which tokens count
    assert IGNORE_INDEX == -100


def test_hidden_position_token_takes_the_img_positions(tiny_dir, llava):
    mllm = MLLM(str(tiny_dir / "llava"), num_img_tokens=N, hidden_position="token")
    mllm.load_state_dict(llava.state_dict())
    images = _images()
    with torch.no_grad():
        preceding = llava.training_forward(images, INSTRUCTIONS, TARGETS).img_hidden
        own = mllm.training_forward(images, INSTRUCTIONS, TARGETS).img_hidden
    # the token's own state for [IMG_k] is the preceding-state for [IMG_{k+1}]
    torch.testing.assert_close(own[:, :-1], preceding[:, 1:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(own, preceding)


# ----------------------------------------------------------------- generation


def _direct_generate(mllm, instruction, image, max_new_tokens):
    prompt, pixel_values = _reference_inputs(mllm, instruction, image)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        seq = mllm.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixel_values,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=mllm.tokenizer.pad_token_id,
        )
    return prompt, pixel_values, seq[0, len(prompt) :].tolist()


def test_generate_appends_missing_img_tokens_and_matches_direct_calls(llava):
    images = _images()
    gen = llava.generate(images, INSTRUCTIONS)
    assert gen.appended == [True, True]  # a random tiny model does not produce [IMG] tokens
    assert gen.img_hidden.shape == gen.img_embeds.shape == (2, N, llava.hidden_size)
    stops = set(llava.img_token_ids) | {llava.tokenizer.eos_token_id}
    for row, (instruction, image) in enumerate(zip(INSTRUCTIONS, images, strict=True)):
        prompt, pixel_values, new = _direct_generate(llava, instruction, image, 6)
        text_ids = []
        for t in new:
            if t in stops:
                break
            text_ids.append(t)
        assert gen.token_ids[row] == text_ids + llava.img_token_ids
        assert gen.texts[row] == llava.tokenizer.decode(text_ids, skip_special_tokens=True).strip()
        assert "[IMG" not in gen.texts[row]
        # img_hidden = last-layer states of a plain forward over the same tokens
        ids = torch.tensor([prompt + gen.token_ids[row]])
        with torch.no_grad():
            out = llava.model(input_ids=ids, pixel_values=pixel_values, output_hidden_states=True)
        first = len(prompt) + len(text_ids)
        expected = out.hidden_states[-1][0, first - 1 : first - 1 + N]
        torch.testing.assert_close(gen.img_hidden[row], expected, rtol=1e-5, atol=1e-5)


def test_generate_batch_equals_single_rows(llava):
    images = _images()
    batch = llava.generate(images, INSTRUCTIONS)
    for row in range(2):
        single = llava.generate(images[row : row + 1], INSTRUCTIONS[row : row + 1])
        assert single.texts == batch.texts[row : row + 1]
        assert single.token_ids == batch.token_ids[row : row + 1]
        assert single.appended == batch.appended[row : row + 1]
        torch.testing.assert_close(
            single.img_hidden[0], batch.img_hidden[row], rtol=1e-5, atol=1e-5
        )


def test_split_generated_keeps_complete_img_runs(llava):
    img, eos = llava.img_token_ids, llava.tokenizer.eos_token_id
    assert llava._split_generated([40, 41, *img, eos, 50]) == ([40, 41], True)
    assert llava._split_generated([40, *img, 77, 78]) == ([40], True)  # tail dropped
    assert llava._split_generated([40, *img[:3], eos]) == ([40], False)
    assert llava._split_generated([40, 41, eos, *img]) == ([40, 41], False)
    assert llava._split_generated([40, 41, 42]) == ([40, 41, 42], False)


def test_no_repeat_ngram_size_blocks_repeats(tiny_dir):
    torch.manual_seed(0)
    mllm = MLLM(str(tiny_dir / "llava"), max_new_tokens=32, no_repeat_ngram_size=2)
    plain = MLLM(str(tiny_dir / "llava"), max_new_tokens=32)
    plain.load_state_dict(mllm.state_dict())

    def bigrams(ids):
        return [tuple(ids[i : i + 2]) for i in range(len(ids) - 1)]

    images = _images()
    texts = [g[:-N] for g in mllm.generate(images, INSTRUCTIONS).token_ids]
    repeats = [g[:-N] for g in plain.generate(images, INSTRUCTIONS).token_ids]
    assert all(len(set(bigrams(t))) == len(bigrams(t)) for t in texts)
    assert any(len(set(bigrams(t))) < len(bigrams(t)) for t in repeats)  # the check can fail


# ----------------------------------------------------------------- training


@pytest.mark.slow  # ~1 s alone, 15 s on a loaded 2-core machine
def test_short_overfit_lowers_loss_and_raises_accuracy(tiny_dir):
    torch.manual_seed(0)
    mllm = MLLM(str(tiny_dir / "llava"), num_img_tokens=N)
    optimizer = torch.optim.AdamW(mllm.trainable_parameters(), lr=3e-2)
    images = _images()
    losses, accuracies = [], []
    for _ in range(30):
        out = mllm.training_forward(images, INSTRUCTIONS, TARGETS)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        accuracies.append(out.token_accuracy.item())
    assert losses[-1] < 0.3 * losses[0], losses
    assert accuracies[-1] > accuracies[0] + 0.5, accuracies
    # the fitted model now generates the [IMG] run itself: nothing is appended
    gen = mllm.eval().generate(images, INSTRUCTIONS, max_new_tokens=20)
    assert gen.appended == [False, False]
    assert all(ids[-N:] == mllm.img_token_ids for ids in gen.token_ids)
    assert all(text and "[IMG" not in text for text in gen.texts)


def test_gradient_checkpointing_gives_the_same_loss_and_grads(tiny_dir):
    plain = MLLM(str(tiny_dir / "llava"), num_img_tokens=N).train()
    ckpt = MLLM(str(tiny_dir / "llava"), num_img_tokens=N, gradient_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.model.is_activation_checkpointing
    grads = []
    for mllm in (plain, ckpt):
        out = mllm.training_forward(_images(), INSTRUCTIONS, TARGETS)
        out.loss.backward()
        grads.append((out.loss.detach(), mllm.embed_tokens.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-7)


def test_bfloat16_loading_with_float32_trainable_weights(tiny_dir):
    mllm = MLLM(str(tiny_dir / "llava"), num_img_tokens=N, torch_dtype="bfloat16")
    assert mllm.embed_tokens.weight.dtype == torch.bfloat16 and mllm.dtype == torch.bfloat16
    out = mllm.training_forward(_images(), INSTRUCTIONS, TARGETS)
    assert torch.isfinite(out.loss) and out.img_hidden.dtype == torch.bfloat16
    # mixed precision: trainable weights kept in float32, the frozen model in bf16
    for weight in mllm.trainable_parameters():
        weight.data = weight.data.float()
    out = mllm.training_forward(_images(), INSTRUCTIONS, TARGETS)
    out.loss.backward()
    assert mllm.embed_tokens.weight.grad.dtype == torch.float32
    assert mllm.lm_head.weight.grad.abs().sum() > 0
    assert out.img_embeds.dtype == torch.float32  # the float32 rows themselves
    assert mllm.preprocess_images(_images()).dtype == torch.bfloat16  # the vision tower's
    gen = mllm.generate(_images(), INSTRUCTIONS, max_new_tokens=3)
    assert gen.img_hidden.shape == (2, N, mllm.hidden_size)


# ----------------------------------------------------------------- text-only (LGIE)


def test_text_only_variant(tiny_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lgie = MLLM(str(tiny_dir / "llama"), num_img_tokens=N, visual=False, max_new_tokens=5)
    vocab = AutoModelForCausalLM.from_pretrained(tiny_dir / "llama").config.vocab_size
    assert lgie.img_token_ids == list(range(vocab, vocab + N))
    assert lgie.lm_head.weight.shape[0] == vocab + N
    assert set(lgie.frozen_prefixes()) == {"model.model.layers.", "model.model.norm."}

    enc = lgie.encode_prompts(INSTRUCTIONS)
    assert set(enc) == {"input_ids", "attention_mask"}
    out = lgie.training_forward(None, INSTRUCTIONS, TARGETS)
    # independent recomputation of L_ins
    rows, spans = [], []
    for instruction, target in zip(INSTRUCTIONS, TARGETS, strict=True):
        prompt = lgie.tokenizer(_prompt(instruction, visual=False))["input_ids"]
        answer = lgie.tokenizer(" " + target, add_special_tokens=False)["input_ids"]
        answer = answer + lgie.img_token_ids + [lgie.tokenizer.eos_token_id]
        rows.append(prompt + answer)
        spans.append((len(prompt), len(answer)))
    terms = []
    with torch.no_grad():
        for row, (n_prompt, _) in zip(rows, spans, strict=True):
            logits = lgie.model(input_ids=torch.tensor([row])).logits[0]
            target_ids = torch.tensor(row[n_prompt:])
            terms.append(F.cross_entropy(logits[n_prompt - 1 : -1], target_ids, reduction="sum"))
    expected = torch.stack(terms).sum() / sum(n for _, n in spans)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)

    gen = lgie.generate(None, INSTRUCTIONS)
    assert len(gen.texts) == 2 and gen.img_hidden.shape == (2, N, lgie.hidden_size)
    single = lgie.generate(None, INSTRUCTIONS[1:])
    assert single.token_ids == gen.token_ids[1:]
    torch.testing.assert_close(single.img_hidden[0], gen.img_hidden[1], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- errors


def test_missing_or_wrong_folder_is_a_clear_error(tmp_path, tiny_dir):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        MLLM(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="model_type 'llama'"):
        MLLM(str(tiny_dir / "llama"), visual=True)
    with pytest.raises(ValueError, match="instructions but"):
        MLLM(str(tiny_dir / "llama"), visual=False).training_forward(None, ["a"], ["b", "c"])


# ----------------------------------------------------------------- the release's conversation

#: LLaVA's ``conv_vicuna_v1_1.system`` (haotian-liu/LLaVA 7ace501, llava/conversation.py), the
#: template the MGIE release trains with (mgie_train.py, --version v1), written out by hand.
RELEASE_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)


def _release_sample(instruction: str, expressive: str, image: str | None) -> tuple[str, str]:
    """(prompt, whole sample) of one training sample as the release formats it: the
    vicuna_v1_1 TWO-separator conversation ``system + " " + "USER: " + query + " " +
    "ASSISTANT: " + answer + "</s>"`` with the query ``"what will this image be like if
    '%s'\\n<image>"`` and the answer ``"%s [IMG0] ... [IMG7]"`` (mgie_train.py,
    LazySupervisedDataset). The release's slow LLaMA tokenizer drops the spaces around the added
    [IMG] tokens, so they are written joined here (the tiny byte-level tokenizer keeps spaces)."""
    query = f"what will this image be like if '{instruction}'"
    if image is not None:
        query += "\n" + image
    prompt = f"{RELEASE_SYSTEM} USER: {query} ASSISTANT:"
    answer = f" {expressive}" + "".join(f"[IMG{i}]" for i in range(8)) + "</s>"
    return prompt, prompt + answer


@pytest.mark.parametrize("llm", ["llava", "llama"])
def test_training_sample_is_the_release_conversation(tiny_dir, llm):
    """One training sample's token ids and labels equal the release's format string, tokenized
    by the model's own tokenizer: the system prompt, the quoted instruction, the image after
    the text (MGIE; LGIE: the same without it), the answer and </s> labelled, the rest -100."""
    visual = llm == "llava"
    mllm = MLLM(str(tiny_dir / llm), num_img_tokens=8, visual=visual)
    instruction, expressive = "make it blue", "the square turns blue"
    # The tiny LLaVA's processor expands <image> to (32 px / patch 8)^2 = 16 image tokens.
    image = "<image>" * 16 if visual else None
    prompt, sample = _release_sample(instruction, expressive, image)
    want = mllm.tokenizer(sample)["input_ids"]
    n_prompt = len(mllm.tokenizer(prompt)["input_ids"])
    assert want[0] == mllm.tokenizer.bos_token_id and want[-1] == mllm.tokenizer.eos_token_id
    assert want[-9:-1] == mllm.img_token_ids

    images = _images(1) if visual else None
    inputs = mllm.training_inputs(images, [instruction], [expressive])
    assert inputs["input_ids"][0].tolist() == want
    assert inputs["attention_mask"][0].tolist() == [1] * len(want)
    assert inputs["labels"][0].tolist() == [IGNORE_INDEX] * n_prompt + want[n_prompt:]
    assert ("pixel_values" in inputs) == visual
    # the decoded prompt reads as the release's string
    text = mllm.tokenizer.decode(want[:n_prompt], skip_special_tokens=False)
    assert f"USER: what will this image be like if '{instruction}'" in text
    assert text.rstrip().endswith("ASSISTANT:")


def test_default_templates_are_the_release_strings():
    assert PROMPT_TEMPLATE == "what will this image be like if '{instruction}'"
    assert VISUAL_CHAT_TEMPLATE == RELEASE_SYSTEM + " USER: {prompt}\n<image> ASSISTANT:"
    assert TEXT_CHAT_TEMPLATE == RELEASE_SYSTEM + " USER: {prompt} ASSISTANT:"


def test_derive_keeps_gradients_and_matches_generate(tiny_dir, llava):
    """``derive`` (MGIE Table 7 "- L_ins" training) is ``generate`` with gradients through the
    last pass: the same texts and states, and the [IMG] states reach the word embeddings."""
    images = _images()
    with torch.no_grad():
        plain = llava.generate(images, INSTRUCTIONS)
    derived = llava.derive(images, INSTRUCTIONS)
    assert derived.texts == plain.texts and derived.token_ids == plain.token_ids
    torch.testing.assert_close(derived.img_hidden.detach(), plain.img_hidden)
    assert derived.img_hidden.requires_grad and not plain.img_hidden.requires_grad
    derived.img_hidden.sum().backward()
    grad = llava.embed_tokens.weight.grad
    assert grad is not None and grad[llava.img_token_ids].abs().sum() > 0
    llava.embed_tokens.weight.grad = None
