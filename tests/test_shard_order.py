"""The shard-aware order: each rank reads a run of shards, the same on every rank."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from datapipe.errors import ConfigError
from datapipe.loader import ArrayDataset, EpochBatchSampler
from datapipe.shard_order import (
    DEFAULT_WINDOW,
    check_groups,
    deal,
    epoch_orders,
    rank_order,
    shards_needed,
)
from datapipe.stages.load import ArrowLoad
from datapipe.stages.save import ArrowSave
from datapipe.stages.wrap import Wrap


def contiguous_groups(sizes) -> tuple[np.ndarray, ...]:
    """Positions 0..n-1 cut into groups of ``sizes``, as a sharded split's are."""
    starts = np.cumsum([0, *sizes])
    return check_groups([np.arange(a, b) for a, b in zip(starts[:-1], starts[1:], strict=True)],
                        int(starts[-1]))


def group_of(groups) -> np.ndarray:
    out = np.empty(sum(len(g) for g in groups), np.int64)
    for g, rows in enumerate(groups):
        out[rows] = g
    return out


UNEVEN = (7, 3, 12, 1, 9, 5, 8, 2, 6, 4)  # 57 rows in 10 shards of different sizes


# ------------------------------------------------------------------ the pure order


def test_the_order_is_a_function_of_seed_and_epoch_and_changes_each_epoch():
    groups = contiguous_groups(UNEVEN)
    again = contiguous_groups(UNEVEN)
    one = epoch_orders(groups, seed=5, epoch=3, world_size=3)
    two = epoch_orders(again, seed=5, epoch=3, world_size=3)
    assert all(np.array_equal(a, b) for a, b in zip(one, two, strict=True))
    next_epoch = epoch_orders(groups, seed=5, epoch=4, world_size=3)
    other_seed = epoch_orders(groups, seed=6, epoch=3, world_size=3)
    assert not np.array_equal(np.concatenate(one), np.concatenate(next_epoch))
    assert not np.array_equal(np.concatenate(one), np.concatenate(other_seed))
    # The shards are permuted each epoch, not only the rows: a rank reads other shards,
    needed = {frozenset(shards_needed(groups, seed=5, epoch=e, rank=0, world_size=3))
              for e in range(6)}
    assert len(needed) > 1
    # and one rank alone reads them all, in another order each epoch.
    sequences = [shards_needed(groups, seed=5, epoch=e, rank=0, world_size=1, window=1)
                 for e in range(2)]
    assert sorted(sequences[0]) == sorted(sequences[1]) == list(range(len(UNEVEN)))
    assert sequences[0] != sequences[1]


@pytest.mark.parametrize("sizes, world", [
    (UNEVEN, 1), (UNEVEN, 2), (UNEVEN, 3), (UNEVEN, 4), (UNEVEN, 8),
    ((10,) * 12, 4), ((5,) * 3, 2), ((100,), 4), ((3, 2), 5),
])
def test_ranks_are_disjoint_cover_every_position_and_have_equal_counts(sizes, world):
    groups = contiguous_groups(sizes)
    n = sum(sizes)
    orders = epoch_orders(groups, seed=1, epoch=0, world_size=world)
    length = math.ceil(n / world)
    assert [len(o) for o in orders] == [length] * world
    # Every position is served, and the only repeats are the padding (as the global
    # order pads: length * world - n rows in all).
    served = np.concatenate(orders)
    assert sorted(set(served.tolist())) == list(range(n))
    distinct = [set(o.tolist()) for o in orders]
    if n >= world:
        assert sum(len(d) for d in distinct) == n  # no row on two ranks
        assert sum(length - len(d) for d in distinct) == length * world - n
        # The ranks are balanced to a row whatever the shard sizes, and a rank pads with
        # its own rows, so the padding reads no other shard.
        assert max(len(d) for d in distinct) - min(len(d) for d in distinct) <= 1
        assert [len(d) for d in distinct] == [b - a for a, b in deal(n, world)]


