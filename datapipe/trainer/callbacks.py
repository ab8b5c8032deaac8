"""The callbacks the Trainer ships with: checkpoints, early stopping, progress bar, LR monitor.

Their arguments and behaviour are Lightning's, so ``ModelCheckpoint(monitor="val_loss",
save_top_k=3)`` or ``EarlyStopping("val_loss", patience=5)`` port unchanged. They read
only the trainer attributes listed in ``datapipe.trainer.callback``; where the trainer
offers ``broadcast(obj)`` (rank 0's value to every rank), ModelCheckpoint uses it so
all ranks agree on paths.

Hook order they rely on (Lightning 2's): the validation that closes an epoch runs
before ``on_train_epoch_end``, and callback metrics hold the epoch's validation
values at ``on_validation_end``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from datapipe.errors import ConfigError
from datapipe.trainer.callback import Callback

if TYPE_CHECKING:
    from datapipe.trainer.module import Module
    from datapipe.trainer.trainer import Trainer

__all__ = [
    "Callback", "ModelCheckpoint", "EarlyStopping", "ProgressBar", "TQDMProgressBar",
    "LearningRateMonitor",
]

_MODES = ("min", "max")


# ---------------------------------------------------------------------- shared helpers


def _check_mode(owner: str, mode: str) -> str:
    if mode not in _MODES:
        raise ConfigError(f"{owner}(mode={mode!r}) is not a mode: use 'min' or 'max'")
    return mode


def _fitting(trainer: Any) -> bool:
    """True in a fit's real loops: not in sanity checking, validate, test or predict."""
    return (getattr(trainer, "stage", "fit") == "fit"
            and not getattr(trainer, "sanity_checking", False)
            and not getattr(trainer, "fast_dev_run", False))


def _total(num_batches: Any) -> int | None:
    """A batch count as tqdm wants it: an int, or None when unknown or infinite."""
    if isinstance(num_batches, (list, tuple)):
        num_batches = sum(num_batches)
    if num_batches is None or (isinstance(num_batches, float) and not math.isfinite(num_batches)):
        return None
    return int(num_batches)


def _has_validation(trainer: Any) -> bool:
    num = getattr(trainer, "num_val_batches", 0)
    if isinstance(num, (list, tuple)):
        num = sum(num)
    return bool(num)


def _validation_scheduled(trainer: Any) -> bool:
    """Whether the current epoch is one that ends with validation, when there is any."""
    every = getattr(trainer, "check_val_every_n_epoch", 1)
    return not every or (trainer.current_epoch + 1) % every == 0


def _broadcast(trainer: Any, obj: Any) -> Any:
    broadcast = getattr(trainer, "broadcast", None)
    return broadcast(obj) if callable(broadcast) else obj


def _available(metrics: Mapping[str, Any]) -> str:
    return ", ".join(sorted(metrics)) if metrics else "none (nothing was logged)"


def _to_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().reshape(()).item()) if value.numel() == 1 else math.nan
    return float(value)


def _abspath(path: str | os.PathLike) -> str:
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


