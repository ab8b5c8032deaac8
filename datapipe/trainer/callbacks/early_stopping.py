"""EarlyStopping: end the fit when a logged metric stops improving (Lightning's arguments)."""

from __future__ import annotations

import logging
import math
import warnings
from typing import TYPE_CHECKING, Any

import torch

from datapipe.errors import ConfigError
from datapipe.trainer.callbacks.base import Callback
from datapipe.trainer.callbacks.common import (
    available,
    check_mode,
    fitting,
    to_float,
    validation_scheduled,
)

if TYPE_CHECKING:
    from datapipe.trainer.contract import TrainerView
    from datapipe.trainer.module import Module

log = logging.getLogger(__name__)  # verbose=True reports here, at INFO


class EarlyStopping(Callback):
    """Stop fitting when ``monitor`` has not improved for ``patience`` checks.

    Improvement means better than the best so far by more than ``min_delta``. A check
    happens at the end of validation, or at the end of the training epoch when there
    is no validation, when the metric is not a validation one, or when
    ``check_on_train_epoch_end=True``. It also stops at once on a non-finite value
    (``check_finite``), on reaching ``stopping_threshold``, or on passing
    ``divergence_threshold``. ``stop_reason`` says why it stopped.
    """

    def __init__(
        self,
        monitor: str,
        min_delta: float = 0.0,
        patience: int = 3,
        verbose: bool = False,
        mode: str = "min",
        strict: bool = True,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_on_train_epoch_end: bool | None = None,
    ) -> None:
        if not monitor:
            raise ConfigError("EarlyStopping needs monitor=, the name of a logged metric")
        self.mode = check_mode("EarlyStopping", mode)
        if patience < 0:
            raise ConfigError(f"EarlyStopping(patience={patience}) must be >= 0")
        self.monitor = monitor
        self.min_delta = abs(float(min_delta))
        self.patience = patience
        self.verbose = verbose
        self.strict = strict
        self.check_finite = check_finite
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold
        self._check_on_train_epoch_end = check_on_train_epoch_end

        self.wait_count = 0
        self.stopped_epoch = 0
        self.best_score = torch.tensor(math.inf if mode == "min" else -math.inf,
                                       dtype=torch.float64)
        self.stop_reason: str | None = None
        self._validation_ran = False  # in this fit: from then on, validation checks
        self._validated_epoch: int | None = None
        self._fallback_epoch: int | None = None
        self._warned_missing = False

    @property
    def state_key(self) -> str:
        return f"{type(self).__qualname__}{ {'monitor': self.monitor, 'mode': self.mode}!r}"

    def state_dict(self) -> dict[str, Any]:
        return {"wait_count": self.wait_count, "stopped_epoch": self.stopped_epoch,
                "best_score": self.best_score, "patience": self.patience,
                "stop_reason": self.stop_reason}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wait_count = state["wait_count"]
        self.stopped_epoch = state["stopped_epoch"]
        self.best_score = torch.as_tensor(state["best_score"], dtype=torch.float64)
        self.patience = state.get("patience", self.patience)
        self.stop_reason = state.get("stop_reason")

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: TrainerView, module: Module, stage: str) -> None:
        if stage == "fit":
            self._validation_ran = False
            self._validated_epoch = None
            self._fallback_epoch = None

    def on_validation_end(self, trainer: TrainerView, module: Module) -> None:
        if not fitting(trainer):
            return
        self._validation_ran = True
        self._validated_epoch = trainer.current_epoch
        if self._check_on_train_epoch_end is True:
            return
        if self._check_on_train_epoch_end is None and self.monitor not in trainer.callback_metrics:
            self._fallback_epoch = trainer.current_epoch  # a training metric: check at epoch end
            return
        self._run_check(trainer, conclusive=True)

    def on_train_epoch_end(self, trainer: TrainerView, module: Module) -> None:
        if not fitting(trainer) or self._check_on_train_epoch_end is False:
            return
        epoch = trainer.current_epoch
        if (self._check_on_train_epoch_end is None and self._validation_ran
                and self._fallback_epoch != epoch):
            return  # validation does the checking
        # Without validation this epoch, a missing metric is final only if none was due.
        self._run_check(trainer, self._validated_epoch == epoch or validation_scheduled(trainer))

    # ------------------------------------------------------------------ the check

    def _run_check(self, trainer: TrainerView, conclusive: bool) -> None:
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            if not conclusive:
                return  # validation, not due this epoch, will bring it
            message = (f"EarlyStopping(monitor={self.monitor!r}) found no metric "
                       f"{self.monitor!r}; logged metrics: {available(metrics)}. Log it with "
                       f"self.log({self.monitor!r}, ...), change monitor=, or pass strict=False")
            if self.strict:
                raise ConfigError(message)
            if not self._warned_missing and trainer.is_global_zero:
                warnings.warn(message, stacklevel=2)
                self._warned_missing = True
            return
        should_stop, reason = self._evaluate(to_float(metrics[self.monitor]))
        if reason and self.verbose and trainer.is_global_zero:
            log.info("%s", reason)
        if should_stop:
            trainer.should_stop = True
            self.stopped_epoch = trainer.current_epoch
            self.stop_reason = reason

    def _better(self, value: float, than: float) -> bool:
        return value < than if self.mode == "min" else value > than

    def _evaluate(self, current: float) -> tuple[bool, str | None]:
        best = float(self.best_score)
        sign = "<" if self.mode == "min" else ">"
        if self.check_finite and not math.isfinite(current):
            return True, (f"Monitored metric {self.monitor} = {current} is not finite. Previous "
                          f"best value was {best:.3f}. Signaling Trainer to stop.")
        if self.stopping_threshold is not None and self._better(current, self.stopping_threshold):
            return True, (f"Stopping threshold reached: {self.monitor} = {current} {sign} "
                          f"{self.stopping_threshold}. Signaling Trainer to stop.")
        if (self.divergence_threshold is not None
                and self._better(self.divergence_threshold, current)):
            other = ">" if self.mode == "min" else "<"
            return True, (f"Divergence threshold reached: {self.monitor} = {current} {other} "
                          f"{self.divergence_threshold}. Signaling Trainer to stop.")
        delta = -self.min_delta if self.mode == "min" else self.min_delta
        if self._better(current - delta, best):
            if math.isfinite(best):
                reason = (f"Metric {self.monitor} improved by {abs(best - current):.3f} >= "
                          f"min_delta = {self.min_delta}. New best score: {current:.3f}")
            else:
                reason = f"Metric {self.monitor} improved. New best score: {current:.3f}"
            self.best_score = torch.tensor(current, dtype=torch.float64)
            self.wait_count = 0
            return False, reason
        self.wait_count += 1
        if self.wait_count >= self.patience:
            return True, (f"Monitored metric {self.monitor} did not improve in the last "
                          f"{self.wait_count} records. Best score: {best:.3f}. "
                          "Signaling Trainer to stop.")
        return False, None

