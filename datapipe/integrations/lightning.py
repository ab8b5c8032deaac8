"""Run any datapipe recipe under Lightning's own Trainer.

    import lightning as L
    from datapipe.integrations.lightning import as_lightning_datamodule

    dm = as_lightning_datamodule(datapipe.load("mnist", batch_size=128))
    L.Trainer(max_epochs=3).fit(model, datamodule=dm)

The adapter is a real ``LightningDataModule`` whose hooks call the datapipe module's,
so Lightning runs ``prepare_data`` once per node, calls ``setup`` on every process,
and normalizes on the device through ``on_after_batch_transfer``. Under Lightning's
DDP, pass ``use_distributed_sampler=False``: datapipe's loaders shard themselves.
"""

from __future__ import annotations

from typing import Any

from datapipe.errors import ConfigError


def _lightning():
    try:
        import lightning.pytorch as pl
    except ImportError:
        try:
            import pytorch_lightning as pl
        except ImportError:
            raise ConfigError(
                "Lightning is not installed; pip install lightning (or datapipe[lightning])"
            ) from None
    return pl


def as_lightning_datamodule(dm: Any) -> Any:
    """A ``LightningDataModule`` that delegates every hook to the datapipe DataModule ``dm``."""
    pl = _lightning()

    class DatapipeLightningDataModule(pl.LightningDataModule):
        def __init__(self) -> None:
            super().__init__()
            self.datapipe = dm
            self.prepare_data_per_node = dm.prepare_data_per_node

        def prepare_data(self) -> None:
            dm.prepare_data()

        def setup(self, stage: str | None = None) -> None:
            dm.setup(stage)

        def teardown(self, stage: str | None = None) -> None:
            dm.teardown(stage)

        def train_dataloader(self):
            return dm.train_dataloader()

        def val_dataloader(self):
            return dm.val_dataloader()

        def test_dataloader(self):
            return dm.test_dataloader()

        def predict_dataloader(self):
            return dm.predict_dataloader()

        def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
            return dm.transfer_batch_to_device(batch, device, dataloader_idx)

        def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            return dm.on_before_batch_transfer(batch, dataloader_idx)

        def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            return dm.on_after_batch_transfer(batch, dataloader_idx)

        def state_dict(self) -> dict[str, Any]:
            return dm.state_dict()

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            dm.load_state_dict(state_dict)

        @property
        def num_classes(self) -> int:
            return dm.num_classes

        @property
        def dims(self) -> tuple[int, ...]:
            return dm.dims

    return DatapipeLightningDataModule()
