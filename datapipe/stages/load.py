"""The load stage: memory-map a prepared Arrow file into numpy arrays, zero copy.

Nothing is read until a row is touched; the arrays are views of the page cache,
shared between DataLoader workers and between processes on the machine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datapipe.errors import CacheError
from datapipe.stages.base import Stage
from datapipe.stages.save import SHAPE_KEY


def _column_view(column, field) -> np.ndarray:
    import pyarrow as pa

    if column.num_chunks != 1:
        # Files we write hold one record batch; others are concatenated (a copy).
        column = pa.chunked_array([pa.concat_arrays(column.chunks)])
    chunk = column.chunk(0)
    if pa.types.is_fixed_size_list(chunk.type):
        shape = json.loads(field.metadata[SHAPE_KEY]) if field.metadata else [chunk.type.list_size]
        flat = chunk.values.to_numpy(zero_copy_only=True)
        return flat.reshape(len(chunk), *shape)
    return chunk.to_numpy(zero_copy_only=True)


@dataclass(frozen=True)
class ArrowLoad(Stage):
    """Read ``<split>.arrow`` written by ArrowSave as a dict of numpy arrays."""

    kind = "load"

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
