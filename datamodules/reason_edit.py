"""Reason-Edit, SmartEdit's evaluation set (Huang et al., "SmartEdit: Exploring Complex
Instruction-based Image Editing with Multimodal Large Language Models", CVPR 2024, arXiv
2312.06739), read in the folder layout its release's scripts read.

The data is only on Google Drive (linked from ``TencentARC/SmartEdit``'s README, "put it in file
``dataset``"); its layout is fixed by the release's ``test/DS_SmartEdit_test.py`` (inference)
and ``test/metrics_evaluation.py`` (metrics), at the repository's head (commit a65f126):

- Six scenario folders. The five *understanding* ones, ``1-Left-Right``, ``2-Relative-Size``,
  ``3-Mirror``, ``4-Color``, ``5-Multiple-Objects``, are found by walking the benchmark folder
  (``os.walk``) for directories whose name ends with those names; the *reasoning* one is
  ``<root>/6-Reasoning`` (the inference script; the metrics script's walk looks for a name
  ending in ``Reasoning-231115`` but then only scores a folder ending in ``6-Reasoning``, so as
  released it scores no reasoning folder).
- In each folder: the input images ``*.png`` and the edit-region masks ``*_mask.jpg`` (one per
  image; the maintainers, issue #27: the masks are not used in inference, only to compute the
  metrics on the target editing area), each list sorted by path, and one instruction file,
  line ``i`` for the ``i``-th image: ``Left_Right_text.txt``, ``Size_text.txt``,
  ``Mirror_text.txt``, ``Color_text.txt``, ``MultipleObjects_text.txt``, ``Reason_test.txt``.
  A line is ``<instruction> CLIP: <text>``: the instruction is the part before ``CLIP: ``
  (right-stripped), the text after it is what the metrics script scores the edit's CLIP
  similarity against (the edited object as it should look).
- There are no ground-truth edited images.

Samples: ``id`` = ``reason-edit/<scenario>/<png stem>``, ``source`` (the png), ``mask`` (the
jpg; 1 = edit region), ``instruction``, ``goal_caption`` = the CLIP text and ``category`` =
the scenario folder (``1-Left-Right``, ...). ``scenarios`` picks the five understanding folders
(protocol ``reason-edit-understanding``) or ``6-Reasoning`` (``reason-edit-reasoning``), the
two columns of InsightEdit's Reason-Edit comparison (``report --published
insightedit-reason-edit``). The protocols score the release's own rule (metrics/protocols.py
``REASON_EDIT_NOTES``, metrics/masked_release.py).

Errors name the file and line (an instruction line without ``CLIP: ``, an empty instruction or
CLIP text, fewer lines than images) or the folder (a missing scenario folder or instruction
file, several folders for one scenario, no images, images and masks that do not pair up).
Lines after the last image are ignored as the release ignores them (a warning names them).
Scoring frame (``metrics_size``, default 256 = the release's ``metrics_size``): evaluation
samples carry the images the release's ``metrics_evaluation.py`` compares, read with PIL as it
reads them: ``source_native`` = the input ``convert("RGB")`` resized to 256x256 with
``Image.Resampling.BICUBIC``, ``mask_grey_native`` = the ``*_mask.jpg`` ``convert("L")``
resized with NEAREST (uint8 grey levels 0-255, JPEG edges kept: the release weighs the
background by ``1 - mask/255`` and boxes the mask's nonzero pixels) and ``mask_native`` = its
``>= 128`` (the suite's binary mask). The evaluator's native scoring then resizes the model's
8-bit edit straight to 256 with PIL bicubic, as the release reads the edit PNG, and the metrics
of metrics/masked_release.py score them. ``metrics_size=None`` keeps the native sizes (the
metrics then resize to 256 themselves, after the edit's resize to the native size). The model
input is the whole image squashed (``eval_resize="resize"``, the release's ``is_resize``).
``prediction_path`` writes a ``predict`` run in the release's output layout
(``<Scenario>_metrics_<k>/<NNNN>.png``, numbered from 1 in the sorted order of the inputs),
which ``metrics_evaluation.py`` reads back in sorted order.
"""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from PIL import Image

