"""The device side: pinned uint8 batches normalized on a CUDA device (skipped without one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datapipe.datamodules import MNISTDataModule

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_normalization_on_cuda_equals_the_cpu_result(fake_mnist, tmp_path):
    dm = MNISTDataModule(cache_dir=tmp_path, source=fake_mnist.folder, verify=False,
                         val_split=0, normalize=True, batch_size=128, pin_memory=True,
                         num_workers=2)
    dm.prepare_data()
    dm.setup("fit")
    batches = 0
    for batch in dm.train_dataloader():
        assert batch[0].is_pinned() and batch[0].dtype == torch.uint8
        x_gpu, y_gpu = dm.to_device(batch, "cuda")
        x_cpu, y_cpu = dm.to_device(batch, "cpu")
        assert x_gpu.device.type == "cuda" and x_gpu.dtype == torch.float32
        torch.testing.assert_close(x_gpu.cpu(), x_cpu, rtol=1e-6, atol=1e-6)
        assert torch.equal(y_gpu.cpu(), y_cpu)
        batches += 1
    assert batches == 5  # 600 rows in batches of 128


def test_cuda_batches_hold_the_same_images_as_the_files(fake_mnist, tmp_path):
    dm = MNISTDataModule(cache_dir=tmp_path, source=fake_mnist.folder, verify=False,
                         val_split=0, normalize=False, batch_size=600, shuffle=False,
                         pin_memory=True)
    dm.prepare_data()
    dm.setup("fit")
    x, y = dm.to_device(next(iter(dm.train_dataloader())), "cuda")
    expected = fake_mnist.arrays["train-images-idx3-ubyte.gz"].astype(np.float32) / 255
    np.testing.assert_allclose(x[:, 0].cpu().numpy(), expected, atol=1e-6)
    np.testing.assert_array_equal(y.cpu().numpy(), fake_mnist.arrays["train-labels-idx1-ubyte.gz"])


@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "16-mixed"])
def test_trainer_fits_on_cuda(fake_mnist, tmp_path, precision):
    from datapipe.models import ImageClassifier
    from datapipe.trainer import Trainer

    dm = MNISTDataModule(cache_dir=tmp_path, source=fake_mnist.folder, verify=False,
                         val_split=100, normalize=True, batch_size=50, pin_memory=True)
    model = ImageClassifier.from_datamodule(dm, "lenet")
    trainer = Trainer(accelerator="cuda", max_epochs=2, precision=precision, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert trainer.global_step == 20
    assert next(model.parameters()).device.type == "cuda"
    assert next(model.parameters()).dtype == torch.float32
    assert torch.isfinite(trainer.callback_metrics["val_loss"])
    [result] = trainer.test(model, dm)
    assert 0.0 <= result["test_acc"] <= 1.0
