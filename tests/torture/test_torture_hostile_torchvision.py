"""Hostile torchvision folders: a meta.bin crafted to run code or allocate, and FIFOs,
devices, huge files and link loops where torchvision's folders keep their files.

Each input is fed to the real prepare path (``prepare_split`` with ``--source``) and
counted with ``figures.attack(class, breach)``: defended means one line (a
DatapipeError) or a correct prepare that leaves the bad part alone, nothing run (the
code payloads write a marker file, which must never appear), nothing hung.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import shutil
import threading
import zipfile
from pathlib import Path

import pytest
import torture_kit as kit
from cifar_files import make_fake_cifar10
from imagenet_fixture import make_fake_imagenet, recipe_for

from datapipe.cache import Cache
from datapipe.datamodules.cifar import CIFAR10_RECIPE
from datapipe.datamodules.mnist import RECIPE as MNIST
from datapipe.errors import DatapipeError
from datapipe.prepare import prepare_split
from datapipe.stages.download import FetchOptions

figures = kit.figures  # the suite's shared fixture
REAL_MNIST = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist"
BOUND = 60.0  # seconds any one attack may take before it counts as a hang


def torch_file(pickled: bytes, *, compress: bool = False, name: str = "archive") -> bytes:
    """A zip laid out as torch.save lays it out, holding ``pickled`` as data.pkl."""
    out = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(out, "w", method) as archive:
        archive.writestr(f"{name}/data.pkl", pickled)
        archive.writestr(f"{name}/byteorder", b"little")
        archive.writestr(f"{name}/version", b"3\n")
    return out.getvalue()


def reduce_call(marker: Path) -> bytes:
    """A protocol-2 pickle whose REDUCE calls os.system to create ``marker``."""
    command = f"touch {marker}".encode()
    return (b"\x80\x02cposix\nsystem\nX" + len(command).to_bytes(4, "little") + command
            + b"\x85R.")


def persistent(marker: Path) -> bytes:
    return b"\x80\x02(X\x03\x00\x00\x00abcq\x00tQ."  # BINPERSID of a tuple


def laughs(width: int = 200, depth: int = 6) -> bytes:
    """(dict, list) whose list is ``depth`` levels of ``width`` shared references."""
    out = [b"\x80\x02}]K\x01a"]
    for level in range(depth):
        out.append(b"q" + bytes([level]) + b"0")
        out.append(b"](" + (b"h" + bytes([level])) * width + b"e")
    out.append(b"\x86.")
    return b"".join(out)


def within_bound(call) -> tuple[bool, BaseException | None]:
    """Run ``call`` in a thread; (finished within BOUND, what it raised)."""
    raised: list[BaseException] = []

    def run():
        try:
            call()
        except BaseException as e:  # noqa: BLE001 -- judged by the caller
            raised.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(BOUND)
    return not thread.is_alive(), raised[0] if raised else None


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    fake = make_fake_imagenet(tmp_path_factory.mktemp("imagenet"), per_class=2, n_val=3)
    return fake, recipe_for(fake.folder)


def imagenet_tree(fake, root: Path) -> Path:
    """root/train/<wnid>/*.JPEG of the fixture's classes."""
    for wnid, images in fake.train.items():
        (root / "train" / wnid).mkdir(parents=True)
        for name, data in images.items():
            (root / "train" / wnid / name).write_bytes(data)
    return root


META_BIN_ATTACKS = {
    "global os.system": lambda marker: torch_file(reduce_call(marker)),
    "persistent id": lambda marker: torch_file(persistent(marker)),
    "billion laughs": lambda marker: torch_file(laughs()),
    "zip bomb": lambda marker: torch_file(b"\x80\x02" + b"N" * (300 << 20), compress=True),
    "legacy format": lambda marker: pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2),
    "two data.pkl": lambda marker: torch_file(b"N.", name="a")[:-22] + torch_file(b"N.", name="b"),
}


@pytest.mark.parametrize("attack", sorted(META_BIN_ATTACKS))
@pytest.mark.parametrize("with_tree", [True, False], ids=["tree", "val-archive"])
def test_a_hostile_meta_bin_runs_nothing_and_allocates_nothing(
        attack, with_tree, imagenet, figures, tmp_path):
    fake, recipe = imagenet
    marker = tmp_path / "pwned"
    root = tmp_path / "root"
    root.mkdir()
    if with_tree:
        imagenet_tree(fake, root)
    else:
        shutil.copy(fake.folder / "ILSVRC2012_img_val.tar", root)
    (root / "meta.bin").write_bytes(META_BIN_ATTACKS[attack](marker))
    split = "train" if with_tree else "val"
    options = FetchOptions(source=str(root), verify=False)
    done, raised = within_bound(lambda: prepare_split(recipe, split, Cache.at(tmp_path / "c"),
                                                      options, processes=1))
    ran = marker.exists()
    if with_tree:  # meta.bin unreadable: the tree's folders name the classes
        defended = raised is None or isinstance(raised, DatapipeError)
    else:  # nothing else labels the val archive: one line
        defended = isinstance(raised, DatapipeError) and "\n" not in str(raised)
    figures.attack("pickles", "code" if ran else "hang" if not done else
                   None if defended else "served")
    assert done and not ran and defended, raised


def test_a_fifo_named_meta_bin_is_never_opened(imagenet, figures, tmp_path):
    fake, recipe = imagenet
    root = imagenet_tree(fake, tmp_path / "root")
    os.mkfifo(root / "meta.bin")
    done, raised = within_bound(lambda: prepare_split(
        recipe, "train", Cache.at(tmp_path / "c"),
        FetchOptions(source=str(root), verify=False), processes=1))
    figures.attack("folders", None if done and raised is None else "hang" if not done
                   else "served")
    assert done and raised is None


def test_nested_class_folder_that_loops_back_is_walked_once(imagenet, figures, tmp_path):
    fake, recipe = imagenet
    root = tmp_path / "root"
    wnid = sorted(fake.train)[0]
    (root / "train" / wnid).mkdir(parents=True)
    os.symlink(".", root / "train" / wnid / wnid)  # train/<wnid>/<wnid> -> itself
    other = sorted(fake.train)[1]
    (root / "train" / other).mkdir()
    for name, data in fake.train[other].items():
        (root / "train" / other / name).write_bytes(data)
    done, raised = within_bound(lambda: prepare_split(
        recipe, "train", Cache.at(tmp_path / "c"),
        FetchOptions(source=str(root), verify=False), processes=1))
    figures.attack("folders", None if done and raised is None else "hang" if not done
                   else "served")
    assert done and raised is None


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "link loop"])
def test_mnist_raw_entries_that_are_not_files_are_not_taken(kind, figures, tmp_path):
    if not (REAL_MNIST / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("the real MNIST files are not here")
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(
        gzip.decompress((REAL_MNIST / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    target = raw / "t10k-images-idx3-ubyte"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "/dev/zero":
        os.symlink("/dev/zero", target)
    else:
        os.symlink(target.name, target)
    done, raised = within_bound(lambda: prepare_split(
        MNIST, "test", Cache.at(tmp_path / "c"), FetchOptions(source=str(tmp_path))))
    defended = isinstance(raised, DatapipeError) and "lacks t10k-images" in str(raised)
    figures.attack("folders", None if done and defended else "hang" if not done else "served")
    assert done and defended, raised


@pytest.mark.parametrize("kind", ["fifo", "sparse 300 MB"])
def test_cifar_extracted_batches_that_are_fifos_or_huge_are_refused(kind, figures, tmp_path):
    fake = make_fake_cifar10(tmp_path / "files", per_batch=10)
    root = fake.extract(tmp_path / "tv")
    batch = root / "cifar-10-batches-py" / "data_batch_2"
    batch.unlink()
    if kind == "fifo":
        os.mkfifo(batch)
    else:
        with open(batch, "wb") as f:
            f.truncate(300 << 20)
    done, raised = within_bound(lambda: prepare_split(
        CIFAR10_RECIPE, "train", Cache.at(tmp_path / "c"),
        FetchOptions(source=str(root), verify=False)))
    defended = isinstance(raised, DatapipeError) and "\n" not in str(raised)
    figures.attack("folders", None if done and defended else "hang" if not done else "served")
    assert done and defended, raised
