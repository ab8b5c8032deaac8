"""Stratified carving and K-fold cross-validation: the math, the plans, the DataModule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from datapipe.cache import Cache
from datapipe.card import data_card, format_card, split_options
from datapipe.errors import CacheError, ConfigError
from datapipe.splits import (
    Folds,
    Stratified,
    assign_folds,
    carve_stratified,
    load_or_create_plan,
    plan_splits,
)

REPO = Path(__file__).resolve().parents[1]
SOURCES = {"train": ("fp-train", 1000), "test": ("fp-test", 100)}


def imbalanced_labels(n: int = 1000, seed: int = 0) -> np.ndarray:
    """Ten classes with shares from 30% down to 1.5% (at least 15 of each in 1000)."""
    shares = np.array([30, 20, 12, 10, 8, 6, 5, 4, 3.5, 1.5]) / 100
    return np.random.default_rng(seed).choice(10, size=n, p=shares).astype(np.int64)


LABELS = {"train": imbalanced_labels()}


def rows_of(part):
    out = {}
    for src, idx in part:
        out.setdefault(src, []).append(idx)
    return {src: np.sort(np.concatenate(v)) for src, v in out.items()}


# ------------------------------------------------------------------ stratified carve


@pytest.mark.parametrize("val_split", [100, 0.1, 0.25, 333, 7])
@pytest.mark.parametrize("seed", [0, 1])
def test_stratified_carve_keeps_every_class_within_one_of_its_share(val_split, seed):
    labels = imbalanced_labels(seed=seed + 10)
    train, val = carve_stratified(labels, val_split, seed)
    n = labels.size
    n_val = val_split if isinstance(val_split, int) else int(n * val_split)
    assert val.size == n_val and train.size == n - n_val
    np.testing.assert_array_equal(np.union1d(train, val), np.arange(n))
    assert np.intersect1d(train, val).size == 0
    for c in np.unique(labels):
        share = n_val * np.sum(labels == c) / n
        got = np.sum(labels[val] == c)
        assert abs(got - share) < 1, (c, got, share)


def test_stratified_carve_is_seeded():
    a = carve_stratified(LABELS["train"], 100, 3)
    b = carve_stratified(LABELS["train"], 100, 3)
    c = carve_stratified(LABELS["train"], 100, 4)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_stratified_carve_refuses_a_class_of_one_sample():
    labels = np.array([0] * 50 + [1] * 49 + [2])
    with pytest.raises(ConfigError, match="class 2 has only 1 sample"):
        carve_stratified(labels, 0.2, 0)


def test_stratified_plan_has_its_own_id_and_is_stratified():
    plain = plan_splits(SOURCES, val=100)
    strat = plan_splits(SOURCES, val=Stratified(100), labels=LABELS)
    assert strat.id != plain.id and strat.sizes() == plain.sizes()
    assert strat.provenance["specs"]["val"]["stratified"] == 100
    val = rows_of(strat.parts["val"])["train"]
    counts = np.bincount(LABELS["train"][val], minlength=10)
    exact = 100 * np.bincount(LABELS["train"], minlength=10) / 1000
    assert np.all(np.abs(counts - exact) < 1)


# ------------------------------------------------------------------------- folds


@pytest.mark.parametrize("n, k", [(1000, 5), (103, 5), (10, 10), (7, 2)])
def test_fold_sizes_differ_by_at_most_one(n, k):
    folds = assign_folds(n, k, seed=0)
    sizes = np.bincount(folds, minlength=k)
    assert sizes.sum() == n and sizes.max() - sizes.min() <= 1
    assert list(sizes) == [n // k + (1 if i < n % k else 0) for i in range(k)]  # as KFold


def test_stratified_folds_keep_every_class_within_one_between_folds():
    labels = LABELS["train"]
    folds = assign_folds(labels.size, 5, seed=2, labels=labels)
    sizes = np.bincount(folds, minlength=5)
    assert sizes.max() - sizes.min() <= 1
    for c in range(10):
        per_fold = np.bincount(folds[labels == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1, (c, per_fold)


def test_stratified_folds_refuse_k_above_the_smallest_class():
    labels = np.array([0] * 20 + [1] * 3)
    with pytest.raises(ConfigError, match=r"folds=5 with stratify needs at least 5 samples of "
                                          r"every class; class 1 has only 3"):
        assign_folds(labels.size, 5, 0, labels)
    with pytest.raises(ConfigError, match="folds=5 needs at least 5 training samples"):
        assign_folds(4, 5, 0)


@pytest.mark.parametrize("bad, message", [
    (dict(k=1), "folds=1 must be an integer >= 2"),
    (dict(k=True), "folds=True"),
    (dict(k=5, fold=5), r"fold=5 must be an integer in 0..4"),
    (dict(k=5, fold=-1), "fold=-1"),
    (dict(k=5, fold=0, stratify="yes"), "stratify='yes'"),
])
def test_folds_refuse_bad_arguments(bad, message):
    with pytest.raises(ConfigError, match=message):
        Folds(**bad)


@pytest.mark.parametrize("stratify", [False, True])
def test_the_k_val_parts_are_disjoint_and_cover_the_train_source(stratify):
    whole = plan_splits(SOURCES, val=Folds(5, None, stratify), labels=LABELS, seed=7)
    assert whole.fold is None and whole.folds == 5 and set(whole.parts) == {
        "train", "test", "predict"}
    vals = []
    for i in range(5):
        fold = whole.for_fold(i)
        assert fold == plan_splits(SOURCES, val=Folds(5, i, stratify), labels=LABELS, seed=7)
        train, val = rows_of(fold.parts["train"])["train"], rows_of(fold.parts["val"])["train"]
        assert np.intersect1d(train, val).size == 0
        np.testing.assert_array_equal(np.union1d(train, val), np.arange(1000))
        assert val.size == 200 and fold.parts["test"] == whole.parts["test"]
        vals.append(val)
    everything = np.concatenate(vals)
    assert everything.size == 1000 and np.unique(everything).size == 1000  # disjoint, cover


def test_k_fold_plans_and_fold_plans_round_trip_through_json():
    from datapipe.splits import SplitPlan

    whole = plan_splits(SOURCES, val=Folds(5, None, True), labels=LABELS)
    assert whole.fold_sizes() == [200] * 5
    for plan in (whole, whole.for_fold(3)):
        for compact in (False, True):
            back = SplitPlan.from_json(json.loads(json.dumps(plan.to_json(compact))))
            assert back == plan and back.sizes() == plan.sizes()
            assert back.digest() == plan.digest()
    assert SplitPlan.from_json(whole.to_json(True)).for_fold(3) == whole.for_fold(3)


def test_each_fold_has_its_own_id_and_all_share_the_plan_id():
    folds = [plan_splits(SOURCES, val=Folds(4, i)) for i in range(4)]
    assert len({f.id for f in folds}) == 4
    assert len({f.plan_id for f in folds}) == 1
    assert folds[0].plan_id == plan_splits(SOURCES, val=Folds(4)).id
    assert plan_splits(SOURCES, val=Folds(4, 0, True), labels=LABELS).plan_id != folds[0].plan_id
    assert plan_splits(SOURCES, val=Folds(4, 0), seed=1).plan_id != folds[0].plan_id


def test_folds_over_a_multi_term_train_spec():
    sources = {"a": ("fa", 30), "b": ("fb", 20)}
    whole = plan_splits(sources, train="a+b[:10]", val=Folds(3), test=None)
    seen = {"a": [], "b": []}
    for i in range(3):
        for src, rows in rows_of(whole.for_fold(i).parts["val"]).items():
            seen[src].append(rows)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen["a"])), np.arange(30))
    np.testing.assert_array_equal(np.sort(np.concatenate(seen["b"])), np.arange(10))


def test_a_k_fold_plan_is_stored_once_for_every_fold(tmp_path, monkeypatch):
    cache = Cache.at(tmp_path)
    first = load_or_create_plan(cache, "mnist", SOURCES, val=Folds(5, 0, True), labels=LABELS)
    files = list((cache.splits / "mnist").iterdir())
    assert [f.name for f in files] == [f"{first.plan_id}.json"]

    def boom():
        raise AssertionError("labels read again: the plan was recomputed")

    for i in range(1, 5):
        fold = load_or_create_plan(cache, "mnist", SOURCES, val=Folds(5, i, True), labels=boom)
        assert fold == plan_splits(SOURCES, val=Folds(5, i, True), labels=LABELS)
        assert fold.plan_id == first.plan_id
    assert len(list((cache.splits / "mnist").iterdir())) == 1


def test_a_k_fold_plan_with_skewed_folds_is_refused(tmp_path):
    from datapipe.splits import SplitPlan

    whole = plan_splits(SOURCES, val=Folds(5))
    data = whole.to_json()
    moved = [i for i, f in enumerate(data["assignment"]) if f == 0][:2]
    for i in moved:  # two rows of fold 0 moved to fold 4: fold sizes 198 and 202
        data["assignment"][i] = 4
    skewed = SplitPlan(whole.id, whole.provenance, whole.parts,
                       np.array(data["assignment"], dtype=np.int64))
    data["digest"] = skewed.digest()  # even with a digest that matches
    with pytest.raises(CacheError, match="fold sizes"):
        SplitPlan.from_json(data)


_CHILD = """
import hashlib, json, sys
import numpy as np
from datapipe.splits import Folds, load_or_create_plan
labels = {"train": np.random.default_rng(0).integers(0, 10, 1000)}
out = []
for i in range(5):
    p = load_or_create_plan(sys.argv[1], "mnist", {"train": ("fp-train", 1000)}, train="train",
                            val=Folds(5, i, True), test=None, seed=9, labels=labels)
    h = hashlib.sha256(b"".join(idx.tobytes() for _, idx in p.parts["val"])).hexdigest()
    out.append([p.id, p.plan_id, h])
