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

A checkpoint names its Module class by a registered name, never by an import path, so
reading one cannot make datapipe import or call anything it names:

    @datapipe.register_module("my-classifier")
    class Classifier(datapipe.Module): ...

    model = Classifier.load_from_checkpoint("last.ckpt")   # the class, given in Python
    model = datapipe.load_module("last.ckpt")              # the class, from the registry

The registry holds the zoo's ``image-classifier``, classes registered with the decorator
(in your code or a ``--recipes`` file) and the ``datapipe.modules`` entry-point group of
installed packages (an entry point is loaded only when its name is asked for).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

import datapipe.trainer.checkpoint as ckpt
from datapipe.errors import ConfigError
from datapipe.naming import Registry, load_declared

if TYPE_CHECKING:
    from datapipe.trainer.trainer import Trainer

ENTRY_POINT_GROUP = "datapipe.modules"
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
# The zoo's module, declared as data so this module never imports the zoo that uses it.
BUILTINS = {"image-classifier": "datapipe.models:ImageClassifier"}
_modules: Registry[type] = Registry(ENTRY_POINT_GROUP, BUILTINS)
M = TypeVar("M", bound="Module")


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

    def save_hyperparameters(self, *names: str, ignore: str | list[str] = ()) -> None:
        """Record the caller's ``__init__`` arguments (or those named) in ``self.hparams``.

        They go into checkpoints, so ``load_from_checkpoint`` and ``datapipe test`` can
        rebuild the module with ``type(module)(**hparams)``. Checkpoints hold plain data
        only: leave out arguments that are objects (a net, a loss) with ``ignore=``.
        """
        frame = inspect.currentframe().f_back
        args = inspect.getargvalues(frame)
        values = {n: args.locals[n] for n in args.args if n != "self"}
        if args.keywords:
            values.update(args.locals[args.keywords])
        skip = {ignore} if isinstance(ignore, str) else set(ignore)
        self.hparams.update({n: _plain_scalar(values[n]) for n in (names or values)
                             if n not in skip})

    @classmethod
    def load_from_checkpoint(cls: type[M], path: str | Path, map_location: Any = "cpu",
                             **overrides: Any) -> M:
        """This class rebuilt from a checkpoint's hparams (``overrides`` win), its weights
        loaded. The class is the one you call this on, whatever the file names."""
        saved = ckpt.load(path, map_location=map_location)
        return build_from_checkpoint(cls, saved, path, overrides)

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
        """Step the optimizer; override to warm up, or to step only some of the time.

        Called in every precision. Under ``16-mixed`` the optimizer given is a
        ``datapipe.trainer.precision.ScaledOptimizer``: its ``step()`` goes through the
        gradient scaler, as Lightning's precision plugin does.
        """
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


def _plain_scalar(value: Any) -> Any:
    """A numpy scalar (an lr from a sweep, say) as the Python number checkpoints hold."""
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


# ---------------------------------------------------------------------- the registry


def register_module(name: str) -> Callable[[type[M]], type[M]]:
    """Class decorator: checkpoints of this Module subclass name it ``name``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"module name {name!r} must be lowercase letters, digits and "
                          f"'-', '_', '.' (at most 64)")

    def add(cls: type[M]) -> type[M]:
        if not (isinstance(cls, type) and issubclass(cls, Module)):
            raise ConfigError(f"register_module({name!r}) takes a datapipe.Module subclass, "
                              f"not {cls!r}")
        known = _modules.get(name)
        # The same class defined again (a re-imported file) replaces itself quietly.
        if known is not None and _ident(known) != _ident(cls):
            raise ConfigError(f"a module named {name!r} is already registered "
                              f"({_ident(known)}); choose another name")
        _modules.add(name, cls, _ident(cls))
        return cls

    return add


def _ident(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _builtins() -> None:
    """Register the built-ins (importing them the first time; a clash is an error)."""
    for name, entry in _modules.declared(installed=False).items():
        register_module(name)(load_declared(entry, ConfigError))


def list_modules() -> list[str]:
    """The names a checkpoint's module may have: registered, or offered by entry points."""
    _builtins()
    return _modules.names()


def module_name(module: Module | type) -> str | None:
    """The name ``module``'s class is registered under, or None."""
    _builtins()
    cls = module if isinstance(module, type) else type(module)
    return next((n for n, c in _modules.items() if c is cls), None)


