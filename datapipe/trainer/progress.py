"""Where the fit loop stands: the one object checkpoints save and callbacks read.

As Lightning's loop progress (``lightning/pytorch/loops/progress.py``), but one flat
dataclass: this trainer has one loop.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Progress:
    """The epoch, the optimizer steps taken, and how far into the epoch the loop is."""

    epoch: int = 0                # the epoch running (or the next, between epochs)
    global_step: int = 0          # optimizer steps taken in all epochs
    batches_in_epoch: int = 0     # batches of ``epoch`` trained on
    epoch_finished: bool = False  # its batches are done; validation and epoch-end hooks run

    def finish_epoch(self) -> None:
        """The epoch's batches are done: what a checkpoint saved now resumes after."""
        self.epoch_finished = True

    def next_epoch(self) -> None:
        self.epoch, self.batches_in_epoch, self.epoch_finished = self.epoch + 1, 0, False

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` stood: after its epoch, if that one had finished."""
        self.global_step = state["global_step"]
        if state["epoch_finished"]:
            self.epoch, self.batches_in_epoch = state["epoch"] + 1, 0
        else:
            self.epoch, self.batches_in_epoch = state["epoch"], state["batches_in_epoch"]
        self.epoch_finished = False
