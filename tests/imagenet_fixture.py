"""A format-exact miniature of the ILSVRC2012 archives, built here from scratch.

    ILSVRC2012_img_train.tar       a tar of per-class tars n01440764.tar, ... each holding
                                   n01440764_<k>.JPEG (members deliberately unsorted)
    ILSVRC2012_img_val.tar         flat ILSVRC2012_val_00000001.JPEG, ...
    ILSVRC2012_devkit_t12.tar.gz   ILSVRC2012_devkit_t12/data/meta.mat (a ``synsets``
                                   struct array written by scipy.io.savemat: 1000 leaves
                                   with shuffled ILSVRC2012_IDs, plus inner nodes) and
                                   data/ILSVRC2012_validation_ground_truth.txt

Only a few classes hold images. Among the images: a grayscale JPEG, a CMYK JPEG and
a PNG named .JPEG (as in the real archives), and one image larger than the rest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

TRAIN, VAL, DEVKIT = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar",
                      "ILSVRC2012_devkit_t12.tar.gz")
POPULATED = (
    ("n01440764", "tench, Tinca tinca"),
    ("n01443537", "goldfish, Carassius auratus"),
    ("n01484850", "great white shark, white shark, man-eater, man-eating shark, "
                  "Carcharodon carcharias"),
    ("n01491361", "tiger shark, Galeocerdo cuvieri"),
)


@dataclass
class FakeImageNet:
    folder: Path
    files: dict[str, bytes]
    train: dict[str, dict[str, bytes]]  # wnid -> image name -> bytes
    val: list[tuple[str, str, bytes]]  # (name, wnid, bytes), in number order
    leaves: list[tuple[int, str, str]]  # (ILSVRC2012_ID, wnid, words) of the 1000 classes
    special: dict[str, str] = field(default_factory=dict)  # image name -> what it is

    def md5(self, name: str) -> str:
        return hashlib.md5(self.files[name]).hexdigest()

    @property
    def sorted_wnids(self) -> list[str]:
        return sorted(w for _, w, _ in self.leaves)

    def label(self, wnid: str) -> int:
        return self.sorted_wnids.index(wnid)


def photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth, photo-like RGB uint8 image (gradients, a blob and a little noise)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        a, b, c = rng.uniform(-1, 1, 3)
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(5, 40)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        channels.append(128 + 60 * (a * x / width + b * y / height) + 80 * c * blob)
    image = np.stack(channels, axis=-1) + rng.normal(0, 4, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def encode(array: np.ndarray, kind: str = "rgb") -> bytes:
    image = Image.fromarray(array)
    out = io.BytesIO()
    if kind == "gray":
        image.convert("L").save(out, "JPEG", quality=90)
    elif kind == "cmyk":
        image.convert("CMYK").save(out, "JPEG", quality=90)
    elif kind == "png":
        image.save(out, "PNG")
    else:
        image.save(out, "JPEG", quality=90)
    return out.getvalue()


def tar_bytes(members: list[tuple[str, bytes]], gzip: bool = False) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz" if gzip else "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_300_000_000
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def meta_mat(leaves: list[tuple[int, str, str]], inner: list[tuple[int, str, str]]) -> bytes:
    """meta.mat bytes: the devkit's ``synsets`` struct array (leaves, then inner nodes)."""
    import scipy.io

    names = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
             "wordnet_height", "num_train_images")
    synsets = np.zeros((len(leaves) + len(inner), 1), dtype=[(n, "O") for n in names])
    for row, (ident, wnid, words) in enumerate(leaves):
        synsets[row, 0] = (np.uint16(ident), wnid, words, f"a gloss of {words}", np.uint8(0),
                           np.zeros((1, 0)), np.uint8(0), np.uint16(1300))
    for row, (ident, wnid, words) in enumerate(inner, start=len(leaves)):
        synsets[row, 0] = (np.uint16(ident), wnid, words, "an inner node", np.uint8(2),
                           np.array([[1, 2]], np.uint16), np.uint8(3), np.uint16(0))
    out = io.BytesIO()
    scipy.io.savemat(out, {"synsets": synsets})
    return out.getvalue()


def make_fake_imagenet(folder: Path, classes: int = 3, per_class: int = 6, n_val: int = 9,
                       size: tuple[int, int] = (40, 30), big: tuple[int, int] = (160, 120),
                       seed: int = 0) -> FakeImageNet:
    """Write the three archives into ``folder``; return what they hold."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    populated = POPULATED[:classes] if classes <= len(POPULATED) else POPULATED + tuple(
        (f"n0160{i:04d}", f"extra class {i}") for i in range(classes - len(POPULATED)))
    others = [(f"n{10000000 + 7919 * i:08d}", f"class {i}") for i in range(1000 - len(populated))]
    ids = rng.permutation(1000) + 1
    leaves = [(int(ids[i]), wnid, words)
              for i, (wnid, words) in enumerate([*populated, *others])]
    inner = [(1001 + i, f"n0000000{i}", f"inner node {i}") for i in range(3)]
    id_of = {wnid: ident for ident, wnid, _ in leaves}
    special = {}

    def image(kind: str = "rgb", dims: tuple[int, int] | None = None) -> bytes:
        w, h = dims or (int(size[0] + rng.integers(-6, 7)), int(size[1] + rng.integers(-6, 7)))
        return encode(photo(rng, w, h), kind)

    train: dict[str, dict[str, bytes]] = {}
    for c, (wnid, _) in enumerate(populated):
        images = {}
        for k in range(per_class):
            name = f"{wnid}_{10026 + 97 * k}.JPEG"
            kind = "gray" if (c, k) == (0, 0) else "cmyk" if (c, k) == (1 % classes, 1) else "rgb"
            images[name] = image(kind, big if (c, k) == (0, 1) else None)
            if kind != "rgb":
                special[name] = kind
            elif (c, k) == (0, 1):
                special[name] = "big"
        train[wnid] = images
    val = []
    for k in range(n_val):
        wnid = populated[k % classes][0]
        name = f"ILSVRC2012_val_{k + 1:08d}.JPEG"
        kind = "png" if k == 2 else "rgb"
        val.append((name, wnid, image(kind)))
        if kind != "rgb":
            special[name] = kind
    inner_tars = [(f"{wnid}.tar", tar_bytes(list(reversed(images.items()))))
                  for wnid, images in train.items()]
    files = {
        TRAIN: tar_bytes(list(reversed(inner_tars))),
        VAL: tar_bytes([(name, data) for name, _, data in reversed(val)]),
        DEVKIT: tar_bytes([
            ("ILSVRC2012_devkit_t12/COPYING", b"devkit license\n"),
            ("ILSVRC2012_devkit_t12/data/meta.mat", meta_mat(leaves, inner)),
            ("ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
             "".join(f"{id_of[wnid]}\n" for _, wnid, _ in val).encode()),
        ], gzip=True),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return FakeImageNet(folder, files, train, val, leaves, special)


def recipe_for(folder: Path, **clean: object):
    """The imagenet recipe with the md5s of the archives in ``folder`` (so it verifies)."""
    from datapipe.datamodules.imagenet import RECIPE, ImageNetDownload
    from datapipe.stages.download import Resource

    md5s = {name: hashlib.md5((Path(folder) / name).read_bytes()).hexdigest()
            for name in (TRAIN, VAL, DEVKIT)}
    download = ImageNetDownload(resources=tuple(Resource(n, md5=m) for n, m in md5s.items()))
    return dataclasses.replace(RECIPE, download=download,
                               clean=dataclasses.replace(RECIPE.clean, **clean))
