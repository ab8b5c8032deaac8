"""CSV and TensorBoard loggers: run folders, metrics files, hyperparameters."""

from __future__ import annotations

import csv
import importlib.util
from argparse import Namespace

import pytest
import torch

from datapipe.errors import ConfigError
from datapipe.trainer import loggers
from datapipe.trainer.loggers import CSVLogger, Logger, TensorBoardLogger, create_logger


def read_csv(path):
    with open(path, newline="") as file:
        rows = list(csv.reader(file))
    return rows[0], rows[1:]


def test_csv_logger_writes_rows_and_widens_the_header(tmp_path):
    logger = CSVLogger(tmp_path)
    logger.log_metrics({"train_loss": torch.tensor(0.5)}, step=0)
    logger.log_metrics({"train_loss": 0.25}, step=1)
    logger.save()
    path = tmp_path / "logs" / "version_0" / "metrics.csv"
    assert read_csv(path) == (["step", "train_loss"], [["0", "0.5"], ["1", "0.25"]])

    logger.log_metrics({"val_loss": 0.75, "epoch": 0}, step=1)
    logger.finalize("success")
    header, rows = read_csv(path)
    assert header == ["epoch", "step", "train_loss", "val_loss"]
    assert rows == [["", "0", "0.5", ""], ["", "1", "0.25", ""], ["0", "1", "", "0.75"]]


def test_csv_logger_buffers_then_flushes_every_n_rows(tmp_path):
    logger = CSVLogger(tmp_path, flush_logs_every_n_steps=3)
    for step in range(2):
        logger.log_metrics({"loss": 1.0}, step)
    assert not logger.metrics_file.exists()
    logger.log_metrics({"loss": 1.0}, 2)
    assert len(read_csv(logger.metrics_file)[1]) == 3


def test_unused_logger_creates_nothing_and_its_folder_is_stable(tmp_path):
    logger = CSVLogger(tmp_path / "runs")
    assert logger.log_dir == tmp_path / "runs" / "logs" / "version_0"
    logger.save()
    logger.finalize("success")
    assert not (tmp_path / "runs").exists()
    (tmp_path / "runs" / "logs" / "version_0").mkdir(parents=True)  # another run takes 0
    assert logger.log_dir == tmp_path / "runs" / "logs" / "version_0"


def test_version_folders_increment(tmp_path):
    first = CSVLogger(tmp_path, name="exp")
    first.log_metrics({"a": 1}, 0)
    first.save()
    (tmp_path / "exp" / "version_7").mkdir()
    (tmp_path / "exp" / "version_x").mkdir()
    assert CSVLogger(tmp_path, name="exp").version == 8
    assert CSVLogger(tmp_path, name="exp", version=3).log_dir == tmp_path / "exp" / "version_3"
    assert CSVLogger(tmp_path, name="exp", version="run-a").log_dir == tmp_path / "exp" / "run-a"
    assert CSVLogger(tmp_path, name="").log_dir == tmp_path / "version_0"


def test_csv_logger_appends_to_the_metrics_of_a_resumed_version(tmp_path):
    first = CSVLogger(tmp_path, version=0)
    first.log_metrics({"loss": 1.0}, 0)
    first.finalize("success")
    again = CSVLogger(tmp_path, version=0)
    again.log_metrics({"loss": 0.5}, 1)
    again.finalize("success")
    assert read_csv(again.metrics_file) == (["loss", "step"], [["1.0", "0"], ["0.5", "1"]])


def test_hparams_file_is_yaml(tmp_path):
    params = {"lr": 1e-05, "batch_size": 64, "name": "mlp: v2", "layers": [128, 64],
              "dropout": None, "amp": True, "nested": {"a": 1.5}, "yes": "no",
              "path": tmp_path}
    logger = CSVLogger(tmp_path)
    logger.log_hyperparams(Namespace(**params))
    logger.log_hyperparams({"seed": 1})
    text = (logger.log_dir / "hparams.yaml").read_text()
    assert "lr: 1.0e-05\n" in text and "batch_size: 64\n" in text
    yaml = pytest.importorskip("yaml")
    assert yaml.safe_load(text) == {**params, "path": str(tmp_path), "seed": 1}


def test_tensorboard_logger_writes_an_events_file(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    logger.log_hyperparams({"lr": 0.1, "model": "mlp"})
    logger.log_metrics({"train_loss": torch.tensor(0.5)}, step=3)
    logger.log_metrics({"train_loss": 0.25}, step=4)
    logger.finalize("success")
    folder = tmp_path / "tb" / "version_0"
    assert list(folder.glob("events.out.tfevents.*")) and (folder / "hparams.yaml").is_file()
    events = EventAccumulator(str(folder))
    events.Reload()
    scalars = [(e.step, e.value) for e in events.Scalars("train_loss")]
    assert scalars == [(3, 0.5), (4, 0.25)]


def test_tensorboard_missing_is_a_config_error(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        TensorBoardLogger(tmp_path)
    assert not any(tmp_path.iterdir())


def test_create_logger(tmp_path):
    assert isinstance(create_logger("csv", tmp_path), CSVLogger)
    assert isinstance(create_logger(True, tmp_path), CSVLogger)
    assert isinstance(create_logger("tensorboard", tmp_path), TensorBoardLogger)
    assert create_logger(False, tmp_path) is None and create_logger(None, tmp_path) is None
    mine = CSVLogger(tmp_path)
    assert create_logger(mine, tmp_path) is mine
    with pytest.raises(ConfigError, match="unknown logger 'wandb'"):
        create_logger("wandb", tmp_path)


def test_logger_base_has_the_folder_scheme(tmp_path):
    logger = Logger(tmp_path, name="base")
    assert logger.name == "base" and logger.log_dir == tmp_path / "base" / "version_0"
    with pytest.raises(NotImplementedError):
        logger.log_metrics({"a": 1.0}, 0)
    assert loggers.to_yaml({}) == "{}\n"
