"""Small image classifiers sized from the data, and a Module that trains them.

    net = create_model("lenet", num_classes=10, in_channels=1, image_size=28)
    model = ImageClassifier.from_datamodule(dm, model="resnet18", lr=0.1, optimizer="sgd")

Models are swapped by name: ``create_model`` looks the name up in a registry of
builder functions (``list_models()``; add one with ``register_model``). Every size
is known at construction (no Lazy modules), so a checkpoint's state dict loads into
``ImageClassifier(**hparams)`` without a forward pass first.

torch is imported here; torchvision only inside the ResNet builder, because importing
it costs seconds.
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from datapipe.errors import ConfigError
from datapipe.naming import suggest
from datapipe.trainer.module import Module

__all__ = ["ImageClassifier", "create_model", "list_models", "register_model"]

Builder = Callable[..., nn.Module]

# Builders take (num_classes, in_channels, height, width) and keyword-only options.
_MODELS: dict[str, Builder] = {}

_STANDARD_ARGS = ("num_classes", "in_channels", "height", "width")


def register_model(name: str, builder: Builder | None = None):
    """Register ``builder(num_classes, in_channels, height, width, **options)`` as ``name``.

    Usable as a decorator (``@register_model("mynet")``). Options are keyword-only
    parameters of the builder; ``create_model`` rejects any other keyword.
    """

    def add(fn: Builder) -> Builder:
        if name in _MODELS and _MODELS[name] is not fn:
            raise ConfigError(f"a model named {name!r} is already registered; choose another name")
        _MODELS[name] = fn
        return fn

    return add if builder is None else add(builder)


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_MODELS)


def _size_hw(image_size: Any) -> tuple[int, int]:
    """``28`` or ``(28, 28)`` (a list, as read back from JSON, too) -> (height, width)."""
    if isinstance(image_size, (list, tuple)) and len(image_size) == 2:
        height, width = image_size
    elif isinstance(image_size, (list, tuple)):
        raise ConfigError(f"image_size must be one int or (height, width); got {image_size!r}")
    else:
        height = width = image_size
    for value in (height, width):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(
                f"image_size must be a positive int or (height, width) of them; got {image_size!r}"
            )
    return height, width


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int; got {value!r}")
    return value


def _unknown(kind: str, name: Any, known: list[str]) -> ConfigError:
    return ConfigError(f"unknown {kind} {name!r}{suggest(name, known)} (known: {', '.join(known)})")


def create_model(
    name: str,
    num_classes: int,
    in_channels: int,
    image_size: int | tuple[int, int],
    **kwargs: Any,
) -> nn.Module:
    """Build the registered model ``name`` for images of ``in_channels`` x ``image_size``.

    ``image_size`` is one int (square) or ``(height, width)``. ``kwargs`` are the
    model's options (``mlp``: ``hidden``, ``dropout``; ``lenet``: ``batchnorm``;
    ``resnet18``: ``small_stem``). Unknown names and options raise ``ConfigError``.
    """
    if name not in _MODELS:
        raise _unknown("model", name, list_models())
    builder = _MODELS[name]
    num_classes = _positive_int("num_classes", num_classes)
    in_channels = _positive_int("in_channels", in_channels)
    height, width = _size_hw(image_size)
    options = [
        p.name for p in inspect.signature(builder).parameters.values()
        if p.name not in _STANDARD_ARGS and p.kind is not p.VAR_KEYWORD
    ]
    takes_any = any(
        p.kind is p.VAR_KEYWORD for p in inspect.signature(builder).parameters.values()
    )
    extra = sorted(set(kwargs) - set(options))
    if extra and not takes_any:
        have = f"its options: {', '.join(options)}" if options else "it takes none"
        raise ConfigError(f"model {name!r} has no option {', '.join(map(repr, extra))} ({have})")
    return builder(num_classes, in_channels, height, width, **kwargs)


# ---------------------------------------------------------------------- the zoo


@register_model("mlp")
def _mlp(
    num_classes: int, in_channels: int, height: int, width: int,
    *, hidden: int = 256, dropout: float = 0.0,
) -> nn.Module:
    """flatten -> Linear(C*H*W, hidden) -> ReLU -> Dropout -> Linear(hidden, hidden) -> ReLU
    -> Linear(hidden, num_classes). ``dropout=0`` keeps the layer (a no-op) so the state
    dict's keys never depend on it."""
    hidden = _positive_int("hidden", hidden)
    if not 0.0 <= float(dropout) < 1.0:
        raise ConfigError(f"dropout must be in [0, 1); got {dropout!r}")
    return nn.Sequential(OrderedDict(
        flatten=nn.Flatten(),
        fc1=nn.Linear(in_channels * height * width, hidden),
        relu1=nn.ReLU(inplace=True),
        dropout=nn.Dropout(float(dropout)),
        fc2=nn.Linear(hidden, hidden),
        relu2=nn.ReLU(inplace=True),
        fc3=nn.Linear(hidden, num_classes),
    ))


