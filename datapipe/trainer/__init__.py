"""The compact trainer: Module, Trainer, callbacks and loggers (imports torch)."""

from datapipe.trainer.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
)
from datapipe.trainer.loggers import CSVLogger, Logger, TensorBoardLogger
from datapipe.trainer.module import Module, list_modules, load_module, register_module
from datapipe.trainer.trainer import Trainer

__all__ = [
    "CSVLogger", "Callback", "EarlyStopping", "LearningRateMonitor", "Logger", "ModelCheckpoint",
    "Module", "ProgressBar", "TensorBoardLogger", "Trainer", "list_modules", "load_module",
    "register_module",
]
