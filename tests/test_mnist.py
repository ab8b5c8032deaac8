"""MNIST end to end: real files through a loopback mirror, splits, loaders, stats."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from loopback import MirrorServer

import datapipe
from datapipe.datamodules import MNISTDataModule
from datapipe.datamodules.mnist import RECIPE

T10K = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _served(folder, names):
    return {name: (folder / name).read_bytes() for name in names}


def test_real_test_split_is_verified_parsed_and_equals_torchvision(real_mnist, tmp_path):
    from torchvision.datasets.mnist import read_image_file, read_label_file

    files = _served(real_mnist, T10K + ("train-labels-idx1-ubyte.gz",))
    with MirrorServer(files) as mirror:
        dm = MNISTDataModule(cache_dir=tmp_path, mirrors=[mirror.url])
        prepared = dm.prepare_data(splits=["test"])["test"]
        # Only the two t10k files are fetched, once each.
        assert dict(mirror.requests) == {T10K[0]: 1, T10K[1]: 1}
    assert prepared.verified and prepared.rows == 10000
    sources = {s["filename"]: s for s in prepared.manifest["sources"]}
    assert sources[T10K[0]]["checksum"] == "9fb629c4189551a2d022fa330f9573f3"
    assert sources[T10K[0]]["verified"] is True

    columns = RECIPE.load(prepared.data_file)
    for name, reader, ours in ((T10K[0], read_image_file, columns["image"][:, 0]),
                               (T10K[1], read_label_file, columns["label"])):
        raw = tmp_path / name.removesuffix(".gz")
        raw.write_bytes(gzip.decompress(files[name]))
        np.testing.assert_array_equal(ours, reader(str(raw)).numpy())

    # The statistics recorded at prepare are those of the images.
    images = columns["image"].astype(np.float64) / 255
    stats = prepared.manifest["statistics"]
    assert stats["mean"][0] == pytest.approx(images.mean(), abs=1e-6)
    assert stats["std"][0] == pytest.approx(images.std(), abs=1e-6)
    assert sum(stats["class_counts"]) == 10000
    assert stats["class_counts"][1] == int((columns["label"] == 1).sum()) == 1135


def test_datamodule_serves_disjoint_seeded_splits(fake_mnist, tmp_path):
    with MirrorServer(fake_mnist.files) as mirror:
        dm = MNISTDataModule(cache_dir=tmp_path, mirrors=[mirror.url], verify=False,
                             val_split=100, batch_size=64)
        dm.prepare_data()
    dm.setup("fit")
    train, val = dm.datasets["train"], dm.datasets["val"]
    assert (len(train), len(val)) == (500, 100)
    assert set(train.rows).isdisjoint(val.rows)
    assert set(train.rows) | set(val.rows) == set(range(600))

    again = MNISTDataModule(cache_dir=tmp_path, verify=False, val_split=100)
    again.setup("fit")
    np.testing.assert_array_equal(again.datasets["val"].rows, val.rows)
    other_seed = MNISTDataModule(cache_dir=tmp_path, verify=False, val_split=100, seed=7)
    other_seed.setup("fit")
    assert set(other_seed.datasets["val"].rows) != set(val.rows)

    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (64, 1, 28, 28) and y.dtype == torch.int64
    rows = train.rows[:0]  # the first batch's rows, found by matching labels+images
    images = fake_mnist.arrays["train-images-idx3-ubyte.gz"]
    for img in x[:, 0].numpy():
        match = np.flatnonzero((images == img).all(axis=(1, 2)))
        rows = np.append(rows, match[0])
    assert set(rows) <= set(train.rows)
    np.testing.assert_array_equal(
        y.numpy(), fake_mnist.arrays["train-labels-idx1-ubyte.gz"][rows])

    test_batches = list(dm.test_dataloader())
    assert sum(len(b[1]) for b in test_batches) == 100
    np.testing.assert_array_equal(torch.cat([b[0] for b in test_batches])[:, 0].numpy(),
                                  fake_mnist.arrays["t10k-images-idx3-ubyte.gz"])


def test_normalization_happens_on_the_device_hook(fake_mnist, tmp_path):
    dm = MNISTDataModule(cache_dir=tmp_path, source=fake_mnist.folder, verify=False,
                         val_split=0, normalize=True, batch_size=600, shuffle=False)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    x, y = dm.to_device(batch, "cpu")
    raw = fake_mnist.arrays["train-images-idx3-ubyte.gz"].astype(np.float32) / 255
    expected = (raw - 0.1307) / 0.3081
    assert x.dtype == torch.float32
    np.testing.assert_allclose(x[:, 0].numpy(), expected, rtol=1e-5, atol=1e-5)

    plain = MNISTDataModule(cache_dir=tmp_path, source=fake_mnist.folder, verify=False,
                            val_split=0, normalize=False, batch_size=600, shuffle=False)
    plain.setup("fit")
    x, _ = plain.to_device(next(iter(plain.train_dataloader())))
    np.testing.assert_allclose(x[:, 0].numpy(), raw, atol=1e-6)


def test_bolts_arguments_and_dataset_facts(tmp_path):
    dm = MNISTDataModule(tmp_path, val_split=0.1, num_workers=2, normalize=True, batch_size=128,
                         seed=1, shuffle=False, pin_memory=True, drop_last=True)
    assert (dm.num_classes, dm.dims) == (10, (1, 28, 28))
    assert dm.classes[3] == "3 - three"
    wrap = dm.recipe.wrap
    assert (wrap.batch_size, wrap.num_workers, wrap.shuffle, wrap.pin_memory, wrap.drop_last) \
        == (128, 2, False, True, True)
    assert dm.split_specs["val"] == 0.1 and dm.seed == 1
    assert MNISTDataModule(data_dir=tmp_path).cache.root == tmp_path


def test_setup_before_prepare_says_what_to_run(tmp_path):
    dm = datapipe.load("mnist", cache_dir=tmp_path)
    with pytest.raises(datapipe.NotPreparedError, match="datapipe prepare mnist --split train"):
        dm.setup("fit")


def test_loader_state_resumes_through_the_datamodule(fake_mnist, tmp_path):
    kwargs = dict(cache_dir=tmp_path, source=fake_mnist.folder, verify=False, val_split=50,
                  batch_size=50)
    dm = MNISTDataModule(**kwargs)
    dm.prepare_data()
    full = [b[1].tolist() for b in dm.train_dataloader()]

    dm = MNISTDataModule(**kwargs)
    it = iter(dm.train_dataloader())
    head = [next(it)[1].tolist() for _ in range(4)]
    state = dm.state_dict()
    assert state["train_loader"] == {"seed": 42, "epoch": 0, "batches_seen": 4, "order": "global"}

    resumed = MNISTDataModule(**kwargs)
    resumed.load_state_dict(state)
    tail = [b[1].tolist() for b in resumed.train_dataloader()]
    assert head + tail == full
    assert resumed.state_dict()["split_id"] == state["split_id"]
