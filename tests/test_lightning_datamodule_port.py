"""Lightning's own datamodule tests, run against datapipe's adapter.

Ported from Lightning-AI/pytorch-lightning, tests/tests_pytorch/core/test_datamodules.py
(commit 7f0c343): the same checks with the same expected values, with Lightning's
``BoringDataModule`` / ``ClassifDataModule`` replaced by ``as_lightning_datamodule`` over
a datapipe MNIST module. The data are MNIST-format files made here whose classes a
linear model can tell apart, sized so that each part holds 64 samples where Lightning's
boring module has 64.

Left out, as they concern Lightning internals with no datapipe analogue:

- ``test_dm_init_from_datasets_dataloaders`` and
  ``test_dm_init_from_datasets_with_init_params``: ``LightningDataModule.from_datasets``
  builds a LightningDataModule from torch datasets; the adapter is made from a datapipe
  module instead.
- the second half of ``test_define_as_dataclass`` (a ``@dataclass`` subclass that never
  calls ``__init__``): the adapter cannot exist without the datapipe module its
  ``__init__`` takes; the first half (``__post_init__`` calling ``super().__init__``) is
  ported.
- ``test_datamodule_string_no_len`` and ``test_datamodule_string_iterable``: datapipe's
  datasets always have a length, and each part has one loader.
- the OmegaConf branch of ``test_hyperparameters_saving`` runs only when omegaconf is
  installed, as in Lightning.

Beyond the port: predict through the adapter, pickling, ``ddp_spawn`` on CPU, and the
datapipe module's hparams in Lightning's checkpoints.
"""

from __future__ import annotations

import gzip
import os
import pickle
from argparse import Namespace
from dataclasses import dataclass
from unittest import mock
from unittest.mock import Mock, PropertyMock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

lightning = pytest.importorskip("lightning")

from lightning.pytorch import LightningModule, Trainer, seed_everything  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.profilers.simple import SimpleProfiler  # noqa: E402
from lightning.pytorch.trainer.states import TrainerFn  # noqa: E402
from lightning.pytorch.utilities import AttributeDict  # noqa: E402

import datapipe  # noqa: E402
from datapipe.formats.idx import encode_idx  # noqa: E402
from datapipe.integrations.lightning import (  # noqa: E402
    DatapipeLightningDataModule,
    as_lightning_datamodule,
)

try:
    from omegaconf import OmegaConf
except ImportError:
    OmegaConf = None

NAMES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def make_learnable_mnist(folder, n_train: int, n_test: int, seed: int = 0):
    """MNIST-format files whose class k is a bright 7x7 block at place k, over noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 96, (n, 28, 28), dtype=np.uint8)
        for i, k in enumerate(labels):
            row, col = divmod(int(k), 4)
            images[i, row * 7 + 2:row * 7 + 9, col * 7:col * 7 + 7] = 255
        for name, array in zip(NAMES[split], (images, labels), strict=True):
            (folder / name).write_bytes(gzip.compress(encode_idx(array), mtime=0))
    return folder


@pytest.fixture
def boring(tmp_path):
    """The adapter in the place of Lightning's BoringDataModule: 64 samples per part."""
    files = make_learnable_mnist(tmp_path / "boring-files", n_train=128, n_test=64)

    def make(**options):
        dm = datapipe.load("mnist", **{"cache_dir": tmp_path / "cache", "source": files,
                                       "verify": False, "val_split": 64, "batch_size": 16,
                                       "quiet": True, **options})
        dm.prepare_data()  # Lightning's boring module holds its data from the start
        return as_lightning_datamodule(dm)

    return make


@pytest.fixture
def classif(tmp_path):
    """The adapter in the place of Lightning's ClassifDataModule: data a model can learn."""
    files = make_learnable_mnist(tmp_path / "classif-files", n_train=1000, n_test=300)
    dm = datapipe.load("mnist", cache_dir=tmp_path / "cache", source=files, verify=False,
                       val_split=200, batch_size=32, normalize=True, quiet=True)
    return as_lightning_datamodule(dm)


class ClassificationModel(LightningModule):
    """Lightning's test classifier, for 1 x 28 x 28 images of 10 classes."""

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        self.lr = lr
        self.net = torch.nn.Linear(28 * 28, 10)

    def forward(self, x):
        return self.net(x.flatten(1))

    def _accuracy(self, logits, y):
        return (logits.argmax(1) == y).float().mean()

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self._accuracy(logits, y), prog_bar=True)
        return {"loss": loss}

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=False)
        self.log("val_acc", self._accuracy(logits, y), prog_bar=True)
        return {"x": F.cross_entropy(logits, y)}

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("test_loss", F.cross_entropy(logits, y), prog_bar=False)
        self.log("test_acc", self._accuracy(logits, y), prog_bar=True)

    def predict_step(self, batch, batch_idx):
        x, _ = batch
        return self(x).argmax(1)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def quiet_trainer(tmp_path, **kwargs):
    return Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1,
                   enable_progress_bar=False, **kwargs)


