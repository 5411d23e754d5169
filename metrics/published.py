"""Published numbers of the MGIE paper (Fu et al., "Guiding Instruction-based Image Editing via
Multimodal Large Language Models", ICLR 2024), as data for ``python -m editbench report
--published``.

Every value is copied as printed in the paper (its table rows are committed as
``tests/metrics/fixtures/mgie_tables.txt``, against which ``tests/metrics/test_published.py``
checks these tables), at the paper's scale (:data:`PAPER_PROTOCOL` ``["scale"]``): L1, LPIPS
and FID raw; DINO, CVS and SSIM as percentages; CTS as ``100 * cos``. Tables are nested ``{method: {dataset: {metric: value}}}``
with the suite's dataset names (``evr``, ``gier``, ``ma5k``, ``magicbrush``) and metric names
(``L1``, ``DINO``, ``CVS``, ``SSIM``, ``LPIPS``, ``CTS``, ``FID``).

- ``mgie-zero-shot``: Table 1 (InsPix2Pix, LGIE, MGIE, pre-trained on IPr2Pr only), the
  appendix's description-based baselines (Text2LIVE, Null-Inv; zero-shot, same columns) and
  the appendix's zero-shot FID.
- ``mgie-fine-tuned``: Table 2 (fine-tuned on each dataset) and the appendix's fine-tuned FID.
- ``mgie-ablation``: Table 3 (FZ / FT / E2E use of expressive instructions; zero-shot).
- ``mgie-lins``: the appendix's training-loss ablation (with and without ``L_ins``).
- ``mgie-encoders``: Table 5 (instruction encoders, HIVE, InsEdit; zero-shot).
- ``mgie-lm-size``: Table 6 (LM sizes; zero-shot).

InsightEdit (Xu et al., CVPR 2025; :data:`INSIGHTEDIT_TABLES`, checked by
``tests/metrics/test_advancededit.py`` against ``fixtures/insightedit_tables.txt``, the table
lines of ``shared/papers/insightedit.txt``), each table at its own printed scale
(:data:`TABLE_SCALES`), dataset ``advancededit`` (the protocol's name) and metrics
``VIEScore_O``, ``CTS`` (the paper's CLIPScore), ``PSNR``, ``SSIM``, ``LPIPS``:

- ``insightedit-main``: the comparison on AdvancedEdit-Eval (VIEScore 0-1).
- ``insightedit-iaa``: the IAA ablation (VIEScore 0-10; see :data:`INSIGHTEDIT_PROTOCOL`).
- ``insightedit-reason-edit``: the Reason-Edit comparison (datasets
  ``reason-edit-understanding`` and ``reason-edit-reasoning``, VIEScore 0-1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from metrics.published_benchmarks import (
    BENCHMARK_AVERAGING,
    BENCHMARK_SCALES,
    BENCHMARK_SOURCES,
    BENCHMARK_TABLES,
)

#: What the paper says about how its numbers were measured (Section 4.1 and the tables).
PAPER_PROTOCOL: dict[str, Any] = {
    "paper": "MGIE (Fu et al., ICLR 2024)",
    "seeds": "all evaluations are averaged over 5 random seeds (Section 4.1)",
    "sampler": {"guidance_scale": 7.5, "image_guidance_scale": 1.5},
    "scale": {
        "L1": 1,
        "LPIPS": 1,
        "FID": 1,
        "DINO": 100,
        "CVS": 100,
        "SSIM": 100,
        "CTS": 100,
    },
    "columns": {
        "evr": ["L1", "DINO", "CVS"],
        "gier": ["L1", "SSIM", "CVS"],
        "ma5k": ["L1", "SSIM", "LPIPS"],
        "magicbrush": ["L1", "DINO", "CVS", "CTS"],
    },
    "splits": "the datasets' original training / validation / testing splits (Section 4.1)",
    "notes": (
        "MagicBrush metrics follow the MagicBrush paper (L1, DINO, CVS = CLIP-I, CTS = CLIP-T "
        "against goal captions; the text calls CTS 'global caption alignment', i.e. the global "
        "captions); backbones, resolution and the turn setting (single- or multi-turn) are not "
        "stated in the paper, so published rows cannot be protocol-checked against runs."
    ),
}


def _row(values: Sequence[float], columns: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """Split one printed table row into ``{dataset: {metric: value}}`` in ``columns``' order."""
    row: dict[str, dict[str, float]] = {}
    it = iter(values)
    for dataset, metrics in columns.items():
        row[dataset] = {metric: next(it) for metric in metrics}
    if next(it, None) is not None:
        raise ValueError("more values than columns")
    return row


