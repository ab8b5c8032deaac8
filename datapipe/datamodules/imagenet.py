"""ImageNet (ILSVRC2012): 1.28M training and 50,000 validation images, 1000 classes.

Downloaded by hand: image-net.org gives the archives only to registered users, so
``datapipe prepare imagenet --source DIR`` takes them from DIR, where DIR holds

    ILSVRC2012_img_train.tar       138 GB, md5 1d675b47d978889d74fa0da5fadfb00e
    ILSVRC2012_img_val.tar         6.3 GB, md5 29b22e2961454d5413ddabcf34fc5622
    ILSVRC2012_devkit_t12.tar.gz   2.5 MB, md5 fa75699e90414af021442c21a62c3abf

(verified, with a progress bar while hashing; the digests are memoized, so this
happens once). An already extracted tree is taken too: where DIR has no
``ILSVRC2012_img_train.tar`` but a ``train/`` folder (and likewise ``val/``), the
images are read from ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` (the layout
torchvision's ImageNet leaves; ``train/<wnid>/<wnid>/*.JPEG``, as some extractions
leave it, too). Such a tree cannot be checked against the archives' md5s, so it needs
``--no-verify``. The class names come from the devkit, else from torchvision's
``meta.bin`` (read without torch, by an unpickler that admits no globals), else -- for
a tree -- the class folders' wnids.

Classes: their names are the devkit's, not a list in this file. The recipe declares
``num_classes = 1000`` (all a model needs before any data exists); prepare records the
classes (label, wnid, ILSVRC2012_ID, names) in each manifest, and the DataModule's
``classes`` are those names once the data is prepared. Any subset is taken: a devkit
with fewer leaf synsets (torchvision's test devkits), or a tree with fewer class
folders (an ImageNet-100); labels are positions of the wnids present in sorted order,
as in torchvision's ``ImageNet``/``ImageFolder``, so torchvision's pretrained models
score on a full set as they are. Splits over different classes are refused.

Splits: the source splits are ``train`` and ``val`` (the official validation set).
The module's test part is ``val``; its val part is carved from train,
``num_imgs_per_val_class`` images of every class (lightning-bolts' rule), seeded
and cached.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datapipe.cache import Cache
from datapipe.cores import available_cores
from datapipe.datamodule import DataModule
from datapipe.errors import (
    ChecksumError,
    ConfigError,
    DatapipeError,
    DownloadError,
    FormatError,
    NotPreparedError,
    UnverifiedDataWarning,
)
from datapipe.formats.torch_meta import META_BIN
from datapipe.prepare import PreparedSplit, find_prepared
from datapipe.recipe import DatasetInfo, Recipe
from datapipe.splits import DEFAULT_SPLITS, PerClass
from datapipe.stages.download import (
    MIRRORS_ENV,
    Download,
    FetchOptions,
    LocalFile,
    Resource,
    source_digest,
)
from datapipe.stages.jpeg import ImageNetClean, JpegLoad, JpegTransform
from datapipe.stages.source_layout import is_regular
from datapipe.vision import VisionDataModule

TRAIN_FILE = "ILSVRC2012_img_train.tar"
VAL_FILE = "ILSVRC2012_img_val.tar"
DEVKIT_FILE = "ILSVRC2012_devkit_t12.tar.gz"

RESOURCES = (
    Resource(TRAIN_FILE, md5="1d675b47d978889d74fa0da5fadfb00e"),
    Resource(VAL_FILE, md5="29b22e2961454d5413ddabcf34fc5622"),
    Resource(DEVKIT_FILE, md5="fa75699e90414af021442c21a62c3abf"),
)

# Where an extracted tree keeps what each archive holds.
EXTRACTED = {TRAIN_FILE: "train", VAL_FILE: "val"}

HOW_TO_GET = (
    f"ImageNet is downloaded by hand: register at https://image-net.org, download "
    f"{TRAIN_FILE}, {VAL_FILE} and {DEVKIT_FILE} (ILSVRC2012) into one folder, and run "
    f"`datapipe prepare imagenet --source DIR` (or pass source=DIR)"
)

# The statistics every ImageNet model uses (torchvision's, computed on the train set).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DevkitInfo(DatasetInfo):
    """DatasetInfo whose class names come from the devkit at prepare time.

    ``classes`` stays empty until the data is prepared; ``num_classes`` is the
    declared ``class_count`` until then.
    """

    class_count: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.classes) or self.class_count


@dataclass(frozen=True)
class ImageNetFetchOptions(FetchOptions):
    """FetchOptions with lightning-bolts' ``meta_dir``: where the devkit is, when not in
    the source folder (run-time, as every fetch option: no part of any fingerprint)."""

    meta_dir: str | None = None


@dataclass(frozen=True)
class ImageNetDownload(Download):
    """The download stage of a dataset that is downloaded by hand.

    Files come from ``--source DIR`` (an archive, or for the image archives an
    extracted ``train/`` or ``val/`` tree in its place), the download cache, or a
    mirror the user names; without any of them the error says where to get them.
    """

    def fetch(self, filenames: Iterable[str] | str | None, cache: Cache,
              options: FetchOptions | None = None) -> dict[str, LocalFile]:
        options = options or FetchOptions()
        names = [r.filename for r in self._select(filenames)]
        if options.source is None:
            mirrors = (*options.mirrors, *os.environ.get(MIRRORS_ENV, "").split(), *self.mirrors)
            missing = [n for n in names if self.cached(n, cache, verify=options.verify) is None]
            if missing and not mirrors:
                raise DownloadError(f"{', '.join(missing)} not found; {HOW_TO_GET}")
            return super().fetch(names, cache, options)
        folder = Path(options.source).expanduser().absolute()
        if not folder.is_dir():
            raise DownloadError(f"--source {folder} is not a folder; {HOW_TO_GET}")
        trees = {n: folder / EXTRACTED[n] for n in names if n in EXTRACTED
                 and not (folder / n).is_file() and (folder / EXTRACTED[n]).is_dir()}
        # lightning-bolts' meta_dir: the class metadata (the devkit, or torchvision's
        # meta.bin) may lie apart; it is read from there as from any source folder.
        meta_dir = getattr(options, "meta_dir", None)
        held: dict[str, LocalFile] = {}
        if meta_dir is not None and DEVKIT_FILE in names and not (folder / DEVKIT_FILE).is_file():
            held = self.fetch([DEVKIT_FILE], cache, dataclasses.replace(
                options, source=str(Path(meta_dir).expanduser().absolute()), meta_dir=None))
            names = [n for n in names if n != DEVKIT_FILE]
        # torchvision's ImageNet root keeps the devkit parsed into meta.bin; a tree
        # without either is taken too, its class folders naming the classes.
        meta = folder / META_BIN
        stand_in = (DEVKIT_FILE in names and not is_regular(folder / DEVKIT_FILE)
                    and is_regular(meta))
        optional = {DEVKIT_FILE} if trees and not stand_in else set()
        missing = [n for n in names if n not in trees and not (folder / n).is_file()
                   and not (n == DEVKIT_FILE and stand_in) and n not in optional]
        if missing:
            raise DownloadError(f"--source {folder} lacks {', '.join(missing)}; {HOW_TO_GET}; "
                                f"an extracted train/<wnid>/*.JPEG, val/<wnid>/*.JPEG tree "
                                f"may stand in for the image archives, and torchvision's "
                                f"{META_BIN} for the devkit")
        local = {n: _extracted_tree(self.resource(n), trees[n], options) for n in trees}
        local.update(held)
        if stand_in:
            local[DEVKIT_FILE] = _meta_bin(self.resource(DEVKIT_FILE), meta, cache, options)
        archives = [n for n in names if n not in local and (folder / n).is_file()]
        if archives:
            local.update(super().fetch(archives, cache, options))
        return local


def _unverifiable(r: Resource, path: Path, kind: str, named: str, options: FetchOptions,
                  remedy: str) -> None:
    """Refuse ``path`` (``kind``) in place of ``r`` unless asked to go unverified; then warn."""
    if options.verify:
        raise ChecksumError(
            f"{path} is {kind}, which cannot be checked against the md5 of {r.filename}; "
            f"pass --no-verify (verify=False) to use it (its cache entry is marked "
            f"unverified), or {remedy}")
    warnings.warn(f"{r.filename}: using {named} unverified, as asked (--no-verify)",
                  UnverifiedDataWarning, stacklevel=4)


def _extracted_tree(r: Resource, root: Path, options: FetchOptions) -> LocalFile:
    """An extracted tree in place of archive ``r``: identified by its listing, unverified."""
    _unverifiable(r, root, "an extracted tree", f"the extracted tree {root}", options,
                  "give the archive itself")
    return LocalFile(r.filename, root, "sha256-listing", _listing_digest(root),
                     r.checksum[1] if r.checksum else None, False, str(root))


def _meta_bin(r: Resource, path: Path, cache: Cache, options: FetchOptions) -> LocalFile:
    """torchvision's meta.bin in place of the devkit: its own file, so unverified."""
    _unverifiable(r, path, "torchvision's parse of the devkit", f"torchvision's {path}",
                  options, "put the devkit itself beside it")
    return LocalFile(r.filename, path, "sha256", source_digest(path, "sha256", cache),
                     None, False, f"{path} (torchvision's meta.bin)")


