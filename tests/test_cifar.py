"""CIFAR-10/100: the official tarball layout through the stages, checked against torchvision.

Fixture tarballs (tests/cifar_files.py) hold real Python-2-style pickles; they are
served from a loopback mirror or a --source folder, never from the internet.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle

import numpy as np
import pytest
import torch
from cifar_files import make_fake_cifar10, make_fake_cifar100
from loopback import MirrorServer

import datapipe
from datapipe.cache import Cache
from datapipe.datamodules import CIFAR10DataModule, CIFAR100DataModule, cifar
from datapipe.errors import ConfigError, FormatError
from datapipe.formats.cifar import encode_batch, encode_pickle, load_pickle, parse_batch
from datapipe.prepare import find_prepared
from datapipe.stages.download import FetchOptions, Resource


def _verified(recipe, fake):
    """``recipe`` with the fixture's md5 and size in place of the official ones."""
    resource = Resource(fake.filename, md5=fake.md5, size=len(fake.data))
    return dataclasses.replace(
        recipe, download=dataclasses.replace(recipe.download, resources=(resource,)))


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _fix_torchvision_md5s(monkeypatch, dataset_class, fake) -> None:
    """Give torchvision's CIFAR class our fixture's md5s in place of the official ones.

    Its ``_check_integrity`` and ``_load_meta`` still run for real: they hash each
    extracted batch file and the meta file and compare with these lists.
    """
    top = dataset_class.base_folder

    def listed(entries):
        return [[name, _md5(fake.members[f"{top}/{name}"])] for name, _ in entries]

    monkeypatch.setattr(dataset_class, "train_list", listed(dataset_class.train_list))
    monkeypatch.setattr(dataset_class, "test_list", listed(dataset_class.test_list))
    meta = dataset_class.meta
    monkeypatch.setattr(dataset_class, "meta", {
        **meta, "md5": _md5(fake.members[f"{top}/{meta['filename']}"])})


def _no_entries(cache_dir) -> bool:
    prepared = cache_dir / "prepared"
    return not prepared.exists() or not any(p.is_file() for p in prepared.rglob("*"))


# ------------------------------------------------------------------ end to end


