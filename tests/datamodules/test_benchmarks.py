"""The current benchmarks' loaders on fixtures in their released layouts (tests/fixtures/
benchmarks.py), the target-less scoring path (a protocol scored against the input), and the
published GEdit-Bench / ImgEdit-Bench rows against their papers' table lines
(tests/fixtures/published/)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fixtures.benchmarks import emu_image, gedit_image, write_emu_edit, write_gedit, write_imgedit
from fixtures.layouts import pattern
from PIL import Image

from datamodules.emu_edit import EmuEditDataModule
from datamodules.gedit import GEditBenchDataModule
from datamodules.imgedit import ImgEditBenchDataModule
from metrics.evaluation import EditEvaluator
from metrics.protocols import get_protocol
from metrics.published import PUBLISHED_TABLES, TABLE_SCALES, TABLE_SOURCES
from metrics.published_benchmarks import IMGEDIT_TYPES

PUBLISHED = Path(__file__).resolve().parents[1] / "fixtures" / "published"


def native(dm, index: int = 0) -> np.ndarray:
    return dm.datasets["test"][index]["source_native"].permute(1, 2, 0).numpy()


# ----------------------------------------------------------------------------- Emu Edit


@pytest.fixture(scope="module")
def emu_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("emu")
    write_emu_edit(root, num_rows=6, num_shards=2)
    write_emu_edit(root, num_rows=3, num_shards=1, split="validation", start=100)
    return root


def emu(root: Path, tmp_path: Path, **kwargs) -> EmuEditDataModule:
    dm = EmuEditDataModule(
        str(root), resolution=32, num_workers=0, cache_dir=str(tmp_path / "cache"), **kwargs
    )
    dm.setup("test")
    return dm


def test_emu_edit_fixture_has_the_cards_schema(emu_root):
    """The card's dataset_info: 8 columns; Image = struct<bytes: binary, path: string>."""
    schema = pq.read_schema(next((emu_root / "data").glob("test-*.parquet")))
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    expected = {
        "instruction": pa.string(), "image": image, "task": pa.string(), "split": pa.string(),
        "idx": pa.int64(), "hash": pa.string(), "input_caption": pa.string(),
        "output_caption": pa.string(),
    }  # fmt: skip
    assert {f.name: f.type for f in schema} == expected


def test_emu_edit_reads_the_test_shards(emu_root, tmp_path):
    dm = emu(emu_root, tmp_path)
    records = dm.datasets["test"].records
    assert [r["id"] for r in records] == [f"emu_edit/{i}" for i in range(6)]
    assert dm.published_counts == {"test": 3589} and dm.protocol == "emu-edit"
    sample = dm.datasets["test"][4]
    assert sample["instruction"] == "make the 4th square brighter"
    assert sample["source_caption"] == "a pattern number 4"
    assert sample["goal_caption"] == "a brighter pattern number 4"
    assert "target" not in sample and "target_native" not in sample
    np.testing.assert_array_equal(native(dm, 4), emu_image(4))  # PNG: lossless, native size
    assert sample["source"].shape == (3, 32, 32)
    assert records[4]["task"] == "add"
    assert dm.prediction_path("emu_edit/4") == "4.png"


def test_emu_edit_validation_split_and_only_test(emu_root, tmp_path):
    dm = emu(emu_root, tmp_path, emu_split="validation")
    assert [r["id"] for r in dm.datasets["test"].records] == [
        f"emu_edit/{i}" for i in (100, 101, 102)
    ]
    assert dm.published_counts == {"test": 2022}
    with pytest.raises(ValueError, match="only a 'test' split"):
        dm.build_records("train")


def test_emu_edit_skips_identical_captions_only_when_asked(tmp_path):
    root = write_emu_edit(tmp_path / "emu", num_rows=6, num_shards=2, identical_captions=(1, 4))
    kept = emu(root, tmp_path / "a")
    assert len(kept.datasets["test"].records) == 6 and kept.skipped_rows == []
    dm = emu(root, tmp_path / "b", skip_identical_captions=True)
    assert [r["id"] for r in dm.datasets["test"].records] == [
        f"emu_edit/{i}" for i in (0, 2, 3, 5)
    ]
    assert dm.skipped_rows == ["emu_edit/1", "emu_edit/4"]
    assert dm.published_counts is None  # no longer the card's count


def test_emu_edit_bad_row_is_named(emu_root, tmp_path):
    root = tmp_path / "bad"
    write_emu_edit(root, num_rows=4, num_shards=1)
    (path,) = (root / "data").glob("test-*.parquet")
    table = pq.read_table(path)
    texts = table.column("output_caption").to_pylist()
    texts[2] = " "
    column = table.schema.get_field_index("output_caption")
    pq.write_table(table.set_column(column, "output_caption", pa.array(texts)), path)
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(path))}, row 2: column 'output_caption'"
    ):
        emu(root, tmp_path)


