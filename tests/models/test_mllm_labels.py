"""MGIE's L_ins with the LM head applied only to the positions that predict a label
(``labelled_lm_loss``): the same loss, accuracy and gradients as cross-entropy over the full
logits, on the tiny LLaVA (MGIE) and LLaMA (LGIE), with the padding on either side."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.components.mllm import IGNORE_INDEX, MLLM, labelled_lm_loss

INSTRUCTIONS = ["make it blue", "add a small red circle on the left of the square", "darken"]
TARGETS = ["the square turns blue", "a red circle appears left", "the whole image is darker"]


def _images(n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 32, 32, generator=g) * 2 - 1


@pytest.fixture(scope="module", params=["llava", "llama"])
def mllm(request, tiny_dir):
    torch.manual_seed(0)
    return MLLM(str(tiny_dir / request.param), num_img_tokens=8, visual=request.param == "llava")


def _rows(mllm: MLLM):
    """Unpadded rows ``prompt + target + [IMG0..7] + eos``, their labels (the prompt ignored)
    and the pixel values, built from the tokenizer/processor directly."""
    images = _images() if mllm.visual else None
    prompts, pixel_values = mllm._tokenize(mllm.format_prompts(INSTRUCTIONS), images)
    rows, labels = [], []
    for prompt, target in zip(prompts, TARGETS, strict=True):
        text = mllm.tokenizer(" " + target, add_special_tokens=False)["input_ids"]
        answer = text + mllm.img_token_ids + [mllm.tokenizer.eos_token_id]
        rows.append(prompt + answer)
        labels.append([IGNORE_INDEX] * len(prompt) + answer)
    return rows, labels, pixel_values


def _padded(rows, labels, pad_id: int, side: str):
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id)
    mask = torch.zeros_like(ids)
    label_ids = torch.full_like(ids, IGNORE_INDEX)
    for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
        span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        ids[i, span], mask[i, span], label_ids[i, span] = (
            torch.tensor(row),
            1,
            torch.tensor(label),
        )
    return ids, mask, label_ids


def _reference(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Cross-entropy and greedy accuracy written out position by position: logits[b, t]
    predicts labels[b, t + 1] wherever that label is not ignored."""
    terms, hits = [], []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == IGNORE_INDEX:
                continue
            row = logits[b, t].float()
            terms.append(torch.logsumexp(row, 0) - row[target])
            hits.append(int(row.argmax()) == target)
    return torch.stack(terms).mean(), sum(hits) / len(hits)


@pytest.mark.parametrize("side", ["right", "left"])
def test_loss_accuracy_and_gradient_equal_the_full_logits(mllm, side):
    rows, labels, pixel_values = _rows(mllm)
    ids, mask, label_ids = _padded(rows, labels, mllm.tokenizer.pad_token_id, side)
    with torch.no_grad():
        hidden = mllm.hidden_states(ids, mask, pixel_values)
    head = mllm.lm_head.weight

    loss, accuracy = labelled_lm_loss(hidden, label_ids, mllm.lm_head)
    (grad,) = torch.autograd.grad(loss, head)
    full = mllm.lm_head(hidden)  # [B, T, V]: what the labelled path avoids building
    ref_loss, ref_accuracy = _reference(full, label_ids)
    (ref_grad,) = torch.autograd.grad(ref_loss, head)

    assert full.shape[:2] == ids.shape
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert accuracy.item() == pytest.approx(ref_accuracy)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-8)
    # and the library's own masked cross-entropy over the full logits agrees
    library = F.cross_entropy(
        full[:, :-1].reshape(-1, full.shape[-1]), label_ids[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(loss, library, rtol=1e-6, atol=1e-6)


def test_left_and_right_padding_give_the_same_loss(mllm):
    rows, labels, pixel_values = _rows(mllm)
    results = []
    for side in ("left", "right"):
        ids, mask, label_ids = _padded(rows, labels, mllm.tokenizer.pad_token_id, side)
        with torch.no_grad():
            hidden = mllm.hidden_states(ids, mask, pixel_values)
            results.append(labelled_lm_loss(hidden, label_ids, mllm.lm_head))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    assert results[0][1].item() == results[1][1].item()


def test_training_forward_applies_the_head_to_labelled_positions_only(mllm):
    rows, labels, pixel_values = _rows(mllm)
    ids, mask, label_ids = _padded(rows, labels, mllm.tokenizer.pad_token_id, "right")
    labelled = int((label_ids[:, 1:] != IGNORE_INDEX).sum())
    shapes = []
    hook = mllm.lm_head.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    try:
        with torch.no_grad():
            out = mllm.training_forward(_images() if mllm.visual else None, INSTRUCTIONS, TARGETS)
    finally:
        hook.remove()
    vocab = mllm.lm_head.weight.shape[0]
    assert shapes == [(labelled, vocab)]
    assert labelled < ids.numel() // 2  # the prompt (and the 16 image tokens) are most of it
    # the same numbers as the full logits of the hand-built batch (the tokenizer's own rows)
    with torch.no_grad():
        full = mllm.lm_head(mllm.hidden_states(ids, mask, pixel_values))
    ref_loss, ref_accuracy = _reference(full, label_ids)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert out.token_accuracy.item() == pytest.approx(ref_accuracy)


def test_no_label_is_an_error(mllm):
    hidden = torch.zeros(2, 5, mllm.hidden_size)
    labels = torch.full((2, 5), IGNORE_INDEX)
    with pytest.raises(ValueError, match="no labelled target tokens"):
        labelled_lm_loss(hidden, labels, mllm.lm_head)