def _listing_digest(root: Path) -> str:
    """sha256 of every file's relative path and size under ``root``, in sorted order."""
    digest = hashlib.sha256()
    for folder, subfolders, names in os.walk(root):
        subfolders.sort()
        relative = os.path.relpath(folder, root)
        for name in sorted(names):
            size = os.stat(os.path.join(folder, name)).st_size
            digest.update(f"{relative}/{name}\t{size}\n".encode())
    return digest.hexdigest()


RECIPE = Recipe(
    name="imagenet",
    version="1",
    info=DevkitInfo(
        classes=(),  # the devkit's, recorded at prepare time; see the module docstring
        class_count=1000,
        dims=(3, 224, 224),
        mean=MEAN,
        std=STD,
        description="ILSVRC2012 classification: 1,281,167 training and 50,000 validation "
                    "images of 1000 classes, stored as RGB JPEGs of shorter side <= 256.",
        homepage="https://image-net.org/challenges/LSVRC/2012/",
        license="ImageNet terms of access (non-commercial research and education)",
    ),
    download=ImageNetDownload(resources=RESOURCES),
    clean=ImageNetClean(train_file=TRAIN_FILE, val_file=VAL_FILE, devkit_file=DEVKIT_FILE),
    load=JpegLoad(),
    transform=JpegTransform(),
)