def test_cifar10_tarball_is_fetched_once_verified_and_equals_torchvision(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    fake = make_fake_cifar10(tmp_path / "files")
    with MirrorServer({fake.filename: fake.data}) as mirror:
        dm = CIFAR10DataModule(cache_dir=tmp_path / "cache", mirrors=[mirror.url],
                               recipe=_verified(cifar.CIFAR10_RECIPE, fake))
        prepared = dm.prepare_data(splits=["train", "test"])
        # One archive makes both splits; it is downloaded once.
        assert dict(mirror.requests) == {fake.filename: 1}
    assert prepared["train"].verified and prepared["train"].rows == 300
    assert prepared["test"].rows == 60

    _fix_torchvision_md5s(monkeypatch, CIFAR10, fake)
    root = fake.extract(tmp_path / "torchvision")
    for split, train in (("train", True), ("test", False)):
        theirs = CIFAR10(str(root), train=train, download=False)
        ours = dm.recipe.load(prepared[split].data_file)
        np.testing.assert_array_equal(ours["image"], theirs.data.transpose(0, 3, 1, 2))
        np.testing.assert_array_equal(ours["label"], theirs.targets)
        np.testing.assert_array_equal(ours["image"], fake.arrays[split]["image"])
        assert list(theirs.classes) == dm.classes


def test_cifar100_fine_by_default_coarse_on_request_and_equals_torchvision(tmp_path,
                                                                           monkeypatch):
    from torchvision.datasets import CIFAR100

    fake = make_fake_cifar100(tmp_path / "files")
    common = dict(cache_dir=tmp_path / "cache", source=fake.folder, verify=False, val_split=0)
    fine = CIFAR100DataModule(**common)
    coarse = datapipe.load("cifar100", labels="coarse", **common)
    assert (fine.num_classes, coarse.num_classes) == (100, 20)
    assert fine.classes[:3] == ["apple", "aquarium_fish", "baby"]
    assert coarse.classes[9] == "large_man-made_outdoor_things"
    fine_entries, coarse_entries = fine.prepare_data(), coarse.prepare_data()
    # The label choice is clean-stage config: two entries, side by side.
    assert fine_entries["train"].fingerprint != coarse_entries["train"].fingerprint

    _fix_torchvision_md5s(monkeypatch, CIFAR100, fake)
    root = fake.extract(tmp_path / "torchvision")
    for split, train in (("train", True), ("test", False)):
        ours_fine = fine.recipe.load(fine_entries[split].data_file)
        ours_coarse = coarse.recipe.load(coarse_entries[split].data_file)
        theirs = CIFAR100(str(root), train=train, download=False)  # fine labels
        np.testing.assert_array_equal(ours_fine["image"], theirs.data.transpose(0, 3, 1, 2))
        np.testing.assert_array_equal(ours_fine["label"], theirs.targets)
        np.testing.assert_array_equal(ours_coarse["image"], ours_fine["image"])
        np.testing.assert_array_equal(ours_coarse["label"], fake.arrays[split]["coarse_labels"])
        assert list(theirs.classes) == fine.classes


def test_test_split_is_served_unaugmented_and_normalized_on_the_device(tmp_path):
    fake = make_fake_cifar10(tmp_path / "files")
    dm = CIFAR10DataModule(cache_dir=tmp_path / "cache", source=fake.folder, verify=False,
                           normalize=True, batch_size=1000, train_split=None, val_split=0)
    dm.prepare_data()
    assert dm.normalization() == {"mean": [0.4914, 0.4822, 0.4465],
                                  "std": [0.2470, 0.2435, 0.2616], "from": "recipe"}
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch[0].dtype == torch.uint8
    np.testing.assert_array_equal(batch[0].numpy(), fake.arrays["test"]["image"])
    x, y = dm.to_device(batch, "cpu")
    mean = np.array([0.4914, 0.4822, 0.4465], np.float32).reshape(1, 3, 1, 1)
    std = np.array([0.2470, 0.2435, 0.2616], np.float32).reshape(1, 3, 1, 1)
    expected = (fake.arrays["test"]["image"] / np.float32(255) - mean) / std
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_bolts_arguments_facts_and_registration(tmp_path):
    dm = CIFAR10DataModule(tmp_path, val_split=0.1, num_workers=2, normalize=True,
                           batch_size=128, seed=1, shuffle=False, pin_memory=True,
                           drop_last=True)
    assert (dm.num_classes, dm.dims, dm.name) == (10, (3, 32, 32), "cifar10")
    assert dm.classes[0] == "airplane" and dm.split_specs["val"] == 0.1
    wrap = dm.recipe.wrap
    assert (wrap.batch_size, wrap.num_workers, wrap.shuffle, wrap.pin_memory, wrap.drop_last) \
        == (128, 2, False, True, True)
    assert CIFAR10DataModule(data_dir=tmp_path).cache.root == tmp_path
    # lightning-bolts' defaults: a fifth of train for val, no augmentation unless asked.
    assert CIFAR10DataModule().split_specs["val"] == 0.2
    assert CIFAR10DataModule().transform.train == ()
    assert [type(op).__name__ for op in CIFAR10DataModule(augment=True).transform.train] == [
        "RandomCrop", "RandomHorizontalFlip"]
    assert isinstance(datapipe.load("cifar10"), CIFAR10DataModule)
    assert isinstance(datapipe.load("cifar100"), CIFAR100DataModule)
    assert datapipe.load("cifar100").dims == (3, 32, 32)
    with pytest.raises(ConfigError, match="'fine' or 'coarse'"):
        CIFAR100DataModule(labels="superclass")
    # The built-in recipes point at the official archives.
    for recipe, md5 in ((cifar.CIFAR10_RECIPE, "c58f30108f718f92721af3b95e74349a"),
                        (cifar.CIFAR100_RECIPE, "eb9058c3a382ffc7106e4002c42a8d85")):
        [resource] = recipe.download.resources
        assert resource.md5 == md5
    assert cifar.MIRRORS == ("https://www.cs.toronto.edu/~kriz/",)
    assert len(cifar.CIFAR100_FINE_CLASSES) == 100 and len(cifar.CIFAR100_COARSE_CLASSES) == 20


# ------------------------------------------------------------------ refusals


class _Call:
    """An object whose pickle calls ``function(argument)`` when loaded."""

    def __init__(self, function, argument):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return (self.function, (self.argument,))


def _malicious(kind: str, marker) -> bytes:
    if kind == "os.system":
        return pickle.dumps(_Call(os.system, f"touch {marker}"), protocol=2)
    if kind == "exec":
        return pickle.dumps(_Call(exec, f"open({str(marker)!r}, 'w').close()"), protocol=2)
    # A well-formed batch whose labels are the payload, after a real numpy array.
    images = np.zeros((60, 3072), np.uint8)
    return pickle.dumps({"data": images, "labels": _Call(os.system, f"touch {marker}")},
                        protocol=4)


@pytest.mark.parametrize("kind", ["os.system", "exec", "inside-a-batch"])
def test_a_malicious_pickle_is_refused_runs_nothing_and_publishes_nothing(tmp_path, kind):
    marker = tmp_path / "pwned"
    fake = make_fake_cifar10(tmp_path / "files",
                             replace={"data_batch_3": _malicious(kind, marker)})
    dm = CIFAR10DataModule(cache_dir=tmp_path / "cache", source=fake.folder, verify=False)
    refused = {"os.system": r"(posix|os)\.system", "exec": r"(__builtin__|builtins)\.exec",
               "inside-a-batch": r"(posix|os)\.system"}[kind]
    with pytest.raises(FormatError,
                       match=rf"cifar-10-batches-py/data_batch_3: refused .*{refused}"):
        dm.prepare_data(splits=["train"])
    assert not marker.exists()
    assert _no_entries(tmp_path / "cache")
    # The payload is live: plain pickle would have run it.
    control = tmp_path / "control"
    pickle.loads(_malicious(kind, control))
    assert control.exists()
    assert find_prepared(dm.recipe, "train", Cache(tmp_path / "cache"),
                         FetchOptions(verify=False)) is None


def test_meta_class_names_must_match_the_declared_ones(tmp_path):
    names = list(cifar.CIFAR10_CLASSES)
    names[3], names[5] = names[5], names[3]
    fake = make_fake_cifar10(tmp_path / "files", classes=tuple(names))
    dm = CIFAR10DataModule(cache_dir=tmp_path / "cache", source=fake.folder, verify=False)
    with pytest.raises(FormatError, match="batches.meta: class 3 is 'dog' in the file but 'cat'"):
        dm.prepare_data(splits=["test"])
    assert _no_entries(tmp_path / "cache")


@pytest.mark.parametrize("problem, message", [
    ("short rows", r"data_batch_2: 'data' must be a uint8 array of N x 3072, found uint8 \(60, "
                   r"3000\)"),
    ("label range", r"labels must lie in \[0, 10\), found 0..10"),
    ("label count", r"data_batch_2: 60 images but 59 'labels'"),
    ("batch size", r"data_batch_2: 30 images, but the meta file says 60 per batch"),
    ("not a pickle", r"data_batch_2: not a readable pickle"),
])
def test_malformed_batches_fail_with_the_member_named(tmp_path, problem, message):
    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (60, 3, 32, 32), dtype=np.uint8), [1] * 60
    if problem == "short rows":
        bad = encode_pickle({b"data": images.reshape(60, -1)[:, :3000], b"labels": labels})
    elif problem == "label range":
        bad = encode_batch(images, {"labels": [10] + labels[1:]})
    elif problem == "label count":
        bad = encode_batch(images, {"labels": labels[1:]}, filenames=["x"] * 60)
    elif problem == "batch size":
        bad = encode_batch(images[:30], {"labels": labels[:30]})
    else:
        bad = b"<html>not found</html>"
    fake = make_fake_cifar10(tmp_path / "files", replace={"data_batch_2": bad})
    dm = CIFAR10DataModule(cache_dir=tmp_path / "cache", source=fake.folder, verify=False)
    with pytest.raises(FormatError, match=message):
        dm.prepare_data(splits=["train"])
    assert _no_entries(tmp_path / "cache")


