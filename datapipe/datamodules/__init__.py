"""The prebuilt DataModules; importing this registers their recipes."""

from datapipe.datamodules.mnist import MNISTDataModule

__all__ = ["MNISTDataModule"]
