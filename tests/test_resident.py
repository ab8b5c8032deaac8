"""Device-resident splits and in-process batches: the same batches, state and split ids."""

from __future__ import annotations

import pytest
import torch
from cifar_files import make_fake_cifar10

from datapipe.datamodules import CIFAR10DataModule
from datapipe.errors import ConfigError
from datapipe.loader import ResidentDataset


def _module(fake, tmp_path, **kwargs):
    return CIFAR10DataModule(cache_dir=tmp_path / "cache", source=fake.folder, verify=False,
                             val_split=100, batch_size=64, normalize=True, **kwargs)


def _epoch(dm, loader):
    return [dm.to_device(batch, "cpu") for batch in loader]


@pytest.fixture
def fake(tmp_path):
    return make_fake_cifar10(tmp_path / "files")


def test_resident_split_serves_the_loader_batches_augmented_alike(fake, tmp_path):
    plain = _module(fake, tmp_path)
    plain.prepare_data()
    resident = _module(fake, tmp_path, resident="cpu")
    resident.setup("fit")
    assert isinstance(resident.datasets["train"], ResidentDataset)
    assert resident.plan.id == plain.plan_splits().id
    plain_loader, resident_loader = plain.train_dataloader(), resident.train_dataloader()
    assert isinstance(resident_loader, torch.utils.data.DataLoader)
    for _ in range(2):  # two epochs: new orders and new draws, the same on both paths
        for (x, y), (rx, ry) in zip(_epoch(plain, plain_loader),
                                    _epoch(resident, resident_loader), strict=True):
            assert rx.dtype == torch.float32 and torch.equal(x, rx) and torch.equal(y, ry)
    for (x, y), (rx, ry) in zip(_epoch(plain, plain.val_dataloader()),
                                _epoch(resident, resident.val_dataloader()), strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_resident_module_resumes_mid_epoch(fake, tmp_path):
    first = _module(fake, tmp_path, resident=True)
    first.prepare_data()
    other = _module(fake, tmp_path, resident=True)
    reference = _epoch(other, other.train_dataloader())
    it = iter(first.train_dataloader())
    head = [first.to_device(next(it), "cpu") for _ in range(2)]
    state = first.state_dict()
    assert state["train_loader"] == {"seed": 42, "epoch": 0, "batches_seen": 2, "order": "global"}
    resumed = _module(fake, tmp_path, resident=True)
    resumed.load_state_dict(state)
    rest = _epoch(resumed, resumed.train_dataloader())
    for (x, y), (rx, ry) in zip(reference, head + rest, strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_resident_needs_a_device_name_and_an_in_memory_recipe(fake, tmp_path):
    with pytest.raises(ConfigError, match="resident"):
        _module(fake, tmp_path, resident=3)
    dm = _module(fake, tmp_path, resident="no-such-device")
    dm.prepare_data()
    with pytest.raises(ConfigError, match="not a device"):
        dm.setup("fit")
    with pytest.raises(ConfigError, match="cannot be device-resident"):
        dm._made_resident(object())


def test_in_memory_batches_are_made_in_the_consuming_process_even_with_workers(fake, tmp_path):
    seen = []

    def spy(images, generator):
        seen.append(torch.utils.data.get_worker_info())
        return images

    dm = _module(fake, tmp_path, num_workers=2)
    dm.prepare_data()
    dm.setup("fit")
    dm.datasets["train"].augment = spy
    loader = dm.train_dataloader()
    assert loader.num_workers == 2 and len(list(loader)) == len(loader)
    assert seen and all(info is None for info in seen)
