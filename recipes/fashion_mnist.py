"""Fashion-MNIST, written exactly as a user writes a recipe: declaration only.

    datapipe --recipes recipes/ prepare fashion-mnist

Zalando's 70,000 28x28 grayscale clothing images in MNIST's IDX format, so the IDX
clean stage does all the parsing.
"""

import datapipe
from datapipe import DataModule, DatasetInfo, Decompressed, Download, IDXClean, Recipe, Resource

RECIPE = Recipe(
    name="fashion-mnist",
    version="1",
    info=DatasetInfo(
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        dims=(1, 28, 28),
        description="Zalando's article images: 60,000 training and 10,000 test, 28x28 gray.",
        homepage="https://github.com/zalandoresearch/fashion-mnist",
        license="MIT",
    ),
    download=Download(
        # forms: the decompressed files torchvision's FashionMNIST/raw/ holds, with the
        # md5s several independent loaders publish for the decompressed official files.
        resources=(
            Resource("train-images-idx3-ubyte.gz", md5="8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                     forms=[Decompressed("train-images-idx3-ubyte", size=47040016,
                                         md5="f4a8712d7a061bf5bd6d2ca38dc4d50a")]),
            Resource("train-labels-idx1-ubyte.gz", md5="25c81989df183df01b3e8a0aad5dffbe",
                     forms=[Decompressed("train-labels-idx1-ubyte", size=60008,
                                         md5="9018921c3c673c538a1fc5bad174d6f9")]),
            Resource("t10k-images-idx3-ubyte.gz", md5="bef4ecab320f06d8554ea6380940ec79",
                     forms=[Decompressed("t10k-images-idx3-ubyte", size=7840016,
                                         md5="8181f5470baa50b63fa0f6fddb340f0a")]),
            Resource("t10k-labels-idx1-ubyte.gz", md5="bb300cfdad3c16e7a12a480ee83cd310",
                     forms=[Decompressed("t10k-labels-idx1-ubyte", size=10008,
                                         md5="15d484375f8d13e6eb1aabb0c3f46965")]),
        ),
        # DIR may be torchvision's root, its FashionMNIST/ folder or FashionMNIST/raw.
        source_folders=("raw", "FashionMNIST/raw"),
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    ),
    clean=IDXClean(files={
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    }),
)


@datapipe.register("fashion-mnist")
def fashion_mnist(**overrides) -> DataModule:
    """Fashion-MNIST with 5,000 training images held out for validation by default."""
    return DataModule(RECIPE, **{"val_split": 5000, **overrides})
