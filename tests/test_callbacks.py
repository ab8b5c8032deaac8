"""The shipped callbacks, driven by a fake trainer that has only the contract's members."""

from __future__ import annotations

import io
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from datapipe.errors import ConfigError
from datapipe.trainer import callback as callback_module
from datapipe.trainer.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
)
from datapipe.trainer.contract import MEMBERS, TrainerView

MODULE = nn.Linear(2, 1)


class FakeTrainer(SimpleNamespace):
    """The members of TrainerView and nothing else (but the callbacks a checkpoint holds);
    ``save_checkpoint`` writes a small file."""

    def __init__(self, root: Path, **overrides):
        defaults = dict(
            current_epoch=0, global_step=0, callback_metrics={}, progress_bar_metrics={},
            should_stop=False, is_global_zero=True, global_rank=0, world_size=1,
            default_root_dir=str(root), log_dir=str(root / "logs" / "version_0"), loggers=[],
            optimizers=[], lr_scheduler_configs=[], num_training_batches=4, num_val_batches=2,
            num_test_batches=[], num_predict_batches=[], check_val_every_n_epoch=1,
            log_every_n_steps=1, max_epochs=10, max_steps=-1, stage="fit",
            sanity_checking=False, fast_dev_run=False, ckpt_path=None, callbacks=[],
        )
        defaults.update(overrides)
        super().__init__(**defaults)
        self.saved: list[str] = []

    def broadcast(self, obj, src=0):
        return obj

    def save_checkpoint(self, path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        state = {"global_step": self.global_step,
                 "callbacks": {cb.state_key: cb.state_dict() for cb in self.callbacks}}
        torch.save(state, path)
        self.saved.append(path)

    def log(self, **metrics):
        self.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})


def make(tmp_path, callback, **overrides) -> FakeTrainer:
    trainer = FakeTrainer(tmp_path, callbacks=[callback], **overrides)
    callback.setup(trainer, MODULE, "fit")
    callback.on_fit_start(trainer, MODULE)
    callback.on_train_start(trainer, MODULE)
    return trainer


def run_epoch(trainer, callback, val=None, train=None, batches=None):
    """One training epoch: its batches (one optimizer step each), validation, epoch end."""
    callback.on_train_epoch_start(trainer, MODULE)
    for i in range(batches or trainer.num_training_batches):
        trainer.global_step += 1
        if train:
            trainer.log(**train)
        callback.on_train_batch_end(trainer, MODULE, None, None, i)
    if val is not None:
        callback.on_validation_start(trainer, MODULE)
        trainer.log(**val)
        callback.on_validation_end(trainer, MODULE)
    callback.on_train_epoch_end(trainer, MODULE)
    trainer.current_epoch += 1


def ckpt_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.ckpt"))


def test_callback_is_reexported():
    assert Callback is callback_module.Callback


def test_the_stand_in_trainer_has_exactly_the_contract(tmp_path):
    fake = FakeTrainer(tmp_path)
    assert set(vars(fake)) - {"saved", "callbacks"} | {"broadcast", "save_checkpoint"} \
        == set(MEMBERS)


def test_a_real_trainer_sets_every_member_of_the_contract(tmp_path):
    from datapipe.trainer import Trainer

    trainer = Trainer(default_root_dir=tmp_path, logger=False, accelerator="cpu",
                      enable_progress_bar=False)
    assert isinstance(trainer, TrainerView)
    missing = [name for name in MEMBERS if not hasattr(trainer, name)]
    assert missing == []
    obj = object()
    assert trainer.broadcast(obj) is obj  # one process: its own value


# ---------------------------------------------------------------------- ModelCheckpoint