def test_a_rank_reads_only_the_shards_it_is_dealt_about_groups_over_world_of_them():
    groups = contiguous_groups((10,) * 40)
    owner = group_of(groups)
    world = 4
    for epoch in range(3):
        for rank in range(world):
            needed = shards_needed(groups, seed=9, epoch=epoch, rank=rank, world_size=world)
            order = rank_order(groups, seed=9, epoch=epoch, rank=rank, world_size=world)
            assert set(owner[order].tolist()) == set(needed)
            assert len(needed) == len(set(needed)) == 10  # 40 equal shards / 4 ranks
            # In the order the rank first reads them: what a prefetcher fetches first.
            firsts = [int(np.flatnonzero(owner[order] == g)[0]) for g in needed]
            assert firsts == sorted(firsts)
        dealt = [set(shards_needed(groups, seed=9, epoch=epoch, rank=r, world_size=world))
                 for r in range(world)]
        assert set().union(*dealt) == set(range(40))
        assert sum(len(d) for d in dealt) == 40  # aligned spans share no shard
    uneven = contiguous_groups(UNEVEN)
    for rank in range(3):  # spans cut inside shards: at most the two end shards are shared
        needed = shards_needed(uneven, seed=2, epoch=0, rank=rank, world_size=3)
        assert len(needed) <= math.ceil(len(UNEVEN) / 3) + 2


def test_rows_are_shuffled_within_each_group_and_groups_are_read_one_window_at_a_time():
    groups = contiguous_groups((20,) * 8)
    owner = group_of(groups)
    alone = rank_order(groups, seed=3, epoch=0, rank=0, world_size=1, window=1)
    runs = owner[alone]
    # window=1: each shard is read whole before the next one starts...
    assert int((np.diff(runs) != 0).sum()) == 7
    # ...its rows in a shuffled order, not the stored one.
    for g in range(8):
        rows = alone[runs == g]
        assert sorted(rows.tolist()) == groups[g].tolist()
        assert rows.tolist() != groups[g].tolist()
    mixed = rank_order(groups, seed=3, epoch=0, rank=0, world_size=1, window=4)
    halves = owner[mixed[:80]], owner[mixed[80:]]
    assert [len(set(h.tolist())) for h in halves] == [4, 4]  # two windows of 4 shards
    assert set(halves[0].tolist()).isdisjoint(halves[1].tolist())
    assert int((np.diff(halves[0]) != 0).sum()) > 10  # shards interleaved inside a window
    assert DEFAULT_WINDOW > 1  # batches mix shards unless asked not to


def test_fewer_groups_than_ranks_gives_each_rank_a_contiguous_block_of_a_group():
    groups = contiguous_groups((30,))
    orders = epoch_orders(groups, seed=0, epoch=0, world_size=4)
    assert [len(o) for o in orders] == [8, 8, 8, 8]
    assert sorted(np.concatenate([np.unique(o) for o in orders]).tolist()) == list(range(30))
    assert [shards_needed(groups, seed=0, epoch=0, rank=r, world_size=4)
            for r in range(4)] == [[0]] * 4


def test_groups_that_do_not_partition_the_positions_are_refused():
    with pytest.raises(ConfigError, match="exactly once"):
        check_groups([[0, 1], [1, 2]], 3)
    with pytest.raises(ConfigError, match="exactly once"):
        check_groups([[0, 1]], 3)
    with pytest.raises(ConfigError, match="exactly once"):
        check_groups([[0, 1, 5]], 3)
    with pytest.raises(ConfigError, match="window"):
        epoch_orders(contiguous_groups((3,)), seed=0, epoch=0, world_size=1, window=0)


# ------------------------------------------------------------------ the sampler and loader


def test_without_groups_the_sampler_keeps_the_global_order():
    sampler = EpochBatchSampler(10, batch_size=3, shuffle=True, seed=4, rank=1, world_size=3)
    expected = np.resize(np.random.default_rng([4, 2]).permutation(10), 12)[1::3]
    assert sampler.order(2).tolist() == expected.tolist()
    assert sampler.ordering == "global"


