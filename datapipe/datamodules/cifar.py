"""CIFAR-10 and CIFAR-100: 60,000 colour images of 32 x 32, 10 or 100 (20 coarse) classes.

The facts are declared below: the official "python version" tarballs with their
official md5s and sizes, the Toronto mirror, the members of each split, the class
names (checked against the archive's meta file at prepare time) and the usual
normalization statistics, as the class data of each DataModule. CIFARClean reads the
pickled batches straight out of the tarball with an unpickler that never runs code;
with ``augment=True`` training batches get a random 4-pixel-padded crop and a
horizontal flip as whole-batch ops.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from datapipe.errors import ConfigError
from datapipe.recipe import Recipe
from datapipe.stages.augment import RandomCrop, RandomHorizontalFlip
from datapipe.stages.clean import CIFARClean
from datapipe.stages.download import Download, Resource
from datapipe.stages.source_layout import Extracted
from datapipe.vision import VisionDataModule

MIRRORS = ("https://www.cs.toronto.edu/~kriz/",)
HOMEPAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"
LICENSE = "no license stated; cite Krizhevsky (2009), see the homepage"

# The standard CIFAR training augmentation (as in torchvision's and bolts' examples).
TRAIN_AUGMENT = (RandomCrop(32, padding=4), RandomHorizontalFlip(0.5))

CIFAR10_FOLDER = "cifar-10-batches-py"
# torchvision leaves the tarball extracted beside it (or instead of it); the md5 of each
# extracted file is torchvision's (its CIFAR10.train_list, test_list and meta), so such
# a folder is verified too.
CIFAR10_EXTRACTED = Extracted(CIFAR10_FOLDER, (
    ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
    ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
    ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
    ("data_batch_4", "634d18415352ddfa80567beed471001a"),
    ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
    ("test_batch", "40351d587109b95175f43aff81a1287e"),
    ("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
))
CIFAR10_ARCHIVE = Resource("cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a",
                           size=170498071, forms=(CIFAR10_EXTRACTED,))
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

CIFAR100_FOLDER = "cifar-100-python"
CIFAR100_EXTRACTED = Extracted(CIFAR100_FOLDER, (  # torchvision's md5s, as for CIFAR-10
    ("train", "16019d7e3df5f24257cddd939b257f8d"),
    ("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),
    ("meta", "7973b15100ade9c7d40fb424638fde48"),
))
CIFAR100_ARCHIVE = Resource("cifar-100-python.tar.gz", md5="eb9058c3a382ffc7106e4002c42a8d85",
                            size=169001437, forms=(CIFAR100_EXTRACTED,))
CIFAR100_FINE_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)
CIFAR100_COARSE_CLASSES = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates", "people",
    "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2",
)
CIFAR100_LABELS = ("fine", "coarse")

class CIFARDataModule(VisionDataModule):
    """A CIFAR dataset: one "python version" tarball of pickled batches.

    Class data beyond VisionDataModule's: the ``archive`` resource, the ``members`` of
    each split inside it, the ``meta`` member and its keys. CIFARClean reads the pickled
    batches straight out of the tarball with an unpickler that never runs code.
    """

    mirrors = MIRRORS
    homepage = HOMEPAGE
    license = LICENSE
    dims = (3, 32, 32)
    train_samples = 50000
    augmentation = TRAIN_AUGMENT
    archive: ClassVar[Resource]
    members: ClassVar[dict[str, tuple[str, ...]]]
    meta: ClassVar[str]
    label_key: ClassVar[str] = "labels"
    names_key: ClassVar[str] = "label_names"

    @classmethod
    def download_stage(cls) -> Download:
        return Download(resources=(cls.archive,), mirrors=tuple(cls.mirrors))

    @classmethod
    def clean_stage(cls) -> CIFARClean:
        return CIFARClean(archive=cls.archive.filename, members=cls.members, meta=cls.meta,
                          classes=tuple(cls.classes), label_key=cls.label_key,
                          names_key=cls.names_key)


class CIFAR10DataModule(CIFARDataModule):
    """CIFAR-10 with the constructor of lightning-bolts' CIFAR10DataModule.

    ``val_split`` (0.2 by default) is carved from the 50,000 training images with
    ``seed``; ``normalize=True`` applies the declared mean/std on the device,
    ``normalize=False`` (the default) only scales to [0, 1]. ``augment=True`` gives the
    train split a random crop (4-pixel zero padding) and a horizontal flip, seeded per
    batch (off by default, as in bolts; ``datapipe train`` turns it on); val and test are
    never augmented. Other keywords go to DataModule (``mirrors``, ``source``, ...).
    """

    name = "cifar10"
    archive = CIFAR10_ARCHIVE
    members = {
        "train": tuple(f"{CIFAR10_FOLDER}/data_batch_{i}" for i in range(1, 6)),
        "test": (f"{CIFAR10_FOLDER}/test_batch",),
    }
    meta = f"{CIFAR10_FOLDER}/batches.meta"
    classes = list(CIFAR10_CLASSES)
    # The per-channel statistics of the 50,000 training images.
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    description = ("Tiny colour images: 50,000 training and 10,000 test images, 32x32, "
                   "10 classes.")


class CIFAR100DataModule(CIFARDataModule):
    """CIFAR-100 with lightning-bolts' arguments; ``labels="coarse"`` for the 20 superclasses.

    Everything else is as CIFAR10DataModule: ``val_split=0.2`` carved from train,
    normalization on the device when asked, crop + flip on the train split when
    ``augment=True``. A ``recipe=`` keyword (a replaced recipe) is used as given.
    """

    name = "cifar100"
    archive = CIFAR100_ARCHIVE
    members = {"train": (f"{CIFAR100_FOLDER}/train",), "test": (f"{CIFAR100_FOLDER}/test",)}
    meta = f"{CIFAR100_FOLDER}/meta"
    classes = list(CIFAR100_FINE_CLASSES)
    label_key = "fine_labels"
    names_key = "fine_label_names"
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    description = ("Tiny colour images: 50,000 training and 10,000 test images, 32x32, "
                   "100 fine classes in 20 coarse ones.")

    def __init__(self, *args: Any, labels: str = "fine", **kwargs: Any) -> None:
        recipe = kwargs.pop("recipe", None)
        default = cifar100_recipe(labels)  # checks ``labels`` either way
        super().__init__(*args, recipe=recipe if recipe is not None else default, **kwargs)
        self.classes = list(self.recipe.info.classes)  # the coarse names with labels="coarse"


CIFAR10_RECIPE = CIFAR10DataModule.default_recipe()
CIFAR100_RECIPE = CIFAR100DataModule.default_recipe()


def cifar100_recipe(labels: str = "fine") -> Recipe:
    """The CIFAR-100 recipe with its 100 ``fine`` labels or its 20 ``coarse`` ones.

    The choice is part of the clean stage's config, so each has its own prepared entry.
    """
    if labels not in CIFAR100_LABELS:
        raise ConfigError(f"labels must be 'fine' or 'coarse', got {labels!r}")
    recipe = CIFAR100_RECIPE
    if labels == "fine":
        return recipe
    return dataclasses.replace(
        recipe,
        info=dataclasses.replace(recipe.info, classes=CIFAR100_COARSE_CLASSES),
        clean=dataclasses.replace(recipe.clean, classes=CIFAR100_COARSE_CLASSES,
                                  label_key="coarse_labels", names_key="coarse_label_names"),
    )
