"""lightning-bolts' own datamodule tests, ported: datapipe as a drop-in for pl_bolts.

The first part is bolts' tests/datamodules/test_datamodules.py for the datasets datapipe
has (MNIST, FashionMNIST, CIFAR-10): the same calls, checks and expected values, with
bolts' ``datadir`` and ``catch_warnings`` fixtures (every warning is an error). The only
change is the import: each class is datapipe's, declared again by a fixture as a
subclass that changes class data only (the mirror, or the md5s of a format-exact
miniature), as a variant of a dataset is declared, so that nothing reaches the
internet: the real MNIST files (and a format-exact train-images file of the full size,
which shared/ lacks) come through a loopback mirror. bolts has no ImageNet
datamodule test; the second part checks what bolts' ImagenetDataModule promises
(``data_dir``, ``meta_dir``, ``num_samples``, ``num_classes``, ``dims``, loaders). The
third pins the rest of the drop-in: bolts' attributes and defaults, ``drop_last`` on
every loader, no augmentation unless asked, and ``*_transforms`` honoured.
docs/compatibility.md lists the deliberate differences.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from cifar_files import make_fake_cifar10
from conftest import REAL_MNIST, make_fake_mnist
from fresh_registry import registry_restored
from imagenet_fixture import DEVKIT, make_fake_imagenet, recipe_for
from loopback import MirrorServer

import datapipe
from datapipe.datamodules import CIFAR10DataModule as DatapipeCIFAR10
from datapipe.datamodules import ImageNetDataModule as DatapipeImageNet
from datapipe.datamodules import MNISTDataModule as DatapipeMNIST
from datapipe.formats.idx import encode_idx
from datapipe.registry import load_recipe_dir
from datapipe.stages.download import Resource

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TRAIN_IMAGES = "train-images-idx3-ubyte.gz"


# ------------------------------------------------------------------ bolts' fixtures


@pytest.fixture(scope="module", autouse=True)
def _registry_restored():
    """The recipe files this module loads are registered for its tests only."""
    with registry_restored(discovered=None):
        yield


@pytest.fixture(scope="module")
def datadir(tmp_path_factory):
    return tmp_path_factory.mktemp("bolts-datasets")


@pytest.fixture
def catch_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ------------------------------------------------------------------ the swapped imports


def _served(files: dict[str, bytes], request) -> MirrorServer:
    server = MirrorServer(files).start()
    request.addfinalizer(server.stop)
    return server


@pytest.fixture(scope="module")
def MNISTDataModule(request):  # noqa: N802  (a class, named as bolts' import names it)
    """MNIST from a loopback mirror: the real files, and a format-exact 60,000-image
    train-images file in place of the one shared/ lacks (its md5 swapped in)."""
    if not (REAL_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"the real MNIST files are not at {REAL_MNIST}")
    files = {p.name: p.read_bytes() for p in REAL_MNIST.glob("*.gz")}
    images = np.random.default_rng(0).integers(0, 256, (60000, 28, 28), dtype=np.uint8)
    files[TRAIN_IMAGES] = gzip.compress(encode_idx(images), compresslevel=1, mtime=0)
    server = _served(files, request)
    md5 = hashlib.md5(files[TRAIN_IMAGES]).hexdigest()

    class MNISTDataModule(DatapipeMNIST):
        mirrors = (server.url,)
        resources = tuple(Resource(r.filename, md5=md5) if r.filename == TRAIN_IMAGES else r
                          for r in DatapipeMNIST.resources)

    return MNISTDataModule


@pytest.fixture(scope="module")
def FashionMNISTDataModule(request, tmp_path_factory):  # noqa: N802
    from datapipe.registry import get_factory

    load_recipe_dir(RECIPES)
    fake = make_fake_mnist(tmp_path_factory.mktemp("fashion"), n_train=600, n_test=100)
    server = _served(fake.files, request)
    official = get_factory("fashion-mnist")

    class FashionMNISTDataModule(official):
        mirrors = (server.url,)
        resources = tuple(Resource(r.filename, md5=fake.md5(r.filename))
                          for r in official.resources)

    return FashionMNISTDataModule


@pytest.fixture(scope="module")
def CIFAR10DataModule(request, tmp_path_factory):  # noqa: N802
    fake = make_fake_cifar10(tmp_path_factory.mktemp("cifar"), per_batch=60)
    server = _served({fake.filename: fake.data}, request)

    class CIFAR10DataModule(DatapipeCIFAR10):
        mirrors = (server.url,)
        archive = Resource(fake.filename, md5=fake.md5, size=len(fake.data))

    return CIFAR10DataModule


# ------------------------------------------------------------------ bolts' tests


def _create_dm(dm_cls, datadir, **kwargs):
    dm = dm_cls(data_dir=datadir, num_workers=1, batch_size=2, **kwargs)
    dm.prepare_data()
    dm.setup()
    return dm


@pytest.mark.parametrize(("val_split", "train_len"), [(0.2, 48_000), (5_000, 55_000)])
def test_vision_data_module(datadir, val_split, catch_warnings, train_len, MNISTDataModule):
    dm = _create_dm(MNISTDataModule, datadir, val_split=val_split)
    assert len(dm.dataset_train) == train_len


@pytest.mark.parametrize("dm_cls", ["CIFAR10DataModule", "FashionMNISTDataModule",
                                    "MNISTDataModule"])
def test_data_modules(datadir, catch_warnings, dm_cls, request):
    """Test datamodules train, val, and test dataloaders outputs have correct shape."""
    dm = _create_dm(request.getfixturevalue(dm_cls), datadir)
    train_loader = dm.train_dataloader()
    img, _ = next(iter(train_loader))
    assert img.size() == torch.Size([2, *dm.dims])

    val_loader = dm.val_dataloader()
    img, _ = next(iter(val_loader))
    assert img.size() == torch.Size([2, *dm.dims])

    test_loader = dm.test_dataloader()
    img, _ = next(iter(test_loader))
    assert img.size() == torch.Size([2, *dm.dims])


# ------------------------------------------------------------------ ImageNet, as bolts has it


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """bolts' layout: ImageNet in data_dir, the devkit (class metadata) apart in meta_dir."""
    fake = make_fake_imagenet(tmp_path_factory.mktemp("imagenet-files"))
    data_dir = tmp_path_factory.mktemp("imagenet-data")
    meta_dir = tmp_path_factory.mktemp("imagenet-meta")
    for name in fake.files:
        shutil.copy(fake.folder / name, (meta_dir if name == DEVKIT else data_dir) / name)
    recipe = recipe_for(fake.folder, val_shard_size=4)

    class ImagenetDataModule(DatapipeImageNet):
        @classmethod
        def default_recipe(cls):
            return recipe

    return ImagenetDataModule, data_dir, meta_dir