# ---------------------------------------------------------------------- ModelCheckpoint


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
        self.mode = _check_mode("ModelCheckpoint", mode)
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

        self.dirpath: str | None = _abspath(dirpath) if dirpath is not None else None
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

    def setup(self, trainer: Trainer, module: Module, stage: str) -> None:
        if self.dirpath is None:
            base = getattr(trainer, "log_dir", None) or getattr(trainer, "default_root_dir", None)
            self.dirpath = _broadcast(trainer, _abspath(Path(base or ".") / "checkpoints"))
        if stage == "fit":
            self._validation_ran = False
            self._validated_epoch = None
            self._deferred = False
            self._fallback_epoch = None
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._apply_state(state)

    def on_train_batch_end(
        self, trainer: Trainer, module: Module, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        n = self.every_n_train_steps
        step = trainer.global_step
        if n < 1 or step % n or step == self._last_global_step_saved or not _fitting(trainer):
            return
        if self.monitor is not None and self._validation_follows(trainer, batch_idx):
            self._deferred = True  # this epoch's validation is about to refresh the monitor
            return
        self._save_due(trainer, conclusive=False)

    def on_validation_end(self, trainer: Trainer, module: Module) -> None:
        if not _fitting(trainer):
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

    def on_train_epoch_end(self, trainer: Trainer, module: Module) -> None:
        if not _fitting(trainer) or self._save_on_train_epoch_end is False:
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
            conclusive = self._validated_epoch == epoch or _validation_scheduled(trainer)
            self._save_due(trainer, conclusive)

    # ------------------------------------------------------------------ saving

    def _epoch_due(self, trainer: Any) -> bool:
        n = self.every_n_epochs
        return n >= 1 and (trainer.current_epoch + 1) % n == 0

    def _validation_follows(self, trainer: Any, batch_idx: int) -> bool:
        """Whether this is an epoch's last batch and that epoch's validation comes next."""
        if self._save_on_train_epoch_end is True or not _validation_scheduled(trainer):
            return False
        if not (_has_validation(trainer) or self._validation_ran):
            return False
        total = _total(trainer.num_training_batches)
        return total is not None and batch_idx + 1 >= total

    def _monitor_candidates(self, trainer: Any) -> dict[str, Any]:
        candidates = dict(trainer.callback_metrics)
        candidates.setdefault("epoch", torch.tensor(trainer.current_epoch))
        candidates.setdefault("step", torch.tensor(trainer.global_step))
        return candidates

    def _save_due(self, trainer: Any, conclusive: bool) -> None:
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
                f"to rank checkpoints by; logged metrics: {_available(trainer.callback_metrics)}. "
                f"Log it with self.log({self.monitor!r}, ...) or change monitor=")
        if self.save_top_k != 0:
            if self.monitor is None:
                self._save_latest(trainer, candidates)
            else:
                self._save_if_top_k(trainer, candidates)
        self._save_last(trainer, candidates)

    def _save_latest(self, trainer: Any, candidates: dict[str, Any]) -> None:
        keep = self.best_model_path if self.save_top_k == 1 else None
        path = self._free_path(trainer, candidates, reusable=keep)
        previous, self.best_model_path = self.best_model_path, path
        self._save_checkpoint(trainer, path)
        if self.save_top_k == 1 and previous and previous != path:
            self._remove(trainer, previous)

    def _save_if_top_k(self, trainer: Any, candidates: dict[str, Any]) -> None:
        current = self._score(candidates[self.monitor])
        self.current_score = current
        value = float(current)
        if not (self.save_top_k == -1 or len(self.best_k_models) < self.save_top_k
                or self._better(value, float(self.kth_value))):
            if self.verbose and trainer.is_global_zero:
                print(f"Epoch {trainer.current_epoch}, global step {trainer.global_step}: "
                      f"{self.monitor!r} was not in top {self.save_top_k}", file=sys.stderr)
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
            print(f"Epoch {trainer.current_epoch}, global step {trainer.global_step}: "
                  f"{self.monitor!r} reached {value:.5f}, saving {path!r} as top {k}",
                  file=sys.stderr)
        self._save_checkpoint(trainer, path)
        if dropped and dropped != path:
            self._remove(trainer, dropped)

    def _save_last(self, trainer: Any, candidates: dict[str, Any]) -> None:
        if not self.save_last:
            return
        path = self._free_path(trainer, candidates, reusable=self.last_model_path,
                               template=self.CHECKPOINT_NAME_LAST)
        previous, self.last_model_path = self.last_model_path, path
        self._save_checkpoint(trainer, path)
        if previous and previous != path:
            self._remove(trainer, previous)

    def _save_checkpoint(self, trainer: Any, path: str) -> None:
        # Set first: the checkpoint being written holds this callback's state.
        self._last_global_step_saved = trainer.global_step
        trainer.save_checkpoint(path)

    def _remove(self, trainer: Any, path: str) -> None:
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
        resumed_from = getattr(trainer, "ckpt_path", None)
        if resumed_from and _abspath(resumed_from) == path:
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
        self, trainer: Any, candidates: dict[str, Any], reusable: str | None,
        template: str | None = None,
    ) -> str:
        """The formatted path, versioned with ``-vN`` while taken by a file we don't replace."""
        path = self.format_checkpoint_name(candidates, filename=template)
        version = self.STARTING_VERSION
        while (self.enable_version_counter and path != reusable
               and _broadcast(trainer, os.path.exists(path))):
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
        if saved_dir is None or _abspath(saved_dir) == self.dirpath:
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


