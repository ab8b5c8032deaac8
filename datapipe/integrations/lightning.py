"""Run any datapipe recipe under Lightning's own Trainer.

    import lightning as L
    from datapipe.integrations.lightning import as_lightning_datamodule

    dm = as_lightning_datamodule(datapipe.load("mnist", batch_size=128))
    L.Trainer(max_epochs=3).fit(model, datamodule=dm)

The adapter is a real ``LightningDataModule`` whose hooks call the datapipe module's,
so Lightning runs ``prepare_data`` once per node, calls ``setup`` on every process,
and normalizes on the device through ``on_after_batch_transfer``. Its class lives at
module level, so it pickles (``strategy="ddp_spawn"``), and its ``hparams`` are the
datapipe module's arguments as plain data: Lightning stores them in every checkpoint,
and ``DatapipeLightningDataModule.load_from_checkpoint(path)`` makes the same module
again. As in Lightning, a loader is there once its stage is set up. Under Lightning's
DDP, pass ``use_distributed_sampler=False``: datapipe's loaders shard themselves.
"""

from __future__ import annotations

from typing import Any

from datapipe.errors import ConfigError

try:
    import lightning.pytorch as pl
except ImportError:
    try:
        import pytorch_lightning as pl
    except ImportError:
        pl = None

_STAGE_OF_PART = {"train": "fit", "val": "validate", "test": "test", "predict": "predict"}


def as_lightning_datamodule(dm: Any) -> Any:
    """A ``LightningDataModule`` that delegates every hook to the datapipe DataModule ``dm``."""
    if pl is None:
        raise ConfigError(
            "Lightning is not installed; pip install lightning (or datapipe[lightning])"
        )
    return DatapipeLightningDataModule(dm)


if pl is not None:

    class DatapipeLightningDataModule(pl.LightningDataModule):
        """A datapipe DataModule under Lightning's hook names.

        Give it the module, or the plain arguments of one (its ``hparams``, as a
        checkpoint holds them): ``DatapipeLightningDataModule(name="mnist", batch_size=64)``.
        """

        def __init__(self, datamodule: Any = None, **hparams: Any) -> None:
            super().__init__()
            if datamodule is None:
                from datapipe.registry import load

                if "name" not in hparams:
                    raise ConfigError("give a datapipe DataModule, or name=RECIPE and its "
                                      "arguments")
                options = dict(hparams)
                datamodule = load(options.pop("name"), **options)
            elif hparams:
                raise ConfigError("give a datapipe DataModule or its arguments, not both")
            self.datapipe = datamodule
            self._ready: set[str] = set()  # the parts whose stage is set up
            self.prepare_data_per_node = datamodule.prepare_data_per_node
            self.save_hyperparameters(datamodule.hparams)

        def prepare_data(self) -> None:
            self.datapipe.prepare_data()

        def setup(self, stage: str | None = None) -> None:
            from datapipe.datamodule import PARTS_OF_STAGE

            self.datapipe.setup(stage)
            self._ready.update(PARTS_OF_STAGE[stage])

        def teardown(self, stage: str | None = None) -> None:
            from datapipe.datamodule import PARTS, PARTS_OF_STAGE

            self.datapipe.teardown(stage)
            self._ready.difference_update(PARTS_OF_STAGE.get(stage, PARTS))

        def _loader(self, part: str) -> Any:
            if part not in self._ready:
                # Lightning sets a stage up before it asks for its loader; one that was
                # not set up has none (what str(datamodule) reports as None).
                raise ConfigError(f"the {part} loader needs setup({_STAGE_OF_PART[part]!r}) "
                                  f"first")
            return getattr(self.datapipe, f"{part}_dataloader")()

        def train_dataloader(self):
            return self._loader("train")

        def val_dataloader(self):
            return self._loader("val")  # [] without a val split: Lightning skips it

        def test_dataloader(self):
            return self._loader("test")

        def predict_dataloader(self):
            return self._loader("predict")

        def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
            return self.datapipe.transfer_batch_to_device(batch, device, dataloader_idx)

        def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            return self.datapipe.on_before_batch_transfer(batch, dataloader_idx)

        def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            return self.datapipe.on_after_batch_transfer(batch, dataloader_idx)

        def state_dict(self) -> dict[str, Any]:
            return self.datapipe.state_dict()

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            self.datapipe.load_state_dict(state_dict)

        @property
        def num_classes(self) -> int:
            return self.datapipe.num_classes

        @property
        def dims(self) -> tuple[int, ...]:
            return self.datapipe.dims
