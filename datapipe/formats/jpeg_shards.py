"""JPEG shards: the Arrow files a sharded JPEG split (ImageNet) is kept in.

A shard is an Arrow IPC stream with one record batch of the columns

    name: string   the source file name (n01440764_10026.JPEG)
    image: binary  the re-encoded JPEG (field metadata ``datapipe.format: jpeg``)
    label: int64   position of the wnid in sorted order (torchvision's labels)
    height, width: int32  of the stored JPEG (crops are drawn before decoding)

rows sorted by name. :func:`write_jpeg_shard` writes one; :class:`ShardReader`
memory-maps a split's shards and checks their chunks against the manifest's digests as
it reads. The stages that make and load shards are in ``datapipe.stages.jpeg``; the
torch dataset that decodes them is in ``datapipe.decode``. This module imports pyarrow
only when a shard is written or opened, and never torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from datapipe.errors import FormatError, RecipeError
from datapipe.integrity import ChunkChecker, DamagedChunk

if TYPE_CHECKING:
    from datapipe.manifest import PreparedSplit, Promise

FORMAT_KEY = b"datapipe.format"


def write_jpeg_shard(rows: Sequence[tuple[str, bytes, int, int, int]], path: Path) -> None:
    """Write (name, jpeg, label, height, width) rows, sorted by name, as one Arrow stream."""
    import pyarrow as pa

    rows = sorted(rows, key=lambda r: r[0])
    names, images, labels, heights, widths = ([r[i] for r in rows] for i in range(5))
    schema = pa.schema([
        pa.field("name", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False, metadata={FORMAT_KEY: b"jpeg"}),
        pa.field("label", pa.int64(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
    ])
    batch = pa.RecordBatch.from_arrays([
        pa.array(names, pa.string()), pa.array(images, pa.binary()),
        pa.array(labels, pa.int64()), pa.array(heights, pa.int32()),
        pa.array(widths, pa.int32()),
    ], schema=schema)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(batch)


class ShardReader:
    """The rows of a split's shards, memory-mapped: JPEG bytes by row, labels and sizes.

    Opening maps the files and reads only their metadata; ``image(row)`` is a
    zero-copy view of the page cache. Pickling sends the paths (and the promise), not
    the maps.

    With the ``promise`` of the prepared entry (``PreparedSplit.promise()``), nothing
    leaves the reader unchecked: opening checks, in each shard, the chunks outside its
    JPEG bytes (Arrow metadata, names, labels, sizes: a few per shard), and
    ``image(row)`` the chunks holding that row's JPEG the first time this process
    touches them; the row count must be the manifest's. A dataset hands a batch over
    only after reading every row's image, so a damaged label or size is refused too.
    """

    def __init__(self, paths: Sequence[Path], promise: Promise | None = None) -> None:
        self.paths = [Path(p) for p in paths]
        self.promise = promise
        self._maps: list[tuple[np.ndarray, np.ndarray]] | None = None
        self._columns: dict[str, np.ndarray] | None = None
        self._starts: np.ndarray | None = None
        self._checkers: list[tuple[ChunkChecker, int | None]] | None = None  # (., JPEG start)

    def __getstate__(self) -> dict[str, Any]:
        return {"paths": self.paths, "promise": self.promise, "_maps": None,
                "_columns": None, "_starts": None, "_checkers": None}

    def _damaged(self, problem: str) -> Exception:
        assert self.promise is not None
        return self.promise.damaged(problem)

    def _open(self) -> None:
        import pyarrow as pa

        maps, columns, lengths, checkers = [], {"label": [], "height": [], "width": []}, [], []
        for path in self.paths:
            try:
                with pa.memory_map(str(path), "r") as source:
                    whole = source.read_buffer()  # the map itself: no copy
                table = pa.ipc.open_stream(pa.BufferReader(whole)).read_all()
                column = table.column("image")
                # combine_chunks copies even a single chunk (pyarrow 26): take it as it is.
                image = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
                buffers = image.buffers()
                offsets = np.frombuffer(buffers[1], np.int32, len(image) + 1, image.offset * 4)
                if self.promise is not None:
                    checker = ChunkChecker(whole, self.promise.digests(path))
                    # Everything but the JPEG bytes, now: the message metadata precedes
                    # the body, so it is checked whatever it says about the buffers.
                    start = buffers[2].address - whole.address  # the JPEG bytes' file offset
                    if 0 <= start and start + buffers[2].size <= len(checker.view):
                        checker.check_range(0, start)
                        checker.check_range(start + buffers[2].size, len(checker.view))
                    else:  # Arrow copied the JPEG bytes rather than map them: check all now
                        checker.check_all()
                        start = None
                    checkers.append((checker, start))
            except DamagedChunk as e:
                raise self._damaged(str(e)) from None
            except (OSError, pa.ArrowInvalid, KeyError) as e:
                if self.promise is not None:
                    raise self._damaged(f"{path.name} cannot be read ({e})") from None
                raise FormatError(f"cannot read shard {path}: {e}; run `datapipe prepare` "
                                  f"with --force") from None
            maps.append((offsets, np.frombuffer(buffers[2], np.uint8)))
            for name in columns:
                columns[name].append(table.column(name).to_numpy())
            lengths.append(len(table))
        if self.promise is not None and sum(lengths) != self.promise.rows:
            raise self._damaged(f"its shards hold {sum(lengths)} rows, the manifest says "
                                f"{self.promise.rows}")
        self._maps, self._checkers = maps, checkers if self.promise is not None else None
        self._columns = {k: np.concatenate(v) if v else np.zeros(0, np.int64)
                         for k, v in columns.items()}
        self._starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    def column(self, name: str) -> np.ndarray:
        """``label``, ``height`` or ``width`` of every row, in order."""
        if self._columns is None:
            self._open()
        return self._columns[name]

    def __len__(self) -> int:
        return len(self.column("label"))

    def starts(self) -> np.ndarray:
        """Each shard's first row, then the row count: shard i holds rows
        ``starts[i]:starts[i + 1]`` (opening the shards, as the manifest does not say)."""
        if self._starts is None:
            self._open()
        return self._starts

    def image(self, row: int) -> np.ndarray:
        """The JPEG bytes of ``row`` as a uint8 view (its chunks checked, once per process)."""
        if self._maps is None:
            self._open()
        shard = int(np.searchsorted(self._starts, row, side="right")) - 1
        offsets, data = self._maps[shard]
        local = row - int(self._starts[shard])
        begin, end = int(offsets[local]), int(offsets[local + 1])
        if self._checkers is not None and self._checkers[shard][1] is not None:
            checker, start = self._checkers[shard]
            try:
                checker.check_range(start + begin, start + end)
            except DamagedChunk as e:
                raise self._damaged(str(e)) from None
        return data[begin:end]


def shard_paths(prepared: PreparedSplit) -> list[Path]:
    """The shard files of a prepared split, in row order."""
    shards = prepared.manifest.get("shards")
    if not shards:
        raise RecipeError(f"{prepared.path} holds no shards; it was prepared by another recipe")
    return [prepared.path / name for name in shards]
