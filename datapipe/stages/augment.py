"""Batch augmentations: whole-batch tensor ops on uint8 N x C x H x W images.

Each op is a frozen dataclass (its fields are its config, shown in data cards)
called as ``op(images, generator)``; it draws every random number from
``generator``, which the loader seeds from the batch's key (seed, epoch,
position), so a batch is augmented the same way in any worker layout and after a
resume. Nothing loops over images in Python. List them in
``Transform(train=(RandomCrop(32, padding=4), RandomHorizontalFlip()))``. An op
may also offer ``apply_(images, generator)``, the same work done in place; the
transform uses it on batches an earlier op made as new memory (``fresh_output``),
never on the caller's input. A crop followed by a flip runs as one pass
(``RandomCrop.fused_with``), with the same draws and the same result.

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
    whole batch at once: one copy of every crop's rows from the unpadded batch.
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

    def crop(self, images: Any, top: Any, left: Any, flipped: Any = None) -> Any:
        """The crops of the padded ``images`` at the given per-image offsets.

        ``flipped`` (a bool per image, or None) mirrors the chosen crops left to right
        in the same pass: a flipped crop is the crop of the mirrored image at the
        mirrored offset.
        """
        import torch

        _check_batch(images, "RandomCrop")
        n, c, height, width = images.shape
        (h, w), pad = self.shape, self.padding
        if n == 0:
            return images.new_empty((0, c, h, w))
        device, plane = images.device, height * width
        # The batch (and the mirror images of the chosen ones) flat in one buffer, with
        # zero margins: no padded copy is made. Every output row is w contiguous
        # elements of the buffer: view it as "the w elements from each offset" (a
        # strided view, no copy) and pick one row per (image, channel, y) -- a copy of
        # rows, not of elements. A row above or below its image comes from the zero
        # tail (long enough for every channel's offset); the columns left or right of
        # the image (read from the neighbouring row) are zeroed after.
        margin = w + pad
        pieces = [images.new_zeros(margin), images.reshape(-1)]
        first = margin + torch.arange(n, device=device) * (c * plane)  # each image's start
        top = top.to(device, torch.long)
        left = left.to(device, torch.long)
        if flipped is not None:
            flipped = flipped.to(device)
            which = flipped.nonzero().squeeze(1)
            pieces += [images.new_zeros(margin), images.index_select(0, which).flip(-1)
                       .reshape(-1)]
            rank = flipped.long().cumsum(0) - 1  # where each flipped image sits among them
            mirrored = margin + n * c * plane + margin + rank * (c * plane)
            first = torch.where(flipped, mirrored, first)
            left = torch.where(flipped, width + 2 * pad - w - left, left)
        zero_row = sum(len(piece) for piece in pieces)
        pieces.append(images.new_zeros(c * plane + margin))
        buffer = torch.cat(pieces)
        rows = buffer.as_strided((buffer.numel() - w + 1, w), (1, 1))
        dx = left - pad  # n: the source column of each crop's column 0
        y = top[:, None] - pad + torch.arange(h, device=device)  # n x h: source rows
        row = first[:, None] + y * width + dx[:, None]  # n x h, channel 0
        if pad:
            row = torch.where((y >= 0) & (y < height), row, zero_row)
        start = row[:, None, :] + torch.arange(0, c * plane, plane, device=device)[:, None]
        out = rows.index_select(0, start.view(-1)).view(n, c, h, w)
        if pad or w > width:
            x = dx[:, None] + torch.arange(w, device=device)  # n x w: source columns
            out.mul_(((x >= 0) & (x < width)).view(n, 1, 1, w))
        return out

    def fused_with(self, following: Any) -> Any:
        """This crop and a following RandomHorizontalFlip as one pass, or None.

        The random numbers are drawn as the two ops would draw them one after the
        other (offsets, then the flips), so the result is the same batch.
        """
        if not isinstance(following, RandomHorizontalFlip):
            return None

        def crop_and_flip(images: Any, generator: Any = None) -> Any:
            _check_batch(images, "RandomCrop")
            n, _, height, width = images.shape
            top, left = self.offsets(n, height, width, generator)
            return self.crop(images, top, left, following.draw(n, generator))

        return crop_and_flip

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

    def draw(self, n: int, generator: Any = None) -> Any:
        """Which of ``n`` images to flip (a bool each), drawn from ``generator``."""
        import torch

        return torch.rand(n, generator=generator) < self.p

    def apply_(self, images: Any, generator: Any = None) -> Any:
        """Flip the chosen images of ``images`` in place (a batch the caller owns)."""
        _check_batch(images, "RandomHorizontalFlip")
        chosen = self.draw(len(images), generator)
        which = chosen.nonzero().squeeze(1).to(images.device)
        return images.index_copy_(0, which, images.index_select(0, which).flip(-1))
