"""Procedurally generated editing triples with exact ground truth (the default dataset).

A scene is a plain or softly graded background with 1-3 simple objects, each with a named
colour and shape at a named cell of a 3x3 grid. An edit either changes one object (recolour,
add, remove, move) or the whole image (brightness, contrast, saturation, increased or
decreased, as in MA5k requests). The target is rendered from the edited scene description, so
it is the exact ground truth; the mask marks the changed object regions (old and new place for
a move) or the whole image for global adjustments.

`generate_synthetic` writes a split once to disk (PNG files and jsonl manifests);
`SyntheticEditDataModule` reads it back through the same path as any other dataset.
`text_corpus` and `sample_images` feed the tiny tokenizer and VAE used by the tiny checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance

from .base import SPLITS, EditDataModule, read_jsonl_manifest, required_keys

GENERATOR_VERSION = 1

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "light grey": (200, 200, 200),
    "beige": (230, 220, 195),
    "pale blue": (195, 215, 235),
    "pale green": (200, 230, 200),
    "dark grey": (85, 85, 85),
}
BACKGROUND_STYLES = ("plain", "gradient")
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
# Cells of a 3x3 grid, row-major; the name is used as "in the {position}".
POSITIONS = (
    "top left", "top center", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom center", "bottom right",
)  # fmt: skip
LOCAL_EDITS = ("recolour", "add", "remove", "move")
GLOBAL_EDITS = ("brightness", "contrast", "saturation")
EDITS = LOCAL_EDITS + GLOBAL_EDITS
DIRECTIONS = ("increase", "decrease")
# PIL.ImageEnhance factor per direction (1.0 leaves the image unchanged).
ADJUST_FACTORS = {"increase": 1.35, "decrease": 0.65}
_ENHANCERS = {
    "brightness": ImageEnhance.Brightness,
    "contrast": ImageEnhance.Contrast,
    "saturation": ImageEnhance.Color,
}

# Object size (radius) and centre jitter as fractions of the resolution. A cell is 1/3 wide, so
# an object reaches at most 0.13 from its cell centre and neighbours never touch, even after
# rounding to pixels at 32px (so removing one object reveals exactly the background).
_RADIUS_RANGE = (0.09, 0.12)
_JITTER = 0.01

INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "recolour": (
        "make the {colour} {shape} {new_colour}",
        "change the colour of the {colour} {shape} to {new_colour}",
        "turn the {colour} {shape} {new_colour}",
        "paint the {colour} {shape} {new_colour}",
        "recolour the {colour} {shape} to {new_colour}",
    ),
    "add": (
        "add {a} {colour} {shape} in the {position}",
        "put {a} {colour} {shape} in the {position}",
        "draw {a} {colour} {shape} in the {position}",
        "place {a} {colour} {shape} in the {position}",
    ),
    "remove": (
        "remove the {colour} {shape}",
        "delete the {colour} {shape}",
        "take away the {colour} {shape}",
        "get rid of the {colour} {shape}",
        "erase the {colour} {shape}",
    ),
    "move": (
        "move the {colour} {shape} to the {position}",
        "put the {colour} {shape} in the {position}",
        "shift the {colour} {shape} to the {position}",
        "place the {colour} {shape} in the {position}",
    ),
    "brightness increase": (
        "increase the brightness",
        "make the image brighter",
        "brighten the image",
        "make it brighter",
    ),
    "brightness decrease": (
        "decrease the brightness",
        "make the image darker",
        "darken the image",
        "make it darker",
    ),
    "contrast increase": (
        "increase the contrast",
        "boost the contrast",
        "add more contrast",
        "make the contrast stronger",
    ),
    "contrast decrease": (
        "decrease the contrast",
        "reduce the contrast",
        "lower the contrast",
        "make the contrast weaker",
    ),
    "saturation increase": (
        "increase the saturation",
        "boost the saturation",
        "make the colours more vivid",
        "make the colours stronger",
    ),
    "saturation decrease": (
        "decrease the saturation",
        "reduce the saturation",
        "make the colours more muted",
        "wash out the colours",
    ),
}
# How the expressive instruction and the goal caption describe a globally adjusted image.
_ADJUST_EXPRESSIVE = {
    "brightness increase": "the image is brighter and shows",
    "brightness decrease": "the image is darker and shows",
    "contrast increase": "the image has more contrast and shows",
    "contrast decrease": "the image has less contrast and shows",
    "saturation increase": "the image is more saturated and shows",
    "saturation decrease": "the image is less saturated and shows",
}
_ADJUST_CAPTION = {
    "brightness increase": "a brighter picture of",
    "brightness decrease": "a darker picture of",
    "contrast increase": "a higher contrast picture of",
    "contrast decrease": "a lower contrast picture of",
    "saturation increase": "a more saturated picture of",
    "saturation decrease": "a less saturated picture of",
}


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class Obj:
    """One object: named colour, shape and grid cell; size and jitter as resolution fractions."""

    colour: str
    shape: str
    position: int
    radius: float
    dx: float
    dy: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A background (named colour, plain or gradient) and non-overlapping objects."""

    background: str
    style: str
    objects: tuple[Obj, ...]