# ---------------------------------------------------------------------- EarlyStopping


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
        self.mode = _check_mode("EarlyStopping", mode)
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

    def setup(self, trainer: Trainer, module: Module, stage: str) -> None:
        if stage == "fit":
            self._validation_ran = False
            self._validated_epoch = None
            self._fallback_epoch = None

    def on_validation_end(self, trainer: Trainer, module: Module) -> None:
        if not _fitting(trainer):
            return
        self._validation_ran = True
        self._validated_epoch = trainer.current_epoch
        if self._check_on_train_epoch_end is True:
            return
        if self._check_on_train_epoch_end is None and self.monitor not in trainer.callback_metrics:
            self._fallback_epoch = trainer.current_epoch  # a training metric: check at epoch end
            return
        self._run_check(trainer, conclusive=True)

    def on_train_epoch_end(self, trainer: Trainer, module: Module) -> None:
        if not _fitting(trainer) or self._check_on_train_epoch_end is False:
            return
        epoch = trainer.current_epoch
        if (self._check_on_train_epoch_end is None and self._validation_ran
                and self._fallback_epoch != epoch):
            return  # validation does the checking
        # Without validation this epoch, a missing metric is final only if none was due.
        self._run_check(trainer, self._validated_epoch == epoch or _validation_scheduled(trainer))

    # ------------------------------------------------------------------ the check

    def _run_check(self, trainer: Any, conclusive: bool) -> None:
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            if not conclusive:
                return  # validation, not due this epoch, will bring it
            message = (f"EarlyStopping(monitor={self.monitor!r}) found no metric "
                       f"{self.monitor!r}; logged metrics: {_available(metrics)}. Log it with "
                       f"self.log({self.monitor!r}, ...), change monitor=, or pass strict=False")
            if self.strict:
                raise ConfigError(message)
            if not self._warned_missing and getattr(trainer, "is_global_zero", True):
                warnings.warn(message, stacklevel=2)
                self._warned_missing = True
            return
        should_stop, reason = self._evaluate(_to_float(metrics[self.monitor]))
        if reason and self.verbose and getattr(trainer, "is_global_zero", True):
            print(reason, file=sys.stderr)
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


# ---------------------------------------------------------------------- ProgressBar


def _tqdm_class() -> type:
    # tqdm.auto draws a widget in notebooks, which needs ipywidgets; the text bar otherwise.
    if "ipykernel" in sys.modules and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    return tqdm


