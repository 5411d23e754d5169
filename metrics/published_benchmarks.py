"""Published numbers on the current benchmarks (GEdit-Bench, ImgEdit-Bench), as data for
``python -m editbench report --published``.

Every value is copied as printed (the table rows are committed as
``tests/fixtures/published/*.txt``, against which ``tests/datamodules/test_benchmarks.py``
checks these tables), at the printed scale; datasets are the suite's protocol names.

- ``step1x-gedit-en`` / ``step1x-gedit-en-qwen``: Step1X-Edit (Liu et al., arXiv 2504.17761v1)
  Table 2, "Quantitative evaluation on GEdit-Bench-EN": G_SC, G_PQ, G_O by GPT-4.1 and Q_SC,
  Q_PQ, Q_O by Qwen2.5-VL, on the intersection subset (434 instances, dataset
  ``gedit-en-intersection``) and the full set (606, ``gedit-en``), 0-10, as the suite's
  ``VIEScore_SC``, ``VIEScore_PQ``, ``VIEScore_O``. Rows: Instruct-Pix2Pix, MagicBrush, AnyEdit,
  OmniGen, Step1X-Edit, Gemini, Doubao, GPT-4o; no MGIE row. Table 3 (GEdit-Bench-CN) has no
  Instruct-Pix2Pix row and is not here.
- ``imgedit-v1``: ImgEdit (Ye et al., arXiv 2505.20275v1) appendix Table 4, "ImgEdit-Bench Score
  for Each Models with GPT-4o": the basic suite's per-type averages (1-5) as
  ``ImgEdit_<edit_type>`` (:data:`IMGEDIT_TYPES`); its UGE and Fake Score rows belong to other
  suites and are left out. Columns GPT-4o-Image, Step1X-Edit, ImgEdit-E1, UltraEdit, AnySD,
  MagicBrush, Instruct-Pix2Pix; no MGIE.

The Emu Edit paper's table (CLIPdir, CLIPimg, CLIPout, L1, DINO on its test set) was not found
in a source text the suite could check, so no Emu Edit rows are here (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Any

#: ImgEdit's printed category -> the basic suite's edit type (``basic_edit.json``).
IMGEDIT_TYPES = {
    "Addition": "add",
    "Removement": "remove",
    "Replacement": "replace",
    "Attribute Alter": "adjust",
    "Motion Change": "action",
    "Style Transfer": "style",
    "Background Change": "background",
    "Object Extraction": "extract",
    "Hybrid Edit": "compose",
}


def imgedit_metric(edit_type: str) -> str:
    """The result name of an edit type's average judge score (``ImgEdit_add``, ...)."""
    return f"ImgEdit_{edit_type}"


# Step1X-Edit Table 2 (GEdit-Bench-EN): intersection G_SC G_PQ G_O Q_SC Q_PQ Q_O, then full set.
# fmt: off
_GEDIT_EN = {
    "Instruct-Pix2Pix": [3.473, 5.601, 3.631, 4.836, 6.948, 4.655, 3.575, 5.491, 3.684, 4.772, 6.870, 4.576],  # noqa: E501
    "MagicBrush": [4.646, 5.800, 4.578, 5.806, 7.162, 5.632, 4.677, 5.656, 4.518, 5.733, 7.066, 5.536],
    "AnyEdit": [3.177, 5.856, 3.231, 3.583, 6.751, 3.498, 3.178, 5.820, 3.212, 3.438, 6.729, 3.361],
    "OmniGen": [6.070, 5.885, 5.162, 7.022, 6.853, 6.565, 5.963, 5.888, 5.061, 6.900, 6.781, 6.413],
    "Step1X-Edit": [7.183, 6.818, 6.813, 7.380, 7.229, 7.161, 7.091, 6.763, 6.701, 7.332, 7.204, 7.104],  # noqa: E501
    "Gemini": [6.697, 6.638, 6.322, 7.276, 7.306, 6.978, 6.732, 6.606, 6.315, 7.287, 7.315, 6.982],
    "Doubao": [7.004, 7.215, 6.828, 7.417, 7.635, 7.273, 6.916, 7.188, 6.754, 7.382, 7.639, 7.241],
    "GPT-4o": [7.844, 7.592, 7.517, 7.873, 7.690, 7.694, 7.850, 7.620, 7.534, 7.826, 7.689, 7.646],
}
# ImgEdit v1 appendix Table 4: one row per category, one column per model.
_IMGEDIT_MODELS = (
    "GPT-4o-Image", "Step1X-Edit", "ImgEdit-E1", "UltraEdit", "AnySD", "MagicBrush",
    "Instruct-Pix2Pix",
)
_IMGEDIT_V1 = {
    "Addition": [4.65, 3.90, 3.82, 3.63, 3.12, 2.72, 2.29],
    "Removement": [3.81, 2.61, 2.40, 1.71, 2.34, 1.57, 1.49],
    "Replacement": [4.49, 3.45, 2.80, 3.13, 2.71, 1.89, 1.93],
    "Attribute Alter": [4.26, 3.13, 4.04, 3.01, 2.66, 1.47, 1.79],
    "Motion Change": [4.76, 3.43, 3.21, 3.57, 3.31, 1.39, 1.51],
    "Style Transfer": [4.75, 4.44, 4.38, 3.69, 3.27, 2.49, 3.54],
    "Background Change": [4.62, 3.19, 3.38, 3.31, 2.37, 2.03, 1.67],
    "Object Extraction": [2.96, 1.87, 2.55, 2.02, 1.82, 1.31, 1.33],
    "Hybrid Edit": [4.54, 2.52, 2.87, 2.33, 2.07, 1.80, 1.48],
}
# fmt: on