def _draw_shape(draw: ImageDraw.ImageDraw, obj: Obj, res: int, fill) -> None:
    """Draw `obj` at resolution `res` (geometry proportional to `res`)."""
    row, col = divmod(obj.position, 3)
    cx = ((col + 0.5) / 3 + obj.dx) * res
    cy = ((row + 0.5) / 3 + obj.dy) * res
    r = obj.radius * res
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "square":
        h = 0.85 * r
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif obj.shape == "cross":
        t = 0.3 * r
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def _background(scene: Scene, res: int) -> np.ndarray:
    """[res, res, 3] uint8 background: plain, or a soft vertical gradient (+-8% brightness)."""
    base = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32)
    if scene.style == "plain":
        scale = np.ones(res, dtype=np.float32)
    else:
        scale = np.linspace(1.08, 0.92, res, dtype=np.float32)
    rows = np.clip(np.rint(scale[:, None] * base[None, :]), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.broadcast_to(rows[:, None, :], (res, res, 3)))


def render(scene: Scene, res: int) -> np.ndarray:
    """Render `scene` at `res` x `res` pixels as a [res, res, 3] uint8 array."""
    image = Image.fromarray(_background(scene, res))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_shape(draw, obj, res, COLOURS[obj.colour])
    return np.asarray(image)


def render_mask(objects: tuple[Obj, ...] | list[Obj], res: int) -> np.ndarray:
    """[res, res] uint8 mask, 255 on the union of the objects' pixels, else 0."""
    mask = Image.new("L", (res, res), 0)
    draw = ImageDraw.Draw(mask)
    for obj in objects:
        _draw_shape(draw, obj, res, 255)
    return np.asarray(mask)


def adjust(image: np.ndarray, edit: str, direction: str) -> np.ndarray:
    """The global photo adjustment `edit` (brightness/contrast/saturation) via PIL.ImageEnhance."""
    enhancer = _ENHANCERS[edit](Image.fromarray(image))
    return np.asarray(enhancer.enhance(ADJUST_FACTORS[direction]))


# --------------------------------------------------------------------------- text


def article(word: str) -> str:
    """ "an" before a vowel ("an orange circle"), else "a"."""
    return "an" if word[0] in "aeiou" else "a"


def _object_phrase(obj: Obj) -> str:
    return f"{article(obj.colour)} {obj.name} in the {POSITIONS[obj.position]}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _background_phrase(scene: Scene) -> str:
    """ "plain light grey background" or "light grey gradient background"."""
    if scene.style == "plain":
        return f"plain {scene.background} background"
    return f"{scene.background} gradient background"


def describe_scene(scene: Scene) -> str:
    """Concrete description with positions: "a blue circle in the top left on a ..."."""
    if not scene.objects:
        return f"an empty {_background_phrase(scene)}"
    return f"{_join([_object_phrase(o) for o in scene.objects])} on a {_background_phrase(scene)}"


def caption_scene(scene: Scene) -> str:
    """Short caption without positions: "a picture of a blue circle on a ... background"."""
    if not scene.objects:
        return f"a picture of an empty {scene.background} background"
    names = _join([f"{article(o.colour)} {o.name}" for o in scene.objects])
    return f"a picture of {names} on a {scene.background} background"