_ALL = PAPER_PROTOCOL["columns"]
_MA5K_MB = {"ma5k": ["L1", "SSIM", "LPIPS"], "magicbrush": ["L1", "DINO", "CVS", "CTS"]}
_MA5K_MB_NO_L1 = {"ma5k": ["SSIM", "LPIPS"], "magicbrush": ["DINO", "CVS", "CTS"]}
_FID = {name: ["FID"] for name in ("evr", "gier", "ma5k", "magicbrush")}

# Table 1 and the appendix's description-based baselines (zero-shot, the same columns).
# fmt: off
_TABLE1 = {
    "InsPix2Pix": [
        0.189, 67.82, 81.38, 0.144, 57.51, 86.63, 0.176, 58.92, 0.359, 0.101, 71.46, 85.22, 29.34,
    ],
    "LGIE": [
        0.159, 69.71, 82.04, 0.152, 56.86, 86.99, 0.144, 64.60, 0.327, 0.084, 80.90, 88.87, 30.10,
    ],
    "MGIE": [
        0.163, 71.49, 81.73, 0.135, 59.24, 88.59, 0.133, 66.25, 0.298, 0.082, 82.22, 91.14, 30.40,
    ],
    "Text2LIVE": [
        0.169, 66.19, 78.22, 0.126, 58.32, 79.32, 0.165, 57.62, 0.342, 0.071, 83.35, 89.71, 23.59,
    ],
    "Null-Inv": [
        0.174, 69.24, 78.35, 0.149, 58.24, 82.33, 0.179, 61.36, 0.335, 0.073, 81.72, 87.24, 27.62,
    ],
}
# Table 2 (fine-tuned on each dataset).
_TABLE2 = {
    "InsPix2Pix": [
        0.166, 70.79, 82.76, 0.111, 64.86, 91.49, 0.122, 67.12, 0.267, 0.063, 87.99, 93.83, 30.93,
    ],
    "LGIE": [
        0.147, 74.71, 85.06, 0.104, 65.30, 90.61, 0.094, 71.47, 0.246, 0.058, 88.09, 93.57, 31.33,
    ],
    "MGIE": [
        0.146, 75.65, 85.28, 0.105, 68.68, 92.42, 0.082, 72.91, 0.235, 0.057, 90.65, 95.28, 31.73,
    ],
}
# fmt: on
# Appendix, "Evaluating Image Editing via FID": zero-shot EVR GIER MA5k MagicBrush, then fine-tuned.
_FID_TABLE = {
    "InsPix2Pix": ([6.19, 5.61, 5.91, 5.69], [5.31, 5.31, 5.30, 5.64]),
    "LGIE": ([6.67, 5.69, 5.80, 5.31], [5.32, 5.42, 5.59, 5.48]),
    "MGIE": ([6.45, 5.64, 5.48, 5.61], [5.53, 5.59, 5.41, 5.42]),
}
_TABLE3 = {
    "InsPix2Pix": [0.176, 58.92, 0.359, 0.101, 71.46, 85.22, 29.34],
    "FZ LGIE": [0.178, 57.26, 0.372, 0.133, 67.53, 82.49, 28.79],
    "FZ MGIE": [0.163, 57.54, 0.366, 0.128, 71.65, 86.00, 29.43],
    "FT LGIE": [0.166, 60.11, 0.357, 0.124, 71.04, 85.47, 29.37],
    "FT MGIE": [0.163, 61.38, 0.348, 0.101, 74.79, 87.12, 29.68],
    "E2E LGIE": [0.144, 64.60, 0.327, 0.084, 80.90, 88.87, 30.10],
    "E2E MGIE": [0.133, 66.25, 0.298, 0.082, 82.22, 91.14, 30.40],
}
_LINS = {
    "InsPix2Pix": [58.92, 0.359, 71.46, 85.22, 29.34],
    "LGIE - Lins": [57.59, 0.386, 70.79, 83.21, 28.66],
    "LGIE + Lins": [64.60, 0.327, 80.90, 88.87, 30.10],
    "MGIE - Lins": [58.18, 0.365, 71.50, 85.19, 29.11],
    "MGIE + Lins": [66.25, 0.298, 82.22, 91.14, 30.40],
}
_TABLE5 = {
    "InsPix2Pix": [58.92, 0.359, 71.46, 85.22, 29.34],
    "InsPix2Pix + EncLLaMA": [59.08, 0.334, 72.38, 85.99, 29.29],
    "InsPix2Pix + EncLLaVA": [60.94, 0.352, 74.10, 87.21, 29.37],
    "HIVE": [65.17, 0.302, 78.95, 88.23, 29.42],
    "InsEdit": [59.59, 0.364, 83.26, 91.16, 29.80],
    "MGIE": [66.25, 0.298, 82.22, 91.14, 30.40],
}
_TABLE6 = {
    "InsPix2Pix": [58.92, 0.359, 71.46, 85.22, 29.34],
    "LGIE 7B": [64.60, 0.327, 80.90, 88.87, 30.10],
    "LGIE 13B": [63.50, 0.308, 80.18, 88.77, 30.31],
    "MGIE 6.7B": [63.78, 0.300, 78.82, 90.01, 29.47],
    "MGIE 7B": [66.25, 0.298, 82.22, 91.14, 30.40],
    "MGIE 13B": [65.91, 0.279, 82.15, 91.52, 30.75],
}