# ------------------------------------------------------------------ the port


@mock.patch("lightning.pytorch.trainer.trainer.Trainer.node_rank", new_callable=PropertyMock)
@mock.patch("lightning.pytorch.trainer.trainer.Trainer.local_rank", new_callable=PropertyMock)
def test_can_prepare_data(local_rank, node_rank, boring, tmp_path):
    dm = boring()
    assert dm.prepare_data_per_node is True  # datapipe's flag, taken over
    inner = dm.datapipe
    inner.prepare_data = Mock(wraps=inner.prepare_data)

    dm.prepare_data_per_node = True
    trainer = Trainer(default_root_dir=tmp_path, accelerator="cpu")
    trainer.datamodule = dm

    # prepare_data_per_node = True
    # local rank = 0   (True)
    inner.prepare_data.assert_not_called()
    local_rank.return_value = 0
    assert trainer.local_rank == 0

    trainer._data_connector.prepare_data()
    inner.prepare_data.assert_called_once()

    # local rank = 1   (False)
    inner.prepare_data.reset_mock()
    local_rank.return_value = 1
    assert trainer.local_rank == 1

    trainer._data_connector.prepare_data()
    inner.prepare_data.assert_not_called()

    # prepare_data_per_node = False (prepare across all nodes)
    # global rank = 0   (True)
    inner.prepare_data.reset_mock()
    dm.prepare_data_per_node = False
    node_rank.return_value = 0
    local_rank.return_value = 0

    trainer._data_connector.prepare_data()
    inner.prepare_data.assert_called_once()

    # global rank = 1   (False)
    inner.prepare_data.reset_mock()
    node_rank.return_value = 1
    local_rank.return_value = 0

    trainer._data_connector.prepare_data()
    inner.prepare_data.assert_not_called()

    node_rank.return_value = 0
    local_rank.return_value = 1

    trainer._data_connector.prepare_data()
    inner.prepare_data.assert_not_called()

    # prepare per node = True
    # local rank = 0 (True)
    dm.prepare_data_per_node = True
    local_rank.return_value = 0

    trainer._data_connector.prepare_data()
    inner.prepare_data.assert_called_once()


def test_hooks_no_recursion_error(boring):
    # Hooks appended in cascade every time a new data module was made led to a recursion
    # error (Lightning issue 3652): 1005 adapters over one datapipe module.
    inner = boring().datapipe
    inner.prepare_data()
    for _ in range(1005):
        dm = as_lightning_datamodule(inner)
        dm.setup()
        dm.prepare_data()


def test_helper_boringdatamodule(boring):
    dm = boring()
    dm.prepare_data()
    dm.setup("fit")


def test_helper_boringdatamodule_with_verbose_setup(boring):
    dm = boring()
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")


def test_dm_pickle_after_init(boring):
    dm = boring()
    pickle.dumps(dm)


def test_train_loop_only(classif, tmp_path):
    seed_everything(7)

    dm = classif
    model = ClassificationModel()

    model.validation_step = None
    model.test_step = None

    trainer = quiet_trainer(tmp_path, max_epochs=1, enable_model_summary=False)

    trainer.fit(model, datamodule=dm)
    assert trainer.state.finished, f"Training failed with {trainer.state}"
    assert trainer.callback_metrics["train_loss"] < 1.1


def test_train_val_loop_only(classif, tmp_path):
    seed_everything(7)

    dm = classif
    model = ClassificationModel()

    model.validation_step = None

    trainer = quiet_trainer(tmp_path, max_epochs=1, enable_model_summary=False)

    trainer.fit(model, datamodule=dm)
    assert trainer.state.finished, f"Training failed with {trainer.state}"
    assert trainer.callback_metrics["train_loss"] < 1.1


def test_dm_checkpoint_save_and_load(boring, tmp_path):
    class CustomBoringModel(ClassificationModel):
        def validation_step(self, batch, batch_idx):
            out = super().validation_step(batch, batch_idx)
            self.log("early_stop_on", out["x"])
            return out

    dm = boring()
    model = CustomBoringModel()

    trainer = quiet_trainer(
        tmp_path,
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, monitor="early_stop_on")],
    )

    trainer.fit(model, datamodule=dm)
    checkpoint_path = list(trainer.checkpoint_callback.best_k_models.keys())[0]
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    # What the datapipe module's state is: the train loader's position and the split id.
    state = {"train_loader": {"seed": 42, "epoch": 0, "batches_seen": 2,
                             "order": "global"},
             "split_id": dm.datapipe.plan.id}
    assert dm.__class__.__qualname__ in checkpoint
    assert checkpoint[dm.__class__.__qualname__] == state

    dm.datapipe.load_state_dict = Mock(wraps=dm.datapipe.load_state_dict)
    for trainer_fn in TrainerFn:
        dm.datapipe.load_state_dict.reset_mock()
        trainer.state.fn = trainer_fn
        trainer._checkpoint_connector._restore_modules_and_callbacks(checkpoint_path)
        dm.datapipe.load_state_dict.assert_called_once_with(state)