_LENET_MIN_SIZE = 12  # smallest side whose feature map survives both convs and pools


@register_model("lenet")
def _lenet(
    num_classes: int, in_channels: int, height: int, width: int, *, batchnorm: bool = False,
) -> nn.Module:
    """LeNet-5 with ReLU and max pooling: conv 5x5 pad 2 (6) -> pool -> conv 5x5 (16) -> pool
    -> fc 120 -> fc 84 -> fc num_classes. The flatten size follows from the image size
    (16*5*5 = 400 at 28x28, 16*6*6 = 576 at 32x32)."""
    if min(height, width) < _LENET_MIN_SIZE:
        raise ConfigError(
            f"lenet needs images of at least {_LENET_MIN_SIZE}x{_LENET_MIN_SIZE} px; "
            f"got {height}x{width} (use mlp for smaller inputs)"
        )

    def after(side: int) -> int:  # conv1 keeps the size, pool halves, conv2 takes 4, pool halves
        return (side // 2 - 4) // 2

    def norm(channels: int) -> nn.Module:
        return nn.BatchNorm2d(channels) if batchnorm else nn.Identity()

    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(in_channels, 6, kernel_size=5, padding=2),
        bn1=norm(6),
        relu1=nn.ReLU(inplace=True),
        pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(6, 16, kernel_size=5),
        bn2=norm(16),
        relu2=nn.ReLU(inplace=True),
        pool2=nn.MaxPool2d(2),
        flatten=nn.Flatten(),
        fc1=nn.Linear(16 * after(height) * after(width), 120),
        relu3=nn.ReLU(inplace=True),
        fc2=nn.Linear(120, 84),
        relu4=nn.ReLU(inplace=True),
        fc3=nn.Linear(84, num_classes),
    ))


_SMALL_IMAGE = 64  # up to this side, ResNets get the CIFAR stem


@register_model("resnet18")
def _resnet18(
    num_classes: int, in_channels: int, height: int, width: int, *, small_stem: bool | None = None,
) -> nn.Module:
    """torchvision's ResNet-18, untrained. Images up to 64 px get the CIFAR stem (conv1 3x3
    stride 1, no max pool), larger ones the ImageNet stem (7x7 stride 2 + max pool) with
    conv1 taking ``in_channels``. ``small_stem`` forces one or the other."""
    from torchvision.models import resnet18  # lazily: importing torchvision takes seconds

    net = resnet18(weights=None, num_classes=num_classes)
    if small_stem is None:
        small_stem = max(height, width) <= _SMALL_IMAGE
    if small_stem:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    else:
        return net
    # the new conv gets the init torchvision gives its convs
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    return net


# ---------------------------------------------------------------------- the Module

_OPTIMIZERS = ("adam", "adamw", "sgd")
_SCHEDULERS = ("cosine",)
_DEFAULT_MAX_EPOCHS = 10  # cosine schedule length when no Trainer says otherwise


def _positive_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0; got {value!r}")
    return float(value)