def test_imagenet_reads_data_dir_and_meta_dir_as_bolts_does(imagenet, tmp_path):
    ImagenetDataModule, data_dir, meta_dir = imagenet
    dm = ImagenetDataModule(data_dir, meta_dir=meta_dir, num_imgs_per_val_class=2,
                            image_size=24, batch_size=3, num_workers=0, cache_dir=tmp_path)
    assert dm.data_dir == str(data_dir) and dm.meta_dir == str(meta_dir)
    assert (dm.num_classes, dm.dims) == (1000, (3, 24, 24))
    # bolts' count, before any data exists: the train images less the val carve.
    assert dm.num_samples == 1281167 - 2 * 1000
    dm.prepare_data()
    assert dm.cache.root == tmp_path  # data_dir is read, never written: the cache is apart
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        img, label = next(iter(loader))
        assert img.shape == (3, 3, 24, 24) and label.shape == (3,)
    assert dm.num_samples == len(dm.dataset_train)  # the real count once prepared
    assert dm.classes[0] == "tench, Tinca tinca"


def test_imagenet_without_meta_dir_finds_nothing_it_lacks(imagenet, tmp_path):
    ImagenetDataModule, data_dir, _ = imagenet
    dm = ImagenetDataModule(data_dir, cache_dir=tmp_path, num_workers=0)
    with pytest.raises(datapipe.DownloadError, match=f"lacks {DEVKIT}"):
        dm.prepare_data()


def test_imagenet_refuses_two_folders_for_one_dataset(imagenet, tmp_path):
    ImagenetDataModule, data_dir, meta_dir = imagenet
    with pytest.raises(datapipe.ConfigError, match="two ImageNet folders"):
        ImagenetDataModule(data_dir, source=meta_dir)


def test_imagenet_defaults_are_bolts_where_measured_alike():
    dm = DatapipeImageNet("somewhere")
    assert (dm.num_imgs_per_val_class, dm.image_size, dm.batch_size, dm.shuffle,
            dm.drop_last, dm.normalize) == (50, 224, 32, True, False, True)
    assert dm.meta_dir is None and dm.data_dir == "somewhere"


# ------------------------------------------------------------------ the rest of the drop-in


def test_bolts_attributes_and_defaults(tmp_path):
    dm = DatapipeMNIST(tmp_path)
    assert dm.data_dir == str(tmp_path)
    assert (dm.val_split, dm.num_workers, dm.normalize, dm.batch_size, dm.seed, dm.shuffle,
            dm.drop_last) == (0.2, 0, False, 32, 42, True, False)
    assert (dm.dims, dm.num_classes, dm.num_samples) == ((1, 28, 28), 10, 48000)
    assert dm.pin_memory is False  # bolts: True; see docs/compatibility.md
    assert dm.train_transforms is dm.val_transforms is dm.test_transforms is None
    assert DatapipeMNIST(val_split=0.1, stratify=True).num_samples == 54000
    cifar = DatapipeCIFAR10(tmp_path, 5000)  # bolts' positional order
    assert (cifar.val_split, cifar.num_samples, cifar.dims) == (5000, 45000, (3, 32, 32))
    with pytest.raises(AttributeError, match="setup"):
        _ = dm.dataset_train
    assert {k: dm.hparams[k] for k in ("batch_size", "num_workers", "normalize")} == {
        "batch_size": 32, "num_workers": 0, "normalize": False}  # the values, not None
    dm.batch_size, dm.num_workers, dm.drop_last, dm.normalize = 5, 1, True, True  # settable
    assert dm.recipe.wrap.batch_size == 5 and dm.recipe.wrap.drop_last and dm.normalize