def test_top_k_keeps_exactly_the_k_lowest_in_min_mode(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", filename="{epoch}-{val_loss:.2f}",
                           monitor="val_loss", save_top_k=2)
    trainer = make(tmp_path, ckpt)
    for loss in [0.5, 0.4, 0.6, 0.3, 0.45]:
        run_epoch(trainer, ckpt, val={"val_loss": loss})
    folder = tmp_path / "ck"
    assert ckpt_names(folder) == ["epoch=1-val_loss=0.40.ckpt", "epoch=3-val_loss=0.30.ckpt"]
    assert ckpt.best_model_path == str(folder / "epoch=3-val_loss=0.30.ckpt")
    assert float(ckpt.best_model_score) == pytest.approx(0.3)
    assert ckpt.kth_best_model_path == str(folder / "epoch=1-val_loss=0.40.ckpt")
    assert sorted(round(float(v), 2) for v in ckpt.best_k_models.values()) == [0.3, 0.4]
    # Written: 0.5, 0.4 and 0.3; not 0.6 (worse than the kth, 0.5) nor 0.45 (kth 0.4).
    assert len(trainer.saved) == 3


def test_top_k_keeps_exactly_the_k_highest_in_max_mode(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", monitor="val_acc", mode="max", save_top_k=2)
    trainer = make(tmp_path, ckpt)
    for acc in [0.1, 0.5, 0.3, 0.7, 0.2]:
        run_epoch(trainer, ckpt, val={"val_acc": acc})
    assert ckpt_names(tmp_path / "ck") == ["epoch=1-step=8.ckpt", "epoch=3-step=16.ckpt"]
    assert float(ckpt.best_model_score) == pytest.approx(0.7)
    assert Path(ckpt.best_model_path).name == "epoch=3-step=16.ckpt"


def test_save_top_k_all_and_none(tmp_path):
    keep_all = ModelCheckpoint(dirpath=tmp_path / "all", monitor="val_loss", save_top_k=-1)
    keep_none = ModelCheckpoint(dirpath=tmp_path / "none", monitor="val_loss", save_top_k=0)
    t1, t2 = make(tmp_path, keep_all), make(tmp_path, keep_none)
    for loss in [0.3, 0.5, 0.1]:
        run_epoch(t1, keep_all, val={"val_loss": loss})
        run_epoch(t2, keep_none, val={"val_loss": loss})
    assert len(ckpt_names(tmp_path / "all")) == 3
    assert Path(keep_all.best_model_path).name == "epoch=2-step=12.ckpt"
    assert not (tmp_path / "none").exists() and t2.saved == []


def test_filenames_are_formatted_like_lightning(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}-{step}-{val_loss}",
                           monitor="val_loss")
    trainer = make(tmp_path, ckpt)
    run_epoch(trainer, ckpt, val={"val_loss": 0.12341})
    assert ckpt_names(tmp_path) == ["epoch=0-step=4-val_loss=0.1234.ckpt"]

    metrics = {"epoch": torch.tensor(3), "step": torch.tensor(120),
               "val/acc": torch.tensor(0.98765)}
    name = ckpt.format_checkpoint_name(metrics, filename="{epoch}-{val/acc:.2f}")
    assert Path(name).name == "epoch=3-val_acc=0.99.ckpt"
    default = ModelCheckpoint(dirpath=tmp_path)
    assert Path(default.format_checkpoint_name(metrics, ver=2)).name == "epoch=3-step=120-v2.ckpt"
    plain = ModelCheckpoint(dirpath=tmp_path, filename="model-{epoch:02d}",
                            auto_insert_metric_name=False)
    assert Path(plain.format_checkpoint_name(metrics)).name == "model-03.ckpt"
    # A metric the template names but nobody logged is 0, as in Lightning.
    assert Path(ckpt.format_checkpoint_name({}, filename="{missing}")).name == "missing=0.ckpt"


def test_default_dirpath_is_log_dir_checkpoints(tmp_path):
    ckpt = ModelCheckpoint()
    trainer = make(tmp_path, ckpt, num_val_batches=0)
    run_epoch(trainer, ckpt)
    assert ckpt.dirpath == str(tmp_path / "logs" / "version_0" / "checkpoints")
    assert ckpt_names(Path(ckpt.dirpath)) == ["epoch=0-step=4.ckpt"]


