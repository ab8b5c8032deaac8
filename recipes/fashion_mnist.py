"""Fashion-MNIST, written exactly as a user writes a recipe: declaration only.

    datapipe --recipes recipes/ prepare fashion-mnist

Zalando's 70,000 28x28 grayscale clothing images in MNIST's IDX format, so the IDX
clean stage does all the parsing.
"""

import datapipe
from datapipe import DataModule, DatasetInfo, Download, IDXClean, Recipe, Resource

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
        resources=(
            Resource("train-images-idx3-ubyte.gz", md5="8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            Resource("train-labels-idx1-ubyte.gz", md5="25c81989df183df01b3e8a0aad5dffbe"),
            Resource("t10k-images-idx3-ubyte.gz", md5="bef4ecab320f06d8554ea6380940ec79"),
            Resource("t10k-labels-idx1-ubyte.gz", md5="bb300cfdad3c16e7a12a480ee83cd310"),
        ),
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
