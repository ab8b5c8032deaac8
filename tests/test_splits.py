"""Split specs, seeded carving, split plans and their cache (datapipe.splits)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from datapipe import splits
from datapipe.cache import Cache, canonical_json
from datapipe.errors import CacheError, ConfigError, DatapipeError, SplitSpecError
from datapipe.splits import (
    SliceSpec,
    SplitPlan,
    carve,
    load_or_create_plan,
    parse_split_spec,
    plan_provenance,
    plan_splits,
    resolve_split_spec,
    source_splits_needed,
)

REPO = Path(__file__).resolve().parents[1]
MNIST = {"train": ("fp-train-a", 60000), "test": ("fp-test-a", 10000)}
SIZES = {name: size for name, (_, size) in MNIST.items()}


def rows(part):
    """{source split: sorted int64 array of all its rows} of a plan part."""
    out: dict[str, list] = {}
    for src, idx in part:
        out.setdefault(src, []).append(idx)
    return {src: np.sort(np.concatenate(v)) for src, v in out.items()}


# ------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("train", (SliceSpec("train", None, None, "abs"),)),
        ("train[:]", (SliceSpec("train", None, None, "abs"),)),
        ("train[:90%]", (SliceSpec("train", None, 90, "%"),)),
        ("train[10%:20%]", (SliceSpec("train", 10, 20, "%"),)),
        ("train[-10%:]", (SliceSpec("train", -10, None, "%"),)),
        ("train[:12.5%]", (SliceSpec("train", None, 12.5, "%"),)),
        ("train[-5000:]", (SliceSpec("train", -5000, None, "abs"),)),
        ("train[100:-200]", (SliceSpec("train", 100, -200, "abs"),)),
        ("extra-2_b[3:4]", (SliceSpec("extra-2_b", 3, 4, "abs"),)),
        ("train+test", (SliceSpec("train"), SliceSpec("test"))),
        (
            " train[:54000] +  test[ -10% : ] ",
            (SliceSpec("train", None, 54000, "abs"), SliceSpec("test", -10, None, "%")),
        ),
    ],
)
def test_parse_accepts_every_documented_form(spec, expected):
    assert parse_split_spec(spec) == expected


@pytest.mark.parametrize(
    "spec, canonical",
    [
        ("train", "train"),
        ("train[:]", "train"),
        ("train[ :90% ]", "train[:90%]"),
        ("train[12.0%:50%]", "train[12%:50%]"),
        ("train[:12.50%]", "train[:12.5%]"),
        ("train[-5000:]", "train[-5000:]"),
    ],
)
def test_slice_spec_prints_its_canonical_text(spec, canonical):
    (term,) = parse_split_spec(spec)
    assert str(term) == canonical
    assert parse_split_spec(str(term)) == (term,)


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("train[", "unclosed '['"),
        ("train[1:2:3]", "more than one ':'"),
        ("train[5%:10]", "mixes a percent and an absolute bound"),
        ("[:10]", "no split name"),
        ("train[a:b]", "'a'"),
        ("", "empty"),
        ("   ", "empty"),
        ("train++test", "empty term"),
        ("train+", "empty term"),
        ("train[5]", "needs a ':'"),
        ("train[:101%]", "outside -100%..100%"),
        ("train[:10]x", "text after ']'"),
        ("train]", "']' without '['"),
        ("9train", "split name"),
        ("train[1.5:]", "'1.5'"),
    ],
)
def test_parse_rejects_bad_specs_with_one_actionable_line(spec, problem):
    with pytest.raises(SplitSpecError) as info:
        parse_split_spec(spec)
    message = str(info.value)
    assert "\n" not in message
    assert repr(spec) in message  # quotes the spec
    assert problem in message  # says what is wrong
    assert "'train[:90%]'" in message and "'train+test'" in message  # shows valid forms
    assert isinstance(info.value, ConfigError) and isinstance(info.value, DatapipeError)


def test_parse_rejects_a_non_string():
    with pytest.raises(SplitSpecError, match="a split spec is a string"):
        parse_split_spec(["train"])  # type: ignore[arg-type]


# --------------------------------------------------------------------- resolution


def test_resolve_percent_head_of_train():
    ((src, idx),) = resolve_split_spec("train[:90%]", SIZES)
    assert src == "train" and idx.dtype == np.int64
    np.testing.assert_array_equal(idx, np.arange(0, 54000))


def test_resolve_negative_absolute_tail():
    ((src, idx),) = resolve_split_spec("train[-5000:]", SIZES)
    assert src == "train"
    np.testing.assert_array_equal(idx, np.arange(55000, 60000))


@pytest.mark.parametrize(
    "spec, start, stop",
    [
        ("train[10%:20%]", 6000, 12000),
        ("train[-10%:]", 54000, 60000),
        ("train[:-10%]", 0, 54000),
        ("train[100:-200]", 100, 59800),
        ("train[:70000]", 0, 60000),  # Python slice semantics: clipped, not an error
        ("train[-70000:10]", 0, 10),
        ("train", 0, 60000),
    ],
)
def test_resolve_has_python_slice_semantics(spec, start, stop):
    ((_, idx),) = resolve_split_spec(spec, SIZES)
    np.testing.assert_array_equal(idx, np.arange(start, stop))


@pytest.mark.parametrize(
    "size, pct, n",
    [
        (7, "50", 4),  # 3.5 rounds to the even 4 (Python's round)
        (5, "50", 2),  # 2.5 rounds to the even 2
        (3, "33", 1),  # 0.99 -> 1 ("closest", not floor)
        (1000, "12.5", 125),
    ],
)
def test_resolve_rounds_percent_bounds_to_the_closest_row(size, pct, n):
    ((_, idx),) = resolve_split_spec(f"s[:{pct}%]", {"s": size})
    assert idx.size == n == round(size * float(pct) / 100)


def test_resolve_concatenates_terms_in_order():
    terms = resolve_split_spec("train + test[:10]", SIZES)
    assert [src for src, _ in terms] == ["train", "test"]
    np.testing.assert_array_equal(terms[0][1], np.arange(60000))
    np.testing.assert_array_equal(terms[1][1], np.arange(10))


def test_resolve_unknown_split_names_the_available_ones():
    with pytest.raises(SplitSpecError, match=r"'valid'.*available splits: 'test', 'train'"):
        resolve_split_spec("train+valid[:10]", SIZES)


@pytest.mark.parametrize("spec", ["train[50%:10%]", "train[60000:]", "train[5:5]", "test[100%:]"])
def test_resolve_empty_slice_is_an_error(spec):
    with pytest.raises(SplitSpecError, match="is empty"):
        resolve_split_spec(spec, SIZES)


# ------------------------------------------------------------------------ carving


def test_carve_int_takes_that_many_val_samples():
    indices = np.arange(60000)
    train, val = carve(indices, 5000, seed=42)
    assert (train.size, val.size) == (55000, 5000)
    assert train.dtype == val.dtype == np.int64
    assert np.intersect1d(train, val).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), indices)
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)  # sorted


def test_carve_fraction_takes_int_n_times_fraction():
    train, val = carve(np.arange(60000), 0.1, seed=0)
    assert (train.size, val.size) == (54000, 6000)
    _, val = carve(np.arange(999), 0.1, seed=0)
    assert val.size == 99  # int(99.9), as lightning-bolts does


def test_carve_val_is_the_tail_of_the_seeded_permutation_of_the_given_values():
    indices = np.arange(1000, 1100)
    train, val = carve(indices, 30, seed=7)
    perm = np.random.default_rng(7).permutation(100)
    np.testing.assert_array_equal(val, np.sort(indices[perm[70:]]))
    np.testing.assert_array_equal(train, np.sort(indices[perm[:70]]))


def test_carve_is_deterministic_per_seed():
    a = carve(np.arange(60000), 5000, seed=42)
    b = carve(np.arange(60000), 5000, seed=42)
    c = carve(np.arange(60000), 5000, seed=43)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_carve_zero_gives_no_val():
    train, val = carve(np.arange(10), 0, seed=1)
    np.testing.assert_array_equal(train, np.arange(10))
    assert val.size == 0


@pytest.mark.parametrize(
    "val_split, problem",
    [
        (-1, "negative"),
        (100, "leaves no training samples"),
        (101, "leaves no training samples"),
        (1.0, "outside [0, 1)"),
        (-0.1, "outside [0, 1)"),
        (math.nan, "outside [0, 1)"),
        (True, "bool"),
        ("10", "not a number"),
        (0.001, "empty validation set"),
    ],
)
def test_carve_rejects_unusable_val_split(val_split, problem):
    with pytest.raises(ConfigError) as info:
        carve(np.arange(100), val_split, seed=0)
    assert problem in str(info.value) and "\n" not in str(info.value)


def test_carve_rejects_a_bad_seed():
    with pytest.raises(ConfigError, match="seed"):
        carve(np.arange(10), 2, seed=-1)


# -------------------------------------------------------------------------- plans


def test_plan_defaults_carve_a_fifth_of_train_as_val_as_lightning_bolts_does():
    plan = plan_splits(MNIST)
    assert plan.sizes() == {"train": 48000, "val": 12000, "test": 10000, "predict": 10000}
    train, val = rows(plan.parts["train"])["train"], rows(plan.parts["val"])["train"]
    assert np.intersect1d(train, val).size == 0
    np.testing.assert_array_equal(np.union1d(train, val), np.arange(60000))
    expected_train, expected_val = carve(np.arange(60000), 0.2, seed=42)
    np.testing.assert_array_equal(train, expected_train)
    np.testing.assert_array_equal(val, expected_val)
    np.testing.assert_array_equal(plan.parts["predict"][0][1], np.arange(10000))
    assert plan.provenance == {
        "algorithm": "numpy-pcg64-permutation-v1",
        "seed": 42,
        "specs": {"train": "train", "val": 0.2, "test": "test", "predict": "test"},
        "sources": {
            "test": {"fingerprint": "fp-test-a", "size": 10000},
            "train": {"fingerprint": "fp-train-a", "size": 60000},
        },
    }
    assert len(plan.id) == 16 and int(plan.id, 16) >= 0


def test_plan_fraction_val():
    assert plan_splits(MNIST, val=0.1).sizes()["val"] == 6000


def test_plan_indices_are_read_only():
    plan = plan_splits(MNIST)
    with pytest.raises(ValueError):
        plan.parts["train"][0][1][0] = 1


def test_plan_string_val_is_removed_from_train():
    plan = plan_splits(MNIST, val="train[-5000:]")
    assert plan.sizes() == {"train": 55000, "val": 5000, "test": 10000, "predict": 10000}
    np.testing.assert_array_equal(rows(plan.parts["train"])["train"], np.arange(55000))
    np.testing.assert_array_equal(rows(plan.parts["val"])["train"], np.arange(55000, 60000))


def test_plan_string_val_from_the_middle_keeps_train_disjoint():
    plan = plan_splits(MNIST, train="train[:50%]", val="train[40%:60%]")
    train, val = rows(plan.parts["train"])["train"], rows(plan.parts["val"])["train"]
    np.testing.assert_array_equal(train, np.arange(24000))
    np.testing.assert_array_equal(val, np.arange(24000, 36000))


def test_plan_string_val_that_swallows_train_is_an_error():
    with pytest.raises(SplitSpecError, match="minus val spec 'train' is empty"):
        plan_splits(MNIST, train="train[:10]", val="train")


def test_plan_carves_over_a_multi_term_train_and_maps_back():
    sources = {"a": ("fa", 30), "b": ("fb", 20)}
    plan = plan_splits(sources, train="a+b[:10]", val=8, test=None, seed=3)
    assert plan.sizes() == {"train": 32, "val": 8}
    assert set(plan.parts) == {"train", "val"}
    train, val = rows(plan.parts["train"]), rows(plan.parts["val"])
    for src, total in (("a", np.arange(30)), ("b", np.arange(10))):
        t, v = train.get(src, np.array([], int)), val.get(src, np.array([], int))
        assert np.intersect1d(t, v).size == 0
        np.testing.assert_array_equal(np.union1d(t, v), total)
    # the carve ran over the concatenation a[0..29] + b[0..9]
    concat = np.concatenate([np.arange(30), np.arange(10)])
    perm = np.random.default_rng(3).permutation(40)
    tail = np.sort(perm[32:])
    expected = {"a": concat[tail[tail < 30]], "b": concat[tail[tail >= 30]]}
    for src in expected:
        np.testing.assert_array_equal(val.get(src, np.array([], int)), np.sort(expected[src]))


def test_plan_refuses_to_carve_from_a_train_spec_that_repeats_rows():
    with pytest.raises(SplitSpecError, match="more than once"):
        plan_splits(MNIST, train="train[:60%]+train[50%:]")


@pytest.mark.parametrize("val", [None, 0, 0.0])
def test_plan_without_val(val):
    plan = plan_splits(MNIST, val=val)
    assert plan.sizes() == {"train": 60000, "test": 10000, "predict": 10000}
    assert plan.provenance["specs"]["val"] is None


def test_plan_parts_can_be_absent_and_predict_can_differ():
    plan = plan_splits(MNIST, test=None, val=None)
    assert set(plan.parts) == {"train"}
    plan = plan_splits(MNIST, train=None, val="train[:100]", test=None, predict="test[:7]")
    assert plan.sizes() == {"val": 100, "predict": 7}


def test_plan_rejects_a_carve_without_train():
    with pytest.raises(ConfigError, match="train=None"):
        plan_splits(MNIST, train=None, val=100)


def test_plan_names_missing_source_splits():
    with pytest.raises(SplitSpecError, match=r"'validation'.*available splits: 'test', 'train'"):
        plan_splits(MNIST, val="validation")


def test_plan_warns_when_test_overlaps_train(caplog):
    with caplog.at_level(logging.WARNING, logger="datapipe"):
        plan_splits(MNIST, val=None, test="train[-10:]")
    assert "10 sample(s) of train are also in test" in caplog.text


def test_plan_id_is_stable_and_follows_every_input():
    base = plan_splits(MNIST)
    again = plan_splits(dict(MNIST))
    assert again.id == base.id
    for (_, a), (_, b) in zip(base.parts["val"], again.parts["val"], strict=True):
        np.testing.assert_array_equal(a, b)
    other_data = {**MNIST, "train": ("fp-train-b", 60000)}
    changed = [
        plan_splits(other_data),
        plan_splits(MNIST, seed=43),
        plan_splits(MNIST, train="train[:90%]"),
        plan_splits(MNIST, val=4000),
        plan_splits(MNIST, val=0.1),
        plan_splits(MNIST, val="train[-5000:]"),
        plan_splits(MNIST, test="test[:50%]"),
        plan_splits(MNIST, predict="test[:10]"),
    ]
    ids = [p.id for p in changed]
    assert base.id not in ids and len(set(ids)) == len(ids)


def test_plan_id_ignores_spelling_and_unused_sources():
    base = plan_splits(MNIST, train="train[:90%]")
    assert plan_splits(MNIST, train=" train[ : 90% ] ").id == base.id
    assert plan_splits({**MNIST, "extra": ("fx", 5)}, train="train[:90%]").id == base.id
    assert plan_splits(MNIST, train="train[:90%]", predict="test").id == base.id


def test_plan_json_round_trip():
    plan = plan_splits(MNIST, train="train[:1000]", val=100, test="test[:50]")
    data = json.loads(json.dumps(plan.to_json()))
    assert data["sizes"] == {"train": 900, "val": 100, "test": 50, "predict": 50}
    back = SplitPlan.from_json(data)
    assert back == plan and back.provenance == plan.provenance
    for name, part in plan.parts.items():
        for (s1, a), (s2, b) in zip(part, back.parts[name], strict=True):
            assert s1 == s2 and b.dtype == np.int64
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda d: d["provenance"].update(seed=1),  # id no longer matches
        lambda d: d["parts"]["val"][0]["indices"].append(5000),  # out of range
        lambda d: d["parts"]["val"][0].update(indices=[1.5]),  # not ints
        lambda d: d.update(sizes={"train": 1}),
        lambda d: d.pop("parts"),
        lambda d: d.update(format=99),
    ],
)
def test_plan_from_json_rejects_a_damaged_plan(tamper):
    data = json.loads(json.dumps(plan_splits(MNIST, train="train[:1000]", val=100).to_json()))
    tamper(data)
    with pytest.raises(CacheError):
        SplitPlan.from_json(data)


def test_source_splits_needed_parses_only():
    assert source_splits_needed(train="train", val=5000, test="test", predict=None) == {
        "train",
        "test",
    }
    assert source_splits_needed(
        train="train[:90%]+extra", val="validation[:10]", test=None, predict="unlabeled"
    ) == {"train", "extra", "validation", "unlabeled"}
    with pytest.raises(SplitSpecError):
        source_splits_needed(train="train[", val=None, test=None, predict=None)


def test_plan_provenance_needs_no_indices():
    prov = plan_provenance(MNIST, val="train[-5000:]", seed=1)
    assert splits.fingerprint(prov) == plan_splits(MNIST, val="train[-5000:]", seed=1).id


# -------------------------------------------------------------------- persistence


def test_load_or_create_writes_once_then_reads(tmp_path, monkeypatch):
    cache = Cache.at(tmp_path)
    first = load_or_create_plan(cache, "mnist", MNIST, val=0.1, seed=5)
    path = cache.splits / "mnist" / f"{first.id}.json"
    stored = json.loads(path.read_text())
    assert stored["id"] == first.id and stored["sizes"] == first.sizes()
    assert stored["provenance"] == first.provenance and "created_at" in stored
    mtime = path.stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("recomputed instead of reading the stored plan")

    monkeypatch.setattr(splits, "plan_splits", boom)
    monkeypatch.setattr(splits, "carve", boom)
    second = load_or_create_plan(str(tmp_path), "mnist", MNIST, val=0.1, seed=5)
    assert second == first and path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(
        rows(second.parts["val"])["train"], rows(first.parts["val"])["train"]
    )
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_load_or_create_keeps_one_file_per_plan(tmp_path):
    cache = Cache.at(tmp_path)
    a = load_or_create_plan(cache, "mnist", MNIST, seed=1)
    b = load_or_create_plan(cache, "mnist", MNIST, seed=2)
    assert a.id != b.id
    assert sorted(p.name for p in (cache.splits / "mnist").iterdir()) == sorted(
        [f"{a.id}.json", f"{b.id}.json"]
    )


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[: len(text) // 2],  # truncated: not JSON
        lambda text: json.dumps({**json.loads(text), "format": 7}),  # unknown format
        lambda text: "",
    ],
)
def test_load_or_create_replaces_a_corrupt_file(tmp_path, damage):
    cache = Cache.at(tmp_path)
    plan = load_or_create_plan(cache, "mnist", MNIST, train="train[:2000]", val=200)
    path = cache.splits / "mnist" / f"{plan.id}.json"
    path.write_text(damage(path.read_text()))
    stale = path.with_name(f".tmp-{path.name}-999999-deadbeef")
    stale.write_text("left by a killed process")
    again = load_or_create_plan(cache, "mnist", MNIST, train="train[:2000]", val=200)
    assert again == plan
    assert SplitPlan.from_json(json.loads(path.read_text())) == plan
    assert not stale.exists()


def test_load_or_create_rejects_a_path_unsafe_name(tmp_path):
    with pytest.raises(ConfigError, match="cannot name a splits folder"):
        load_or_create_plan(Cache.at(tmp_path), "../evil", MNIST)


def test_load_or_create_raises_spec_errors_before_touching_the_cache(tmp_path):
    with pytest.raises(SplitSpecError):
        load_or_create_plan(Cache.at(tmp_path), "mnist", MNIST, train="train[")
    assert not (tmp_path / "splits").exists()


_CHILD = """
import hashlib, json, sys
from datapipe.cache import canonical_json
from datapipe.splits import load_or_create_plan
sources = {"train": ("fp-train-a", 60000), "test": ("fp-test-a", 10000)}
plan = load_or_create_plan(sys.argv[1], "mnist", sources, val=0.1, seed=11)
digest = hashlib.sha256(canonical_json(plan.to_json()["parts"]).encode()).hexdigest()
print(json.dumps({"id": plan.id, "digest": digest, "torch": "torch" in sys.modules}))
"""


def test_separate_processes_get_identical_plans(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(tmp_path)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    assert len({r["id"] for r in results}) == 1
    assert len({r["digest"] for r in results}) == 1
    assert not any(r["torch"] for r in results)  # splits never imports torch
    # ... and they equal what this process computes
    plan = plan_splits(MNIST, val=0.1, seed=11)
    assert results[0]["id"] == plan.id
    here = hashlib.sha256(canonical_json(plan.to_json()["parts"]).encode()).hexdigest()
    assert results[0]["digest"] == here
    files = list((tmp_path / "splits" / "mnist").iterdir())
    assert [f.name for f in files] == [f"{plan.id}.json"]  # one entry, no temporaries


# ------------------------------------------------------------- stored format (v2)


def test_plan_ids_of_existing_specs_did_not_change():
    # The stored format changed (compact indices, digest); the ids, fingerprints of the
    # provenance, did not: checkpoints and data cards written before still match.
    assert plan_splits(MNIST, val=5000).id == "b9394c51a89d0714"  # the old default, spelled
    assert plan_splits(MNIST, val=0.1, seed=5).id == "279a5a4fd338dd16"
    assert plan_splits(MNIST, val="train[-5000:]").id == "29a2297b50765012"


def test_stored_plan_is_compact_and_carries_a_digest(tmp_path):
    cache = Cache.at(tmp_path)
    plan = load_or_create_plan(cache, "mnist", MNIST, val=5000, seed=3)
    path = cache.splits / "mnist" / f"{plan.id}.json"
    stored = json.loads(path.read_text())
    assert stored["format"] == 2 and stored["digest"] == plan.digest()
    assert stored["digest"].startswith("sha256:")
    assert path.stat().st_size < 20_000  # the index lists of format 1 took 470 KB
    entries = [e for part in stored["parts"].values() for e in part]
    assert all("indices" not in e for e in entries)
    assert {e["encoding"] for e in entries} == {"runs", "bitmap"}  # test is one run
    back = SplitPlan.from_json(stored)
    for name, part in plan.parts.items():
        for (s1, a), (s2, b) in zip(part, back.parts[name], strict=True):
            assert s1 == s2 and b.dtype == np.int64
            np.testing.assert_array_equal(a, b)


def test_a_format_1_file_is_recomputed_and_rewritten(tmp_path, caplog):
    cache = Cache.at(tmp_path)
    plan = plan_splits(MNIST, train="train[:3000]", val=300)
    path = cache.splits / "mnist" / f"{plan.id}.json"
    path.parent.mkdir(parents=True)
    old = {"format": 1, "id": plan.id, "provenance": plan.provenance, "sizes": plan.sizes(),
           "parts": {n: [{"split": s, "indices": i.tolist()} for s, i in p]
                     for n, p in plan.parts.items()}}
    path.write_text(json.dumps(old))
    with caplog.at_level(logging.INFO, logger="datapipe"):
        again = load_or_create_plan(cache, "mnist", MNIST, train="train[:3000]", val=300)
    assert again == plan and "older format; rewriting it" in caplog.text
    assert json.loads(path.read_text())["format"] == 2
    np.testing.assert_array_equal(again.parts["val"][0][1], plan.parts["val"][0][1])


@pytest.mark.parametrize("seed", range(6))
def test_codec_round_trips_any_increasing_rows(seed):
    from datapipe.plan_codec import decode_rows, encode_rows

    rng = np.random.default_rng(seed)
    size = int(rng.integers(1, 5000))
    density = [0.001, 0.5, 0.999, 1.0, 0.05, 0.9][seed]
    rows = np.flatnonzero(rng.random(size) < density)
    if rows.size == 0:
        rows = np.array([size - 1])
    entry = json.loads(json.dumps(encode_rows(rows)))
    back = decode_rows(entry, size)
    assert back.dtype == np.int64
    np.testing.assert_array_equal(back, rows)


@pytest.mark.parametrize("edit", [
    "move a val row into train", "edit one train row", "drop the digest", "forge the digest",
])
def test_load_refuses_an_edited_plan_and_recomputes_it(tmp_path, caplog, edit):
    cache = Cache.at(tmp_path)
    plan = load_or_create_plan(cache, "mnist", MNIST, train="train[:2000]", val=200)
    path = cache.splits / "mnist" / f"{plan.id}.json"
    data = plan.to_json()
    train, val = data["parts"]["train"][0]["indices"], data["parts"]["val"][0]["indices"]
    if edit == "move a val row into train":
        train.append(val.pop())
        train.sort()
    elif edit == "edit one train row":
        train[0] = val[0]
    if edit == "drop the digest":
        del data["digest"]
    elif edit == "forge the digest":
        data["digest"] = "sha256:" + "0" * 64
    else:  # recompute the digest, as someone covering an edit would
        edited = SplitPlan(plan.id, plan.provenance, {
            n: tuple((e["split"], np.array(e["indices"], dtype=np.int64)) for e in p)
            for n, p in data["parts"].items()})
        data["digest"] = edited.digest()
        data["sizes"] = edited.sizes()
    path.write_text(json.dumps(data))
    with pytest.raises(CacheError) as info:
        SplitPlan.from_json(json.loads(path.read_text()))
    assert "\n" not in str(info.value)
    with caplog.at_level(logging.WARNING, logger="datapipe"):
        again = load_or_create_plan(cache, "mnist", MNIST, train="train[:2000]", val=200)
    assert "refusing" in caplog.text and len(caplog.records) == 1
    t, v = rows(again.parts["train"])["train"], rows(again.parts["val"])["train"]
    assert np.intersect1d(t, v).size == 0 and t.size + v.size == 2000
    np.testing.assert_array_equal(v, rows(plan.parts["val"])["train"])
    assert SplitPlan.from_json(json.loads(path.read_text())) == plan  # rewritten whole


def test_verify_plans_reports_and_moves_aside_a_damaged_plan(tmp_path):
    from datapipe.splits import verify_plans

    cache = Cache.at(tmp_path)
    good = load_or_create_plan(cache, "mnist", MNIST, val=100, seed=1)
    bad = load_or_create_plan(cache, "mnist", MNIST, val=100, seed=2)
    path = cache.splits / "mnist" / f"{bad.id}.json"
    data = json.loads(path.read_text())
    data["digest"] = "sha256:" + "1" * 64
    path.write_text(json.dumps(data))
    checks = {c.label: c for c in verify_plans(cache, "mnist")}
    assert checks[f"mnist {good.id}"].status == "OK"
    assert "not decoded" in checks[f"mnist {good.id}"].detail  # no prepared data here
    # With no prepared data the plan is not decoded: a wrong digest is found when read.
    fp = {"train": "a" * 16, "test": "b" * 16}
    sources = {"train": (fp["train"], 60000), "test": (fp["test"], 10000)}
    plan = load_or_create_plan(cache, "mnist", sources, val=100, seed=3)
    for split, rows_ in (("train", 60000), ("test", 10000)):
        entry = cache.prepared / "mnist" / "1" / fp[split]
        entry.mkdir(parents=True)
        (entry / "manifest.json").write_text(json.dumps({"rows": rows_}))
    path = cache.splits / "mnist" / f"{plan.id}.json"
    data = json.loads(path.read_text())
    data["parts"]["val"][0]["count"] += 1
    path.write_text(json.dumps(data))
    [check] = [c for c in verify_plans(cache, "mnist") if c.label == f"mnist {plan.id}"]
    assert check.status == "CORRUPT" and "moved aside" in check.detail
    assert not path.exists() and path.with_name(path.name + ".corrupt").exists()
    again = load_or_create_plan(cache, "mnist", sources, val=100, seed=3)
    assert again == plan and path.exists()