def module_class(name: str) -> type[Module]:
    """The Module class registered as ``name``; ConfigError naming the known ones."""
    _builtins()
    if name not in _modules:
        entry = _modules.declared().get(name)
        if entry is not None:
            cls = load_declared(entry, ConfigError)
            if name not in _modules:  # loading may have registered it already
                register_module(name)(cls)
    if name not in _modules:
        known = list_modules()
        raise ConfigError(f"unknown module {name!r}{_modules.suggest(name)} (known: "
                          f"{', '.join(known)}; register yours with "
                          f"@datapipe.register_module(NAME) in a --recipes file)")
    return _modules.get(name)


def saved_class(saved: dict[str, Any], path: Any) -> type[Module]:
    """The registered class a checkpoint names; a previous-format file's class path is
    matched against registered classes only (nothing is imported)."""
    name = saved.get("module")
    if name is not None:
        return module_class(name)
    legacy = saved.get("legacy_module_class")
    if legacy is not None:
        _builtins()
        dotted = legacy.replace(":", ".")
        for _, cls in _modules.items():
            if _ident(cls) == dotted:
                return cls
    kind = saved.get("module_type", "an unregistered class")
    raise ConfigError(f"checkpoint {path} was saved from {kind}, which is not a registered "
                      f"module (known: {', '.join(list_modules())}); decorate the class with "
                      f"@datapipe.register_module(NAME), or call "
                      f"YourClass.load_from_checkpoint(path) in Python")


def load_module(path: str | Path, map_location: Any = "cpu", **overrides: Any) -> Module:
    """The Module a checkpoint holds: its registered class, rebuilt from its hparams."""
    saved = ckpt.load(path, map_location=map_location)
    return build_from_checkpoint(saved_class(saved, path), saved, path, overrides)


def build_from_checkpoint(cls: type[M], saved: dict[str, Any], path: Any,
                          overrides: Mapping[str, Any] | None = None) -> M:
    """``cls(**hparams)`` with the checkpoint's weights; the hparams are plain data."""
    hparams = {**saved["hparams"], **(overrides or {})}
    what = f"{cls.__name__} (from checkpoint {path})"
    # Built on the meta device first, so sizes read from the file (hidden=10**12) cost
    # no memory until the weights in the file are known to fit them.
    try:
        with torch.device("meta"):
            probe = _construct(cls, hparams, what)
    except ConfigError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if not isinstance(e, NotImplementedError) and "meta" not in first.lower():
            # e.g. "Storage size calculation overflowed": sizes no real build survives
            raise ConfigError(f"{what} cannot be built from the checkpoint's hparams: "
                              f"{type(e).__name__}: {first}") from None
        probe = None  # a module that needs real tensors to be built: no probe
    if probe is not None:
        _check_fits(probe, saved["state_dict"], what)
    module = _construct(cls, hparams, what)
    load_weights(module, saved, path)
    return module


def _construct(cls: type[M], hparams: dict[str, Any], what: str) -> M:
    try:
        module = cls(**hparams)
    except (TypeError, ValueError) as e:  # hparams of the wrong kind (ConfigError too)
        raise ConfigError(f"{what} cannot be built from the checkpoint's hparams: {e}") from None
    if not isinstance(module, Module):
        raise ConfigError(f"{what} is not a datapipe.Module")
    return module


def _check_fits(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in state.items()}
    if shapes != saved:
        diff = sorted(set(shapes) ^ set(saved)) or sorted(
            k for k in shapes if shapes[k] != saved[k])
        first = diff[0]
        raise ConfigError(f"the checkpoint's weights do not fit {what}: {first} is "
                          f"{saved.get(first, 'missing')} in the file, "
                          f"{shapes.get(first, 'missing')} in the module")


def load_weights(module: Module, saved: dict[str, Any], path: Any = "") -> None:
    """Load a checkpoint's state dict into ``module``; ConfigError if it does not fit."""
    try:
        module.load_state_dict(saved["state_dict"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ConfigError(f"the checkpoint does not fit {type(module).__name__} "
                          f"(saved from {saved.get('module') or saved.get('module_type')}): "
                          f"{first}") from None
    module.on_load_checkpoint(saved)
