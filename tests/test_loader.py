"""Batches: one gather per batch, seeded order, exact resume, DDP shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datapipe.loader import ArrayDataset, Batch, EpochBatchSampler, Loader
from datapipe.stages.load import ArrowLoad
from datapipe.stages.save import ArrowSave
from datapipe.stages.wrap import Wrap


@pytest.fixture
def two_sources(tmp_path):
    rng = np.random.default_rng(3)
    columns = {}
    for split, n in (("train", 50), ("test", 20)):
        cols = {
            "image": rng.integers(0, 256, (n, 1, 4, 4), dtype=np.uint8),
            "label": rng.integers(0, 10, n).astype(np.int64),
        }
        ArrowSave()(cols, tmp_path, split)
        columns[split] = cols
    return {s: tmp_path / f"{s}.arrow" for s in columns}, columns


def test_getitems_returns_the_rows_asked_for_as_one_batch(two_sources):
    paths, columns = two_sources
    rows = np.array([4, 9, 1, 30])
    ds = ArrayDataset(paths, [("train", rows)], ArrowLoad())
    images, labels = ds.__getitems__([0, 3, 2])
    assert images.dtype == torch.uint8 and images.shape == (3, 1, 4, 4)
    np.testing.assert_array_equal(images.numpy(), columns["train"]["image"][[4, 30, 1]])
    np.testing.assert_array_equal(labels.numpy(), columns["train"]["label"][[4, 30, 1]])


def test_a_split_spanning_two_sources_gathers_from_both(two_sources):
    paths, columns = two_sources
    ds = ArrayDataset(paths, [("train", np.array([0, 1])), ("test", np.array([5, 6]))],
                      ArrowLoad())
    images, labels = ds.__getitems__([3, 0, 2])
    expected = np.stack([columns["test"]["image"][6], columns["train"]["image"][0],
                         columns["test"]["image"][5]])
    np.testing.assert_array_equal(images.numpy(), expected)
    assert labels.tolist() == [columns["test"]["label"][6], columns["train"]["label"][0],
                               columns["test"]["label"][5]]


def test_dataset_pickles_without_its_data(two_sources):
    import pickle

    paths, _ = two_sources
    ds = ArrayDataset(paths, [("train", np.arange(50))], ArrowLoad())
    ds.__getitems__([0])  # maps the file
    blob = pickle.dumps(ds)
    assert len(blob) < 2000  # paths and indices, not the images
    clone = pickle.loads(blob)
    assert torch.equal(clone.__getitems__([7])[0], ds.__getitems__([7])[0])


def _rows(sampler):
    return [row for batch in sampler for row in batch]


def test_sampler_order_is_a_pure_function_of_seed_and_epoch():
    a = EpochBatchSampler(100, batch_size=7, shuffle=True, seed=5)
    b = EpochBatchSampler(100, batch_size=7, shuffle=True, seed=5)
    assert _rows(a) == _rows(b)
    assert sorted(_rows(a)) == list(range(100))
    assert [len(batch) for batch in a] == [7] * 14 + [2]
    a.set_epoch(1)
    assert _rows(a) != _rows(b)
    assert _rows(EpochBatchSampler(100, batch_size=7, shuffle=True, seed=6)) != _rows(b)
    assert _rows(EpochBatchSampler(10, batch_size=3, shuffle=False, seed=5)) == list(range(10))


def test_batches_carry_their_key_and_a_generator_seeded_by_it():
    sampler = EpochBatchSampler(20, batch_size=8, shuffle=True, seed=3)
    sampler.set_epoch(2)
    batches = list(sampler)
    assert [b.key for b in batches] == [(3, 2, 0), (3, 2, 1), (3, 2, 2)]
    same = Batch([1, 2], 3, 2, 1).generator()
    assert torch.equal(torch.rand(4, generator=batches[1].generator()),
                       torch.rand(4, generator=same))
    assert not torch.equal(torch.rand(4, generator=batches[0].generator()),
                           torch.rand(4, generator=same))
    import pickle

    assert pickle.loads(pickle.dumps(batches[1])).key == (3, 2, 1)


def test_ddp_shards_are_disjoint_padded_and_cover_everything():
    shards = [_rows(EpochBatchSampler(10, batch_size=2, shuffle=True, seed=1, rank=r,
                                      world_size=3)) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    assert set().union(*map(set, shards)) == set(range(10))  # only 2 padding rows repeat


def _loader(dataset, batch_size=8, shuffle=True, seed=0):
    return Loader(dataset, EpochBatchSampler(len(dataset), batch_size=batch_size,
                                             shuffle=shuffle, seed=seed))


def test_augment_sees_the_batch_generator_in_workers_and_in_the_main_process(two_sources):
    paths, _ = two_sources

    ds = ArrayDataset(paths, [("train", np.arange(50))], ArrowLoad(), augment=_add_noise)
    in_workers = [b[0] for b in Wrap(batch_size=16, num_workers=2).build(ds, train=True, seed=3)]
    in_main = [b[0] for b in Wrap(batch_size=16).build(ds, train=True, seed=3)]
    assert all(torch.equal(a, b) for a, b in zip(in_workers, in_main, strict=True))
    plain = ArrayDataset(paths, [("train", np.arange(50))], ArrowLoad())
    first = next(iter(Wrap(batch_size=16).build(plain, train=True, seed=3)))[0]
    assert not torch.equal(first, in_main[0])  # the augmentation did something


def test_loader_resumes_mid_epoch_with_the_same_order(two_sources):
    paths, _ = two_sources
    ds = ArrayDataset(paths, [("train", np.arange(50))], ArrowLoad())
    reference = [b[1].tolist() for b in _loader(ds)]

    first = _loader(ds)
    it = iter(first)
    seen = [next(it)[1].tolist() for _ in range(3)]
    state = first.state_dict()
    assert state == {"seed": 0, "epoch": 0, "batches_seen": 3, "order": "global"}

    resumed = _loader(ds)
    resumed.load_state_dict(state)
    rest = [b[1].tolist() for b in resumed]
    assert seen + rest == reference
    assert resumed.state_dict() == {"seed": 0, "epoch": 1, "batches_seen": 0, "order": "global"}


def test_an_iterator_closed_early_ends_its_epoch_in_the_state_too(two_sources):
    paths, _ = two_sources
    ds = ArrayDataset(paths, [("train", np.arange(50))], ArrowLoad())
    loader = _loader(ds)
    it = iter(loader)
    next(it), next(it)
    assert loader.state_dict() == {"seed": 0, "epoch": 0, "batches_seen": 2, "order": "global"}
    it.close()  # as a trainer does when limit_train_batches or max_steps cuts an epoch
    # What a resume from this state does is what this loader does next: epoch 1, from 0.
    assert loader.state_dict() == {"seed": 0, "epoch": 1, "batches_seen": 0, "order": "global"}
    fresh = _loader(ds)
    fresh.set_epoch(1)
    assert [b[1].tolist() for b in loader] == [b[1].tolist() for b in fresh]


def test_each_iteration_is_a_new_epoch_with_a_new_order(two_sources):
    paths, _ = two_sources
    loader = _loader(ArrayDataset(paths, [("train", np.arange(50))], ArrowLoad()))
    epoch0 = torch.cat([b[1] for b in loader])
    epoch1 = torch.cat([b[1] for b in loader])
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist())
    assert not torch.equal(epoch0, epoch1)
    assert loader.state_dict()["epoch"] == 2


def test_resume_with_another_seed_is_refused(two_sources):
    from datapipe.errors import ConfigError

    paths, _ = two_sources
    loader = _loader(ArrayDataset(paths, [("train", np.arange(50))], ArrowLoad()), seed=1)
    with pytest.raises(ConfigError, match="seed"):
        loader.load_state_dict({"seed": 2, "epoch": 0, "batches_seen": 1})


def _add_noise(images, generator):
    """A stand-in augmentation: uint8 noise drawn from the batch's own generator."""
    return images + torch.randint(0, 3, images.shape, generator=generator, dtype=torch.uint8)


def test_workers_yield_the_same_batches_as_the_main_process(two_sources):
    paths, _ = two_sources
    ds = ArrayDataset(paths, [("train", np.arange(50))], ArrowLoad())
    wrap = Wrap(batch_size=16, num_workers=2)
    in_workers = [b[1].tolist() for b in wrap.build(ds, train=True, seed=3)]
    in_main = [b[1].tolist() for b in Wrap(batch_size=16).build(ds, train=True, seed=3)]
    assert in_workers == in_main
    assert isinstance(wrap.build(ds, train=True, seed=3), torch.utils.data.DataLoader)


def test_drop_last_applies_to_every_loader_as_in_lightning_bolts(two_sources):
    paths, _ = two_sources
    ds = ArrayDataset(paths, [("train", np.arange(50))], ArrowLoad())
    wrap = Wrap(batch_size=16, drop_last=True)
    assert [len(b[1]) for b in wrap.build(ds, train=True, seed=0)] == [16, 16, 16]
    assert [len(b[1]) for b in wrap.build(ds, train=False, seed=0)] == [16, 16, 16]
    keep = Wrap(batch_size=16)
    assert [len(b[1]) for b in keep.build(ds, train=False, seed=0)] == [16, 16, 16, 2]
