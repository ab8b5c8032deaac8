"""The transform stage: what happens to a batch between the cache and the model.

Images stay uint8 through the loader (four times less to copy and pin) and become
float32 on the device, where normalization is one fused pass over the batch:
``x * scale - shift`` with ``scale = 1 / (255 std)`` and ``shift = mean / std``.
torch is imported only when a batch is transformed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from datapipe.errors import ConfigError
from datapipe.stages.base import Stage


@dataclass(frozen=True)
class Transform(Stage):
    """Per-batch transforms; ``normalize`` uses ``mean``/``std`` in [0, 1] units.

    With ``normalize=False`` (the default for every recipe, built-in or a user's, as in
    lightning-bolts) images are only scaled to [0, 1] (what torchvision's ``ToTensor``
    gives). ``mean``/``std`` of None are filled in by the DataModule from the recipe's
    declared statistics or those computed at prepare time.
    """

    kind = "transform"
    normalize: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    # Batch augmentations of the training split, applied in order on uint8 batches in
    # the loader; each is a frozen dataclass called as op(images, generator).
    train: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        for name in ("mean", "std"):  # tuples: JSON gives lists back, and they must hash
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ConfigError(f"normalization std must be positive, got {self.std}")
        if (self.mean is None) != (self.std is None) or (
            self.mean is not None and len(self.mean) != len(self.std)
        ):
            raise ConfigError(f"give mean and std of equal length, got {self.mean}, {self.std}")

    def augment(self, images: Any, generator: Any) -> Any:
        """Apply the ``train`` ops to a uint8 batch, drawing randomness from ``generator``.

        The input is never changed; an op works in place where it can (``apply_``)
        when the op before it returns new memory (``fresh_output``), and an op may run
        together with the next one (``fused_with``).
        """
        owned, ops = False, list(self.train)
        while ops:
            op = ops.pop(0)
            fuse = getattr(op, "fused_with", None)
            fused = fuse(ops[0]) if fuse is not None and ops else None
            if fused is not None:  # e.g. crop + flip in one pass, drawing as the two would
                op = fused
                ops.pop(0)
            in_place = getattr(op, "apply_", None) if owned else None
            images = in_place(images, generator) if in_place else op(images, generator)
            owned = owned and in_place is not None or getattr(op, "fresh_output", False) \
                or fused is not None
        return images

    def on_device(self, images: Any) -> Any:
        """uint8 images (N x C x H x W, on any device) -> float32, scaled and normalized."""
        import torch

        if images.dtype != torch.uint8:
            return images  # already transformed (or not an image batch)
        x = images.to(torch.float32)
        if not self.normalize or self.mean is None:
            return x.mul_(1.0 / 255.0)
        scale, shift = _affine(self.mean, self.std, x.device, x.dim())
        return x.mul_(scale).sub_(shift)


@functools.lru_cache(maxsize=64)
def _affine(mean: tuple[float, ...], std: tuple[float, ...], device: Any, dims: int) -> Any:
    """(scale, shift) shaped to broadcast over N x C x ...; made once per device.

    One channel gets Python floats: a scalar operand is cheaper than broadcasting a
    one-element tensor over the batch.
    """
    import torch

    if len(mean) == 1:
        return 1.0 / (255.0 * std[0]), mean[0] / std[0]

    shape = (1, len(mean)) + (1,) * (dims - 2)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=device).view(shape)
    shift = torch.tensor([m / s for m, s in zip(mean, std, strict=True)], device=device)
    return scale, shift.view(shape)
