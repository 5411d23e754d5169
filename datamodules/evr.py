"""EVR (the image-editing corpus of "Expressing Visual Relationships via Language", Tan et al.).

Native layout::

    root/train.json  root/valid.json  root/test.json   [{img0, img1, sents, uid}, ...]
    root/<images_dir>/<img0>, root/<images_dir>/<img1>   source and edited image

`img0` is the image to edit, `img1` the edited image, `sents` the editing requests (one per
pair in train, three in valid/test: 3,061 / 383 / 495 pairs). The release's README documents
the JSON fields but not where the separately downloaded image pairs are unpacked, so the
folder is configurable (`images_dir`, relative to root; an absolute `img0`/`img1` is used as
it is).

Pairs of unequal size: 94 EVR pairs (those whose GIER counterpart is absent from GIER's
`shapeAlign` index) have an edited image of another size than the input. As for GIER, the
edited image is resized to the input's size with T2ONet's rule (bilinear, as `cv2.resize`;
`datamodules.native.align_to_source`). The release's own code (a captioner) squashes every
image independently to 224x224 (`script/build_pixel_hdf5.py`, `Resize((224, 224))`), which
also puts the two in one frame; scoring an edit needs the target in the input's frame.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import EditDataModule, EditDataset, SkippedSample, read_json_list

#: File of each split (the split called "val" is the release's `valid.json`).
SPLIT_FILES = {"train": "train.json", "val": "valid.json", "test": "test.json"}
RECORD_KEYS = ("img0", "img1", "sents", "uid")


class EVRDataset(EditDataset):
    """EditDataset that also passes the record's `references` (a list of all sentences).

    The base dataset keeps only the contract's text fields; EVR's val/test samples carry every
    reference sentence for the caption metrics. `collate` keeps a list-valued field as a list
    (one list of sentences per sample).
    """

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:
        sample = super().__getitem__(index)
        references = self.records[index].get("references")
        if isinstance(sample, dict) and references is not None:
            sample["references"] = list(references)
        return sample


class EVRDataModule(EditDataModule):
    """EVR editing pairs with their editing requests.

    - Train (`train.json`): one sample per sentence, id `evr/<uid>/<k>` (k = the sentence's
      position in `sents`, from 0).
    - Val (`valid.json`) and test (`test.json`): one sample per pair, id `evr/<uid>`,
      instruction = `sents[eval_sentence]`, and `references` = all of `sents` (a list of
      strings; batches hold one list per sample).

    Records are validated when a split is indexed: a missing file, invalid JSON, a missing key,
    an empty `sents`, a duplicate `uid` or an `eval_sentence` beyond a pair's sentences raise
    an error naming the file and the row. Image problems raise BadSampleError at access.

    Args:
        root: dataset folder with `train.json`, `valid.json`, `test.json`.
        images_dir: folder of the image files, relative to `root` ("" or "." for root itself).
        eval_sentence: which sentence of a val/test pair is the instruction (0 = the first).
        **kwargs: the shared :class:`EditDataModule` fields (resolution, batch sizes, workers,
            crop/flip, `max_samples`, `on_bad_sample`, `expressive_path`, ...).
    """

    protocol = "evr"
    #: Samples per split in the public release (train: one per sentence; val/test: one per pair).
    published_counts = {"train": 3061, "val": 383, "test": 495}
    dataset_class = EVRDataset

    def __init__(
        self,
        root: str,
        images_dir: str = "images",
        eval_sentence: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(root=root, **kwargs)
        if eval_sentence < 0:
            raise ValueError(f"eval_sentence must be >= 0, got {eval_sentence}")
        self.images_dir = images_dir
        self.eval_sentence = eval_sentence

    def read_split(self, split: str) -> list[dict]:
        """The validated rows of `split`'s JSON file."""
        if split not in SPLIT_FILES:
            raise ValueError(f"unknown split {split!r} (train, val or test)")
        path = Path(self.root) / SPLIT_FILES[split]
        rows = read_json_list(path, f"EVR {split} file")
        seen: dict[str, int] = {}
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ValueError(f"{path}, row {i}: expected a JSON object")
            for key in RECORD_KEYS:
                if key not in row:
                    raise ValueError(f"{path}, row {i}: missing required key {key!r}")
            sents = row["sents"]
            if (
                not isinstance(sents, list)
                or not sents
                or not all(isinstance(s, str) for s in sents)
            ):
                raise ValueError(f"{path}, row {i}: 'sents' must be a non-empty list of strings")
            uid = str(row["uid"])
            if uid in seen:
                raise ValueError(f"{path}, rows {seen[uid]} and {i}: duplicate uid {uid!r}")
            seen[uid] = i
            if split != "train" and self.eval_sentence >= len(sents):
                raise ValueError(
                    f"{path}, row {i}: eval_sentence={self.eval_sentence} but uid {uid!r} has "
                    f"{len(sents)} sentence(s)"
                )
        return rows

    def build_records(self, split: str) -> list[dict]:
        """Records of `split` (see the class docstring)."""
        images = Path(self.root) / self.images_dir
        records = []
        for row in self.read_split(split):
            uid = str(row["uid"])
            paths = {"source": str(images / row["img0"]), "target": str(images / row["img1"])}
            if split == "train":
                for k, sentence in enumerate(row["sents"]):
                    records.append({"id": f"evr/{uid}/{k}", **paths, "instruction": sentence})
            else:
                records.append(
                    {
                        "id": f"evr/{uid}",
                        **paths,
                        "instruction": row["sents"][self.eval_sentence],
                        "references": list(row["sents"]),
                    }
                )
        return records