def test_full_loop(classif, tmp_path):
    seed_everything(7)

    dm = classif
    model = ClassificationModel()

    trainer = quiet_trainer(tmp_path, max_epochs=1, enable_model_summary=False,
                            deterministic="warn")

    trainer.fit(model, dm)
    assert trainer.state.finished, f"Training failed with {trainer.state}"
    assert dm.trainer is not None

    result = trainer.validate(model, dm)
    assert dm.trainer is not None
    assert result[0]["val_acc"] > 0.6

    result = trainer.test(model, dm)
    assert dm.trainer is not None
    assert result[0]["test_acc"] > 0.57


def test_dm_reload_dataloaders_every_n_epochs(boring, tmp_path):
    """reload_dataloaders_every_n_epochs set to a non-negative integer."""

    class CustomBoringDataModule(DatapipeLightningDataModule):
        def __init__(self, datamodule):
            super().__init__(datamodule)
            self._epochs_called_for = []

        def train_dataloader(self):
            assert self.trainer.current_epoch not in self._epochs_called_for
            self._epochs_called_for.append(self.trainer.current_epoch)
            return super().train_dataloader()

    dm = CustomBoringDataModule(boring().datapipe)
    model = ClassificationModel()

    model.validation_step = None
    model.test_step = None

    trainer = quiet_trainer(tmp_path, max_epochs=3, limit_train_batches=2,
                            reload_dataloaders_every_n_epochs=2)
    trainer.fit(model, dm)
    assert dm._epochs_called_for == [0, 2]


def test_hyperparameters_saving(boring):
    data = boring(batch_size=10, seed=3)
    assert data.hparams == AttributeDict({**data.datapipe.hparams})
    assert data.hparams["batch_size"] == 10 and data.hparams["seed"] == 3
    assert data.hparams["name"] == "mnist" and data.hparams["val_split"] == 64

    # Made from its arguments (as a checkpoint holds them), as a dict or a Namespace.
    hello = {"name": "mnist", "batch_size": 7, "val_split": 0}
    for given in (hello, vars(Namespace(**hello))):
        data = DatapipeLightningDataModule(**given)
        assert data.hparams["batch_size"] == 7 and data.hparams["val_split"] == 0
        assert data.datapipe.batch_size == 7

    if OmegaConf is not None:
        data = DatapipeLightningDataModule(**OmegaConf.to_container(OmegaConf.create(hello)))
        assert data.hparams["batch_size"] == 7


def test_define_as_dataclass(tmp_path):
    # A dataclass subclass that calls super().__init__ itself: the dunder methods a
    # dataclass adds keep working.
    @dataclass(init=True, repr=True, eq=True, order=True, unsafe_hash=True, frozen=False)
    class BoringDataModule1(DatapipeLightningDataModule):
        batch_size: int
        foo: int = 2

        def __post_init__(self):
            super().__init__(datapipe.load("mnist", cache_dir=tmp_path, batch_size=self.batch_size))

    assert BoringDataModule1(batch_size=64).foo == 2
    assert BoringDataModule1(batch_size=32)
    assert hasattr(BoringDataModule1, "__repr__")
    assert BoringDataModule1(batch_size=32) == BoringDataModule1(batch_size=32)
    assert BoringDataModule1(batch_size=32).datapipe.batch_size == 32


def test_datamodule_hooks_are_profiled(boring, tmp_path):
    """The adapter's hooks are profiled."""

    def get_trainer():
        return quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0, profiler="simple",
                             enable_model_summary=False, logger=False)

    model = ClassificationModel()
    dm = boring()
    trainer = get_trainer()
    trainer.fit(model, datamodule=dm)

    profiler = trainer.profiler
    assert isinstance(profiler, SimpleProfiler)

    name = type(dm).__name__
    keys = [
        f"[LightningDataModule]{name}.prepare_data",
        f"[LightningDataModule]{name}.setup",
        f"[LightningDataModule]{name}.state_dict",
        f"[LightningDataModule]{name}.teardown",
    ]
    for key in keys:
        assert key in profiler.recorded_durations
        durations = profiler.recorded_durations[key]
        assert len(durations) == 1
        assert durations[0] > 0

    ckpt_path = trainer.checkpoint_callback.best_model_path
    trainer = get_trainer()
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    profiler = trainer.profiler

    keys = [
        f"[LightningDataModule]{name}.prepare_data",
        f"[LightningDataModule]{name}.setup",
        f"[LightningDataModule]{name}.load_state_dict",
        f"[LightningDataModule]{name}.teardown",
    ]
    for key in keys:
        assert key in profiler.recorded_durations
        durations = profiler.recorded_durations[key]
        assert len(durations) == 1
        assert durations[0] > 0