_VIESCORE = ("VIEScore_SC", "VIEScore_PQ", "VIEScore_O")


def _gedit(judge: int) -> dict[str, dict[str, dict[str, float]]]:
    """Table 2 for one judge (0: GPT-4.1, the G_ columns; 1: Qwen2.5-VL, the Q_ columns)."""
    table = {}
    for method, values in _GEDIT_EN.items():
        start = 3 * judge
        table[method] = {
            "gedit-en-intersection": dict(zip(_VIESCORE, values[start : start + 3], strict=True)),
            "gedit-en": dict(zip(_VIESCORE, values[6 + start : 9 + start], strict=True)),
        }
    return table


def _imgedit() -> dict[str, dict[str, dict[str, float]]]:
    table: dict[str, dict[str, dict[str, float]]] = {m: {"imgedit": {}} for m in _IMGEDIT_MODELS}
    for category, values in _IMGEDIT_V1.items():
        for method, value in zip(_IMGEDIT_MODELS, values, strict=True):
            table[method]["imgedit"][imgedit_metric(IMGEDIT_TYPES[category])] = value
    return table


#: name -> ``{method: {dataset: {metric: value}}}``, as printed.
BENCHMARK_TABLES: dict[str, dict[str, dict[str, dict[str, float]]]] = {
    "step1x-gedit-en": _gedit(0),
    "step1x-gedit-en-qwen": _gedit(1),
    "imgedit-v1": _imgedit(),
}

#: name -> multiplier from the suite's raw value to the printed number (VIEScore 0-10 raw).
BENCHMARK_SCALES: dict[str, dict[str, float]] = {
    "step1x-gedit-en": dict.fromkeys(_VIESCORE, 1.0),
    "step1x-gedit-en-qwen": dict.fromkeys(_VIESCORE, 1.0),
    "imgedit-v1": {imgedit_metric(t): 1.0 for t in IMGEDIT_TYPES.values()},
}

BENCHMARK_SOURCES: dict[str, str] = {
    "step1x-gedit-en": (
        "Step1X-Edit (arXiv 2504.17761v1) Table 2, GEdit-Bench-EN, G_SC / G_PQ / G_O by GPT-4.1 "
        "(0-10); intersection subset (434) and full set (606)"
    ),
    "step1x-gedit-en-qwen": (
        "Step1X-Edit (arXiv 2504.17761v1) Table 2, GEdit-Bench-EN, Q_SC / Q_PQ / Q_O by "
        "Qwen2.5-VL (0-10); intersection subset (434) and full set (606)"
    ),
    "imgedit-v1": (
        "ImgEdit (arXiv 2505.20275v1) appendix Table 4, basic suite scored by GPT-4o (1-5, "
        "mean of three scores per image, then per edit type)"
    ),
}

BENCHMARK_AVERAGING: dict[str, str] = {
    "step1x-gedit-en": "the paper's text states no seed count",
    "step1x-gedit-en-qwen": "the paper's text states no seed count",
    "imgedit-v1": "each experiment repeated three times, the mean reported (Sec. 5.1)",
}

#: What the benchmarks' papers say about protocol details the suite records.
BENCHMARK_PROTOCOLS: dict[str, dict[str, Any]] = {
    "gedit": {
        "judge": "GPT-4.1 (G_*) and Qwen2.5-VL (Q_*), VIEScore SC/PQ/O on 0-10 (Table 2)",
        "source_image": "input_image_raw resized to about 512x512 area (generate_image_example.py)",
    },
    "imgedit": {
        "judge": "GPT-4o in basic_bench.py and Table 4 (v1); 1-5 per criterion",
        "resolution": "each model at its native resolution (Sec. 5.1)",
    },
}

__all__ = [
    "BENCHMARK_AVERAGING",
    "BENCHMARK_PROTOCOLS",
    "BENCHMARK_SCALES",
    "BENCHMARK_SOURCES",
    "BENCHMARK_TABLES",
    "IMGEDIT_TYPES",
    "imgedit_metric",
]
