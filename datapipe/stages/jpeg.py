"""Stages of a dataset kept as JPEG bytes in sharded Arrow files (ImageNet).

Clean+save, in shards: :class:`ImageNetClean` streams the ILSVRC2012 archives (the
train tar is a tar of per-class tars) or an extracted ``train/<wnid>/*.JPEG`` tree
without extracting anything to disk, converts every image to RGB (ImageNet has
grayscale and CMYK JPEGs and a PNG named .JPEG), shrinks it so its shorter side is at
most ``max_short_side`` (keeping the aspect, never enlarging), re-encodes it as JPEG
of ``quality`` and writes one Arrow shard per task. ``datapipe.prepare`` runs the
tasks on all cores, keeps finished shards across kills and publishes the entry (see
its "Sharded splits" section for the protocol: ``shard_plan``, ``write_shard``,
``finish``).

The shard files (an Arrow stream each: name, image, label, height, width) are written
and read by ``datapipe.formats.jpeg_shards``. Load and transform: :class:`JpegLoad`
memory-maps the shards and builds a dataset that decodes in DataLoader workers
(``datapipe.decode``), with the crop and resize of :class:`JpegTransform`. This module
imports neither torch nor PIL at import time: ``datapipe prepare`` runs through it.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from datapipe.errors import ConfigError, FormatError, RecipeError
from datapipe.folders import Walk, read_regular
from datapipe.formats.imagenet import (
    WNID_RE,
    Devkit,
    class_tar_wnid,
    devkit_from_wnids,
    read_devkit,
    val_image_number,
)
from datapipe.formats.jpeg_shards import ShardReader, shard_paths, write_jpeg_shard
from datapipe.formats.tar import check_member, member_path
from datapipe.stages.base import Stage
from datapipe.stages.clean import Clean
from datapipe.stages.transform import Transform

if TYPE_CHECKING:
    from datapipe.manifest import PreparedSplit

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
# Caps far above any genuine ImageNet image (a few MB) and per-class tar (about 1 GB): a
# member declaring more is refused before it is read (see datapipe.formats.tar).
MAX_IMAGE_BYTES = 256 << 20
MAX_CLASS_TAR_BYTES = 16 << 30

log = logging.getLogger("datapipe")


# ------------------------------------------------------------------ one image


def fit_short_side(width: int, height: int, max_short_side: int | None) -> tuple[int, int]:
    """(width, height) scaled so the shorter side is at most ``max_short_side``; never larger."""
    short = min(width, height)
    if max_short_side is None or short <= max_short_side:
        return width, height
    if width <= height:
        return max_short_side, max(1, round(height * max_short_side / width))
    return max(1, round(width * max_short_side / height)), max_short_side


def check_pixels(size: tuple[int, int], name: str) -> None:
    """Refuse, from its header, an image too large to decode: a few bytes can declare
    gigapixels. PIL only warns between its limit and twice that; we refuse at its limit."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and size[0] * size[1] > limit:
        raise FormatError(f"{name}: {size[0]} x {size[1]} pixels, more than the {limit} an "
                          f"image may have (a decompression bomb?); remove the file")


class Reencoded(NamedTuple):
    jpeg: bytes
    height: int
    width: int
    source_size: tuple[int, int]  # (width, height) of the original
    source_kind: str  # "FORMAT MODE" of the original, e.g. "JPEG CMYK", "PNG RGB"


