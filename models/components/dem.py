"""Pieces of MMIG's diffusion editing model (DEM, Sec. 3.3) that are plain text and tensor
work: the LayerDiffusion split of a description into object and background text (Eq. 16's
ê_a, ê_b), the concept tokens of a prompt (A-STAR's concept set C, Eqs. 19-20), and the
attention losses over a batch whose samples hold different numbers of concepts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor

from models.components.attention_losses import concept_maps, retention_loss, segregation_loss


def split_object_background(text: str, pattern: str | None) -> tuple[str, str]:
    """``(object text, background text)`` of a description, cut at the last match of the
    regular expression ``pattern`` (e.g. ``r"\\s+on an?\\s+"``: "a red circle in the top left
    on a plain beige background" → ("a red circle in the top left", "plain beige background")).
    LayerDiffusion decomposes the target into object attributes and background (MMIG Sec. 3.3);
    no rule is given, so the rule is a config field. Without a match both are the whole text
    (the blend of Eq. 16 is then the text's own embedding)."""
    if not pattern:
        return text, text
    matches = list(re.finditer(pattern, text))
    if not matches:
        return text, text
    last = matches[-1]
    obj, background = text[: last.start()].strip(), text[last.end() :].strip()
    return (obj or text), (background or text)


def concept_positions(
    tokenizer, prompts: Sequence[str], words: Sequence[str] | None
) -> list[list[int]]:
    """Token positions of the concept words in each prompt, as the text encoder sees it
    (start token at 0, truncated to ``tokenizer.model_max_length``): one position per
    occurrence, the word's last token (a word split into pieces is found as the sequence of its
    pieces). ``words`` None or empty gives no concepts."""
    if not words:
        return [[] for _ in prompts]
    pieces = [
        tokenizer(w, add_special_tokens=False)["input_ids"] for w in dict.fromkeys(words) if w
    ]
    limit = tokenizer.model_max_length
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, truncation=True, max_length=limit)["input_ids"]
        end = len(ids) - 1  # the end token
        found = set()
        for piece in pieces:
            n = len(piece)
            for start in range(1, end - n + 1):
                if ids[start : start + n] == piece:
                    found.add(start + n - 1)
        out.append(sorted(found))
    return out


def last_text_token(tokenizer, prompts: Sequence[str]) -> list[int]:
    """Position of each prompt's end token (the softmax over tokens stops before it)."""
    limit = tokenizer.model_max_length
    return [
        len(tokenizer(p, truncation=True, max_length=limit)["input_ids"]) - 1 for p in prompts
    ]


def attention_losses(
    maps_now: Tensor,
    maps_next: Tensor | None,
    positions: Sequence[Sequence[int]],
    ends: Sequence[int],
    *,
    threshold: float = 0.5,
    smooth_sigma: float | None = 0.5,
) -> tuple[Tensor | None, Tensor | None]:
    """L_AS (Eq. 19) on ``maps_now`` and L_AR (Eq. 20) from ``maps_now`` (step t, the proxy
    B_t) to ``maps_next`` (step t−1), both aggregated maps ``[B, L, h, w]``.

    Each sample's concept maps come from :func:`concept_maps` (Attend-and-Excite's processing:
    ×100, softmax over the text tokens 1..end, 3x3 Gaussian). L_AS is averaged over the samples
    with at least two concepts, L_AR over those with at least one (each a sum over the sample's
    pairs or concepts, as in Eqs. 19-20); a loss no sample can have is None.
    """
    segregation, retention = [], []
    for i, (pos, end) in enumerate(zip(positions, ends, strict=True)):
        if not pos:
            continue
        now = concept_maps(
            maps_now[i : i + 1], pos, last_token=end, smooth_sigma=smooth_sigma
        )
        if len(pos) >= 2:
            segregation.append(segregation_loss(now))
        if maps_next is not None:
            nxt = concept_maps(
                maps_next[i : i + 1], pos, last_token=end, smooth_sigma=smooth_sigma
            )
            retention.append(retention_loss(now, nxt, threshold))
    as_ = torch.stack(segregation).mean() if segregation else None
    ar = torch.stack(retention).mean() if retention else None
    return as_, ar
