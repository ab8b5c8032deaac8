"""LearningRateMonitor: log each optimizer's learning rate (and momentum) to the loggers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from datapipe.errors import ConfigError
from datapipe.trainer.callbacks.base import Callback
from datapipe.trainer.callbacks.common import to_float

if TYPE_CHECKING:
    from datapipe.trainer.contract import TrainerView
    from datapipe.trainer.module import Module


def _config_value(config: Any, name: str, default: Any) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


class LearningRateMonitor(Callback):
    """Log each optimizer's learning rate (and momentum) through the trainer's loggers.

    Names are ``lr-<OptimizerClass>`` (a scheduler config's ``name`` wins), ``-1``,
    ``-2``, ... for more optimizers of one class, and ``-pg1``, ``-pg2``, ... (or the
    param group's ``name``) when an optimizer has several param groups; momentum is
    ``<name>-momentum``. ``logging_interval=None`` logs each scheduler at its own
    interval ("step": before an optimizer step, when ``global_step`` is a multiple of
    ``log_every_n_steps``;
    "epoch": at each epoch start); "step" or "epoch" logs every scheduler then.
    Every value logged is appended to ``self.lrs[name]``.
    """

    def __init__(self, logging_interval: str | None = None, log_momentum: bool = False) -> None:
        if logging_interval not in (None, "step", "epoch"):
            raise ConfigError(
                f"LearningRateMonitor(logging_interval={logging_interval!r}) must be 'step', "
                "'epoch' or None")
        self.logging_interval = logging_interval
        self.log_momentum = log_momentum
        self.lrs: dict[str, list[float]] = {}
        self.last_momentum_values: dict[str, float] = {}
        self._last_step_logged: int | None = None

    def on_train_start(self, trainer: TrainerView, module: Module) -> None:
        if not trainer.loggers:
            raise ConfigError(
                "LearningRateMonitor needs a logger: pass logger='csv' (or another) to the "
                "Trainer, or remove the callback")
        self.lrs = {name: [] for name, *_ in self._entries(trainer)}
        self._last_step_logged = None

    def on_train_batch_start(
        self, trainer: TrainerView, module: Module, batch: Any, batch_idx: int
    ) -> None:
        if self.logging_interval == "epoch":
            return
        step = trainer.global_step
        every = trainer.log_every_n_steps
        # Once per optimizer step (accumulated batches share one), on the steps where the
        # trainer logs its own metrics.
        if step == self._last_step_logged or step % every:
            return
        self._last_step_logged = step
        self._log(trainer, self._extract(trainer, "step" if self.logging_interval is None
                                         else "any"))

    def on_train_epoch_start(self, trainer: TrainerView, module: Module) -> None:
        if self.logging_interval == "step":
            return
        self._log(trainer, self._extract(trainer, "epoch" if self.logging_interval is None
                                         else "any"))

    def _log(self, trainer: TrainerView, stats: dict[str, float]) -> None:
        if stats and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(stats, step=trainer.global_step)

    def _entries(self, trainer: TrainerView) -> list[tuple[str, Any, int, str | None]]:
        """(name, optimizer, param group index, scheduler interval or None) per param group."""
        found: list[tuple[str, Any, str | None]] = []
        seen: set[int] = set()
        for config in trainer.lr_scheduler_configs:
            scheduler = _config_value(config, "scheduler", None)
            if scheduler is None:  # a bare scheduler rather than a config
                scheduler = config
            optimizer = scheduler.optimizer
            name = _config_value(config, "name", None) or f"lr-{type(optimizer).__name__}"
            found.append((name, optimizer, _config_value(config, "interval", "epoch")))
            seen.add(id(optimizer))
        for optimizer in trainer.optimizers:
            if id(optimizer) not in seen:
                found.append((f"lr-{type(optimizer).__name__}", optimizer, None))
                seen.add(id(optimizer))
        entries = []
        uses: dict[str, int] = {}
        for name, optimizer, interval in found:
            count = uses.get(name, 0)
            uses[name] = count + 1
            base = f"{name}-{count}" if count else name
            groups = optimizer.param_groups
            for i, group in enumerate(groups):
                label = group.get("name")
                if label is None and len(groups) > 1:
                    label = f"pg{i + 1}"
                entries.append((f"{base}-{label}" if label else base, optimizer, i, interval))
        return entries

    def _extract(self, trainer: TrainerView, interval: str) -> dict[str, float]:
        stats: dict[str, float] = {}
        for name, optimizer, index, scheduler_interval in self._entries(trainer):
            if scheduler_interval is not None and interval not in ("any", scheduler_interval):
                continue
            group = optimizer.param_groups[index]
            lr = to_float(group["lr"])
            stats[name] = lr
            self.lrs.setdefault(name, []).append(lr)
            if self.log_momentum:
                if "momentum" in group:
                    momentum = to_float(group["momentum"])
                elif "betas" in group:
                    momentum = to_float(group["betas"][0])
                else:
                    momentum = 0.0
                stats[f"{name}-momentum"] = momentum
                self.last_momentum_values[f"{name}-momentum"] = momentum
        return stats
