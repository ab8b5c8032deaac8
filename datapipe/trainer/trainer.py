"""Trainer: runs any Module on any DataModule, on one process or many (torchrun).

    trainer = datapipe.Trainer(max_epochs=3, precision="bf16-mixed")
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm)

Read it top to bottom as nanoGPT's train.py: ``__init__`` (options, device, precision,
callbacks, loggers), then ``fit`` -> ``_train_epoch`` -> ``_training_step``, then
evaluation. Where the loop stands is ``self.progress`` (datapipe.trainer.progress);
checkpoints are built and restored by datapipe.trainer.checkpoint; devices and
processes come from datapipe.trainer.distributed; autocast and the gradient scaler
from datapipe.trainer.precision. What callbacks may read is
datapipe.trainer.contract.TrainerView.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import datapipe.trainer.checkpoint as ckpt
from datapipe.datamodule import MAX_SEED
from datapipe.errors import ConfigError, NonFiniteLossError
from datapipe.trainer.callbacks import Callback, ModelCheckpoint, ProgressBar
from datapipe.trainer.distributed import (
    DistEnv,
    all_ok_or_raise,
    any_rank,
    broadcast,
    select_device,
)
from datapipe.trainer.metrics import Metrics
from datapipe.trainer.module import Module, load_weights, module_name
from datapipe.trainer.precision import PRECISIONS, Precision, precision_name
from datapipe.trainer.progress import Progress

__all__ = ["PRECISIONS", "Trainer", "seed_everything"]

_STEP_METHOD = {"validate": "validation_step", "test": "test_step", "predict": "predict_step"}
_HOOK_PREFIX = {"validate": "on_validation", "test": "on_test", "predict": "on_predict"}
# Hooks only callbacks have: a Module's method of one of these names is not a hook (the
# trainer calls the DataModule's setup and teardown itself).
_CALLBACK_ONLY = frozenset({"setup", "teardown", "on_exception"})


class Trainer:
    """Fits, validates, tests and predicts with a Module on a DataModule."""

    def __init__(
        self,
        *,
        max_epochs: int | None = None,
        max_steps: int = -1,
        accelerator: str = "auto",
        devices: int | str = "auto",
        precision: str | int = "32",
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        limit_test_batches: int | float | None = None,
        limit_predict_batches: int | float | None = None,
        fast_dev_run: bool | int = False,
        check_val_every_n_epoch: int = 1,
        log_every_n_steps: int = 50,
        deterministic: bool = False,
        seed: int | None = None,
        default_root_dir: str | os.PathLike | None = None,
        callbacks: Iterable[Callback] | Callback | None = None,
        logger: Any = True,
        enable_progress_bar: bool = True,
        enable_checkpointing: bool = True,
    ) -> None:
        precision = precision_name(precision)
        if not isinstance(accumulate_grad_batches, int) or accumulate_grad_batches < 1:
            raise ConfigError("accumulate_grad_batches must be a positive integer")
        if gradient_clip_algorithm not in ("norm", "value"):
            raise ConfigError("gradient_clip_algorithm must be 'norm' or 'value'")
        _check_options(max_epochs=max_epochs, max_steps=max_steps, seed=seed,
                       gradient_clip_val=gradient_clip_val,
                       check_val_every_n_epoch=check_val_every_n_epoch,
                       log_every_n_steps=log_every_n_steps)
        self.fast_dev_run = fast_dev_run  # callbacks neither save nor stop in such a run
        if fast_dev_run:
            n = 1 if fast_dev_run is True else int(fast_dev_run)
            max_epochs, max_steps = 1, n
            limit_train_batches = limit_val_batches = limit_test_batches = n
            limit_predict_batches = n
            logger, enable_checkpointing = False, False
        if max_epochs is None:
            max_epochs = 1000 if max_steps == -1 else -1  # Lightning's defaults
        self.max_epochs, self.max_steps = max_epochs, max_steps
        self.precision = precision
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.limits = {"train": limit_train_batches, "validate": limit_val_batches,
                       "test": limit_test_batches, "predict": limit_predict_batches}
        self.check_val_every_n_epoch = check_val_every_n_epoch
        self.log_every_n_steps = log_every_n_steps
        self.deterministic, self.seed = deterministic, seed
        self.default_root_dir = Path(default_root_dir or Path.cwd()).absolute()

        self.env = DistEnv.from_environment()
        self.device = select_device(accelerator, devices, self.env)
        self.precision_plugin = Precision(precision, self.device)

        from datapipe.trainer.loggers import create_logger

        if isinstance(callbacks, Callback):
            callbacks = [callbacks]
        self.callbacks: list[Callback] = list(callbacks or [])
        if enable_progress_bar and not any(isinstance(c, ProgressBar) for c in self.callbacks):
            self.callbacks.append(ProgressBar())
        if enable_checkpointing and not any(
                isinstance(c, ModelCheckpoint) for c in self.callbacks):
            self.callbacks.append(ModelCheckpoint())
        self.loggers = [] if logger in (False, None) else (
            [create_logger("csv", self.default_root_dir)] if logger is True
            else list(logger) if isinstance(logger, (list, tuple)) else [logger])
        self._hooks: dict[str, list[Callback]] = {}

        self.metrics = Metrics()
        self.progress = Progress()
        self.should_stop = False
        self.stage = "fit"
        self.sanity_checking = False  # no sanity check runs; Lightning's callbacks read it
        self.ckpt_path: str | None = None  # the checkpoint the current stage started from
        self.optimizers: list[torch.optim.Optimizer] = []
        self.lr_scheduler_configs: list[dict[str, Any]] = []
        self.num_training_batches: int | float = 0
        self.num_val_batches: list[int | float] = []
        self.num_test_batches: list[int | float] = []
        self.num_predict_batches: list[int | float] = []
        self.module: Module | None = None
        self.datamodule: Any = None
        self.data_card: dict[str, Any] | None = None  # of this run's datamodule
        self._runner: nn.Module | None = None  # the DDP wrapper in multi-process runs
        self._resume = ckpt.Pending()  # what a restored checkpoint applies at its epoch start
        self._ckpt_source: Any = None  # the checkpoint as the caller named it, for messages
        self._pending_losses: list[tuple[torch.Tensor, int, int]] = []
        self._predictions: list[Any] = []

    # ------------------------------------------------------------------ fit -> epoch -> step

    def fit(self, model: Module, datamodule: Any = None, *, train_dataloaders: Any = None,
            val_dataloaders: Any = None, ckpt_path: str | os.PathLike | None = None) -> None:
        """Train ``model``; with ``ckpt_path`` (a path, "last" or "best") continue a run."""
        if datamodule is None and train_dataloaders is None:
            raise ConfigError("fit needs a datamodule or train_dataloaders")
        with self._session("fit", model, datamodule):
            self._check_hparams(model)
            self._configure_optimizers(model)
            self._attach(model)
            checkpoint = self._resolve_ckpt(ckpt_path)
            if checkpoint is not None:  # continue that run
                ckpt.require(checkpoint, ckpt.RESUME_KEYS, "resuming a run", self._ckpt_source)
                load_weights(model, checkpoint, self._ckpt_source)
                self._resume = ckpt.restore(self, checkpoint)
            train_loader = train_dataloaders or datamodule.train_dataloader()
            val_loader = val_dataloaders if val_dataloaders is not None else (
                datamodule.val_dataloader() if datamodule is not None else None)
            if isinstance(val_loader, list) and not val_loader:
                val_loader = None  # the DataModule has no validation split
            self.num_training_batches = _limit(_length(train_loader), self.limits["train"],
                                               "limit_train_batches")
            if val_loader is not None:
                self.num_val_batches = [_limit(_length(dl), self.limits["validate"],
                                               "limit_val_batches") for dl in (
                    val_loader if isinstance(val_loader, (list, tuple)) else [val_loader])]
            if self.is_global_zero:
                for logger in self.loggers:
                    logger.log_hyperparams(dict(model.hparams))
            self._call("on_fit_start")
            self._call("on_train_start")
            while not self._finished():
                self._train_epoch(train_loader, val_loader)
            self._call("on_train_end")
            self._call("on_fit_end")
            if self.is_global_zero:
                for logger in self.loggers:
                    logger.save()

    def _finished(self) -> bool:
        return (self.should_stop
                or (self.max_steps != -1 and self.global_step >= self.max_steps)
                or (self.max_epochs != -1 and self.current_epoch >= self.max_epochs))

    def _train_epoch(self, loader: Any, val_loader: Any) -> None:
        module = self.module
        progress, resume = self.progress, self._resume
        self._resume = ckpt.Pending()
        self.metrics.reset("train")
        if resume.metrics:
            self.metrics.load_state_dict(resume.metrics)
        self._set_epoch(loader)
        module.train()
        self._call("on_train_epoch_start")
        batch_idx = progress.batches_in_epoch
        batches = iter(loader)
        if batch_idx and not hasattr(loader, "load_state_dict"):
            for _ in range(batch_idx):  # a foreign loader cannot skip: replay its batches
                next(batches)
        if resume.rng is not None:
            ckpt.restore_rng_states(resume.rng)
        for batch in batches:
            if batch_idx >= self.num_training_batches:
                break
            batch = self._transfer(batch)
            self.metrics.batch_size = _batch_size(batch)
            self._call("on_train_batch_start", batch, batch_idx)
            outputs, stepped = self._training_step(batch, batch_idx)
            progress.batches_in_epoch = batch_idx = batch_idx + 1
            if stepped and self.global_step % self.log_every_n_steps == 0:
                self._check_losses()
                self._log({**self.metrics.take_step_metrics(), "epoch": self.current_epoch})
            self._call("on_train_batch_end", outputs, batch, batch_idx - 1)
            if self.max_steps != -1 and self.global_step >= self.max_steps:
                break
        del batches  # closed: the loader's position says this epoch is over
        self._check_losses()
        self._log(self.metrics.take_step_metrics())
        epoch_metrics = self.metrics.end_epoch(self.env)
        for config in self.lr_scheduler_configs:
            if config["interval"] == "epoch" and (self.current_epoch + 1) % config[
                    "frequency"] == 0:
                config["scheduler"].step()
        progress.finish_epoch()
        if val_loader is not None and (self.current_epoch + 1) % self.check_val_every_n_epoch == 0:
            epoch_metrics.update(self._evaluate("validate", val_loader))
            self.metrics.reset("train")
        self._log({**epoch_metrics, "epoch": self.current_epoch})
        self._call("on_train_epoch_end")
        self.should_stop = any_rank(self.should_stop, self.env, self.device)
        progress.next_epoch()

    def _training_step(self, batch: Any, batch_idx: int) -> tuple[Any, bool]:
        """Forward and backward of one micro-batch; an optimizer step on the last one."""
        module, optimizer = self.module, self.optimizers[0]
        last = ((batch_idx + 1) % self.accumulate_grad_batches == 0
                or batch_idx + 1 >= self.num_training_batches)
        no_sync = (self._runner is not None and not last)
        with self._runner.no_sync() if no_sync else contextlib.nullcontext():
            with self.precision_plugin.autocast():
                if self._runner is not None:
                    outputs = self._runner("training_step", batch, batch_idx)
                else:
                    outputs = module.training_step(batch, batch_idx)
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if not isinstance(loss, torch.Tensor):
                raise ConfigError(f"{type(module).__name__}.training_step returned "
                                  f"{type(outputs).__name__}; return the loss tensor or a dict "
                                  f"with a 'loss' key")
            if loss.numel() != 1:
                raise ConfigError(f"{type(module).__name__}.training_step returned a loss of "
                                  f"shape {tuple(loss.shape)}; return a scalar (e.g. .mean())")
            if not loss.requires_grad:
                raise ConfigError(f"{type(module).__name__}.training_step returned a loss that "
                                  f"does not require grad (computed under no_grad or detached?)")
            self._watch_loss(loss, batch_idx)
            if self.accumulate_grad_batches > 1:  # a division costs a step in backward too
                loss = loss / self.accumulate_grad_batches
            module.backward(self.precision_plugin.scale(loss))
        if not last:
            return outputs, False
        if self.gradient_clip_val:
            self.precision_plugin.unscale_(optimizer)
            if self.gradient_clip_algorithm == "norm":
                nn.utils.clip_grad_norm_(module.parameters(), self.gradient_clip_val)
            else:
                nn.utils.clip_grad_value_(module.parameters(), self.gradient_clip_val)
        # The model's optimizer_step, its step() through the gradient scaler under 16-mixed.
        self.precision_plugin.optimizer_step(module, optimizer)
        module.optimizer_zero_grad(optimizer)
        self.progress.global_step += 1
        for config in self.lr_scheduler_configs:
            if config["interval"] == "step" and self.global_step % config["frequency"] == 0:
                config["scheduler"].step()
        return outputs, True

    def _watch_loss(self, loss: torch.Tensor, batch_idx: int) -> None:
        """End the run in one line when the training loss is NaN or infinite.

        Reading a CPU loss costs about 2 us (0.2% of the smallest MNIST step in
        benchmarks/bench_trainer.py) and waits for nothing, so a single CPU process
        checks every micro-batch before its backward: the weights stay finite. On an
        accelerator, reading it would wait for the device at every step; and with
        several processes, one that stopped alone would leave the others waiting in
        the gradient all-reduce. There the losses are only kept (no copy, no kernel)
        and checked together, by every rank at once, where the trainer reads the device
        anyway: when step metrics are logged and at the end of the epoch.
        """
        if loss.device.type == "cpu" and not self.env.distributed:
            value = loss.detach().item()  # detached: item() of a grad tensor warns
            if not math.isfinite(value):
                self._nonfinite_loss(value, batch_idx)
            return
        self._pending_losses.append((loss.detach(), self.global_step, batch_idx))
        if len(self._pending_losses) >= 1000:  # a bound on what is kept between logs
            self._check_losses()  # every rank reaches it at the same step

    def _check_losses(self) -> None:
        """Check the losses kept by ``_watch_loss``: one read, and one all-reduce when
        several processes train (each calls this at the same points)."""
        if not self._pending_losses and not self.env.distributed:
            return
        pending, self._pending_losses = self._pending_losses, []
        first = None
        if pending:
            finite = torch.stack([loss.float().reshape(()) for loss, _, _ in pending])
            finite = finite.isfinite()
            if not bool(finite.all()):
                first = int((~finite).nonzero()[0])
        if any_rank(first is not None, self.env, self.device):
            if first is None:
                raise NonFiniteLossError(
                    "the training loss became NaN or infinite in another process; training "
                    "stopped. Lower the learning rate, look for NaN or inf in the data, or "
                    "clip gradients (gradient_clip_val)")
            loss, step, batch_idx = pending[first]
            self._nonfinite_loss(float(loss), batch_idx, step)

    def _nonfinite_loss(self, value: float, batch_idx: int, step: int | None = None) -> None:
        step = self.global_step if step is None else step
        raise NonFiniteLossError(
            f"the training loss is {value} at step {step} (epoch {self.current_epoch}, "
            f"batch {batch_idx}); training stopped. Lower the learning rate, look for NaN or "
            f"inf in the data, or clip gradients (gradient_clip_val)")

    def _set_epoch(self, loader: Any) -> None:
        """Tell the loader (or its sampler, for DDP) which epoch's order to use."""
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.current_epoch)
            return
        for sampler in (getattr(loader, "sampler", None),
                        getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.current_epoch)

    def _check_hparams(self, module: Module) -> None:
        """Hyperparameters that no checkpoint can hold, refused before the first epoch
        rather than at the first save."""
        if not any(isinstance(c, ModelCheckpoint) for c in self.callbacks):
            return
        try:
            ckpt.check_plain(dict(module.hparams), f"{type(module).__name__}.hparams")
        except ConfigError as e:
            raise ConfigError(f"{e}; checkpoints cannot hold it: leave it out with "
                              f"save_hyperparameters(ignore=[...])") from None

    # ------------------------------------------------------------------ evaluation

    def _evaluate(self, stage: str, loader: Any) -> dict[str, float]:
        """One pass of validation, test or predict; returns the epoch metrics."""
        module, prefix = self.module, _HOOK_PREFIX[stage]
        loaders = loader if isinstance(loader, (list, tuple)) else [loader]
        was_training = module.training
        module.eval()
        self.metrics.reset(stage)
        limits = [_limit(_length(dl), self.limits[stage], f"limit_{stage}_batches")
                  for dl in loaders]
        if stage == "validate":
            self.num_val_batches = limits
        elif stage == "test":
            self.num_test_batches = limits
        elif stage == "predict":
            self.num_predict_batches = limits
        self._call(f"{prefix}_start")
        self._call(f"{prefix}_epoch_start")
        step = getattr(module, _STEP_METHOD[stage])
        predictions: list[Any] = []
        with torch.no_grad():
            for loader_idx, (dl, limit) in enumerate(zip(loaders, limits, strict=True)):
                for batch_idx, batch in enumerate(dl):
                    if batch_idx >= limit:
                        break
                    batch = self._transfer(batch, loader_idx)
                    self.metrics.batch_size = _batch_size(batch)
                    with self.precision_plugin.autocast():
                        outputs = step(batch, batch_idx)
                    if stage == "predict":
                        predictions.append(outputs)
                    self._call(f"{prefix}_batch_end", outputs, batch, batch_idx)
        results = self.metrics.end_epoch(self.env)
        self._call(f"{prefix}_epoch_end")
        self._call(f"{prefix}_end")
        module.train(was_training)
        self._predictions = predictions
        return results

    def _run_eval(self, stage: str, model: Module, datamodule: Any, dataloaders: Any,
                  ckpt_path: str | os.PathLike | None) -> dict[str, float]:
        if datamodule is None and dataloaders is None:
            raise ConfigError(f"{stage} needs a datamodule or dataloaders")
        with self._session(stage, model, datamodule):
            checkpoint = self._resolve_ckpt(ckpt_path)
            if checkpoint is not None:
                load_weights(model, checkpoint, self._ckpt_source)
            loader = dataloaders if dataloaders is not None else getattr(
                datamodule, {"validate": "val", "test": "test", "predict": "predict"}[stage]
                + "_dataloader")()
            if isinstance(loader, list) and not loader:
                raise ConfigError(f"the DataModule has no {stage} split configured")
            results = self._evaluate(stage, loader)
            if stage != "predict":
                self._log(results)
                if self.is_global_zero:
                    for logger in self.loggers:
                        logger.save()
            return results

    def validate(self, model: Module, datamodule: Any = None, *, dataloaders: Any = None,
                 ckpt_path: str | os.PathLike | None = None) -> list[dict[str, float]]:
        """Run the validation split; returns [metrics] as Lightning does."""
        return [self._run_eval("validate", model, datamodule, dataloaders, ckpt_path)]

    def test(self, model: Module, datamodule: Any = None, *, dataloaders: Any = None,
             ckpt_path: str | os.PathLike | None = None) -> list[dict[str, float]]:
        """Run the test split; returns [metrics] as Lightning does."""
        return [self._run_eval("test", model, datamodule, dataloaders, ckpt_path)]

    def predict(self, model: Module, datamodule: Any = None, *, dataloaders: Any = None,
                ckpt_path: str | os.PathLike | None = None) -> list[Any]:
        """The outputs of ``predict_step`` for every batch of the predict split."""
        self._run_eval("predict", model, datamodule, dataloaders, ckpt_path)
        return self._predictions

    # ------------------------------------------------------------------ facts

    @property
    def current_epoch(self) -> int:
        return self.progress.epoch

    @property
    def global_step(self) -> int:
        return self.progress.global_step

    @property
    def scaler(self) -> torch.amp.GradScaler:
        return self.precision_plugin.scaler

    @property
    def is_global_zero(self) -> bool:
        return self.env.is_global_zero

    @property
    def global_rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (``obj`` itself in a single process)."""
        return broadcast(obj, self.env, src)

    @property
    def logger(self) -> Any:
        return self.loggers[0] if self.loggers else None

    @property
    def log_dir(self) -> Path:
        return Path(self.logger.log_dir) if self.logger is not None else self.default_root_dir

    @property
    def callback_metrics(self) -> dict[str, torch.Tensor]:
        return self.metrics.callback_metrics

    @property
    def progress_bar_metrics(self) -> dict[str, float]:
        return self.metrics.progress_bar_metrics()

    # ------------------------------------------------------------------ hooks

    def _call(self, hook: str, *args: Any) -> None:
        """Callbacks' ``hook`` (only those that define it), then the module's."""
        callbacks = self._hooks.get(hook)
        if callbacks is None:
            base = getattr(Callback, hook)
            callbacks = [c for c in self.callbacks if getattr(type(c), hook, base) is not base]
            self._hooks[hook] = callbacks
        for callback in callbacks:
            getattr(callback, hook)(self, self.module, *args)
        if hook not in _CALLBACK_ONLY:
            module_hook = getattr(self.module, hook, None)
            if module_hook is not None:
                module_hook(*args)

    def _log(self, metrics: dict[str, float]) -> None:
        if metrics and self.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.global_step)

    # ------------------------------------------------------------------ set-up

    @contextlib.contextmanager
    def _session(self, stage: str, module: Module, datamodule: Any) -> Iterator[None]:
        if not isinstance(module, Module):
            raise ConfigError(f"the model must be a datapipe.Module, got {type(module).__name__}")
        self.stage, self.module, self.datamodule = stage, module, datamodule
        self.data_card = None  # of this run's datamodule, made once it is set up
        if self.seed is not None:
            seed_everything(self.seed)
        if self.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        self.env.init(self.device)
        object.__setattr__(module, "_trainer", self)
        module.to(self.device)
        try:
            self._prepare_data(datamodule, stage)
            self._call("setup", stage)
            yield
            status = "success"
        except BaseException as e:
            status = "failed"
            self._call("on_exception", e)
            raise
        finally:
            self._call("teardown", stage)
            if self.is_global_zero:
                for logger in self.loggers:
                    logger.finalize(status)
            if datamodule is not None and hasattr(datamodule, "teardown"):
                datamodule.teardown(stage)

    def _prepare_data(self, datamodule: Any, stage: str) -> None:
        """prepare_data on one process per node (or one in all), then setup on each."""
        if datamodule is None:
            return
        per_node = getattr(datamodule, "prepare_data_per_node", True)
        preparer = self.env.local_rank == 0 if per_node else self.env.is_global_zero
        error = None
        if preparer and hasattr(datamodule, "prepare_data"):
            try:
                datamodule.prepare_data()
            except Exception as e:  # reported to every rank before anyone raises
                error = e
        all_ok_or_raise(self.env, error, "prepare_data")
        datamodule.setup(stage)
        if hasattr(datamodule, "recipe"):
            from datapipe.card import data_card

            self.data_card = data_card(datamodule)

    def _transfer(self, batch: Any, dataloader_idx: int = 0) -> Any:
        dm = self.datamodule
        if dm is None or not hasattr(dm, "transfer_batch_to_device"):
            return _move(batch, self.device)
        batch = dm.on_before_batch_transfer(batch, dataloader_idx)
        batch = dm.transfer_batch_to_device(batch, self.device, dataloader_idx)
        return dm.on_after_batch_transfer(batch, dataloader_idx)

    def _configure_optimizers(self, module: Module) -> None:
        config = module.configure_optimizers()
        scheduler = None
        if isinstance(config, dict):
            optimizer, scheduler = config.get("optimizer"), config.get("lr_scheduler")
        elif isinstance(config, (list, tuple)):
            if len(config) == 2 and not isinstance(config[0], (list, tuple)):
                optimizer, scheduler = config
            elif len(config) == 2 and len(config[0]) == 1:
                optimizer = config[0][0]
                scheduler = config[1][0] if config[1] else None
            elif len(config) == 1:
                optimizer = config[0]
            else:
                raise ConfigError("configure_optimizers returned several optimizers; the "
                                  "Trainer steps one (combine parameter groups instead)")
        else:
            optimizer = config
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"configure_optimizers must return an optimizer, got "
                              f"{type(optimizer).__name__}")
        self.optimizers = [optimizer]
        self.lr_scheduler_configs = []
        if scheduler is not None:
            if not isinstance(scheduler, dict):
                scheduler = {"scheduler": scheduler}
            self.lr_scheduler_configs = [{"interval": "epoch", "frequency": 1, **scheduler}]

    def _attach(self, module: Module) -> None:
        """Wrap the module for gradient sync across processes (DDP) when there are several."""
        self._runner = None
        if self.env.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self._runner = DistributedDataParallel(_StepRunner(module), device_ids=ids)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Write everything needed to continue this run exactly (global rank 0 writes)."""
        if not self.is_global_zero:
            return
        checkpoint = ckpt.capture(self, module_name(self.module))
        for callback in self.callbacks:
            callback.on_save_checkpoint(self, self.module, checkpoint)
        self.module.on_save_checkpoint(checkpoint)
        ckpt.save(checkpoint, path)

    def _resolve_ckpt(self, ckpt_path: str | os.PathLike | None) -> dict[str, Any] | None:
        self.ckpt_path = None
        if ckpt_path is None:
            return None
        if ckpt_path == "last":
            found = ckpt.find_last(self.default_root_dir)
            if found is None:
                raise ConfigError(f"ckpt_path='last' but no checkpoint exists under "
                                  f"{self.default_root_dir}")
            ckpt_path = found
        elif ckpt_path == "best":
            best = [c.best_model_path for c in self.callbacks
                    if isinstance(c, ModelCheckpoint) and c.best_model_path]
            if not best:
                raise ConfigError("ckpt_path='best' but no checkpoint callback saved a best model")
            ckpt_path = best[0]
        # On the CPU: RNG states must stay CPU tensors; weights and optimizer state
        # move to the module's device as they are loaded.
        self._ckpt_source = ckpt_path
        self.ckpt_path = os.path.abspath(ckpt_path)
        return ckpt.load(ckpt_path, map_location="cpu")


