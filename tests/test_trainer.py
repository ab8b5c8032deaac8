"""The Trainer: the loop, its options, checkpoints and exact resume, and bad input."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import datapipe
from datapipe.datamodules import MNISTDataModule
from datapipe.errors import ConfigError
from datapipe.models import ImageClassifier
from datapipe.trainer import EarlyStopping, ModelCheckpoint, Module, Trainer
from datapipe.trainer import checkpoint as ckpt


@pytest.fixture
def dm_factory(fake_mnist, tmp_path):
    def make(**kwargs):
        options = dict(cache_dir=tmp_path / "cache", source=fake_mnist.folder, verify=False,
                       val_split=100, batch_size=50, normalize=True)
        options.update(kwargs)
        return MNISTDataModule(**options)

    return make


def quiet(tmp_path, **kwargs):
    """A Trainer with no progress bar, writing under tmp_path."""
    options = dict(enable_progress_bar=False, default_root_dir=tmp_path / "runs", seed=0)
    options.update(kwargs)
    return Trainer(**options)


def params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_fit_trains_logs_and_checkpoints(dm_factory, tmp_path):
    dm = dm_factory()
    model = ImageClassifier.from_datamodule(dm, "mlp", lr=1e-3)
    trainer = quiet(tmp_path, max_epochs=3, log_every_n_steps=5)
    trainer.fit(model, dm)
    assert trainer.current_epoch == 3 and trainer.global_step == 30  # 500 rows / 50
    metrics = trainer.callback_metrics
    assert {"train_loss", "val_loss", "val_acc"} <= set(metrics)
    # Random labels cannot be learned in general, but 500 fixed images can be memorized.
    assert float(metrics["train_loss"]) < 2.3

    rows = list(csv.DictReader(open(trainer.log_dir / "metrics.csv")))
    val_rows = [r for r in rows if r.get("val_loss")]
    assert [int(r["epoch"]) for r in val_rows] == [0, 1, 2]
    assert [int(r["step"]) for r in rows if r.get("train_loss_step")][:2] == [5, 10]
    checkpoints = sorted((trainer.log_dir / "checkpoints").glob("*.ckpt"))
    assert [p.name for p in checkpoints] == ["epoch=2-step=30.ckpt"]

    saved = ckpt.load(checkpoints[0])
    assert saved["global_step"] == 30 and saved["loops"]["epoch_finished"]
    card = saved["data_card"]
    assert card["recipe"]["name"] == "mnist"
    assert card["splits"]["sizes"] == {"train": 500, "val": 100, "test": 100, "predict": 100}
    assert card["normalization"]["mean"] == [0.1307]


@pytest.mark.slow  # separate processes
def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(dm_factory, tmp_path):
    def model():
        torch.manual_seed(1)
        return ImageClassifier.from_datamodule(dm_factory(), "lenet", lr=1e-3)

    # Bitwise equality is a CPU promise: GPU kernels may sum in a different order.
    straight = model()
    quiet(tmp_path / "a", max_epochs=2, enable_checkpointing=False, logger=False,
          accelerator="cpu").fit(straight, dm_factory())

    # Interrupted at step 13, in the middle of the second epoch (10 steps per epoch).
    interrupted = model()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=13)
    quiet(tmp_path / "b", max_steps=13, callbacks=[saver], logger=False,
          accelerator="cpu").fit(interrupted, dm_factory())
    [path] = (tmp_path / "ckpt").glob("*.ckpt")
    state = ckpt.load(path)
    assert (state["epoch"], state["loops"]["batches_in_epoch"]) == (1, 3)
    assert state["datamodule"]["train_loader"] == {"seed": 42, "epoch": 1, "batches_seen": 3,
                                                   "order": "global"}

    resumed = model()
    trainer = quiet(tmp_path / "c", max_epochs=2, enable_checkpointing=False, logger=False,
                    accelerator="cpu")
    trainer.fit(resumed, dm_factory(), ckpt_path=path)
    assert trainer.global_step == 20
    for name, value in params(straight).items():
        assert torch.equal(value, params(resumed)[name]), name


def test_resume_from_last_finds_the_newest_checkpoint(dm_factory, tmp_path):
    model = ImageClassifier.from_datamodule(dm_factory(), "mlp")
    quiet(tmp_path, max_epochs=1, callbacks=[ModelCheckpoint(save_last=True)]).fit(
        model, dm_factory())
    trainer = quiet(tmp_path, max_epochs=2)
    trainer.fit(ImageClassifier.from_datamodule(dm_factory(), "mlp"), dm_factory(),
                ckpt_path="last")
    assert trainer.global_step == 20  # continued at epoch 1, not from scratch


def test_accumulation_steps_the_optimizer_every_n_batches(dm_factory, tmp_path):
    trainer = quiet(tmp_path, max_epochs=1, accumulate_grad_batches=3, logger=False,
                    enable_checkpointing=False)
    trainer.fit(ImageClassifier.from_datamodule(dm_factory(), "mlp"), dm_factory())
    assert trainer.global_step == 4  # 10 batches: steps after 3, 6, 9 and the last


class GradNormProbe(ImageClassifier):
    def optimizer_step(self, optimizer):
        norms = [p.grad.norm() for p in self.parameters() if p.grad is not None]
        self.seen_norms.append(float(torch.linalg.vector_norm(torch.stack(norms))))
        optimizer.step()


def test_gradient_clipping_bounds_the_norm(dm_factory, tmp_path):
    model = GradNormProbe(model="mlp")
    model.seen_norms = []
    quiet(tmp_path, max_steps=5, gradient_clip_val=0.01, logger=False,
          enable_checkpointing=False).fit(model, dm_factory())
    assert len(model.seen_norms) == 5
    assert max(model.seen_norms) <= 0.01 + 1e-6


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_runs_on_cpu(dm_factory, tmp_path, precision):
    trainer = quiet(tmp_path, max_steps=3, precision=precision, logger=False,
                    enable_checkpointing=False)
    model = ImageClassifier.from_datamodule(dm_factory(), "mlp")
    trainer.fit(model, dm_factory())
    assert trainer.global_step == 3
    assert all(p.dtype == torch.float32 for p in model.parameters())


class OwnStep(Module):
    """Steps on every other call of its own optimizer_step."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(784, 10)
        self.given = []

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0].flatten(1)), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def optimizer_step(self, optimizer):
        self.given.append(optimizer)
        if len(self.given) % 2 == 0:
            optimizer.step()


