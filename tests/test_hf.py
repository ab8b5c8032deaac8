"""Hugging Face datasets both ways: any Dataset as a source, prepared splits as Datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fresh_registry import fresh_registry  # noqa: F401  (a fixture)
from PIL import Image

import datapipe
from datapipe.errors import ConfigError, FormatError
from datapipe.integrations.hf import from_hf, load_hf

datasets = pytest.importorskip("datasets")

CLASSES = ["cat", "dog", "eel"]
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def pets(n=30, size=(10, 12), seed=0, mode="RGB") -> datasets.Dataset:
    """n images (Image feature) of ``size`` (w, h) with ClassLabel labels k % 3."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    images = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(n)]
    return datasets.Dataset.from_dict(
        {"photo": images, "kind": [k % 3 for k in range(n)], "note": ["x"] * n},
        features=datasets.Features({"photo": datasets.Image(),
                                    "kind": datasets.ClassLabel(names=CLASSES),
                                    "note": datasets.Value("string")}))


@pytest.fixture
def hf_offline(tmp_path, monkeypatch):
    """datasets' own cache under tmp_path; the hub is never asked."""
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_a_dataset_dict_is_a_source_with_its_own_splits(tmp_path):
    dd = datasets.DatasetDict(train=pets(30), validation=pets(6, seed=1), test=pets(9, seed=2))
    dm = from_hf(dd, name="pets", cache_dir=tmp_path, batch_size=5)
    assert (dm.classes, dm.dims) == (CLASSES, (3, 12, 10))
    assert dm.split_specs == {"train": "train", "val": "validation", "test": "test",
                              "predict": None}
    dm.prepare_data()
    dm.setup("fit")
    images, labels = dm.datasets["train"].__getitems__([0, 4])
    source = np.asarray(dd["train"][4]["photo"]).transpose(2, 0, 1)
    assert images.dtype.is_floating_point is False and images.shape == (2, 3, 12, 10)
    assert np.array_equal(images[1].numpy(), source) and labels.tolist() == [0, 1]
    assert dm.plan_splits().sizes() == {"train": 30, "val": 6, "test": 9, "predict": 9}


def test_the_same_dataset_finds_its_prepared_data_and_a_changed_one_does_not(tmp_path):
    first = from_hf(pets(12), cache_dir=tmp_path).prepare_data()["train"]
    again_dm = from_hf(pets(12), cache_dir=tmp_path)
    again = again_dm.prepare_data()["train"]
    assert again.fingerprint == first.fingerprint
    assert again.manifest["created_at"] == first.manifest["created_at"]  # nothing redone
    changed = from_hf(pets(12).select(range(11)), cache_dir=tmp_path).prepare_data()["train"]
    assert changed.fingerprint != first.fingerprint and changed.rows == 11
    clean = again_dm.recipe.clean.config()
    assert clean["fingerprints"] == {"train": pets(12)._fingerprint}
    assert "dataset" not in clean  # the object is no part of the config


def test_labels_as_names_or_plain_ids_and_pixels_as_arrays(tmp_path):
    rng = np.random.default_rng(3)
    arrays = datasets.Dataset.from_dict({
        "pixels": [rng.integers(0, 256, (6, 6), dtype=np.uint8).tolist() for _ in range(8)],
        "label": ["b", "a"] * 4,
    })
    dm = from_hf(arrays, cache_dir=tmp_path)
    assert (dm.classes, dm.dims) == (["a", "b"], (1, 6, 6))
    columns = dm.recipe.clean("train", {})
    assert columns["label"].tolist() == [1, 0] * 4
    assert np.array_equal(columns["image"][0, 0], np.array(arrays[0]["pixels"], np.uint8))

    ids = datasets.Dataset.from_dict({"image": [np.zeros((4, 4, 3), np.uint8)] * 3,
                                      "y": [0, 4, 2]})
    dm = from_hf(ids, label_column="y", cache_dir=tmp_path)
    assert dm.classes == ["0", "1", "2", "3", "4"] and dm.dims == (3, 4, 4)


def test_image_size_fits_every_image_and_mixed_sizes_without_it_fail_on_the_row(tmp_path):
    mixed = datasets.concatenate_datasets([pets(4, size=(10, 12)), pets(2, size=(7, 7))])
    dm = from_hf(mixed, image_size=8, channels=1, cache_dir=tmp_path)
    assert dm.dims == (1, 8, 8)
    assert dm.prepare_data()["train"].rows == 6
    unfitted = from_hf(mixed, cache_dir=tmp_path / "other")
    with pytest.raises(FormatError, match=r"\(train\) row 4, column 'photo': 7x7 pixels, but "
                                          r"the first image has 10x12; pass image_size="):
        unfitted.prepare_data()
    assert not list((tmp_path / "other" / "prepared").glob("*/*/*"))


