"""MNIST: 70,000 handwritten digits, 28 x 28 grayscale, 10 classes.

The facts are declared below (files, official md5s, mirrors, classes, statistics) as
the class data of an IDXDataModule; the IDX stages do the rest. Mirrors, in order: the
PyTorch S3 mirror, then Yann LeCun's site.
"""

from __future__ import annotations

from datapipe.stages.download import Resource
from datapipe.stages.source_layout import Decompressed
from datapipe.vision import IDXDataModule

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

# torchvision's MNIST leaves the files decompressed in MNIST/raw/ (beside the .gz or
# instead of it); these are the digests of the decompressed official files, so such a
# folder is verified too. The md5s and sha256s of the test files and the train labels
# were computed here from the official archives; the train images' md5 is the one several
# independent loaders publish for the decompressed file (its archive was not at hand to
# recompute it), its size that of the IDX header's 60000 x 28 x 28 bytes plus 16.
RESOURCES = (
    Resource("train-images-idx3-ubyte.gz", md5="f68b3c2dcbeaaa9fbdd348bbdeb94873", size=9912422,
             forms=(Decompressed("train-images-idx3-ubyte",
                                 md5="6bbc9ace898e44ae57da46a324031adb", size=47040016),)),
    Resource("train-labels-idx1-ubyte.gz", md5="d53e105ee54ea40749a09fcbcd1e9432", size=28881,
             forms=(Decompressed(
                 "train-labels-idx1-ubyte", md5="a25bea736e30d166cdddb491f175f624",
                 sha256="65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                 size=60008),)),
    Resource("t10k-images-idx3-ubyte.gz", md5="9fb629c4189551a2d022fa330f9573f3", size=1648877,
             forms=(Decompressed(
                 "t10k-images-idx3-ubyte", md5="2646ac647ad5339dbf082846283269ea",
                 sha256="0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                 size=7840016),)),
    Resource("t10k-labels-idx1-ubyte.gz", md5="ec29112dd5afa0611ce80d1b7f02629c", size=4542,
             forms=(Decompressed(
                 "t10k-labels-idx1-ubyte", md5="27ae3e4e09519cfbb04c329615203637",
                 sha256="ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
                 size=10008),)),
)

# Where torchvision keeps them under the folder given as --source: DIR may be
# torchvision's root, its MNIST/ folder, or MNIST/raw itself.
SOURCE_FOLDERS = ("raw", "MNIST/raw")

CLASSES = (
    "0 - zero", "1 - one", "2 - two", "3 - three", "4 - four",
    "5 - five", "6 - six", "7 - seven", "8 - eight", "9 - nine",
)

class MNISTDataModule(IDXDataModule):
    """MNIST with the constructor of lightning-bolts' MNISTDataModule (see VisionDataModule).

    ``val_split`` (0.2 by default) is carved from the 60,000 training images with
    ``seed``; ``normalize=True`` applies mean 0.1307 / std 0.3081 on the device,
    ``normalize=False`` (the default) only scales to [0, 1]. Other keywords go to
    DataModule (``mirrors``, ``source``, ``verify``, split specs, ...).
    """

    name = "mnist"
    mirrors = MIRRORS
    resources = RESOURCES
    source_folders = SOURCE_FOLDERS
    classes = list(CLASSES)
    # The statistics of the 60,000 training images every MNIST example uses.
    mean = (0.1307,)
    std = (0.3081,)
    description = "Handwritten digits: 60,000 training and 10,000 test images, 28x28 gray."
    homepage = "http://yann.lecun.com/exdb/mnist/"
    license = "CC BY-SA 3.0"


RECIPE = MNISTDataModule.default_recipe()
