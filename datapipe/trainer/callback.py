"""The callback base, at the path it had before callbacks became a package."""

from datapipe.trainer.callbacks.base import Callback

__all__ = ["Callback"]