def reencode_jpeg(data: bytes, max_short_side: int | None, quality: int,
                  name: str = "image") -> Reencoded:
    """Any image file -> an RGB JPEG whose shorter side is at most ``max_short_side``.

    JPEGs much larger than the target are decoded at reduced size (``draft``: the
    decoder skips detail the shrink would drop anyway).
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            check_pixels(img.size, name)
            kind, source_size = f"{img.format} {img.mode}", img.size
            size = fit_short_side(*img.size, max_short_side)
            if img.format == "JPEG" and size != img.size:
                img.draft(img.mode, size)  # keeps at least ``size`` pixels each way
            rgb = img.convert("RGB")
        if rgb.size != size:
            rgb = rgb.resize(size, Image.Resampling.BICUBIC)
        out = io.BytesIO()
        rgb.save(out, format="JPEG", quality=quality)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise FormatError(f"{name}: not a readable image ({e})") from None
    return Reencoded(out.getvalue(), size[1], size[0], source_size, kind)


# ------------------------------------------------------------------ clean + save


class _Slice(io.RawIOBase):
    """``size`` bytes of an open file from ``offset`` on: a member of a tar, read in place."""

    def __init__(self, f: Any, offset: int, size: int) -> None:
        f.seek(offset)
        self.f, self.left = f, size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.left)
        if n <= 0:
            return 0
        got = self.f.readinto(memoryview(buffer)[:n])
        self.left -= got
        return got


@dataclass(frozen=True)
class ImageNetClean(Clean):
    """The ILSVRC2012 archives (or an extracted tree) -> sharded Arrow files of RGB JPEGs.

    Train: one shard per class (a per-class tar of the train archive, or a
    ``train/<wnid>/`` folder, or ``train/<wnid>/<wnid>/`` as some extractions leave it).
    Val: shards of ``val_shard_size`` images in file-number order, labelled from the
    devkit's ground truth (archive; torchvision's meta.bin may stand in for the devkit)
    or the wnid folder (extracted tree). Classes: see ``_classes``; labels are their
    positions in sorted-wnid order, whatever their number.
    """

    train_file: str = "ILSVRC2012_img_train.tar"
    val_file: str = "ILSVRC2012_img_val.tar"
    devkit_file: str = "ILSVRC2012_devkit_t12.tar.gz"
    num_classes: int = 1000  # the most classes a devkit or tree may have; fewer is a subset
    max_short_side: int | None = 256
    quality: int = 90
    val_shard_size: int = 1000

    def __post_init__(self) -> None:
        if self.max_short_side is not None and self.max_short_side < 1:
            raise ConfigError(f"max_short_side must be positive or None, got "
                              f"{self.max_short_side!r}")
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"JPEG quality must lie in 1..100, got {self.quality!r}")
        if self.val_shard_size < 1:
            raise ConfigError(f"val_shard_size must be positive, got {self.val_shard_size!r}")

    def splits(self) -> tuple[str, ...]:
        return ("train", "val")

    def files_for(self, split: str) -> tuple[str, ...]:
        if split == "train":
            return (self.train_file, self.devkit_file)
        if split == "val":
            return (self.val_file, self.devkit_file)
        raise self._unknown_split(split)

    def __call__(self, split: str, files: Mapping[str, Path]) -> Any:
        raise RecipeError("ImageNet is prepared in shards; use datapipe.prepare.prepare_split")

    # -------------------------------------------------------------- the protocol

    def shard_plan(self, split: str, files: Mapping[str, Path]) -> list[dict[str, Any]]:
        """The shards of ``split``: JSON tasks, each naming its images, labels and bytes."""
        devkit = self._classes(split, files)
        source = Path(files[self.files_for(split)[0]])
        if source.is_dir():
            return self._plan_tree(split, source, devkit)
        if split == "train":
            return self._plan_train_tar(source, devkit)
        return self._plan_val_tar(source, devkit)

    def write_shard(self, split: str, files: Mapping[str, Path], task: dict[str, Any],
                    path: Path) -> dict[str, Any]:
        """Convert the images of ``task`` and write them to ``path``; return a summary."""
        started = time.perf_counter()
        source = Path(files[self.files_for(split)[0]])
        rows, originals, resized, source_bytes = [], Counter(), 0, 0
        for name, data, label in _images_of(task, source):
            image = reencode_jpeg(data, self.max_short_side, self.quality,
                                  f"{source.name}: {name}")
            rows.append((name, image.jpeg, label, image.height, image.width))
            if image.source_kind != "JPEG RGB":
                originals[image.source_kind] += 1
            resized += image.source_size != (image.width, image.height)
            source_bytes += len(data)
        write_jpeg_shard(rows, path)
        return {
            "rows": len(rows),
            "class_counts": {str(k): v for k, v in sorted(Counter(r[2] for r in rows).items())},
            "converted": dict(sorted(originals.items())),
            "resized": int(resized),
            "source_bytes": source_bytes,
            "image_bytes": sum(len(r[1]) for r in rows),
            "seconds": round(time.perf_counter() - started, 3),
        }

    def finish(self, split: str, files: Mapping[str, Path],
               summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The manifest's columns, statistics and classes, from the shard summaries."""
        devkit = self._classes(split, files)
        counts = np.zeros(len(devkit.synsets), np.int64)
        converted: Counter = Counter()
        for s in summaries:
            for label, n in s["class_counts"].items():
                if not 0 <= int(label) < len(counts) or not isinstance(n, int) or n < 0:
                    raise ValueError(f"a shard counts {n!r} images of class {label!r}")
                counts[int(label)] += n
            if sum(s["class_counts"].values()) != s["rows"]:  # read back from a part record
                raise ValueError(f"a shard has {s['rows']!r} rows but counts "
                                 f"{sum(s['class_counts'].values())} images")
            converted.update(s["converted"])
        return {
            "columns": {
                "name": {"dtype": "string", "shape": []},
                "image": {"dtype": "binary", "format": "jpeg", "shape": []},
                "label": {"dtype": "int64", "shape": []},
                "height": {"dtype": "int32", "shape": []},
                "width": {"dtype": "int32", "shape": []},
            },
            "statistics": {
                "class_counts": counts.tolist(),
                "converted_to_rgb_jpeg": dict(sorted(converted.items())),
                "resized": sum(s["resized"] for s in summaries),
                "source_bytes": sum(s["source_bytes"] for s in summaries),
                "image_bytes": sum(s["image_bytes"] for s in summaries),
            },
            "classes": [{"label": i, "wnid": s.wnid, "ilsvrc2012_id": s.ilsvrc2012_id,
                         "words": s.words} for i, s in enumerate(devkit.synsets)],
        }

    # -------------------------------------------------------------- plans

    def _classes(self, split: str, files: Mapping[str, Path]) -> Devkit:
        """The classes of ``split``, in label order (sorted wnid), and the val ground truth.

        From the devkit (or torchvision's meta.bin standing in for it), any number of its
        leaf synsets (torchvision's test devkits have 5); from an extracted tree, the
        class folders it holds (an ImageNet-100-style subset), named by the devkit or
        meta.bin where there is one, else by their wnids.
        """
        source = Path(files[self.files_for(split)[0]])
        devkit = self._devkit(files, tree=source.is_dir())
        if source.is_dir():
            present = tree_classes(source)
            if devkit is None:
                devkit = devkit_from_wnids(present)
            else:
                unknown = sorted(set(present) - set(devkit.wnids))
                if unknown:
                    raise FormatError(f"{source}/{unknown[0]}: {unknown[0]!r} is not a class "
                                      f"of the devkit; expected {source}/<wnid>/*.JPEG")
                devkit = devkit.restricted(present)
        assert devkit is not None
        if not devkit.synsets or len(devkit.synsets) > self.num_classes:
            raise FormatError(f"{self.devkit_file}: {len(devkit.synsets)} classes; ImageNet "
                              f"has 1 to {self.num_classes}")
        return devkit

    def _devkit(self, files: Mapping[str, Path], tree: bool) -> Devkit | None:
        """The devkit or meta.bin at hand; None for a tree without either (or whose
        meta.bin cannot be read: the tree's folders then name the classes)."""
        from datapipe.formats.torch_meta import META_BIN, is_torch_zip, read_meta_bin

        path = files.get(self.devkit_file)
        if path is None:
            if tree:
                return None
            raise FormatError(f"{self.devkit_file} is needed for the class names and "
                              f"validation labels; put it next to the images")
        if not (is_torch_zip(path) or Path(path).name == META_BIN):
            return read_devkit(path)
        try:
            return read_meta_bin(path)
        except FormatError as e:
            if not tree:
                raise
            log.warning("%s; naming the classes by the tree's wnid folders instead", e)
            return None

    def _plan_train_tar(self, path: Path, devkit: Devkit) -> list[dict[str, Any]]:
        labels = devkit.label_of_wnid()
        tasks = []
        for member in _tar_members(path, MAX_CLASS_TAR_BYTES):
            wnid = class_tar_wnid(member.name)
            if wnid is None:
                raise FormatError(f"{path.name}: member {member.name!r} is not a per-class "
                                  f"tar like n01440764.tar; is this ILSVRC2012_img_train.tar?")
            if wnid not in labels:
                raise FormatError(f"{path.name}: class {wnid} is not in the devkit's meta.mat")
            tasks.append({"kind": "class-tar", "member": member.name, "wnid": wnid,
                          "label": labels[wnid], "offset": member.offset_data,
                          "bytes": member.size})
        if not tasks:
            raise FormatError(f"{path.name} holds no per-class tars")
        return sorted(tasks, key=lambda t: t["wnid"])

    def _plan_val_tar(self, path: Path, devkit: Devkit) -> list[dict[str, Any]]:
        labels = devkit.val_labels()
        members = []
        for member in _tar_members(path, MAX_IMAGE_BYTES):
            number = val_image_number(member.name)
            if number is None or not 1 <= number <= len(labels):
                raise FormatError(f"{path.name}: member {member.name!r} is not one of the "
                                  f"{len(labels)} ILSVRC2012_val_NNNNNNNN.JPEG of the devkit")
            members.append([os.path.basename(member.name), member.offset_data, member.size,
                            int(labels[number - 1])])
        members.sort()
        return [{"kind": "tar-members", "members": chunk, "bytes": sum(m[2] for m in chunk)}
                for chunk in _chunks(members, self.val_shard_size)]

    def _plan_tree(self, split: str, root: Path, devkit: Devkit) -> list[dict[str, Any]]:
        labels = devkit.label_of_wnid()
        per_class = []
        walk = Walk(root)  # regular files only, links only inside the tree, each file once
        for wnid in tree_classes(root):
            folder = root / wnid
            images = [Path(p) for p in walk.files(
                folder, lambda name: name.lower().endswith(IMAGE_EXTENSIONS), recursive=False)]
            inner = folder / wnid
            if not images and walk.is_dir(inner):  # train/<wnid>/<wnid>/*.JPEG
                folder = inner
                images = [Path(p) for p in walk.files(
                    inner, lambda name: name.lower().endswith(IMAGE_EXTENSIONS),
                    recursive=False)]
            prefix = folder.relative_to(root).as_posix()
            per_class.append([[f"{prefix}/{p.name}", labels[wnid], p.stat().st_size]
                              for p in images])
        walk.report()
        if not any(per_class):
            raise FormatError(f"{root} holds no images in <wnid>/ folders")
        if split == "train":
            groups = [g for g in per_class if g]
        else:  # the archive's order: by file name across classes
            flat = sorted((f for g in per_class for f in g),
                          key=lambda f: f[0].rsplit("/", 1)[1])
            groups = _chunks(flat, self.val_shard_size)
        return [{"kind": "files", "files": [f[:2] for f in g], "bytes": sum(f[2] for f in g)}
                for g in groups]


