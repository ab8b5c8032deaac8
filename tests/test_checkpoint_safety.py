"""Checkpoints hold tensors and plain data, load weights-only, and name classes by registry.

The hostile corpus (crafted pickles, names, sizes, archives) is in
tests/torture/test_torture_hostile_checkpoints.py; these pin the format and the API.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import datapipe
from datapipe.datamodules import MNISTDataModule
from datapipe.errors import CheckpointError, ConfigError, NonFiniteLossError
from datapipe.models import ImageClassifier
from datapipe.trainer import ModelCheckpoint, Module, Trainer
from datapipe.trainer import checkpoint as ckpt
from datapipe.trainer.module import list_modules, module_class, register_module


@pytest.fixture
def dm_factory(fake_mnist, tmp_path):
    def make(**kwargs):
        options = dict(cache_dir=tmp_path / "cache", source=fake_mnist.folder, verify=False,
                       val_split=0, batch_size=50, normalize=True)
        options.update(kwargs)
        return MNISTDataModule(**options)

    return make


def quiet(tmp_path, **kwargs) -> Trainer:
    options = dict(enable_progress_bar=False, default_root_dir=tmp_path / "runs", seed=0,
                   logger=False, accelerator="cpu")
    options.update(kwargs)
    return Trainer(**options)


@pytest.fixture
def trained(dm_factory, tmp_path):
    """The path of a checkpoint saved mid-epoch from an mlp classifier."""
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3)
    quiet(tmp_path, max_steps=3, callbacks=[saver]).fit(
        ImageClassifier.from_datamodule(dm_factory(), "mlp", hidden=32), dm_factory())
    [path] = (tmp_path / "ckpt").glob("*.ckpt")
    return path


def test_a_checkpoint_loads_with_plain_weights_only_torch_load(trained):
    saved = torch.load(trained, weights_only=True)  # no allow-list, no datapipe code
    assert saved["format"] == ckpt.FORMAT
    assert saved["module"] == "image-classifier"
    assert saved["module_type"] == "datapipe.models.ImageClassifier"
    assert "module_class" not in saved  # no import path anywhere
    rng = saved["rng"]
    assert isinstance(rng["torch"], torch.Tensor)
    assert len(rng["numpy"]["key"]) == 624 and all(type(k) is int for k in rng["numpy"]["key"])
    assert len(rng["python"]["state"]) == 625


def test_rng_states_round_trip_through_plain_data():
    torch.manual_seed(3)
    np.random.seed(3)
    import random

    random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    states = ckpt.rng_states()
    expected = (torch.rand(3), np.random.standard_normal(2), random.random())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    ckpt.restore_rng_states(states)
    again = (torch.rand(3), np.random.standard_normal(2), random.random())
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_the_registry_rebuilds_the_module_and_explicit_classes_need_no_registry(trained):
    model = datapipe.load_module(trained)
    assert isinstance(model, ImageClassifier) and model.hparams["hidden"] == 32
    same = ImageClassifier.load_from_checkpoint(trained)
    for name, value in model.state_dict().items():
        assert torch.equal(value, same.state_dict()[name])
    assert "image-classifier" in list_modules()
    assert module_class("image-classifier") is ImageClassifier


class Unregistered(Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Linear(784, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x.flatten(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_an_unregistered_class_is_named_in_one_line_and_loads_when_given(dm_factory,
                                                                        tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    quiet(tmp_path, max_steps=2, callbacks=[saver]).fit(Unregistered(width=7), dm_factory())
    path = saver.last_model_path
    assert ckpt.load(path)["module"] is None
    with pytest.raises(ConfigError, match=r"saved from .*Unregistered, which is not a "
                                          r"registered module \(known: .*image-classifier"):
        datapipe.load_module(path)
    assert Unregistered.load_from_checkpoint(path).hparams == {"width": 7}


def test_register_module_names_are_plain_and_unique():
    with pytest.raises(ConfigError, match="must be lowercase"):
        register_module("../evil")
    with pytest.raises(ConfigError, match="already registered"):
        register_module("image-classifier")(Unregistered)
    with pytest.raises(ConfigError, match="takes a datapipe.Module subclass"):
        register_module("linear")(nn.Linear)
    with pytest.raises(ConfigError, match=r"unknown module 'image-clasifier'; did you mean "
                                          r"image-classifier"):
        module_class("image-clasifier")


def test_a_registered_class_is_rebuilt_by_name(dm_factory, tmp_path):
    @register_module("test-safety-net")
    class Registered(Unregistered):
        pass

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    quiet(tmp_path, max_steps=1, callbacks=[saver]).fit(Registered(width=3), dm_factory())
    assert ckpt.load(saver.last_model_path)["module"] == "test-safety-net"
    assert type(datapipe.load_module(saver.last_model_path)) is Registered


class HoldsAnObject(Unregistered):
    def __init__(self, loss: nn.Module | None = None, width: int = 4) -> None:
        super().__init__(width)
        self.save_hyperparameters()  # records the loss object too


class IgnoresTheObject(Unregistered):
    def __init__(self, loss: nn.Module | None = None, width: int = 4) -> None:
        super().__init__(width)
        self.hparams.clear()
        self.save_hyperparameters(ignore="loss")


def test_hparams_that_are_objects_are_refused_when_saving(dm_factory, tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    with pytest.raises(ConfigError, match=r"HoldsAnObject.hparams\['loss'\] is a "
                                          r"torch.nn.modules.loss.MSELoss.* "
                                          r"save_hyperparameters\(ignore="):
        quiet(tmp_path, max_steps=1, callbacks=[saver]).fit(HoldsAnObject(nn.MSELoss()),
                                                            dm_factory())
    model = IgnoresTheObject(nn.MSELoss(), width=5)
    assert model.hparams == {"width": 5}
    quiet(tmp_path, max_steps=1, callbacks=[saver]).fit(model, dm_factory())


def test_sizes_in_hparams_cost_nothing_until_the_weights_fit(trained, tmp_path):
    saved = ckpt.load(trained)
    saved["hparams"]["hidden"] = 10**9  # 3 TB of weights if it were ever built for real
    path = tmp_path / "big.ckpt"
    ckpt.save(saved, path)
    with pytest.raises(ConfigError, match=r"weights do not fit .*net.fc1.bias is "
                                          r"\(32,\) in the file, \(1000000000,\) in"):
        datapipe.load_module(path)


def test_the_output_check_runs_on_meta_so_a_huge_image_size_costs_nothing():
    model = ImageClassifier(model="resnet18", num_classes=10, in_channels=3,
                            image_size=(50_000, 50_000))  # a 30 GB zero image if real
    assert model.image_size == (50_000, 50_000)


@pytest.mark.parametrize("value", [math.inf, math.nan, -1.0, 0, "0.1", True])
def test_learning_rates_that_cannot_train_are_refused(value):
    with pytest.raises(ConfigError, match="lr must be a finite number > 0"):
        ImageClassifier(model="mlp", lr=value)


class DivergesAt(Unregistered):
    """Returns a NaN (or inf) loss from a given batch on."""

    def __init__(self, bad_batch: int = 3, value: float = math.nan) -> None:
        super().__init__()
        self.bad_batch, self.value = bad_batch, value

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * self.value if batch_idx >= self.bad_batch else loss


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_loss_stops_training_in_one_line_naming_the_step(value, dm_factory,
                                                                      tmp_path):
    model = DivergesAt(3, value)
    trainer = quiet(tmp_path, max_epochs=2, enable_checkpointing=False)
    with pytest.raises(NonFiniteLossError, match=rf"training loss is {value} at step 3 "
                                                 rf"\(epoch 0, batch 3\); training stopped"):
        trainer.fit(model, dm_factory())
    assert trainer.global_step == 3
    # Checked before backward: the weights never saw the bad loss.
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_accelerator_losses_are_checked_together_and_the_first_bad_step_named(tmp_path):
    trainer = quiet(tmp_path)
    trainer._pending_losses = [(torch.tensor(0.5), 7, 2), (torch.tensor(math.inf), 8, 3),
                               (torch.tensor(math.nan), 9, 4)]
    with pytest.raises(NonFiniteLossError, match=r"loss is inf at step 8 \(epoch 0, batch 3\)"):
        trainer._check_losses()
    assert trainer._pending_losses == []
    trainer._pending_losses = [(torch.tensor(0.5), 7, 2)]
    trainer._check_losses()  # finite: nothing happens


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_non_finite_loss_on_cuda_is_caught_without_a_sync_per_step(dm_factory, tmp_path):
    trainer = quiet(tmp_path, max_epochs=2, enable_checkpointing=False, accelerator="cuda")
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 3 \(epoch 0, batch 3\)"):
        trainer.fit(DivergesAt(3), dm_factory())


@pytest.mark.parametrize("options, message", [
    ({"max_epochs": -3}, "max_epochs must be an integer >= 0"),
    ({"max_epochs": 1.5}, "max_epochs must be an integer"),
    ({"max_steps": -2}, "max_steps must be an integer >= 0"),
    ({"seed": 2**63}, r"seed must be an integer in 0\.\.9223372036854775807"),
    ({"seed": -1}, "seed must be an integer"),
    ({"gradient_clip_val": math.nan}, "gradient_clip_val must be a finite number"),
    ({"gradient_clip_val": -1.0}, "gradient_clip_val must be a finite number"),
    ({"log_every_n_steps": 0}, "log_every_n_steps must be a positive integer"),
    ({"check_val_every_n_epoch": 0}, "check_val_every_n_epoch must be a positive integer"),
])
def test_trainer_options_that_cannot_train_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        Trainer(accelerator="cpu", enable_progress_bar=False, logger=False, **options)


def test_saving_refuses_what_weights_only_loading_could_not_read(tmp_path):
    with pytest.raises(CheckpointError, match=r"the checkpoint\['x'\] is a builtins.set"):
        ckpt.save({"format": ckpt.FORMAT, "x": {1, 2}}, tmp_path / "a.ckpt")
    assert not (tmp_path / "a.ckpt").exists()