def _texts(source: Scene, target: Scene, adjustment: str | None) -> tuple[str, str, str]:
    """(expressive, source_caption, goal_caption) for an edit of `source` into `target`."""
    source_caption = caption_scene(source)
    if adjustment is None:
        return f"the image shows {describe_scene(target)}", source_caption, caption_scene(target)
    expressive = f"{_ADJUST_EXPRESSIVE[adjustment]} {describe_scene(target)}"
    goal = f"{_ADJUST_CAPTION[adjustment]} {caption_scene(target).removeprefix('a picture of ')}"
    return expressive, source_caption, goal


def text_corpus() -> list[str]:
    """Every instruction phrasing filled with every value, and every description/caption piece.

    Built with the same functions the generator uses, so every word the dataset can emit is
    in it (the tiny tokenizers are trained on it). Deterministic order.
    """
    corpus: list[str] = []
    for templates in INSTRUCTIONS.values():
        for template in templates:
            if "{" not in template:
                corpus.append(template)
                continue
            for colour in COLOURS:
                for shape in SHAPES:
                    if "{new_colour}" in template:
                        corpus += [
                            template.format(colour=colour, shape=shape, new_colour=new)
                            for new in COLOURS
                            if new != colour
                        ]
                    elif "{position}" in template:
                        corpus += [
                            template.format(
                                a=article(colour), colour=colour, shape=shape, position=p
                            )
                            for p in POSITIONS
                        ]
                    else:
                        corpus.append(template.format(colour=colour, shape=shape))
    objs = [
        Obj(c, s, p, 0.1, 0.0, 0.0) for c in COLOURS for s in SHAPES for p in range(len(POSITIONS))
    ]
    for background in BACKGROUNDS:
        for style in BACKGROUND_STYLES:
            empty = Scene(background, style, ())
            three = Scene(background, style, tuple(objs[:3]))
            for adjustment in (None, *_ADJUST_CAPTION):
                corpus += _texts(empty, empty, adjustment)
                corpus += _texts(three, three, adjustment)
    for obj in objs:
        scene = Scene("light grey", "plain", (obj,))
        corpus += _texts(scene, scene, None)
    return list(dict.fromkeys(corpus))


# --------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class Sample:
    """One generated edit: images as uint8 arrays ([H,W,3], mask [H,W]) and its texts."""

    source: np.ndarray
    target: np.ndarray
    mask: np.ndarray
    edit: str
    instruction: str
    expressive: str
    source_caption: str
    goal_caption: str


def _random_object(rng: np.random.Generator, taken: set[str], position: int) -> Obj:
    """A new object at `position` whose "colour shape" name is not in `taken`."""
    while True:
        colour = str(rng.choice(list(COLOURS)))
        shape = str(rng.choice(SHAPES))
        if f"{colour} {shape}" not in taken:
            break
    radius = float(rng.uniform(*_RADIUS_RANGE))
    dx, dy = (float(v) for v in rng.uniform(-_JITTER, _JITTER, size=2))
    return Obj(colour, shape, position, radius, dx, dy)


def _random_scene(rng: np.random.Generator, num_objects: int) -> Scene:
    positions = rng.choice(len(POSITIONS), size=num_objects, replace=False)
    objects: list[Obj] = []
    for position in positions:
        objects.append(_random_object(rng, {o.name for o in objects}, int(position)))
    return Scene(
        str(rng.choice(list(BACKGROUNDS))), str(rng.choice(BACKGROUND_STYLES)), tuple(objects)
    )


def _free_position(rng: np.random.Generator, scene: Scene) -> int:
    taken = {o.position for o in scene.objects}
    return int(rng.choice([p for p in range(len(POSITIONS)) if p not in taken]))