def tree_classes(root: Path) -> list[str]:
    """The class folders of an extracted tree (``root/<wnid>/``), sorted: its classes."""
    walk = Walk(root)
    found = []
    for folder in sorted(p for p in root.iterdir() if walk.is_dir(p)):
        if folder.name.startswith("."):
            continue
        if not WNID_RE.fullmatch(folder.name):
            raise FormatError(f"{folder}: {folder.name!r} is not a class folder; expected "
                              f"{root}/<wnid>/*.JPEG with wnids like n01440764")
        found.append(folder.name)
    return found


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _tar_members(path: Path, max_bytes: int) -> Iterator[tarfile.TarInfo]:
    """The file members of a tar, reading headers only (the data is seeked over).

    Each must be a plain member inside the archive of at most ``max_bytes``.
    """
    archive_bytes = path.stat().st_size
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.isfile():
                    member_path(member, path.name)
                    check_member(member, path.name, max_bytes, archive_bytes)
                    yield member
    except (tarfile.TarError, OSError, EOFError) as e:
        raise FormatError(f"{path}: not a readable tar archive ({e})") from None


def _check_span(source: Path, name: str, offset: Any, size: Any, max_bytes: int) -> None:
    """A member's (offset, size) from a shard plan must lie inside the archive: checked
    before ``size`` bytes are allocated for it."""
    if (type(offset) is not int or type(size) is not int or offset < 0
            or not 0 <= size <= max_bytes or offset + size > source.stat().st_size):
        raise FormatError(f"{source}: {name} at offset {offset!r} with {size!r} bytes does "
                          f"not lie inside the archive; run the prepare with --force")


