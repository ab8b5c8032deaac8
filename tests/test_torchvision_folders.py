"""What torchvision leaves on disk, taken as ``--source``: MNIST's raw/ folder, CIFAR's
extracted batches, an ImageNet root (see test_imagenet_folders.py for that one)."""

from __future__ import annotations

import gzip
import importlib.util
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

import datapipe
from datapipe.cache import Cache
from datapipe.cli import main
from datapipe.datamodules.mnist import RECIPE as MNIST
from datapipe.errors import ChecksumError, DownloadError, UnverifiedDataWarning
from datapipe.prepare import find_prepared, prepare_split
from datapipe.stages.download import FetchOptions

ROOT = Path(__file__).resolve().parents[1]
T10K = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def torchvision_mnist(root: Path, gz_folder: Path, names=T10K, keep_gz=False,
                      folder="MNIST") -> Path:
    """``root/<folder>/raw/`` as torchvision's MNIST leaves it: the files decompressed
    (and, with ``keep_gz``, the archives beside them)."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    for name in names:
        data = (gz_folder / f"{name}.gz").read_bytes()
        (raw / name).write_bytes(gzip.decompress(data))
        if keep_gz:
            (raw / f"{name}.gz").write_bytes(data)
    return root


def load_recipe(filename: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{filename[:-3]}_under_test",
                                                  ROOT / "recipes" / filename)
    module = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as mp:  # registering is not the point here
        mp.setattr(datapipe, "register", lambda name: (lambda f: f))
        spec.loader.exec_module(module)
    return module.RECIPE


# ------------------------------------------------------------------ MNIST


def test_decompressed_mnist_digests_recorded_are_those_of_the_official_files(real_mnist):
    import hashlib

    for resource in MNIST.download.resources:
        (form,) = resource.forms
        assert form.filename == resource.filename.removesuffix(".gz")
        gz = real_mnist / resource.filename
        if not gz.is_file():  # train images: not among the real files at hand
            continue
        data = gzip.decompress(gz.read_bytes())
        assert hashlib.md5(data).hexdigest() == form.md5
        assert hashlib.sha256(data).hexdigest() == form.sha256
        assert len(data) == form.size


@pytest.mark.parametrize("point_at", ["root", "MNIST", "MNIST/raw"])
def test_torchvision_mnist_folder_is_verified_and_gives_the_archives_entry(
        real_mnist, tmp_path, point_at):
    tv_root = torchvision_mnist(tmp_path / "tv", real_mnist)
    source = tv_root if point_at == "root" else tv_root / point_at
    cache = Cache(tmp_path / "cache")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedDataWarning)
        entry, worked = prepare_split(MNIST, "test", cache, FetchOptions(source=str(source)))
    assert worked and entry.verified and entry.rows == 10000
    sources = {s["filename"]: s for s in entry.manifest["sources"]}
    images = sources["t10k-images-idx3-ubyte.gz"]
    assert images["checksum"] == "9fb629c4189551a2d022fa330f9573f3"  # the archive's
    assert images["origin"].endswith("t10k-images-idx3-ubyte (decompressed)")

    # The same entry as the official archives make: found with no --source afterwards,
    # and prepared from the .gz files it is this very entry.
    assert find_prepared(MNIST, "test", cache).path == entry.path
    from_gz, worked = prepare_split(MNIST, "test", Cache(tmp_path / "other"),
                                    FetchOptions(source=str(real_mnist)))
    assert from_gz.fingerprint == entry.fingerprint
    np.testing.assert_array_equal(MNIST.load(from_gz.data_file)["image"],
                                  MNIST.load(entry.data_file)["image"])
    again, worked = prepare_split(MNIST, "test", cache, FetchOptions(source=str(source)))
    assert not worked and again.path == entry.path


def test_the_archive_beside_the_decompressed_file_is_used_first(real_mnist, tmp_path):
    tv_root = torchvision_mnist(tmp_path / "tv", real_mnist, keep_gz=True)
    entry, _ = prepare_split(MNIST, "test", Cache(tmp_path / "cache"),
                             FetchOptions(source=str(tv_root)))
    origins = {s["origin"] for s in entry.manifest["sources"]}
    assert origins == {str(tv_root / "MNIST" / "raw" / f"{n}.gz") for n in T10K}


def test_a_damaged_decompressed_file_is_refused_or_taken_unverified(real_mnist, tmp_path):
    tv_root = torchvision_mnist(tmp_path / "tv", real_mnist)
    labels = tv_root / "MNIST" / "raw" / T10K[1]
    data = bytearray(labels.read_bytes())
    data[-1] = (data[-1] + 1) % 10  # one label changed: same size, another digest
    labels.write_bytes(bytes(data))
    cache = Cache(tmp_path / "cache")
    with pytest.raises(ChecksumError, match=r"decompressed t10k-labels-idx1-ubyte.gz\): its "
                                            r"sha256 is .* but the decompressed official"):
        prepare_split(MNIST, "test", cache, FetchOptions(source=str(tv_root)))
    with pytest.warns(UnverifiedDataWarning, match="using .*t10k-labels-idx1-ubyte "
                                                   r"\(decompressed\) unverified"):
        entry, _ = prepare_split(MNIST, "test", cache,
                                 FetchOptions(source=str(tv_root), verify=False))
    assert not entry.verified
    sources = {s["filename"]: s for s in entry.manifest["sources"]}
    assert sources["t10k-images-idx3-ubyte.gz"]["verified"] is True
    assert sources["t10k-labels-idx1-ubyte.gz"]["verified"] is False
    assert MNIST.load(entry.data_file)["label"][-1] == data[-1]
    # Verified data is still not there, and nothing pretends it is.
    assert find_prepared(MNIST, "test", cache) is None
    assert find_prepared(MNIST, "test", cache, FetchOptions(
        source=str(tv_root), verify=False)).path == entry.path


def test_the_cli_takes_torchvisions_root_and_a_missing_split_names_what_was_searched(
        real_mnist, tmp_path, capsys):
    tv_root = torchvision_mnist(tmp_path / "tv", real_mnist)
    cache = tmp_path / "cache"
    code = main(["prepare", "mnist", "--split", "test", "--source", str(tv_root),
                 "--cache-dir", str(cache)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "mnist test: 10000 rows" in out
    code = main(["prepare", "mnist", "--split", "train", "--source", str(tv_root),
                 "--cache-dir", str(cache)])
    out, err = capsys.readouterr()
    assert code == 2
    (line,) = err.strip().splitlines()
    assert "(nor raw, MNIST/raw under it) lacks train-images-idx3-ubyte.gz (or " \
           "train-images-idx3-ubyte)" in line
    assert "--split test" in line


def test_fashion_mnist_folder_of_torchvision_is_found_and_checked(fake_mnist, tmp_path):
    recipe = load_recipe("fashion_mnist.py")
    tv_root = torchvision_mnist(tmp_path / "tv", fake_mnist.folder, folder="FashionMNIST")
    # Our fake files are not Zalando's: the recorded digests refuse them...
    with pytest.raises(ChecksumError, match=r"decompressed .*official file has 7840016"):
        prepare_split(recipe, "test", Cache(tmp_path / "c"), FetchOptions(source=str(tv_root)))
    # ... and with --no-verify they are read, decompressed, in place.
    with pytest.warns(UnverifiedDataWarning):
        entry, _ = prepare_split(recipe, "test", Cache(tmp_path / "c"),
                                 FetchOptions(source=str(tv_root), verify=False))
    np.testing.assert_array_equal(recipe.load(entry.data_file)["image"][:, 0],
                                  fake_mnist.arrays["t10k-images-idx3-ubyte.gz"])


def test_kmnist_decompressed_files_have_no_digest_so_need_no_verify(fake_mnist, tmp_path):
    recipe = load_recipe("kmnist.py")
    tv_root = torchvision_mnist(tmp_path / "tv", fake_mnist.folder, folder="KMNIST")
    with pytest.raises(ChecksumError, match=r"no digest of the decompressed .* is recorded.*"
                                            r"pass --no-verify \(verify=False\) to use it"):
        prepare_split(recipe, "test", Cache(tmp_path / "c"),
                      FetchOptions(source=str(tv_root / "KMNIST")))
    with pytest.warns(UnverifiedDataWarning):
        entry, _ = prepare_split(recipe, "test", Cache(tmp_path / "c"),
                                 FetchOptions(source=str(tv_root / "KMNIST"), verify=False))
    assert entry.rows == 100 and not entry.verified


def test_a_fifo_named_like_the_decompressed_file_is_not_taken(real_mnist, tmp_path):
    import os

    raw = tmp_path / "raw"
    raw.mkdir()
    os.mkfifo(raw / T10K[0])
    shutil.copy(real_mnist / f"{T10K[1]}.gz", raw)
    with pytest.raises(DownloadError, match="lacks t10k-images-idx3-ubyte.gz"):
        prepare_split(MNIST, "test", Cache(tmp_path / "c"), FetchOptions(source=str(raw)))


# ------------------------------------------------------------------ CIFAR


def _with_fixture_digests(recipe, fake):
    """``recipe`` whose tarball and extracted files carry the fixture's md5s in place of
    the official ones (the shape of the declaration stays the recipe's)."""
    import dataclasses
    import hashlib

    from datapipe.stages.source_layout import Extracted

    (resource,) = recipe.download.resources
    (form,) = resource.forms
    extracted = Extracted(form.folder, tuple(
        (name, hashlib.md5(fake.members[f"{form.folder}/{name}"]).hexdigest())
        for name, _ in form.files))
    resource = dataclasses.replace(resource, md5=fake.md5, size=len(fake.data),
                                   forms=(extracted,))
    return dataclasses.replace(recipe, download=dataclasses.replace(
        recipe.download, resources=(resource,)))


def test_cifar_extracted_md5s_are_torchvisions():
    from torchvision.datasets import CIFAR10, CIFAR100

    from datapipe.datamodules.cifar import CIFAR10_RECIPE, CIFAR100_RECIPE

    for recipe, tv in ((CIFAR10_RECIPE, CIFAR10), (CIFAR100_RECIPE, CIFAR100)):
        (resource,) = recipe.download.resources
        (form,) = resource.forms
        listed = [*tv.train_list, *tv.test_list, [tv.meta["filename"], tv.meta["md5"]]]
        assert form.folder == tv.base_folder and resource.md5 == tv.tgz_md5
        assert sorted(map(list, form.files)) == sorted(map(list, listed))


@pytest.mark.parametrize("point_at", ["root", "extracted"])
def test_extracted_cifar10_is_verified_by_its_files_and_gives_the_tarballs_entry(
        tmp_path, point_at):
    from cifar_files import make_fake_cifar10

    fake = make_fake_cifar10(tmp_path / "files")
    recipe = _with_fixture_digests(datapipe.datamodules.cifar.CIFAR10_RECIPE, fake)
    tv_root = fake.extract(tmp_path / "tv")
    source = tv_root if point_at == "root" else tv_root / "cifar-10-batches-py"
    cache = Cache(tmp_path / "cache")
    for split in ("train", "test"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UnverifiedDataWarning)
            entry, _ = prepare_split(recipe, split, cache, FetchOptions(source=str(source)))
        assert entry.verified
        (record,) = entry.manifest["sources"]
        assert record["checksum"] == fake.md5 and record["origin"].endswith("(extracted)")
        from_tarball, _ = prepare_split(recipe, split, Cache(tmp_path / "other"),
                                        FetchOptions(source=str(fake.folder)))
        assert from_tarball.fingerprint == entry.fingerprint
        columns = recipe.load(entry.data_file)
        np.testing.assert_array_equal(columns["image"], fake.arrays[split]["image"])
        np.testing.assert_array_equal(columns["label"], fake.arrays[split]["labels"])


def test_extracted_cifar_that_is_not_the_official_one_is_refused_or_unverified(tmp_path):
    from cifar_files import make_fake_cifar10, make_fake_cifar100

    from datapipe.datamodules.cifar import CIFAR10_RECIPE, CIFAR100_RECIPE

    for make, recipe, folder in ((make_fake_cifar10, CIFAR10_RECIPE, "cifar-10-batches-py"),
                                 (make_fake_cifar100, CIFAR100_RECIPE, "cifar-100-python")):
        fake = make(tmp_path / recipe.name / "files")
        tv_root = fake.extract(tmp_path / recipe.name / "tv")
        (tv_root / fake.filename).unlink(missing_ok=True)
        cache = Cache(tmp_path / recipe.name / "cache")
        with pytest.raises(ChecksumError, match=rf"{folder} \(extracted {fake.filename}\): "
                                                r".* has md5 \w+ but the official file's is"):
            prepare_split(recipe, "test", cache, FetchOptions(source=str(tv_root)))
        with pytest.warns(UnverifiedDataWarning, match="unverified"):
            entry, _ = prepare_split(recipe, "test", cache,
                                     FetchOptions(source=str(tv_root), verify=False))
        assert not entry.verified
        labels = "labels" if recipe.name == "cifar10" else "fine_labels"
        np.testing.assert_array_equal(recipe.load(entry.data_file)["label"],
                                      fake.arrays["test"][labels])
        # The same files again: the same unverified entry, found without re-reading.
        assert find_prepared(recipe, "test", cache, FetchOptions(
            source=str(tv_root), verify=False)).path == entry.path


def test_an_extracted_folder_lacking_a_batch_is_not_taken(tmp_path):
    from cifar_files import make_fake_cifar10

    from datapipe.datamodules.cifar import CIFAR10_RECIPE

    fake = make_fake_cifar10(tmp_path / "files")
    tv_root = fake.extract(tmp_path / "tv")
    (tv_root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DownloadError, match=r"lacks cifar-10-python.tar.gz \(or "
                                            r"cifar-10-batches-py/\)"):
        prepare_split(CIFAR10_RECIPE, "train", Cache(tmp_path / "c"),
                      FetchOptions(source=str(tv_root), verify=False))
