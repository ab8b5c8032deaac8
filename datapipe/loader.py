"""The torch side of the wrap stage: batch dataset, resumable sampler, loader.

A batch is one vectorized gather: the batch sampler yields whole batches of row
positions (slices of one int64 tensor per epoch), torch's DataLoader hands each to
the Dataset's ``__getitems__`` in one call instead of one Python call per sample,
and ``keep_batch`` passes the already-stacked batch through instead of collating
it again. The gather is ``index_select`` over torch views of the memory-mapped
columns: numpy's fancy indexing of the same rows is several times slower.

In-memory splits are served in the consuming thread whatever ``num_workers`` says:
a batch is a few tensor ops (tens of microseconds for MNIST or CIFAR), and handing
it over from a worker process, or even from a thread, costs more than making it
(measured in benchmarks/: both were slower than no workers). Decoding datasets
(JPEG) keep torch's worker processes, where decoding scales with cores.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datapipe.errors import ConfigError
from datapipe.shard_order import DEFAULT_WINDOW, check_groups, epoch_orders, epoch_rng, groups_of


def keep_batch(batch: Any) -> Any:
    """collate_fn for datasets whose ``__getitems__`` already returns a batch."""
    return batch


def shard_of_this_process() -> tuple[int, int]:
    """(rank, world size) under torch.distributed, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A torch view of a numpy array, read-only ones (memory maps) included.

    torch warns that writing through the view of a read-only array is undefined;
    the loader only ever reads these views (gathers copy out of them).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def positions_of(indices: Sequence[int]) -> torch.Tensor:
    """The int64 tensor of a batch's row positions (a Batch carries one already)."""
    if type(indices) is Batch:
        return indices.positions
    if isinstance(indices, torch.Tensor):
        return indices.to(torch.int64)
    return torch.from_numpy(np.asarray(indices, dtype=np.int64))


