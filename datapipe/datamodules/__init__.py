"""The prebuilt DataModules (registered by name in datapipe.registry.BUILTINS)."""

from datapipe.datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule
from datapipe.datamodules.imagenet import ImageNetDataModule
from datapipe.datamodules.mnist import MNISTDataModule

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule", "ImageNetDataModule", "MNISTDataModule"]