def test_no_augmentation_unless_asked():
    assert DatapipeCIFAR10().transform.train == ()
    assert [type(op).__name__ for op in DatapipeCIFAR10(augment=True).transform.train] == [
        "RandomCrop", "RandomHorizontalFlip"]


def test_datapipe_train_asks_for_the_augmentation(monkeypatch):
    from datapipe.cli import _augmented

    assert _augmented("cifar10", {})["augment"] is True
    assert _augmented("cifar10", {"augment": False})["augment"] is False  # -o augment=false
    assert "augment" not in _augmented("mnist", {})  # nothing declared, nothing asked


def test_drop_last_applies_to_every_loader(MNISTDataModule, datadir):
    dm = MNISTDataModule(datadir, val_split=0.2, batch_size=7000, drop_last=True)
    sizes = {part: [len(y) for _, y in loader] for part, loader in (
        ("train", dm.train_dataloader()), ("val", dm.val_dataloader()),
        ("test", dm.test_dataloader()))}
    assert sizes == {"train": [7000] * 6, "val": [7000], "test": [7000]}


def test_transforms_set_after_construction_are_honoured(MNISTDataModule, datadir):
    from torchvision import transforms as transform_lib

    dm = MNISTDataModule(datadir, val_split=0.2, batch_size=16, shuffle=False)
    raw, _ = next(iter(dm.test_dataloader()))
    assert raw.dtype == torch.uint8
    # bolts' MNIST transforms with normalize=True, given as bolts' docs say: dm.*_transforms = ...
    bolts_normalize = transform_lib.Compose(
        [transform_lib.ToTensor(), transform_lib.Normalize(mean=(0.5,), std=(0.5,))])
    dm.test_transforms = bolts_normalize
    img, label = next(iter(dm.test_dataloader()))
    assert img.dtype == torch.float32 and img.shape == (16, 1, 28, 28)
    np.testing.assert_allclose(img.numpy(), (raw.numpy() / 255.0 - 0.5) / 0.5, atol=1e-6)
    assert torch.equal(dm.to_device((img, label))[0], img)  # float batches pass unchanged
    flip = transform_lib.Compose([transform_lib.RandomHorizontalFlip(p=1.0),
                                  transform_lib.PILToTensor()])
    dm.train_transforms = flip
    first, _ = next(iter(dm.train_dataloader()))
    plain, _ = dm.dataset_train.dataset[0]
    assert torch.equal(first[0], plain.flip(-1))  # the per-sample path, unaugmented below it
    dm.train_transforms = None  # back to the batch pipeline
    assert next(iter(dm.train_dataloader()))[0].dtype == torch.uint8


def test_transforms_given_to_the_constructor_reach_the_workers(MNISTDataModule, datadir):
    from torchvision import transforms as transform_lib

    dm = MNISTDataModule(datadir, val_split=1000, num_workers=2, batch_size=50,
                         val_transforms=transform_lib.ToTensor())
    img, _ = next(iter(dm.val_dataloader()))
    assert img.dtype == torch.float32 and float(img.max()) <= 1.0
    assert len(dm.dataset_val) == 1000


def test_imagenet_transforms_see_the_stored_image(imagenet, tmp_path):
    from torchvision import transforms as transform_lib

    ImagenetDataModule, data_dir, meta_dir = imagenet
    crop = transform_lib.Compose([transform_lib.CenterCrop(20), transform_lib.ToTensor()])
    dm = ImagenetDataModule(data_dir, meta_dir=meta_dir, num_imgs_per_val_class=2,
                            image_size=24, batch_size=3, num_workers=0, cache_dir=tmp_path,
                            test_transforms=crop)
    dm.prepare_data()
    img, _ = next(iter(dm.test_dataloader()))
    assert img.dtype == torch.float32 and img.shape == (3, 3, 20, 20)


def test_one_normalization_default_for_built_in_and_user_recipes():
    load_recipe_dir(RECIPES)
    for name in ("mnist", "cifar10", "fashion-mnist", "kmnist"):
        assert datapipe.load(name).normalize is False, name
    assert datapipe.DataModule(DatapipeMNIST.default_recipe()).normalize is False
    assert DatapipeImageNet().normalize is True  # bolts' ImageNet always normalizes


def test_the_split_defaults_have_one_home():
    spec = datapipe.SplitSpec()
    assert (spec.train, spec.val, spec.test, spec.predict, spec.seed) == (
        "train", 0.2, "test", None, 42)
    for module in (DatapipeMNIST(), DatapipeCIFAR10(),
                   datapipe.DataModule(DatapipeMNIST.default_recipe())):
        assert module.splits == spec
    assert dataclasses.replace(spec, val=5000).parts()["val"] == 5000