@pytest.mark.parametrize("precision", ["32", "16-mixed"])
def test_a_models_own_optimizer_step_is_honoured_in_every_precision(dm_factory, tmp_path,
                                                                   precision):
    from datapipe.trainer.precision import ScaledOptimizer

    model = OwnStep()
    trainer = quiet(tmp_path, max_steps=4, precision=precision, logger=False,
                    enable_checkpointing=False, accelerator="cpu")
    trainer.fit(model, dm_factory())
    assert len(model.given) == 4 and trainer.global_step == 4
    sgd = trainer.optimizers[0]
    if precision == "16-mixed":  # its step() goes through the gradient scaler
        assert all(isinstance(o, ScaledOptimizer) and o.optimizer is sgd for o in model.given)
        assert [o.stepped for o in model.given] == [False, True, False, True]
    else:
        assert all(o is sgd for o in model.given)


def test_setup_teardown_and_on_exception_are_callback_hooks_only(dm_factory, tmp_path):
    calls = []

    class Recorder(datapipe.Callback):
        def setup(self, trainer, module, stage):
            calls.append(("callback", "setup", stage))

        def teardown(self, trainer, module, stage):
            calls.append(("callback", "teardown", stage))

        def on_exception(self, trainer, module, exception):
            calls.append(("callback", "on_exception", type(exception).__name__))

    class Failing(OwnStep):
        # Methods of these names on a Module are its own business, not trainer hooks.
        def setup(self, *args):
            calls.append(("module", "setup"))

        def teardown(self, *args):
            calls.append(("module", "teardown"))

        def on_exception(self, *args):
            calls.append(("module", "on_exception"))

        def training_step(self, batch, batch_idx):
            raise KeyError("boom")

    with pytest.raises(KeyError):
        quiet(tmp_path, max_steps=1, callbacks=[Recorder()], logger=False,
              enable_checkpointing=False).fit(Failing(), dm_factory())
    assert calls == [("callback", "setup", "fit"), ("callback", "on_exception", "KeyError"),
                     ("callback", "teardown", "fit")]