@pytest.mark.parametrize("drop_last", [False, True])
def test_every_rank_has_the_batch_count_of_the_global_order(drop_last):
    groups = contiguous_groups(UNEVEN)
    n = sum(UNEVEN)
    counts = []
    for rank in range(4):
        sampler = EpochBatchSampler(n, batch_size=4, shuffle=True, seed=1, rank=rank,
                                    world_size=4, groups=groups, drop_last=drop_last)
        batches = list(sampler)
        counts.append(len(batches))
        assert len(sampler) == len(batches)
        assert all(len(b) == 4 for b in batches[:-1])
        if drop_last:
            assert len(batches[-1]) == 4
        assert torch.cat([b.positions for b in batches]).tolist() == \
            rank_order(groups, seed=1, epoch=0, rank=rank, world_size=4)[
                :len(batches) * 4].tolist()
    plain = EpochBatchSampler(n, batch_size=4, shuffle=True, seed=1, rank=0, world_size=4,
                              drop_last=drop_last)
    assert counts == [len(plain)] * 4 == [3 if drop_last else 4] * 4  # ceil(57/4) = 15 rows


@pytest.fixture
def sharded_arrays(tmp_path):
    """Two Arrow files, a split made of rows of both: two groups."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("test", 12)):
        ArrowSave()({"image": rng.integers(0, 256, (n, 1, 2, 2), dtype=np.uint8),
                     "label": np.arange(n, dtype=np.int64) + (100 if split == "test" else 0)},
                    tmp_path, split)
    paths = {s: tmp_path / f"{s}.arrow" for s in ("train", "test")}
    return ArrayDataset(paths, [("train", np.arange(30)), ("test", np.arange(12))], ArrowLoad())


def _loader(dataset, shuffle="shards", seed=0, batch_size=4):
    return Wrap(batch_size=batch_size, shuffle=shuffle).build(dataset, train=True, seed=seed)


def test_an_array_dataset_is_one_group_per_arrow_file(sharded_arrays, tmp_path):
    groups = sharded_arrays.shard_groups()
    assert [g.tolist() for g in groups] == [list(range(30)), list(range(30, 42))]
    same_file_twice = ArrayDataset(sharded_arrays.sources, [
        ("train", np.arange(5)), ("test", np.arange(3)), ("train", np.arange(5, 8))],
        ArrowLoad())
    assert [g.tolist() for g in same_file_twice.shard_groups()] == [
        [0, 1, 2, 3, 4, 8, 9, 10], [5, 6, 7]]
    resident = sharded_arrays.resident("cpu")
    assert [g.tolist() for g in resident.shard_groups()] == [g.tolist() for g in groups]


def test_the_loader_resumes_a_shard_order_mid_epoch_with_the_same_batches(sharded_arrays):
    reference = [b[1].tolist() for b in _loader(sharded_arrays, seed=7)]
    assert len(reference) == 11
    loader = _loader(sharded_arrays, seed=7)
    it = iter(loader)
    seen = [next(it)[1].tolist() for _ in range(4)]
    state = loader.state_dict()
    assert state == {"seed": 7, "epoch": 0, "batches_seen": 4, "order": "shards"}
    resumed = _loader(sharded_arrays, seed=7)
    resumed.load_state_dict(state)
    assert seen + [b[1].tolist() for b in resumed] == reference
    # It is the shard order of the two files' groups (a label names its row here).
    labels = [label for batch in reference for label in batch]
    positions = [label if label < 100 else label - 100 + 30 for label in labels]
    assert positions == rank_order(sharded_arrays.shard_groups(), seed=7, epoch=0, rank=0,
                                   world_size=1).tolist()
    assert labels != [b[1].tolist() for b in _loader(sharded_arrays, True, seed=7)]


def test_a_state_of_the_other_order_is_refused_in_one_line(sharded_arrays):
    shards = _loader(sharded_arrays, seed=7)
    global_ = _loader(sharded_arrays, True, seed=7)
    with pytest.raises(ConfigError, match=r"saved with the 'shards' order.*shuffle='shards'") \
            as raised:
        global_.load_state_dict(shards.state_dict())
    assert "\n" not in str(raised.value)
    with pytest.raises(ConfigError, match=r"saved with the 'global' order.*shuffle=True"):
        shards.load_state_dict(global_.state_dict())
    old = {"seed": 7, "epoch": 2, "batches_seen": 3}  # saved before orders were recorded
    global_.load_state_dict(old)
    assert global_.state_dict() == {**old, "order": "global"}
    with pytest.raises(ConfigError, match="'global' order"):
        shards.load_state_dict(old)


# ------------------------------------------------------------------ Wrap and DataModule


def test_wrap_takes_true_false_or_shards_and_refuses_anything_else_in_one_line():
    assert [Wrap(shuffle=s).shuffle for s in (True, False, "shards")] == [True, False, "shards"]
    for bad in ("random", 1, None, "Shards"):
        with pytest.raises(ConfigError, match="shuffle must be True, False or 'shards'"):
            Wrap(shuffle=bad)


def test_a_dataset_without_shards_is_refused_in_one_line():
    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return 4

    with pytest.raises(ConfigError, match="Plain does not: use shuffle=True"):
        _loader(Plain())
    assert len(_loader(Plain(), shuffle=True)) == 1  # the global order needs no shards


def test_the_datamodule_passes_shards_through_and_its_shuffle_property_still_takes_bools(
        tmp_path):
    import datapipe

    dm = datapipe.load("mnist", cache_dir=tmp_path, shuffle="shards")
    assert dm.shuffle == "shards" and dm.recipe.wrap.shuffle == "shards"
    assert dm.hparams["shuffle"] == "shards"
    dm.shuffle = False
    assert dm.shuffle is False and dm.recipe.wrap.shuffle is False
    dm.shuffle = True
    assert dm.shuffle is True
    with pytest.raises(ConfigError, match="'shards'"):
        dm.shuffle = "yes"


# ------------------------------------------------------------------ a sharded JPEG split


@pytest.fixture(scope="module")
def sharded_imagenet(tmp_path_factory):
    """A miniature ImageNet train of 6 class shards, prepared: (fake, recipe, cache)."""
    pytest.importorskip("scipy")
    from imagenet_fixture import make_fake_imagenet, recipe_for

    from datapipe.cache import Cache
    from datapipe.prepare import prepare_split
    from datapipe.stages.download import FetchOptions

    fake = make_fake_imagenet(tmp_path_factory.mktemp("imagenet-files"), classes=6,
                              per_class=3, n_val=6, size=(24, 20), big=(40, 30))
    recipe = recipe_for(fake.folder, val_shard_size=4)
    cache = Cache.at(tmp_path_factory.mktemp("prepared"))
    prepare_split(recipe, "train", cache, FetchOptions(source=str(fake.folder)))
    return fake, recipe, cache.root


def test_two_ranks_of_an_imagenet_module_read_only_their_dealt_shards(
        sharded_imagenet, monkeypatch):
    import datapipe.loader
    from datapipe.datamodules.imagenet import ImageNetDataModule

    fake, recipe, cache = sharded_imagenet
    batches, needed = {}, {}
    for rank in (0, 1):
        dm = ImageNetDataModule(cache_dir=cache, source=fake.folder, recipe=recipe,
                                image_size=16, batch_size=3, num_workers=0,
                                num_imgs_per_val_class=1, shuffle="shards")
        dm.setup("fit")
        dataset = dm.datasets["train"]
        assert len(dataset) == 12  # 6 classes of 3 images, one of each carved as val
        groups = dataset.shard_groups()
        # One group per shard file; ImageNet train has a shard per class.
        reader = dataset.readers["train"]
        assert len(groups) == len(reader.starts()) - 1 == 6
        labels = dataset.labels()
        assert all(len(set(labels[g].tolist())) == 1 for g in groups)
        # As torchrun's rank `rank` of 2 would see it.
        monkeypatch.setattr(datapipe.loader, "shard_of_this_process", lambda r=rank: (r, 2))
        loader = dm.train_dataloader()
        assert loader.state_dict()["order"] == "shards"
        batches[rank] = [y.tolist() for _, y in loader]
        needed[rank] = shards_needed(groups, seed=dm.seed, epoch=0, rank=rank, world_size=2)
        dealt_labels = {int(labels[groups[g][0]]) for g in needed[rank]}
        assert {y for batch in batches[rank] for y in batch} == dealt_labels
    assert [len(b) for b in batches.values()] == [2, 2]  # equal batch counts on both ranks
    assert [len(n) for n in needed.values()] == [3, 3]  # 6 equal shards over 2 ranks
    assert set(needed[0]).isdisjoint(needed[1])
    served = sorted(y for b in batches.values() for batch in b for y in batch)
    assert served == sorted(labels.tolist())  # every row once