from metrics.protocols import REASON_EDIT_PROTOCOLS

from .base import BadSampleError, EditDataModule, EditDataset, SkippedSample
from .hf_table import check_unique

log = logging.getLogger(__name__)

DATASET = "reason-edit"
#: The release's separator between the instruction and the CLIP text on a line.
CLIP_SEPARATOR = "CLIP: "
IMAGE_GLOB = "*.png"
MASK_GLOB = "*_mask.jpg"


class Scenario(NamedTuple):
    """A scenario folder of the release: its kind, instruction file and the folder
    ``DS_SmartEdit_test.py`` writes the edits scored by ``metrics_evaluation.py`` into."""

    kind: str
    text_file: str
    output_dir: str


#: Folder name -> scenario, in the release's order.
SCENARIOS: dict[str, Scenario] = {
    "1-Left-Right": Scenario("understanding", "Left_Right_text.txt", "LeftRight_metrics_1"),
    "2-Relative-Size": Scenario("understanding", "Size_text.txt", "RelativeSize_metrics_2"),
    "3-Mirror": Scenario("understanding", "Mirror_text.txt", "Mirror_metrics_3"),
    "4-Color": Scenario("understanding", "Color_text.txt", "Color_metrics_4"),
    "5-Multiple-Objects": Scenario(
        "understanding", "MultipleObjects_text.txt", "MultipleObjects_metrics_5"
    ),
    "6-Reasoning": Scenario("reasoning", "Reason_test.txt", "Reasoning_metrics_1"),
}
KINDS = tuple(REASON_EDIT_PROTOCOLS)  # "understanding", "reasoning"


class InstructionLine(NamedTuple):
    instruction: str
    clip_text: str


