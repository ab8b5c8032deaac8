"""Batch augmentations: whole-batch tensor ops on uint8 N x C x H x W images.

Each op is a frozen dataclass (its fields are its config, shown in data cards)
called as ``op(images, generator)``; it draws every random number from
``generator``, which the loader seeds from the batch's key (seed, epoch,
position), so a batch is augmented the same way in any worker layout and after a
resume. Nothing loops over images in Python. List them in
``Transform(train=(RandomCrop(32, padding=4), RandomHorizontalFlip()))``. An op
may also offer ``apply_(images, generator)``, the same work done in place; the
transform uses it on batches an earlier op made as new memory (``fresh_output``),
never on the caller's input.

torch is imported when an op runs, not when a recipe declares one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from datapipe.errors import ConfigError


def _check_batch(images: Any, what: str) -> None:
    if images.dim() != 4:
        raise ConfigError(f"{what} works on N x C x H x W batches, got shape "
                          f"{tuple(images.shape)}")


@dataclass(frozen=True)
class RandomCrop:
    """Pad each image with ``padding`` zeros on every side, then crop ``size`` at random.

    What torchvision's ``RandomCrop(size, padding=padding)`` does per image (its
    default constant fill of 0), with an independent offset per image, done for the
    whole batch at once: one padded copy, then one copy of every crop's rows.
    ``size`` is an int (square) or (height, width).
    """

    size: int | tuple[int, int] = 32
    padding: int = 4
    fresh_output = True  # a class attribute, not a field: the crops are always new memory

    def __post_init__(self) -> None:
        size = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)
        if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise ConfigError(f"RandomCrop size must be a positive int or (height, width), "
                              f"got {self.size!r}")
        if not isinstance(self.padding, int) or self.padding < 0:
            raise ConfigError(f"RandomCrop padding must be 0 or more, got {self.padding!r}")
        if not isinstance(self.size, int):
            object.__setattr__(self, "size", size)

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the crops."""
        return (self.size, self.size) if isinstance(self.size, int) else self.size

    def offsets(self, n: int, height: int, width: int, generator: Any = None) -> tuple[Any, Any]:
        """(top, left) of each of ``n`` crops in the padded images, drawn in that order."""
        import torch

        (h, w), pad = self.shape, self.padding
        if h > height + 2 * pad or w > width + 2 * pad:
            raise ConfigError(f"RandomCrop of {h} x {w} does not fit {height} x {width} "
                              f"images padded by {pad}")
        top = torch.randint(0, height + 2 * pad - h + 1, (n,), generator=generator)
        left = torch.randint(0, width + 2 * pad - w + 1, (n,), generator=generator)
        return top, left

    def crop(self, images: Any, top: Any, left: Any) -> Any:
        """The crops of the padded ``images`` at the given per-image offsets."""
        import torch

        _check_batch(images, "RandomCrop")
        n, c, height, width = images.shape
        (h, w), pad = self.shape, self.padding
        if n == 0:
            return images.new_empty((0, c, h, w))
        padded_h, padded_w = height + 2 * pad, width + 2 * pad
        # Zero only the border: filling the whole buffer first would write it twice.
        padded = images.new_empty((n, c, padded_h, padded_w))
        if pad:
            padded[:, :, :pad].zero_()
            padded[:, :, pad + height:].zero_()
            padded[:, :, pad:pad + height, :pad].zero_()
            padded[:, :, pad:pad + height, pad + width:].zero_()
        padded[:, :, pad:pad + height, pad:pad + width] = images
        # Every output row is w contiguous elements of the padded batch: view the batch
        # as "the w elements from each offset" (a strided view, no copy) and pick one
        # row per (image, channel, y) -- a copy of contiguous rows, not of elements.
        flat = padded.view(-1)
        rows = flat.as_strided((flat.numel() - w + 1, w), (1, 1))
        device = images.device
        plane = (torch.arange(n, device=device)[:, None] * c
                 + torch.arange(c, device=device)) * (padded_h * padded_w)  # n x c
        y = top.to(device, torch.long)[:, None] + torch.arange(h, device=device)  # n x h
        start = (plane[:, :, None] + y[:, None, :] * padded_w
                 + left.to(device, torch.long)[:, None, None])  # n x c x h
        return rows.index_select(0, start.view(-1)).view(n, c, h, w)

    def __call__(self, images: Any, generator: Any = None) -> Any:
        _check_batch(images, "RandomCrop")
        n, _, height, width = images.shape
        return self.crop(images, *self.offsets(n, height, width, generator))


@dataclass(frozen=True)
class RandomHorizontalFlip:
    """Mirror each image left to right with probability ``p``, drawn per image."""

    p: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.p, bool) or not isinstance(self.p, (int, float)) \
                or not 0.0 <= self.p <= 1.0:
            raise ConfigError(f"RandomHorizontalFlip p must lie in [0, 1], got {self.p!r}")

    def __call__(self, images: Any, generator: Any = None) -> Any:
        return self.apply_(images.clone(), generator)

    def apply_(self, images: Any, generator: Any = None) -> Any:
        """Flip the chosen images of ``images`` in place (a batch the caller owns)."""
        import torch

        _check_batch(images, "RandomHorizontalFlip")
        chosen = torch.rand(len(images), generator=generator) < self.p
        which = chosen.nonzero().squeeze(1).to(images.device)
        return images.index_copy_(0, which, images.index_select(0, which).flip(-1))
