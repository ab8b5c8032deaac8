"""The ILSVRC2012 (ImageNet-1k) devkit and archive layout, as pure parsers.

The devkit ``ILSVRC2012_devkit_t12.tar.gz`` holds ``ILSVRC2012_devkit_t12/data/meta.mat``
(a MATLAB struct array ``synsets``: ILSVRC2012_ID, WNID, words, gloss, num_children,
... for 1,860 synsets, of which the 1,000 leaves, ``num_children == 0``, are the
classes) and ``.../data/ILSVRC2012_validation_ground_truth.txt`` (one ILSVRC2012_ID per
line: the class of ``ILSVRC2012_val_<line number, 8 digits>.JPEG``).

Labels are the positions of the wnids in sorted order: what torchvision's ``ImageNet``
and ``ImageFolder`` give, and so what every pretrained torchvision model expects.
The devkit's ILSVRC2012_IDs (1..1000, in another order) are kept alongside.

``scipy`` (the ``imagenet`` extra) reads meta.mat; it is imported only here.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from datapipe.errors import FormatError
from datapipe.formats.mat import check_mat_sizes
from datapipe.formats.tar import check_member

DEVKIT_ROOT = "ILSVRC2012_devkit_t12"
META_MAT = f"{DEVKIT_ROOT}/data/meta.mat"
VAL_GROUND_TRUTH = f"{DEVKIT_ROOT}/data/ILSVRC2012_validation_ground_truth.txt"

WNID_RE = re.compile(r"n\d{8}")
CLASS_TAR_RE = re.compile(r"(n\d{8})\.tar")  # a member of ILSVRC2012_img_train.tar
# meta.mat is 2.5 MB and the ground truth 0.3 MB; a member declaring more is refused
# before it is read (see datapipe.formats.tar).
MAX_DEVKIT_MEMBER_BYTES = 64 << 20
VAL_IMAGE_RE = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")  # a member of ILSVRC2012_img_val.tar


@dataclass(frozen=True)
class Synset:
    """One class: its WordNet id, its ILSVRC2012_ID (1-based) and its names."""

    wnid: str
    ilsvrc2012_id: int
    words: str  # comma-separated names, e.g. "tench, Tinca tinca"


@dataclass(frozen=True)
class Devkit:
    """The classes (label order: sorted wnid) and the validation ground truth."""

    synsets: tuple[Synset, ...]
    val_ids: tuple[int, ...]  # ILSVRC2012_ID of val image k + 1
    # The wnid of val image k + 1, where that is what is known (torchvision's meta.bin).
    val_wnids: tuple[str, ...] = ()

    @property
    def wnids(self) -> tuple[str, ...]:
        return tuple(s.wnid for s in self.synsets)

    def label_of_wnid(self) -> dict[str, int]:
        return {s.wnid: label for label, s in enumerate(self.synsets)}

    def restricted(self, wnids: Iterable[str]) -> Devkit:
        """Only the classes ``wnids`` (a subset: an ImageNet-100-style tree), relabelled in
        sorted-wnid order; the val ground truth is dropped (a tree labels by folder)."""
        keep = set(wnids)
        return Devkit(tuple(s for s in self.synsets if s.wnid in keep), ())

    def val_labels(self) -> np.ndarray:
        """The label of every validation image, in file-number order (int64)."""
        if not self.val_ids and self.val_wnids:
            labels = self.label_of_wnid()
            try:
                return np.array([labels[w] for w in self.val_wnids], dtype=np.int64)
            except KeyError as e:
                raise FormatError(f"val wnid {e.args[0]} is no class of the devkit") from None
        by_id = {s.ilsvrc2012_id: label for label, s in enumerate(self.synsets)}
        try:
            return np.array([by_id[i] for i in self.val_ids], dtype=np.int64)
        except KeyError as e:
            raise FormatError(f"{VAL_GROUND_TRUTH}: ILSVRC2012_ID {e.args[0]} is no class of "
                              f"meta.mat") from None


def parse_meta_mat(data: bytes, name: str = "meta.mat") -> tuple[Synset, ...]:
    """The leaf synsets (the classes) of a devkit's meta.mat, sorted by wnid."""
    import scipy.io

    check_mat_sizes(data, name, MAX_DEVKIT_MEMBER_BYTES)  # before scipy allocates by them
    try:
        mat = scipy.io.loadmat(io.BytesIO(data), squeeze_me=True)
    except Exception as e:  # scipy raises several types for a bad file
        raise FormatError(f"{name}: not a readable MATLAB file ({type(e).__name__}: {e})"
                          ) from None
    synsets = np.atleast_1d(mat.get("synsets"))
    fields = synsets.dtype.names or ()
    needed = ("ILSVRC2012_ID", "WNID", "words", "num_children")
    if mat.get("synsets") is None or any(f not in fields for f in needed):
        raise FormatError(f"{name}: expected a 'synsets' struct array with fields "
                          f"{', '.join(needed)}, found {', '.join(fields) or 'none'}")
    leaves = []
    for row in synsets:
        if int(row["num_children"]) != 0:
            continue
        wnid = str(row["WNID"])
        if not WNID_RE.fullmatch(wnid):
            raise FormatError(f"{name}: {wnid!r} is not a WordNet id like n01440764")
        leaves.append(Synset(wnid, int(row["ILSVRC2012_ID"]), str(row["words"])))
    for what, values in (("wnid", [s.wnid for s in leaves]),
                         ("ILSVRC2012_ID", [s.ilsvrc2012_id for s in leaves])):
        if len(set(values)) != len(values):
            raise FormatError(f"{name}: a {what} appears twice among the leaf synsets")
    return tuple(sorted(leaves, key=lambda s: s.wnid))