# ---------------------------------------------------------------------- helpers


class _StepRunner(nn.Module):
    """Lets DistributedDataParallel run ``training_step``: DDP hooks into ``forward``."""

    def __init__(self, module: Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, method: str, *args: Any) -> Any:
        return getattr(self.module, method)(*args)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_options(*, max_epochs: Any, max_steps: Any, seed: Any, gradient_clip_val: Any,
                   check_val_every_n_epoch: Any, log_every_n_steps: Any) -> None:
    """Refuse the values that would train nothing, forever, or on NaN without a word."""
    if max_epochs is not None and (not _is_int(max_epochs) or max_epochs < -1):
        raise ConfigError(f"max_epochs must be an integer >= 0 (or -1: no limit), "
                          f"got {max_epochs!r}")
    if not _is_int(max_steps) or max_steps < -1:
        raise ConfigError(f"max_steps must be an integer >= 0 (or -1: no limit), "
                          f"got {max_steps!r}")
    if seed is not None and (not _is_int(seed) or not 0 <= seed <= MAX_SEED):
        raise ConfigError(f"seed must be an integer in 0..{MAX_SEED}, got {seed!r}")
    if gradient_clip_val is not None and (
            isinstance(gradient_clip_val, bool) or not isinstance(gradient_clip_val, (int, float))
            or not math.isfinite(gradient_clip_val) or gradient_clip_val < 0):
        raise ConfigError(f"gradient_clip_val must be a finite number >= 0, "
                          f"got {gradient_clip_val!r}")
    for name, value in (("check_val_every_n_epoch", check_val_every_n_epoch),
                        ("log_every_n_steps", log_every_n_steps)):
        if not _is_int(value) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _limit(total: int | float, limit: int | float | None, name: str) -> int | float:
    """How many batches of ``total`` to run under a limit_* option."""
    if limit is None:
        return total
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit < 0:
        raise ConfigError(f"{name} must be a count or a fraction in [0, 1], got {limit!r}")
    if isinstance(limit, float):
        if limit > 1:
            raise ConfigError(f"{name}={limit} is a fraction above 1; give a count as an int")
        return int(total * limit) if math.isfinite(total) else total
    return min(total, limit)


def _length(loader: Any) -> int | float:
    try:
        return len(loader)
    except TypeError:  # an iterable loader without a length
        return math.inf


def _batch_size(batch: Any) -> int:
    first = batch
    while isinstance(first, (list, tuple)) and first:
        first = first[0]
    if isinstance(first, dict) and first:
        first = next(iter(first.values()))
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _move(v, device) for k, v in batch.items()}
    return batch


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators (Lightning's name for it)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
