"""Fashion-MNIST, written exactly as a user writes a recipe: declaration only.

    datapipe --recipes recipes/ prepare fashion-mnist

Zalando's 70,000 28x28 grayscale clothing images in MNIST's IDX format: an
IDXDataModule that names its files, mirror and classes, as torchvision's FashionMNIST
subclasses MNIST. The constructor is lightning-bolts' FashionMNISTDataModule one.
"""

import datapipe
from datapipe import IDXDataModule, idx_file


@datapipe.register("fashion-mnist")
class FashionMNISTDataModule(IDXDataModule):
    """Fashion-MNIST; 20% of the 60,000 training images are held out for validation."""

    name = "fashion-mnist"
    mirrors = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
    # With the md5s several independent loaders publish for the decompressed files,
    # which torchvision's FashionMNIST/raw/ holds.
    resources = (
        idx_file("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                 "f4a8712d7a061bf5bd6d2ca38dc4d50a", 47040016),
        idx_file("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe",
                 "9018921c3c673c538a1fc5bad174d6f9", 60008),
        idx_file("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79",
                 "8181f5470baa50b63fa0f6fddb340f0a", 7840016),
        idx_file("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310",
                 "15d484375f8d13e6eb1aabb0c3f46965", 10008),
    )
    # --source DIR may be torchvision's root, its FashionMNIST/ folder or FashionMNIST/raw.
    source_folders = ("raw", "FashionMNIST/raw")
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    description = "Zalando's article images: 60,000 training and 10,000 test, 28x28 gray."
    homepage = "https://github.com/zalandoresearch/fashion-mnist"
    license = "MIT"


RECIPE = FashionMNISTDataModule.default_recipe()