class _BatchDataset(Dataset):
    """What both in-memory datasets share: a batch per call, augmented as a whole."""

    # Batches cost less to make than to hand over: the loader makes them in its own thread.
    served_in_process = True
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None

    def _augmented(self, images: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
        """``images`` through the augmentation, seeded by the batch's (seed, epoch, position)."""
        if self.augment is None:
            return images
        generator = indices.generator() if isinstance(indices, Batch) else None
        return self.augment(images, generator)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        images, labels = self.__getitems__([index])
        return images[0], int(labels[0])

    def sample(self, index: int) -> tuple[Any, int]:
        """Row ``index`` as (PIL image, label), unaugmented: for a per-sample transform."""
        from datapipe.sample_transform import pil_of

        augment, self.augment = self.augment, None
        try:
            image, label = self[index]
        finally:
            self.augment = augment
        return pil_of(image), label


class ArrayDataset(_BatchDataset):
    """Rows of prepared splits, served as (uint8 images, int64 labels) batches.

    ``sources`` maps a source split to its prepared Arrow file; ``parts`` lists
    (source split, row indices) pairs that make this split, in order; ``load`` maps a
    file to its columns (the load stage, ``datapipe.stages.load``, which checks what it
    maps; this module never imports a stage). Pickling (for spawned workers) sends
    paths and indices, never the data.
    """

    def __init__(
        self,
        sources: Mapping[str, Path],
        parts: Sequence[tuple[str, np.ndarray]],
        load: Callable[[Path], Mapping[str, np.ndarray]],
        augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    ) -> None:
        self.sources = {name: Path(path) for name, path in sources.items()}
        self.load = load
        self.augment = augment
        self.names = [name for name, _ in parts]
        self.rows = np.concatenate([np.asarray(rows, np.int64) for _, rows in parts])
        # Which part each row comes from; None in the common one-part case.
        self.part_of = None
        if len(parts) > 1:
            self.part_of = np.concatenate(
                [np.full(len(rows), i, np.int16) for i, (_, rows) in enumerate(parts)]
            )
        self._columns: list[dict[str, torch.Tensor]] | None = None
        self._rows: torch.Tensor | None = None  # None when rows are 0..n-1 of one part

    def _parts(self) -> list[dict[str, torch.Tensor]]:
        if self._columns is None:
            cache: dict[str, dict[str, torch.Tensor]] = {}
            for name in self.names:
                if name not in cache:  # through the load stage, which checks what it maps
                    cache[name] = {k: as_tensor(v) for k, v in
                                   self.load(self.sources[name]).items()}
            self._columns = [cache[name] for name in self.names]
            whole = (self.part_of is None and len(self.rows) == len(cache[self.names[0]]["label"])
                     and bool((self.rows == np.arange(len(self.rows))).all()))
            self._rows = None if whole else torch.from_numpy(self.rows)
        return self._columns

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_columns"] = state["_rows"] = None  # workers re-map the files themselves
        return state

    def __len__(self) -> int:
        return len(self.rows)

    def _gather(self, column: str, positions: torch.Tensor) -> torch.Tensor:
        parts = self._parts()
        if self.part_of is None:
            rows = positions if self._rows is None else self._rows.index_select(0, positions)
            return parts[0][column].index_select(0, rows)
        where = positions.numpy()
        rows, owners = self.rows[where], self.part_of[where]
        first = parts[int(owners[0])][column] if len(owners) else parts[0][column]
        out = first.new_empty((len(rows),) + tuple(first.shape[1:]))
        for part in np.unique(owners):
            mask = owners == part
            out[torch.from_numpy(mask)] = parts[int(part)][column].index_select(
                0, torch.from_numpy(rows[mask]))
        return out

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        positions = positions_of(indices)
        parts = self._columns or self._parts()
        if self.part_of is None:  # the common case, spelled out: it runs once per batch
            rows = positions if self._rows is None else self._rows.index_select(0, positions)
            images = parts[0]["image"].index_select(0, rows)
            labels = parts[0]["label"].index_select(0, rows)
        else:
            images = self._gather("image", positions)
            labels = self._gather("label", positions)
        return self._augmented(images, indices), labels


    def labels(self) -> np.ndarray:
        """All labels of the split, in order (for class balance and checks)."""
        return self._gather("label", torch.arange(len(self))).numpy()

    def shard_groups(self) -> list[np.ndarray]:
        """This split's positions grouped by the Arrow file they come from, in order of
        first use: one group per source split (a train split carved from one file is one
        group, which the shard order cuts into a block per rank)."""
        if self.part_of is None:
            return [np.arange(len(self), dtype=np.int64)]
        files = list(dict.fromkeys(self.names))
        file_of_part = np.asarray([files.index(name) for name in self.names], np.int64)
        return groups_of(file_of_part[self.part_of], len(files))

    def resident(self, device: Any) -> ResidentDataset:
        """This split copied once onto ``device``: batches are gathered there."""
        everything = torch.arange(len(self))
        return ResidentDataset(self._gather("image", everything), self._gather(
            "label", everything), device, augment=self.augment, groups=self.shard_groups())


class ResidentDataset(_BatchDataset):
    """A split held as one uint8 tensor (and its labels) on the training device.

    A batch is an ``index_select`` there, then the whole-batch augmentation; the
    positions come from the sampler's epoch order, which the loader puts on the same
    device once per epoch. The random draws of an augmentation still come from the
    batch's CPU generator (a few numbers per image), so a resident split is augmented
    exactly as the loader path augments it.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, device: Any,
                 augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                 groups: Sequence[np.ndarray] | None = None) -> None:
        self.device = torch.device(device)
        self.image_tensor = images.to(self.device).contiguous()
        self.label_tensor = labels.to(self.device)
        self.augment = augment
        # The positions' files, as the split it was copied from groups them; tensors
        # given bare are one block of memory, so one group.
        self._groups = [np.arange(len(labels), dtype=np.int64)] if groups is None else groups

    def shard_groups(self) -> list[np.ndarray]:
        return list(self._groups)

    def __len__(self) -> int:
        return len(self.label_tensor)

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        positions = positions_of(indices).to(self.device, non_blocking=True)
        images = self.image_tensor.index_select(0, positions)
        labels = self.label_tensor.index_select(0, positions)
        return self._augmented(images, indices), labels


    def labels(self) -> np.ndarray:
        return self.label_tensor.cpu().numpy()

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a device-resident split cannot go to worker processes; "
                        "it is served from the training process")


class Batch(Sequence):
    """The row positions of one batch, with where it stands: (seed, epoch, position).

    The batch sampler yields these and torch hands them, unchanged, to the dataset's
    ``__getitems__`` (in the main process or a worker), so a batch's random
    augmentation is a pure function of its key: the same in every worker layout
    and after a resume. The positions are an int64 tensor (a slice of the epoch's
    order, no copy), which the dataset gathers with directly.
    """

    __slots__ = ("positions", "key")

    def __init__(self, rows: Iterable[int] | torch.Tensor, seed: int, epoch: int,
                 position: int) -> None:
        if not isinstance(rows, torch.Tensor):
            rows = torch.from_numpy(np.asarray(list(rows) if not isinstance(rows, np.ndarray)
                                               else rows, dtype=np.int64).reshape(-1))
        self.positions = rows
        self.key = (seed, epoch, position)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i):
        return self.positions.tolist()[i]

    def __iter__(self) -> Iterator[int]:
        return iter(self.positions.tolist())

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self.positions.cpu().numpy()
        return array if dtype is None else array.astype(dtype, copy=False)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Batch):
            return self.key == other.key and self.positions.tolist() == other.positions.tolist()
        return NotImplemented

    def __repr__(self) -> str:
        return f"Batch({self.positions.tolist()}, key={self.key})"

    def __reduce__(self):
        return (Batch, (self.positions.cpu().numpy(), *self.key))

    def generator(self) -> torch.Generator:
        """A torch generator seeded from this batch's key alone."""
        state = np.random.SeedSequence(list(self.key)).generate_state(2, np.uint32)
        return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class EpochBatchSampler(Sampler[Batch]):
    """Batches of one epoch: a seeded permutation of (seed, epoch), sharded by rank.

    The order is a pure function of (seed, epoch, rank, world size), so a resumed
    run regenerates it and skips the first ``start`` batches instead of replaying.
    Like DistributedSampler, shards are padded by wrapping to equal length. The
    order tensor lives on ``device`` (a resident split's), made once per epoch.

    With ``groups`` (the dataset's positions partitioned by shard), the order is the
    shard-aware one of :mod:`datapipe.shard_order` instead: each rank reads a run of
    shards, ``window`` of them mixed at a time; every rank still gets ceil(n / world)
    positions, so the batch count is the global order's.

    ``n`` may also be a sampler, as in torch's ``BatchSampler(sampler, batch_size=,
    drop_last=)``: that is how Lightning re-creates a batch sampler (for predict, or to
    put in its distributed sampler), and the batches then follow that sampler's order.
    """

    def __init__(self, n: int | Sampler, *, batch_size: int, shuffle: bool = False,
                 seed: int = 0, drop_last: bool = False, rank: int = 0,
                 world_size: int = 1, device: Any = "cpu",
                 groups: Sequence[Sequence[int]] | None = None,
                 window: int = DEFAULT_WINDOW) -> None:
        self.sampler = None if isinstance(n, int) else n
        if self.sampler is not None:
            n = len(self.sampler)
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.epoch = 0
        self.start = 0  # batches of this epoch already served (a resume skips them)
        if groups is not None and self.sampler is not None:
            raise ConfigError("a batch sampler follows either a sampler's order or shard "
                              "groups, not both")
        self.groups = None if groups is None else check_groups(groups, n)
        self.window = window

    @property
    def ordering(self) -> str:
        """Which order this sampler serves: "shards" (shard-aware) or "global"."""
        return "global" if self.groups is None else "shards"

    def order(self, epoch: int) -> np.ndarray:
        """This rank's row positions for ``epoch``, in order."""
        if self.sampler is not None:  # it shuffles and shards, if at all
            return np.fromiter(iter(self.sampler), np.int64, count=self.n)
        if self.groups is not None:
            return epoch_orders(self.groups, seed=self.seed, epoch=epoch,
                                world_size=self.world_size, window=self.window)[self.rank]
        order = (
            epoch_rng(self.seed, epoch).permutation(self.n)
            if self.shuffle
            else np.arange(self.n)
        )
        if self.world_size > 1:
            total = math.ceil(self.n / self.world_size) * self.world_size
            order = np.resize(order, total)[self.rank::self.world_size]
        return order

    def batches_per_epoch(self) -> int:
        sharded = self.world_size > 1 and self.sampler is None
        shard = math.ceil(self.n / self.world_size) if sharded else self.n
        return shard // self.batch_size if self.drop_last else math.ceil(shard / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[Batch]:
        order = torch.from_numpy(np.ascontiguousarray(self.order(self.epoch), np.int64))
        if self.device.type != "cpu":
            order = order.to(self.device)
        count = self.batches_per_epoch()
        pieces = torch.split(order[:count * self.batch_size], self.batch_size)  # views
        seed, epoch = self.seed, self.epoch
        for position in range(self.start, count):
            yield Batch(pieces[position], seed, epoch, position)

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start)


