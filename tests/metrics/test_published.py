"""The MGIE numbers of metrics.published against the paper's table rows.

The rows are a committed excerpt (``fixtures/mgie_tables.txt``: each table's numeric lines as
the paper's text prints them), so the check runs wherever the repository is, without the paper.
"""

from __future__ import annotations

import re
from pathlib import Path

from metrics.published import MGIE_TABLES

FIXTURE = Path(__file__).with_name("fixtures") / "mgie_tables.txt"

_ALL = [
    ("evr", "L1"), ("evr", "DINO"), ("evr", "CVS"),
    ("gier", "L1"), ("gier", "SSIM"), ("gier", "CVS"),
    ("ma5k", "L1"), ("ma5k", "SSIM"), ("ma5k", "LPIPS"),
    ("magicbrush", "L1"), ("magicbrush", "DINO"), ("magicbrush", "CVS"), ("magicbrush", "CTS"),
]  # fmt: skip
_MA5K_MB = _ALL[6:]
_NO_L1 = [c for c in _MA5K_MB if c[1] != "L1"]
_FID = [(d, "FID") for d in ("evr", "gier", "ma5k", "magicbrush")]


def sections() -> dict[str, list[tuple[str, list[float]]]]:
    """``{section: [(label, values), ...]}``, continuation labels completed as the paper prints
    them: ``+ Lins`` after ``LGIE - Lins`` is ``LGIE + Lins``, ``+ EncLLaMA`` after
    ``InsPix2Pix`` is ``InsPix2Pix + EncLLaMA``, ``MGIE`` under ``FZ LGIE`` is ``FZ MGIE``, a
    size (``13B``) under ``LGIE 7B`` is ``LGIE 13B``."""
    out: dict[str, list[tuple[str, list[float]]]] = {}
    rows: list = []
    base = arch = ""
    for line in FIXTURE.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        header = re.match(r"^\[(\w+)\]", line)
        if header:
            rows = out.setdefault(header.group(1), [])
            base = arch = ""
            continue
        match = re.match(r"^(\S.*?)\s+((?:-?\d+\.\d+\s*)+)$", line)
        if not match:  # a label alone (MGIE above its sizes)
            base = line.split()[0]
            continue
        label, values = match.group(1), [float(v) for v in match.group(2).split()]
        first = label.split()[0]
        if first in ("FZ", "FT", "E2E"):
            arch = first
        elif arch and label == "MGIE":
            label = f"{arch} MGIE"
        if label.startswith("+") or label[0].isdigit():
            label = f"{base} {label}"
        else:
            base = first
        rows.append((label, values))
    return out


def flat(table: str, method: str, columns: list[tuple[str, str]]) -> list[float]:
    return [MGIE_TABLES[table][method][d][m] for d, m in columns]


def test_published_numbers_match_the_paper_rows():
    rows = sections()
    checks = {
        "table1": ("mgie-zero-shot", _ALL),
        "described": ("mgie-zero-shot", _ALL),
        "table2": ("mgie-fine-tuned", _ALL),
        "table3": ("mgie-ablation", _MA5K_MB),
        "lins": ("mgie-lins", _NO_L1),
        "table5": ("mgie-encoders", _NO_L1),
        "table6": ("mgie-lm-size", _NO_L1),
    }
    checked = 0
    for section, (table, columns) in checks.items():
        assert rows[section], section
        for label, values in rows[section]:
            assert flat(table, label, columns) == values, (section, label)
            checked += len(values)
    for label, values in rows["fid"]:
        assert flat("mgie-zero-shot", label, _FID) + flat("mgie-fine-tuned", label, _FID) == values
        checked += len(values)
    assert [label for label, _ in rows["table6"]] == [
        "InsPix2Pix", "LGIE 7B", "LGIE 13B", "MGIE 6.7B", "MGIE 7B", "MGIE 13B"
    ]  # fmt: skip
    # every row of every table: 3+3+4 rows of 13, 7 of 7, 5+6+6 of 5, 3 of 8
    assert checked == 10 * 13 + 7 * 7 + 17 * 5 + 3 * 8
    # and every method published.py holds for these tables was checked
    for section, (table, _) in checks.items():
        assert {label for label, _ in rows[section]} <= set(MGIE_TABLES[table])
    assert {label for s in ("table1", "described") for label, _ in rows[s]} == set(
        MGIE_TABLES["mgie-zero-shot"]
    )
