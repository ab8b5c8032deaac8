"""The callbacks the Trainer ships with: checkpoints, early stopping, progress bar, LR monitor.

One module each, on the base in ``base.py``. Their arguments and behaviour are
Lightning's; they read only what ``datapipe.trainer.contract.TrainerView`` lists.
"""

from datapipe.trainer.callbacks.base import Callback
from datapipe.trainer.callbacks.early_stopping import EarlyStopping
from datapipe.trainer.callbacks.lr_monitor import LearningRateMonitor
from datapipe.trainer.callbacks.model_checkpoint import ModelCheckpoint
from datapipe.trainer.callbacks.progress_bar import ProgressBar, TQDMProgressBar

__all__ = [
    "Callback", "ModelCheckpoint", "EarlyStopping", "ProgressBar", "TQDMProgressBar",
    "LearningRateMonitor",
]