def read_instructions(path: Path, num_images: int) -> list[InstructionLine]:
    """The first ``num_images`` lines of a scenario's instruction file, split as the release
    splits them; errors name the file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"Reason-Edit instruction file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from err
    lines = text.split("\n")  # readlines() without the newlines
    if lines[-1] == "":
        lines.pop()
    if len(lines) < num_images:
        raise ValueError(
            f"{path}: {len(lines)} instruction line(s) for {num_images} images "
            f"({IMAGE_GLOB} in {path.parent}); line i is the i-th image in sorted order"
        )
    extra = [n for n, line in enumerate(lines[num_images:], start=num_images + 1) if line.strip()]
    if extra:
        log.warning(
            "%s: lines %s come after the last of the %d images and are ignored (as the release "
            "ignores them)",
            path,
            ", ".join(map(str, extra)),
            num_images,
        )
    out = []
    for lineno, line in enumerate(lines[:num_images], start=1):
        if CLIP_SEPARATOR not in line:
            raise ValueError(
                f"{path}, line {lineno}: no {CLIP_SEPARATOR.strip()!r} text (a line is "
                f"'<instruction> {CLIP_SEPARATOR}<text>'): {line[:80]!r}"
            )
        parts = line.split(CLIP_SEPARATOR)
        instruction, clip_text = parts[0].rstrip(), parts[1].strip()  # the release's [0], [1]
        for name, value in (("instruction", instruction), ("CLIP text", clip_text)):
            if not value.strip():
                raise ValueError(f"{path}, line {lineno}: empty {name}: {line[:80]!r}")
        out.append(InstructionLine(instruction, clip_text))
    return out


def sorted_files(folder: Path, pattern: str) -> list[Path]:
    """``sorted(glob.glob(f"{folder}/{pattern}"))`` as the release lists them."""
    return [Path(p) for p in sorted(glob.glob(os.path.join(glob.escape(str(folder)), pattern)))]


def find_scenario_folder(root: Path, name: str) -> Path:
    """``6-Reasoning`` is ``root / name`` (the inference script); an understanding folder is the
    one directory under ``root`` whose name ends with ``name`` (the scripts' ``os.walk``)."""
    if SCENARIOS[name].kind == "reasoning":
        folder = root / name
        if not folder.is_dir():
            raise FileNotFoundError(f"Reason-Edit scenario folder not found: {folder}")
        return folder
    found = sorted(
        Path(parent) / d for parent, dirs, _ in os.walk(root) for d in dirs if d.endswith(name)
    )
    if not found:
        raise FileNotFoundError(f"Reason-Edit: no folder ending in {name!r} under {root}")
    if len(found) > 1:
        raise ValueError(
            f"Reason-Edit: {len(found)} folders ending in {name!r} under {root}: "
            f"{', '.join(map(str, found))}; keep one"
        )
    return found[0]


def scenario_records(folder: Path, name: str) -> list[dict]:
    """The records of one scenario folder (images, masks and instruction lines paired in
    sorted order, as the release pairs them)."""
    images = sorted_files(folder, IMAGE_GLOB)
    masks = sorted_files(folder, MASK_GLOB)
    if not images:
        raise ValueError(f"Reason-Edit: no {IMAGE_GLOB} images in {folder}")
    if len(masks) != len(images):
        raise ValueError(
            f"Reason-Edit: {folder} has {len(images)} images ({IMAGE_GLOB}) but {len(masks)} "
            f"masks ({MASK_GLOB}); the release pairs them one to one in sorted order"
        )
    unnamed = [m.name for i, m in zip(images, masks, strict=True) if m.stem != f"{i.stem}_mask"]
    if unnamed:  # the release pairs by order alone; a mask named otherwise may be misplaced
        log.warning(
            "%s: %d mask(s) are not named <image>_mask.jpg after the image they pair with in "
            "sorted order (e.g. %s); paired by order, as the release does",
            folder,
            len(unnamed),
            unnamed[0],
        )
    lines = read_instructions(folder / SCENARIOS[name].text_file, len(images))
    return [
        {
            "id": f"{DATASET}/{name}/{image.stem}",
            "source": str(image),
            "mask": str(mask),
            "instruction": line.instruction,
            "goal_caption": line.clip_text,
            "category": name,
            "index": index,
        }
        for index, (image, mask, line) in enumerate(zip(images, masks, lines, strict=True))
    ]


#: The release's ``metrics_size``: input, edit and mask are compared at 256x256.
METRICS_SIZE = 256
#: The batch key of the release's grey mask (read by metrics/masked_release.py).
MASK_GREY_KEY = "mask_grey_native"


def read_pil(path: str, mode: str, size: int | None = None, resample=None) -> torch.Tensor:
    """``Image.open(path).convert(mode)``, resized to ``size`` x ``size`` with ``resample`` when
    given, as uint8 ``[C, H, W]`` (the release reads and resizes its images this way)."""
    with Image.open(path) as opened:
        image = opened.convert(mode)
    if size is not None:
        image = image.resize((size, size), resample=resample)
    array = np.asarray(image)
    return torch.from_numpy(array.reshape(*array.shape[:2], -1).copy()).permute(2, 0, 1)


class ReasonEditDataset(EditDataset):
    """Evaluation samples in the release's scoring frame (module docstring): ``source_native``
    and ``mask_native`` replaced by the PIL-read input and mask at ``metrics_size`` (None: native
    size), ``mask_grey_native`` added."""

    def __init__(self, *args, metrics_size: int | None = METRICS_SIZE, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.metrics_size = metrics_size

    def __getitem__(self, index: int):
        sample = super().__getitem__(index)
        if isinstance(sample, SkippedSample) or not self.native:
            return sample
        record, size = self.records[index], self.metrics_size
        try:
            grey = read_pil(record["mask"], "L", size, Image.Resampling.NEAREST)
            if size is not None:
                sample["source_native"] = read_pil(
                    record["source"], "RGB", size, Image.Resampling.BICUBIC
                )
        except OSError as err:
            message = f"cannot read Reason-Edit sample {record['id']!r} with PIL: {err}"
            if self.on_bad_sample == "skip":
                return SkippedSample(str(record["id"]), message)
            raise BadSampleError(message) from err
        height, width = sample["source_native"].shape[-2:]
        if tuple(grey.shape[-2:]) != (height, width):  # native size: as align_to_source
            grey = torch.from_numpy(
                np.asarray(
                    Image.fromarray(grey[0].numpy()).resize(
                        (width, height), Image.Resampling.NEAREST
                    )
                ).copy()
            )[None]
        sample[MASK_GREY_KEY] = grey
        sample["mask_native"] = (grey >= 128).to(torch.uint8)
        return sample


class ReasonEditDataModule(EditDataModule):
    """Reason-Edit (see the module docstring) as the "test" split.

    Args:
        root: the benchmark folder (the release's ``ReasonEdit_benckmark_dir``).
        resolution: side of the square model input (the release edits and scores at 256).
        scenarios: "understanding" (the five understanding folders) or "reasoning"
            (``6-Reasoning``); the protocol follows (``reason-edit-<scenarios>``).
        metrics_size: the release's scoring frame (256): evaluation samples carry the input
            and masks read and resized as ``metrics_evaluation.py`` does; None keeps native
            sizes. Needs ``eval_resize="resize"``.
        **kwargs: the shared :class:`EditDataModule` fields.
    """

    dataset_class = ReasonEditDataset

    def __init__(
        self,
        root: str,
        resolution: int = 256,
        scenarios: Literal["understanding", "reasoning"] = "understanding",
        random_flip: float = 0.0,
        metrics_size: int | None = METRICS_SIZE,
        **kwargs,
    ) -> None:
        if scenarios not in KINDS:
            raise ValueError(f"scenarios must be one of {KINDS}, got {scenarios!r}")
        super().__init__(root=root, resolution=resolution, random_flip=random_flip, **kwargs)
        if self.eval_resize != "resize":
            raise ValueError(
                f"Reason-Edit is scored on whole images (the release squashes them to 256), so "
                f"eval_resize must be 'resize', got {self.eval_resize!r}"
            )
        self.metrics_size = metrics_size
        self.scenarios = scenarios
        self.protocol = REASON_EDIT_PROTOCOLS[scenarios]
        self._names: dict[str, str] | None = None

    def dataset_kwargs(self, split: str) -> dict:
        return {"metrics_size": self.metrics_size}

    def scenario_names(self) -> list[str]:
        return [name for name, s in SCENARIOS.items() if s.kind == self.scenarios]

    def build_records(self, split: str) -> list[dict]:
        if split != "test":
            raise ValueError(f"Reason-Edit has only a 'test' split, got {split!r}")
        root = Path(self.root)
        if not root.is_dir():
            raise FileNotFoundError(f"Reason-Edit benchmark folder not found: {root}")
        records = [
            record
            for name in self.scenario_names()
            for record in scenario_records(find_scenario_folder(root, name), name)
        ]
        check_unique(records, "Reason-Edit")
        self._names = {
            r["id"]: f"{SCENARIOS[r['category']].output_dir}/{r['index'] + 1:04d}.png"
            for r in records
        }
        return records

    def prediction_path(self, sample_id: str) -> str:
        """The release's output layout: ``<Scenario>_metrics_<k>/<NNNN>.png`` (``NNNN`` the
        input's place in its folder's sorted order, from 1), e.g.
        ``LeftRight_metrics_1/0001.png``."""
        if self._names is None:
            self.build_records("test")
        assert self._names is not None
        if sample_id not in self._names:
            raise KeyError(f"not a Reason-Edit sample of {self.root}: {sample_id!r}")
        return self._names[sample_id]