def test_without_monitor_only_the_latest_is_kept(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path)
    trainer = make(tmp_path, ckpt)
    for _ in range(3):
        run_epoch(trainer, ckpt, val={"val_loss": 1.0})
    assert ckpt_names(tmp_path) == ["epoch=2-step=12.ckpt"]
    assert ckpt.best_model_path == str(tmp_path / "epoch=2-step=12.ckpt")
    assert ckpt.best_model_score is None
    # Validation end and train epoch end share a global step: saved once per epoch.
    assert len(trainer.saved) == 3


def test_save_last_writes_last_ckpt_at_every_save(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_last=True)
    trainer = make(tmp_path, ckpt)
    for loss in [0.5, 0.7, 0.9]:  # only the first epoch is a top-1 checkpoint
        run_epoch(trainer, ckpt, val={"val_loss": loss})
    assert ckpt_names(tmp_path) == ["epoch=0-step=4.ckpt", "last.ckpt"]
    assert ckpt.last_model_path == str(tmp_path / "last.ckpt")
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 12


def test_last_ckpt_of_an_earlier_run_is_not_overwritten(tmp_path):
    (tmp_path / "last.ckpt").write_text("earlier run")
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer = make(tmp_path, ckpt, num_val_batches=0)
    run_epoch(trainer, ckpt)
    run_epoch(trainer, ckpt)
    assert ckpt_names(tmp_path) == ["last-v1.ckpt", "last.ckpt"]
    assert (tmp_path / "last.ckpt").read_text() == "earlier run"


