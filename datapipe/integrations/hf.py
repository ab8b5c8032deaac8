"""Hugging Face ``datasets`` both ways.

Into datapipe, any ``datasets.Dataset`` or ``DatasetDict`` is a recipe's source::

    dm = from_hf(load_dataset("ylecun/mnist"), name="mnist-hf", batch_size=128)
    dm = from_hf(ds, image_column="img", label_column="fine_label", image_size=32)

The data is already at hand, so the download stage has nothing to fetch; the clean
stage (:class:`HFClean`) holds the dataset and turns its image and label columns into
datapipe's uint8 N x C x H x W images and int64 labels. Its config carries each split's
``_fingerprint`` (the hash ``datasets`` names its own cache files by), so the same
dataset finds its prepared entry again and a changed one (another revision, a ``.map``)
makes a new one. Hub names, local folders and parquet/arrow files load with
:func:`load_hf`.

Out of datapipe, ``dm.to_hf("train")`` (:func:`to_hf`, in ``hf_export``) is a
``datasets.Dataset`` over the prepared Arrow file itself, memory-mapped, nothing
copied: the file is an Arrow IPC stream, what ``Dataset.from_file`` reads. A part
that is a subset of its source split (train minus val) is ``.select(indices)`` of it:
an indices mapping, the rows stay in the file. Images are one flat ``uint8`` list per
row (reshape to ``dm.dims``); labels are a ``ClassLabel`` with the recipe's class names.

``datasets`` and PIL are imported only when these functions run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from datapipe.errors import ConfigError, DatapipeError, FormatError
from datapipe.integrations.hf_export import datasets_module as _datasets
from datapipe.integrations.hf_export import to_hf
from datapipe.recipe import DatasetInfo, Recipe
from datapipe.stages.clean import Clean, validate_classification
from datapipe.stages.download import Download

if TYPE_CHECKING:
    from datapipe.datamodule import DataModule

BATCH_ROWS = 512
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
LOCAL_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json",
                  ".jsonl": "json"}


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


# ------------------------------------------------------------------ loading


def load_hf(path: str, *, config: str | None = None, revision: str | None = None,
            cache_dir: str | None = None) -> Any:
    """A ``DatasetDict`` (or ``Dataset``) from a hub name, a local folder or a data file.

    A folder written by ``save_to_disk`` loads with ``load_from_disk``; a single
    ``.parquet``/``.arrow``/``.csv``/``.json`` file becomes the train split; another
    folder goes to ``load_dataset`` (data files, imagefolder layouts); anything else is
    a hub name (``ylecun/mnist``), which needs the network once and then HF's cache.
    """
    datasets = _datasets()
    local = Path(path).expanduser()
    try:
        if local.is_dir() and any((local / marker).is_file()
                                  for marker in ("dataset_dict.json", "state.json")):
            return datasets.load_from_disk(str(local))
        if local.is_file():
            builder = LOCAL_BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise ConfigError(f"{local}: not a data file datasets reads (use one of "
                                  f"{', '.join(sorted(LOCAL_BUILDERS))}, or a folder)")
            return datasets.load_dataset(builder, data_files={"train": str(local)},
                                         cache_dir=cache_dir)
        if local.is_dir():
            return datasets.load_dataset(str(local), name=config, cache_dir=cache_dir)
        if str(path).startswith((".", "/", "~")) or local.suffix.lower() in LOCAL_BUILDERS:
            raise ConfigError(f"{path} does not exist; give a data file, a folder or a "
                              f"hub name such as ylecun/mnist")
        return datasets.load_dataset(str(path), name=config, revision=revision,
                                     cache_dir=cache_dir)
    except DatapipeError:
        raise
    except Exception as e:  # datasets raises many types, often over several lines
        hint = ""
        if isinstance(e, ConnectionError) or "offline" in str(e).lower():
            hint = ("; without network, give a local data file or folder (hub datasets "
                    "loaded before come from HF's cache with HF_HUB_OFFLINE=1)")
        raise ConfigError(f"cannot load the Hugging Face dataset {path!r}: {_one_line(e)}"
                          f"{hint}") from None


# ------------------------------------------------------------------ columns -> arrays


def _is(feature: Any, name: str) -> bool:
    return type(feature).__name__ == name


def _pil_to_chw(image: Any, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    """A PIL image as uint8 C x H x W: converted, and fitted to ``size`` when given."""
    from PIL import Image, ImageOps

    mode = "L" if channels == 1 else "RGB"
    if image.mode != mode:
        image = image.convert(mode)
    if size is not None and image.size != (size[1], size[0]):
        image = ImageOps.fit(image, (size[1], size[0]), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _array_to_chw(value: Any, channels: int, size: tuple[int, int] | None,
                  where: str) -> np.ndarray:
    """A pixel array (H x W, H x W x C or C x H x W) as uint8 C x H x W."""
    array = np.asarray(value)
    if array.dtype == object or array.ndim not in (2, 3):
        raise FormatError(f"{where}: expected an image or a 2-d/3-d pixel array, got "
                          f"{array.dtype} of shape {array.shape}")
    if array.ndim == 2:
        array = array[None]
    elif array.shape[-1] in (1, 3, 4) and array.shape[0] not in (1, 3):
        array = array.transpose(2, 0, 1)  # H x W x C
    if array.dtype != np.uint8:
        if (not np.issubdtype(array.dtype, np.integer)
                or (array.size and (array.min() < 0 or array.max() > 255))):
            raise FormatError(f"{where}: pixel values must be integers in 0..255, got "
                              f"{array.dtype}")
        array = array.astype(np.uint8)
    array = array[:3]  # an alpha channel goes
    if array.shape[0] != channels:
        if array.shape[0] == 1:
            array = np.repeat(array, channels, axis=0)
        else:
            raise FormatError(f"{where}: {array.shape[0]}-channel pixels, but {channels} "
                              f"channel(s) were asked for")
    if size is not None and array.shape[1:] != tuple(size):
        from PIL import Image

        image = Image.fromarray(array[0] if channels == 1 else array.transpose(1, 2, 0))
        return _pil_to_chw(image, channels, size)
    return array


def _to_chw(value: Any, kind: str, channels: int, size: tuple[int, int] | None,
            where: str) -> np.ndarray:
    if value is None:
        raise FormatError(f"{where}: the image is missing (None)")
    if kind == "image":
        return _pil_to_chw(value, channels, size)
    return _array_to_chw(value, channels, size, where)


def _column_kind(feature: Any) -> str:
    return "image" if _is(feature, "Image") else "array"


# ------------------------------------------------------------------ the clean stage


@dataclass(frozen=True)
class HFClean(Clean):
    """The image and label columns of Hugging Face datasets as datapipe columns.

    ``dataset`` maps each source split to a ``datasets.Dataset``; it is no part of the
    config, which carries each split's ``_fingerprint`` instead. ``label_values`` lists
    the label of each class when the label column holds names rather than class ids.
    ``image_size`` of None keeps the images' own size (all must share it).
    """

    dataset: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    image_column: str = "image"
    label_column: str = "label"
    classes: tuple[str, ...] = ()
    label_values: tuple[str, ...] = ()
    image_size: tuple[int, int] | None = None
    dims: tuple[int, int, int] = (3, 32, 32)  # C x H x W of every stored image
    source: str = "in memory"  # where the dataset came from, for the data card

    def config(self) -> dict[str, Any]:
        config = super(HFClean, dataclasses.replace(self, dataset={})).config()
        del config["dataset"]
        config["fingerprints"] = {split: getattr(ds, "_fingerprint", None)
                                  for split, ds in self.dataset.items()}
        return config

    def splits(self) -> tuple[str, ...]:
        return tuple(self.dataset)

    def files_for(self, split: str) -> tuple[str, ...]:
        if split not in self.dataset:
            raise self._unknown_split(split)
        return ()  # the dataset is in hand: nothing to download

    def __call__(self, split: str, files: Mapping[str, Path]) -> dict[str, np.ndarray]:
        self.files_for(split)
        ds = self.dataset[split].select_columns([self.image_column, self.label_column])
        ds = ds.with_format(None)
        where = f"{self.source} ({split})"
        kind = _column_kind(ds.features[self.image_column])
        channels, size = self.dims[0], tuple(self.dims[1:])
        images = np.empty((len(ds), *self.dims), np.uint8)
        rows = ds if kind == "image" else ds.with_format("numpy")
        for start in range(0, len(ds), BATCH_ROWS):
            batch = rows[start:start + BATCH_ROWS][self.image_column]
            for i, value in enumerate(batch):
                row = f"{where} row {start + i}, column {self.image_column!r}"
                image = _to_chw(value, kind, channels, self.image_size, row)
                if image.shape[1:] != size:
                    raise FormatError(f"{row}: {image.shape[2]}x{image.shape[1]} pixels, "
                                      f"but the first image has {size[1]}x{size[0]}; pass "
                                      f"image_size= to fit them all to one size")
                images[start + i] = image
        raw = ds.select_columns([self.label_column]).with_format("numpy")[:][self.label_column]
        if self.label_values:
            lookup = {value: i for i, value in enumerate(self.label_values)}
            labels = np.array([lookup[v] for v in np.asarray(raw).tolist()], np.int64)
        else:
            labels = np.asarray(raw).astype(np.int64)
        return validate_classification({"image": images, "label": labels}, len(self.classes),
                                       where)


# ------------------------------------------------------------------ dataset -> recipe


def _as_splits(dataset: Any) -> dict[str, Any]:
    datasets = _datasets()
    if isinstance(dataset, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise ConfigError("a streaming (iterable) dataset cannot be prepared; load it "
                          "without streaming=True")
    if isinstance(dataset, datasets.Dataset):
        return {str(dataset.split or "train"): dataset}
    if isinstance(dataset, Mapping) and all(isinstance(d, datasets.Dataset)
                                            for d in dataset.values()):
        if not dataset:
            raise ConfigError("the DatasetDict has no splits")
        return {str(name): d for name, d in dataset.items()}
    raise ConfigError(f"expected a datasets.Dataset or DatasetDict, got {type(dataset).__name__}")


def _pick_column(splits: Mapping[str, Any], wanted: str | None, role: str, feature_type: str,
                 names: tuple[str, ...], source: str) -> str:
    """The column named ``wanted``, else the first of type ``feature_type``, else by name."""
    first = next(iter(splits.values()))
    columns = list(first.column_names)
    if wanted is None:
        wanted = next((c for c in columns if _is(first.features[c], feature_type)),
                      next((c for c in names if c in columns), None))
        if wanted is None:
            raise ConfigError(f"{source} has no {role} column that datapipe can recognize; "
                              f"its columns are {', '.join(columns)}; pass {role}_column=")
    for split, ds in splits.items():
        if wanted not in ds.column_names:
            raise ConfigError(f"{source} ({split}) has no column {wanted!r}; its columns are "
                              f"{', '.join(ds.column_names)}; pass {role}_column=")
    return wanted


def _label_classes(splits: Mapping[str, Any], column: str,
                   source: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(class names, label values): values are () when labels already are class ids."""
    features = [ds.features[column] for ds in splits.values()]
    if _is(features[0], "ClassLabel"):
        names = tuple(features[0].names)
        if any(not _is(f, "ClassLabel") or tuple(f.names) != names for f in features):
            raise ConfigError(f"{source}: the splits' {column!r} columns have different "
                              f"class names")
        return names, ()
    values: set[Any] = set()
    for ds in splits.values():
        values.update(ds.unique(column))
    if values and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                      for v in values):
        if min(values) < 0:
            raise ConfigError(f"{source}: label column {column!r} holds {min(values)}; "
                              f"class ids must be 0 or more (unlabeled rows?)")
        return tuple(str(i) for i in range(int(max(values)) + 1)), ()
    if values and all(isinstance(v, str) for v in values):
        names = tuple(sorted(values))
        return names, names
    kinds = sorted({type(v).__name__ for v in values}) or ["nothing"]
    raise ConfigError(f"{source}: label column {column!r} holds {', '.join(kinds)}; expected "
                      f"class ids, class names or a ClassLabel")