class ProgressBar(Callback):
    """tqdm bars on stderr (global rank 0 only) for training, validation, test and predict.

    The training bar reads ``Epoch N`` and shows ``trainer.progress_bar_metrics`` (and
    the logger's version as ``v_num``) with 4 significant digits. It moves every
    ``refresh_rate`` batches, and reads the metrics then only if tqdm would redraw
    (reading them may wait for the GPU). ``refresh_rate=0`` draws nothing, and so does
    a bar whose stderr is not a terminal (a log file, a pipe) unless ``file`` is given.
    With ``leave=True`` each epoch's bar stays on screen.
    """

    def __init__(self, refresh_rate: int = 1, leave: bool = False, file: Any = None) -> None:
        if not isinstance(refresh_rate, int) or refresh_rate < 0:
            raise ConfigError(f"ProgressBar(refresh_rate={refresh_rate!r}) must be an int >= 0")
        self.refresh_rate = refresh_rate
        self.leave = leave
        self._file = file
        self._enabled = True
        self.train_progress_bar: Any = None
        self.val_progress_bar: Any = None
        self.test_progress_bar: Any = None
        self.predict_progress_bar: Any = None
        self._train_open = False
        self._eval_count = 0
        self._postfix_time = -math.inf

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self.refresh_rate > 0

    def enable(self) -> None:
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def get_metrics(self, trainer: Any, module: Any = None) -> dict[str, str]:
        """What the training bar shows: ``v_num`` and the progress-bar metrics, as text."""
        items: dict[str, str] = {}
        loggers = getattr(trainer, "loggers", None) or []
        version = getattr(loggers[0], "version", None) if loggers else None
        if version is not None:
            items["v_num"] = version[-4:] if isinstance(version, str) else str(version)
        for name, value in (getattr(trainer, "progress_bar_metrics", None) or {}).items():
            if isinstance(value, torch.Tensor):
                value = value.item() if value.numel() == 1 else value.tolist()
            items[name] = f"{value:.4g}" if isinstance(value, float) else str(value)
        return items

    def _active(self, trainer: Any) -> bool:
        return self.is_enabled and getattr(trainer, "is_global_zero", True) and self._shows()

    def _shows(self) -> bool:
        """Bars go to a terminal, or to the ``file`` given: never ``\r`` lines into a log."""
        if self._file is not None:
            return True
        try:
            return sys.stderr is not None and sys.stderr.isatty()
        except (AttributeError, ValueError):
            return False

    def _new_bar(self, desc: str, total: int | None, position: int, leave: bool) -> Any:
        return _tqdm_class()(
            desc=desc, total=total, position=position, leave=leave,
            file=self._file if self._file is not None else sys.stderr,
            dynamic_ncols=True, smoothing=0)

    def _advance(self, bar: Any, n: int) -> None:
        """Move ``bar`` to ``n`` done, every ``refresh_rate`` batches and at its end."""
        if bar is not None and (n % self.refresh_rate == 0 or n == bar.total) and n > bar.n:
            bar.update(n - bar.n)

    # ------------------------------------------------------------------ training

    def on_train_epoch_start(self, trainer: Trainer, module: Module) -> None:
        if not self._active(trainer):
            return
        total = _total(trainer.num_training_batches)
        desc = f"Epoch {trainer.current_epoch}"
        if self._train_open:
            self.train_progress_bar.set_description(desc, refresh=False)
            self.train_progress_bar.reset(total=total)
        else:
            self.train_progress_bar = self._new_bar(desc, total, position=0, leave=True)
            self._train_open = True

    def on_train_batch_end(
        self, trainer: Trainer, module: Module, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._train_open:
            return
        n = batch_idx + 1
        bar = self.train_progress_bar
        if n % self.refresh_rate == 0 or n == bar.total:
            # Reading the metrics may sync with the GPU: only as often as tqdm redraws.
            now = time.monotonic()
            if now - self._postfix_time >= bar.mininterval or n == bar.total:
                bar.set_postfix(self.get_metrics(trainer, module), refresh=False)
                self._postfix_time = now
            self._advance(bar, n)

    def on_train_epoch_end(self, trainer: Trainer, module: Module) -> None:
        if not self._train_open:
            return
        bar = self.train_progress_bar
        bar.set_postfix(self.get_metrics(trainer, module), refresh=False)
        bar.refresh()
        if self.leave:
            bar.close()
            self._train_open = False

    def on_train_end(self, trainer: Trainer, module: Module) -> None:
        self._close_train_bar()

    def _close_train_bar(self) -> None:
        if self._train_open:
            self.train_progress_bar.close()
            self._train_open = False

    # ------------------------------------------------------------------ evaluation

    def _open_eval_bar(self, trainer: Any, desc: str, total: Any) -> Any:
        if not self._active(trainer):
            return None
        self._eval_count = 0
        return self._new_bar(desc, _total(total), position=1 if self._train_open else 0,
                             leave=False)

    def _eval_batch_end(self, bar: Any) -> None:
        if bar is not None:
            self._eval_count += 1
            self._advance(bar, self._eval_count)

    def on_validation_start(self, trainer: Trainer, module: Module) -> None:
        if getattr(trainer, "sanity_checking", False):
            desc, total = "Sanity Checking", getattr(trainer, "num_sanity_val_batches", None)
        else:
            desc, total = "Validation", getattr(trainer, "num_val_batches", None)
        self.val_progress_bar = self._open_eval_bar(trainer, desc, total)

    def on_validation_batch_end(
        self, trainer: Trainer, module: Module, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._eval_batch_end(self.val_progress_bar)

    def on_validation_end(self, trainer: Trainer, module: Module) -> None:
        if self.val_progress_bar is not None:
            self.val_progress_bar.close()
            self.val_progress_bar = None
        if self._train_open and not getattr(trainer, "sanity_checking", False):
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, module))

    def on_test_start(self, trainer: Trainer, module: Module) -> None:
        self.test_progress_bar = self._open_eval_bar(
            trainer, "Testing", getattr(trainer, "num_test_batches", None))

    def on_test_batch_end(
        self, trainer: Trainer, module: Module, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._eval_batch_end(self.test_progress_bar)

    def on_test_end(self, trainer: Trainer, module: Module) -> None:
        if self.test_progress_bar is not None:
            self.test_progress_bar.close()
            self.test_progress_bar = None

    def on_predict_start(self, trainer: Trainer, module: Module) -> None:
        self.predict_progress_bar = self._open_eval_bar(
            trainer, "Predicting", getattr(trainer, "num_predict_batches", None))

    def on_predict_batch_end(
        self, trainer: Trainer, module: Module, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._eval_batch_end(self.predict_progress_bar)

    def on_predict_end(self, trainer: Trainer, module: Module) -> None:
        if self.predict_progress_bar is not None:
            self.predict_progress_bar.close()
            self.predict_progress_bar = None

    def on_exception(self, trainer: Trainer, module: Module, exception: BaseException) -> None:
        self.teardown(trainer, module, getattr(trainer, "stage", "fit"))

    def teardown(self, trainer: Trainer, module: Module, stage: str) -> None:
        for attr in ("val_progress_bar", "test_progress_bar", "predict_progress_bar"):
            bar = getattr(self, attr)
            if bar is not None:
                bar.close()
                setattr(self, attr, None)
        self._close_train_bar()


TQDMProgressBar = ProgressBar  # Lightning's name, for code that ports


# ---------------------------------------------------------------------- LearningRateMonitor


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

    def on_train_start(self, trainer: Trainer, module: Module) -> None:
        if not getattr(trainer, "loggers", None):
            raise ConfigError(
                "LearningRateMonitor needs a logger: pass logger='csv' (or another) to the "
                "Trainer, or remove the callback")
        self.lrs = {name: [] for name, *_ in self._entries(trainer)}
        self._last_step_logged = None

    def on_train_batch_start(
        self, trainer: Trainer, module: Module, batch: Any, batch_idx: int
    ) -> None:
        if self.logging_interval == "epoch":
            return
        step = trainer.global_step
        every = getattr(trainer, "log_every_n_steps", 1) or 1
        # Once per optimizer step (accumulated batches share one), on the steps where the
        # trainer logs its own metrics.
        if step == self._last_step_logged or step % every:
            return
        self._last_step_logged = step
        self._log(trainer, self._extract(trainer, "step" if self.logging_interval is None
                                         else "any"))

    def on_train_epoch_start(self, trainer: Trainer, module: Module) -> None:
        if self.logging_interval == "step":
            return
        self._log(trainer, self._extract(trainer, "epoch" if self.logging_interval is None
                                         else "any"))

    def _log(self, trainer: Any, stats: dict[str, float]) -> None:
        if stats and getattr(trainer, "is_global_zero", True):
            for logger in trainer.loggers:
                logger.log_metrics(stats, step=trainer.global_step)

    def _entries(self, trainer: Any) -> list[tuple[str, Any, int, str | None]]:
        """(name, optimizer, param group index, scheduler interval or None) per param group."""
        found: list[tuple[str, Any, str | None]] = []
        seen: set[int] = set()
        for config in getattr(trainer, "lr_scheduler_configs", None) or []:
            scheduler = _config_value(config, "scheduler", None)
            if scheduler is None:  # a bare scheduler rather than a config
                scheduler = config
            optimizer = scheduler.optimizer
            name = _config_value(config, "name", None) or f"lr-{type(optimizer).__name__}"
            found.append((name, optimizer, _config_value(config, "interval", "epoch")))
            seen.add(id(optimizer))
        for optimizer in getattr(trainer, "optimizers", None) or []:
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

    def _extract(self, trainer: Any, interval: str) -> dict[str, float]:
        stats: dict[str, float] = {}
        for name, optimizer, index, scheduler_interval in self._entries(trainer):
            if scheduler_interval is not None and interval not in ("any", scheduler_interval):
                continue
            group = optimizer.param_groups[index]
            lr = _to_float(group["lr"])
            stats[name] = lr
            self.lrs.setdefault(name, []).append(lr)
            if self.log_momentum:
                if "momentum" in group:
                    momentum = _to_float(group["momentum"])
                elif "betas" in group:
                    momentum = _to_float(group["betas"][0])
                else:
                    momentum = 0.0
                stats[f"{name}-momentum"] = momentum
                self.last_momentum_values[f"{name}-momentum"] = momentum
        return stats
