"""Proof that the pieces learn: real MNIST digits, one classifier across datasets, Lightning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import datapipe
from datapipe import DataModule, DatasetInfo, Download, IDXClean, Recipe, Resource
from datapipe.datamodules.mnist import CLASSES
from datapipe.models import ImageClassifier
from datapipe.trainer import Trainer

# A user's recipe over the two real t10k files alone: 10,000 labelled digits.
T10K_ONLY = Recipe(
    name="mnist-t10k",
    version="1",
    info=DatasetInfo(classes=CLASSES, dims=(1, 28, 28), mean=(0.1307,), std=(0.3081,)),
    download=Download(resources=(
        Resource("t10k-images-idx3-ubyte.gz", md5="9fb629c4189551a2d022fa330f9573f3"),
        Resource("t10k-labels-idx1-ubyte.gz", md5="ec29112dd5afa0611ce80d1b7f02629c"),
    )),
    clean=IDXClean(files={"all": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}),
)


@pytest.mark.slow
def test_lenet_learns_real_digits_to_97_percent_in_3_epochs(real_mnist, tmp_path):
    dm = DataModule(T10K_ONLY, cache_dir=tmp_path / "cache", source=real_mnist,
                    train_split="all[:8000]", val_split="all[8000:]", test_split=None,
                    batch_size=64, normalize=True, seed=0)
    torch.manual_seed(0)
    model = ImageClassifier.from_datamodule(dm, "lenet", lr=2e-3)
    trainer = Trainer(max_epochs=3, enable_progress_bar=False, logger=False,
                      enable_checkpointing=False, default_root_dir=tmp_path, seed=0)
    trainer.fit(model, dm)
    assert dm.plan.sizes()["train"] == 8000 and dm.plan.sizes()["val"] == 2000
    [held_out] = trainer.validate(model, dm)
    assert held_out["val_acc"] >= 0.97, held_out


# Every prebuilt recipe must appear here with a way to make its files, so that the
# same classifier is proven to train, unchanged, on each of them.
def _fake_files(tmp_path):
    from conftest import make_fake_mnist

    return make_fake_mnist(tmp_path / "files").folder


FIXTURES = {"mnist": _fake_files}


def _fake_cifar10(tmp_path):
    from cifar_files import make_fake_cifar10

    return make_fake_cifar10(tmp_path / "cifar10-files").folder


def _fake_cifar100(tmp_path):
    from cifar_files import make_fake_cifar100

    return make_fake_cifar100(tmp_path / "cifar100-files").folder


FIXTURES["cifar10"] = _fake_cifar10
FIXTURES["cifar100"] = _fake_cifar100


def _fake_imagenet(tmp_path):
    from imagenet_fixture import make_fake_imagenet

    # 4 classes x 40 small photos, so that val_split=100 leaves 60 to train on; a
    # maker may also return keyword overrides: 32-pixel crops keep resnet18 quick.
    fake = make_fake_imagenet(tmp_path / "imagenet-files", classes=4, per_class=40, n_val=20)
    return fake.folder, {"image_size": 32, "num_workers": 0}


FIXTURES["imagenet"] = _fake_imagenet


@pytest.mark.slow  # trains on every prebuilt DataModule: about 13 s
def test_one_classifier_trains_unchanged_on_every_prebuilt_datamodule(tmp_path):
    assert set(datapipe.list_recipes()) <= set(FIXTURES), "a prebuilt recipe has no fixture"
    for name, make_files in FIXTURES.items():
        made = make_files(tmp_path)  # the files' folder, or (folder, module overrides)
        folder, overrides = made if isinstance(made, tuple) else (made, {})
        dm = datapipe.load(name, **{"cache_dir": tmp_path / "cache", "source": folder,
                                    "verify": False, "val_split": 100, "batch_size": 50,
                                    **overrides})
        model = ImageClassifier.from_datamodule(dm, "resnet18", lr=1e-3)
        trainer = Trainer(max_steps=3, limit_val_batches=1, enable_progress_bar=False,
                          logger=False, enable_checkpointing=False, default_root_dir=tmp_path)
        trainer.fit(model, dm)
        assert trainer.global_step == 3, name
        assert torch.isfinite(trainer.callback_metrics["val_loss"]), name


def test_lightning_trainer_fits_through_the_adapter(fake_mnist, tmp_path):
    lightning = pytest.importorskip("lightning")
    from datapipe.integrations.lightning import as_lightning_datamodule

    seen = {}

    class LitClassifier(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(784, 10)

        def training_step(self, batch, batch_idx):
            x, y = batch
            seen.setdefault("dtype", x.dtype)
            seen.setdefault("mean", float(x.mean()))
            loss = F.cross_entropy(self.net(x.flatten(1)), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self.net(x.flatten(1)), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = datapipe.load("mnist", cache_dir=tmp_path / "cache", source=fake_mnist.folder,
                       verify=False, val_split=100, batch_size=50, normalize=True)
    adapter = as_lightning_datamodule(dm)
    assert isinstance(adapter, lightning.LightningDataModule)
    trainer = lightning.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False,
                                default_root_dir=tmp_path)
    trainer.fit(LitClassifier(), datamodule=adapter)
    assert trainer.global_step == 10
    # The batches arrived normalized on the device: uint8 in the loader, float32 after.
    assert seen["dtype"] == torch.float32
    raw = fake_mnist.arrays["train-images-idx3-ubyte.gz"] / 255
    assert abs(seen["mean"] - (raw.mean() - 0.1307) / 0.3081) < 0.05
    assert "val_loss" in trainer.callback_metrics
