"""datapipe -> Hugging Face: a prepared split as a ``datasets.Dataset``, nothing copied.

Apart from ``hf.py`` (datasets -> datapipe) so that ``DataModule.to_hf`` can import it
without an import circle: this side never builds a DataModule, it only reads one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from datapipe.errors import ConfigError

if TYPE_CHECKING:
    from datapipe.datamodule import DataModule


def datasets_module():
    try:
        import datasets
    except ImportError:
        raise ConfigError("Hugging Face datasets is not installed; pip install datasets") from None
    return datasets


def _features(path: Path, classes: list[str]) -> Any:
    """The file's own features, with the label column as a ClassLabel of ``classes``."""
    import pyarrow as pa

    datasets = datasets_module()
    with pa.memory_map(str(path), "r") as source:
        schema = pa.ipc.open_stream(source).schema
    features = datasets.Features.from_arrow_schema(schema)
    if "label" in features and schema.field("label").type == pa.int64() and classes:
        features["label"] = datasets.ClassLabel(names=classes)
    return features


def to_hf(dm: DataModule, split: str = "train") -> Any:
    """``split`` of ``dm`` as a ``datasets.Dataset`` over the prepared Arrow files.

    ``split`` is a part of the module's split plan (train, val, test, predict) or,
    failing that, a source split of its recipe (the whole prepared file). Nothing is
    copied: the files are memory-mapped, and a part that takes some rows of its source
    split is ``.select(indices)`` of it. A part over several source splits
    (``train+test``) is their concatenation, selected the same way.
    """
    datasets = datasets_module()
    parts = dm.plan_splits().parts
    if split in parts:
        part = [(source, np.asarray(rows)) for source, rows in parts[split]]
    elif split in dm.recipe.splits():
        part = [(split, None)]
    else:
        known = sorted(set(parts) | set(dm.recipe.splits()))
        raise ConfigError(f"{dm.name} has no split {split!r}; it has {', '.join(known)}")
    sources = list(dict.fromkeys(source for source, _ in part))
    files = {s: dm._find(s) for s in sources}
    for prepared in files.values():  # datasets reads the files itself: check them first
        prepared.check()
    info = datasets.DatasetInfo(
        description=f"datapipe {dm.name} {split}: image is uint8 "
                    f"{'x'.join(map(str, dm.dims))} per row, flattened",
        features=_features(files[sources[0]].data_files[0], dm.classes))
    tables = {}
    for s in sources:  # a sharded split is the concatenation of its shards, still mapped
        shards = [datasets.Dataset.from_file(str(f), info=info.copy())
                  for f in files[s].data_files]
        tables[s] = shards[0] if len(shards) == 1 else datasets.concatenate_datasets(shards)
    offsets, total = {}, 0
    for s in sources:
        offsets[s], total = total, total + files[s].rows
    whole = (tables[sources[0]] if len(sources) == 1
             else datasets.concatenate_datasets([tables[s] for s in sources]))
    if part[0][1] is None:  # a whole source split
        return whole
    indices = np.concatenate([offsets[s] + (np.arange(files[s].rows) if rows is None else rows)
                              for s, rows in part])
    if len(indices) == total and np.array_equal(indices, np.arange(total)):
        return whole
    return whole.select(indices)
