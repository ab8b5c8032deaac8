"""ImageNet as torchvision and others leave it: meta.bin, nested trees, subsets of classes."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("scipy")

from imagenet_fixture import (  # noqa: E402
    DEVKIT,
    TRAIN,
    VAL,
    make_fake_imagenet,
    meta_mat,
    recipe_for,
    tar_bytes,
)

from datapipe.cache import Cache  # noqa: E402
from datapipe.card import data_card  # noqa: E402
from datapipe.datamodules.imagenet import ImageNetDataModule  # noqa: E402
from datapipe.errors import ChecksumError, FormatError, UnverifiedDataWarning  # noqa: E402
from datapipe.formats.torch_meta import parse_meta_pickle, read_meta_bin  # noqa: E402
from datapipe.prepare import prepare_split  # noqa: E402
from datapipe.stages.download import FetchOptions  # noqa: E402
from datapipe.stages.jpeg import shard_paths  # noqa: E402

TESTS = Path(__file__).resolve().parent


def rows_of(prepared) -> dict[str, tuple]:
    """name -> (label, jpeg bytes) of every row of a prepared split."""
    import pyarrow as pa

    out = {}
    for path in shard_paths(prepared):
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_stream(source).read_all().to_pydict()
        for i, name in enumerate(table["name"]):
            out[name] = (table["label"][i], table["image"][i])
    return out


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return make_fake_imagenet(tmp_path_factory.mktemp("imagenet-files"))


@pytest.fixture(scope="module")
def recipe(fake):
    return recipe_for(fake.folder, val_shard_size=4)


@pytest.fixture(scope="module")
def from_archives(fake, recipe, tmp_path_factory):
    cache = Cache.at(tmp_path_factory.mktemp("from-archives"))
    return {split: prepare_split(recipe, split, cache, FetchOptions(source=str(fake.folder)),
                                 processes=1)[0] for split in ("train", "val")}


@pytest.fixture(scope="module")
def torchvision_root(fake, tmp_path_factory):
    """What torchvision's ImageNet leaves in its root: meta.bin, train/<wnid>/, val/<wnid>/
    (the archives it read are removed, as users do to save the space)."""
    from torchvision.datasets import imagenet as tv

    root = tmp_path_factory.mktemp("torchvision") / "imagenet"
    shutil.copytree(fake.folder, root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tv, "_verify_archive", lambda *args, **kwargs: None)  # fixture md5s
        for split in ("train", "val"):
            tv.ImageNet(str(root), split=split)
    for name in (TRAIN, VAL, DEVKIT):
        (root / name).unlink()
    assert sorted(p.name for p in root.iterdir()) == ["meta.bin", "train", "val"]
    return root


def test_meta_bin_written_by_torch_reads_without_torch_as_torchvision_reads_it(
        torchvision_root):
    from torchvision.datasets.imagenet import load_meta_file

    wnid_to_classes, val_wnids = load_meta_file(str(torchvision_root))
    devkit = read_meta_bin(torchvision_root / "meta.bin")
    assert {s.wnid: s.words for s in devkit.synsets} == {
        w: ", ".join(names) for w, names in wnid_to_classes.items()}
    assert list(devkit.wnids) == sorted(wnid_to_classes)
    assert [devkit.synsets[label].wnid for label in devkit.val_labels()] == val_wnids
    code = ("import sys, json, datapipe.formats.torch_meta as m; "
            "m.read_meta_bin(sys.argv[1]); "
            "print(json.dumps([n for n in ('torch', 'torchvision') if n in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code, str(torchvision_root / "meta.bin")],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(TESTS.parent)})
    assert json.loads(out.stdout) == []


def test_a_torchvision_root_is_taken_unverified_with_its_labels_and_names(
        fake, recipe, torchvision_root, tmp_path):
    from torchvision.datasets import ImageNet

    cache = Cache.at(tmp_path / "cache")
    with pytest.raises(ChecksumError, match="--no-verify"):
        prepare_split(recipe, "train", cache, FetchOptions(source=str(torchvision_root)))
    for split in ("train", "val"):
        with pytest.warns(UnverifiedDataWarning, match="meta.bin unverified"):
            entry, _ = prepare_split(recipe, split, cache, FetchOptions(
                source=str(torchvision_root), verify=False), processes=1)
        assert not entry.verified
        theirs = ImageNet(str(torchvision_root), split=split)
        assert {Path(p).name: y for p, y in theirs.samples} == {
            n: r[0] for n, r in rows_of(entry).items()}
        # The classes are the tree's (3 of the devkit's 1000), named as meta.bin names them.
        assert [c["wnid"] for c in entry.manifest["classes"]] == theirs.wnids
        assert [c["words"] for c in entry.manifest["classes"]] == [
            ", ".join(names) for names in theirs.classes]

    dm = ImageNetDataModule(cache_dir=tmp_path / "cache", source=torchvision_root,
                            recipe=recipe, verify=False, image_size=24, num_workers=0,
                            num_imgs_per_val_class=2)
    dm.prepare_data()
    assert dm.num_classes == 3 and dm.wnids == sorted(fake.train)
    dm.setup("fit")
    assert data_card(dm)["dataset"]["num_classes"] == 3


def test_the_val_archive_is_labelled_by_meta_bin_when_the_devkit_is_gone(
        fake, recipe, torchvision_root, from_archives, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(torchvision_root / "meta.bin", root)
    shutil.copy(fake.folder / VAL, root)
    with pytest.warns(UnverifiedDataWarning):
        entry, _ = prepare_split(recipe, "val", Cache.at(tmp_path / "cache"),
                                 FetchOptions(source=str(root), verify=False), processes=1)
    assert rows_of(entry) == rows_of(from_archives["val"])
    assert len(entry.manifest["classes"]) == 1000  # an archive: all of meta.bin's classes


def test_a_nested_tree_gives_the_flat_trees_rows(recipe, torchvision_root, tmp_path):
    nested = tmp_path / "nested"
    for split in ("train", "val"):
        for folder in (torchvision_root / split).iterdir():
            shutil.copytree(folder, nested / split / folder.name / folder.name)
    shutil.copy(torchvision_root / "meta.bin", nested)
    for split in ("train", "val"):
        options = dict(verify=False)
        with pytest.warns(UnverifiedDataWarning):
            flat, _ = prepare_split(recipe, split, Cache.at(tmp_path / "flat"), FetchOptions(
                source=str(torchvision_root), **options), processes=1)
            deep, _ = prepare_split(recipe, split, Cache.at(tmp_path / "deep"), FetchOptions(
                source=str(nested), **options), processes=1)
        assert rows_of(deep) == rows_of(flat)


def test_a_tree_without_devkit_or_meta_bin_names_classes_by_wnid(
        recipe, torchvision_root, tmp_path, caplog):
    bare = tmp_path / "bare"
    shutil.copytree(torchvision_root / "train", bare / "train")
    with pytest.warns(UnverifiedDataWarning):
        entry, _ = prepare_split(recipe, "train", Cache.at(tmp_path / "c1"),
                                 FetchOptions(source=str(bare), verify=False), processes=1)
    assert [c["words"] for c in entry.manifest["classes"]] == sorted(
        p.name for p in (bare / "train").iterdir())
    # An unreadable meta.bin: the same, with a warning saying why.
    (bare / "meta.bin").write_bytes(b"PK\x03\x04 not really a zip")
    with caplog.at_level(logging.WARNING, logger="datapipe"), \
            pytest.warns(UnverifiedDataWarning):
        again, _ = prepare_split(recipe, "train", Cache.at(tmp_path / "c2"),
                                 FetchOptions(source=str(bare), verify=False), processes=1)
    assert "not a readable torch file" in caplog.text and "wnid folders" in caplog.text
    assert rows_of(again) == rows_of(entry)


def test_a_devkit_of_five_classes_is_a_five_class_imagenet(fake, tmp_path):
    """As torchvision's own test fixtures make it: meta.mat with 5 leaf synsets."""
    folder = tmp_path / "five"
    folder.mkdir()
    for name in (TRAIN, VAL):
        shutil.copy(fake.folder / name, folder / name)
    by_wnid = {wnid: (ident, words) for ident, wnid, words in fake.leaves}
    chosen = sorted(fake.train) + sorted(w for w in by_wnid if w not in fake.train)[:2]
    leaves = [(i + 1, wnid, by_wnid[wnid][1]) for i, wnid in enumerate(reversed(chosen))]
    id_of = {wnid: ident for ident, wnid, _ in leaves}
    (folder / DEVKIT).write_bytes(tar_bytes([
        ("ILSVRC2012_devkit_t12/data/meta.mat", meta_mat(leaves, [])),
        ("ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
         "".join(f"{id_of[wnid]}\n" for _, wnid, _ in fake.val).encode()),
    ], gzip=True))
    recipe = recipe_for(folder, val_shard_size=4)
    dm = ImageNetDataModule(cache_dir=tmp_path / "cache", source=folder, recipe=recipe,
                            image_size=24, num_workers=0, num_imgs_per_val_class=2)
    prepared = dm.prepare_data()
    assert all(p.verified for p in prepared.values())
    assert dm.num_classes == 5 and dm.wnids == sorted(chosen)
    assert dm.classes == [by_wnid[w][1] for w in sorted(chosen)]
    labels = {wnid: dm.wnids.index(wnid) for wnid in chosen}
    rows = rows_of(prepared["val"])
    assert {n: r[0] for n, r in rows.items()} == {n: labels[w] for n, w, _ in fake.val}
    assert prepared["train"].manifest["statistics"]["class_counts"] == [
        len(fake.train.get(w, ())) for w in sorted(chosen)]
    dm.setup("fit")
    card = data_card(dm)
    assert card["dataset"]["num_classes"] == 5


