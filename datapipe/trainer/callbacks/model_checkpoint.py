"""ModelCheckpoint: save the latest, the best ``save_top_k`` by a metric, and ``last``.

Its arguments and behaviour are Lightning's, so ``ModelCheckpoint(monitor="val_loss",
save_top_k=3)`` ports unchanged. Hook order it relies on (Lightning 2's): the validation
that closes an epoch runs before ``on_train_epoch_end``, and callback metrics hold the
epoch's validation values at ``on_validation_end``. Every rank runs it; ``broadcast``
makes them agree on paths, and only global rank 0 deletes.
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from datapipe.errors import ConfigError
from datapipe.trainer.callbacks.base import Callback
from datapipe.trainer.callbacks.common import (
    abspath,
    available,
    bar_total,
    check_mode,
    fitting,
    has_validation,
    validation_scheduled,
)

if TYPE_CHECKING:
    from datapipe.trainer.contract import TrainerView
    from datapipe.trainer.module import Module

log = logging.getLogger(__name__)  # verbose=True reports here, at INFO


class ModelCheckpoint(Callback):
    """Save checkpoints while fitting: the latest, the best ``save_top_k`` by ``monitor``, ``last``.

    Files are named from ``filename`` (default ``"{epoch}-{step}"``), each placeholder
    becoming ``name=value``: ``"{epoch}-{step}-{val_loss}"`` gives
    ``epoch=3-step=120-val_loss=0.1234.ckpt``. A placeholder may carry a format spec
    (``{val_loss:.2f}``); a float without one is written with 4 decimals. A name that
    is already taken gets ``-v1``, ``-v2``, ... appended.

    When: with ``every_n_train_steps=N``, whenever ``global_step`` is a multiple of N
    (and then not at epoch ends unless ``every_n_epochs`` is given); otherwise every
    ``every_n_epochs`` epochs, at the end of validation if that is where the monitored
    metric comes from, else at the end of the training epoch. Never twice for one
    ``global_step``. A save whose monitored metric is not logged yet waits for the
    validation that will log it; once that validation (or a training epoch without
    any) is over and the metric is still missing, it is a ``ConfigError``.

    Which files: ``monitor=None`` keeps the latest (``save_top_k=1``) or all (-1);
    with a monitor, the ``save_top_k`` best by ``mode``. ``save_last=True`` rewrites
    ``last.ckpt`` at every save point, whether or not that point made the top k.
    Files are written by ``trainer.save_checkpoint`` and deleted only on global rank 0,
    and only inside ``dirpath``.
    """

    CHECKPOINT_JOIN_CHAR = "-"
    CHECKPOINT_EQUALS_CHAR = "="
    CHECKPOINT_NAME_LAST = "last"
    FILE_EXTENSION = ".ckpt"
    STARTING_VERSION = 1

    def __init__(
        self,
        dirpath: str | os.PathLike | None = None,
        filename: str | None = None,
        monitor: str | None = None,
        mode: str = "min",
        save_top_k: int = 1,
        save_last: bool | None = None,
        every_n_epochs: int | None = None,
        every_n_train_steps: int | None = None,
        save_on_train_epoch_end: bool | None = None,
        auto_insert_metric_name: bool = True,
        enable_version_counter: bool = True,
        verbose: bool = False,
    ) -> None:
        self.mode = check_mode("ModelCheckpoint", mode)
        if not isinstance(save_top_k, int) or save_top_k < -1:
            raise ConfigError(
                f"ModelCheckpoint(save_top_k={save_top_k!r}) must be -1 (all), 0 (none) or a "
                "positive number")
        if monitor is None and save_top_k not in (-1, 0, 1):
            raise ConfigError(
                f"ModelCheckpoint(save_top_k={save_top_k}) needs monitor= to rank checkpoints: "
                "pass monitor='val_loss' (say), or save_top_k=-1 to keep every checkpoint")
        if save_last not in (None, True, False):
            raise ConfigError(f"ModelCheckpoint(save_last={save_last!r}) must be True or False")
        for label, value in (("every_n_epochs", every_n_epochs),
                             ("every_n_train_steps", every_n_train_steps)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ConfigError(f"ModelCheckpoint({label}={value!r}) must be a whole number >= 0")

        self.dirpath: str | None = abspath(dirpath) if dirpath is not None else None
        self.filename = filename
        self.monitor = monitor
        self.save_top_k = save_top_k
        self.save_last = save_last
        self.auto_insert_metric_name = auto_insert_metric_name
        self.enable_version_counter = enable_version_counter
        self.verbose = verbose
        self.every_n_train_steps = every_n_train_steps or 0
        # As in Lightning: asking for step checkpoints turns epoch checkpoints off unless
        # every_n_epochs is given too.
        self.every_n_epochs = (every_n_epochs if every_n_epochs is not None
                               else 0 if self.every_n_train_steps else 1)
        self._save_on_train_epoch_end = save_on_train_epoch_end

        self.best_model_path = ""
        self.best_model_score: torch.Tensor | None = None
        self.best_k_models: dict[str, torch.Tensor] = {}
        self.kth_best_model_path = ""
        self.kth_value = torch.tensor(math.inf if mode == "min" else -math.inf)
        self.last_model_path = ""
        self.current_score: torch.Tensor | None = None

        self._last_global_step_saved = 0  # nothing to save before the first step
        self._validation_ran = False      # in this fit: from then on, validation saves
        self._validated_epoch: int | None = None
        self._deferred = False            # a due save waits for the monitored metric
        self._fallback_epoch: int | None = None  # the monitor was not in validation's metrics
        self._pending_state: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        key = {"monitor": self.monitor, "mode": self.mode,
               "every_n_train_steps": self.every_n_train_steps,
               "every_n_epochs": self.every_n_epochs}
        return f"{type(self).__qualname__}{key!r}"

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: TrainerView, module: Module, stage: str) -> None:
        if self.dirpath is None:
            # Rank 0's folder: every rank must name the same files (a logger's version
            # number, found by listing the disk, could differ between ranks).
            self.dirpath = trainer.broadcast(abspath(Path(trainer.log_dir) / "checkpoints"))
        if stage == "fit":
            self._validation_ran = False
            self._validated_epoch = None
            self._deferred = False
            self._fallback_epoch = None
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._apply_state(state)

    def on_train_batch_end(
        self, trainer: TrainerView, module: Module, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        n = self.every_n_train_steps
        step = trainer.global_step
        if n < 1 or step % n or step == self._last_global_step_saved or not fitting(trainer):
            return
        if self.monitor is not None and self._validation_follows(trainer, batch_idx):
            self._deferred = True  # this epoch's validation is about to refresh the monitor
            return
        self._save_due(trainer, conclusive=False)

    def on_validation_end(self, trainer: TrainerView, module: Module) -> None:
        if not fitting(trainer):
            return
        self._validation_ran = True
        self._validated_epoch = trainer.current_epoch
        if self._save_on_train_epoch_end is True:
            return
        auto = self._save_on_train_epoch_end is None
        if auto and self.monitor is not None and self.monitor not in trainer.callback_metrics:
            # Not a validation metric: the end of the training epoch saves instead.
            self._fallback_epoch = trainer.current_epoch
            return
        if self._deferred or self._epoch_due(trainer):
            self._deferred = False
            self._save_due(trainer, conclusive=True)

    def on_train_epoch_end(self, trainer: TrainerView, module: Module) -> None:
        if not fitting(trainer) or self._save_on_train_epoch_end is False:
            return
        epoch = trainer.current_epoch
        if self._save_on_train_epoch_end is True:
            due = self._deferred or self._epoch_due(trainer)
        else:
            # Once validation is known to run, it saves; unless the monitor is not its metric.
            here = self._fallback_epoch == epoch or not self._validation_ran
            due = self._deferred or (here and self._epoch_due(trainer))
        if due:
            self._deferred = False
            # Without validation this epoch, a missing metric is final only if none was due.
            conclusive = self._validated_epoch == epoch or validation_scheduled(trainer)
            self._save_due(trainer, conclusive)

    # ------------------------------------------------------------------ saving

    def _epoch_due(self, trainer: TrainerView) -> bool:
        n = self.every_n_epochs
        return n >= 1 and (trainer.current_epoch + 1) % n == 0

    def _validation_follows(self, trainer: TrainerView, batch_idx: int) -> bool:
        """Whether this is an epoch's last batch and that epoch's validation comes next."""
        if self._save_on_train_epoch_end is True or not validation_scheduled(trainer):
            return False
        if not (has_validation(trainer) or self._validation_ran):
            return False
        total = bar_total(trainer.num_training_batches)
        return total is not None and batch_idx + 1 >= total

    def _monitor_candidates(self, trainer: TrainerView) -> dict[str, Any]:
        candidates = dict(trainer.callback_metrics)
        candidates.setdefault("epoch", torch.tensor(trainer.current_epoch))
        candidates.setdefault("step", torch.tensor(trainer.global_step))
        return candidates

    def _save_due(self, trainer: TrainerView, conclusive: bool) -> None:
        """A save is due now: the top-k (or latest) checkpoint, then ``last``.

        A missing monitored metric defers the save, or is an error when ``conclusive``:
        when the validation or the epoch end that should have logged it is over.
        """
        if trainer.global_step == self._last_global_step_saved:
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is not None and self.monitor not in candidates:
            if not conclusive:
                self._deferred = True
                return
            raise ConfigError(
                f"ModelCheckpoint(monitor={self.monitor!r}) found no metric {self.monitor!r} "
                f"to rank checkpoints by; logged metrics: {available(trainer.callback_metrics)}. "
                f"Log it with self.log({self.monitor!r}, ...) or change monitor=")
        if self.save_top_k != 0:
            if self.monitor is None:
                self._save_latest(trainer, candidates)
            else:
                self._save_if_top_k(trainer, candidates)
        self._save_last(trainer, candidates)

    def _save_latest(self, trainer: TrainerView, candidates: dict[str, Any]) -> None:
        keep = self.best_model_path if self.save_top_k == 1 else None
        path = self._free_path(trainer, candidates, reusable=keep)
        previous, self.best_model_path = self.best_model_path, path
        self._save_checkpoint(trainer, path)
        if self.save_top_k == 1 and previous and previous != path:
            self._remove(trainer, previous)

    def _save_if_top_k(self, trainer: TrainerView, candidates: dict[str, Any]) -> None:
        current = self._score(candidates[self.monitor])
        self.current_score = current
        value = float(current)
        if not (self.save_top_k == -1 or len(self.best_k_models) < self.save_top_k
                or self._better(value, float(self.kth_value))):
            if self.verbose and trainer.is_global_zero:
                log.info("Epoch %d, global step %d: %r was not in top %d", trainer.current_epoch,
                         trainer.global_step, self.monitor, self.save_top_k)
            return
        k = len(self.best_k_models) + 1 if self.save_top_k == -1 else self.save_top_k
        dropped = None
        if len(self.best_k_models) == k:
            dropped = self.kth_best_model_path
            self.best_k_models.pop(dropped, None)
        path = self._free_path(trainer, candidates, reusable=dropped)
        self.best_k_models[path] = current
        if len(self.best_k_models) == k:
            worst = max if self.mode == "min" else min
            self.kth_best_model_path = worst(self.best_k_models,
                                             key=lambda p: float(self.best_k_models[p]))
            self.kth_value = self.best_k_models[self.kth_best_model_path]
        best = min if self.mode == "min" else max
        self.best_model_path = best(self.best_k_models, key=lambda p: float(self.best_k_models[p]))
        self.best_model_score = self.best_k_models[self.best_model_path]
        if self.verbose and trainer.is_global_zero:
            log.info("Epoch %d, global step %d: %r reached %.5f, saving %r as top %d",
                     trainer.current_epoch, trainer.global_step, self.monitor, value, path, k)
        self._save_checkpoint(trainer, path)
        if dropped and dropped != path:
            self._remove(trainer, dropped)

    def _save_last(self, trainer: TrainerView, candidates: dict[str, Any]) -> None:
        if not self.save_last:
            return
        path = self._free_path(trainer, candidates, reusable=self.last_model_path,
                               template=self.CHECKPOINT_NAME_LAST)
        previous, self.last_model_path = self.last_model_path, path
        self._save_checkpoint(trainer, path)
        if previous and previous != path:
            self._remove(trainer, previous)

    def _save_checkpoint(self, trainer: TrainerView, path: str) -> None:
        # Set first: the checkpoint being written holds this callback's state.
        self._last_global_step_saved = trainer.global_step
        trainer.save_checkpoint(path)

    def _remove(self, trainer: TrainerView, path: str) -> None:
        """Delete a checkpoint this callback no longer keeps (rank 0, inside dirpath only)."""
        if not trainer.is_global_zero:
            return
        if path in (self.best_model_path, self.last_model_path) or path in self.best_k_models:
            return
        # Paths may come from a checkpoint's saved state: only a .ckpt file that lies in
        # dirpath once links and '..' are resolved is ever deleted.
        if self.dirpath is None or not str(path).endswith(self.FILE_EXTENSION):
            return
        target = Path(path)
        if target.is_symlink() or Path(self.dirpath).resolve() not in target.resolve().parents:
            return  # e.g. a path restored from a run that saved elsewhere
        if trainer.ckpt_path and abspath(trainer.ckpt_path) == path:  # what this run resumed
            return
        Path(path).unlink(missing_ok=True)

    def _score(self, value: Any) -> torch.Tensor:
        score = (value.detach() if isinstance(value, torch.Tensor)
                 else torch.tensor(value, dtype=torch.float64))
        if score.numel() != 1:
            raise ConfigError(
                f"ModelCheckpoint(monitor={self.monitor!r}) needs a scalar metric, got shape "
                f"{tuple(score.shape)}")
        score = score.reshape(()).cpu()
        if not score.is_floating_point():
            score = score.float()
        if torch.isnan(score):  # a NaN ranks last
            score = torch.tensor(math.inf if self.mode == "min" else -math.inf, dtype=score.dtype)
        return score

    def _better(self, value: float, than: float) -> bool:
        return value < than if self.mode == "min" else value > than

    def _free_path(
        self, trainer: TrainerView, candidates: dict[str, Any], reusable: str | None,
        template: str | None = None,
    ) -> str:
        """The formatted path, versioned with ``-vN`` while taken by a file we don't replace."""
        path = self.format_checkpoint_name(candidates, filename=template)
        version = self.STARTING_VERSION
        while (self.enable_version_counter and path != reusable
               and trainer.broadcast(os.path.exists(path))):
            path = self.format_checkpoint_name(candidates, filename=template, ver=version)
            version += 1
        return path

    def format_checkpoint_name(
        self, metrics: Mapping[str, Any], filename: str | None = None, ver: int | None = None,
    ) -> str:
        """The checkpoint path for these metrics, e.g. ``<dirpath>/epoch=3-step=120.ckpt``.

        A placeholder whose metric is missing is filled with 0, as Lightning does.
        """
        template = filename if filename is not None else (self.filename or "{epoch}-{step}")
        if template.endswith(self.FILE_EXTENSION):
            template = template[: -len(self.FILE_EXTENSION)]
        name = _format_template(template, metrics, self.auto_insert_metric_name,
                                self.CHECKPOINT_EQUALS_CHAR)
        if ver is not None:
            name = f"{name}{self.CHECKPOINT_JOIN_CHAR}v{ver}"
        return os.path.join(self.dirpath or "", name + self.FILE_EXTENSION)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor,
            "best_model_score": self.best_model_score,
            "best_model_path": self.best_model_path,
            "current_score": self.current_score,
            "dirpath": self.dirpath,
            "best_k_models": dict(self.best_k_models),
            "kth_best_model_path": self.kth_best_model_path,
            "kth_value": self.kth_value,
            "last_model_path": self.last_model_path,
            "last_global_step_saved": self._last_global_step_saved,
            "validation_ran": self._validation_ran,
            "deferred": self._deferred,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_saved_state(state)
        if self.dirpath is None:  # not set up yet: the default dirpath comes in setup
            self._pending_state = dict(state)
            return
        self._apply_state(state)

    def _apply_state(self, state: dict[str, Any]) -> None:
        saved_dir = state.get("dirpath")
        if saved_dir is None or abspath(saved_dir) == self.dirpath:
            self.best_model_score = state.get("best_model_score")
            self.best_k_models = dict(state.get("best_k_models", {}))
            self.kth_best_model_path = state.get("kth_best_model_path", "")
            self.kth_value = state.get("kth_value", self.kth_value)
            self.last_model_path = state.get("last_model_path", "")
            self.current_score = state.get("current_score")
        else:
            warnings.warn(
                f"ModelCheckpoint's dirpath changed from {saved_dir} to {self.dirpath}: only "
                "best_model_path is restored; top-k tracking starts again", stacklevel=2)
        self.best_model_path = state.get("best_model_path", "")
        self._last_global_step_saved = state.get(
            "last_global_step_saved", self._last_global_step_saved)
        self._validation_ran = state.get("validation_ran", self._validation_ran)
        self._deferred = state.get("deferred", self._deferred)


