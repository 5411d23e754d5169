"""MA5k-Req (MIT-Adobe FiveK with language requests, Shi et al. 2020) in its native layout.

```
root/
  FiveK.json                               [{input: "<id>_O.jpg", output: "<id>_[A-E].jpg", request}]
  images/<name>                            (`images_dir`)
  annotations/{train,val,test}_sess_1.json (`annotations_dir`)
```

Each FiveK.json record is one sample: the input photo, one of the five experts' retouches
(A-E) and the request a worker wrote for it. The split files assign photos to splits ("by
image", so all retouches of a photo are in one split). The LGIE loader reads a split file as a
list of records like FiveK.json's; that is the form used here. A split file may also list
photos instead, as strings (an input file name, its stem, or the image id: the stem without
its trailing `_O`/`O`); each then stands for every FiveK.json record of that photo, in
FiveK.json order, and FiveK.json is only read in that case. Entries of both kinds may mix.

Published counts (session 1): 17,325 / 2,475 / 4,950 samples for train / val / test.

Requests are global photo adjustments (brightness, contrast, tone...): samples have no `mask`.
Sample id: `ma5k/<output stem>`.
"""

from __future__ import annotations

from pathlib import Path

from .base import EditDataModule, read_json_list
from .gier import is_missing

PUBLISHED_SAMPLES = {"train": 17325, "val": 2475, "test": 4950}
MA5K_REQUIRED_KEYS = ("input", "output", "request")


def image_id(input_name: str) -> str:
    """The photo id of an input file name: "0001_O.jpg" or "0001O.jpg" → "0001"."""
    stem = Path(input_name).stem
    if stem.endswith("_O"):
        return stem[:-2]
    return stem[:-1] if stem.endswith("O") else stem


def _check_record(record: object, where: str) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object or a string")
    for key in MA5K_REQUIRED_KEYS:
        if key not in record or is_missing(record[key]):
            raise ValueError(f"{where}: missing required key {key!r}")
    return record


class MA5kDataModule(EditDataModule):
    """MA5k-Req global photo-retouching requests (layout and counts: module docstring).

    Args:
        root: MA5k folder (holding `FiveK.json`, `images/`, `annotations/`).
        resolution: side of the square crops fed to the model.
        images_dir: folder of the input/output images, relative to `root` (or absolute).
        annotations_dir: folder of the split files, relative to `root`.
        session: annotation session of the split files (`{split}_sess_{session}.json`).
        **kwargs: the shared :class:`EditDataModule` fields (batch sizes, workers, crop,
            `max_samples`, `on_bad_sample`, `predict_split`, `expressive_path`, ...).
    """

    protocol = "ma5k"
    published_counts = PUBLISHED_SAMPLES

    def __init__(
        self,
        root: str,
        resolution: int = 256,
        images_dir: str = "images",
        annotations_dir: str = "annotations",
        session: int = 1,
        **kwargs,
    ) -> None:
        super().__init__(root=root, resolution=resolution, **kwargs)
        self.images_dir = images_dir
        self.annotations_dir = annotations_dir
        self.session = session
        self._by_photo: dict[str, list[dict]] | None = None

    def split_path(self, split: str) -> Path:
        return Path(self.root) / self.annotations_dir / f"{split}_sess_{self.session}.json"

    def photos(self) -> dict[str, list[dict]]:
        """FiveK.json records grouped by image id (read once), for split files listing photos."""
        if self._by_photo is None:
            path = Path(self.root) / "FiveK.json"
            by_photo: dict[str, list[dict]] = {}
            for row, record in enumerate(read_json_list(path, "MA5k FiveK.json")):
                record = _check_record(record, f"{path}, row {row}")
                by_photo.setdefault(image_id(str(record["input"])), []).append(record)
            self._by_photo = by_photo
        return self._by_photo

    def build_records(self, split: str) -> list[dict]:
        """One record per (input, output, request) of `split`.

        Raises FileNotFoundError for a missing split file (or FiveK.json when the split lists
        photos) and ValueError naming the file and row for a malformed entry, an unknown
        photo or an output listed twice.
        """
        path = self.split_path(split)
        entries = read_json_list(path)
        images = Path(self.root) / self.images_dir
        seen: dict[str, int] = {}
        records: list[dict] = []
        for row, entry in enumerate(entries):
            where = f"{path}, row {row}"
            if isinstance(entry, str):
                photo = image_id(entry)
                if photo not in self.photos():
                    raise ValueError(f"{where}: photo {entry!r} is not in FiveK.json")
                items = self.photos()[photo]
            else:
                items = [_check_record(entry, where)]
            for item in items:
                stem = Path(str(item["output"])).stem
                if stem in seen:
                    raise ValueError(f"{where}: output {stem!r} already listed in row {seen[stem]}")
                seen[stem] = row
                records.append(
                    {
                        "id": f"ma5k/{stem}",
                        "source": str(images / str(item["input"])),
                        "target": str(images / str(item["output"])),
                        "instruction": str(item["request"]),
                    }
                )
        return records