def _table(rows: dict[str, list[float]], columns: dict[str, list[str]]) -> dict:
    return {method: _row(values, columns) for method, values in rows.items()}


def _with_fid(table: dict, which: int) -> dict:
    for method, pair in _FID_TABLE.items():
        for dataset, cell in _row(pair[which], _FID).items():
            table[method][dataset].update(cell)
    return table


#: name -> ``{method: {dataset: {metric: value}}}``, the paper's values at the paper's scale.
MGIE_TABLES: dict[str, dict[str, dict[str, dict[str, float]]]] = {
    "mgie-zero-shot": _with_fid(_table(_TABLE1, _ALL), 0),
    "mgie-fine-tuned": _with_fid(_table(_TABLE2, _ALL), 1),
    "mgie-ablation": _table(_TABLE3, _MA5K_MB),
    "mgie-lins": _table(_LINS, _MA5K_MB_NO_L1),
    "mgie-encoders": _table(_TABLE5, _MA5K_MB_NO_L1),
    "mgie-lm-size": _table(_TABLE6, _MA5K_MB_NO_L1),
}

#: name -> where in the paper the rows come from (shown under a report's table).
TABLE_SOURCES: dict[str, str] = {
    "mgie-zero-shot": (
        "MGIE Table 1 (zero-shot, pre-trained on IPr2Pr only); Text2LIVE and Null-Inv from the "
        "appendix's description-based baselines; FID from the appendix (zero-shot)"
    ),
    "mgie-fine-tuned": "MGIE Table 2 (fine-tuned on each dataset); FID from the appendix",
    "mgie-ablation": "MGIE Table 3 (FZ / FT / E2E ablation, zero-shot)",
    "mgie-lins": "MGIE appendix, ablation of the training loss L_ins (zero-shot)",
    "mgie-encoders": "MGIE Table 5 (instruction encoders, HIVE, InsEdit; zero-shot)",
    "mgie-lm-size": "MGIE Table 6 (LM sizes; zero-shot)",
}


# --------------------------------------------------------------------------- InsightEdit

#: What the InsightEdit paper (Xu et al., "InsightEdit: Towards Better Instruction Following for
#: Image Editing", CVPR 2025, arXiv 2411.17323) says about its numbers, as the suite reads it.
INSIGHTEDIT_PROTOCOL: dict[str, Any] = {
    "paper": "InsightEdit (Xu et al., CVPR 2025)",
    "seeds": "the paper's text states no seed count",
    "sampler": "not stated (the suite's InsightEdit config samples at SmartEdit's settings)",
    "columns": {"advancededit": ["VIEScore_O", "CTS", "PSNR", "SSIM", "LPIPS"]},
    "notes": (
        "AdvancedEdit-Eval columns VIEScore, CLIPScore, PSNR, SSIM, LPIPS as the suite's "
        "VIEScore_O, CTS, PSNR, SSIM, LPIPS (metrics.protocols.ADVANCEDEDIT_NOTES). VIEScore is "
        "printed 0-1 in the main table and 0-10 in the IAA ablation, but the ablation's IAA row "
        "repeats the main table's 'InsightEdit + AdvancedEdit' PSNR/SSIM/LPIPS/CLIPScore "
        "exactly while its VIEScore 7.545 is not 10 x 0.831: the two VIEScores are not one "
        "quantity on two scales, and the text does not say how they differ."
    ),
}

