"""Tokenizers of the tiny checkpoints (:mod:`editbench.tiny`): a CLIP-style BPE and byte-level
BPEs trained on the synthetic corpus, and the check that no corpus text maps to unknown tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

CLIP_MAX_LENGTH = 77
LM_MAX_LENGTH = 512
BPE_VOCAB_SIZE = 4096  # an upper bound; the trainer stops when the corpus has no pair left

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
LM_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")  # LLaMA's ids 0, 1, 2 (+ a pad token)
T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # T5's ids 0, 1, 2
IMAGE_TOKEN = "<image>"


def _byte_alphabet() -> list[str]:
    """The 256 byte-level characters in CLIP's vocabulary order (GPT-2's bytes-to-unicode map:
    the printable bytes stand for themselves, the other bytes map to U+0100 onwards)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]


def _merges_of(tokenizer) -> list[tuple[str, str]]:
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def _train_clip_tokenizer(corpus: list[str]):
    """CLIP tokenizer trained on the corpus, in CLIP's vocabulary layout.

    The training pipeline reuses `CLIPTokenizer`'s own normaliser and pre-tokeniser (NFC,
    whitespace, lower case; CLIP's split regex; byte level), so training and use split text
    the same way. Vocabulary: 256 bytes, the same with `</w>`, one entry per merge, then
    `<|startoftext|>` and `<|endoftext|>`, as in `openai/clip-vit-base-patch32`.
    """
    from tokenizers import Tokenizer, models, trainers
    from transformers import CLIPTokenizer

    reference = CLIPTokenizer().backend_tokenizer
    trainer_tok = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    trainer_tok.normalizer = reference.normalizer
    trainer_tok.pre_tokenizer = reference.pre_tokenizer
    alphabet = _byte_alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        special_tokens=[],
        show_progress=False,
    )
    trainer_tok.train_from_iterator(corpus, trainer)
    merges = _merges_of(trainer_tok)
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += [CLIP_BOS, CLIP_EOS]
    vocab = {}
    for token in tokens:  # defensive: a repeated token keeps its first id
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def _write_clip_vocab_files(tokenizer, folder: Path) -> None:
    """vocab.json and merges.txt beside tokenizer.json, as the reference folders have them
    (transformers 5 writes only tokenizer.json; the slow-format files load on their own)."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    vocab = dict(state["vocab"])
    for added in tokenizer.backend_tokenizer.get_added_tokens_decoder().values():
        vocab.setdefault(added.content, len(vocab))
    vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    lines = ["#version: 0.2"]
    lines += [m if isinstance(m, str) else " ".join(m) for m in state["merges"]]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n")


def _train_byte_bpe(corpus: list[str], specials: tuple[str, ...]):
    """A byte-level BPE `tokenizers.Tokenizer` (GPT-2 style) trained on the corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(specials),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def _lm_tokenizer(corpus: list[str], *, image_token: bool):
    """The LLaMA/LLaVA tokenizer: `<s>` prepended (as LLaMA does), left padding for batched
    generation, `<image>` appended as a special token for LLaVA."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = _train_byte_bpe(corpus, LM_SPECIALS)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    extra = {}
    if image_token:
        tokenizer.add_special_tokens([IMAGE_TOKEN])
        extra["extra_special_tokens"] = {"image_token": IMAGE_TOKEN}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        model_max_length=LM_MAX_LENGTH,
        **extra,
    )


def _t5_tokenizer(corpus: list[str]):
    """The T5 tokenizer: `<pad>` 0, `</s>` 1, `<unk>` 2, `</s>` appended, right padding."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = _train_byte_bpe(corpus, T5_SPECIALS)
    eos = tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="right",
        model_max_length=LM_MAX_LENGTH,
    )


def unknown_tokens(tokenizer, corpus: list[str]) -> list[str]:
    """Corpus sentences that contain the unknown token or do not survive a round trip."""
    bad = []
    unk = tokenizer.unk_token_id
    is_clip = type(tokenizer).__name__ == "CLIPTokenizer"
    for sentence in corpus:
        ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
        text = tokenizer.decode(ids, skip_special_tokens=False)
        if is_clip:  # lower case, and the decoder puts a space after every word piece
            same = text.replace(" ", "") == sentence.lower().replace(" ", "")
        else:
            same = text == sentence
        if unk in ids or not same:
            bad.append(sentence)
    return bad


def _check_tokenizer(name: str, tokenizer, corpus: list[str]) -> None:
    bad = unknown_tokens(tokenizer, corpus)
    if bad:
        raise RuntimeError(
            f"tiny {name} tokenizer maps {len(bad)} corpus sentences to unknown tokens "
            f"(first: {bad[0]!r})"
        )
