"""Module: a torch ``nn.Module`` with the step methods and hooks the Trainer calls.

The names and contracts are Lightning's, so a LightningModule ports by changing its
base class:

    class Classifier(datapipe.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(784, 10)
        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x.flatten(1)), y)
            self.log("train_loss", loss, prog_bar=True)
            return loss
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

Models never move themselves or their batches: the Trainer puts both on the device.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from datapipe.trainer.trainer import Trainer


class Module(nn.Module):
    """Steps, optimizers, logging and hooks for the Trainer; an ``nn.Module`` otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.hparams: dict[str, Any] = {}
        # Set by the Trainer while it runs this module; not a submodule or parameter.
        object.__setattr__(self, "_trainer", None)

    # ------------------------------------------------------------------ trainer link

    @property
    def trainer(self) -> Trainer:
        if self._trainer is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a Trainer")
        return self._trainer

    @property
    def current_epoch(self) -> int:
        return self._trainer.current_epoch if self._trainer is not None else 0

    @property
    def global_step(self) -> int:
        return self._trainer.global_step if self._trainer is not None else 0

    @property
    def device(self) -> torch.device:
        for tensor in (*self.parameters(), *self.buffers()):
            return tensor.device
        return torch.device("cpu")

    def save_hyperparameters(self, *names: str) -> None:
        """Record the caller's ``__init__`` arguments (or those named) in ``self.hparams``.

        They go into checkpoints, so ``Trainer`` and ``datapipe test`` can rebuild the
        module with ``type(module)(**hparams)``.
        """
        frame = inspect.currentframe().f_back
        args = inspect.getargvalues(frame)
        values = {n: args.locals[n] for n in args.args if n != "self"}
        if args.keywords:
            values.update(args.locals[args.keywords])
        self.hparams.update({n: values[n] for n in names} if names else values)

    # ------------------------------------------------------------------ logging

    def log(
        self,
        name: str,
        value: Any,
        prog_bar: bool = False,
        on_step: bool | None = None,
        on_epoch: bool | None = None,
        logger: bool = True,
        batch_size: int | None = None,
    ) -> None:
        """Record a scalar metric; the Trainer aggregates, reduces across ranks and logs it.

        Defaults follow Lightning: in training, per step; in validation and test, the
        mean over the epoch (weighted by ``batch_size``, else by the batch's length).
        """
        if self._trainer is None:
            return  # called outside a Trainer (e.g. a unit test of a step): nothing to do
        self._trainer.metrics.log(
            name, value, prog_bar=prog_bar, on_step=on_step, on_epoch=on_epoch,
            logger=logger, batch_size=batch_size,
        )

    def log_dict(self, metrics: Mapping[str, Any], **kwargs: Any) -> None:
        for name, value in metrics.items():
            self.log(name, value, **kwargs)

    # ------------------------------------------------------------------ steps

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        """Return the loss (a scalar tensor) or a dict with a ``loss`` key."""
        raise NotImplementedError(f"{type(self).__name__} must define training_step")

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        return None

    def test_step(self, batch: Any, batch_idx: int) -> Any:
        return None

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        """By default, the model's output for the batch's inputs."""
        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(inputs)

    def configure_optimizers(self) -> Any:
        """An optimizer; or (optimizer, scheduler); or {"optimizer", "lr_scheduler"}."""
        raise NotImplementedError(f"{type(self).__name__} must define configure_optimizers")

    # ------------------------------------------------------------------ backward and step

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()

    def optimizer_zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ hooks

    def on_fit_start(self) -> None: ...
    def on_fit_end(self) -> None: ...
    def on_train_start(self) -> None: ...
    def on_train_end(self) -> None: ...
    def on_train_epoch_start(self) -> None: ...
    def on_train_epoch_end(self) -> None: ...
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None: ...
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None: ...
    def on_validation_epoch_start(self) -> None: ...
    def on_validation_epoch_end(self) -> None: ...
    def on_test_epoch_start(self) -> None: ...
    def on_test_epoch_end(self) -> None: ...
    def on_predict_epoch_start(self) -> None: ...
    def on_predict_epoch_end(self) -> None: ...
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None: ...
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None: ...