_INSIGHTEDIT_COLUMNS = {"advancededit": ["VIEScore_O", "CTS", "PSNR", "SSIM", "LPIPS"]}
_ABLATION_COLUMNS = {"advancededit": ["PSNR", "SSIM", "LPIPS", "CTS", "VIEScore_O"]}
_REASON_EDIT_COLUMNS = {
    "reason-edit-understanding": ["VIEScore_O"],
    "reason-edit-reasoning": ["VIEScore_O"],
}
# Main Results (Comparison on AdvancedEdit-Eval): VIEScore, CLIPScore, PSNR, SSIM, LPIPS.
_INSIGHTEDIT_MAIN = {
    "InstructPix2Pix": [0.342, 19.528, 20.192, 0.694, 0.182],
    "SmartEdit-7B": [0.682, 20.114, 20.115, 0.651, 0.131],
    "InsightEdit": [0.738, 20.395, 21.267, 0.675, 0.112],
    "InsightEdit + AdvancedEdit": [0.831, 21.002, 22.871, 0.716, 0.071],
}
# Reason-Edit Comparison: Understanding VIEScore, Reasoning VIEScore (0-1, as the main table).
_INSIGHTEDIT_REASON_EDIT = {
    "SmartEdit-7B": [0.866, 0.835],
    "InsightEdit": [0.901, 0.893],
    "InsightEdit + AdvancedEdit": [0.934, 0.947],
}
# Ablation Study (IAA Module), printed order PSNR, SSIM, LPIPS, CLIPScore, VIEScore (0-10);
# the rows are marked IAA ✗ / ✓ (the ✓ row is the main table's InsightEdit + AdvancedEdit).
_INSIGHTEDIT_IAA = {
    "InsightEdit (IAA ✗)": [22.348, 0.692, 0.095, 20.652, 7.307],
    "InsightEdit (IAA ✓)": [22.871, 0.716, 0.071, 21.002, 7.545],
}

#: name -> ``{method: {dataset: {metric: value}}}``, InsightEdit's values as printed. The text
#: prints no table of lambda values (the decoupled cross-attention weight), so none is here.
INSIGHTEDIT_TABLES: dict[str, dict[str, dict[str, dict[str, float]]]] = {
    "insightedit-main": _table(_INSIGHTEDIT_MAIN, _INSIGHTEDIT_COLUMNS),
    "insightedit-iaa": _table(_INSIGHTEDIT_IAA, _ABLATION_COLUMNS),
    "insightedit-reason-edit": _table(_INSIGHTEDIT_REASON_EDIT, _REASON_EDIT_COLUMNS),
}

_ADVANCEDEDIT_SCALE = {"CTS": 100, "PSNR": 1, "SSIM": 1, "LPIPS": 1}

#: name -> the multiplier from the suite's raw value to the table's printed number, per metric
#: (absent = 1). VIEScore_O is 0-10 in the suite: 0-1 tables print it x 0.1.
TABLE_SCALES: dict[str, dict[str, float]] = {
    **{name: dict(PAPER_PROTOCOL["scale"]) for name in MGIE_TABLES},
    "insightedit-main": {**_ADVANCEDEDIT_SCALE, "VIEScore_O": 0.1},
    "insightedit-iaa": {**_ADVANCEDEDIT_SCALE, "VIEScore_O": 1},
    "insightedit-reason-edit": {"VIEScore_O": 0.1},
}

TABLE_SOURCES.update(
    {
        "insightedit-main": (
            "InsightEdit main table (comparison on AdvancedEdit-Eval; VIEScore 0-1, CLIPScore as "
            "CTS x 100)"
        ),
        "insightedit-iaa": (
            "InsightEdit ablation of the IAA module (AdvancedEdit-Eval; VIEScore printed 0-10, "
            "and not the main table's VIEScore rescaled: its IAA ✓ row reads 7.545 where the "
            "main table's same model reads 0.831)"
        ),
        "insightedit-reason-edit": (
            "InsightEdit Reason-Edit comparison (Understanding / Reasoning VIEScore, 0-1)"
        ),
    }
)

#: name -> how the paper averaged its numbers (shown under a report's table).
TABLE_AVERAGING: dict[str, str] = {
    **{name: "the paper averages 5 random seeds" for name in MGIE_TABLES},
    **{name: INSIGHTEDIT_PROTOCOL["seeds"] for name in INSIGHTEDIT_TABLES},
    **BENCHMARK_AVERAGING,
}
TABLE_SCALES.update(BENCHMARK_SCALES)
TABLE_SOURCES.update(BENCHMARK_SOURCES)

#: Every published table, by name (``report --published`` choices).
PUBLISHED_TABLES: dict[str, dict[str, dict[str, dict[str, float]]]] = {
    **MGIE_TABLES,
    **INSIGHTEDIT_TABLES,
    **BENCHMARK_TABLES,  # GEdit-Bench, ImgEdit-Bench: metrics.published_benchmarks
}


def published_value(table: str, method: str, dataset: str, metric: str) -> float | None:
    """One published cell at the paper's scale, or None where the paper reports none."""
    return PUBLISHED_TABLES[table].get(method, {}).get(dataset, {}).get(metric)


__all__ = [
    "INSIGHTEDIT_PROTOCOL",
    "INSIGHTEDIT_TABLES",
    "MGIE_TABLES",
    "PAPER_PROTOCOL",
    "PUBLISHED_TABLES",
    "TABLE_AVERAGING",
    "TABLE_SCALES",
    "TABLE_SOURCES",
    "published_value",
]
