"""The slow path: a user's per-sample transform (torchvision style) over a datapipe split.

lightning-bolts users set ``dm.train_transforms = transforms.Compose([...])``: a
callable taking one PIL image, as torchvision's datasets hand it over. datapipe's
fast path never makes a PIL image, so a split with such a transform is served by
:class:`SampleTransformed`: each sample of a batch becomes a PIL image (MNIST's as
mode ``L``, colour as ``RGB``; an ImageNet JPEG decoded at its stored size), goes
through the transform, and the results are collated as torch's default collate
does. It runs in the loader's worker processes (``num_workers``), one Python call
per sample: as fast as torchvision's datasets, far slower than whole-batch ops.
What the transform returns is what the batch holds; a float batch passes
``on_after_batch_transfer`` unchanged (only uint8 batches are scaled there).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from datapipe.shard_order import shard_groups


def pil_of(image: Any) -> Any:
    """A uint8 C x H x W tensor (C = 1 or 3) as the PIL image torchvision's datasets give."""
    from PIL import Image

    array = image.cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] == 1:
        return Image.fromarray(np.ascontiguousarray(array[0]), mode="L")
    return Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)), mode="RGB")


class SampleTransformed(Dataset):
    """``dataset`` with every sample through ``transform`` as a PIL image (per sample).

    ``dataset`` gives ``sample(position) -> (PIL image, label)``; the in-memory and
    JPEG datasets both do.
    """

    served_in_process = False  # per-sample Python work: worker processes do help here

    def __init__(self, dataset: Any, transform: Callable[[Any], Any]) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def labels(self) -> np.ndarray:
        return self.dataset.labels()

    def shard_groups(self) -> list[np.ndarray]:
        return shard_groups(self.dataset)  # the one-line refusal if it has none

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.dataset.sample(int(index))
        return self.transform(image), label

    def __getitems__(self, indices: Sequence[int]) -> Any:
        return default_collate([self[int(i)] for i in indices])
