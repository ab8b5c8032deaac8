"""ProgressBar: tqdm bars for training, validation, test and predict.

The bars are the product here, so they are drawn to the terminal (stderr, or the
``file`` given) rather than sent through ``logging``: a log record per redraw would
flood a log, and a log handler cannot redraw a line in place.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import time
from typing import TYPE_CHECKING, Any

import torch

from datapipe.errors import ConfigError
from datapipe.trainer.callbacks.base import Callback
from datapipe.trainer.callbacks.common import bar_total

if TYPE_CHECKING:
    from datapipe.trainer.contract import TrainerView
    from datapipe.trainer.module import Module


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

    def get_metrics(self, trainer: TrainerView, module: Any = None) -> dict[str, str]:
        """What the training bar shows: ``v_num`` and the progress-bar metrics, as text."""
        items: dict[str, str] = {}
        loggers = trainer.loggers
        version = getattr(loggers[0], "version", None) if loggers else None
        if version is not None:
            items["v_num"] = version[-4:] if isinstance(version, str) else str(version)
        for name, value in trainer.progress_bar_metrics.items():
            if isinstance(value, torch.Tensor):
                value = value.item() if value.numel() == 1 else value.tolist()
            items[name] = f"{value:.4g}" if isinstance(value, float) else str(value)
        return items

    def _active(self, trainer: TrainerView) -> bool:
        return self.is_enabled and trainer.is_global_zero and self._shows()

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

    def on_train_epoch_start(self, trainer: TrainerView, module: Module) -> None:
        if not self._active(trainer):
            return
        total = bar_total(trainer.num_training_batches)
        desc = f"Epoch {trainer.current_epoch}"
        if self._train_open:
            self.train_progress_bar.set_description(desc, refresh=False)
            self.train_progress_bar.reset(total=total)
        else:
            self.train_progress_bar = self._new_bar(desc, total, position=0, leave=True)
            self._train_open = True

    def on_train_batch_end(
        self, trainer: TrainerView, module: Module, outputs: Any, batch: Any, batch_idx: int
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

    def on_train_epoch_end(self, trainer: TrainerView, module: Module) -> None:
        if not self._train_open:
            return
        bar = self.train_progress_bar
        bar.set_postfix(self.get_metrics(trainer, module), refresh=False)
        bar.refresh()
        if self.leave:
            bar.close()
            self._train_open = False

    def on_train_end(self, trainer: TrainerView, module: Module) -> None:
        self._close_train_bar()

    def _close_train_bar(self) -> None:
        if self._train_open:
            self.train_progress_bar.close()
            self._train_open = False

    # ------------------------------------------------------------------ evaluation

    def _open_eval_bar(self, trainer: TrainerView, desc: str, total: Any) -> Any:
        if not self._active(trainer):
            return None
        self._eval_count = 0
        return self._new_bar(desc, bar_total(total), position=1 if self._train_open else 0,
                             leave=False)

    def _eval_batch_end(self, bar: Any) -> None:
        if bar is not None:
            self._eval_count += 1
            self._advance(bar, self._eval_count)

    def on_validation_start(self, trainer: TrainerView, module: Module) -> None:
        desc = "Sanity Checking" if trainer.sanity_checking else "Validation"
        self.val_progress_bar = self._open_eval_bar(trainer, desc, trainer.num_val_batches)

    def on_validation_batch_end(
        self, trainer: TrainerView, module: Module, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._eval_batch_end(self.val_progress_bar)

    def on_validation_end(self, trainer: TrainerView, module: Module) -> None:
        if self.val_progress_bar is not None:
            self.val_progress_bar.close()
            self.val_progress_bar = None
        if self._train_open and not trainer.sanity_checking:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, module))

    def on_test_start(self, trainer: TrainerView, module: Module) -> None:
        self.test_progress_bar = self._open_eval_bar(
            trainer, "Testing", trainer.num_test_batches)

    def on_test_batch_end(
        self, trainer: TrainerView, module: Module, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._eval_batch_end(self.test_progress_bar)

    def on_test_end(self, trainer: TrainerView, module: Module) -> None:
        if self.test_progress_bar is not None:
            self.test_progress_bar.close()
            self.test_progress_bar = None

    def on_predict_start(self, trainer: TrainerView, module: Module) -> None:
        self.predict_progress_bar = self._open_eval_bar(
            trainer, "Predicting", trainer.num_predict_batches)

    def on_predict_batch_end(
        self, trainer: TrainerView, module: Module, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._eval_batch_end(self.predict_progress_bar)

    def on_predict_end(self, trainer: TrainerView, module: Module) -> None:
        if self.predict_progress_bar is not None:
            self.predict_progress_bar.close()
            self.predict_progress_bar = None

    def on_exception(self, trainer: TrainerView, module: Module, exception: BaseException) -> None:
        self.teardown(trainer, module, trainer.stage)

    def teardown(self, trainer: TrainerView, module: Module, stage: str) -> None:
        for attr in ("val_progress_bar", "test_progress_bar", "predict_progress_bar"):
            bar = getattr(self, attr)
            if bar is not None:
                bar.close()
                setattr(self, attr, None)
        self._close_train_bar()


TQDMProgressBar = ProgressBar  # Lightning's name, for code that ports

