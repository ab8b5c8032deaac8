"""The six stages, in chain order: download, clean, save, load, transform, wrap."""

from datapipe.stages.augment import RandomCrop, RandomHorizontalFlip
from datapipe.stages.base import Stage
from datapipe.stages.clean import CIFARClean, Clean, IDXClean, validate_classification
from datapipe.stages.download import Download, FetchOptions, LocalFile, Resource
from datapipe.stages.load import ArrowLoad
from datapipe.stages.save import ArrowSave
from datapipe.stages.source_layout import Decompressed, Extracted
from datapipe.stages.transform import Transform
from datapipe.stages.wrap import Wrap

__all__ = [
    "ArrowLoad", "ArrowSave", "CIFARClean", "Clean", "Decompressed", "Download", "Extracted",
    "FetchOptions", "IDXClean",
    "LocalFile", "RandomCrop", "RandomHorizontalFlip", "Resource", "Stage", "Transform", "Wrap",
    "validate_classification",
]