def test_a_missing_column_names_the_columns_there_are(tmp_path):
    with pytest.raises(ConfigError, match=r"has no column 'image'; its columns are photo, "
                                          r"kind, note; pass image_column="):
        from_hf(pets(3), image_column="image", cache_dir=tmp_path)
    no_labels = pets(3).remove_columns("kind")
    with pytest.raises(ConfigError, match=r"no label column .*its columns are photo, note; "
                                          r"pass label_column="):
        from_hf(no_labels, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="expected a datasets.Dataset or DatasetDict"):
        from_hf({"train": [1, 2]}, cache_dir=tmp_path)
    assert not (tmp_path / "prepared").exists()


def test_to_hf_maps_the_prepared_file_without_copying(tmp_path):
    import pyarrow as pa

    dm = from_hf(datasets.DatasetDict(train=pets(30), test=pets(9, seed=2)), val_split=10,
                 cache_dir=tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    before = pa.total_allocated_bytes()
    train = dm.to_hf("train")
    assert pa.total_allocated_bytes() - before < 64 * 1024  # the rows stay in the file
    assert [f["filename"] for f in train.cache_files] == [str(dm.prepared["train"].data_file)]
    assert train.features["label"].names == CLASSES and len(train) == 20
    # train minus val is a select() of the file: the same rows, in the module's order
    ours_images, ours_labels = dm.datasets["train"].__getitems__(list(range(20)))
    theirs = train.with_format("numpy")[:]
    assert np.array_equal(theirs["image"].reshape(20, *dm.dims), ours_images.numpy())
    assert theirs["label"].tolist() == ours_labels.tolist()
    whole = dm.to_hf("test")
    assert len(whole) == 9 and whole._indices is None  # a whole file: no mapping at all


def test_to_hf_of_a_split_over_two_source_splits_and_of_an_unknown_one(tmp_path):
    dm = from_hf(datasets.DatasetDict(train=pets(6), test=pets(4, seed=2)),
                 train_split="train+test", test_split="test", cache_dir=tmp_path)
    dm.prepare_data()
    both = dm.to_hf("train")
    assert len(both) == 10
    assert both["label"] == [k % 3 for k in range(6)] + [k % 3 for k in range(4)]
    with pytest.raises(ConfigError, match="has no split 'nope'"):
        dm.to_hf("nope")


def test_load_hf_reads_parquet_arrow_and_save_to_disk_offline(tmp_path, hf_offline):
    ds = pets(6)
    ds.to_parquet(str(tmp_path / "pets.parquet"))
    datasets.DatasetDict(train=ds, test=pets(3)).save_to_disk(str(tmp_path / "saved"))
    from_parquet = load_hf(str(tmp_path / "pets.parquet"))
    assert from_parquet["train"].features["kind"].names == CLASSES
    saved = load_hf(str(tmp_path / "saved"))
    assert sorted(saved) == ["test", "train"] and len(saved["test"]) == 3
    arrow = next((tmp_path / "saved" / "train").glob("*.arrow"))
    assert len(load_hf(str(arrow))["train"]) == 6
    with pytest.raises(ConfigError, match="does not exist; give a data file"):
        load_hf(str(tmp_path / "missing.parquet"))
    with pytest.raises(ConfigError, match="cannot load the Hugging Face dataset 'nobody/none'"):
        load_hf("nobody/none")


@pytest.mark.usefixtures("fresh_registry")
def test_the_hf_recipe_takes_an_object_in_hand(tmp_path):
    datapipe.load_recipe_dir(RECIPES)
    dm = datapipe.load("hf", dataset=pets(6), image_size=4, cache_dir=tmp_path)
    assert dm.name == "hf" and dm.dims == (3, 4, 4)
    assert dm.prepare_data()["train"].rows == 6


def test_to_hf_serves_any_recipe_such_as_mnist(fake_mnist, tmp_path):
    from datapipe.datamodules import MNISTDataModule

    dm = MNISTDataModule(cache_dir=tmp_path, source=fake_mnist.folder, verify=False,
                         val_split=100)
    dm.prepare_data()
    val = dm.to_hf("val")
    rows = dm.plan_splits().parts["val"][0][1]
    assert len(val) == 100 and val.features["label"].names == dm.classes
    images = val.with_format("numpy")[:]["image"].reshape(100, 28, 28)
    assert np.array_equal(images, fake_mnist.arrays["train-images-idx3-ubyte.gz"][rows])
