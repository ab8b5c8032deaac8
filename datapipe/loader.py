"""The torch side of the wrap stage: batch dataset, resumable sampler, loader.

A batch is one vectorized gather from the memory-mapped columns: the batch
sampler yields whole batches of row positions, torch's DataLoader hands each to
the Dataset's ``__getitems__`` in one call instead of one Python call per sample,
and ``keep_batch`` passes the already-stacked batch through instead of collating
it again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datapipe.errors import ConfigError
from datapipe.stages.load import ArrowLoad


def keep_batch(batch: Any) -> Any:
    """collate_fn for datasets whose ``__getitems__`` already returns a batch."""
    return batch


def shard_of_this_process() -> tuple[int, int]:
    """(rank, world size) under torch.distributed, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ArrayDataset(Dataset):
    """Rows of prepared splits, served as (uint8 images, int64 labels) batches.

    ``sources`` maps a source split to its prepared Arrow file; ``parts`` lists
    (source split, row indices) pairs that make this split, in order. Pickling
    (for spawned workers) sends paths and indices, never the data.
    """

    def __init__(
        self,
        sources: Mapping[str, Path],
        parts: Sequence[tuple[str, np.ndarray]],
        load: ArrowLoad | None = None,
        augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    ) -> None:
        self.sources = {name: Path(path) for name, path in sources.items()}
        self.load = load or ArrowLoad()
        self.augment = augment
        self.names = [name for name, _ in parts]
        self.rows = np.concatenate([np.asarray(rows, np.int64) for _, rows in parts])
        # Which part each row comes from; None in the common one-part case.
        self.part_of = None
        if len(parts) > 1:
            self.part_of = np.concatenate(
                [np.full(len(rows), i, np.int16) for i, (_, rows) in enumerate(parts)]
            )
        self._columns: list[dict[str, np.ndarray]] | None = None

    def _parts(self) -> list[dict[str, np.ndarray]]:
        if self._columns is None:
            cache: dict[str, dict[str, np.ndarray]] = {}
            for name in self.names:
                if name not in cache:
                    cache[name] = self.load(self.sources[name])
            self._columns = [cache[name] for name in self.names]
        return self._columns

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_columns"] = None  # workers re-map the files themselves
        return state

    def __len__(self) -> int:
        return len(self.rows)

    def _gather(self, column: str, positions: np.ndarray) -> np.ndarray:
        parts = self._parts()
        rows = self.rows[positions]
        if self.part_of is None:
            return parts[0][column][rows]
        owners = self.part_of[positions]
        first = parts[int(owners[0])][column]
        out = np.empty((len(rows),) + first.shape[1:], first.dtype)
        for part in np.unique(owners):
            mask = owners == part
            out[mask] = parts[int(part)][column][rows[mask]]
        return out

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        positions = np.asarray(indices, dtype=np.int64)
        images = torch.from_numpy(self._gather("image", positions))
        labels = torch.from_numpy(self._gather("label", positions))
        if self.augment is not None:
            generator = indices.generator() if isinstance(indices, Batch) else None
            images = self.augment(images, generator)
        return images, labels

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        images, labels = self.__getitems__([index])
        return images[0], int(labels[0])

    def labels(self) -> np.ndarray:
        """All labels of the split, in order (for class balance and checks)."""
        return self._gather("label", np.arange(len(self)))


class Batch(list):
    """The row positions of one batch, with where it stands: (seed, epoch, position).

    The batch sampler yields these and torch hands them, unchanged, to the dataset's
    ``__getitems__`` (in the main process or a worker), so a batch's random
    augmentation is a pure function of its key: the same in every worker layout
    and after a resume.
    """

    def __init__(self, rows: Iterable[int], seed: int, epoch: int, position: int) -> None:
        super().__init__(rows)
        self.key = (seed, epoch, position)

    def __reduce__(self):
        return (Batch, (list(self), *self.key))

    def generator(self) -> torch.Generator:
        """A torch generator seeded from this batch's key alone."""
        state = np.random.SeedSequence(list(self.key)).generate_state(2, np.uint32)
        return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class EpochBatchSampler(Sampler[Batch]):
    """Batches of one epoch: a seeded permutation of (seed, epoch), sharded by rank.

    The order is a pure function of (seed, epoch, rank, world size), so a resumed
    run regenerates it and skips the first ``start`` batches instead of replaying.
    Like DistributedSampler, shards are padded by wrapping to equal length.
    """

    def __init__(self, n: int, *, batch_size: int, shuffle: bool, seed: int,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start = 0  # batches of this epoch already served (a resume skips them)

    def order(self, epoch: int) -> np.ndarray:
        """This rank's row positions for ``epoch``, in order."""
        order = (
            np.random.default_rng([self.seed, epoch]).permutation(self.n)
            if self.shuffle
            else np.arange(self.n)
        )
        if self.world_size > 1:
            total = math.ceil(self.n / self.world_size) * self.world_size
            order = np.resize(order, total)[self.rank::self.world_size]
        return order

    def batches_per_epoch(self) -> int:
        shard = math.ceil(self.n / self.world_size) if self.world_size > 1 else self.n
        return shard // self.batch_size if self.drop_last else math.ceil(shard / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        order, size = self.order(self.epoch), self.batch_size
        for position in range(self.start, self.batches_per_epoch()):
            rows = order[position * size:(position + 1) * size].tolist()
            yield Batch(rows, self.seed, self.epoch, position)

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start)


class Loader(DataLoader):
    """A torch DataLoader whose position is state: (seed, epoch, batches served).

    Each ``iter()`` starts the next epoch, as with torch's own loaders, unless a
    state was loaded: then the epoch it names continues from the batch after the
    last one served, with the same order.
    """

    def __init__(self, dataset: ArrayDataset, batches: EpochBatchSampler, **kwargs: Any) -> None:
        super().__init__(dataset, batch_sampler=batches, collate_fn=keep_batch, **kwargs)
        self.next_epoch = 0
        self.batches_seen = 0
        self._resume: tuple[int, int] | None = None
        self._running_epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at ``epoch`` (what DDP-aware trainers call)."""
        if self._resume is None or self._resume[0] != epoch:
            self._resume = None
            self.next_epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        epoch, skip = self._resume if self._resume is not None else (self.next_epoch, 0)
        self._resume = None
        self.batch_sampler.set_epoch(epoch)
        self.batch_sampler.start = skip
        self._running_epoch, self.batches_seen = epoch, skip
        self.next_epoch = epoch + 1
        try:
            for batch in super().__iter__():
                self.batches_seen += 1
                yield batch
            self._running_epoch, self.batches_seen = None, 0
        finally:
            self.batch_sampler.start = 0

    def state_dict(self) -> dict[str, int]:
        if self._resume is not None:
            epoch, seen = self._resume
        elif self._running_epoch is not None:
            epoch, seen = self._running_epoch, self.batches_seen
        else:
            epoch, seen = self.next_epoch, 0
        return {"seed": self.batch_sampler.seed, "epoch": epoch, "batches_seen": seen}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if int(state["seed"]) != self.batch_sampler.seed:
            raise ConfigError(
                f"loader state was saved with seed {state['seed']}, this loader uses "
                f"{self.batch_sampler.seed}; use the same seed to resume"
            )
        self._resume = (int(state["epoch"]), int(state["batches_seen"]))
        self.next_epoch = self._resume[0]