def test_emu_edit_missing_column_and_files(tmp_path):
    root = tmp_path / "nocol"
    write_emu_edit(root, num_rows=2, num_shards=1)
    (path,) = (root / "data").glob("*.parquet")
    pq.write_table(pq.read_table(path).drop_columns(["hash"]), path)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['hash'\]"):
        emu(root, tmp_path)
    with pytest.raises(FileNotFoundError, match="no Emu Edit parquet files"):
        emu(tmp_path / "empty", tmp_path)


# ----------------------------------------------------------------------------- GEdit-Bench


@pytest.fixture(scope="module")
def gedit_root(tmp_path_factory) -> Path:
    return write_gedit(tmp_path_factory.mktemp("gedit") / "GEdit-Bench", num_keys=4)


@pytest.mark.parametrize(
    ("language", "subset", "protocol", "keys"),
    [
        ("en", "full", "gedit-en", [0, 1, 2, 3]),
        ("cn", "intersection", "gedit-cn-intersection", [0, 2]),
        ("all", "full", "gedit", [0, 1, 2, 3]),
    ],
)
def test_gedit_languages_and_subsets(gedit_root, language, subset, protocol, keys):
    dm = GEditBenchDataModule(
        str(gedit_root), resolution=32, num_workers=0, language=language, subset=subset
    )
    dm.setup("test")
    ids = [r["id"] for r in dm.datasets["test"].records]
    tasks = ("background_change", "color_alter", "style_change")
    languages = ["en", "cn"] if language == "all" else [language]
    expected = [f"gedit/{tasks[k % 3]}/{lang}/{k:04x}abcd" for k in keys for lang in languages]
    assert ids == expected
    assert dm.protocol == protocol and get_protocol(protocol).judge == "gedit"
    sample = dm.datasets["test"][0]
    assert sample["instruction"] == ("change style 0" if languages[0] == "en" else "改变风格 0")
    assert "target" not in sample


def test_gedit_source_column_and_output_layout(gedit_root):
    raw = GEditBenchDataModule(str(gedit_root), resolution=32, num_workers=0)
    shown = GEditBenchDataModule(
        str(gedit_root), resolution=32, num_workers=0, source_column="input_image"
    )
    for dm in (raw, shown):
        dm.setup("test")
    np.testing.assert_array_equal(native(raw, 1), gedit_image(1, raw=True))  # 48x40
    np.testing.assert_array_equal(native(shown, 1), gedit_image(1, raw=False))  # 32x32
    assert raw.published_counts == {"test": 606}
    path = raw.prediction_path("gedit/color_alter/en/0001abcd")
    assert path == "fullset/color_alter/en/0001abcd.png"


def test_gedit_unknown_language_is_named(tmp_path):
    import datasets

    root = write_gedit(tmp_path / "g", num_keys=2)
    (path,) = (root / "train").glob("*.arrow")
    table = datasets.Dataset.from_file(str(path))
    languages = list(table["instruction_language"])
    languages[3] = "fr"
    bad = table.remove_columns("instruction_language").add_column("instruction_language", languages)
    bad.to_parquet(str(tmp_path / "bad.parquet"))
    dm = GEditBenchDataModule(str(tmp_path), files="bad.parquet", cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"bad\.parquet, row 3: instruction_language 'fr'"):
        dm.setup("test")


# ----------------------------------------------------------------------------- ImgEdit-Bench


def test_imgedit_reads_basic_edit_json(tmp_path):
    root = write_imgedit(tmp_path / "img", num_entries=5)
    dm = ImgEditBenchDataModule(str(root), resolution=32, num_workers=0)
    dm.setup("test")
    entries = json.loads((root / "basic_edit.json").read_text())
    records = dm.datasets["test"].records
    assert [r["id"] for r in records] == [f"imgedit/{k}" for k in entries]  # the file's order
    assert [r["edit_type"] for r in records] == [e["edit_type"] for e in entries.values()]
    assert records[0]["source"] == records[1]["source"]  # two edits of one image
    sample = dm.datasets["test"][2]
    assert sample["instruction"] == "edit number 2"
    image = np.asarray(Image.open(root / entries["986"]["id"]).convert("RGB"))
    np.testing.assert_array_equal(native(dm, 2), image)  # decoded as stored
    assert np.abs(image.astype(int) - pattern(3001, (40, 48))).mean() < 3  # the JPEG of it
    assert dm.prediction_path("imgedit/986") == "986.png"
    assert dm.published_counts == {"test": 737} and dm.protocol == "imgedit"


