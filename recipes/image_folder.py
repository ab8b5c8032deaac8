"""Any folder of images sorted into one subfolder per class, as a recipe.

    datapipe --recipes recipes/ prepare image-folder --source ~/pets    # ~/pets/<class>/<image>
    dm = datapipe.load("image-folder", root="~/pets", image_size=64, val_split=0.2)

The layout torchvision's ImageFolder reads: ``root/<class>/<image>`` (images may sit in
subfolders of a class folder), classes in sorted order, files with an image extension
only. Only regular files count (a FIFO or device named like an image is skipped, with a
warning), links are followed only where they lead inside the root, and a file reached
through several links is one row (see datapipe.folders). A root whose subfolders are
all split names (``train``, ``val`` or ``validation``, ``test``), each holding class
folders, gives those splits, as TFDS's ImageFolder reads it.

Images are decoded once, at prepare: converted to RGB (gray with ``channels=1``), scaled
to cover ``image_size`` and center-cropped to it (the aspect ratio is kept), and stored
as one uint8 N x C x H x W column, so batches are memory-mapped gathers, as for MNIST.
Without a val folder, ``val_split`` (default 10%) is carved from train with the seed.

The fingerprint covers the folder's path, a digest of its listing (every image's path,
size and modification time), the classes, the image size and the channels: add or
change an image and the next prepare makes a new entry.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import datapipe
from datapipe import ConfigError, DataModule, DatasetInfo, Download, FormatError, Recipe
from datapipe.folders import Walk, read_regular
from datapipe.stages import Clean, validate_classification
from datapipe.stages.jpeg import check_pixels

log = logging.getLogger("datapipe")

EXTENSIONS = frozenset({".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif",
                        ".tiff", ".webp"})
SPLIT_FOLDERS = ("train", "val", "validation", "test")
MAX_IMAGE_BYTES = 256 << 20  # a file larger than this is no image to train on


def _visible(name: str) -> bool:
    return not name.startswith(".")


def split_folders(root: Path) -> dict[str, str]:
    """Source split -> its folder under ``root`` ("." when root holds the classes)."""
    walk = Walk(root)
    subfolders = {d.name for d in root.iterdir() if _visible(d.name) and walk.is_dir(d)}
    if "train" in subfolders and subfolders <= set(SPLIT_FOLDERS):
        return {name: name for name in SPLIT_FOLDERS if name in subfolders}
    return {"train": "."}


def list_images(root: Path, folders: Mapping[str, str],
                quiet: bool = False) -> dict[str, dict[str, list[str]]]:
    """Split -> class -> image paths relative to ``root``, all sorted.

    Regular files only, each listed once, links followed only inside ``root`` (see
    datapipe.folders); what was skipped is logged unless ``quiet``.
    """
    walk = Walk(root)
    keep = lambda name: os.path.splitext(name)[1].lower() in EXTENSIONS  # noqa: E731
    found: dict[str, dict[str, list[str]]] = {}
    for split, folder in folders.items():
        classes: dict[str, list[str]] = {}
        for class_dir in sorted((root / folder).iterdir()):
            if not _visible(class_dir.name) or not walk.is_dir(class_dir):
                continue
            classes[class_dir.name] = sorted(os.path.relpath(path, root)
                                             for path in walk.files(class_dir, keep))
        found[split] = classes
    if not quiet:
        walk.report()
    return found


def listing_digest(root: Path, images: Mapping[str, Mapping[str, list[str]]]) -> str:
    """A digest of every image's path, size and modification time."""
    digest = hashlib.sha256()
    for split in sorted(images):
        for name in sorted(images[split]):
            for path in images[split][name]:
                st = os.stat(root / path)
                digest.update(f"{split}\0{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def load_image(path: Path, size: tuple[int, int], channels: int) -> np.ndarray:
    """One image file as uint8 C x H x W: converted, scaled to cover ``size``, center-cropped."""
    from PIL import Image, ImageOps

    mode = "L" if channels == 1 else "RGB"
    height, width = size
    data = read_regular(path, MAX_IMAGE_BYTES)  # never blocks on a FIFO named *.jpg
    try:
        with Image.open(io.BytesIO(data)) as image:
            check_pixels(image.size, str(path))  # from the header, before decoding
            image.draft(mode, (width, height))  # JPEG: decode at the smallest sufficient scale
            fitted = ImageOps.fit(image.convert(mode), (width, height),
                                  Image.Resampling.BILINEAR)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise FormatError(f"{path} is not a readable image ({type(e).__name__}: {e}); "
                          f"remove or replace the file") from None
    array = np.asarray(fitted, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


@dataclass(frozen=True)
class ImageFolderClean(Clean):
    """Decode ``root/<class>/<image>`` files into uint8 N x C x H x W images and labels."""

    root: str = ""
    folders: dict[str, str] = field(default_factory=dict)  # source split -> folder under root
    classes: tuple[str, ...] = ()
    image_size: tuple[int, int] = (32, 32)
    channels: int = 3
    # The images are read in place, so this digest of the listing stands for their checksums.
    listing: str = ""

    def splits(self) -> tuple[str, ...]:
        return tuple(self.folders)

    def files_for(self, split: str) -> tuple[str, ...]:
        if split not in self.folders:
            raise self._unknown_split(split)
        return ()  # nothing for the download stage to fetch

    def __call__(self, split: str, files: Mapping[str, Path]) -> dict[str, np.ndarray]:
        self.files_for(split)
        root = Path(self.root)
        images = list_images(root, self.folders, quiet=True)
        if listing_digest(root, images) != self.listing:
            raise FormatError(f"{root} changed after the recipe was made; run the command "
                              f"again to prepare what it holds now")
        index = {name: i for i, name in enumerate(self.classes)}
        paths = [(root / path, index[name])
                 for name, found in images[split].items() for path in found]
        if not paths:
            raise FormatError(f"{root / self.folders[split]} holds no images")
        log.info("decoding %d images of %s", len(paths), root / self.folders[split])
        out = np.empty((len(paths), self.channels, *self.image_size), np.uint8)
        pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
        try:  # PIL decodes with the GIL released: threads scale
            decoded = pool.map(lambda p: load_image(p[0], self.image_size, self.channels), paths)
            for i, image in enumerate(decoded):
                out[i] = image
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        labels = np.array([label for _, label in paths], np.int64)
        columns = {"image": out, "label": labels}
        return validate_classification(columns, len(self.classes), f"{root} {split}")


def _image_size(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    size = (value, value) if isinstance(value, int) else tuple(value)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                 for s in size):
        raise ConfigError(f"image_size must be a positive int or (height, width), got {value!r}")
    return size  # type: ignore[return-value]


def image_folder_recipe(root: str | os.PathLike, image_size: int | tuple[int, int] = 32,
                        channels: int = 3) -> Recipe:
    """The recipe of the images under ``root``: lists the folder, reads no image."""
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(f"image folder {path} does not exist or is not a folder")
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 (gray) or 3 (RGB), got {channels!r}")
    size = _image_size(image_size)
    folders = split_folders(path)
    images = list_images(path, folders)
    classes = tuple(sorted({name for found in images.values() for name in found}))
    if not classes:
        loose = sum(1 for f in path.iterdir() if f.suffix.lower() in EXTENSIONS)
        hint = f"; the {loose} images directly in it need one folder per class" if loose else ""
        raise ConfigError(f"{path} has no class folders: expected {path}/<class>/<image>, "
                          f"e.g. {path}/cat/001.jpg{hint}")
    empty = [name for name in classes
             if not any(found.get(name) for found in images.values())]
    if empty:
        raise ConfigError(f"class folder(s) {', '.join(empty)} under {path} hold no images "
                          f"({', '.join(sorted(EXTENSIONS))}); add images or remove them")
    return Recipe(
        name="image-folder",
        version="1",
        info=DatasetInfo(classes=classes, dims=(channels, *size),
                         description=f"images under {path}, one folder per class"),
        download=Download(resources=()),  # the images are read in place
        clean=ImageFolderClean(root=str(path), folders=folders, classes=classes,
                               image_size=size, channels=channels,
                               listing=listing_digest(path, images)),
    )


@datapipe.register("image-folder")
def image_folder(root: str | os.PathLike | None = None, *,
                 image_size: int | tuple[int, int] = 32, channels: int = 3,
                 val_split: int | float | str | None = None,
                 source: str | os.PathLike | None = None, **overrides) -> DataModule:
    """``root/<class>/<image>`` (``--source`` on the command line) at ``image_size``.

    ``val_split``: the val/validation folder if there is one, else 10% of train,
    carved with the seed; 0 for none.
    """
    root = root if root is not None else source
    if root is None:
        raise ConfigError("image-folder needs its folder: datapipe.load('image-folder', "
                          "root=DIR), or `datapipe prepare image-folder --source DIR`")
    recipe = image_folder_recipe(root, image_size, channels)
    splits = recipe.splits()
    if val_split is None:
        val_split = next((s for s in ("val", "validation") if s in splits), 0.1)
    defaults = {"val_split": val_split, "test_split": "test" if "test" in splits else None}
    return DataModule(recipe, **{**defaults, **overrides})
