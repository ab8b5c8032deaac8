"""The wrap stage: serve a split as batches from a real torch DataLoader.

The config lives here and imports nothing heavy; the torch side (the batch
dataset, the resumable sampler, the loader) is in ``datapipe.loader`` and is
imported only when a loader is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from datapipe.errors import ConfigError
from datapipe.stages.base import Stage

if TYPE_CHECKING:
    from datapipe.loader import Loader


@dataclass(frozen=True)
class Wrap(Stage):
    """Batching, shuffling and worker settings of the DataLoaders."""

    kind = "wrap"
    batch_size: int = 32
    num_workers: int = 0
    # For the train split (other splits are never shuffled): True a global shuffle;
    # "shards" the shard-aware order (datapipe.shard_order): each rank reads a part of
    # the split's shards, asked of the dataset's ``shard_groups()``.
    shuffle: bool | str = True
    pin_memory: bool = False
    drop_last: bool = False  # on every split's loader, as lightning-bolts does
    persistent_workers: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ConfigError(f"num_workers must be 0 or more, got {self.num_workers!r}")
        if not isinstance(self.shuffle, bool) and self.shuffle != "shards":
            raise ConfigError(f"shuffle must be True, False or 'shards', got {self.shuffle!r}")

    def build(self, dataset: Any, *, train: bool, seed: int) -> Loader:
        """A DataLoader over ``dataset``; shuffled (seeded) and resumable when ``train``."""
        from datapipe.loader import EpochBatchSampler, Loader, shard_of_this_process
        from datapipe.shard_order import shard_groups

        rank, world_size = shard_of_this_process()
        shards = train and self.shuffle == "shards"
        batches = EpochBatchSampler(
            len(dataset),
            batch_size=self.batch_size,
            shuffle=train and bool(self.shuffle),
            groups=shard_groups(dataset) if shards else None,
            drop_last=self.drop_last,
            seed=seed,
            rank=rank,
            world_size=world_size,
            device=getattr(dataset, "device", "cpu"),  # a resident split's order lives there
        )
        return Loader(
            dataset,
            batches,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )
