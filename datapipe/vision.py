"""The base of the prebuilt DataModules: a dataset's facts as class data, one constructor.

As in torchvision's ``mnist.py``, a dataset is declared, not coded: its name, mirrors,
resources, classes, dims and statistics are class attributes, and a variant is a
subclass that changes some of them (Fashion-MNIST is MNIST with other files, mirrors
and classes). :meth:`VisionDataModule.default_recipe` turns the facts into the
:class:`~datapipe.recipe.Recipe`; the constructor is lightning-bolts'
``VisionDataModule`` one, in its order, with its defaults wherever datapipe has no
measured reason to differ (docs/compatibility.md lists where and why it does):

    MNISTDataModule(data_dir, val_split=0.2, num_workers=0, normalize=False,
                    batch_size=32, seed=42, shuffle=True, pin_memory=False,
                    drop_last=False, train_transforms=None, ...)

Each default is read from where it lives (the split defaults from
:class:`~datapipe.splits.SplitSpec`, the loader's from :class:`~datapipe.stages.wrap.Wrap`,
``normalize`` from :class:`~datapipe.stages.transform.Transform`), never written again.

``augment=True`` adds the dataset's declared train-time batch ops
(``augmentation``); nothing is augmented unless asked, as in bolts.
``datapipe train`` asks.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar

from datapipe.datamodule import DataModule
from datapipe.errors import ConfigError
from datapipe.recipe import DatasetInfo, Recipe
from datapipe.splits import DEFAULT_SPLITS, Stratified, val_count
from datapipe.stages.clean import Clean, IDXClean
from datapipe.stages.download import Download, Resource
from datapipe.stages.source_layout import Decompressed


class VisionDataModule(DataModule):
    """A prebuilt image dataset: facts as class data, lightning-bolts' constructor."""

    # ------------------------------------------------------------ the facts
    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"  # bumped when what prepare writes changes
    mirrors: ClassVar[tuple[str, ...]] = ()
    resources: ClassVar[tuple[Resource, ...]] = ()
    #: Subfolders of a ``--source`` folder where the files may be (torchvision's layout).
    source_folders: ClassVar[tuple[str, ...]] = ()
    classes: ClassVar[list[str]] = []
    dims: ClassVar[tuple[int, ...]] = ()  # C x H x W of one sample as the loader yields it
    mean: ClassVar[tuple[float, ...] | None] = None  # None: computed on train at prepare
    std: ClassVar[tuple[float, ...] | None] = None
    description: ClassVar[str] = ""
    homepage: ClassVar[str] = ""
    license: ClassVar[str] = ""
    #: Rows of the train source split: ``num_samples`` before any data is prepared.
    train_samples: ClassVar[int | None] = None
    #: The whole-batch train ops ``augment=True`` adds (crop, flip, ...).
    augmentation: ClassVar[tuple[Any, ...]] = ()

    @classmethod
    def info(cls) -> DatasetInfo:
        return DatasetInfo(classes=tuple(cls.classes), dims=tuple(cls.dims), mean=cls.mean,
                           std=cls.std, description=cls.description, homepage=cls.homepage,
                           license=cls.license)

    @classmethod
    def download_stage(cls) -> Download:
        return Download(resources=tuple(cls.resources), mirrors=tuple(cls.mirrors),
                        source_folders=tuple(cls.source_folders))

    @classmethod
    def clean_stage(cls) -> Clean:
        raise NotImplementedError(f"{cls.__name__} declares no clean stage")

    @classmethod
    def default_recipe(cls) -> Recipe:
        """The recipe the class data declare."""
        return Recipe(name=cls.name, version=cls.version, info=cls.info(),
                      download=cls.download_stage(), clean=cls.clean_stage())

    # ------------------------------------------------------------ the constructor

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        val_split: int | float | str | None = DEFAULT_SPLITS.val,
        num_workers: int | None = None,
        normalize: bool | None = None,
        batch_size: int | None = None,
        seed: int = DEFAULT_SPLITS.seed,
        shuffle: bool | str | None = None,
        pin_memory: bool | None = None,
        drop_last: bool | None = None,
        train_transforms: Any = None,
        val_transforms: Any = None,
        test_transforms: Any = None,
        *,
        augment: bool = False,
        recipe: Recipe | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(augment, bool):
            raise ConfigError(f"augment must be True or False, got {augment!r}")
        recipe = recipe if recipe is not None else self.default_recipe()
        recipe = dataclasses.replace(recipe, transform=dataclasses.replace(
            recipe.transform, train=tuple(self.augmentation) if augment else ()))
        self.augment = augment
        super().__init__(
            recipe, data_dir=data_dir, val_split=val_split, num_workers=num_workers,
            normalize=normalize, batch_size=batch_size, seed=seed, shuffle=shuffle,
            pin_memory=pin_memory, drop_last=drop_last, train_transforms=train_transforms,
            val_transforms=val_transforms, test_transforms=test_transforms, **kwargs)

    def _declared_train_samples(self) -> int | None:
        if self.train_samples is None or self.splits.train != "train":
            return None  # only the whole train split has a declared size
        val = self.splits.val
        if isinstance(val, Stratified):  # the same count, spread over the classes
            val = val.val_split
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not val:
            return None if self.splits.has_val() else self.train_samples
        return self.train_samples - val_count(self.train_samples, val)


def idx_file(filename: str, md5: str, raw_md5: str | None = None,
             raw_size: int | None = None) -> Resource:
    """A gzipped IDX file and its decompressed form (what torchvision's ``raw/`` keeps),
    verified by ``raw_md5`` where its digest is known, else taken only unverified."""
    return Resource(filename, md5=md5, forms=(Decompressed(
        filename.removesuffix(".gz"), md5=raw_md5, size=raw_size),))


class IDXDataModule(VisionDataModule):
    """An MNIST-format dataset: four gzipped IDX files, training files first.

    A new one is a subclass that declares ``name``, ``mirrors``, ``resources`` (train
    images, train labels, test images, test labels, in torchvision's order; see
    :func:`idx_file`), ``classes`` and, for ``--source`` folders torchvision wrote,
    ``source_folders``; 28 x 28 gray images and 60,000 training samples are the defaults.
    """

    dims = (1, 28, 28)
    train_samples = 60000

    @classmethod
    def clean_stage(cls) -> Clean:
        train_images, train_labels, test_images, test_labels = (
            r.filename for r in cls.resources)
        return IDXClean(files={"train": (train_images, train_labels),
                               "test": (test_images, test_labels)},
                        num_classes=len(cls.classes))