class ImageClassifier(Module):
    """Cross-entropy image classifier around a registry model (or any ``nn.Module``).

    ``model`` names a registered model (``list_models()``), built for ``num_classes``
    classes of ``in_channels`` x ``image_size`` images; extra keywords are its options
    (e.g. ``hidden=512`` for ``mlp``). ``optimizer`` is ``adam``, ``adamw`` or ``sgd``
    (momentum 0.9), with ``lr`` and ``weight_decay``; ``scheduler="cosine"`` anneals the
    learning rate over the Trainer's ``max_epochs`` (10 without a Trainer), per epoch.

    ``save_hyperparameters()`` records the arguments, so a checkpoint rebuilds the
    module with ``ImageClassifier(**hparams)``. ``net=`` wraps your own module instead
    (``model`` and model options are then ignored / refused): its hyperparameters record
    only the net's class name, so rebuilding from them raises ``ConfigError``; build
    ``ImageClassifier(net=YourNet(...), ...)`` again and load the state dict into it.

    The net must output logits of shape (batch, num_classes); this is checked at
    construction with one zero image of ``in_channels`` x ``image_size``.
    ``predict_step`` returns predicted class indices (a LongTensor of shape (batch,));
    for probabilities use ``model(x).softmax(1)``.
    """

    def __init__(
        self,
        model: str = "lenet",
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int | tuple[int, int] = 28,
        lr: float = 1e-3,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        scheduler: str | None = None,
        net: nn.Module | None = None,
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if isinstance(net, str):  # hparams of a classifier that wrapped a custom net
            raise ConfigError(
                f"this classifier wrapped a custom net ({net}) that hyperparameters cannot "
                "rebuild; construct ImageClassifier(net=...) yourself and load the state dict"
            )
        if net is not None and not isinstance(net, nn.Module):
            raise ConfigError(f"net must be a torch nn.Module; got {type(net).__name__}")
        if net is not None and model_kwargs:
            raise ConfigError(
                f"model options {', '.join(sorted(model_kwargs))} apply to registry models, "
                "not to net=; configure your net before passing it"
            )
        if not isinstance(optimizer, str) or optimizer.lower() not in _OPTIMIZERS:
            raise _unknown("optimizer", optimizer, list(_OPTIMIZERS))
        if scheduler is not None and (
            not isinstance(scheduler, str) or scheduler.lower() not in _SCHEDULERS
        ):
            raise _unknown("scheduler", scheduler, list(_SCHEDULERS))
        _positive_number("lr", lr)
        if weight_decay != 0:
            _positive_number("weight_decay", weight_decay)

        self.num_classes = _positive_int("num_classes", num_classes)
        self.in_channels = _positive_int("in_channels", in_channels)
        self.image_size = _size_hw(image_size)
        if net is None:
            self.net = create_model(
                model, num_classes, in_channels, self.image_size, **model_kwargs
            )
        else:
            self.net = net
            cls = type(net)
            self.hparams["net"] = f"{cls.__module__}.{cls.__qualname__}"
        self._check_output_size()

    @classmethod
    def from_datamodule(cls, dm: Any, model: str = "lenet", **kwargs: Any) -> ImageClassifier:
        """A classifier sized from ``dm.num_classes`` and ``dm.dims`` ((C, H, W), or (H, W)
        for one channel); ``kwargs`` go to ``__init__`` and win over the data's sizes."""
        dims = tuple(dm.dims)
        if len(dims) == 2:
            dims = (1, *dims)
        if len(dims) != 3:
            raise ConfigError(
                f"{getattr(dm, 'name', 'the data')} has dims {dims}; an image classifier "
                "needs (channels, height, width)"
            )
        channels, height, width = dims
        kwargs.setdefault("num_classes", dm.num_classes)
        kwargs.setdefault("in_channels", channels)
        kwargs.setdefault("image_size", height if height == width else (height, width))
        return cls(model=model, **kwargs)

    def _check_output_size(self) -> None:
        """One zero image through the net: logits must be (1, num_classes)."""
        params = [t for t in (*self.net.parameters(), *self.net.buffers()) if t.is_floating_point()]
        device = params[0].device if params else torch.device("cpu")
        dtype = params[0].dtype if params else torch.float32
        if device.type == "meta":
            return  # nothing to run on
        modes = {m: m.training for m in self.net.modules()}
        self.net.eval()  # batch norm cannot train on a batch of one
        try:
            with torch.no_grad():
                out = self._meta_forward(dtype)
                if out is None:
                    out = self.net(torch.zeros(1, self.in_channels, *self.image_size,
                                               device=device, dtype=dtype))
        except (RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(
                f"the model fails on one {self.in_channels}x{self.image_size[0]}x"
                f"{self.image_size[1]} image ({first}); check in_channels and image_size"
            ) from err
        finally:
            for module, training in modes.items():
                module.training = training
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigError(
                f"the model outputs {shape} for one image; ImageClassifier needs logits "
                "of shape (batch, num_classes)"
            )
        if out.shape[1] != self.num_classes:
            raise ConfigError(
                f"the model outputs {out.shape[1]} classes but the data has "
                f"{self.num_classes}; build it with num_classes={self.num_classes}"
            )

    def _meta_forward(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The net's output for one image on the meta device (shapes only, no memory: an
        image_size read from a checkpoint costs nothing); None where the net cannot run
        there, or fails there (the real run then gives the error)."""
        meta = {name: torch.empty_like(t, device="meta") for name, t in
                (*self.net.named_parameters(), *self.net.named_buffers())}
        try:
            return torch.func.functional_call(self.net, meta, (torch.zeros(
                1, self.in_channels, *self.image_size, device="meta", dtype=dtype),))
        except Exception:
            return None

    # ------------------------------------------------------------------ steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self(x)
        except RuntimeError as err:  # explain the usual causes in one line
            expected = (self.in_channels, *self.image_size)
            if not x.is_floating_point():
                raise ConfigError(
                    f"the batch holds {x.dtype} images; the model needs floats "
                    "(normalize the data, e.g. DataModule(normalize=True))"
                ) from err
            if tuple(x.shape[1:]) != expected:
                raise ConfigError(
                    f"the model was built for {'x'.join(map(str, expected))} images but the "
                    f"batch has {'x'.join(map(str, x.shape[1:]))}; build it with the data's "
                    "in_channels and image_size (ImageClassifier.from_datamodule)"
                ) from err
            raise

    def _check_labels(self, logits: torch.Tensor, y: torch.Tensor, batch_idx: int) -> None:
        """Labels beyond the logits: a ConfigError instead of cross_entropy's IndexError (or,
        on CUDA, a device-side assert that kills the process). Checked on every CPU batch
        and on the first batch of each epoch elsewhere, which avoids a sync per step."""
        n = logits.shape[-1]
        if y.is_floating_point():  # soft targets (mixup, label smoothing done by hand)
            if y.shape != logits.shape:
                raise ConfigError(
                    f"the model outputs {n} classes but the targets have shape "
                    f"{tuple(y.shape)}; expected {tuple(logits.shape)}"
                )
            return
        if y.numel() == 0 or (y.device.type != "cpu" and batch_idx != 0):
            return
        top = int(y.max())
        if top >= n:
            raise ConfigError(
                f"the model outputs {n} classes but the data has at least {top + 1} "
                f"(label {top}); build it with the data's num_classes "
                "(ImageClassifier.from_datamodule)"
            )

    def _shared_step(self, batch: Any, batch_idx: int, stage: str, prog_bar: bool) -> torch.Tensor:
        x, y = batch[0], batch[1]
        logits = self._logits(x)
        self._check_labels(logits, y, batch_idx)
        loss = F.cross_entropy(logits, y)
        with torch.no_grad():
            target = y.argmax(-1) if y.is_floating_point() else y
            acc = (logits.argmax(-1) == target).float().mean()
        size = x.shape[0]
        if stage == "train":
            self.log("train_loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=True,
                     batch_size=size)
            self.log("train_acc", acc, on_step=False, on_epoch=True, batch_size=size)
        else:
            self.log(f"{stage}_loss", loss.detach(), prog_bar=prog_bar, batch_size=size)
            self.log(f"{stage}_acc", acc, prog_bar=prog_bar, batch_size=size)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Cross-entropy of ``(x, y)``; logs ``train_loss`` (per step and epoch) and
        ``train_acc`` (per epoch)."""
        return self._shared_step(batch, batch_idx, "train", prog_bar=True)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Logs ``val_loss`` and ``val_acc`` (epoch means, on the progress bar)."""
        return self._shared_step(batch, batch_idx, "val", prog_bar=True).detach()

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Logs ``test_loss`` and ``test_acc``."""
        return self._shared_step(batch, batch_idx, "test", prog_bar=False).detach()

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Predicted class indices, a LongTensor of shape (batch,). ``batch`` is the
        images or a tuple/list whose first item is the images."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self._logits(x).argmax(-1)

    # ------------------------------------------------------------------ optimization

    def _max_epochs(self) -> int:
        trainer = self._trainer
        epochs = getattr(trainer, "max_epochs", None) if trainer is not None else None
        if isinstance(epochs, int) and not isinstance(epochs, bool) and epochs > 0:
            return epochs
        return _DEFAULT_MAX_EPOCHS  # no trainer, or unbounded (None / -1)

    def configure_optimizers(self) -> Any:
        """The optimizer; with ``scheduler="cosine"``, ``{"optimizer": opt, "lr_scheduler":
        {"scheduler": CosineAnnealingLR(T_max=max_epochs), "interval": "epoch"}}``."""
        hp = self.hparams
        lr, weight_decay = float(hp["lr"]), float(hp["weight_decay"])
        name = hp["optimizer"].lower()
        params = [p for p in self.parameters() if p.requires_grad]
        if name == "adam":
            opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        elif name == "adamw":
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
        if hp["scheduler"] is None:
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self._max_epochs())
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
