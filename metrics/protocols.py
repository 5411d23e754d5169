"""Evaluation protocols: which metrics a dataset is scored with, and how the paper prints them.

The columns are those of MGIE's Tables 1-2 (Fu et al., 2024, Sec. 4.1):

=============  ===============================  ==========================================
dataset        columns                          source of the protocol
=============  ===============================  ==========================================
EVR            L1, DINO, CVS                    MGIE Table 1-2
GIER           L1, SSIM, CVS                    MGIE Table 1-2
MA5k           L1, SSIM, LPIPS                  MGIE Table 1-2
MagicBrush     L1, DINO, CVS, CTS               MGIE Table 1-2 / MagicBrush (Zhang et al.)
IPr2Pr         CLIP_direction, CLIP_image       InstructPix2Pix's CFG sweep (Brooks et al.)
synthetic      L1, L1_edit, SSIM                exact ground truth, backbone-free
=============  ===============================  ==========================================

Scaling (:data:`PAPER_SCALE`): MGIE prints DINO, CVS and SSIM as percentages and CTS as
``100 * cos``; L1 and LPIPS raw. Raw values stay in ``test_metrics.json``'s ``metrics``; the
scaled ones form its ``table``. FID, KID and VIEScore are added on demand
(``model.init_args.extra_metrics``).

MagicBrush is scored as its paper does, for either test mode of the data (independent or
iterative generation): ``single`` (turn 1 of every session), ``final`` (the last turn of each
session) and ``all`` (every turn). MGIE does not say which of these its tables use; the table
takes :attr:`Protocol.default_aggregation` (``single``, configurable), every aggregation is in
``metrics`` and the one used is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: Multiplier from a metric's raw value to the number MGIE prints (absent = 1).
PAPER_SCALE: dict[str, float] = {"DINO": 100.0, "CVS": 100.0, "SSIM": 100.0, "CTS": 100.0}

#: Aggregations of multi-turn data (MagicBrush): which samples each one scores.
AGGREGATIONS = ("single", "final", "all")


@dataclass(frozen=True)
class Protocol:
    """A dataset's evaluation protocol.

    Attributes:
        name: the protocol's name (a DataModule's ``protocol`` attribute).
        columns: metric names of the paper's table, in its order.
        aggregations: ``("all",)`` for single-turn data; MagicBrush adds ``single`` and
            ``final``.
        default_aggregation: the aggregation that fills ``test/<metric>`` and the table.
        source: where the protocol comes from (printed in the report's footnotes).
    """

    name: str
    columns: tuple[str, ...]
    aggregations: tuple[str, ...] = ("all",)
    default_aggregation: str = "all"
    source: str = ""
    scale: dict[str, float] = field(default_factory=lambda: dict(PAPER_SCALE))

    def __post_init__(self) -> None:
        unknown = [a for a in self.aggregations if a not in AGGREGATIONS]
        if unknown:
            raise ValueError(f"protocol {self.name!r}: unknown aggregation(s) {unknown}")
        if self.default_aggregation not in self.aggregations:
            raise ValueError(
                f"protocol {self.name!r}: default aggregation {self.default_aggregation!r} is "
                f"not one of {self.aggregations}"
            )

    def scale_of(self, name: str) -> float:
        """The table multiplier of a result name; flattened names (``KID_std``, ``L1_edit``,
        ``VIEScore_SC``) take their metric's."""
        return self.scale.get(name.split("_")[0], 1.0)

    def with_aggregation(self, aggregation: str) -> Protocol:
        """The same protocol with another default aggregation (e.g. MagicBrush final-turn)."""
        return Protocol(
            self.name, self.columns, self.aggregations, aggregation, self.source, dict(self.scale)
        )


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol("evr", ("L1", "DINO", "CVS"), source="MGIE Tables 1-2"),
        Protocol("gier", ("L1", "SSIM", "CVS"), source="MGIE Tables 1-2"),
        Protocol("ma5k", ("L1", "SSIM", "LPIPS"), source="MGIE Tables 1-2"),
        Protocol(
            "magicbrush",
            ("L1", "DINO", "CVS", "CTS"),
            aggregations=AGGREGATIONS,
            default_aggregation="single",
            source="MGIE Tables 1-2; turn aggregations of MagicBrush (Zhang et al., 2023)",
        ),
        Protocol(
            "ipr2pr",
            ("CLIP_direction", "CLIP_image"),
            source="InstructPix2Pix's CLIP directional / image similarity",
        ),
        Protocol("synthetic", ("L1", "L1_edit", "SSIM"), source="editbench synthetic data"),
        Protocol("generic", ("L1", "SSIM"), source="editbench default"),
        Protocol("concat", ("L1", "SSIM"), source="editbench default"),
    )
}


def get_protocol(name: str) -> Protocol:
    """The protocol called ``name``; an unknown name is an error listing the known ones."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"unknown evaluation protocol {name!r}; known: {sorted(PROTOCOLS)}") from None


def aggregation_indices(aggregation: str, batch: dict) -> torch.Tensor | None:
    """Indices of the batch's samples an aggregation scores (None = all of them).

    ``single`` keeps turn 1, ``final`` the last turn of each session (``turn == num_turns``);
    both need the batch's ``turn`` and ``num_turns`` (MagicBrush samples carry them).
    """
    if aggregation == "all":
        return None
    missing = [k for k in ("turn", "num_turns") if k not in batch]
    if missing:
        raise ValueError(
            f"the {aggregation!r} turn aggregation needs the batch keys {missing}, which this "
            f"dataset does not provide (multi-turn data such as MagicBrush does)"
        )
    turn = torch.as_tensor(batch["turn"]).reshape(-1)
    if aggregation == "single":
        keep = turn == 1
    else:
        keep = turn == torch.as_tensor(batch["num_turns"]).reshape(-1)
    return keep.nonzero().reshape(-1)
