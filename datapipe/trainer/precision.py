"""Precision: autocast, and the GradScaler that ``16-mixed`` needs around backward and step.

As Lightning's precision plugin does, the model's own ``optimizer_step`` is always
called; under ``16-mixed`` it receives the optimizer wrapped so that its ``step()``
goes through the scaler (unscaling the gradients, skipping a step whose gradients
overflowed, then updating the scale). A model that overrides ``optimizer_step`` (a
warm-up, a step taken only some of the time) keeps that behaviour in every precision.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch

from datapipe.errors import ConfigError

if TYPE_CHECKING:
    from datapipe.trainer.module import Module

PRECISIONS: dict[str, torch.dtype | None] = {
    "32": None, "32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16,
}
_ALIASES: dict[Any, str] = {32: "32", 16: "16-mixed", "16": "16-mixed", "bf16": "bf16-mixed"}


def precision_name(precision: str | int) -> str:
    """The canonical name of a ``precision=`` option (Lightning's aliases accepted)."""
    name = _ALIASES.get(precision, precision)
    if name not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    return name


class ScaledOptimizer:
    """An optimizer whose ``step()`` goes through a GradScaler; everything else is the
    optimizer's own (``param_groups``, ``state``, ...). ``.optimizer`` is the one wrapped."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        self.optimizer = optimizer
        self.stepped = False
        self._scaler = scaler

    def step(self, *args: Any, **kwargs: Any) -> Any:
        self.stepped = True
        return self._scaler.step(self.optimizer, *args, **kwargs)  # skipped on overflow

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)


class Precision:
    """What a ``precision=`` option does to the forward, the backward and the step."""

    def __init__(self, precision: str | int, device: torch.device) -> None:
        self.name = precision_name(precision)
        self.dtype = PRECISIONS[self.name]
        self.device = device
        if self.dtype is torch.bfloat16 and device.type == "cuda" \
                and not torch.cuda.is_bf16_supported():
            raise ConfigError("precision='bf16-mixed' but this GPU has no bfloat16 support")
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype is torch.float16)
        self._unscaled = False

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradients in their true size (before clipping them)."""
        self.scaler.unscale_(optimizer)
        self._unscaled = self.scaler.is_enabled()

    def optimizer_step(self, module: Module, optimizer: torch.optim.Optimizer) -> None:
        """The model's ``optimizer_step``; under 16-mixed, with the scaled optimizer."""
        if not self.scaler.is_enabled():
            module.optimizer_step(optimizer)
            return
        scaled = ScaledOptimizer(optimizer, self.scaler)
        module.optimizer_step(scaled)
        # The scale follows the gradients it saw: after a step, or after an unscale the
        # model then chose not to step on (the scaler needs an update before the next).
        if scaled.stepped or self._unscaled:
            self.scaler.update()
        self._unscaled = False