def _default_workers() -> int:
    return min(8, available_cores())


class ImageNetDataModule(VisionDataModule):
    """ImageNet with the constructor of lightning-bolts' ImagenetDataModule.

    ``data_dir`` is what it is in bolts: the folder holding ImageNet as you have it (the
    archives, or an extracted ``train/``, ``val/`` tree), read once at prepare into the
    cache (``cache_dir``, else ``$DATAPIPE_CACHE``). ``meta_dir`` is where the class
    metadata is, when not in ``data_dir``: the folder of the devkit
    (``ILSVRC2012_devkit_t12.tar.gz``). ``source=`` is another name for ``data_dir``.

    ``num_imgs_per_val_class`` images of every class are carved from train as the val
    part (seeded by ``seed``, cached); the official validation set is the test part.
    ``val_split`` (a count, fraction or split spec such as ``"val"``) replaces that
    carve when given. Batches are uint8 N x 3 x image_size x image_size (train:
    RandomResizedCrop + flip; eval: resize to image_size / 0.875, center crop),
    normalized on the device with the ImageNet mean/std (always, in bolts; here unless
    ``normalize=False``). ``device_decode=True`` decodes the JPEGs on the device
    (nvJPEG) instead of in the loader's workers. ``max_short_side`` (None: keep every
    image at full size) and ``quality`` shape the prepared JPEGs, and so the cache
    entry: 256 holds everything the 224-pixel eval crop needs (resize to 256, crop 224)
    in about a quarter of the archive's bytes. ``num_workers=None`` (the default) decodes
    in min(8, cores) worker processes. Other keywords go to DataModule (``verify``,
    split specs, ...).
    """

    name = "imagenet"
    mean = MEAN
    std = STD
    train_samples = 1281167

    @classmethod
    def default_recipe(cls) -> Recipe:
        return RECIPE

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        meta_dir: str | os.PathLike | None = None,
        num_imgs_per_val_class: int = 50,
        image_size: int = 224,
        num_workers: int | None = None,
        batch_size: int | None = None,
        shuffle: bool | str | None = None,
        pin_memory: bool | None = None,
        drop_last: bool | None = None,
        *,
        seed: int = DEFAULT_SPLITS.seed,
        normalize: bool = True,  # bolts' ImagenetDataModule always normalizes
        val_split: int | float | str | None = None,
        test_split: str | None = "val",
        device_decode: bool = False,
        max_short_side: int | None = 256,
        quality: int = 90,
        train_transforms: Any = None,
        val_transforms: Any = None,
        test_transforms: Any = None,
        recipe: Recipe | None = None,
        **kwargs: Any,
    ) -> None:
        recipe = recipe if recipe is not None else self.default_recipe()
        recipe = dataclasses.replace(
            recipe,
            info=dataclasses.replace(recipe.info, dims=(3, image_size, image_size)),
            clean=dataclasses.replace(recipe.clean, max_short_side=max_short_side,
                                      quality=quality),
            transform=dataclasses.replace(recipe.transform, image_size=image_size,
                                          device_decode=device_decode),
        )
        source = kwargs.pop("source", None)
        if data_dir is not None and source is not None and \
                Path(data_dir).expanduser() != Path(source).expanduser():
            raise ConfigError(f"data_dir={os.fspath(data_dir)!r} and source="
                              f"{os.fspath(source)!r} name two ImageNet folders; give one")
        self.num_imgs_per_val_class = num_imgs_per_val_class
        self.image_size = image_size
        self.meta_dir = os.fspath(meta_dir) if meta_dir is not None else None
        DataModule.__init__(
            self,
            recipe,
            batch_size=batch_size,
            num_workers=_default_workers() if num_workers is None else num_workers,
            seed=seed,
            shuffle=shuffle,
            pin_memory=pin_memory,
            drop_last=drop_last,
            normalize=normalize,
            val_split=PerClass(num_imgs_per_val_class) if val_split is None else val_split,
            test_split=test_split,
            source=data_dir if data_dir is not None else source,
            train_transforms=train_transforms,
            val_transforms=val_transforms,
            test_transforms=test_transforms,
            **kwargs,
        )
        self.data_dir = self.fetch_options.source  # bolts: where ImageNet is, not the cache
        self.fetch_options = ImageNetFetchOptions(**vars(self.fetch_options),
                                                  meta_dir=self.meta_dir)
        self._val_split = val_split
        self._class_records: list[dict[str, Any]] = []
        self._adopt_classes()

    @property
    def dims(self) -> tuple[int, ...]:
        return (3, self.image_size, self.image_size)

    def _declared_train_samples(self) -> int | None:
        """bolts' count: the train images less ``num_imgs_per_val_class`` of each class."""
        if self.splits.train != "train" or not isinstance(self.splits.val, PerClass):
            return None
        return self.train_samples - self.splits.val.count * self.num_classes

    # ------------------------------------------------------------------ classes

    @property
    def classes(self) -> list[str]:
        """The devkit's names of the 1000 classes, in label order (once prepared)."""
        self._adopt_classes()
        if not self.recipe.info.classes:
            raise NotPreparedError(f"the class names of {self.name} come from its devkit; "
                                   f"call prepare_data() or run `datapipe prepare {self.name}`")
        return list(self.recipe.info.classes)

    @property
    def wnids(self) -> list[str]:
        """The WordNet ids of the classes, in label order (once prepared)."""
        _ = self.classes  # raises when not prepared
        return [c["wnid"] for c in self._class_records]

    def _adopt_classes(self, prepared: PreparedSplit | None = None) -> None:
        """Take the class names from a prepared split's manifest, if there is one."""
        if self.recipe.info.classes:
            return
        candidates = [prepared] if prepared is not None else list(self.prepared.values())
        if not candidates:
            # Only look-ups that never hash a file: no --source here.
            options = FetchOptions(verify=self.fetch_options.verify)
            for split in self.recipe.splits():
                with contextlib.suppress(DatapipeError, OSError):
                    candidates.append(find_prepared(self.recipe, split, self.cache, options))
        for candidate in candidates:
            records = candidate.manifest.get("classes") if candidate is not None else None
            if records:
                self._class_records = list(records)
                self.recipe = dataclasses.replace(self.recipe, info=dataclasses.replace(
                    self.recipe.info, classes=tuple(c["words"] for c in records)))
                return

    def _check_same_classes(self) -> None:
        """Splits labelled over other classes (a train tree of 100 classes, a val of 99 or
        of all 1000) would give one label two meanings: refused, naming the difference."""
        seen: dict[tuple[str, ...], str] = {}
        for split, prepared in sorted(self.prepared.items()):
            records = prepared.manifest.get("classes") or []
            seen.setdefault(tuple(c.get("wnid", "") for c in records), split)
        if len(seen) > 1:
            (a, split_a), (b, split_b) = list(seen.items())[:2]
            differ = sorted(set(a) ^ set(b))
            raise FormatError(f"{self.name} {split_a} has {len(a)} classes and {split_b} "
                              f"{len(b)} (they differ in {', '.join(differ[:3])}"
                              f"{', ...' if len(differ) > 3 else ''}); give both splits the "
                              f"same class folders, so labels mean the same in each")

    # ------------------------------------------------------------------ hooks

    def prepare_data(self, splits: Iterable[str] | None = None,
                     force: bool = False) -> dict[str, PreparedSplit]:
        prepared = super().prepare_data(splits, force=force)
        self._check_same_classes()
        self._adopt_classes()
        return prepared

    def _make_plan(self, specs):
        plan = super()._make_plan(specs)
        self._check_same_classes()
        self._adopt_classes()
        return plan
