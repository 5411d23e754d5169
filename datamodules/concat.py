"""Train on several datasets at once (e.g. MGIE Table 2: IPr2Pr pre-training, then fine-tuning)."""

from __future__ import annotations

from typing import Any

from torch.utils.data import ConcatDataset

from datamodules.base import EditDataModule, SkippedSample, collate


def collate_common(samples: list) -> dict[str, Any]:
    """:func:`collate` over the keys every kept sample has: a batch that mixes a dataset with
    masks and one without keeps neither's mask rather than failing."""
    kept = [s for s in samples if not isinstance(s, SkippedSample)]
    if kept:
        common = set.intersection(*(set(s) for s in kept))
        samples = [s if isinstance(s, SkippedSample) else {k: v for k, v in s.items() if k in common} for s in samples]
    return collate(samples)


def member_spec(datamodule: EditDataModule) -> dict[str, Any]:
    """``{"class_path", "init_args"}`` of a member DataModule: its class and saved
    hyperparameters, plain values only."""
    cls = type(datamodule)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(datamodule.hparams)}


class ConcatEditDataModule(EditDataModule):
    """The union of other DataModules' splits, sampled in proportion to their sizes.

    Each member keeps its own layout, options and bad-sample policy; this module's batch sizes,
    workers and `resolution` apply to the union (every member must use the same `resolution`).
    Ids stay those of the members (they carry the dataset's name, so they do not collide).

    Args:
        datamodules: the member DataModules (any `EditDataModule` subclasses).
        resolution: the shared resolution; a member with another one is an error.
        **kwargs: the shared :class:`EditDataModule` fields for the union (batch sizes,
            workers, `predict_split`).
    """

    protocol = "concat"
    collate_fn = staticmethod(collate_common)

    def __init__(self, datamodules: list[EditDataModule], resolution: int = 256, **kwargs) -> None:
        super().__init__(root="", resolution=resolution, **kwargs)
        if not datamodules:
            raise ValueError("ConcatEditDataModule needs at least one member DataModule")
        for dm in datamodules:
            if dm.resolution != resolution:
                raise ValueError(
                    f"{type(dm).__name__} (root {dm.root}) has resolution {dm.resolution}, the "
                    f"concatenation {resolution}: set the same value on every member"
                )
        self.members = list(datamodules)
        # Checkpoints record the members as the CLI writes them, not as pickled objects, which
        # Lightning's weights-only load of a resumed fit (--ckpt_path) refuses.
        self.hparams["datamodules"] = [member_spec(dm) for dm in self.members]

    def prepare_data(self) -> None:
        for dm in self.members:
            dm.prepare_data()

    def make_dataset(self, split: str) -> ConcatDataset:
        return ConcatDataset([dm.make_dataset(split) for dm in self.members])