def test_datamodule_string_not_available(boring):
    dm = boring()

    expected_output = (
        f"{{Train dataloader: None}}{os.linesep}"
        f"{{Validation dataloader: None}}{os.linesep}"
        f"{{Test dataloader: None}}{os.linesep}"
        f"{{Predict dataloader: None}}"
    )
    out = str(dm)

    assert out == expected_output


def test_datamodule_string_fit_setup(boring):
    dm = boring()
    dm.setup(stage="fit")

    expected_output = (
        f"{{Train dataloader: size=64}}{os.linesep}"
        f"{{Validation dataloader: size=64}}{os.linesep}"
        f"{{Test dataloader: None}}{os.linesep}"
        f"{{Predict dataloader: None}}"
    )
    output = str(dm)

    assert expected_output == output


def test_datamodule_string_validation_setup(boring):
    dm = boring()
    dm.setup(stage="validate")

    expected_output = (
        f"{{Train dataloader: None}}{os.linesep}"
        f"{{Validation dataloader: size=64}}{os.linesep}"
        f"{{Test dataloader: None}}{os.linesep}"
        f"{{Predict dataloader: None}}"
    )
    output = str(dm)

    assert expected_output == output


def test_datamodule_string_test_setup(boring):
    dm = boring()
    dm.setup(stage="test")

    expected_output = (
        f"{{Train dataloader: None}}{os.linesep}"
        f"{{Validation dataloader: None}}{os.linesep}"
        f"{{Test dataloader: size=64}}{os.linesep}"
        f"{{Predict dataloader: None}}"
    )
    output = str(dm)

    assert expected_output == output


def test_datamodule_string_predict_setup(boring):
    dm = boring()
    dm.setup(stage="predict")

    expected_output = (
        f"{{Train dataloader: None}}{os.linesep}"
        f"{{Validation dataloader: None}}{os.linesep}"
        f"{{Test dataloader: None}}{os.linesep}"
        f"{{Predict dataloader: size=64}}"
    )
    output = str(dm)

    assert expected_output == output


# ------------------------------------------------------------------ beyond the port


def test_predict_through_the_adapter_returns_every_sample(classif, tmp_path):
    classif.datapipe.prepare_data()
    trainer = quiet_trainer(tmp_path, logger=False)
    predictions = trainer.predict(ClassificationModel(), datamodule=classif)
    assert sum(len(p) for p in predictions) == 300  # the last, short batch too
    assert len(predictions) == 10  # 300 / 32, rounded up


def test_the_adapter_pickles_with_its_loaders(boring):
    dm = boring()
    dm.setup("fit")
    dm.train_dataloader()
    again = pickle.loads(pickle.dumps(dm))
    assert type(again) is DatapipeLightningDataModule
    assert again.hparams == dm.hparams
    assert len(again.datapipe.datasets["train"]) == 64


def test_datamodule_hparams_reach_the_checkpoint(boring, tmp_path):
    dm = boring(batch_size=8)
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=1, logger=False,
                            callbacks=[ModelCheckpoint(dirpath=tmp_path)])
    trainer.fit(ClassificationModel(), datamodule=dm)
    [path] = tmp_path.glob("*.ckpt")
    checkpoint = torch.load(path, weights_only=True)  # plain data only
    saved = checkpoint["datamodule_hyper_parameters"]
    assert saved == dm.datapipe.hparams
    assert saved["name"] == "mnist" and saved["batch_size"] == 8
    again = DatapipeLightningDataModule.load_from_checkpoint(path)
    assert again.datapipe.batch_size == 8 and again.datapipe.split_specs["val"] == 64


@pytest.mark.slow
def test_ddp_spawn_on_two_cpu_processes(boring, tmp_path):
    dm = boring()
    trainer = Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=2,
                      strategy="ddp_spawn", max_steps=2, limit_val_batches=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, use_distributed_sampler=False)
    model = ClassificationModel()
    before = model.net.weight.detach().clone()
    trainer.fit(model, datamodule=dm)  # the adapter went to the spawned processes pickled
    assert trainer.state.finished and "train_loss" in trainer.callback_metrics
    assert not torch.equal(model.net.weight, before)  # trained there, weights came back