def make_sample(rng: np.random.Generator, resolution: int) -> Sample:
    """Draw one random scene and edit from `rng` and render it at `resolution`."""
    edit = str(rng.choice(EDITS))
    num_objects = int(rng.integers(1, 3 if edit == "add" else 4))  # add: at most 3 after
    source = _random_scene(rng, num_objects)
    adjustment = None
    fields: dict[str, str] = {}
    if edit in GLOBAL_EDITS:
        direction = str(rng.choice(DIRECTIONS))
        adjustment = f"{edit} {direction}"
        target, changed = source, None
    elif edit == "add":
        new = _random_object(rng, {o.name for o in source.objects}, _free_position(rng, source))
        target = replace(source, objects=(*source.objects, new))
        fields = {"a": article(new.colour), "colour": new.colour, "shape": new.shape}
        fields["position"] = POSITIONS[new.position]
        changed = [new]
    else:  # an existing object is recoloured, removed or moved
        index = int(rng.integers(len(source.objects)))
        obj = source.objects[index]
        others = source.objects[:index] + source.objects[index + 1 :]
        fields = {"colour": obj.colour, "shape": obj.shape}
        if edit == "recolour":
            names = {o.name for o in source.objects}
            options = [c for c in COLOURS if f"{c} {obj.shape}" not in names]
            new = replace(obj, colour=str(rng.choice(options)))
            target = replace(source, objects=others[:index] + (new,) + others[index:])
            fields["new_colour"] = new.colour
            changed = [obj]
        elif edit == "remove":
            target = replace(source, objects=others)
            changed = [obj]
        else:  # move
            new = replace(obj, position=_free_position(rng, source))
            target = replace(source, objects=others[:index] + (new,) + others[index:])
            fields["position"] = POSITIONS[new.position]
            changed = [obj, new]
    templates = INSTRUCTIONS[adjustment or edit]
    instruction = templates[int(rng.integers(len(templates)))].format(**fields)
    source_image = render(source, resolution)
    if adjustment is None:
        target_image = render(target, resolution)
        mask = render_mask(changed, resolution)
    else:
        target_image = adjust(source_image, edit, direction)
        mask = np.full((resolution, resolution), 255, dtype=np.uint8)
    expressive, source_caption, goal_caption = _texts(source, target, adjustment)
    return Sample(
        source_image, target_image, mask, edit, instruction, expressive, source_caption,
        goal_caption,
    )  # fmt: skip


def sample_images(num: int, resolution: int, seed: int) -> torch.Tensor:
    """`num` generator images (sources and targets alternately), [num, 3, res, res] in [-1, 1].

    Deterministic: the same arguments give an identical tensor. Used to fit the tiny VAE.
    """
    rng = np.random.default_rng(seed)
    images: list[np.ndarray] = []
    while len(images) < num:
        sample = make_sample(rng, resolution)
        images += [sample.source, sample.target]
    if num == 0:
        return torch.empty(0, 3, resolution, resolution)
    array = np.stack(images[:num]).transpose(0, 3, 1, 2)
    return torch.from_numpy(array.astype(np.float32) / 127.5 - 1.0)


# --------------------------------------------------------------------------- disk


def _meta(num_train: int, num_val: int, num_test: int, resolution: int, seed: int) -> dict:
    return {
        "generator": "editbench.synthetic",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "resolution": resolution,
        "num_train": num_train,
        "num_val": num_val,
        "num_test": num_test,
    }


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def generate_synthetic(
    root: str | os.PathLike,
    *,
    num_train: int = 4000,
    num_val: int = 200,
    num_test: int = 200,
    resolution: int = 32,
    seed: int = 0,
) -> Path:
    """Write the synthetic splits to `root` once and return `root` as a Path.

    Layout: `meta.json` (written last: its presence marks a complete generation),
    `{train,val,test}.jsonl` (one record per line; image paths relative to `root`) and
    `images/{split}/{index:06d}_{source,target,mask}.png`. If `meta.json` exists with the same
    parameters nothing is done; with different parameters a ValueError names the fields.
    A folder without `meta.json` (an interrupted run) is generated again.

    Each split comes from its own `SeedSequence(seed).spawn(3)` stream; a (source image,
    instruction) pair seen before is redrawn, so no pair occurs twice in or across splits.
    """
    root = Path(root)
    meta = _meta(num_train, num_val, num_test, resolution, seed)
    meta_path = root / "meta.json"
    if meta_path.exists():
        existing = json.loads(meta_path.read_text(encoding="utf-8"))
        diff = {k: (existing.get(k), v) for k, v in meta.items() if existing.get(k) != v}
        if diff:
            details = ", ".join(
                f"{k}: on disk {a!r}, requested {b!r}" for k, (a, b) in diff.items()
            )
            raise ValueError(
                f"synthetic data in {root} was generated with other parameters ({details}); "
                "use another root or delete that folder"
            )
        return root
    counts = {"train": num_train, "val": num_val, "test": num_test}
    streams = np.random.SeedSequence(seed).spawn(len(SPLITS))
    seen: set[bytes] = set()
    # File creation dominates on slow filesystems; PNGs are written by a few threads (the
    # content and names do not depend on the order, so the output stays byte-identical).
    with ThreadPoolExecutor(max_workers=8) as pool:
        writes = []
        for split, stream in zip(SPLITS, streams, strict=True):
            writes += _generate_split(root, split, counts[split], stream, resolution, seen, pool)
        for write in writes:
            write.result()  # re-raise any write error before meta.json marks completion
    _write_atomic(meta_path, json.dumps(meta, indent=2) + "\n")
    return root


