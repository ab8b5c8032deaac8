"""The load stage: memory-map a prepared Arrow file into numpy arrays, zero copy.

The arrays are views of the page cache, shared between DataLoader workers and between
processes on the machine. A prepared split is read with the digests its manifest
promised (``dataset`` binds them): each process checks the whole file in one pass when
it maps it (``datapipe.integrity``), before a byte of it is parsed or served, and its
row count against the manifest's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from datapipe.errors import CacheError
from datapipe.integrity import ChunkChecker, DamagedChunk
from datapipe.stages.base import Stage
from datapipe.stages.save import SHAPE_KEY

if TYPE_CHECKING:
    from datapipe.manifest import PreparedSplit, Promise
    from datapipe.stages.transform import Transform


def _primitive_view(array) -> np.ndarray:
    """A numpy view of a fixed-width Arrow array without nulls.

    Read straight from its data buffer: ``Array.to_numpy`` would do the same but
    imports pandas on first use, a third of a second in every new worker process.
    """
    import pyarrow as pa

    if array.null_count or not pa.types.is_primitive(array.type) or pa.types.is_boolean(
            array.type):
        return array.to_numpy(zero_copy_only=False)
    dtype = np.dtype(array.type.to_pandas_dtype())
    return np.frombuffer(array.buffers()[1], dtype=dtype, count=len(array),
                         offset=array.offset * dtype.itemsize)


def _column_view(column, field) -> np.ndarray:
    import pyarrow as pa

    if column.num_chunks != 1:
        # Files we write hold one record batch; others are concatenated (a copy).
        column = pa.chunked_array([pa.concat_arrays(column.chunks)])
    chunk = column.chunk(0)
    if pa.types.is_fixed_size_list(chunk.type):
        shape = json.loads(field.metadata[SHAPE_KEY]) if field.metadata else [chunk.type.list_size]
        size = chunk.type.list_size
        flat = _primitive_view(chunk.values)[chunk.offset * size:(chunk.offset + len(chunk)) * size]
        return flat.reshape(len(chunk), *shape)
    return _primitive_view(chunk)


@dataclass(frozen=True)
class ArrowLoad(Stage):
    """Read ``<split>.arrow`` written by ArrowSave as a dict of numpy arrays."""

    kind = "load"

    def dataset(self, sources: Mapping[str, PreparedSplit],
                parts: Sequence[tuple[str, np.ndarray]], *, train: bool,
                transform: Transform) -> Any:
        """The torch Dataset of one split: rows ``parts`` of the prepared ``sources``.

        Training splits get the transform's batch augmentations; every split stays
        uint8 until ``transform.on_device``.
        """
        from datapipe.loader import ArrayDataset

        files = {name: prepared.data_file for name, prepared in sources.items()}
        checked = CheckedLoad(self, {str(p.data_file): p.promise() for p in sources.values()})
        augment = transform.augment if train and transform.train else None
        return ArrayDataset(files, parts, checked, augment=augment)

    def __call__(self, path: Path, promise: Promise | None = None) -> dict[str, np.ndarray]:
        """The columns of the Arrow file ``path``; checked first against ``promise``.

        Without a promise the file is read as it is: for files outside the cache.
        """
        import pyarrow as pa

        try:
            with pa.memory_map(str(path), "r") as source:
                if promise is not None:
                    whole = source.read_buffer()  # the map itself: no copy
                    ChunkChecker(whole, promise.digests(path)).check_all()
                    source.seek(0)
                table = pa.ipc.open_stream(source).read_all()
        except DamagedChunk as e:
            raise promise.damaged(str(e)) from None
        except (OSError, pa.ArrowInvalid) as e:
            if promise is not None:
                raise promise.damaged(f"{Path(path).name} cannot be read ({e})") from None
            raise CacheError(
                f"cannot read prepared file {path}: {e}; run `datapipe prepare` with --force"
            ) from None
        if promise is not None and table.num_rows != promise.rows:
            raise promise.damaged(f"{Path(path).name} holds {table.num_rows} rows, the "
                                  f"manifest says {promise.rows}")
        return {
            name: _column_view(table.column(name), table.schema.field(name))
            for name in table.column_names
        }


@dataclass(frozen=True)
class CheckedLoad:
    """An ArrowLoad bound to the promises of the prepared files it reads (by path).

    This is what a dataset calls to map its files, in each process that reads them;
    it pickles as the paths' promises (digests), never as data.
    """

    load: ArrowLoad
    promises: Mapping[str, Promise]

    def __call__(self, path: Path) -> dict[str, np.ndarray]:
        promise = self.promises.get(str(path))
        if promise is None:
            raise CacheError(f"{path} is not a prepared file this dataset was given")
        return self.load(path, promise)
