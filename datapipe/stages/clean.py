"""The clean stage: parse raw source files into validated columns (numpy arrays).

A clean stage knows which source files make each split and turns them into
columns: ``image`` (uint8, N x C x H x W) and ``label`` (int64) for the image
classification recipes. It writes nothing; the save stage does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datapipe.errors import FormatError, RecipeError
from datapipe.formats.idx import read_idx
from datapipe.stages.base import Stage

Columns = dict[str, np.ndarray]


class Clean(Stage):
    """Base of clean stages: ``files_for(split)`` and ``__call__(split, files)``."""

    kind = "clean"

    def splits(self) -> tuple[str, ...]:
        """The source splits this stage can produce."""
        raise NotImplementedError

    def files_for(self, split: str) -> tuple[str, ...]:
        """The file names (as the download stage knows them) that make ``split``."""
        raise NotImplementedError

    def __call__(self, split: str, files: Mapping[str, Path]) -> Columns:
        """Parse the files of ``split`` (file name -> local path) into columns."""
        raise NotImplementedError

    def _unknown_split(self, split: str) -> RecipeError:
        return RecipeError(
            f"split {split!r} is not one this recipe has; it has {', '.join(self.splits())}"
        )


def validate_classification(columns: Columns, num_classes: int, where: str) -> Columns:
    """Check the image/label columns of a classification split; return them unchanged."""
    images, labels = columns.get("image"), columns.get("label")
    if images is None or labels is None:
        raise FormatError(f"{where}: expected 'image' and 'label' columns, got {sorted(columns)}")
    if images.dtype != np.uint8 or images.ndim != 4:
        raise FormatError(
            f"{where}: images must be uint8 N x C x H x W, got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise FormatError(
            f"{where}: {len(images)} images but labels of shape {labels.shape}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise FormatError(
            f"{where}: labels must lie in [0, {num_classes}), found {labels.min()}..{labels.max()}"
        )
    return columns


@dataclass(frozen=True)
class IDXClean(Clean):
    """Images and labels in IDX files (MNIST, Fashion-MNIST, KMNIST, ...).

    ``files`` maps each split to its (images file, labels file).
    """

    files: dict[str, tuple[str, str]] = field(default_factory=dict)
    num_classes: int = 10

    def splits(self) -> tuple[str, ...]:
        return tuple(self.files)

    def files_for(self, split: str) -> tuple[str, ...]:
        if split not in self.files:
            raise self._unknown_split(split)
        return tuple(self.files[split])

    def __call__(self, split: str, files: Mapping[str, Path]) -> Columns:
        images_name, labels_name = self.files_for(split)
        images = read_idx(files[images_name])
        labels = read_idx(files[labels_name])
        if images.ndim != 3 or images.dtype != np.uint8:
            raise FormatError(
                f"{images_name}: expected uint8 images of N x H x W, got "
                f"{images.dtype} {images.shape}"
            )
        if labels.ndim != 1:
            raise FormatError(f"{labels_name}: expected a 1-d label vector, got {labels.shape}")
        columns = {"image": images[:, None, :, :], "label": labels.astype(np.int64)}
        return validate_classification(columns, self.num_classes, f"{images_name}/{labels_name}")


@dataclass(frozen=True)
class CIFARClean(Clean):
    """Images and labels of pickled CIFAR batches, read straight out of their tarball
    (or out of the folder it was extracted into).

    ``archive`` is the tarball's file name (as the download stage knows it);
    ``members`` maps each split to its batch members, in order; ``meta`` is the
    member holding the class names under ``names_key``, which must equal
    ``classes``. ``label_key`` picks the labels: ``labels`` (CIFAR-10),
    ``fine_labels`` or ``coarse_labels`` (CIFAR-100). The pickles are read with a
    restricted unpickler that never runs code (see datapipe.formats.cifar).
    """

    archive: str = ""
    members: dict[str, tuple[str, ...]] = field(default_factory=dict)
    meta: str = ""
    classes: tuple[str, ...] = ()
    label_key: str = "labels"
    names_key: str = "label_names"

    def __post_init__(self) -> None:
        if not self.archive or not self.meta or not self.classes or not self.members:
            raise RecipeError("CIFARClean needs an archive, its members per split, the meta "
                              "member and the class names")
        object.__setattr__(self, "members", {split: tuple(names)
                                             for split, names in self.members.items()})
        object.__setattr__(self, "classes", tuple(self.classes))

    def splits(self) -> tuple[str, ...]:
        return tuple(self.members)

    def files_for(self, split: str) -> tuple[str, ...]:
        if split not in self.members:
            raise self._unknown_split(split)
        return (self.archive,)

    def __call__(self, split: str, files: Mapping[str, Path]) -> Columns:
        from datapipe.formats.cifar import (
            check_class_names,
            iter_folder_members,
            iter_members,
            parse_batch,
            parse_meta,
        )

        self.files_for(split)  # an unknown split fails here, naming the known ones
        batches = tuple(self.members[split])
        parsed: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        meta: dict[str, object] = {}
        # The tarball, or the folder it was extracted into (torchvision's root keeps
        # cifar-10-batches-py/): the download stage hands over either.
        source = Path(files[self.archive])
        members = (iter_folder_members if source.is_dir() else iter_members)(
            source, (*batches, self.meta))
        for member, data in members:
            where = f"{self.archive}:{member}"
            if member == self.meta:
                names, meta = parse_meta(data, where, self.names_key)
                check_class_names(names, self.classes, where)
            else:  # parsed as it streams by, so only one member's raw bytes are held
                parsed[member] = parse_batch(data, where, self.label_key)
        per_batch = meta.get("num_cases_per_batch")
        for member, (images, _) in parsed.items():
            if isinstance(per_batch, int) and len(images) != per_batch:
                raise FormatError(f"{self.archive}:{member}: {len(images)} images, but the "
                                  f"meta file says {per_batch} per batch")
        columns = {
            "image": np.concatenate([parsed[m][0] for m in batches]),
            "label": np.concatenate([parsed[m][1] for m in batches]),
        }
        return validate_classification(columns, len(self.classes), f"{self.archive} {split}")
