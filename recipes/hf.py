"""Any Hugging Face ``datasets`` image classification dataset, as a recipe.

    datapipe --recipes recipes/ prepare hf --source ylecun/mnist        # a hub name (online)
    datapipe --recipes recipes/ prepare hf --source ~/data/pets.parquet # a data file (offline)
    datapipe --recipes recipes/ prepare hf --source ~/data/saved        # save_to_disk / a folder
    dm = datapipe.load("hf", path="uoft-cs/cifar10", image_column="img", label_column="label")
    dm = datapipe.load("hf", dataset=my_dataset_dict, image_size=64)    # an object in hand

Columns default to the first ``Image`` and ``ClassLabel`` features; the dataset's
train/validation/test splits become the module's train/val/test. Everything else
is ``datapipe.integrations.hf`` (``from_hf``, ``load_hf``).
"""

from __future__ import annotations

from typing import Any

import datapipe
from datapipe import ConfigError, DataModule


@datapipe.register("hf")
def hf(path: str | None = None, *, dataset: Any = None, source: str | None = None,
       config: str | None = None, revision: str | None = None,
       image_column: str | None = None, label_column: str | None = None,
       image_size: int | tuple[int, int] | None = None, channels: int | None = None,
       **overrides: Any) -> DataModule:
    """The dataset at ``path`` (``--source``: a hub name, folder or data file), or ``dataset``."""
    from datapipe.integrations.hf import from_hf, load_hf

    path = path if path is not None else source
    if dataset is None:
        if path is None:
            raise ConfigError("hf needs a dataset: datapipe.load('hf', path=NAME_OR_PATH) or "
                              "dataset=OBJECT, or `datapipe prepare hf --source "
                              "NAME_OR_PATH`")
        if overrides.get("quiet"):
            import datasets

            datasets.disable_progress_bars()
        dataset = load_hf(str(path), config=config, revision=revision)
    return from_hf(dataset, name="hf", image_column=image_column, label_column=label_column,
                   image_size=image_size, channels=channels,
                   source=str(path) if path is not None else None, **overrides)
