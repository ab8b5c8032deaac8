"""Kuzushiji-MNIST, written exactly as a user writes a recipe: declaration only.

    datapipe --recipes recipes/ prepare kmnist

70,000 28x28 grayscale images of ten cursive Japanese (Kuzushiji) hiragana, from the
ROIS-DS Center for Open Data in the Humanities, in MNIST's IDX format: an
IDXDataModule that names its files, mirror and classes. File names and md5s are the
official ones.
"""

import datapipe
from datapipe import IDXDataModule, idx_file


@datapipe.register("kmnist")
class KMNISTDataModule(IDXDataModule):
    """KMNIST; 20% of the 60,000 training images are held out for validation."""

    name = "kmnist"
    mirrors = ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",)
    # torchvision's KMNIST/raw/ holds the files decompressed too. No digest of the
    # decompressed files is published, so such a file is taken only unverified
    # (--no-verify), with a warning; the .gz beside it is verified as usual.
    resources = (
        idx_file("train-images-idx3-ubyte.gz", "bdb82020997e1d708af4cf47b453dcf7"),
        idx_file("train-labels-idx1-ubyte.gz", "e144d726b3acfaa3e44228e80efcd344"),
        idx_file("t10k-images-idx3-ubyte.gz", "5c965bf0a639b31b8f53240b1b52f4d7"),
        idx_file("t10k-labels-idx1-ubyte.gz", "7320c461ea6c1c855c0b718fb2a4b134"),
    )
    source_folders = ("raw", "KMNIST/raw")
    classes = ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]
    description = ("Kuzushiji-MNIST: 60,000 training and 10,000 test images of ten "
                   "cursive hiragana, 28x28 gray.")
    homepage = "https://github.com/rois-codh/kmnist"
    license = "CC BY-SA 4.0"


RECIPE = KMNISTDataModule.default_recipe()
