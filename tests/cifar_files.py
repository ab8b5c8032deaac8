"""CIFAR-format tarballs for tests: the official layout, real Python-2-style pickles.

    fake = make_fake_cifar10(tmp_path / "files")          # folder for --source / a mirror
    fake.arrays["train"]["image"]                          # what the batches hold
    make_fake_cifar10(..., replace={"data_batch_2": evil}) # swap a member's bytes

Members are pickled as the originals are (protocol 2, byte-string keys, numpy arrays
as ``numpy.core.multiarray._reconstruct``) by datapipe.formats.cifar.encode_pickle,
and tarred and gzipped in a non-alphabetical order, with a folder entry first, as
in the official archives.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datapipe.datamodules.cifar import (
    CIFAR10_CLASSES,
    CIFAR10_FOLDER,
    CIFAR100_COARSE_CLASSES,
    CIFAR100_FINE_CLASSES,
    CIFAR100_FOLDER,
)
from datapipe.formats.cifar import encode_batch, encode_pickle

README = b"<meta HTTP-EQUIV=\"REFRESH\" content=\"0; URL=http://www.cs.toronto.edu/~kriz/cifar.html\">\n"


@dataclass
class FakeCIFAR:
    """A CIFAR-format tarball in ``folder`` and what its members hold."""

    folder: Path
    filename: str
    data: bytes  # the tarball
    members: dict[str, bytes]  # member path -> bytes
    arrays: dict[str, dict[str, np.ndarray]]  # split -> {"image": N x 3 x 32 x 32, labels...}

    @property
    def path(self) -> Path:
        return self.folder / self.filename

    @property
    def md5(self) -> str:
        return hashlib.md5(self.data).hexdigest()

    def extract(self, root: Path) -> Path:
        """Unpack the tarball under ``root`` (for torchvision); returns ``root``."""
        with tarfile.open(self.path) as tar:
            tar.extractall(root, filter="data")
        return root


def tarball(members: dict[str, bytes], folder: str) -> bytes:
    """A gzipped tar of ``members`` (path -> bytes) after an entry for ``folder``."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        entry = tarfile.TarInfo(folder)
        entry.type, entry.mode, entry.mtime = tarfile.DIRTYPE, 0o755, 1241484390
        tar.addfile(entry)
        for path, data in members.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), 0o644, 1241484390
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), compresslevel=1, mtime=0)


def _write(folder: Path, filename: str, top: str, members: dict[str, bytes],
           replace: dict[str, bytes] | None, arrays) -> FakeCIFAR:
    for name, data in (replace or {}).items():
        if f"{top}/{name}" not in members:
            raise KeyError(f"no member {name} to replace")
        members[f"{top}/{name}"] = data
    data = tarball(members, top)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / filename).write_bytes(data)
    return FakeCIFAR(folder, filename, data, members, arrays)


def make_fake_cifar10(folder: Path, per_batch: int = 60, seed: int = 0,
                      classes: tuple[str, ...] = CIFAR10_CLASSES,
                      replace: dict[str, bytes] | None = None) -> FakeCIFAR:
    """cifar-10-python.tar.gz with 5 x ``per_batch`` train and ``per_batch`` test images."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (6 * per_batch, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, 6 * per_batch)
    batches = {}
    for i, name in enumerate(["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                              "data_batch_5", "test_batch"]):
        rows = slice(i * per_batch, (i + 1) * per_batch)
        title = "testing batch 1 of 1" if name == "test_batch" else f"training batch {i + 1} of 5"
        batches[name] = encode_batch(images[rows], {"labels": labels[rows]}, title)
    meta = encode_pickle({b"num_cases_per_batch": per_batch,
                          b"label_names": [c.encode() for c in classes], b"num_vis": 3072})
    order = ["data_batch_4", "readme.html", "test_batch", "data_batch_3", "batches.meta",
             "data_batch_2", "data_batch_5", "data_batch_1"]
    contents = {**batches, "batches.meta": meta, "readme.html": README}
    members = {f"{CIFAR10_FOLDER}/{name}": contents[name] for name in order}
    n_train = 5 * per_batch
    arrays = {
        "train": {"image": images[:n_train], "labels": labels[:n_train]},
        "test": {"image": images[n_train:], "labels": labels[n_train:]},
    }
    return _write(folder, "cifar-10-python.tar.gz", CIFAR10_FOLDER, members, replace, arrays)


def make_fake_cifar100(folder: Path, n_train: int = 300, n_test: int = 100, seed: int = 0,
                       replace: dict[str, bytes] | None = None) -> FakeCIFAR:
    """cifar-100-python.tar.gz: train, test (fine and coarse labels) and meta."""
    rng = np.random.default_rng(seed)
    arrays, members = {}, {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        fine = rng.integers(0, 100, n)
        coarse = fine // 5  # any fixed map will do; the real one is a table
        arrays[split] = {"image": images, "fine_labels": fine, "coarse_labels": coarse}
        members[f"{CIFAR100_FOLDER}/{split}"] = encode_batch(
            images, {"fine_labels": fine, "coarse_labels": coarse}, f"{split}ing batch 1 of 1")
    members[f"{CIFAR100_FOLDER}/meta"] = encode_pickle({
        b"fine_label_names": [c.encode() for c in CIFAR100_FINE_CLASSES],
        b"coarse_label_names": [c.encode() for c in CIFAR100_COARSE_CLASSES],
    })
    return _write(folder, "cifar-100-python.tar.gz", CIFAR100_FOLDER, members, replace, arrays)