def _check_saved_state(state: Any) -> None:
    """ModelCheckpoint's state as read from a checkpoint: paths are str, scores numbers.

    Checked when it is loaded, so a crafted or damaged file ends the resume in one line
    instead of a traceback at the first save, epochs later.
    """
    def score(v: Any) -> bool:
        return v is None or (isinstance(v, torch.Tensor) and v.numel() == 1) or (
            isinstance(v, (int, float)) and not isinstance(v, bool))

    paths = ("best_model_path", "kth_best_model_path", "last_model_path")
    scores = ("best_model_score", "kth_value", "current_score")
    best_k = state.get("best_k_models", {}) if isinstance(state, dict) else None
    if not (isinstance(state, dict)
            and all(isinstance(state.get(k, ""), str) for k in paths)
            and isinstance(state.get("monitor"), (str, type(None)))
            and isinstance(state.get("dirpath"), (str, type(None)))
            and all(score(state.get(k)) for k in scores)
            and isinstance(best_k, dict)
            and all(isinstance(p, str) and v is not None and score(v)
                    for p, v in best_k.items())):
        raise ConfigError("the checkpoint's ModelCheckpoint state is malformed (paths must be "
                          "str, scores numbers); it was damaged or not written by datapipe")


_PLACEHOLDER = re.compile(r"\{([^{}:]+)(?::([^{}]*))?\}")


def _format_template(
    template: str, metrics: Mapping[str, Any], insert_names: bool, equals: str = "=",
) -> str:
    def replace(match: re.Match) -> str:
        name, spec = match.group(1), match.group(2)
        text = _format_metric(metrics.get(name, 0), spec, name)
        # A "/" in a metric's name would make a folder: the label uses "_" instead.
        return f"{name.replace('/', '_')}{equals}{text}" if insert_names else text

    return _PLACEHOLDER.sub(replace, template)


def _format_metric(value: Any, spec: str | None, name: str) -> str:
    if isinstance(value, torch.Tensor):
        value = value.detach().reshape(()).item() if value.numel() == 1 else math.nan
    elif hasattr(value, "item"):
        value = value.item()
    if spec:
        try:
            return format(value, spec)
        except (TypeError, ValueError):
            raise ConfigError(
                f"ModelCheckpoint filename placeholder {{{name}:{spec}}} cannot format "
                f"{value!r}") from None
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)