def test_tree_folders_that_are_not_wnids_are_refused_in_one_line(recipe, tmp_path):
    tree = tmp_path / "tree"
    (tree / "train" / "cats").mkdir(parents=True)
    with pytest.raises(FormatError, match=r"'cats' is not a class folder"):
        prepare_split(recipe, "train", Cache.at(tmp_path / "c"),
                      FetchOptions(source=str(tree), verify=False), processes=1)


def test_meta_pickle_of_the_wrong_shape_is_refused():
    for value, message in (
            ({"n01440764": ("tench",)}, r"expected \(wnid_to_classes, val_wnids\)"),
            (({"../etc": ("x",)}, []), "not a WordNet id"),
            (({"n01440764": [1, 2]}, []), "not a tuple of strings"),
            (({"n01440764": ("tench",)}, ["n09999999"]), "is not one of its classes"),
            (({}, []), "is empty")):
        with pytest.raises(FormatError, match=message):
            parse_meta_pickle(pickle.dumps(value, protocol=2))


def test_splits_over_different_classes_are_refused_by_the_module(
        recipe, torchvision_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(torchvision_root, root)
    dropped = sorted((root / "val").iterdir())[-1]
    shutil.rmtree(dropped)  # val lacks a class train has: its labels would shift
    dm = ImageNetDataModule(cache_dir=tmp_path / "cache", source=root, recipe=recipe,
                            verify=False, image_size=24, num_workers=0,
                            num_imgs_per_val_class=1)
    with pytest.warns(UnverifiedDataWarning), \
            pytest.raises(FormatError, match=rf"train has 3 classes and val 2 \(they differ "
                                             rf"in {dropped.name}\); give both splits the same"):
        dm.prepare_data()
