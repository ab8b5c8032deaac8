"""The load stage: memory-map a prepared Arrow file into numpy arrays, zero copy.

Nothing is read until a row is touched; the arrays are views of the page cache,
shared between DataLoader workers and between processes on the machine.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from datapipe.errors import CacheError
from datapipe.stages.base import Stage
from datapipe.stages.save import SHAPE_KEY

if TYPE_CHECKING:
    from datapipe.prepare import PreparedSplit
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
        augment = transform.augment if train and transform.train else None
        return ArrayDataset(files, parts, self, augment=augment)

    def __call__(self, path: Path) -> dict[str, np.ndarray]:
        import pyarrow as pa

        try:
            with pa.memory_map(str(path), "r") as source:
                table = pa.ipc.open_stream(source).read_all()
        except (OSError, pa.ArrowInvalid) as e:
            raise CacheError(
                f"cannot read prepared file {path}: {e}; run `datapipe prepare` with --force"
            ) from None
        return {
            name: _column_view(table.column(name), table.schema.field(name))
            for name in table.column_names
        }