print(json.dumps({"folds": out, "torch": "torch" in sys.modules}))
"""


def test_every_process_gets_the_same_folds(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path / c)], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c in ("one", "one", "two")]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    assert results[0] == results[1] == results[2]  # shared cache or not, same ids and rows
    assert not results[0]["torch"]
    assert len({plan_id for _, plan_id, _ in results[0]["folds"]}) == 1
    assert len({fold_id for fold_id, _, _ in results[0]["folds"]}) == 5
    assert len(list((tmp_path / "one" / "splits" / "mnist").iterdir())) == 1


# ------------------------------------------------------------------ DataModule


@pytest.fixture
def mnist_cache(fake_mnist, tmp_path):
    from datapipe.cli import main

    cache = tmp_path / "cache"
    assert main(["prepare", "mnist", "--source", str(fake_mnist.folder), "--no-verify",
                 "--quiet", "--cache-dir", str(cache)]) == 0
    return cache


def _mnist(cache, **kwargs):
    from datapipe.datamodules.mnist import MNISTDataModule

    return MNISTDataModule(cache_dir=cache, verify=False, batch_size=100, **kwargs)


def test_datamodule_folds_and_the_data_card(mnist_cache, fake_mnist):
    labels = fake_mnist.arrays["train-labels-idx1-ubyte.gz"]
    dms = [_mnist(mnist_cache, folds=3, fold=i, stratify=True) for i in range(3)]
    vals = []
    for i, dm in enumerate(dms):
        dm.setup("fit")
        plan = dm.plan
        assert plan.fold == i and plan.sizes()["val"] == 200 and plan.sizes()["train"] == 400
        vals.append(rows_of(plan.parts["val"])["train"])
        card = data_card(dm)
        assert card["splits"]["id"] == plan.id and card["splits"]["fold"] == i
        assert card["splits"]["plan_id"] == dms[0].plan.plan_id
        assert card["splits"]["path"].endswith(f"{plan.plan_id}.json")
        text = format_card(card)
        assert f"cross-validation: fold {i} of 3, stratified by class" in text
        options = split_options(card)
        assert (options["folds"], options["fold"], options["stratify"]) == (3, i, True)
        assert _mnist(mnist_cache, **options).plan_splits() == plan
        assert len(dm.datasets["val"]) == 200
    assert np.unique(np.concatenate(vals)).size == 600
    # stratified: each class's count within 1 between folds
    per_fold = np.array([np.bincount(labels[v], minlength=10) for v in vals])
    assert np.all(per_fold.max(axis=0) - per_fold.min(axis=0) <= 1)


def test_datamodule_stratified_val_split(mnist_cache, fake_mnist):
    labels = fake_mnist.arrays["train-labels-idx1-ubyte.gz"]
    dm = _mnist(mnist_cache, val_split=0.2, stratify=True)
    plain = _mnist(mnist_cache, val_split=0.2)
    plan = dm.plan_splits()
    assert plan.id != plain.plan_splits().id and plan.sizes()["val"] == 120
    val = rows_of(plan.parts["val"])["train"]
    exact = 120 * np.bincount(labels, minlength=10) / 600
    assert np.all(np.abs(np.bincount(labels[val], minlength=10) - exact) < 1)
    assert "stratified by class" in format_card(data_card(dm))


@pytest.mark.parametrize("kwargs, message", [
    (dict(folds=5), "give folds=K and fold=I together"),
    (dict(fold=1), "give folds=K and fold=I together"),
    (dict(folds=5, fold=7), "fold=7 must be an integer in 0..4"),
    (dict(val_split="train[-100:]", stratify=True), "does not apply to val_split='train"),
    (dict(val_split=0, stratify=True), "does not apply to val_split=0"),
    (dict(stratify="yes"), "stratify must be True or False"),
])
def test_datamodule_split_argument_errors(kwargs, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        _mnist(tmp_path, **kwargs)


def test_stratified_folds_on_too_small_classes_are_one_line(mnist_cache):
    dm = _mnist(mnist_cache, folds=200, fold=0, stratify=True)
    with pytest.raises(ConfigError) as info:
        dm.setup("fit")
    assert "folds=200 with stratify needs at least 200 samples of every class" in str(info.value)


def test_resuming_a_checkpoint_on_another_fold_is_refused(mnist_cache, tmp_path):
    from datapipe.models import ImageClassifier
    from datapipe.trainer import Trainer
    from datapipe.trainer.checkpoint import find_last

    def run(fold, ckpt_path=None, root=tmp_path / "runs"):
        dm = _mnist(mnist_cache, folds=3, fold=fold)
        model = ImageClassifier.from_datamodule(dm, model="mlp")
        trainer = Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                          default_root_dir=root, enable_progress_bar=False)
        trainer.fit(model, dm, ckpt_path=ckpt_path)
        return dm

    dm0 = run(0)
    last = find_last(tmp_path / "runs")
    from datapipe.trainer import checkpoint

    saved = checkpoint.load(last)
    assert saved["datamodule"]["split_id"] == dm0.plan.id
    assert saved["data_card"]["splits"]["fold"] == 0
    with pytest.raises(ConfigError, match=rf"trained on split {dm0.plan.id} but this "
                                          rf"DataModule gives split"):
        run(1, ckpt_path=last, root=tmp_path / "other")