def _first_image(splits: Mapping[str, Any], column: str, kind: str, where: str) -> Any:
    for ds in splits.values():
        if len(ds):
            rows = ds.with_format(None) if kind == "image" else ds.with_format("numpy")
            return rows[0][column]
    raise ConfigError(f"{where} has no rows")


def _channels_of(value: Any, kind: str, feature: Any) -> int:
    if kind == "image":
        mode = getattr(feature, "mode", None) or value.mode
        return 1 if mode in GRAY_MODES else 3
    array = np.asarray(value)
    if array.ndim == 2:
        return 1
    channels = array.shape[-1] if array.shape[-1] in (1, 3, 4) and array.shape[0] not in (
        1, 3) else array.shape[0]
    return 1 if channels == 1 else 3


def hf_recipe(dataset: Any, *, name: str = "hf", version: str = "1",
              image_column: str | None = None, label_column: str | None = None,
              image_size: int | tuple[int, int] | None = None, channels: int | None = None,
              source: str | None = None, description: str = "") -> Recipe:
    """A recipe whose source is ``dataset`` (a ``Dataset`` or ``DatasetDict``).

    Columns default to the first ``Image`` and ``ClassLabel`` features (else columns
    named image/img and label/labels); ``image_size`` fits every image to one size
    (default: the images' own, which must then agree); ``channels`` 1 or 3 (default:
    from the first image).
    """
    splits = _as_splits(dataset)
    where = f"Hugging Face dataset {source or 'in memory'}"
    image_column = _pick_column(splits, image_column, "image", "Image",
                                ("image", "img", "pixel_values", "pixels"), where)
    label_column = _pick_column(splits, label_column, "label", "ClassLabel",
                                ("label", "labels"), where)
    classes, label_values = _label_classes(splits, label_column, where)
    feature = next(iter(splits.values())).features[image_column]
    kind = _column_kind(feature)
    first = _first_image(splits, image_column, kind, where)
    if channels is None:
        channels = _channels_of(first, kind, feature)
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 (gray) or 3 (RGB), got {channels!r}")
    size = None
    if image_size is not None:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise ConfigError(f"image_size must be a positive int or (height, width), got "
                              f"{image_size!r}")
    dims = (channels, *_to_chw(first, kind, channels, size, f"{where} row 0").shape[1:])
    info = next(iter(splits.values())).info
    clean = HFClean(dataset=splits, image_column=image_column, label_column=label_column,
                    classes=classes, label_values=label_values, image_size=size,
                    dims=dims, source=source or "in memory")
    return Recipe(
        name=name, version=version,
        info=DatasetInfo(classes=classes, dims=dims,
                         description=description or getattr(info, "description", "") or
                         f"{where}",
                         homepage=getattr(info, "homepage", "") or "",
                         license=getattr(info, "license", "") or ""),
        download=Download(resources=()),  # nothing to fetch: the dataset is in hand
        clean=clean,
    )


def from_hf(dataset: Any, *, name: str = "hf", version: str = "1",
            image_column: str | None = None, label_column: str | None = None,
            image_size: int | tuple[int, int] | None = None, channels: int | None = None,
            source: str | None = None, **overrides: Any) -> DataModule:
    """A DataModule over ``dataset``; ``overrides`` are DataModule arguments.

    Split defaults follow the dataset's own: train is ``train``, val is ``validation``
    (or ``valid``/``val``) when there is one, test is ``test`` when there is one.
    """
    from datapipe.datamodule import DataModule

    recipe = hf_recipe(dataset, name=name, version=version, image_column=image_column,
                       label_column=label_column, image_size=image_size, channels=channels,
                       source=source)
    splits = recipe.splits()
    defaults = {
        "train_split": "train" if "train" in splits else splits[0],
        "val_split": next((s for s in ("validation", "valid", "val") if s in splits), 0),
        "test_split": "test" if "test" in splits else None,
    }
    return DataModule(recipe, **{**defaults, **overrides})


__all__ = ["HFClean", "from_hf", "hf_recipe", "load_hf", "to_hf"]