def test_broken_archives_fail_with_one_clear_line(tmp_path):
    fake = make_fake_cifar10(tmp_path / "files")
    fake.path.write_bytes(fake.data[: len(fake.data) // 2])
    dm = CIFAR10DataModule(cache_dir=tmp_path / "cache", source=fake.folder, verify=False)
    with pytest.raises(FormatError, match="cifar-10-python.tar.gz: not a readable tar archive"):
        dm.prepare_data(splits=["train"])

    other = make_fake_cifar100(tmp_path / "cifar100")  # the right name, the wrong archive
    os.replace(other.path, fake.path)
    with pytest.raises(FormatError, match="the archive lacks cifar-10-batches-py/batches.meta"):
        dm.prepare_data(splits=["test"])


# ------------------------------------------------------------------ the unpickler alone


def test_unpickler_admits_numpy_2_spellings_and_refuses_other_globals():
    import collections

    images = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    modern = pickle.dumps({"data": images, "labels": [3, 4]}, protocol=4)  # numpy._core
    assert b"numpy._core.multiarray" in modern
    parsed, labels = parse_batch(modern, "modern", "labels")
    assert parsed.shape == (2, 3, 32, 32) and labels.tolist() == [3, 4]
    assert b"numpy.core.multiarray" in encode_batch(parsed, {"labels": [3, 4]})

    harmless_but_foreign = pickle.dumps(collections.OrderedDict(a=1), protocol=2)
    with pytest.raises(FormatError, match="x: refused to unpickle the global "
                                          "collections.OrderedDict"):
        load_pickle(harmless_but_foreign, "x")
    # Arrays of Python objects are built from admitted globals alone, and still refused.
    objects = pickle.dumps(np.array([1, "a"], dtype=object), protocol=4)
    assert b"builtins" not in objects and b"_codecs" not in objects
    with pytest.raises(FormatError, match="x: refused a numpy array of dtype object"):
        load_pickle(objects, "x")


# ------------------------------------------------------------------ hostile pickles and tars


@pytest.mark.parametrize("build, message", [
    ("billion_laughs", "describes more objects than it has bytes"),
    ("object_array", r"refused _reconstruct of shape \(500000000,\)"),
    ("unbuilt_array", r"refused _reconstruct of shape \(60, 3072\)"),
    ("huge_state", r"declares \(1000000000, 3072\) x 1 B = 3072000000000 bytes but carries 16"),
])
def test_crafted_pickles_are_refused_before_they_allocate(build, message):
    import tracemalloc

    import hostile

    data = getattr(hostile, build)()
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match=f"evil: .*{message}"):
            parse_batch(data, "evil", "labels")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20  # numpy's allocations are traced too


def test_an_array_never_given_its_data_is_refused():
    import hostile

    # An empty array from _reconstruct is harmless only once BUILD gives it its state.
    unbuilt = hostile.batch_around(hostile.reconstruct_call((0,), b"b"), 0)
    with pytest.raises(FormatError, match="never given its data"):
        load_pickle(unbuilt, "x")


@pytest.mark.parametrize("opcode", [b"cnumpy\nndarray\n(K\x05tR.",  # ndarray(5): REDUCE
                                    b"cnumpy\nndarray\n(K\x05t\x81.",  # NEWOBJ
                                    b"\x82\x01."])  # EXT1
def test_opcodes_that_instantiate_or_allocate_are_refused(opcode):
    with pytest.raises(FormatError, match="x: refused"):
        load_pickle(b"\x80\x02" + opcode, "x")


def test_a_sparse_or_oversized_tar_member_is_refused_before_it_is_read(tmp_path):
    import hostile

    from datapipe.formats.cifar import iter_members

    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(hostile.tar_of([hostile.sparse_member("d/batch", 8 << 30)]))
    with pytest.raises(FormatError, match="a.tar.gz: d/batch is a sparse member"):
        list(iter_members(archive, ["d/batch"]))
    archive.write_bytes(hostile.tar_of(hostile.members({"d/batch": b"x" * 2000})))
    with pytest.raises(FormatError, match="d/batch declares 2000 bytes, more than the 1000"):
        list(iter_members(archive, ["d/batch"], max_bytes=1000))