def test_missing_monitor_metric_names_the_available_ones(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss")
    trainer = make(tmp_path, ckpt, num_val_batches=0)
    with pytest.raises(ConfigError) as err:
        run_epoch(trainer, ckpt, train={"train_loss": 0.3})
    message = str(err.value)
    assert "'val_loss'" in message and "train_loss" in message and "\n" not in message


def test_missing_monitor_after_validation_is_an_error(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_los")
    trainer = make(tmp_path, ckpt)
    with pytest.raises(ConfigError, match="val_los.*val_loss"):
        run_epoch(trainer, ckpt, val={"val_loss": 0.3})


def test_a_training_metric_monitor_saves_at_train_epoch_end(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="train_loss_epoch")
    trainer = make(tmp_path, ckpt)
    ckpt.on_train_epoch_start(trainer, MODULE)
    trainer.global_step = 4
    trainer.log(val_loss=0.9)
    ckpt.on_validation_end(trainer, MODULE)  # not there yet: the epoch end brings it
    assert trainer.saved == []
    trainer.log(train_loss_epoch=0.4)
    ckpt.on_train_epoch_end(trainer, MODULE)
    assert ckpt_names(tmp_path) == ["epoch=0-step=4.ckpt"]
    assert float(ckpt.best_model_score) == pytest.approx(0.4)


def test_every_n_train_steps_saves_mid_epoch(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    trainer = make(tmp_path, ckpt, num_training_batches=8)
    ckpt.on_train_epoch_start(trainer, MODULE)
    for i in range(8):
        if i % 2 == 0:  # gradient accumulation over 2 batches: one step per 2 batches
            trainer.global_step += 1
        ckpt.on_train_batch_end(trainer, MODULE, None, None, i)
    ckpt.on_validation_end(trainer, MODULE)
    ckpt.on_train_epoch_end(trainer, MODULE)
    # Steps 3 only (step 3 spans two batches, saved once); no epoch-end checkpoint.
    assert ckpt_names(tmp_path) == ["epoch=0-step=3.ckpt"]
    assert trainer.saved == [str(tmp_path / "epoch=0-step=3.ckpt")]


def test_every_n_train_steps_with_every_n_epochs_saves_both(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, every_n_epochs=1,
                           save_top_k=-1)
    trainer = make(tmp_path, ckpt)
    run_epoch(trainer, ckpt, val={"val_loss": 1.0})
    assert ckpt_names(tmp_path) == ["epoch=0-step=3.ckpt", "epoch=0-step=4.ckpt"]


def test_step_save_on_an_epochs_last_batch_waits_for_validation(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", every_n_train_steps=4,
                           filename="{step}-{val_loss:.1f}", save_top_k=-1)
    trainer = make(tmp_path, ckpt)
    run_epoch(trainer, ckpt, val={"val_loss": 0.9})
    run_epoch(trainer, ckpt, val={"val_loss": 0.2})
    # Saved with the fresh validation value, not the previous epoch's.
    assert ckpt_names(tmp_path) == ["step=4-val_loss=0.9.ckpt", "step=8-val_loss=0.2.ckpt"]


def test_step_saves_before_the_first_validation_wait_for_its_metric(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", every_n_train_steps=2,
                           filename="{step}-{val_loss:.1f}", save_top_k=-1)
    trainer = make(tmp_path, ckpt, num_val_batches=[])  # not known until validation runs
    run_epoch(trainer, ckpt, val={"val_loss": 0.5})
    trainer.num_val_batches = [2]
    run_epoch(trainer, ckpt, val={"val_loss": 0.3})
    assert ckpt_names(tmp_path) == ["step=4-val_loss=0.5.ckpt", "step=6-val_loss=0.5.ckpt",
                                    "step=8-val_loss=0.3.ckpt"]


def test_validation_every_other_epoch_saves_after_validation(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=-1)
    trainer = make(tmp_path, ckpt, num_val_batches=[], check_val_every_n_epoch=2)
    for epoch, loss in enumerate([0.5, 0.4, 0.3, 0.2]):
        run_epoch(trainer, ckpt, val={"val_loss": loss} if epoch % 2 else None)
    assert ckpt_names(tmp_path) == ["epoch=1-step=8.ckpt", "epoch=3-step=16.ckpt"]


def test_every_n_epochs(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=2, save_top_k=-1)
    trainer = make(tmp_path, ckpt)
    for _ in range(4):
        run_epoch(trainer, ckpt, val={"val_loss": 1.0})
    assert ckpt_names(tmp_path) == ["epoch=1-step=8.ckpt", "epoch=3-step=16.ckpt"]


def test_no_checkpoints_outside_fitting(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path)
    trainer = make(tmp_path, ckpt, global_step=5)
    trainer.sanity_checking = True
    ckpt.on_validation_end(trainer, MODULE)
    trainer.sanity_checking, trainer.stage = False, "validate"
    ckpt.on_validation_end(trainer, MODULE)
    assert trainer.saved == []


def test_only_global_rank_zero_deletes(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path)
    trainer = make(tmp_path, ckpt, is_global_zero=False, global_rank=1, num_val_batches=0)
    run_epoch(trainer, ckpt)
    run_epoch(trainer, ckpt)
    assert ckpt_names(tmp_path) == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt"]
    assert Path(ckpt.best_model_path).name == "epoch=1-step=8.ckpt"


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="mode"):
        ModelCheckpoint(mode="best")
    with pytest.raises(ConfigError, match="monitor"):
        ModelCheckpoint(save_top_k=3)


def test_state_round_trip_through_a_checkpoint_file(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=2, save_last=True)
    trainer = make(tmp_path, ckpt)
    for loss in [0.5, 0.3, 0.4]:
        run_epoch(trainer, ckpt, val={"val_loss": loss})
    saved = torch.load(ckpt.last_model_path, weights_only=True)["callbacks"][ckpt.state_key]

    restored = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=2,
                               save_last=True)
    restored.load_state_dict(saved)
    assert restored.best_model_path == ckpt.best_model_path
    assert float(restored.best_model_score) == pytest.approx(0.3)
    assert set(restored.best_k_models) == set(ckpt.best_k_models)
    assert restored.kth_best_model_path == ckpt.kth_best_model_path
    assert restored.last_model_path == ckpt.last_model_path
    assert saved["monitor"] == "val_loss" and saved["dirpath"] == str(tmp_path)

    # Resumed: 0.45 is not top-2; 0.35 replaces 0.4, and last.ckpt is reused.
    trainer.callbacks = [restored]
    restored.setup(trainer, MODULE, "fit")
    run_epoch(trainer, restored, val={"val_loss": 0.45})
    run_epoch(trainer, restored, val={"val_loss": 0.35})
    assert ckpt_names(tmp_path) == ["epoch=1-step=8.ckpt", "epoch=4-step=20.ckpt", "last.ckpt"]


def test_state_loaded_before_setup_applies_to_the_default_dirpath(tmp_path):
    ckpt = ModelCheckpoint(monitor="val_loss")
    trainer = make(tmp_path, ckpt)
    run_epoch(trainer, ckpt, val={"val_loss": 0.5})
    restored = ModelCheckpoint(monitor="val_loss")
    restored.load_state_dict(ckpt.state_dict())
    assert restored.best_model_path == ""
    restored.setup(trainer, MODULE, "fit")
    assert restored.best_model_path == ckpt.best_model_path
    assert float(restored.best_model_score) == pytest.approx(0.5)


def test_state_keys_tell_checkpoint_callbacks_apart():
    a = ModelCheckpoint(monitor="val_loss")
    b = ModelCheckpoint(monitor="val_acc", mode="max")
    c = ModelCheckpoint(every_n_train_steps=100)
    assert a.state_key.startswith("ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'")
    assert len({a.state_key, b.state_key, c.state_key, ModelCheckpoint().state_key}) == 4


# ---------------------------------------------------------------------- EarlyStopping


def check(trainer, stopper, value, name="val_loss"):
    """One epoch's validation reporting ``value``, then the epoch's end."""
    trainer.log(**{name: value})
    stopper.on_validation_end(trainer, MODULE)
    stopper.on_train_epoch_end(trainer, MODULE)
    trainer.current_epoch += 1
    return trainer.should_stop


def test_early_stopping_stops_after_exactly_patience_bad_checks(tmp_path):
    stopper = EarlyStopping("val_loss", patience=3)
    trainer = make(tmp_path, stopper)
    results = [check(trainer, stopper, v) for v in [1.0, 0.9, 0.95, 0.92]]
    assert results == [False] * 4 and stopper.wait_count == 2
    assert check(trainer, stopper, 0.91) is True
    assert stopper.stopped_epoch == 4 and stopper.wait_count == 3
    assert float(stopper.best_score) == pytest.approx(0.9)
    assert "did not improve in the last 3 records" in stopper.stop_reason


def test_early_stopping_improvement_must_beat_min_delta(tmp_path):
    stopper = EarlyStopping("val_loss", min_delta=0.1, patience=2)
    trainer = make(tmp_path, stopper)
    check(trainer, stopper, 1.0)
    check(trainer, stopper, 0.95)  # better, but by less than min_delta
    assert stopper.wait_count == 1 and float(stopper.best_score) == 1.0
    check(trainer, stopper, 0.85)
    assert stopper.wait_count == 0 and float(stopper.best_score) == pytest.approx(0.85)

    up = EarlyStopping("acc", mode="max", min_delta=0.05, patience=1)
    trainer = make(tmp_path, up)
    check(trainer, up, 0.5, "acc")
    assert check(trainer, up, 0.54, "acc") is True


def test_early_stopping_thresholds_stop_at_once(tmp_path):
    diverged = EarlyStopping("val_loss", divergence_threshold=5.0, patience=10)
    trainer = make(tmp_path, diverged)
    assert check(trainer, diverged, 4.0) is False
    assert check(trainer, diverged, 6.0) is True
    assert diverged.stop_reason.startswith("Divergence threshold reached")

    reached = EarlyStopping("val_acc", mode="max", stopping_threshold=0.99, patience=10)
    trainer = make(tmp_path, reached)
    assert check(trainer, reached, 0.98, "val_acc") is False
    assert check(trainer, reached, 0.995, "val_acc") is True
    assert reached.stop_reason.startswith("Stopping threshold reached")


def test_early_stopping_stops_on_a_non_finite_value(tmp_path):
    stopper = EarlyStopping("val_loss", patience=10)
    trainer = make(tmp_path, stopper)
    check(trainer, stopper, 1.0)
    assert check(trainer, stopper, math.nan) is True
    assert "is not finite" in stopper.stop_reason and stopper.stopped_epoch == 1

    lenient = EarlyStopping("val_loss", patience=10, check_finite=False)
    trainer = make(tmp_path, lenient)
    assert check(trainer, lenient, math.inf) is False and lenient.wait_count == 1


def test_early_stopping_missing_metric(tmp_path):
    strict = EarlyStopping("val_loss")
    trainer = make(tmp_path, strict, num_val_batches=0)
    trainer.log(train_loss=0.5)
    with pytest.raises(ConfigError, match="'val_loss'.*train_loss"):
        strict.on_train_epoch_end(trainer, MODULE)

    lenient = EarlyStopping("val_loss", strict=False)
    trainer = make(tmp_path, lenient, num_val_batches=0)
    trainer.log(train_loss=0.5)
    with pytest.warns(UserWarning, match="val_loss"):
        lenient.on_train_epoch_end(trainer, MODULE)
    assert trainer.should_stop is False


def test_early_stopping_checks_once_per_epoch(tmp_path):
    with_val = EarlyStopping("val_loss", patience=5)
    trainer = make(tmp_path, with_val)
    check(trainer, with_val, 1.0)
    check(trainer, with_val, 2.0)  # validation end and epoch end: one check
    assert with_val.wait_count == 1

    no_val = EarlyStopping("train_loss", patience=5)
    trainer = make(tmp_path, no_val, num_val_batches=0)
    for value in [1.0, 2.0, 3.0]:
        trainer.log(train_loss=value)
        no_val.on_train_epoch_end(trainer, MODULE)
    assert no_val.wait_count == 2


def test_early_stopping_waits_for_validation_every_other_epoch(tmp_path):
    stopper = EarlyStopping("val_loss", patience=1)
    trainer = make(tmp_path, stopper, num_val_batches=[], check_val_every_n_epoch=2)
    stopper.on_train_epoch_end(trainer, MODULE)  # epoch 0: no validation, no metric yet
    trainer.current_epoch = 1
    assert check(trainer, stopper, 1.0) is False
    trainer.current_epoch = 3
    assert check(trainer, stopper, 1.5) is True and stopper.stopped_epoch == 3


def test_early_stopping_ignores_sanity_checks(tmp_path):
    stopper = EarlyStopping("val_loss", patience=0)
    trainer = make(tmp_path, stopper, sanity_checking=True)
    assert check(trainer, stopper, 1.0) is False and stopper.wait_count == 0


def test_verbose_callbacks_log_instead_of_printing(tmp_path, capsys, caplog):
    stopper = EarlyStopping("val_loss", patience=1, verbose=True)
    saver = ModelCheckpoint(dirpath=tmp_path / "ck", monitor="val_loss", verbose=True)
    with caplog.at_level("INFO", logger="datapipe"):
        for callback in (stopper, saver):
            trainer = make(tmp_path, callback)
            run_epoch(trainer, callback, val={"val_loss": 0.5})
    assert capsys.readouterr().err == ""
    by = {r.name: r.getMessage() for r in caplog.records}
    assert "New best score: 0.500" in by["datapipe.trainer.callbacks.early_stopping"]
    assert "'val_loss' reached 0.50000" in by["datapipe.trainer.callbacks.model_checkpoint"]


def test_early_stopping_state_round_trip(tmp_path):
    stopper = EarlyStopping("val_loss", patience=3)
    trainer = make(tmp_path, stopper)
    for value in [1.0, 0.8, 0.9]:
        check(trainer, stopper, value)
    path = tmp_path / "es.pt"
    torch.save({stopper.state_key: stopper.state_dict()}, path)
    key = "EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}"
    state = torch.load(path, weights_only=True)[key]
    restored = EarlyStopping("val_loss", patience=3)
    restored.load_state_dict(state)
    assert restored.wait_count == 1 and float(restored.best_score) == pytest.approx(0.8)
    check(trainer, restored, 0.85)
    assert check(trainer, restored, 0.85) is True and restored.stopped_epoch == 4


# ---------------------------------------------------------------------- ProgressBar


def drive_bar(trainer, bar):
    bar.setup(trainer, MODULE, "fit")
    bar.on_train_start(trainer, MODULE)
    for _ in range(2):
        bar.on_train_epoch_start(trainer, MODULE)
        for i in range(trainer.num_training_batches):
            trainer.global_step += 1
            trainer.progress_bar_metrics = {"loss": 0.123456 / trainer.global_step}
            bar.on_train_batch_end(trainer, MODULE, None, None, i)
        bar.on_validation_start(trainer, MODULE)
        for i in range(trainer.num_val_batches):
            bar.on_validation_batch_end(trainer, MODULE, None, None, i)
        trainer.progress_bar_metrics["val_acc"] = 0.5
        bar.on_validation_end(trainer, MODULE)
        bar.on_train_epoch_end(trainer, MODULE)
        trainer.current_epoch += 1
    bar.on_train_end(trainer, MODULE)
    bar.teardown(trainer, MODULE, "fit")


def test_progress_bar_shows_metrics(tmp_path):
    out = io.StringIO()
    bar = ProgressBar(refresh_rate=3, file=out)
    trainer = FakeTrainer(tmp_path, num_training_batches=7,
                          loggers=[SimpleNamespace(version=4)])
    drive_bar(trainer, bar)
    train_bar = bar.train_progress_bar
    assert train_bar.n == 7 and train_bar.total == 7
    assert train_bar.desc.startswith("Epoch 1")
    assert train_bar.postfix == "v_num=4, loss=0.008818, val_acc=0.5"
    err = out.getvalue()
    assert "Epoch 0" in err and "loss=0.0" in err


def test_progress_bar_draws_nothing_into_a_log(tmp_path, capsys):
    bar = ProgressBar()  # stderr is captured here: not a terminal
    drive_bar(FakeTrainer(tmp_path, num_training_batches=3), bar)
    assert bar.train_progress_bar is None
    assert capsys.readouterr().err == ""


def test_progress_bar_refreshes_every_refresh_rate_batches(tmp_path):
    bar = ProgressBar(refresh_rate=3, file=io.StringIO())
    trainer = FakeTrainer(tmp_path, num_training_batches=7)
    bar.on_train_epoch_start(trainer, MODULE)
    seen = []
    for i in range(7):
        bar.on_train_batch_end(trainer, MODULE, None, None, i)
        seen.append(bar.train_progress_bar.n)
    assert seen == [0, 0, 3, 3, 3, 6, 7]


def test_progress_bar_disabled_with_refresh_rate_zero(tmp_path, capsys):
    bar = ProgressBar(refresh_rate=0)
    drive_bar(FakeTrainer(tmp_path), bar)
    for stage in ("test", "predict"):
        getattr(bar, f"on_{stage}_start")(FakeTrainer(tmp_path), MODULE)
        getattr(bar, f"on_{stage}_end")(FakeTrainer(tmp_path), MODULE)
    assert bar.train_progress_bar is None and not bar.is_enabled
    assert capsys.readouterr().err == ""


def test_progress_bar_only_on_global_rank_zero(tmp_path):
    out = io.StringIO()
    bar = ProgressBar(file=out)
    drive_bar(FakeTrainer(tmp_path, is_global_zero=False, global_rank=1), bar)
    assert bar.train_progress_bar is None and out.getvalue() == ""


def test_progress_bar_test_and_predict(tmp_path):
    out = io.StringIO()
    bar = ProgressBar(file=out)
    trainer = FakeTrainer(tmp_path, stage="test", num_test_batches=3)
    bar.on_test_start(trainer, MODULE)
    for i in range(3):
        bar.on_test_batch_end(trainer, MODULE, None, None, i)
    assert bar.test_progress_bar.n == 3 and bar.test_progress_bar.total == 3
    bar.on_test_end(trainer, MODULE)
    bar.on_predict_start(trainer, MODULE)  # no count known: a bar without total
    bar.on_predict_batch_end(trainer, MODULE, None, None, 0)
    bar.on_predict_end(trainer, MODULE)
    err = out.getvalue()
    assert "Testing" in err and "Predicting" in err


# ---------------------------------------------------------------------- LearningRateMonitor


class RecordingLogger:
    def __init__(self):
        self.calls: list[tuple[dict, int]] = []

    def log_metrics(self, metrics, step):
        self.calls.append((dict(metrics), step))


def test_lr_monitor_logs_lr_after_step_lr_steps(tmp_path):
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    logger = RecordingLogger()
    monitor = LearningRateMonitor()
    trainer = make(tmp_path, monitor, loggers=[logger], optimizers=[optimizer],
                   lr_scheduler_configs=[SimpleNamespace(scheduler=scheduler, interval="epoch",
                                                         name=None)])
    for _ in range(3):
        monitor.on_train_epoch_start(trainer, MODULE)
        for i in range(2):
            monitor.on_train_batch_start(trainer, MODULE, None, i)
            optimizer.step()
            trainer.global_step += 1
        scheduler.step()
    assert monitor.lrs == {"lr-SGD": [0.1, 0.05, 0.025]}
    assert logger.calls == [({"lr-SGD": 0.1}, 0), ({"lr-SGD": 0.05}, 2),
                            ({"lr-SGD": 0.025}, 4)]


def test_lr_monitor_names_param_groups_and_momentum(tmp_path):
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    sgd = torch.optim.SGD([{"params": model[0].parameters()},
                           {"params": model[1].parameters(), "lr": 0.01}],
                          lr=0.1, momentum=0.9)
    adam = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.8, 0.999))
    step_scheduler = {"scheduler": torch.optim.lr_scheduler.StepLR(adam, 1), "interval": "step"}
    logger = RecordingLogger()
    monitor = LearningRateMonitor(log_momentum=True)
    trainer = make(tmp_path, monitor, loggers=[logger], optimizers=[sgd, adam],
                   lr_scheduler_configs=[step_scheduler])
    monitor.on_train_batch_start(trainer, MODULE, None, 0)
    assert logger.calls == [({
        "lr-Adam": pytest.approx(1e-3), "lr-Adam-momentum": 0.8,
        "lr-SGD-pg1": 0.1, "lr-SGD-pg1-momentum": 0.9,
        "lr-SGD-pg2": 0.01, "lr-SGD-pg2-momentum": 0.9,
    }, 0)]
    # An epoch start logs the optimizer without scheduler, not the per-step scheduler.
    monitor.on_train_epoch_start(trainer, MODULE)
    assert set(logger.calls[-1][0]) == {"lr-SGD-pg1", "lr-SGD-pg1-momentum", "lr-SGD-pg2",
                                        "lr-SGD-pg2-momentum"}


def test_lr_monitor_needs_a_logger_and_logs_on_rank_zero_only(tmp_path):
    with pytest.raises(ConfigError, match="logger"):
        make(tmp_path, LearningRateMonitor())
    logger = RecordingLogger()
    optimizer = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.3)
    monitor = LearningRateMonitor(logging_interval="epoch")
    trainer = make(tmp_path, monitor, loggers=[logger], optimizers=[optimizer],
                   is_global_zero=False, global_rank=1)
    monitor.on_train_epoch_start(trainer, MODULE)
    assert logger.calls == [] and monitor.lrs == {"lr-SGD": [0.3]}