def _images_of(task: dict[str, Any], source: Path) -> Iterator[tuple[str, bytes, int]]:
    """(file name, bytes, label) of every image of a shard task, read in place."""
    kind = task["kind"]
    try:
        if kind == "class-tar":
            _check_span(source, task["member"], task["offset"], task["bytes"],
                        MAX_CLASS_TAR_BYTES)
            label = f"{source.name}:{task['member']}"
            with open(source, "rb") as f, tarfile.open(
                    fileobj=io.BufferedReader(_Slice(f, task["offset"], task["bytes"]),
                                              1 << 20), mode="r|") as inner:
                for member in inner:
                    if member.isfile():
                        check_member(member, label, MAX_IMAGE_BYTES, task["bytes"])
                        data = inner.extractfile(member).read()
                        yield os.path.basename(member.name), data, task["label"]
        elif kind == "tar-members":
            with open(source, "rb") as f:
                for name, offset, size, label in task["members"]:
                    _check_span(source, name, offset, size, MAX_IMAGE_BYTES)
                    f.seek(offset)
                    data = f.read(size)
                    if len(data) != size:
                        raise FormatError(f"{source}: {name} is truncated")
                    yield name, data, label
        elif kind == "files":
            for relative, label in task["files"]:
                *folders, name = str(relative).split("/")
                # <wnid>/<image>, or <wnid>/<wnid>/<image> as some extractions leave it
                if (len(folders) not in (1, 2) or len(set(folders)) != 1
                        or not WNID_RE.fullmatch(folders[0]) or not name
                        or name.startswith(".")):
                    raise FormatError(f"{source}: shard plan names {relative!r}, not "
                                      f"<wnid>/<image>; run the prepare with --force")
                yield name, read_regular(source.joinpath(*folders, name), MAX_IMAGE_BYTES), \
                    label
        else:
            raise RecipeError(f"unknown shard task kind {kind!r}")
    except (tarfile.TarError, EOFError) as e:
        raise FormatError(f"{source}: {task.get('member', 'archive')} is not a readable "
                          f"tar ({e})") from None