def _generate_split(
    root: Path,
    split: str,
    count: int,
    stream: np.random.SeedSequence,
    resolution: int,
    seen: set[bytes],
    pool: ThreadPoolExecutor,
) -> list[Future]:
    """Draw `count` new samples of `split`, queue their PNGs on `pool`, write the manifest.

    Returns the PNG writes still pending.
    """
    rng = np.random.default_rng(stream)
    folder = root / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    lines, writes = [], []
    for index in range(count):
        while True:
            sample = make_sample(rng, resolution)
            key = hashlib.sha1(sample.source.tobytes() + sample.instruction.encode()).digest()
            if key not in seen:
                seen.add(key)
                break
        record = {"id": f"synthetic-{split}-{index:06d}"}
        for name in ("source", "target", "mask"):
            rel = f"images/{split}/{index:06d}_{name}.png"
            image = Image.fromarray(getattr(sample, name))
            writes.append(pool.submit(image.save, root / rel, compress_level=1))
            record[name] = rel
        if len(writes) >= 512:  # bound the images held in memory
            for write in writes:
                write.result()
            writes.clear()
        for name in ("instruction", "expressive", "source_caption", "goal_caption", "edit"):
            record[name] = getattr(sample, name)
        lines.append(json.dumps(record) + "\n")
    _write_atomic(root / f"{split}.jsonl", "".join(lines))
    return writes


# --------------------------------------------------------------------------- datamodule


class SyntheticEditDataModule(EditDataModule):
    """Procedural editing triples (see module docstring), generated into `root` on first use.

    Args:
        root: folder of the generated data (created by `prepare_data`).
        resolution: side of the square crops fed to the model.
        random_flip: horizontal flip probability for training. 0 by default because the
            instructions and descriptions name left/right positions ("move the red circle to
            the top left"), which a flip would make wrong.
        num_train: number of generated training samples.
        num_val: number of generated validation samples.
        num_test: number of generated test samples.
        seed: generator seed (each split draws from its own child stream).
        generate_resolution: resolution the images are rendered at (defaults to `resolution`).
        **kwargs: the shared :class:`EditDataModule` fields (batch sizes, workers, crop,
            `max_samples`, `on_bad_sample`, `expressive_path`, ...).
    """

    protocol = "synthetic"

    def __init__(
        self,
        root: str,
        resolution: int = 256,
        random_flip: float = 0.0,
        num_train: int = 4000,
        num_val: int = 200,
        num_test: int = 200,
        seed: int = 0,
        generate_resolution: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(root=root, resolution=resolution, random_flip=random_flip, **kwargs)
        self.num_train = num_train
        self.num_val = num_val
        self.num_test = num_test
        self.seed = seed
        self.generate_resolution = generate_resolution

    def prepare_data(self) -> None:
        """Generate the data into `root` (a fast no-op when it is already there)."""
        generate_synthetic(
            self.root,
            num_train=self.num_train,
            num_val=self.num_val,
            num_test=self.num_test,
            resolution=self.generate_resolution or self.resolution,
            seed=self.seed,
        )

    def build_records(self, split: str) -> list[dict]:
        """Records of `split` read from `root/{split}.jsonl`."""
        root = Path(self.root)
        if not (root / "meta.json").is_file():
            raise FileNotFoundError(
                f"{root / 'meta.json'} not found: no complete synthetic data in {root} "
                "(prepare_data() or generate_synthetic() writes it)"
            )
        return read_jsonl_manifest(root / f"{split}.jsonl", root, required=required_keys(split))
