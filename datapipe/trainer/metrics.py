"""What ``Module.log`` records: step values and epoch means, reduced across ranks.

Values stay tensors on their device until something needs a number (a logger at
``log_every_n_steps``, the progress bar, a callback), so logging in every step
costs no device synchronization.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from datapipe.errors import ConfigError
from datapipe.trainer.distributed import DistEnv, reduce_mean

# Lightning's defaults: per step in training, per epoch everywhere else.
_STEP_BY_DEFAULT = {"train": True, "validate": False, "test": False, "predict": False}


@dataclass
class _Epoch:
    """A running weighted sum of one metric over the current epoch."""

    total: torch.Tensor
    weight: torch.Tensor
    prog_bar: bool
    logger: bool


class Metrics:
    """Collects logged values for the Trainer; one instance per Trainer."""

    def __init__(self) -> None:
        self.stage = "train"
        self.batch_size = 1  # of the batch in flight, the default weight of epoch means
        self.callback_metrics: dict[str, torch.Tensor] = {}
        self._prog_bar: set[str] = set()
        self._step: dict[str, torch.Tensor] = {}  # to send to loggers at the next log step
        self._epoch: dict[str, _Epoch] = {}

    def log(self, name: str, value: Any, *, prog_bar: bool, on_step: bool | None,
            on_epoch: bool | None, logger: bool, batch_size: int | None) -> None:
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ConfigError(f"self.log({name!r}) needs a scalar, got shape "
                                  f"{tuple(value.shape)}")
            value = value.detach()
            if value.dim():
                value = value.reshape(())
        elif isinstance(value, (int, float)):
            value = torch.tensor(float(value))
        else:
            raise ConfigError(f"self.log({name!r}) needs a number or scalar tensor, "
                              f"got {type(value).__name__}")
        step = _STEP_BY_DEFAULT[self.stage] if on_step is None else on_step
        epoch = (not step) if on_epoch is None else on_epoch
        step_name, epoch_name = (f"{name}_step", f"{name}_epoch") if step and epoch else (
            name, name)
        if step:
            if logger:
                self._step[step_name] = value
            self.callback_metrics[name] = value
            if prog_bar:
                self._prog_bar.add(name)
        if epoch:
            weight = float(batch_size if batch_size is not None else self.batch_size)
            value = value.to(torch.float32)
            acc = self._epoch.get(epoch_name)
            if acc is None:
                self._epoch[epoch_name] = _Epoch(value * weight, value.new_tensor(weight),
                                                 prog_bar, logger)
            else:
                acc.total = acc.total + value * weight
                acc.weight = acc.weight + weight

    def take_step_metrics(self) -> dict[str, float]:
        """The step values logged since the last call, as floats (one sync)."""
        taken = {k: float(v) for k, v in self._step.items()}
        self._step.clear()
        return taken

    def end_epoch(self, env: DistEnv) -> dict[str, float]:
        """Close the epoch: means reduced across ranks; returns those meant for loggers."""
        to_log: dict[str, float] = {}
        for name, acc in self._epoch.items():
            mean = reduce_mean(acc.total, acc.weight, env)
            key = name.removesuffix("_epoch")
            self.callback_metrics[key] = mean
            self.callback_metrics[name] = mean
            if acc.prog_bar:
                self._prog_bar.add(key)
            if acc.logger:
                to_log[name] = float(mean)
        self._epoch.clear()
        return to_log

    def progress_bar_metrics(self) -> dict[str, float]:
        return {k: float(self.callback_metrics[k]) for k in sorted(self._prog_bar)
                if k in self.callback_metrics}

    def reset(self, stage: str) -> None:
        """Start a new loop (train, validate, test, predict)."""
        self.stage = stage
        self._epoch.clear()
        self._step.clear()

    def state_dict(self) -> dict[str, Any]:
        """The running epoch sums, so a resumed epoch's means cover the whole epoch."""
        return {name: {"total": float(a.total), "weight": float(a.weight),
                       "prog_bar": a.prog_bar, "logger": a.logger}
                for name, a in self._epoch.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._epoch = {name: _Epoch(torch.tensor(s["total"]), torch.tensor(s["weight"]),
                                    s["prog_bar"], s["logger"]) for name, s in state.items()}
