"""datapipe: any dataset from its source to batches on a device.

    import datapipe
    dm = datapipe.load("mnist", batch_size=256)
    dm.prepare_data(); dm.setup("fit")

Importing datapipe does not import torch; loaders and the trainer do, when used.
"""

from datapipe.datamodule import DataModule
from datapipe.errors import (
    CacheError,
    CheckpointError,
    ChecksumError,
    ConfigError,
    DatapipeError,
    DownloadError,
    FormatError,
    LockTimeoutError,
    NonFiniteLossError,
    NotPreparedError,
    RecipeError,
    SplitSpecError,
    UnknownRecipeError,
    UnverifiedDataWarning,
)
from datapipe.recipe import DatasetInfo, Recipe
from datapipe.registry import list_recipes, load, load_recipe_dir, register
from datapipe.splits import SplitSpec
from datapipe.stages import (
    ArrowLoad,
    ArrowSave,
    Clean,
    Decompressed,
    Download,
    Extracted,
    FetchOptions,
    IDXClean,
    Resource,
    Transform,
    Wrap,
)
from datapipe.vision import IDXDataModule, VisionDataModule, idx_file

__version__ = "0.1.0"

# The trainer side imports torch; it loads on first use so `import datapipe` stays light.
_LAZY = {
    "Trainer": "datapipe.trainer", "Module": "datapipe.trainer", "Callback": "datapipe.trainer",
    "ModelCheckpoint": "datapipe.trainer", "EarlyStopping": "datapipe.trainer",
    "LearningRateMonitor": "datapipe.trainer", "ProgressBar": "datapipe.trainer",
    "CSVLogger": "datapipe.trainer", "TensorBoardLogger": "datapipe.trainer",
    "models": "datapipe.models", "ImageClassifier": "datapipe.models",
    "create_model": "datapipe.models", "cross_validate": "datapipe.cv",
    "register_module": "datapipe.trainer", "load_module": "datapipe.trainer",
    "list_modules": "datapipe.trainer",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'datapipe' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(_LAZY[name])
    value = module if module.__name__.endswith("." + name) else getattr(module, name)
    globals()[name] = value
    return value

__all__ = [
    "ArrowLoad", "ArrowSave", "CacheError", "CheckpointError", "ChecksumError", "Clean",
    "ConfigError", "DataModule", "DatapipeError", "DatasetInfo", "Decompressed", "Download",
    "DownloadError", "Extracted",
    "FetchOptions", "FormatError", "IDXClean", "LockTimeoutError", "NonFiniteLossError",
    "IDXDataModule", "NotPreparedError", "Recipe", "RecipeError",
    "Resource", "SplitSpec", "SplitSpecError", "Transform", "UnknownRecipeError",
    "UnverifiedDataWarning",
    "VisionDataModule", "Wrap", "idx_file", "list_recipes", "load", "load_recipe_dir",
    "register", *_LAZY,
]
