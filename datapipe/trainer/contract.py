"""What a callback may read from the trainer, and the two things it may ask of it.

``TrainerView`` is the whole contract between the Trainer and its callbacks: every
member below is set by ``datapipe.trainer.Trainer`` (tests/test_callbacks.py checks a
real one against this list, and drives the shipped callbacks through a stand-in that has
these members and nothing else). A callback that needs something not listed here asks
for it to be added, so the list stays the truth.

The names and meanings are Lightning's, so callbacks written for Lightning port.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class TrainerView(Protocol):
    """The trainer as its callbacks see it."""

    # Where the loop stands (see datapipe.trainer.progress.Progress).
    current_epoch: int
    global_step: int
    stage: str                        # "fit", "validate", "test" or "predict"
    # Always False: this trainer runs no sanity check; kept for callbacks written for Lightning.
    sanity_checking: bool
    fast_dev_run: bool | int          # the option as given: callbacks neither save nor stop
    ckpt_path: str | None             # the checkpoint this run (or evaluation) started from
    should_stop: bool                 # settable: the fit ends after this epoch

    # How long the loops run.
    max_epochs: int
    max_steps: int
    num_training_batches: int | float           # per epoch, after limit_train_batches
    num_val_batches: Sequence[int | float]      # per validation loader
    num_test_batches: Sequence[int | float]
    num_predict_batches: Sequence[int | float]
    check_val_every_n_epoch: int
    log_every_n_steps: int

    # What was logged: name -> tensor (epoch values after an epoch ends), and name -> number.
    callback_metrics: Mapping[str, Any]
    progress_bar_metrics: Mapping[str, Any]

    # Processes, files, loggers and optimizers.
    is_global_zero: bool
    global_rank: int
    world_size: int
    default_root_dir: Path
    log_dir: Path
    loggers: Sequence[Any]
    optimizers: Sequence[Any]
    lr_scheduler_configs: Sequence[Mapping[str, Any]]

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (``obj`` itself in a single process)."""

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Write a checkpoint of this run to ``path`` (global rank 0 writes)."""


MEMBERS: tuple[str, ...] = (*TrainerView.__annotations__, "broadcast", "save_checkpoint")
