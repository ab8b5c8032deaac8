"""The save stage: write a split's columns to an Arrow file that loads zero-copy.

The file is in the Arrow IPC *stream* format (what ``datasets.Dataset.from_file``
reads) with one record batch, so each column is one contiguous buffer once
memory-mapped. An n-dimensional column is stored flat, as a fixed-size list per
row, with its per-row shape in the field metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datapipe.stages.base import Stage

SHAPE_KEY = b"datapipe.shape"


def _arrow_column(values: np.ndarray):
    import pyarrow as pa

    if values.ndim == 1:
        return pa.array(values), None
    row = int(np.prod(values.shape[1:]))
    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, row), list(values.shape[1:])


@dataclass(frozen=True)
class ArrowSave(Stage):
    """Write columns to ``<folder>/<split>.arrow``."""

    kind = "save"

    def file_name(self, split: str) -> str:
        return f"{split}.arrow"

    def __call__(self, columns: dict[str, np.ndarray], folder: Path, split: str) -> Path:
        import pyarrow as pa

        arrays, fields = [], []
        for name, values in columns.items():
            array, shape = _arrow_column(values)
            meta = {SHAPE_KEY: json.dumps(shape).encode()} if shape is not None else None
            arrays.append(array)
            fields.append(pa.field(name, array.type, nullable=False, metadata=meta))
        batch = pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))
        path = folder / self.file_name(split)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_batch(batch)
        return path

    def describe(self, columns: dict[str, np.ndarray]) -> dict[str, Any]:
        """Per column: dtype and per-row shape, for the manifest."""
        return {
            name: {"dtype": str(values.dtype), "shape": list(values.shape[1:])}
            for name, values in columns.items()
        }