# ------------------------------------------------------------------ load + transform


@dataclass(frozen=True)
class JpegTransform(Transform):
    """Decode, crop and resize JPEGs to ``image_size`` squares of uint8; normalize on device.

    Train: RandomResizedCrop(image_size, scale, ratio) and a horizontal flip, drawn
    per batch from ``Batch.generator()``. Eval: resize the shorter side to
    ``round(image_size / crop_fraction)`` and center-crop ``image_size`` (torchvision's
    Resize + CenterCrop, bilinear). ``draft`` decodes at 1/2, 1/4 or 1/8 size when the
    crop needs no more pixels than that. ``device_decode`` leaves the JPEGs encoded in
    the loader and decodes them on the device the batch reaches (nvJPEG on CUDA), where
    the crops then run too.
    """

    image_size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    crop_fraction: float = 0.875
    draft: bool = True
    device_decode: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("scale", "ratio"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 2 or not 0 < value[0] <= value[1]:
                raise ConfigError(f"{name} must be (low, high) with 0 < low <= high, got "
                                  f"{getattr(self, name)!r}")
            object.__setattr__(self, name, value)
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ConfigError(f"image_size must be a positive integer, got {self.image_size!r}")
        if not 0 < self.crop_fraction <= 1:
            raise ConfigError(f"crop_fraction must lie in (0, 1], got {self.crop_fraction!r}")

    @property
    def resize_size(self) -> int:
        """The shorter side before the eval center crop (256 for 224)."""
        return round(self.image_size / self.crop_fraction)

    def on_device(self, images: Any) -> Any:
        from datapipe.decode import EncodedBatch

        if isinstance(images, EncodedBatch):
            images = images.decode()
        return super().on_device(images)


@dataclass(frozen=True)
class JpegLoad(Stage):
    """Memory-map a split's JPEG shards; its dataset decodes in the loader's workers."""

    kind = "load"

    def dataset(self, sources: Mapping[str, PreparedSplit],
                parts: Sequence[tuple[str, np.ndarray]], *, train: bool,
                transform: JpegTransform) -> Any:
        """The torch Dataset of one split: rows ``parts`` of the prepared ``sources``."""
        from datapipe.decode import JpegDataset

        if not isinstance(transform, JpegTransform):
            raise RecipeError(f"JPEG shards need a JpegTransform, got {type(transform).__name__}")
        readers = {name: ShardReader(shard_paths(prepared), prepared.promise())
                   for name, prepared in sources.items()}
        return JpegDataset(readers, parts, transform, train=train)

    def labels(self, prepared: PreparedSplit) -> np.ndarray:
        """Every label of a prepared split, in row order (int64), checked."""
        reader = ShardReader(shard_paths(prepared), prepared.promise())
        return reader.column("label").astype(np.int64)