def test_imgedit_old_type_name_and_bad_entries(tmp_path):
    root = write_imgedit(tmp_path / "img", num_entries=3)
    path = root / "basic_edit.json"
    entries = json.loads(path.read_text())
    first = next(iter(entries))
    entries[first]["edit_type"] = "alter"  # the first release's name of "adjust"
    path.write_text(json.dumps(entries))
    dm = ImgEditBenchDataModule(str(root), num_workers=0)
    assert dm.build_records("test")[0]["edit_type"] == "adjust"
    entries[first]["edit_type"] = "teleport"
    path.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=rf"key '{first}': unknown edit_type 'teleport'"):
        dm.build_records("test")
    del entries[first]["prompt"]
    path.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=rf"key '{first}': missing or empty 'prompt'"):
        dm.build_records("test")


# ----------------------------------------------------------------------------- scoring


def test_source_reference_scores_the_edit_against_its_input():
    """A ``reference: source`` protocol: L1 = mean |edit - input| on [0, 1], at the input's
    native size when the batch carries it; no copy baseline (it would be 0 by definition)."""
    gen = torch.Generator().manual_seed(0)
    source = torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1
    preds = torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1
    evaluator = EditEvaluator(get_protocol("emu-edit"), ["L1"])
    assert len(evaluator.copy_metrics["all"]) == 0
    evaluator.update({"id": ["a", "b"], "source": source, "instruction": ["x", "y"]}, preds)
    results = evaluator.compute()
    expected = np.abs((preds.numpy() + 1) / 2 - (source.numpy() + 1) / 2).mean()
    assert results == {"test/L1": pytest.approx(float(expected), abs=1e-6)}

    # Native: the prediction (saved as 8 bits) is compared with the stored input image.
    evaluator = EditEvaluator(get_protocol("gedit-en"))
    stored = torch.from_numpy(pattern(5, (8, 8))).permute(2, 0, 1).contiguous()
    batch = {"id": ["c"], "source": source[:1], "source_native": [stored], "instruction": ["z"]}
    evaluator.update(batch, preds[:1])
    quantised = ((preds[0] + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    expected = (quantised.double() - stored.double()).abs().mean() / 255
    assert evaluator.compute()["test/L1"] == pytest.approx(float(expected), abs=1e-6)


def test_target_protocols_keep_their_reference():
    assert get_protocol("magicbrush").reference == "target"
    assert get_protocol("emu-edit").reference == "source"
    with pytest.raises(ValueError, match="reference must be one of"):
        type(get_protocol("emu-edit"))("x", ("L1",), reference="caption")


# ----------------------------------------------------------------------------- published


def table_lines(name: str) -> dict[str, list[float]]:
    """``{label: numbers}`` of a fixture's numeric lines (label = the text before them)."""
    rows = {}
    for line in (PUBLISHED / name).read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([^#\d].*?)\s+((?:\d+\.\d+\s*)+)$", line)
        if match:
            rows[match.group(1)] = [float(v) for v in match.group(2).split()]
    return rows


def test_gedit_rows_are_step1x_table_2():
    rows = table_lines("step1x_edit_table2.txt")
    assert len(rows) == 8 and "MGIE" not in rows
    names = ("VIEScore_SC", "VIEScore_PQ", "VIEScore_O")
    for judge, table in ((0, "step1x-gedit-en"), (1, "step1x-gedit-en-qwen")):
        published = PUBLISHED_TABLES[table]
        assert set(published) == set(rows)
        for method, values in rows.items():
            got = published[method]
            assert [got["gedit-en-intersection"][n] for n in names] == values[
                3 * judge : 3 * judge + 3
            ]
            assert [got["gedit-en"][n] for n in names] == values[6 + 3 * judge : 9 + 3 * judge]
        assert TABLE_SCALES[table]["VIEScore_O"] == 1.0 and "Table 2" in TABLE_SOURCES[table]
    assert (
        PUBLISHED_TABLES["step1x-gedit-en"]["Instruct-Pix2Pix"]["gedit-en"]["VIEScore_O"] == 3.684
    )


def test_imgedit_rows_are_table_4_of_v1():
    rows = table_lines("imgedit_v1_table4.txt")
    models = ["GPT-4o-Image", "Step1X-Edit", "ImgEdit-E1", "UltraEdit", "AnySD", "MagicBrush",
              "Instruct-Pix2Pix"]  # fmt: skip
    published = PUBLISHED_TABLES["imgedit-v1"]
    assert list(published) == models
    for category, edit_type in IMGEDIT_TYPES.items():
        column = [published[m]["imgedit"][f"ImgEdit_{edit_type}"] for m in models]
        assert column == rows[category]
    assert published["Instruct-Pix2Pix"]["imgedit"]["ImgEdit_style"] == 3.54
