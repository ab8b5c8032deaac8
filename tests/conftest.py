"""Shared fixtures: MNIST-format files built here, and the real MNIST files in shared/."""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from datapipe.formats.idx import encode_idx

REAL_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


@dataclass
class FakeMNIST:
    """Small MNIST-format files (gzipped IDX) and the arrays they hold."""

    folder: Path
    files: dict[str, bytes]
    arrays: dict[str, np.ndarray]

    def md5(self, name: str) -> str:
        return hashlib.md5(self.files[name]).hexdigest()


def make_fake_mnist(folder: Path, n_train: int = 600, n_test: int = 100, seed: int = 0):
    """Write the four MNIST files with random images and labels into ``folder``."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, array in arrays.items():
        files[name] = gzip.compress(encode_idx(array), compresslevel=1, mtime=0)
        (folder / name).write_bytes(files[name])
    return FakeMNIST(folder, files, arrays)


@pytest.fixture
def fake_mnist(tmp_path) -> FakeMNIST:
    return make_fake_mnist(tmp_path / "fake-mnist")


@pytest.fixture
def real_mnist() -> Path:
    if not (REAL_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"the real MNIST files are not at {REAL_MNIST} (a checkout without shared/)")
    return REAL_MNIST


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch, tmp_path):
    """No test sees the user's cache, mirrors or recipe folders."""
    monkeypatch.setenv("DATAPIPE_CACHE", str(tmp_path / "default-cache"))
    for name in ("DATAPIPE_MIRRORS", "DATAPIPE_RECIPES", "DATAPIPE_LOCK",
                 "DATAPIPE_LOCK_TIMEOUT", "DATAPIPE_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _no_internet_mirrors(monkeypatch):
    """The built-in recipes' own mirrors point at a closed loopback port in tests.

    Tests never reach outside; a test that wants a mirror passes its loopback
    server with ``mirrors=[...]`` / ``--mirror``.
    """
    import dataclasses

    from loopback import refused_url

    from datapipe.datamodules import cifar, mnist

    dead = refused_url()
    for module, attribute in ((mnist, "RECIPE"), (cifar, "CIFAR10_RECIPE"),
                              (cifar, "CIFAR100_RECIPE")):
        recipe = getattr(module, attribute)
        monkeypatch.setattr(module, attribute, dataclasses.replace(
            recipe, download=dataclasses.replace(recipe.download, mirrors=(dead,))))
