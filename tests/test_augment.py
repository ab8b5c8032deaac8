"""Batch augmentations: what torchvision does per image, done per batch, seeded per batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cifar_files import make_fake_cifar10

from datapipe.datamodules import CIFAR10DataModule
from datapipe.errors import ConfigError
from datapipe.loader import Batch
from datapipe.stages.augment import RandomCrop, RandomHorizontalFlip
from datapipe.stages.transform import Transform


def _images(n: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_crop_keeps_batch_shape_and_dtype_and_takes_other_sizes():
    images = _images()
    out = RandomCrop(32, padding=4)(images, _generator())
    assert out.shape == images.shape and out.dtype == torch.uint8 and out.is_contiguous()
    assert RandomCrop((24, 28), padding=0)(images, _generator()).shape == (64, 3, 24, 28)
    assert torch.equal(RandomCrop(32, padding=0)(images, _generator()), images)
    with pytest.raises(ConfigError, match="does not fit"):
        RandomCrop(48, padding=4)(images, _generator())
    with pytest.raises(ConfigError, match="padding must be 0 or more"):
        RandomCrop(32, padding=-1)


def test_crop_equals_torchvision_pad_then_crop_at_the_same_offsets():
    import torchvision.transforms.functional as TF

    images = _images()
    op = RandomCrop(32, padding=4)
    top, left = op.offsets(len(images), 32, 32, _generator(3))
    ours = op.crop(images, top, left)
    for i in range(len(images)):
        # torchvision's RandomCrop(32, padding=4): F.pad(img, 4) (fill 0), then F.crop.
        theirs = TF.crop(TF.pad(images[i], [4]), int(top[i]), int(left[i]), 32, 32)
        assert torch.equal(ours[i], theirs), i
    # Calling the op draws the same offsets from the same generator state.
    assert torch.equal(op(images, _generator(3)), ours)


def test_crop_offsets_vary_from_image_to_image():
    same = _images(1).expand(256, -1, -1, -1).contiguous()
    op = RandomCrop(32, padding=4)
    top, left = op.offsets(256, 32, 32, _generator())
    assert len(set(zip(top.tolist(), left.tolist(), strict=True))) > 40  # of 81 possible
    assert 0 <= int(top.min()) and int(top.max()) <= 8 and int(left.max()) <= 8
    crops = op(same, _generator())
    assert len({crops[i].numpy().tobytes() for i in range(256)}) > 40


def test_flip_is_exact_and_per_image():
    images = _images()
    always = RandomHorizontalFlip(p=1.0)
    assert torch.equal(always(images, _generator()), images.flip(-1))
    assert torch.equal(always(always(images, _generator()), _generator()), images)
    assert torch.equal(RandomHorizontalFlip(p=0.0)(images, _generator()), images)
    out = RandomHorizontalFlip()(images, _generator(5))
    flipped = [torch.equal(out[i], images[i].flip(-1)) for i in range(len(images))]
    kept = [torch.equal(out[i], images[i]) for i in range(len(images))]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 10 < sum(flipped) < 54
    with pytest.raises(ConfigError, match=r"p must lie in \[0, 1\]"):
        RandomHorizontalFlip(p=1.5)


def test_ops_are_plain_config_and_pure_functions_of_the_generator():
    transform = Transform(train=(RandomCrop(32, padding=4), RandomHorizontalFlip(0.5)))
    assert transform.config()["train"] == [
        {"type": "RandomCrop", "size": 32, "padding": 4},
        {"type": "RandomHorizontalFlip", "p": 0.5},
    ]
    images = _images()
    before = images.clone()
    first = transform.augment(images, _generator(7))
    assert torch.equal(images, before)  # the input is never changed in place
    assert torch.equal(transform.augment(images, _generator(7)), first)
    assert not torch.equal(transform.augment(images, _generator(8)), first)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ops_on_cuda_batches_equal_the_cpu_result():
    images = _images(256)
    transform = Transform(train=(RandomCrop(32, padding=4), RandomHorizontalFlip()))
    on_cpu = transform.augment(images, _generator(9))
    on_gpu = transform.augment(images.cuda(), _generator(9))  # offsets drawn on the CPU
    assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), on_cpu)


# ------------------------------------------------------------------ through the loader


def _module(fake, tmp_path, **kwargs):
    kwargs = {"augment": True, **kwargs}  # asked for: a DataModule augments only then
    return CIFAR10DataModule(cache_dir=tmp_path / "cache", source=fake.folder, verify=False,
                             val_split=0, batch_size=64, **kwargs)


def _epoch(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_train_batches_are_the_same_with_0_or_2_workers_and_after_a_resume(tmp_path):
    fake = make_fake_cifar10(tmp_path / "files")
    dm = _module(fake, tmp_path)
    dm.prepare_data()
    loader = dm.train_dataloader()
    epoch0, epoch1 = _epoch(loader), _epoch(loader)
    assert len(epoch0) == 5

    # Each batch is the recipe's augmentation of its rows, drawn from the batch's key.
    raw = torch.from_numpy(fake.arrays["train"]["image"])
    for position, (x, y) in enumerate(epoch0):
        rows = loader.batch_sampler.order(0)[position * 64:(position + 1) * 64]
        generator = Batch(rows.tolist(), 42, 0, position).generator()
        assert torch.equal(x, dm.transform.augment(raw[rows], generator))
        assert not torch.equal(x, raw[rows])
        assert y.tolist() == fake.arrays["train"]["labels"][rows].tolist()
    assert not torch.equal(epoch0[0][0], epoch1[0][0])  # a new epoch, new draws

    workers = _module(fake, tmp_path, num_workers=2).train_dataloader()
    for (x, y), (wx, wy) in zip(epoch0, _epoch(workers), strict=True):
        assert torch.equal(x, wx) and torch.equal(y, wy)

    partial = _module(fake, tmp_path).train_dataloader()
    it = iter(partial)
    head = [next(it) for _ in range(2)]
    state = partial.state_dict()
    resumed = _module(fake, tmp_path).train_dataloader()
    resumed.load_state_dict(state)
    for (x, _), (rx, _) in zip(epoch0, head + _epoch(resumed), strict=True):
        assert torch.equal(x, rx)


def test_augment_false_serves_the_stored_images(tmp_path):
    fake = make_fake_cifar10(tmp_path / "files")
    dm = _module(fake, tmp_path, augment=False, shuffle=False)
    dm.prepare_data()
    x, _ = next(iter(dm.train_dataloader()))
    np.testing.assert_array_equal(x.numpy(), fake.arrays["train"]["image"][:64])


@pytest.mark.parametrize("size,padding", [(32, 4), ((24, 28), 2), (36, 3), (32, 0)])
def test_crop_then_flip_in_one_pass_equals_the_two_ops_one_after_the_other(size, padding):
    images = _images(40, seed=3)
    crop, flip = RandomCrop(size, padding=padding), RandomHorizontalFlip(0.5)
    fused = crop.fused_with(flip)
    assert fused is not None and crop.fused_with(crop) is None
    one_pass = fused(images, _generator(5))
    generator = _generator(5)
    two_ops = flip(crop(images, generator), generator)
    assert torch.equal(one_pass, two_ops)
    assert torch.equal(Transform(train=(crop, flip)).augment(images, _generator(5)), two_ops)
    # The flip really is per image: some crops mirrored, some not.
    plain = crop(images, _generator(5))
    mirrored = [torch.equal(a, b.flip(-1)) and not torch.equal(a, b)
                for a, b in zip(two_ops, plain, strict=True)]
    assert any(mirrored) and not all(mirrored)


def test_flip_in_place_equals_the_flip_of_a_copy():
    images = _images(16)
    copy = images.clone()
    out = RandomHorizontalFlip(0.5).apply_(copy, _generator(2))
    assert out.data_ptr() == copy.data_ptr()
    assert torch.equal(out, RandomHorizontalFlip(0.5)(images, _generator(2)))
