"""What the shipped callbacks share: option checks and questions about the trainer's loop."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from datapipe.errors import ConfigError

if TYPE_CHECKING:
    from datapipe.trainer.contract import TrainerView

MODES = ("min", "max")


def check_mode(owner: str, mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"{owner}(mode={mode!r}) is not a mode: use 'min' or 'max'")
    return mode


def fitting(trainer: TrainerView) -> bool:
    """True in a fit's real loops: not in sanity checking, fast_dev_run, validate, test or
    predict (Lightning's callbacks neither save nor stop there either)."""
    return trainer.stage == "fit" and not trainer.sanity_checking and not trainer.fast_dev_run


def bar_total(num_batches: Any) -> int | None:
    """A batch count as tqdm wants it: an int, or None when unknown or infinite."""
    if isinstance(num_batches, (list, tuple)):
        num_batches = sum(num_batches)
    if num_batches is None or (isinstance(num_batches, float) and not math.isfinite(num_batches)):
        return None
    return int(num_batches)


def has_validation(trainer: TrainerView) -> bool:
    num = trainer.num_val_batches
    if isinstance(num, (list, tuple)):
        num = sum(num)
    return bool(num)


def validation_scheduled(trainer: TrainerView) -> bool:
    """Whether the current epoch is one that ends with validation, when there is any."""
    every = trainer.check_val_every_n_epoch
    return not every or (trainer.current_epoch + 1) % every == 0


def available(metrics: Mapping[str, Any]) -> str:
    """The logged metrics' names, for an error that says which metric was not found."""
    return ", ".join(sorted(metrics)) if metrics else "none (nothing was logged)"


def to_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().reshape(()).item()) if value.numel() == 1 else math.nan
    return float(value)


def abspath(path: str | os.PathLike) -> str:
    return os.path.abspath(os.path.expanduser(os.fspath(path)))