def test_a_checkpoint_asks_the_loader_where_it_stands(dm_factory, tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    quiet(tmp_path, max_epochs=1, limit_train_batches=3, callbacks=[saver],
          logger=False).fit(ImageClassifier.from_datamodule(dm_factory(), "mlp"), dm_factory())
    saved = ckpt.load(saver.best_model_path)
    # The epoch was cut after 3 of 10 batches: the loader says the next epoch comes next.
    assert saved["datamodule"]["train_loader"] == {"seed": 42, "epoch": 1, "batches_seen": 0,
                                                   "order": "global"}
    assert (saved["epoch"], saved["loops"]) == (0, {"epoch_finished": True,
                                                    "batches_in_epoch": 3})


def test_loop_progress_round_trips_and_resumes_after_a_finished_epoch():
    from datapipe.trainer.progress import Progress

    mid = Progress(epoch=1, global_step=13, batches_in_epoch=3)
    again = Progress()
    again.load_state_dict(mid.state_dict())
    assert again == mid
    done = Progress(epoch=1, global_step=20, batches_in_epoch=10, epoch_finished=True)
    again.load_state_dict(done.state_dict())
    assert again == Progress(epoch=2, global_step=20)


def test_limits_and_fast_dev_run(dm_factory, tmp_path):
    trainer = quiet(tmp_path, max_epochs=2, limit_train_batches=0.5, limit_val_batches=1,
                    logger=False, enable_checkpointing=False)
    trainer.fit(ImageClassifier.from_datamodule(dm_factory(), "mlp"), dm_factory())
    assert trainer.global_step == 10 and trainer.num_val_batches == [1]

    dev = quiet(tmp_path, fast_dev_run=True)
    dev.fit(ImageClassifier.from_datamodule(dm_factory(), "mlp"), dm_factory())
    assert dev.global_step == 1 and dev.loggers == []
    assert not (tmp_path / "runs" / "logs").exists()


def test_fast_dev_run_saves_no_checkpoint_even_with_a_checkpoint_callback(dm_factory,
                                                                         tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    dev = quiet(tmp_path, fast_dev_run=True, callbacks=[saver])
    dev.fit(ImageClassifier.from_datamodule(dm_factory(), "mlp"), dm_factory())
    assert dev.global_step == 1 and not list((tmp_path / "ckpt").glob("*.ckpt"))


def test_the_checkpoint_a_run_resumed_from_is_not_deleted(dm_factory, tmp_path):
    first = ModelCheckpoint(dirpath=tmp_path / "ckpt")  # keeps the latest only
    quiet(tmp_path, max_epochs=1, callbacks=[first], logger=False).fit(
        ImageClassifier.from_datamodule(dm_factory(), "mlp"), dm_factory())
    resumed_from = first.best_model_path
    later = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    trainer = quiet(tmp_path, max_epochs=2, callbacks=[later], logger=False)
    trainer.fit(ImageClassifier.from_datamodule(dm_factory(), "mlp"), dm_factory(),
                ckpt_path=resumed_from)
    assert trainer.ckpt_path == resumed_from
    # The newer one replaced it as the latest, but the file this run started from stays.
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.ckpt")) == [
        "epoch=0-step=10.ckpt", "epoch=1-step=20.ckpt"]


def test_early_stopping_ends_the_fit(dm_factory, tmp_path):
    stopper = EarlyStopping(monitor="val_loss", patience=1, min_delta=100.0)
    trainer = quiet(tmp_path, max_epochs=10, callbacks=[stopper], logger=False,
                    enable_checkpointing=False)
    trainer.fit(ImageClassifier.from_datamodule(dm_factory(), "mlp"), dm_factory())
    assert trainer.current_epoch == 2  # the first check sets the best, the second waits out


def test_validate_test_and_predict_return_results(dm_factory, tmp_path):
    dm = dm_factory()
    model = ImageClassifier.from_datamodule(dm, "mlp")
    trainer = quiet(tmp_path, max_epochs=1, logger=False, enable_checkpointing=False)
    trainer.fit(model, dm)
    [val] = trainer.validate(model, dm)
    [test] = trainer.test(model, dm)
    assert set(val) == {"val_loss", "val_acc"} and set(test) == {"test_loss", "test_acc"}
    assert 0.0 <= test["test_acc"] <= 1.0
    predictions = trainer.predict(model, dm)
    assert sum(len(p) for p in predictions) == 100
    assert predictions[0].dtype == torch.int64


class Silent(Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(784, 10)

    def training_step(self, batch, batch_idx):
        F.cross_entropy(self.net(batch[0].flatten(1)), batch[1])  # forgets to return

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_bad_input_is_one_clear_error(dm_factory, tmp_path):
    with pytest.raises(ConfigError, match="training_step returned NoneType; return the loss"):
        quiet(tmp_path, max_steps=1, logger=False).fit(Silent(), dm_factory())
    with pytest.raises(ConfigError, match=r"devices=64 but only \d+ cpu device"):
        Trainer(accelerator="cpu", devices=64)
    with pytest.raises(ConfigError, match="launch with `torchrun --nproc_per_node 2"):
        Trainer(accelerator="cpu", devices=2)
    with pytest.raises(ConfigError, match="precision='8-bit' is not one of"):
        Trainer(precision="8-bit")
    with pytest.raises(ConfigError, match="does not exist"):
        quiet(tmp_path, max_epochs=1).fit(Silent(), dm_factory(), ckpt_path=tmp_path / "no.ckpt")
    with pytest.raises(ConfigError, match="must be a datapipe.Module"):
        quiet(tmp_path).fit(nn.Linear(2, 2), dm_factory())


def test_checkpoint_of_another_model_is_refused(dm_factory, tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    quiet(tmp_path, max_epochs=1, callbacks=[saver], logger=False).fit(
        ImageClassifier.from_datamodule(dm_factory(), "mlp"), dm_factory())
    other = ImageClassifier.from_datamodule(dm_factory(), "lenet")
    with pytest.raises(ConfigError, match="the checkpoint does not fit ImageClassifier"):
        quiet(tmp_path, logger=False).test(other, dm_factory(), ckpt_path=saver.last_model_path
                                           or saver.best_model_path)


def test_resume_with_other_splits_is_refused(dm_factory, tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    quiet(tmp_path, max_epochs=1, callbacks=[saver], logger=False).fit(
        ImageClassifier.from_datamodule(dm_factory(), "mlp"), dm_factory())
    with pytest.raises(ConfigError, match="trained on split .* this DataModule gives split"):
        quiet(tmp_path, max_epochs=2, logger=False).fit(
            ImageClassifier.from_datamodule(dm_factory(), "mlp"), dm_factory(seed=7),
            ckpt_path=saver.best_model_path)


def test_trainer_is_exported_lazily():
    assert datapipe.Trainer is Trainer and datapipe.Module is Module
