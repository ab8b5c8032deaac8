"""Shared fixtures: MNIST-format files built here, and the real MNIST files in shared/."""

from __future__ import annotations

import errno
import gzip
import hashlib
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from datapipe.formats.idx import encode_idx

REAL_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


TORTURE = Path(__file__).resolve().parent / "torture"


def pytest_collection_modifyitems(config, items):
    """The torture suite (kills, faults, hostile inputs) is slow as a whole: `-m "not slow"`
    leaves it out of the quick loop; CI runs it."""
    for item in items:
        if TORTURE in Path(item.path).parents:
            item.add_marker(pytest.mark.slow)


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
                 "DATAPIPE_LOCK_TIMEOUT", "DATAPIPE_TIMEOUT", "DATAPIPE_MIN_RATE",
                 "DATAPIPE_RATE_WINDOW", "DATAPIPE_MAX_DOWNLOAD"):
        monkeypatch.delenv(name, raising=False)


def _is_loopback(host) -> bool:
    if host in (None, "", "localhost"):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch):
    """No test reaches past this machine, whatever recipe it uses.

    Name lookups and connections to anything but the loopback addresses are refused at
    once, inside this process, as a network without a route would refuse them: every
    registered recipe, built-in or a user's, is cut off from its real mirrors without a
    list to keep. A test that wants a mirror starts a loopback server and passes it with
    ``mirrors=[...]`` / ``--mirror``.
    """
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def getaddrinfo(host, *args, **kwargs):
        if not _is_loopback(host.decode() if isinstance(host, bytes) else host):
            raise socket.gaierror(socket.EAI_NONAME, f"tests reach loopback only, not {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    def refuse(sock, address) -> bool:
        return sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0])

    def connect(sock, address):
        if refuse(sock, address):
            raise ConnectionRefusedError(f"tests reach loopback only, not {address[0]}")
        return real_connect(sock, address)

    def connect_ex(sock, address):
        if refuse(sock, address):
            return errno.ECONNREFUSED
        return real_connect_ex(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