def _pinned(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):  # a resident split's batches are on the device already
        return batch.pin_memory() if batch.device.type == "cpu" else batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(_pinned(b) for b in batch)
    return batch.pin_memory() if hasattr(batch, "pin_memory") else batch


class Loader(DataLoader):
    """A torch DataLoader whose position is state: (seed, epoch, batches served).

    Each ``iter()`` starts the next epoch, as with torch's own loaders, unless a
    state was loaded: then the epoch it names continues from the batch after the
    last one served, with the same order.

    Without workers, or for a dataset ``served_in_process`` (in-memory splits), the
    loader calls the dataset's ``__getitems__`` itself: torch's single-process
    iterator would add only its bookkeeping, and workers a hand-over that costs
    more than the batch.
    """

    def __init__(self, dataset: Dataset, batches: EpochBatchSampler | None = None,
                 **kwargs: Any) -> None:
        # Lightning re-creates a loader with its own ``batch_sampler=`` (see EpochBatchSampler).
        batches = kwargs.pop("batch_sampler", None) or batches
        kwargs.pop("collate_fn", None)
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

    def _batches(self) -> Iterator[Any]:
        if not getattr(self.dataset, "served_in_process", False) and self.num_workers:
            return super().__iter__()
        make = self.dataset.__getitems__
        if self.pin_memory and torch.cuda.is_available():
            return (_pinned(make(batch)) for batch in self.batch_sampler)
        return map(make, self.batch_sampler)

    def __iter__(self) -> Iterator[Any]:
        epoch, skip = self._resume if self._resume is not None else (self.next_epoch, 0)
        self._resume = None
        positions = self.batch_sampler
        if not isinstance(positions, EpochBatchSampler):  # wrapped by Lightning (predict)
            positions = getattr(positions, "_batch_sampler", None)
        if isinstance(positions, EpochBatchSampler):
            positions.set_epoch(epoch)
            positions.start = skip
        self._running_epoch, self.batches_seen = epoch, skip
        self.next_epoch = epoch + 1
        try:
            for batch in self._batches():
                self.batches_seen += 1
                yield batch
        finally:
            # An iterator closed early (a trainer's limit_train_batches or max_steps) ends
            # its epoch too: the next iter() starts the next one, and the state says so.
            if self._running_epoch == epoch:
                self._running_epoch, self.batches_seen = None, 0
            if isinstance(positions, EpochBatchSampler):
                positions.start = 0

    def state_dict(self) -> dict[str, Any]:
        if self._resume is not None:
            epoch, seen = self._resume
        elif self._running_epoch is not None:
            epoch, seen = self._running_epoch, self.batches_seen
        else:
            epoch, seen = self.next_epoch, 0
        # The order is part of the position: batch k of one order is not batch k of the other.
        return {"seed": self.batch_sampler.seed, "epoch": epoch, "batches_seen": seen,
                "order": self.batch_sampler.ordering}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["seed"]) != self.batch_sampler.seed:
            raise ConfigError(
                f"loader state was saved with seed {state['seed']}, this loader uses "
                f"{self.batch_sampler.seed}; use the same seed to resume"
            )
        saved = state.get("order", "global")  # states saved before shard orders: global
        ordering = self.batch_sampler.ordering
        if saved != ordering:
            how = {"global": "shuffle=True (or False)", "shards": "shuffle='shards'"}.get(
                str(saved), "the shuffle= it was saved with")
            raise ConfigError(f"loader state was saved with the {saved!r} order, this loader "
                              f"uses the {ordering!r} order; resume with {how}")
        self._resume = (int(state["epoch"]), int(state["batches_seen"]))
        self.next_epoch = self._resume[0]