def parse_val_ground_truth(text: str, name: str = "ground truth") -> tuple[int, ...]:
    """The ILSVRC2012_IDs of the ground-truth file, one per line."""
    try:
        return tuple(int(line) for line in text.split())
    except ValueError as e:
        raise FormatError(f"{name}: expected one integer per line ({e})") from None


def read_devkit(path: str | os.PathLike) -> Devkit:
    """Parse meta.mat and the validation ground truth out of the devkit tarball."""
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if member.name.lstrip("./") in (META_MAT, VAL_GROUND_TRUTH) and member.isfile():
                    check_member(member, os.path.basename(path), MAX_DEVKIT_MEMBER_BYTES)
                    members[member.name.lstrip("./")] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise FormatError(f"{path}: not a readable devkit tarball ({e})") from None
    missing = [m for m in (META_MAT, VAL_GROUND_TRUTH) if m not in members]
    if missing:
        raise FormatError(f"{path} lacks {', '.join(missing)}; is it "
                          f"ILSVRC2012_devkit_t12.tar.gz?")
    synsets = parse_meta_mat(members[META_MAT], META_MAT)
    val_ids = parse_val_ground_truth(members[VAL_GROUND_TRUTH].decode("ascii", "replace"),
                                     VAL_GROUND_TRUTH)
    return Devkit(synsets, val_ids)


def devkit_from_wnids(wnids: list[str]) -> Devkit:
    """Classes named by their wnids alone (an extracted tree without the devkit)."""
    return Devkit(tuple(Synset(w, 0, w) for w in sorted(set(wnids))), ())


def class_tar_wnid(member: str) -> str | None:
    """The wnid of a per-class tar inside the train archive (``n01440764.tar``)."""
    m = CLASS_TAR_RE.fullmatch(os.path.basename(member))
    return m.group(1) if m else None


def val_image_number(member: str) -> int | None:
    """The 1-based number of a validation image (``ILSVRC2012_val_00000001.JPEG`` -> 1)."""
    m = VAL_IMAGE_RE.fullmatch(os.path.basename(member))
    return int(m.group(1)) if m else None
